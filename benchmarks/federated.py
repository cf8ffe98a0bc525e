"""The paper's comparison in one command: every federated strategy plus ablations, on one partition and seed.

``python -m benchmarks.federated [--preset cpu|gpu] [--partition dirichlet|label] [--out DIR] [--strategies ...]``

Each variant is an existing strategy of :mod:`fedlora.federated.strategy` with config overrides, trained in this
process, one after another, by :func:`fedlora.federated.train` into ``<out>/<variant>/``; all share the preset,
the data, the partition and the seed:

* the strategies ``fedlora-opt`` (FedDoRA, directions shared, magnitudes personal), ``fedit``, ``ffa-lora``,
  ``fedsa-lora``, ``fed-dora`` (all four FedDoRA tensors shared), ``local`` and ``centralized``;
* ``fedlora-opt/shared-A-direction``: ``adapter.tensor_roles={"B.direction": "personal"}``, only the A directions
  are shared. With ``fedlora-opt`` (A and B directions) and ``fed-dora`` (directions and magnitudes) this is the
  ablation of which tensors are shared;
* ``fedlora-opt/no-local-stage``: ``client.local_steps=0``. The magnitudes then keep their initial values and
  m_B = 0 makes B = 0, so no adapter tensor gets a gradient: this row is the base model, the reference every
  other row improves on;
* ``fedlora-opt/fedadam``: the server applies FedAdam (``server.lr=1e-2``) instead of FedAvg;
* ``fedlora-opt/local-lr-0.1``: the local stage trains the magnitudes at ``client.local_lr=0.1`` instead of 1e-2.
  A FedDoRA factor is V·diag(m/‖V‖_col), so a column of B has norm m_B[j] however long it is, while an AdamW step
  at lr moves every entry of a LoRA B column by about lr (its norm by about lr·√d_out); starting from m_B = 0,
  FedDoRA's update therefore grows far more slowly than LoRA's at comparable learning rates.

Presets: ``cpu`` (sized for a loaded 2-core machine, 22–28 minutes per partition with ``--cpu-threads 1``: 3
rounds, half of the 8 clients sampled per round, 4 steps of batch 1 per client and round (``fedlora-opt``: 2 local
+ 2 global), 64-token sequences, 160 examples in all (at least 5 per client, so every Dolly category can be a
client), evaluation after every round of the loss on a 4-example global test set and each client's test split, no
ROUGE-L: one greedy generation costs as much as a few training steps here) and ``gpu`` (the whole of Dolly, 10
rounds of 20 steps, all clients, 192 tokens, 200 global test examples, 20 ROUGE examples with 64 new tokens,
evaluation after every round, ``device=cuda``). ``--model``, ``--data`` and ``--set key=value`` adjust any preset
(the tests run a tiny model). The CPU preset keeps only the Dolly rows whose instruction + context have at most
600 characters (``--max-prompt-chars``; all 8 categories keep at least 300 rows), because long prompts dominate
CPU evaluation time. On a shared CPU, ``--cpu-threads 1`` is several times faster than torch's default.

After each variant, one row is appended to ``<results-dir>/federated-<preset>-<partition>-<UTC date>.jsonl`` and
the markdown table (``.md``) and curves (``.png``) of all rows of that file are rewritten, so an interrupted run
leaves a consistent partial report. A variant whose run directory exists is resumed (``--resume``) from its
checkpoint; its ``wall_s`` then counts only this invocation. Row fields: ``variant, strategy, overrides, final_round,
global``/``local`` (``loss``, ``perplexity``, ``rougeL`` if evaluated, and their ``_std`` over clients at the final
round), ``curves`` (the same per evaluated round), ``bytes_sent_per_round`` (the shared tensors' bytes × the
clients that trained in a round, client → server), ``shared_params``, ``personal_params`` (per client),
``trainable_params``, ``wall_s``, ``resumed``, ``run_dir``, ``command``, ``seed``, ``preset``, ``partition``,
``date``, ``machine`` and ``config`` (the resolved run configuration).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from safetensors.torch import load_file

from fedlora.federated import build_config, train
from fedlora.federated.report import EVAL_SPLITS, METRICS
from fedlora.federated.storage import RunDir

RESULTS_DIR = Path(__file__).resolve().parent / "results"
DOLLY_PATH = "/work/shared/data/dolly/databricks-dolly-15k.jsonl"
TARGET_MODULES = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"

COMMON = {
    "model.name": "smollm2-135m-instruct",
    "adapter.r": 8,
    "adapter.alpha": 16,
    "adapter.target_modules": TARGET_MODULES,
    "data.alpha": 0.5,
}
PRESETS: dict[str, dict[str, Any]] = {
    "cpu": {
        "rounds": 3,
        "server.fraction": 0.5,
        "data.num_clients": 8,
        "data.max_examples": 160,
        "data.min_examples": 5,
        "data.max_length": 64,
        "data.global_test_size": 4,
        "client.batch_size": 1,
        "client.steps": 4,
        "client.local_steps": 2,
        "client.global_steps": 2,
        "eval.every": 1,
        "eval.rouge_examples": 0,
    },
    "gpu": {
        "rounds": 10,
        "device": "cuda",
        "data.num_clients": 8,
        "data.max_examples": None,
        "data.max_length": 192,
        "data.global_test_size": 200,
        "client.batch_size": 8,
        "client.steps": 20,
        "client.local_steps": 10,
        "client.global_steps": 10,
        "eval.batch_size": 32,
        "eval.rouge_examples": 20,
        "eval.max_new_tokens": 64,
    },
}


@dataclass(frozen=True)
class Variant:
    """One row of the table: an existing strategy and the config overrides that make it an ablation."""

    name: str
    strategy: str
    overrides: Mapping[str, Any] = field(default_factory=dict)


STRATEGY_NAMES = ("fedlora-opt", "fedit", "ffa-lora", "fedsa-lora", "fed-dora", "local", "centralized")
VARIANTS = [Variant(name, name) for name in STRATEGY_NAMES] + [
    Variant("fedlora-opt/shared-A-direction", "fedlora-opt", {"adapter.tensor_roles": {"B.direction": "personal"}}),
    Variant("fedlora-opt/no-local-stage", "fedlora-opt", {"client.local_steps": 0}),
    Variant("fedlora-opt/fedadam", "fedlora-opt", {"server.optimizer": "fedadam", "server.lr": 1e-2}),
    Variant("fedlora-opt/local-lr-0.1", "fedlora-opt", {"client.local_lr": 0.1}),
]
VARIANTS_BY_NAME = {variant.name: variant for variant in VARIANTS}
PROMPT_CHARS = {"cpu": 600, "gpu": None}  # Dolly rows kept: instruction + context of at most this many characters


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--partition", choices=("dirichlet", "label"), default="dirichlet")
    parser.add_argument("--strategies", nargs="+", choices=list(VARIANTS_BY_NAME), default=list(VARIANTS_BY_NAME))
    parser.add_argument("--data", default=DOLLY_PATH, help="Dolly .jsonl (or 'dolly-sample', the packaged sample)")
    parser.add_argument(
        "--max-prompt-chars",
        type=int,
        help="keep Dolly rows whose instruction + context fit (default: the preset's; 0: all)",
    )
    parser.add_argument("--model", help="override the preset's model (a local dir, hub id, .gguf or alias)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="parent of the run dirs (default: runs/federated-<tag>)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="config overrides on the preset")
    parser.add_argument("--cpu-threads", type=int, help="torch CPU threads (1 is fastest on a shared machine)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser.parse_args(argv)


def base_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The overrides every variant shares: common settings, the preset, the partition, then the command line."""
    overrides = {**COMMON, **PRESETS[args.preset], "data.path": args.data, "data.partition": args.partition}
    overrides["seed"] = args.seed
    if args.model:
        overrides["model.name"] = args.model
    if args.partition == "label":  # one client per category: the data decides how many
        overrides["data.num_clients"] = None
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key.strip()] = value.strip()
    return overrides


