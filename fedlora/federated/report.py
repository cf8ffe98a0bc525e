"""Metrics rows, their per-round summaries, the console table and the score plot.

``metrics.jsonl`` holds one object per line: per-client rows ``{"round", "split", "client", ...}`` with split
``"train"`` (training losses, ``num_examples`` and ``status``: ``ok``, ``rejected`` or ``failed``, the last two with a
``reason``; see :func:`train_rows`), ``"local"`` (the client's model on its own test split) or ``"global"`` (the
global model, once a round, on the pooled global test set; its ``client`` is :data:`GLOBAL_MODEL`), and per-split summary rows ``{"round", "split", "clients",
<metric>, <metric>_std}`` without a ``client`` key: the mean and population standard deviation over the
``clients`` scored; the ``local`` one also has ``clients_total``, the clients that could have been scored (the
run scores a sample of them when ``eval.clients`` or ``eval.fraction`` says so).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from fedlora.federated.message import FitRes, Rejection
from fedlora.federated.rundir.storage import atomic_write

EVAL_SPLITS = ("global", "local")
GLOBAL_MODEL = "global-model"
"""The ``client`` of the global model's score row (split ``global``)."""
METRICS = ("loss", "perplexity", "rougeL")
PLOTTED = ("loss", "rougeL")


def train_rows(
    round_: int, results: Sequence[FitRes], rejected: Sequence[Rejection], failures: Sequence[Rejection]
) -> list[dict[str, Any]]:
    """One ``train`` row per sampled client: its metrics and ``status`` ``ok``; ``rejected`` (the server refused its
    update) with the reason; or ``failed`` (it sent nothing) with the reason."""
    reasons = dict(rejected)
    rows = [
        {"round": round_, "split": "train", "client": r.client_id, "num_examples": r.num_examples, **r.metrics}
        | ({"status": "rejected", "reason": reasons[r.client_id]} if r.client_id in reasons else {"status": "ok"})
        for r in results
    ]
    return rows + [
        {"round": round_, "split": "train", "client": c, "status": "failed", "reason": why} for c, why in failures
    ]


def privacy_rows(round_: int, epsilon: float | None, delta: float) -> list[dict[str, Any]]:
    """The ``privacy`` row of a round: the ε spent so far at δ (none when differential privacy is off)."""
    return [] if epsilon is None else [{"round": round_, "split": "privacy", "epsilon": epsilon, "delta": delta}]


def round_title(
    round_: int, rows: Sequence[Mapping[str, Any]], rounds: int, strategy: str, sampled: int, seconds: float
) -> str:
    """The heading of a round's table: the round, the strategy, the sampled clients (and how many of them were left
    out), ε when differential privacy is on, and the round's wall time."""
    left_out = sum(1 for row in rows if row["split"] == "train" and row.get("status", "ok") != "ok")
    title = f"round {round_}/{rounds} · {strategy} · {sampled} client(s)"
    title += f" ({left_out} left out)" if left_out else ""
    title += "".join(f" · ε {row['epsilon']:.3g} at δ {row['delta']:g}" for row in rows if row["split"] == "privacy")
    return f"{title} · {seconds:.1f} s"


def summarize(round_: int, rows: Sequence[Mapping[str, Any]], population: int | None = None) -> list[dict[str, Any]]:
    """Mean and std over clients of each metric, one row per evaluation split present in ``rows``; the ``local``
    row's ``clients_total`` is ``population`` (the clients the scored ones were drawn from), when given."""
    summaries = []
    for split in EVAL_SPLITS:
        per_client = [row for row in rows if row["split"] == split]
        if not per_client:
            continue
        summary: dict[str, Any] = {"round": round_, "split": split, "clients": len(per_client)}
        if split == "local" and population is not None:
            summary["clients_total"] = population
        for metric in METRICS:
            values = [row[metric] for row in per_client if metric in row]
            if values:
                summary[metric] = float(np.mean(values))
                summary[f"{metric}_std"] = float(np.std(values))
        summaries.append(summary)
    return summaries


def format_table(title: str, summaries: Sequence[Mapping[str, Any]]) -> str:
    """A small fixed-width table: one line per split, ``mean ± std`` per metric, then ``(k of N clients)`` where
    only a sample of the clients was scored."""
    metrics = [m for m in METRICS if any(m in s for s in summaries)]
    lines = [title, f"{'split':<8}" + "".join(f"{m:>22}" for m in metrics)]
    for summary in summaries:
        cells = "".join(f"{summary[m]:>12.4f} ± {summary[m + '_std']:<7.4f}" for m in metrics)
        total = summary.get("clients_total", summary["clients"])
        sampled = f"  ({summary['clients']} of {total} clients)" if summary["clients"] < total else ""
        lines.append(f"{summary['split']:<8}{cells}{sampled}")
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
