"""What a round costs as the federation grows: peak memory, seconds per round and run-directory growth at 10, 100
and 1,000 clients on the in-process engine and on Flower's simulation runtime (CPU, a tiny randomly initialised
Llama, as the tests use).

``python -m benchmarks.scale [--engines in-process flower] [--clients 10 100 1000] [--fraction 0.01]
[--sampled 10] [--rounds 8] [--examples-per-client 8] [--data DOLLY.jsonl] [--dry-run]``

Every configuration runs ``fedlora-opt`` in a fresh Python process of its own (so peak RSS is that run's alone):
``N`` clients of ``--examples-per-client`` rows each (``data.max_examples = N × rows``: a seeded sample of
``--data``, or synthetic Dolly-format rows without it, split IID), so a sampled client costs the same at every
``N``; ``--rounds`` rounds, every round evaluated (the loss; no generation), in two series:

* ``fraction``: ``server.fraction = eval.fraction = --fraction`` and nothing else: at 0.01, 1 client trains and 1
  is scored a round at 10 and 100 clients, 10 at 1,000 (a round costs what its sample costs);
* ``min-sample``: ``server.fraction = --fraction`` with ``server.min_clients = eval.clients = --sampled``
  (``server.min_clients`` is the least sample, as Flower's ``min_fit_clients``): 10 clients train and 10 are scored
  a round at every ``N`` up to 1,000, so what changes is the federation's size alone.

Engines (``--engines``):

* ``in-process``: :func:`fedlora.federated.train` in the child process;
* ``flower``: a SuperLink running Flower's simulation runtime (:func:`~fedlora.flower.launch.start_superlink`) and
  :func:`~fedlora.flower.launch.run_flower` with ``num-supernodes = N``: N virtual SuperNodes, one client each,
  served by a pool of Ray worker processes (Flower's way to run many clients on one machine; ``pip install
  'flwr[simulation]'``). The ServerApp runs in Flower's simulation process; the clients' states are on the nodes'
  side, not in the run directory.

Measured in the child: ``peak_rss_mib`` (in-process: ``getrusage(RUSAGE_SELF).ru_maxrss``, the whole process:
torch, the model, the data and the run; flower: the largest sum of the resident memory of the child and every
process under it, SuperLink, simulation process and Ray workers, sampled every 0.1 s), ``rss_before_run_mib`` (the
child once torch and, in-process, the model and tokenizer are loaded, before the run), ``rss_end_mib`` (the
resident memory when the last round ended: what the run keeps, where a transient peak such as reading the data
file may hide it), ``s_per_round`` (the median over rounds 2..R of the time between consecutive round commits:
training, aggregation, evaluation, writing; on flower, when a round's rows appear in ``metrics.jsonl``, polled every
0.1 s), ``startup_s`` (from the start of the run to round 1's commit: on flower the SuperLink, Ray and the nodes
starting too), the run directory's size at the end (``dir_mib``) and its median growth per round over rounds 2..R
(``dir_kib_per_round``), and, read back from ``metrics.jsonl``, the clients that trained and were scored per round
(``sampled``, ``scored``).

Each configuration appends one row (with :func:`~benchmarks.common.provenance` and the run's ``config_hash``) to
``<results-dir>/scale-cpu-<UTC date>-<commit7>.jsonl``; the ``.md`` table (per engine and series, with the ratio of
each row to the smallest federation) and the ``.png`` (peak RSS and seconds per round against the number of
clients) are rewritten after every row. ``--dry-run``: 4 and 8 clients, 3 rounds, into ``--results-dir``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any
from unittest import mock

from matplotlib.figure import Figure

from benchmarks.common import (
    RESULTS_DIR,
    config_hash,
    git_commit,
    markdown_table,
    provenance,
    read_jsonl,
    today,
    write_jsonl,
)

ENGINES = ("in-process", "flower")
SERIES = ("fraction", "min-sample")
BASE = [  # every configuration: fedlora-opt on the tiny model, short sequences, the loss evaluated every round
    "strategy=fedlora-opt",
    "data.partition=iid",
    "data.min_examples=2",
    "data.max_length=32",
    "data.global_test_size=8",
    "adapter.r=4",
    "client.batch_size=2",
    "eval.every=1",
    "eval.rouge_examples=0",
]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scale", description=__doc__.split("\n\n")[0])
    parser.add_argument("--engines", nargs="+", choices=ENGINES, default=["in-process"])
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 100, 1000], help="federation sizes")
    parser.add_argument("--fraction", type=float, default=0.01, help="server.fraction and eval.fraction (fraction)")
    parser.add_argument("--sampled", type=int, default=10, help="server.min_clients and eval.clients (min-sample)")
    parser.add_argument("--series", nargs="+", choices=SERIES, default=list(SERIES))
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--examples-per-client", type=int, default=8, help="rows per client")
    parser.add_argument("--data", type=Path, help="a Dolly .jsonl (default: synthetic Dolly-format rows)")
    parser.add_argument("--out", type=Path, help="run directories (default: runs/<results name>)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--dry-run", action="store_true", help="4 and 8 clients, 3 rounds (a wiring check)")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # one configuration, as JSON: run it in this process
    args = parser.parse_args(argv)
    if args.dry_run:
        args.clients, args.rounds, args.sampled, args.fraction = [4, 8], 3, 2, 0.25
    return args


def synthetic_rows(count: int, path: Path) -> Path:
    """``count`` short Dolly-format rows (instruction, context, response, category), the same every time."""
    categories = ("open_qa", "summarization", "brainstorming", "classification")
    rows = [
        {
            "instruction": f"Question {i}: what is {i} plus {i % 7}?",
            "context": f"Row {i} of a synthetic set." if i % 3 == 0 else "",
            "response": f"The answer is {i + i % 7}.",
            "category": categories[i % 4],
        }
        for i in range(count)
    ]
    write_jsonl(path, rows)
    return path


def overrides(series: str, clients: int, args: argparse.Namespace, data: Path, run_dir: Path) -> list[str]:
    """The run settings of one configuration."""
    if series == "fraction":
        sampling = [f"server.fraction={args.fraction}", f"eval.fraction={args.fraction}"]
    else:
        sampling = [
            f"server.fraction={args.fraction}",
            f"server.min_clients={args.sampled}",
            f"eval.clients={args.sampled}",
        ]
    rows = clients * args.examples_per_client
    where = [f"data.path={data}", f"data.num_clients={clients}", f"data.max_examples={rows}"]
    return [*BASE, *where, *sampling, f"rounds={args.rounds}", f"output_dir={run_dir}"]


def run_child(engine: str, settings: Sequence[str]) -> dict[str, Any]:
    """Run one configuration from this process; what it measured (see the module docstring)."""
    return (run_in_process if engine == "in-process" else run_on_flower)(settings)


def run_in_process(settings: Sequence[str]) -> dict[str, Any]:
    """The in-process engine in this process."""
    import torch

    from fedlora.federated import build_config, train
    from fedlora.federated.rundir.storage import RunDir
    from tests.tiny import tiny_llama, tiny_tokenizer

    torch.set_num_threads(1)
    tokenizer = tiny_tokenizer()
    model = tiny_llama(len(tokenizer))
    config = build_config({}, settings)
    rss_before = _peak_rss_mib()
    commits: list[tuple[float, int]] = []
    commit = RunDir.commit_round

    def timed_commit(run: RunDir, checkpoint: Any, trained: Any) -> None:
        commit(run, checkpoint, trained)
        commits.append((time.perf_counter(), _dir_bytes(run.path)))

    started = time.perf_counter()
    with mock.patch.object(RunDir, "commit_round", timed_commit):
        run_dir = train(config, model=model, tokenizer=tokenizer, progress=False)
    return _summary(config, run_dir, started, commits, _peak_rss_mib(), rss_before, _rss_mib())


def run_on_flower(settings: Sequence[str]) -> dict[str, Any]:
    """Flower's simulation runtime, started from this process (the tiny model saved for the nodes to load)."""
    from fedlora.federated import build_config
    from fedlora.flower.launch import ProcessGroup, run_flower, start_superlink
    from tests.tiny import save_tiny_model

    with tempfile.TemporaryDirectory(prefix="scale-flower-") as tmp:
        model = save_tiny_model(Path(tmp) / "model")
        config = build_config({}, [*settings, f"model.name={model}"])
        run_dir, nodes = Path(str(config.output_dir)), {"num-supernodes": config.data.num_clients}
        rss_before = _rss_mib()
        started = time.perf_counter()
        with _watched(run_dir) as watch, ProcessGroup(Path(tmp)) as processes:
            run_flower(config, start_superlink(processes, simulation=True), stream=False, federation_config=nodes)
        return _summary(config, run_dir, started, watch["commits"], watch["peak_mib"], rss_before, watch["end_mib"])