def short_prompts(source: Path, limit: int, out: Path) -> Path:
    """A copy of the Dolly file ``source`` at ``out`` with only the rows whose instruction + context have at most
    ``limit`` characters (greedy generation of long prompts dominates CPU evaluation time)."""
    kept = [line for line in source.read_text().splitlines() if _prompt_chars(json.loads(line)) <= limit]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(kept) + "\n")
    return out


def _prompt_chars(row: Mapping[str, Any]) -> int:
    return len(row["instruction"]) + len(row.get("context") or "")


def run_variant(variant: Variant, overrides: Mapping[str, Any], run_dir: Path, progress: bool) -> dict[str, Any]:
    """Train one variant into ``run_dir`` (resuming it if it exists); returns its wall time and whether it resumed."""
    config = build_config(
        {}, {**overrides, **variant.overrides, "strategy": variant.strategy, "output_dir": str(run_dir)}
    )
    resumed = RunDir(run_dir).config.exists()
    started = time.perf_counter()
    train(config, resume=resumed, progress=progress)
    return {"wall_s": round(time.perf_counter() - started, 1), "resumed": resumed}


def summary_rows(run: RunDir) -> list[dict[str, Any]]:
    """The per-round summary rows (mean and std over clients) of the evaluation splits."""
    return [row for row in run.read_metrics() if row["split"] in EVAL_SPLITS and "client" not in row]


