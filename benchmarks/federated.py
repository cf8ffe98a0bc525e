"""The paper's comparison in one command: every federated strategy plus ablations, on one partition, over seeds.

``python -m benchmarks.federated [--preset cpu|gpu] [--dataset dolly|ni] [--partition dirichlet|label] [--seeds 0 1 2]
[--strategies ...]``

Each variant is an existing strategy of :mod:`fedlora.federated.strategy` with config overrides, trained in this
process, one after another, by :func:`fedlora.federated.train` into ``<out>/<variant>/seed<k>/``; for each seed
all variants share the preset, the data, the partition, the client splits and the client sampling:

* the strategies ``fedlora-opt`` (FedDoRA, directions shared, magnitudes personal; global-then-local: the
  directions trained under the common magnitudes, then the client's magnitudes), ``fedit``, ``ffa-lora``,
  ``fedsa-lora``, ``fed-dora`` (all four FedDoRA tensors shared, joint steps), ``local`` and ``centralized``;
* ``fedlora-opt/local-first``: the pipeline before the global model (``client.order=local-first``: the client's
  magnitudes first, then the directions under them);
* ``fedlora-opt-shared-magnitudes``: as ``fedlora-opt``, but the magnitudes are also averaged (outside the paper's
  rule that only directions travel) and refined locally after the global stage;
* ``fedlora-opt/3-global-3-local``: the CPU preset's 6 steps a round split 3 + 3 between the global model and the
  client's magnitudes (the preset's default is 5 + 1; results files before commit f4bb2e2's successor ran 3 + 3 as
  the default and 5 + 1 as the variant ``fedlora-opt/5-global-1-local``);
* ``fedlora-opt/personal-B-magnitude``: only B's magnitudes personal, A's frozen at their common values
  (``adapter.tensor_roles={"A.magnitude": "frozen"}``);
* ``fedlora-opt/shared-A-direction``: ``adapter.tensor_roles={"B.direction": "personal"}``, only the A directions
  are shared;
* ``fedlora-opt/joint``: one stage in which the local optimizer (magnitudes) and the global one (directions) both
  step on every batch (``client.order=joint``);
* ``fedlora-opt/fedadam``: the server applies FedAdam (``server.lr=1e-2``) instead of FedAvg.

Scores: **global** is the global model (``global_adapter/``: the averaged shared tensors with the common value of
every other tensor) on the pooled global test set; **local** is each client's model (the global model with its
personal tensors) on its own test split. Every run scores round 0 (the initial adapter, which is the base model),
so every row shows its change from there.

Datasets: ``dolly`` (Dolly-15k, split by ``--partition``) or ``ni`` (the 8 Natural Instructions task files of
``shared/data/ni``, one client per task, ``data.partition=files``; the CPU preset samples 40 rows per task, a
quarter of them its test split, with 64-token sequences since NI prompts carry the task definition).

Presets: ``cpu`` (sized for a 2-core machine with ``--cpu-threads 1``: 8 clients, all sampled every round, 3 rounds
of 6 steps of batch 1 per client (``fedlora-opt``: 5 global + 1 local), 48-token sequences, the adapter on the 7
projections of the top 15 of SmolLM2-135M's 30 layers only (so backward stops halfway), 200 Dolly rows with at
least 16 per client, a quarter of each client's rows as its test split (at least 4), a 32-example global test set,
the loss evaluated at round 0 and after round 3 only, no ROUGE-L: evaluating 8 personal models costs more than
training them here, and one greedy generation as much as a few training steps) and
``gpu`` (the whole of Dolly, 10 rounds of 20 steps, 192 tokens, 200 global test examples, 20 ROUGE examples with 64
new tokens, ``device=cuda``). ``--model``, ``--data`` and ``--set key=value`` adjust any preset (the tests run a
tiny model). The CPU preset keeps only the Dolly rows whose instruction + context have at most 600 characters
(``--max-prompt-chars``; all 8 categories keep at least 300 rows), because long prompts dominate CPU evaluation
time. On a shared CPU, ``--cpu-threads 1`` is several times faster than torch's default.

``--tune-lr LR [LR ...]`` first chooses each variant's learning rate: the source data is split into two disjoint
halves (:func:`split_halves`: alternate Dolly rows, alternate instances of every NI task), each variant runs the
preset once per lr of the grid (the first seed; ``client.lr``, ``client.global_lr`` and ``client.local_lr`` all set
to it) on the **tuning** half, and the lr with the lowest mean of its final global and local loss there is the one
the reported seeds run at, on the other half, which no tuning run saw. A best lr at an edge of the grid extends
the grid on that side by the grid's ratio there (up to ``--tune-extend`` times), so the chosen lr has a worse
neighbour on each side or the table says it has not. Tuning rows carry ``"phase": "tune"`` and ``lr``; the
``.md`` report adds a table of them.

After each run, one row is appended to ``<results-dir>/federated-<preset>-<partition>-<UTC date>.jsonl`` and the
markdown tables (``.md``: mean ± std over seeds per variant, then ``fedlora-opt`` minus every other variant paired
by seed) and curves (``.png``) of all rows of that file are rewritten, so an interrupted run leaves a consistent
partial report. A run whose directory exists is resumed (``--resume``) from its checkpoint; its ``wall_s`` then
counts only this invocation. Row fields: ``variant, strategy, overrides, final_round, global``/``local``
(``loss``, ``perplexity``, ``rougeL`` if evaluated, and their ``_std`` over clients at the final round),
``config_hash`` (of the resolved run configuration), ``init`` (the adapter's start), ``data_seed`` (the data sample
and split seed), ``dataset``,
``curves`` (the same per evaluated round, from round 0), ``bytes_sent_per_round`` (the shared tensors' bytes × the
clients that trained in a round, client → server), ``shared_params``, ``personal_params`` (per client),
``trainable_params``, ``wall_s``, ``resumed``, ``run_dir``, ``seed``, ``preset``, ``partition``, ``config`` (the
resolved run configuration) and the provenance of :func:`benchmarks.common.provenance` (``commit, command, date,
machine, cores, device, torch_version, triton_version``). The results file and the run directories are named after
the commit, so rows of one file come from one command on one commit (the reports refuse to mix commits), and a run
directory is only resumed by the code that started it. Paired tables refuse to pair rows whose data settings or
round-0 scores differ.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from safetensors.torch import load_file

from benchmarks.common import (
    DEFAULT_DATA,
    NI_DATA,
    RESULTS_DIR,
    add_data_argument,
    check_one_commit,
    config_hash,
    git_commit,
    markdown_table,
    provenance,
    read_jsonl,
    today,
    write_jsonl,
)
from fedlora.data.federated import DOLLY_SAMPLE_ALIAS
from fedlora.data.samples import DOLLY_SAMPLE
from fedlora.federated import build_config, train
from fedlora.federated.report import EVAL_SPLITS, METRICS
from fedlora.federated.rundir.storage import RunDir

TARGET_MODULES = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
PROJECTIONS = [f"self_attn.{name}" for name in ("q_proj", "k_proj", "v_proj", "o_proj")]
PROJECTIONS += [f"mlp.{name}" for name in ("gate_proj", "up_proj", "down_proj")]
TOP_HALF_MODULES = ",".join(f"layers.{layer}.{name}" for layer in range(15, 30) for name in PROJECTIONS)
"""The same projections in SmolLM2-135M's top 15 of 30 layers only: backward then stops at layer 15."""

