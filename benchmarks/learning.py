"""Centralized learning curves: PEFT LoRA, PEFT DoRA and FedDoRA variants at equal steps, each at its best lr.

``python -m benchmarks.learning [--preset cpu|gpu] [--data DOLLY.jsonl] [--methods ...] [--lrs ...] [--seeds N]``

Every run fine-tunes SmolLM2-135M-Instruct (r=8, alpha=16 on the attention and MLP projections) on one stream of
Dolly-15k training rows in the Alpaca prompt format with AdamW at a constant learning rate (gradients clipped to norm 1, the federated
engine's default) and scores the response-token loss of a fixed held-out set after the steps in ``eval_steps``
(step 0 is the untrained model). A run is one (method, lr, seed); the seed sets the adapter initialisation and the
order of the training rows, the held-out rows are the same for all runs. The held-out rows are two disjoint sets:
a **validation** set, on which each method's learning rate is chosen, and a **test** set, whose loss is reported, so
selection and report never share rows. Methods:

* ``peft-lora``, ``peft-dora``: PEFT's LoRA and DoRA (B = 0 at the start);
* ``feddora``: FedDoRA with its defaults (``init_weights=True``: the paired start, every tensor non-zero, B A = 0);
* ``feddora/zero_A``: FedDoRA's previous default start, m_A = 0 and B = V_B (both directions drawn as LoRA's A);
* ``feddora/zero_B``: FedDoRA's initialisation before this benchmark, m_B = 0 and A = V_A. Only the r entries of m_B
  get a gradient at the first step, and a column of B has norm m_B[j], which grows by about lr per Adam step, whereas
  a LoRA B column grows by about lr·√d_out.

Each method is compared at its own best learning rate of ``--lrs`` (the lowest mean validation loss over seeds at
each reported step); the table marks a best lr at an edge of the method's grid (no worse neighbour on that side:
the optimum is not bracketed). Results go to ``<results-dir>/learning-<preset>-<UTC date>.{jsonl,md,png}``; runs already in
the jsonl are not run again, so an interrupted benchmark continues where it stopped, and ``--methods NAME@LR`` runs
one lr of a method (a sweep on ``--seeds 1`` followed by ``--seeds 3`` at the best lrs is what the README's table
did). Presets: ``cpu`` (64-token sequences, batch 2, 200 steps, 32 held-out rows, 3 seeds, 10 lrs in all: 30 runs, each
5 minutes on an idle 2-core machine with one thread per worker and up to 18 on a shared one, so 1–3 hours with two
workers, not the 30 minutes it was meant to fit) and ``gpu`` (256 tokens, batch 8, 500 steps, 128 held-out rows, 5
seeds).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import copy
import multiprocessing
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from peft import LoraConfig, PeftConfig, get_peft_model
from torch import nn
from torch.utils.data import DataLoader, RandomSampler

from benchmarks.common import (
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
from fedlora.data import CausalLMCollator, load_dolly, tokenize_dataset
from fedlora.data.partition import sample_indices
from fedlora.evaluation import evaluate_loss
from fedlora.models import load_model_and_tokenizer
from fedlora.tuners.feddora import FedDoRAConfig

TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
HELD_OUT_SEED = 1234  # the held-out rows (validation and test) do not depend on a run's seed

PRESETS: dict[str, dict[str, Any]] = {
    "cpu": {
        "max_length": 64,
        "batch_size": 2,
        "eval_steps": [0, 10, 20, 50, 100, 200],
        "held_out": 32,
        "seeds": 3,
        "max_prompt_chars": 600,
        "prompt_format": "alpaca",
        "device": "cpu",
    },
    "gpu": {
        "max_length": 256,
        "batch_size": 8,
        "eval_steps": [0, 10, 20, 50, 100, 200, 500],
        "held_out": 128,
        "seeds": 5,
        "max_prompt_chars": None,
        "prompt_format": "alpaca",
        "device": "cuda",
    },
}


@dataclass(frozen=True)
class Method:
    """An adapter config and the learning rates to try it at."""

    name: str
    config: Callable[[], PeftConfig]
    lrs: tuple[float, ...]


def _lora(**kwargs: Any) -> Callable[[], PeftConfig]:
    return lambda: LoraConfig(r=8, lora_alpha=16, target_modules=TARGET_MODULES, task_type="CAUSAL_LM", **kwargs)


def _feddora(**kwargs: Any) -> Callable[[], PeftConfig]:
    return lambda: FedDoRAConfig(r=8, lora_alpha=16, target_modules=TARGET_MODULES, task_type="CAUSAL_LM", **kwargs)


METHODS = {
    method.name: method
    for method in (
        Method("peft-lora", _lora(), (5e-4, 1e-3, 2e-3, 3e-3)),
        Method("peft-dora", _lora(use_dora=True), (1e-3, 3e-3)),
        Method("feddora", _feddora(), (1e-3, 2e-3, 3e-3, 6e-3)),
        Method("feddora/zero_A", _feddora(init_weights="zero_A"), (1e-3, 2e-3, 3e-3)),
        Method("feddora/zero_B", _feddora(init_weights="zero_B"), (3e-3, 1e-2)),
    )
}


@dataclass(frozen=True)
class Job:
    method: str
    lr: float
    seed: int

    @property
    def key(self) -> tuple[str, float, int]:
        return self.method, self.lr, self.seed


_WORKER: dict[str, Any] = {}


def _init_worker(args: argparse.Namespace, settings: dict[str, Any]) -> None:
    """Load the model, tokenizer and data once per worker process."""
    torch.set_num_threads(args.cpu_threads)
    model, tokenizer = load_model_and_tokenizer(args.model, device=settings["device"])
    rows = load_dolly(str(args.data))
    if settings["max_prompt_chars"]:
        limit = settings["max_prompt_chars"]
        rows = rows.filter(lambda row: len(row["instruction"]) + len(row["context"]) <= limit)
    held = sample_indices(len(rows), 2 * settings["held_out"], HELD_OUT_SEED)
    held = [int(i) for i in np.random.default_rng(HELD_OUT_SEED).permutation(held)]  # validation, then test: disjoint
    split = {"validation": sorted(held[: settings["held_out"]]), "held_out": sorted(held[settings["held_out"] :])}
    train = rows.select(sorted(set(range(len(rows))) - set(held)))
    tokenized = {name: rows.select(indices) for name, indices in split.items()} | {"train": train}
    _WORKER.update(
        {
            name: tokenize_dataset(dataset, tokenizer, settings["max_length"], settings["prompt_format"])
            for name, dataset in tokenized.items()
        },
        model=model.requires_grad_(False),
        tokenizer=tokenizer,
        settings=settings,
    )


def run_job(job: Job) -> dict[str, Any]:
    """Train one (method, lr, seed) and return its row with the held-out loss after each of ``eval_steps``."""
    started = time.perf_counter()
    method, settings = METHODS[job.method], _WORKER["settings"]
    torch.manual_seed(job.seed)
    model = get_peft_model(copy.deepcopy(_WORKER["model"]), method.config())
    params = [param for param in model.parameters() if param.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=job.lr, weight_decay=0.0)
    pad = _WORKER["tokenizer"].pad_token_id
    loader = DataLoader(
        _WORKER["train"].select_columns(["input_ids", "labels"]),
        batch_size=settings["batch_size"],
        sampler=RandomSampler(_WORKER["train"], generator=torch.Generator().manual_seed(job.seed)),
        collate_fn=CausalLMCollator(pad),
    )
    device = settings["device"]
    curve, val_curve, train_losses, batches = {}, {}, [], iter(loader)
    for step in range(max(settings["eval_steps"]) + 1):
        if step in settings["eval_steps"]:
            curve[step] = evaluate_loss(model, _WORKER["held_out"], pad, batch_size=8)["loss"]
            val_curve[step] = evaluate_loss(model, _WORKER["validation"], pad, batch_size=8)["loss"]
            model.train()
        if step == max(settings["eval_steps"]):
            break
        batch = {k: v.to(device) for k, v in next(batches).items()}
        loss = model(**batch).loss
        loss.backward()
        nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        train_losses.append(loss.item())
    return {
        "method": job.method,
        "lr": job.lr,
        "seed": job.seed,
        "curve": {str(step): loss for step, loss in curve.items()},
        "val_curve": {str(step): loss for step, loss in val_curve.items()},
        "final_train_loss": statistics.fmean(train_losses[-10:]),
        "wall_s": round(time.perf_counter() - started, 1),
    }


def summarize(rows: Sequence[dict[str, Any]], steps: Sequence[int]) -> dict[str, dict[int, dict[str, Any]]]:
    """For every method and step, the lr with the lowest mean **validation** loss over seeds (among the lrs run on
    the most seeds), with the mean, std and n of its **test** (held-out) loss, and ``bracketed``: whether a worse lr
    of the grid lies on each side of it."""
    by_method: dict[str, dict[float, list[dict[str, Any]]]] = {}
    for row in rows:
        by_method.setdefault(row["method"], {}).setdefault(row["lr"], []).append(row)
    summary: dict[str, dict[int, dict[str, Any]]] = {}
    for method, by_lr in by_method.items():
        summary[method] = {}
        seeds = max(len(runs) for runs in by_lr.values())  # lrs tried on fewer seeds (a first sweep) do not compete
        for step in steps:
            grid = {
                lr: _mean_std(runs, step, "val_curve")[0]
                for lr, runs in sorted(by_lr.items())
                if len(runs) == seeds and all(str(step) in run.get("val_curve", {}) for run in runs)
            }
            if not grid:
                continue
            best = min(grid, key=grid.get)
            lower, higher = [lr for lr in grid if lr < best], [lr for lr in grid if lr > best]
            mean, std = _mean_std(by_lr[best], step)
            summary[method][step] = {
                "lr": best,
                "mean": mean,
                "std": std,
                "n": len(by_lr[best]),
                "bracketed": bool(lower and higher and grid[max(lower)] > grid[best] < grid[min(higher)]),
            }
    return summary


def _mean_std(runs: Sequence[dict[str, Any]], step: int, curve: str = "curve") -> tuple[float, float]:
    """Mean and standard deviation over ``runs`` (seeds) of the test (``curve``) or validation (``val_curve``) loss
    after ``step`` steps."""
    losses = [run[curve][str(step)] for run in runs if str(step) in run[curve]]
    return statistics.fmean(losses), statistics.stdev(losses) if len(losses) > 1 else 0.0


def write_report(rows: Sequence[dict[str, Any]], steps: Sequence[int], path: Path, header: str) -> None:
    """The markdown table (each method at its best lr per step, then every lr at the last step) and the plot."""
    summary = summarize(rows, steps)
    step_names = [f"step {s}" for s in steps]
    best = markdown_table(
        ["method", *step_names],
        (
            [
                method,
                *(
                    f"{per_step[s]['mean']:.4f} ± {per_step[s]['std']:.4f} (lr {per_step[s]['lr']:g}"
                    f"{'' if per_step[s]['bracketed'] else ', at the grid edge'})"
                    for s in steps
                ),
            ]
            for method, per_step in summary.items()
        ),
    )
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["method"], row["lr"]), []).append(row)
    every = markdown_table(
        ["method", "lr", "seeds", *step_names],
        (
            [method, f"{lr:g}", len(runs), *("{:.4f} ± {:.4f}".format(*_mean_std(runs, s)) for s in steps)]
            for (method, lr), runs in groups.items()
        ),
    )
    path.with_suffix(".md").write_text(
        f"{header}\n\n{best}\nEach cell: mean ± std over seeds of the test loss at the lr whose validation loss is "
        f'best at that step ("at the grid edge": no worse lr on one side, so the optimum is not bracketed).\n\n'
        f"Every learning rate, test loss, mean ± std over seeds:\n\n{every}"
    )

    figure = Figure(figsize=(7, 4.5))
    axes = figure.subplots()
    for method, per_step in summary.items():
        final_lr = per_step[steps[-1]]["lr"]
        runs = groups[(method, final_lr)]
        means, stds = zip(*(_mean_std(runs, s) for s in steps), strict=True)
        axes.plot(steps, means, marker="o", label=f"{method} (lr {final_lr:g})")
        low, high = [m - d for m, d in zip(means, stds, strict=True)], [m + d for m, d in zip(means, stds, strict=True)]
        axes.fill_between(steps, low, high, alpha=0.2)
    axes.set_xscale("symlog", linthresh=10)
    axes.set_xlabel("optimizer steps")
    axes.set_ylabel("held-out loss (response tokens)")
    axes.set_title("Centralized fine-tuning, mean ± std over seeds, each at its best final lr")
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path.with_suffix(".png"), dpi=120)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.learning", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    add_data_argument(parser)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument(
        "--methods", nargs="+", default=list(METHODS), help=f"of {sorted(METHODS)}; NAME@LR runs that lr only"
    )
    parser.add_argument("--lrs", nargs="+", type=float, help="learning rates for every method (default: each its own)")
    parser.add_argument("--seeds", type=int, help="number of seeds (default: the preset's)")
    parser.add_argument("--steps", nargs="+", type=int, help="evaluation steps (default: the preset's)")
    parser.add_argument("--workers", type=int, default=2, help="processes running jobs in parallel")
    parser.add_argument("--cpu-threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--name", help="results file stem (default: learning-<preset>-<UTC date>)")
    args = parser.parse_args(argv)
    unknown = [m for m in args.methods if m.partition("@")[0] not in METHODS]
    if unknown:
        parser.error(f"--methods: unknown {unknown}; choose from {sorted(METHODS)}")
    if not args.data.is_file():
        parser.error(f"--data {args.data}: no such file (Dolly-15k .jsonl)")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    settings = dict(PRESETS[args.preset])
    if args.steps:
        settings["eval_steps"] = sorted(set([0, *args.steps]))
    seeds = args.seeds or settings["seeds"]
    stem = args.name or f"learning-{args.preset}-{today()}"
    path = args.results_dir / f"{stem}.jsonl"
    commit, settings_hash = git_commit(), config_hash({"settings": settings, "model": args.model})
    done = {  # a row counts as done only when the same code ran the same settings
        (row["method"], row["lr"], row["seed"])
        for row in read_jsonl(path)
        if row.get("commit") == commit and row.get("config_hash") == settings_hash
    }
    runs = [
        (name, [float(lr)] if lr else (args.lrs or METHODS[name].lrs))
        for name, _, lr in (method.partition("@") for method in args.methods)
    ]
    jobs = [
        Job(name, lr, seed) for seed in range(seeds) for name, lrs in runs for lr in lrs if (name, lr, seed) not in done
    ]
    context = {"preset": args.preset, "settings": settings, "model": args.model, "config_hash": settings_hash}
    context |= provenance(
        "benchmarks.learning", argv if argv is not None else sys.argv[1:], torch.device(settings["device"])
    )
    print(f"{len(jobs)} runs ({len(done)} already in {path})", flush=True)
    spawn = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(
        args.workers, mp_context=spawn, initializer=_init_worker, initargs=(args, settings)
    ) as pool:
        for row in pool.map(run_job, jobs):
            write_jsonl(path, [row | context], append=True)
            curve = " ".join(f"{s}:{v:.3f}" for s, v in row["curve"].items())
            print(f"{row['method']} lr={row['lr']:g} seed={row['seed']} {row['wall_s']}s  {curve}", flush=True)
    rows = [row for row in read_jsonl(path) if row["settings"]["eval_steps"] == settings["eval_steps"]]
    check_one_commit(rows, str(path))
    header = (
        f"# Learning benchmark, preset {args.preset}: {args.model}, r=8, alpha=16 on {', '.join(TARGET_MODULES)}, "
        f"AdamW, batch {settings['batch_size']}, {settings['max_length']} tokens, test loss on "
        f"{settings['held_out']} held-out Dolly rows, lrs chosen on {settings['held_out']} other (validation) rows; {context['device']}, {context['cores']} cores, "
        f"torch {context['torch_version']}"
    )
    write_report(rows, settings["eval_steps"], path, header)
    print(path.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