@contextmanager
def _watched(run_dir: Path, every: float = 0.1) -> Iterator[dict[str, Any]]:
    """While the block runs, every ``every`` s: the largest resident memory of this process and all under it
    (``peak_mib``), and for each round whose rows newly appear in ``run_dir``'s ``metrics.jsonl``, (time, run
    directory bytes) in ``commits`` and that memory in ``end_mib``."""
    import psutil

    watch: dict[str, Any] = {"commits": [], "peak_mib": 0.0, "end_mib": 0.0}
    done, me, seen = threading.Event(), psutil.Process(), 0

    def tree_mib() -> float:
        total = 0
        for process in [me, *me.children(recursive=True)]:
            with suppress(psutil.Error):  # it ended meanwhile
                total += process.memory_info().rss
        return total / 2**20

    def poll() -> None:
        nonlocal seen
        while not done.wait(every):
            now, memory = time.perf_counter(), tree_mib()
            watch["peak_mib"] = max(watch["peak_mib"], memory)
            metrics = run_dir / "metrics.jsonl"
            rounds = (
                [json.loads(line)["round"] for line in metrics.read_text().splitlines()] if metrics.exists() else []
            )
            if rounds and max(rounds) > seen:
                seen = max(rounds)
                watch["commits"].append((now, _dir_bytes(run_dir)))
                watch["end_mib"] = memory

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        yield watch
    finally:
        done.set()
        thread.join()