def final_scores(summaries: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """``{split: {metric: mean, metric_std: std}}`` at the last evaluated round."""
    last = max(row["round"] for row in summaries)
    return {
        row["split"]: {key: value for key, value in row.items() if key.startswith(METRICS)}
        for row in summaries
        if row["round"] == last
    } | {"final_round": last}


def curves(summaries: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One point per evaluated round: ``{"round", "global_loss", "global_loss_std", ..., "local_rougeL_std"}``."""
    points: dict[int, dict[str, Any]] = {}
    for row in summaries:
        point = points.setdefault(row["round"], {"round": row["round"]})
        point.update({f"{row['split']}_{key}": value for key, value in row.items() if key.startswith(METRICS)})
    return [points[round_] for round_ in sorted(points)]


def tensor_stats(tensors: Mapping[str, torch.Tensor]) -> tuple[int, int]:
    """Parameter count and bytes of a set of tensors."""
    return sum(t.numel() for t in tensors.values()), sum(t.numel() * t.element_size() for t in tensors.values())


def communication(run: RunDir) -> dict[str, Any]:
    """Shared and personal parameter counts, and client → server bytes per round (shared bytes × senders: the
    clients whose training completed, including any whose update the server rejected)."""
    shared_params, shared_bytes = tensor_stats(load_file(run.checkpoint / "global.safetensors"))
    personal_files = sorted(run.clients.glob("*/personal.safetensors"))
    personal_params = tensor_stats(load_file(personal_files[0]))[0] if personal_files else 0
    senders: dict[int, int] = {}
    for row in run.read_metrics():
        if row["split"] == "train" and row.get("status") != "failed":
            senders[row["round"]] = senders.get(row["round"], 0) + 1
    bytes_per_round = [shared_bytes * senders[round_] for round_ in sorted(senders)]
    return {
        "shared_params": shared_params,
        "personal_params": personal_params,
        "trainable_params": shared_params + personal_params,
        "bytes_sent_per_round": bytes_per_round,
    }


def machine() -> dict[str, Any]:
    """Where the run happened."""
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {
        "host": platform.node(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": gpu,
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def result_row(variant: Variant, run_dir: Path, timing: Mapping[str, Any], context: Mapping[str, Any]) -> dict:
    """The results row of a finished variant, read back from its run directory."""
    run = RunDir(run_dir)
    summaries = summary_rows(run)
    return {
        "variant": variant.name,
        "strategy": variant.strategy,
        "overrides": dict(variant.overrides),
        **final_scores(summaries),
        "curves": curves(summaries),
        **communication(run),
        **timing,
        "run_dir": str(run_dir),
        **context,
        "config": yaml.safe_load(run.config.read_text()),
    }


def load_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a results file; of several rows of one variant (re-runs), the last."""
    rows: dict[str, dict[str, Any]] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                rows[row["variant"]] = row
    return list(rows.values())


def _cell(scores: Mapping[str, Any] | None, metric: str) -> str:
    if not scores or metric not in scores:
        return "—"
    return f"{scores[metric]:.3f} ± {scores[metric + '_std']:.3f}"


def evaluated_metrics(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Of ``loss`` and ``rougeL``, those some row has a score for (ROUGE-L only when ``eval.rouge_examples`` > 0)."""
    return [
        metric for metric in ("loss", "rougeL") if any(metric in row.get(s, {}) for row in rows for s in EVAL_SPLITS)
    ]


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """One line per variant: final global and local ROUGE-L (if evaluated) and loss (mean ± std over clients),
    traffic, size."""
    scores = [(split, metric) for split in EVAL_SPLITS for metric in reversed(evaluated_metrics(rows))]
    titles = {"loss": "loss", "rougeL": "ROUGE-L"}
    header = " | ".join(
        ["| variant", "strategy", "overrides"]
        + [f"{split} {titles[metric]}" for split, metric in scores]
        + ["MB sent / round", "trainable", "personal / client", "wall s |"]
    )
    lines = [header, "|" + "---|" * header.count(" | ") + "---|"]
    for row in rows:
        sent = row["bytes_sent_per_round"][-1] / 1e6 if row["bytes_sent_per_round"] else 0.0
        overrides = ", ".join(f"{k}={v}" for k, v in row["overrides"].items()) or "—"
        cells = [
            row["variant"],
            row["strategy"],
            overrides,
            *(_cell(row.get(split), metric) for split, metric in scores),
            f"{sent:.2f}",
            f"{row['trainable_params']:,}",
            f"{row['personal_params']:,}",
            f"{row['wall_s']:.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_curves(rows: Sequence[Mapping[str, Any]], path: Path) -> None:
    """Global and local loss and ROUGE-L (if evaluated; means over clients) per round, one line per variant
    (ablations dashed), as a PNG."""
    metrics = evaluated_metrics(rows)
    panels = [(split, metric) for metric in metrics for split in EVAL_SPLITS]
    figure = Figure(figsize=(11, 4 * len(metrics)), layout="constrained")
    for axes, (split, metric) in zip(figure.subplots(len(metrics), 2, squeeze=False).flat, panels, strict=True):
        key = f"{split}_{metric}"
        for row in rows:
            points = [point for point in row["curves"] if key in point]
            style = "--" if row["overrides"] else "-"  # ablations dashed, so colours may repeat past 10 rows
            rounds, values = [p["round"] for p in points], [p[key] for p in points]
            axes.plot(rounds, values, marker="o", linestyle=style, label=row["variant"])
        axes.set_title(f"{split} {metric} (mean over clients)")
        axes.set_xlabel("round")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(alpha=0.3)
    figure.legend(*figure.axes[0].get_legend_handles_labels(), loc="outside right center", fontsize="small")
    figure.savefig(path, format="png", dpi=100)


def write_reports(results: Path) -> None:
    """Rewrite the ``.md`` table and ``.png`` curves of all rows in ``results``."""
    rows = load_rows(results)
    results.with_suffix(".md").write_text(markdown_table(rows))
    plot_curves(rows, results.with_suffix(".png"))


def main(argv: Sequence[str] | None = None) -> Path:
    """Run the selected variants one after another; returns the results file."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.cpu_threads:
        torch.set_num_threads(args.cpu_threads)
    date = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d")
    tag = f"federated-{args.preset}-{args.partition}-{date}"
    out = args.out or Path("runs") / tag
    args.results_dir.mkdir(parents=True, exist_ok=True)
    results = args.results_dir / f"{tag}.jsonl"
    limit = PROMPT_CHARS[args.preset] if args.max_prompt_chars is None else args.max_prompt_chars
    if limit and Path(args.data).is_file():
        args.data = str(short_prompts(Path(args.data), limit, out / f"dolly-max{limit}chars.jsonl"))
    overrides = base_overrides(args)
    context = {
        "command": shlex.join(["python", "-m", "benchmarks.federated", *argv]),
        "seed": args.seed,
        "preset": args.preset,
        "partition": args.partition,
        "date": date,
        "machine": machine(),
    }
    for name in args.strategies:
        variant = VARIANTS_BY_NAME[name]
        run_dir = out / name.replace("/", "--")
        print(f"[{time.strftime('%H:%M:%S')}] {name} → {run_dir}", flush=True)
        timing = run_variant(variant, overrides, run_dir, progress=not args.no_progress)
        with results.open("a") as f:
            f.write(json.dumps(result_row(variant, run_dir, timing, context)) + "\n")
        write_reports(results)
        print(f"[{time.strftime('%H:%M:%S')}] {name} done in {timing['wall_s']:.0f} s", flush=True)
    print(results.with_suffix(".md").read_text())
    return results


if __name__ == "__main__":
    main()
