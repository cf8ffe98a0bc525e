"""What a round costs as the federation grows: peak memory, seconds per round and run-directory growth at 10, 100
and 1,000 clients on the in-process engine (CPU, a tiny randomly initialised Llama, as the tests use).

``python -m benchmarks.scale [--clients 10 100 1000] [--fraction 0.01] [--sampled 10] [--rounds 8]
[--examples-per-client 8] [--data DOLLY.jsonl] [--dry-run]``

Every configuration runs ``fedlora-opt`` in a fresh Python process of its own (so peak RSS is that run's alone):
``N`` clients of ``--examples-per-client`` rows each (``data.max_examples = N × rows``: a seeded sample of
``--data``, or synthetic Dolly-format rows without it, split IID), so a sampled client costs the same at every
``N``; ``--rounds`` rounds, every round evaluated (the loss; no generation), in two series:

* ``fraction``: ``server.fraction = eval.fraction = --fraction`` and nothing else: at 0.01, 1 client trains and 1
  is scored a round at 10 and 100 clients, 10 at 1,000 (a round costs what its sample costs);
* ``min-sample``: ``server.fraction = --fraction`` with ``server.min_clients = eval.clients = --sampled`` (Flower's
  ``min_fit_clients``/``min_evaluate_clients``): 10 clients train and 10 are scored a round at every ``N`` up to
  1,000, so what changes is the federation's size alone.

Measured in the child: ``peak_rss_mib`` (``getrusage(RUSAGE_SELF).ru_maxrss``, the whole process: torch, the model,
the data and the run), ``rss_before_run_mib`` (the same once torch, the model and tokenizer are loaded, before the
run), ``rss_end_mib`` (the resident memory once the run ended: what it keeps, where a transient peak such as
reading the data file may hide it), ``s_per_round`` (the median over rounds 2..R of the time between consecutive round commits: training,
aggregation, evaluation, writing), ``startup_s`` (from the start of the run to round 1's commit: the data split, the
checks, round 0's evaluation and round 1), the run directory's size at the end (``dir_mib``) and its median growth
per round over rounds 2..R (``dir_kib_per_round``), and, read back from ``metrics.jsonl``, the clients that trained
and were scored per round (``sampled``, ``scored``).

Each configuration appends one row (with :func:`~benchmarks.common.provenance` and the run's ``config_hash``) to
``<results-dir>/scale-cpu-<UTC date>-<commit7>.jsonl``; the ``.md`` table (per series, with the ratio of each row to
the series' smallest federation) and the ``.png`` (peak RSS and seconds per round against the number of clients)
are rewritten after every row. ``--dry-run``: 4 and 8 clients, 3 rounds, into ``--results-dir``.

Flower is not measured: fedlora's Flower engine runs one client per SuperNode (a process each, and every message
rebuilds the node's model and data), and Flower's simulation engine (many virtual clients per process) needs Ray,
which is not installed here.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
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


def run_child(settings: Sequence[str]) -> dict[str, Any]:
    """Run one configuration in this process; what it measured (see the module docstring)."""
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
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = config.rounds
    times, sizes = [t for t, _ in commits], [b for _, b in commits]
    return {
        "peak_rss_mib": _peak_rss_mib(),
        "rss_before_run_mib": rss_before,
        "rss_end_mib": _rss_mib(),
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


def measure(settings: Sequence[str]) -> dict[str, Any]:
    """:func:`run_child` in a fresh single-threaded Python process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "benchmarks.scale", "--child", json.dumps(list(settings))]
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
    if done.returncode != 0:
        raise RuntimeError(f"the benchmark run failed (rc {done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Per series, one line per federation size, with each one's ratio to the series' smallest."""
    header = [
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
    for series in SERIES:
        ordered = sorted((r for r in rows if r["series"] == series), key=lambda r: r["clients"])
        for row in ordered:
            first = ordered[0]
            cells.append(
                [
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
    """Peak RSS and seconds per round against the number of clients, one line per series."""
    figure = Figure(figsize=(10, 3.8), layout="constrained")
    for axes, key, label in zip(
        figure.subplots(1, 2), ("peak_rss_mib", "s_per_round"), ("peak RSS (MiB)", "s / round"), strict=True
    ):
        for series in SERIES:
            points = sorted((r["clients"], r[key]) for r in rows if r["series"] == series)
            if points:
                axes.plot(*zip(*points, strict=True), marker="o", label=series)
        axes.set_xscale("log")
        axes.set_xlabel("clients in the federation")
        axes.set_ylabel(label)
        axes.set_ylim(bottom=0)
        axes.grid(alpha=0.3)
        axes.legend()
    figure.savefig(path, format="png", dpi=100)


def write_reports(results: Path) -> None:
    rows = read_jsonl(results, key=lambda row: (row["series"], row["clients"]))
    heading = f"Commit `{rows[0]['commit']}` ({rows[0]['command']}), {rows[0]['device']}.\n\n"
    results.with_suffix(".md").write_text(heading + table(rows))
    plot(rows, results.with_suffix(".png"))


def main(argv: Sequence[str] | None = None) -> Path | None:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.child is not None:
        print(json.dumps(run_child(json.loads(args.child))))
        return None
    name = f"scale-cpu-{today()}-{git_commit()[:7]}"
    results = args.results_dir / f"{name}.jsonl"
    out = args.out or Path("runs") / name
    data = args.data or synthetic_rows(max(args.clients) * args.examples_per_client, out / "synthetic.jsonl")
    context = provenance("benchmarks.scale", argv)
    for series in args.series:
        for clients in args.clients:
            run_dir = out / f"{series}-{clients}"
            settings = overrides(series, clients, args, data.absolute(), run_dir.absolute())
            print(f"[{time.strftime('%H:%M:%S')}] {series}, {clients} clients → {run_dir}", flush=True)
            measured = measure(settings)
            row = {**context, "series": series, "clients": clients, "rounds": args.rounds, **measured}
            write_jsonl(results, [{**row, "settings": settings}], append=True)
            write_reports(results)
    print(results.with_suffix(".md").read_text())
    return results


if __name__ == "__main__":
    main()