def _summary(
    config: Any,
    run_dir: Path,
    started: float,
    commits: Sequence[tuple[float, int]],
    peak_mib: float,
    before_mib: float,
    end_mib: float,
) -> dict[str, Any]:
    """One row's measurements (see the module docstring) from the round commits' (time, run directory bytes)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = config.rounds
    times, sizes = [t for t, _ in commits], [b for _, b in commits]
    return {
        "peak_rss_mib": peak_mib,
        "rss_before_run_mib": before_mib,
        "rss_end_mib": end_mib,
        "s_per_round": statistics.median(b - a for a, b in zip(times, times[1:], strict=False)),
        "round_s": [round(b - a, 4) for a, b in zip(times, times[1:], strict=False)],
        "startup_s": times[0] - started,
        "dir_mib": sizes[-1] / 2**20,
        "dir_kib_per_round": statistics.median(b - a for a, b in zip(sizes, sizes[1:], strict=False)) / 1024,
        "sampled": sum(1 for r in rows if r["round"] == last and r["split"] == "train"),
        "scored": sum(1 for r in rows if r["round"] == last and r["split"] == "local" and "client" in r),
        "config_hash": config_hash(config.to_dict()),
    }


def _peak_rss_mib() -> float:
    """The peak resident memory so far: ``ru_maxrss`` (KiB on Linux), or the resident memory now where the kernel's
    lazily synced high-water mark still trails it."""
    return max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, _rss_mib())


def _rss_mib() -> float:
    """The resident memory now (``VmRSS``)."""
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def _dir_bytes(path: Path) -> int:
    return sum(file.stat().st_size for file in path.rglob("*") if file.is_file())


def measure(engine: str, settings: Sequence[str]) -> dict[str, Any]:
    """:func:`run_child` in a fresh single-threaded Python process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "benchmarks.scale", "--child", json.dumps([engine, list(settings)])]
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
    if done.returncode != 0:
        raise RuntimeError(f"the benchmark run failed (rc {done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Per engine and series, one line per federation size, with each one's ratio to the smallest."""
    header = [
        "engine",
        "series",
        "clients",
        "sampled/round",
        "scored/round",
        "peak RSS MiB",
        "× smallest",
        "RSS at end MiB",
        "s/round",
        "× smallest",
        "run dir MiB",
        "dir KiB/round",
        "startup s",
    ]
    cells = []
    for engine, series in _lines(rows):
        ordered = sorted((r for r in rows if _line(r) == (engine, series)), key=lambda r: r["clients"])
        for row in ordered:
            first = ordered[0]
            cells.append(
                [
                    engine,
                    series,
                    row["clients"],
                    row["sampled"],
                    row["scored"],
                    f"{row['peak_rss_mib']:.0f}",
                    f"{row['peak_rss_mib'] / first['peak_rss_mib']:.3f}",
                    f"{row['rss_end_mib']:.0f}",
                    f"{row['s_per_round']:.3f}",
                    f"{row['s_per_round'] / first['s_per_round']:.2f}",
                    f"{row['dir_mib']:.2f}",
                    f"{row['dir_kib_per_round']:.0f}",
                    f"{row['startup_s']:.1f}",
                ]
            )
    return markdown_table(header, cells)


def plot(rows: Sequence[Mapping[str, Any]], path: Path) -> None:
    """Peak RSS and seconds per round against the number of clients, one line per engine and series."""
    figure = Figure(figsize=(10, 3.8), layout="constrained")
    for axes, key, label in zip(
        figure.subplots(1, 2), ("peak_rss_mib", "s_per_round"), ("peak RSS (MiB)", "s / round"), strict=True
    ):
        for line in _lines(rows):
            points = sorted((r["clients"], r[key]) for r in rows if _line(r) == line)
            axes.plot(*zip(*points, strict=True), marker="o", label=" ".join(line))
        axes.set_xscale("log")
        axes.set_xlabel("clients in the federation")
        axes.set_ylabel(label)
        axes.set_ylim(bottom=0)
        axes.grid(alpha=0.3)
        axes.legend()
    figure.savefig(path, format="png", dpi=100)


def _line(row: Mapping[str, Any]) -> tuple[str, str]:
    return row.get("engine", "in-process"), row["series"]


def _lines(rows: Sequence[Mapping[str, Any]]) -> list[tuple[str, str]]:
    """The (engine, series) pairs present in ``rows``, in :data:`ENGINES` × :data:`SERIES` order."""
    present = {_line(row) for row in rows}
    return [(engine, series) for engine in ENGINES for series in SERIES if (engine, series) in present]


def write_reports(results: Path) -> None:
    rows = read_jsonl(results, key=lambda row: (*_line(row), row["clients"]))
    heading = f"Commit `{rows[0]['commit']}` ({rows[0]['command']}), {rows[0]['device']}.\n\n"
    results.with_suffix(".md").write_text(heading + table(rows))
    plot(rows, results.with_suffix(".png"))


def main(argv: Sequence[str] | None = None) -> Path | None:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.child is not None:
        print(json.dumps(run_child(*json.loads(args.child))))
        return None
    name = f"scale-cpu-{today()}-{git_commit()[:7]}"
    results = args.results_dir / f"{name}.jsonl"
    out = args.out or Path("runs") / name
    data = args.data or synthetic_rows(max(args.clients) * args.examples_per_client, out / "synthetic.jsonl")
    context = provenance("benchmarks.scale", argv)
    for engine in args.engines:
        for series in args.series:
            for clients in args.clients:
                run_dir = out / f"{engine}-{series}-{clients}"
                settings = overrides(series, clients, args, data.absolute(), run_dir.absolute())
                print(f"[{time.strftime('%H:%M:%S')}] {engine}, {series}, {clients} clients → {run_dir}", flush=True)
                measured = measure(engine, settings)
                row = {**context, "engine": engine, "series": series, "clients": clients, "rounds": args.rounds}
                write_jsonl(results, [{**row, **measured, "settings": settings}], append=True)
                write_reports(results)
    print(results.with_suffix(".md").read_text())
    return results


if __name__ == "__main__":
    main()