COMMON = {
    "model.name": "smollm2-135m-instruct",
    "adapter.r": 8,
    "adapter.alpha": 16,
    "adapter.target_modules": TARGET_MODULES,
    "data.alpha": 0.5,
    "data.prompt_format": "alpaca",  # what the committed comparison used (the chat template is the CLI's default)
}
PRESETS: dict[str, dict[str, Any]] = {
    "cpu": {
        "rounds": 3,
        "adapter.target_modules": TOP_HALF_MODULES,
        "server.fraction": 1.0,
        "data.num_clients": 8,
        "data.max_examples": 200,
        "data.min_examples": 16,
        "data.test_fraction": 0.25,
        "data.max_length": 48,
        "data.global_test_size": 32,
        "client.batch_size": 1,
        "client.steps": 6,
        "client.local_steps": 1,
        "client.global_steps": 5,
        "eval.every": 3,
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
        "client.local_steps": 3,
        "client.global_steps": 17,
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


STRATEGY_NAMES = (
    "fedlora-opt",
    "fedit",
    "ffa-lora",
    "fedsa-lora",
    "fed-dora",
    "fedlora-opt-shared-magnitudes",
    "local",
    "centralized",
)
VARIANTS = [Variant(name, name) for name in STRATEGY_NAMES] + [
    Variant("fedlora-opt/local-first", "fedlora-opt", {"client.order": "local-first"}),
    Variant("fedlora-opt/3-global-3-local", "fedlora-opt", {"client.global_steps": 3, "client.local_steps": 3}),
    Variant("fedlora-opt/personal-B-magnitude", "fedlora-opt", {"adapter.tensor_roles": {"A.magnitude": "frozen"}}),
    Variant("fedlora-opt/shared-A-direction", "fedlora-opt", {"adapter.tensor_roles": {"B.direction": "personal"}}),
    Variant("fedlora-opt/joint", "fedlora-opt", {"client.order": "joint"}),
    Variant("fedlora-opt/fedadam", "fedlora-opt", {"server.optimizer": "fedadam", "server.lr": 1e-2}),
]
VARIANTS_BY_NAME = {variant.name: variant for variant in VARIANTS}
LABEL_DATA = {"cpu": {"data.max_examples": 560, "data.min_examples": 12, "data.test_fraction": 0.3}}
"""With one client per category the rarest short-prompt categories (summarization, information_extraction: about
3% of the rows each) need more rows in all for at least 12 examples each, and a test share of 4 of them."""
PROMPT_CHARS = {"cpu": 600, "gpu": None}  # Dolly rows kept: instruction + context of at most this many characters
NI_DATA_SETTINGS = {
    "cpu": {"data.max_examples": 40, "data.test_fraction": 0.25, "data.max_length": 64},
    "gpu": {"data.max_examples": 400, "data.test_fraction": 0.1},
}
"""The ``ni`` dataset's settings per preset (``max_examples`` is per task with ``partition=files``)."""


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--dataset", choices=("dolly", "ni"), default="dolly", help="Dolly-15k or the NI task files")
    parser.add_argument("--partition", choices=("dirichlet", "label"), default="dirichlet", help="of Dolly")
    parser.add_argument("--strategies", nargs="+", choices=list(VARIANTS_BY_NAME), default=list(VARIANTS_BY_NAME))
    add_data_argument(parser, help="Dolly .jsonl (or 'dolly-sample', the packaged sample); with --dataset ni, the dir")
    parser.add_argument(
        "--max-prompt-chars",
        type=int,
        help="keep Dolly rows whose instruction + context fit (default: the preset's; 0: all)",
    )
    parser.add_argument("--model", help="override the preset's model (a local dir, hub id, .gguf or alias)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="run every variant once per seed")
    parser.add_argument("--out", type=Path, help="parent of the run dirs (default: runs/federated-<tag>)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="config overrides on the preset")
    parser.add_argument("--cpu-threads", type=int, help="torch CPU threads (1 is fastest on a shared machine)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument(
        "--tune-lr", type=float, nargs="+", metavar="LR", help="choose each variant's lr from this grid first"
    )
    parser.add_argument("--tune-extend", type=int, default=2, help="grid extensions allowed per edge (--tune-lr)")
    return parser.parse_args(argv)


def base_overrides(args: argparse.Namespace, seed: int) -> dict[str, Any]:
    """The overrides every variant shares: common settings, the preset, the partition, the seed, then the command
    line."""
    overrides = {**COMMON, **PRESETS[args.preset], "data.path": str(args.data), "data.partition": args.partition}
    overrides["seed"] = seed
    if args.model:
        overrides["model.name"] = args.model
    if args.dataset == "ni":  # one client per task file
        overrides.update({"data.source": "natural_instructions", "data.partition": "files", "data.num_clients": None})
        overrides.update(NI_DATA_SETTINGS[args.preset])
    elif args.partition == "label":  # one client per category: the data decides how many
        overrides["data.num_clients"] = None
        overrides.update(LABEL_DATA.get(args.preset, {}))
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


def split_halves(data: Path, dataset: str, out: Path) -> tuple[Path, Path]:
    """Two disjoint halves of the source ``data`` under ``out``: (tuning, reporting). Dolly: the even and odd rows
    of the ``.jsonl``; NI: the even and odd ``Instances`` of every task file, the rest of each file kept."""
    halves = out / "tune-data", out / "report-data"
    if dataset == "ni":
        for half in halves:
            half.mkdir(parents=True, exist_ok=True)
        for task in sorted(data.glob("*.json")):
            content = json.loads(task.read_text())
            for start, half in enumerate(halves):
                part = {**content, "Instances": content["Instances"][1 - start :: 2]}
                (half / task.name).write_text(json.dumps(part))
        return halves
    lines = data.read_text().splitlines()
    paths = tuple(half.with_suffix(".jsonl") for half in halves)
    for start, path in enumerate(paths):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(lines[1 - start :: 2]) + "\n")
    return paths


def _data_file(data: Path) -> Path:
    """``data`` with the packaged sample's alias resolved to its file."""
    return DOLLY_SAMPLE if str(data) == DOLLY_SAMPLE_ALIAS else data


def lr_overrides(lr: float) -> dict[str, float]:
    """One learning rate for every optimizer a strategy may use."""
    return {"client.lr": lr, "client.global_lr": lr, "client.local_lr": lr}


def validation_score(row: Mapping[str, Any]) -> float:
    """A tuning run's score: the mean of its final global and local loss (lower is better)."""
    return (row["global"]["loss"] + row["local"]["loss"]) / 2


def tune_lr(
    variant: Variant,
    grid: Sequence[float],
    extend: int,
    run: Callable[[float], dict[str, Any]],
) -> tuple[float, list[dict[str, Any]]]:
    """The lr of ``grid`` (extended at an edge that is best, by the grid's ratio there, at most ``extend`` times
    per edge) whose tuning row (``run(lr)``) has the lowest :func:`validation_score`; returns it and every row."""
    grid = sorted(grid)
    rows = {lr: run(lr) for lr in grid}
    extended = {"low": 0, "high": 0}
    while True:
        best = min(rows, key=lambda lr: validation_score(rows[lr]))
        lrs = sorted(rows)
        if best == lrs[0] and len(lrs) > 1 and extended["low"] < extend:
            lr, extended["low"] = float(f"{lrs[0] ** 2 / lrs[1]:.3g}"), extended["low"] + 1
        elif best == lrs[-1] and len(lrs) > 1 and extended["high"] < extend:
            lr, extended["high"] = float(f"{lrs[-1] ** 2 / lrs[-2]:.3g}"), extended["high"] + 1
        else:
            return best, [rows[lr] for lr in sorted(rows)]
        print(f"{variant.name}: best lr {best:g} at the grid edge; trying {lr:.3g}", flush=True)
        rows[lr] = run(lr)


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


def result_row(variant: Variant, run_dir: Path, timing: Mapping[str, Any], context: Mapping[str, Any]) -> dict:
    """The results row of a finished variant, read back from its run directory."""
    run = RunDir(run_dir)
    summaries = summary_rows(run)
    config = yaml.safe_load(run.config.read_text())
    adapter = json.loads((run.global_adapter / "adapter_config.json").read_text())
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
        "config_hash": config_hash(config),
        "init": f"{adapter['peft_type']}:init_weights={adapter.get('init_weights')}",  # its meaning: by the commit
        "data_seed": config["data"]["seed"],
        "config": config,
    }


def evaluated_metrics(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Of ``loss`` and ``rougeL``, those some row has a score for (ROUGE-L only when ``eval.rouge_examples`` > 0)."""
    return [
        metric for metric in ("loss", "rougeL") if any(metric in row.get(s, {}) for row in rows for s in EVAL_SPLITS)
    ]


def check_pairable(row: Mapping[str, Any], other: Mapping[str, Any]) -> None:
    """Raise a ``ValueError`` unless two rows of one seed ran on the same data (data settings, split seed) from the
    same start (round-0 global and local loss within float tolerance: every adapter starts at the base model)."""
    what = f"{row['variant']} and {other['variant']} (seed {row['seed']})"
    if row["config"]["data"] != other["config"]["data"]:
        raise ValueError(f"cannot pair {what}: their data settings differ")
    for key in ("global_loss", "local_loss"):
        a, b = _initial(row, key), _initial(other, key)
        if a is None or b is None or abs(a - b) > 1e-4 * max(abs(a), 1.0):
            raise ValueError(f"cannot pair {what}: round-0 {key} {a} vs {b}")


def by_variant(rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[int, Mapping[str, Any]]]:
    """Variant -> seed -> row, variants in first-appearance order."""
    grouped: dict[str, dict[int, Mapping[str, Any]]] = {}
    for row in rows:
        grouped.setdefault(row["variant"], {})[row["seed"]] = row
    return grouped


def _initial(row: Mapping[str, Any], key: str) -> float | None:
    """A curve's value at round 0 (the initial adapter, i.e. the base model)."""
    return next((point[key] for point in row["curves"] if point["round"] == 0 and key in point), None)


def _mean_std(values: Sequence[float]) -> str:
    if not values:
        return "—"
    std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return f"{np.mean(values):.4f} ± {std:.4f}"


def summary_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """One line per variant: round-0 and final global and local scores as mean ± std over seeds (each seed's
    score is the mean over clients), the final loss's change from round 0, traffic and size."""
    metrics = evaluated_metrics(rows)
    titles = {"loss": "loss", "rougeL": "ROUGE-L"}
    scores = [(split, metric) for split in EVAL_SPLITS for metric in metrics]
    header = ["variant", "seeds"]
    header += [f"{split} {titles[m]} {when}" for split, m in scores for when in ("round 0", "final")]
    header += ["global loss Δ", "local loss Δ", "MB sent / round", "trainable", "personal / client", "wall s"]
    body = []
    for variant, seeds in by_variant(rows).items():
        runs = [seeds[seed] for seed in sorted(seeds)]
        cells = [variant, ",".join(str(seed) for seed in sorted(seeds))]
        for split, metric in scores:
            key = f"{split}_{metric}"
            initial = [v for v in (_initial(run, key) for run in runs) if v is not None]
            cells += [_mean_std(initial), _mean_std([run[split][metric] for run in runs if metric in run[split]])]
        for split in EVAL_SPLITS:
            change = [
                100 * (run[split]["loss"] / _initial(run, f"{split}_loss") - 1)
                for run in runs
                if _initial(run, f"{split}_loss")
            ]
            cells.append(f"{np.mean(change):+.1f}%" if change else "—")
        sent = runs[-1]["bytes_sent_per_round"][-1] / 1e6 if runs[-1]["bytes_sent_per_round"] else 0.0
        cells += [f"{sent:.2f}", f"{runs[-1]['trainable_params']:,}", f"{runs[-1]['personal_params']:,}"]
        cells.append(f"{np.mean([run['wall_s'] for run in runs]):.0f}")
        body.append(cells)
    return markdown_table(header, body)


def paired_table(rows: Sequence[Mapping[str, Any]], subject: str | None = None) -> str:
    """``subject`` (default: the first ``fedlora-opt`` variant of ``rows``) minus every other variant on the same
    seeds: final global and local loss (and ROUGE-L),
    per seed and as mean ± std over seeds, with how many seeds ``subject`` is better (lower loss, higher ROUGE-L)."""
    grouped = by_variant(rows)
    subject = subject or next((v for v in grouped if v.startswith("fedlora-opt")), None)
    if subject not in grouped:
        return ""
    metrics = evaluated_metrics(rows)
    header = ["vs", "seeds"] + [f"Δ {split} {metric}" for split in EVAL_SPLITS for metric in metrics]
    body = []
    for other, seeds in grouped.items():
        common = sorted(set(seeds) & set(grouped[subject]))
        if other == subject or not common:
            continue
        for seed in common:
            check_pairable(grouped[subject][seed], seeds[seed])
        cells = [other, ",".join(map(str, common))]
        for split in EVAL_SPLITS:
            for metric in metrics:
                diffs = [grouped[subject][s][split][metric] - seeds[s][split][metric] for s in common]
                wins = sum((d < 0) if metric == "loss" else (d > 0) for d in diffs)
                per_seed = ", ".join(f"{d:+.4f}" for d in diffs)
                cells.append(f"{_mean_std(diffs)} ({per_seed}; better on {wins}/{len(diffs)})")
        body.append(cells)
    preface = f"Paired by seed: `{subject}` minus the other variant (negative loss Δ: `{subject}` is better)."
    return f"{preface}\n\n{markdown_table(header, body)}"


def plot_curves(rows: Sequence[Mapping[str, Any]], path: Path) -> None:
    """Global and local loss and ROUGE-L (if evaluated) per round, the mean over seeds of the means over clients,
    with the spread over seeds shaded; one line per variant (ablations dashed), as a PNG."""
    metrics = evaluated_metrics(rows)
    panels = [(split, metric) for metric in metrics for split in EVAL_SPLITS]
    figure = Figure(figsize=(11, 4 * len(metrics)), layout="constrained")
    for axes, (split, metric) in zip(figure.subplots(len(metrics), 2, squeeze=False).flat, panels, strict=True):
        key = f"{split}_{metric}"
        for variant, seeds in by_variant(rows).items():
            per_round: dict[int, list[float]] = {}
            for run in seeds.values():
                for point in run["curves"]:
                    if key in point:
                        per_round.setdefault(point["round"], []).append(point[key])
            rounds = sorted(per_round)
            mean = np.array([np.mean(per_round[r]) for r in rounds])
            std = np.array([np.std(per_round[r]) for r in rounds])
            style = "--" if next(iter(seeds.values()))["overrides"] else "-"  # ablations dashed
            axes.plot(rounds, mean, marker="o", linestyle=style, label=f"{variant} ({len(seeds)} seeds)")
            axes.fill_between(rounds, mean - std, mean + std, alpha=0.15)
        axes.set_title(f"{split} {metric} (mean over clients, then over seeds)")
        axes.set_xlabel("round (0: the base model)")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(alpha=0.3)
    figure.legend(*figure.axes[0].get_legend_handles_labels(), loc="outside right center", fontsize="small")
    figure.savefig(path, format="png", dpi=100)


def write_reports(results: Path) -> None:
    """Rewrite the ``.md`` tables and ``.png`` curves of all rows in ``results``."""
    rows = read_jsonl(results, key=lambda row: (row["variant"], row["seed"], row["config_hash"]))  # re-runs: the last
    check_one_commit(rows, str(results))
    heading = f"Commit `{rows[0]['commit']}` ({rows[0]['command']}).\n\n" if rows else ""
    tuning = [row for row in rows if row.get("phase") == "tune"]
    rows = [row for row in rows if row.get("phase") != "tune"]
    report = heading + (summary_table(rows) + "\n" + paired_table(rows) if rows else "")
    results.with_suffix(".md").write_text(report + ("\n\n" + tuning_table(tuning) if tuning else ""))
    if rows:
        plot_curves(rows, results.with_suffix(".png"))


def tuning_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Per variant and lr, the tuning half's final global and local loss and their mean (the validation score); the
    chosen lr in bold, marked when no worse lr lies on one of its sides (the optimum is not bracketed)."""
    grouped: dict[str, list[Mapping[str, Any]]] = {}
    for row in rows:
        grouped.setdefault(row["variant"], []).append(row)
    body = []
    for variant, runs in grouped.items():
        scores = {row["lr"]: validation_score(row) for row in runs}
        best, lrs = min(scores, key=scores.get), sorted(scores)
        bracketed = lrs[0] < best < lrs[-1]
        for row in sorted(runs, key=lambda row: row["lr"]):
            mark = ("**chosen**" if bracketed else "**chosen, at the grid edge**") if row["lr"] == best else ""
            body.append(
                [
                    variant,
                    f"{row['lr']:g}",
                    f"{row['global']['loss']:.4f}",
                    f"{row['local']['loss']:.4f}",
                    f"{scores[row['lr']]:.4f}",
                    mark,
                ]
            )
    header = ["variant", "lr", "global loss", "local loss", "mean (validation score)", ""]
    return "Learning rates tuned on the tuning half of the data (seed {}):\n\n{}".format(
        rows[0]["seed"], markdown_table(header, body)
    )


def main(argv: Sequence[str] | None = None) -> Path:
    """Run the selected variants one after another, for every seed; returns the results file."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.cpu_threads:
        torch.set_num_threads(args.cpu_threads)
    if args.dataset == "ni" and args.data == DEFAULT_DATA:
        args.data = NI_DATA
    split = "ni" if args.dataset == "ni" else args.partition
    tag = f"federated-{args.preset}-{split}-{today()}-{git_commit()[:7]}"
    out = args.out or Path("runs") / tag
    results = args.results_dir / f"{tag}.jsonl"
    limit = PROMPT_CHARS[args.preset] if args.max_prompt_chars is None else args.max_prompt_chars
    if limit and args.data.is_file():
        args.data = short_prompts(args.data, limit, out / f"dolly-max{limit}chars.jsonl")
    run_context = {
        **provenance("benchmarks.federated", argv),
        "preset": args.preset,
        "dataset": args.dataset,
        "partition": "files" if args.dataset == "ni" else args.partition,
    }
    chosen: dict[str, dict[str, float]] = {name: {} for name in args.strategies}  # variant -> its lr overrides
    if args.tune_lr:
        tune_data, args.data = split_halves(_data_file(args.data), args.dataset, out)
        overrides = {**base_overrides(args, args.seeds[0]), "data.path": str(tune_data)}
        for name in args.strategies:
            variant = VARIANTS_BY_NAME[name]

            def run(lr: float, variant: Variant = variant) -> dict[str, Any]:
                run_dir = out / "tune" / variant.name.replace("/", "--") / f"lr{lr:g}"
                timing = run_variant(variant, {**overrides, **lr_overrides(lr)}, run_dir, not args.no_progress)
                row = result_row(variant, run_dir, timing, {**run_context, "seed": args.seeds[0]})
                write_jsonl(results, [row | {"phase": "tune", "lr": lr}], append=True)
                print(f"{variant.name} lr {lr:g}: validation score {validation_score(row):.4f}", flush=True)
                return row

            best, _ = tune_lr(variant, args.tune_lr, args.tune_extend, run)
            chosen[name] = lr_overrides(best)
            write_reports(results)
    for seed in args.seeds:
        overrides = base_overrides(args, seed)
        context = {**run_context, "seed": seed}
        for name in args.strategies:
            variant = VARIANTS_BY_NAME[name]
            variant = Variant(variant.name, variant.strategy, {**variant.overrides, **chosen[name]})
            run_dir = out / name.replace("/", "--") / f"seed{seed}"
            print(f"[{time.strftime('%H:%M:%S')}] {name} seed {seed} → {run_dir}", flush=True)
            timing = run_variant(variant, overrides, run_dir, progress=not args.no_progress)
            row = result_row(variant, run_dir, timing, context)
            write_jsonl(results, [row | {"phase": "report", "lr": chosen[name].get("client.lr")}], append=True)
            write_reports(results)
            print(f"[{time.strftime('%H:%M:%S')}] {name} seed {seed} done in {timing['wall_s']:.0f} s", flush=True)
    print(results.with_suffix(".md").read_text())
    return results


if __name__ == "__main__":
    main()
