"""Metrics rows, their per-round summaries, the console table and the score plot.

``metrics.jsonl`` holds one object per line: per-client rows ``{"round", "split", "client", ...}`` with split
``"train"`` (training losses, ``num_examples``), ``"local"`` (the client's model on its own test split) or
``"global"`` (on the pooled global test set), and per-split summary rows ``{"round", "split", "clients",
<metric>, <metric>_std}`` without a ``client`` key: the mean and population standard deviation over clients.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from fedlora.federated.storage import atomic_write

EVAL_SPLITS = ("global", "local")
METRICS = ("loss", "perplexity", "rougeL")
PLOTTED = ("loss", "rougeL")


def summarize(round_: int, rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Mean and std over clients of each metric, one row per evaluation split present in ``rows``."""
    summaries = []
    for split in EVAL_SPLITS:
        per_client = [row for row in rows if row["split"] == split]
        if not per_client:
            continue
        summary: dict[str, Any] = {"round": round_, "split": split, "clients": len(per_client)}
        for metric in METRICS:
            values = [row[metric] for row in per_client if metric in row]
            if values:
                summary[metric] = float(np.mean(values))
                summary[f"{metric}_std"] = float(np.std(values))
        summaries.append(summary)
    return summaries


def format_table(title: str, summaries: Sequence[Mapping[str, Any]]) -> str:
    """A small fixed-width table: one line per split, ``mean ± std`` per metric."""
    metrics = [m for m in METRICS if any(m in s for s in summaries)]
    lines = [title, f"{'split':<8}" + "".join(f"{m:>22}" for m in metrics)]
    for summary in summaries:
        cells = "".join(f"{summary[m]:>12.4f} ± {summary[m + '_std']:<7.4f}" for m in metrics)
        lines.append(f"{summary['split']:<8}{cells}")
    return "\n".join(lines)


def plot_scores(rows: Sequence[Mapping[str, Any]], path: Path) -> None:
    """Global and local mean ± std of loss and ROUGE-L per round, from the summary rows, as a PNG."""
    summaries = [row for row in rows if row["split"] in EVAL_SPLITS and "client" not in row]
    metrics = [m for m in PLOTTED if any(m in row for row in summaries)]
    if not metrics:
        return
    figure = Figure(figsize=(5 * len(metrics), 3.6), layout="constrained")
    for axes, metric in zip(figure.subplots(1, len(metrics), squeeze=False)[0], metrics, strict=True):
        for split in EVAL_SPLITS:
            points = [row for row in summaries if row["split"] == split and metric in row]
            rounds = np.array([row["round"] for row in points])
            mean = np.array([row[metric] for row in points])
            std = np.array([row[f"{metric}_std"] for row in points])
            axes.plot(rounds, mean, marker="o", label=f"{split} (mean over clients)")
            axes.fill_between(rounds, mean - std, mean + std, alpha=0.2)
        axes.set_xlabel("round")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.set_ylabel(metric)
        axes.grid(alpha=0.3)
        axes.legend()
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=100))
