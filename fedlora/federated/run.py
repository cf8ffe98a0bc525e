"""The federated loop, in one process: one base model, clients one after another, only adapter state swapped.

:func:`train` opens the run directory (see :mod:`fedlora.federated.storage`), builds the clients' data and the
strategy's adapter, then for each round: the server samples clients; each loads the global shared tensors and
its personal state, trains, and sends a :class:`~fedlora.federated.message.FitRes`; the server aggregates; every
``eval.every`` rounds (and after the last) every client's model is scored on its own test split (local) and on the
pooled global test set (global); then the round is committed (metrics, client states, checkpoint) and
``global_adapter/`` and the plot are updated. :func:`evaluate_run` re-scores a saved run.

Determinism: the data split, the adapter initialisation, client sampling (seed, round) and each client's data
order and dropout (seed, round, client) are all seeded, and the checkpoint holds the global RNG states, so a run
interrupted after round k and resumed ends with exactly the adapter of an uninterrupted run.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset, concatenate_datasets
from peft import PeftModel, get_peft_model
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from fedlora.data import ClientData, DataConfig, FederatedData, build_federated_data
from fedlora.data.samples import DOLLY_SAMPLE
from fedlora.federated.client import ClientApp, ClientState
from fedlora.federated.config import (
    DOLLY_SAMPLE_ALIAS,
    RunConfig,
    config_differences,
    load_config,
    save_config,
)
from fedlora.federated.report import format_table, plot_scores, summarize
from fedlora.federated.server import ServerApp
from fedlora.federated.storage import (
    Checkpoint,
    RunDir,
    atomic_dir,
    atomic_write,
    recover_dir,
    rng_state,
    set_rng_state,
)
from fedlora.federated.strategy import STRATEGIES, Strategy
from fedlora.models import load_model_and_tokenizer

RESUMABLE_KEYS = ("rounds", "device", "output_dir", "eval.")  # settings --resume may change (prefixes)
POOLED_CLIENT = "pooled"


@dataclass
class Federation:
    """Everything a run needs in memory: the strategy, the PEFT model, the clients' data and the client app."""

    strategy: Strategy
    model: nn.Module
    tokenizer: PreTrainedTokenizerBase
    data: FederatedData
    app: ClientApp


def train(
    config: RunConfig,
    *,
    resume: bool = False,
    model: nn.Module | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    progress: bool = True,
) -> Path:
    """Run (or with ``resume``, continue) the federated training described by ``config``; returns the run dir.

    ``model``/``tokenizer`` replace loading ``config.model.name`` (the model is wrapped in place). A fresh run
    needs an absent or empty output directory; ``resume`` needs the run's directory and a configuration that
    differs from the saved one only in ``rounds``, ``device``, ``output_dir`` or ``eval.*``.
    """
    config = _check_run_dir(config, resume)
    run_dir = RunDir(config.output_dir)
    recover_dir(run_dir.global_adapter)
    adapter_dir = run_dir.global_adapter if run_dir.global_adapter.exists() else None
    fed = build_federation(config, adapter_dir=adapter_dir, model=model, tokenizer=tokenizer, progress=progress)
    run_dir.path.mkdir(parents=True, exist_ok=True)  # only now that the model and data loaded
    atomic_write(run_dir.config, lambda tmp: save_config(config, tmp))
    app = fed.app
    initial_personal = app.snapshot(app.names["personal"])
    eval_states = {data.client_id: app.new_state(data) for data in fed.data.clients}
    train_states = {POOLED_CLIENT: app.new_state(_pooled(fed.data))} if fed.strategy.pooled else eval_states
    server = ServerApp(app.snapshot(app.names["shared"]), config.server, config.seed)
    persisted = bool(app.names["personal"])  # only clients with personal tensors have state to save

    checkpoint = run_dir.load_checkpoint()
    if checkpoint is not None:
        _restore(checkpoint, server, train_states, run_dir)
    _publish_adapter(fed, server.global_tensors, initial_personal, run_dir)  # also repairs one a crash left stale
    plot_scores(run_dir.read_metrics(), run_dir.plot)
    start = checkpoint.round if checkpoint else 0
    sizes = [data.num_train_examples for data in fed.data.clients]
    tqdm.write(
        f"fedlora {config.strategy}: {len(sizes)} clients (train sizes {sizes}, global test "
        f"{len(fed.data.global_test)}), rounds {start + 1}..{config.rounds}, run dir {run_dir.path}"
    )

    for round_ in tqdm(range(start + 1, config.rounds + 1), desc="rounds", disable=not progress):
        started = time.perf_counter()
        sampled = server.sample(round_, list(train_states))
        ins = server.fit_ins(round_)
        results = [app.fit(train_states[client_id], ins) for client_id in sampled]
        server.aggregate(results)
        rows: list[dict[str, Any]] = [
            {"round": round_, "split": "train", "client": r.client_id, "num_examples": r.num_examples, **r.metrics}
            for r in results
        ]
        evaluated = round_ % config.eval.every == 0 or round_ == config.rounds
        if evaluated:
            scores = evaluate_round(fed, eval_states.values(), server.global_tensors, progress)
            summaries = summarize(round_, scores)
            rows += _with_round(round_, scores) + summaries
            elapsed = time.perf_counter() - started
            title = f"round {round_}/{config.rounds} · {config.strategy} · {len(sampled)} client(s) · {elapsed:.1f} s"
            tqdm.write(format_table(title, summaries))
        run_dir.append_metrics(rows)
        if evaluated:
            plot_scores(run_dir.read_metrics(), run_dir.plot)
        checkpoint = Checkpoint(
            round=round_,
            global_tensors=server.global_tensors,
            server_optimizer=server.optimizer.state_dict(),
            client_rounds={cid: s.last_round for cid, s in train_states.items() if s.last_round and persisted},
            metrics_bytes=run_dir.metrics.stat().st_size,
            rng=rng_state(),
        )
        run_dir.commit_round(checkpoint, [train_states[cid] for cid in sampled] if persisted else [])
        _publish_adapter(fed, server.global_tensors, initial_personal, run_dir)
    return run_dir.path


def evaluate_run(
    run_dir: str | Path,
    *,
    overrides: Iterable[str] = (),
    model: nn.Module | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Re-score a saved run: ``global_adapter/`` plus each client's saved personal tensors, as during training.

    ``overrides`` (``key=value``) adjust the saved configuration, e.g. ``eval.rouge_examples=20``. The rows
    (per client and summaries) are printed as a table, written to ``<run_dir>/eval.jsonl`` and returned.
    """
    run = RunDir(run_dir)
    if not run.config.exists():
        raise FileNotFoundError(f"{run.path} is not a fedlora run directory (no config.yaml)")
    config = load_config(run.config, overrides)
    recover_dir(run.global_adapter)
    fed = build_federation(config, adapter_dir=run.global_adapter, model=model, tokenizer=tokenizer, progress=progress)
    states = [fed.app.new_state(data) for data in fed.data.clients]
    for state in states:
        saved = run.load_client(state.client_id)
        if saved is not None:
            state.personal = saved[0]
    shared = fed.app.snapshot(fed.app.names["shared"])
    round_ = run.committed_round()
    scores = evaluate_round(fed, states, shared, progress)
    summaries = summarize(round_, scores)
    rows = _with_round(round_, scores) + summaries
    atomic_write(run.path / "eval.jsonl", lambda tmp: tmp.write_text("".join(f"{json.dumps(row)}\n" for row in rows)))
    tqdm.write(format_table(f"{run.path} · {config.strategy} · after round {round_}", summaries))
    return rows


def evaluate_round(
    fed: Federation, states: Iterable[ClientState], shared: Mapping[str, Tensor], progress: bool = True
) -> list[dict[str, Any]]:
    """Each client's model (``shared`` + its personal tensors) on its test split and on the global test set.

    Without personal tensors every client runs the same model, so the global test set is scored once.
    """
    states = list(states)
    identical = not fed.app.names["personal"]
    global_scores = fed.app.evaluate(states[0], shared, {"global": fed.data.global_test}) if identical else {}
    rows = []
    for state in tqdm(states, desc="evaluating", leave=False, disable=not progress):
        datasets: dict[str, Dataset] = {"local": state.data.test}
        if not identical:
            datasets["global"] = fed.data.global_test
        scores = {**global_scores, **fed.app.evaluate(state, shared, datasets)}
        rows += [{"split": split, "client": state.client_id, **scores[split]} for split in ("global", "local")]
    return rows


def build_federation(
    config: RunConfig,
    *,
    adapter_dir: Path | None = None,
    model: nn.Module | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    progress: bool = True,
) -> Federation:
    """Load the model (unless given), build the clients' data, and add the strategy's adapter: a fresh seeded one,
    or the one saved in ``adapter_dir``."""
    if model is None or tokenizer is None:
        model, tokenizer = _load_model(config)
    model.to(config.device)
    data = build_federated_data(data_config(config), tokenizer)
    strategy = STRATEGIES[config.strategy]
    _seed_everything(config.seed)
    if adapter_dir is None:
        peft_model = get_peft_model(model, strategy.peft_config(config.adapter))
    else:
        peft_model = PeftModel.from_pretrained(model, adapter_dir, is_trainable=True)
    settings = config.client
    if strategy.pooled:  # one client does the work of all of them
        settings = replace(settings, steps=settings.steps * len(data.clients))
    app = ClientApp(
        peft_model,
        tokenizer,
        strategy,
        settings,
        config.eval,
        max_length=config.data.max_length,
        seed=config.seed,
        progress=progress,
    )
    return Federation(strategy, peft_model, tokenizer, data, app)


def data_config(config: RunConfig) -> DataConfig:
    """The :class:`fedlora.data.DataConfig` of a run (``dolly-sample`` names the packaged Dolly sample)."""
    path = str(DOLLY_SAMPLE) if config.data.path == DOLLY_SAMPLE_ALIAS else config.data.path
    return DataConfig(**{**asdict(config.data), "path": path, "seed": config.seed})


def default_output_dir(config: RunConfig) -> Path:
    return Path("runs") / f"{config.strategy}-{time.strftime('%Y%m%d-%H%M%S')}"


def _check_run_dir(config: RunConfig, resume: bool) -> RunConfig:
    """Check the output directory can be used (fresh: absent or empty; resume: a run with a compatible config);
    returns the config with its ``output_dir`` filled in."""
    if resume:
        if config.output_dir is None:
            raise ValueError("--resume needs the directory of the run to continue (--output-dir)")
        run_dir = RunDir(config.output_dir)
        if not run_dir.config.exists():
            raise FileNotFoundError(f"{run_dir.path} is not a fedlora run directory (no config.yaml)")
        changed = [
            key for key in config_differences(load_config(run_dir.config), config) if not key.startswith(RESUMABLE_KEYS)
        ]
        if changed:
            raise ValueError(
                f"--resume: the configuration differs from the saved run in {changed}; only rounds, device, "
                "output_dir and eval.* may change"
            )
    else:
        run_dir = RunDir(config.output_dir or default_output_dir(config))
        if run_dir.path.exists() and any(run_dir.path.iterdir()):
            raise FileExistsError(
                f"output directory {run_dir.path} exists and is not empty; pass --resume to continue that run "
                "or choose another --output-dir"
            )
    return replace(config, output_dir=str(run_dir.path))


def _restore(checkpoint: Checkpoint, server: ServerApp, states: Mapping[str, ClientState], run_dir: RunDir) -> None:
    """Put the server and the clients back in their state after ``checkpoint.round``."""
    server.global_tensors = checkpoint.global_tensors
    server.optimizer.load_state_dict(checkpoint.server_optimizer)
    for client_id, state in states.items():
        saved = run_dir.load_client(client_id)
        expected = checkpoint.client_rounds.get(client_id, 0)
        found = saved[2] if saved else 0
        if found != expected:
            raise RuntimeError(
                f"client {client_id}: saved state is from round {found} but the checkpoint expects round {expected}"
            )
        if saved is not None:
            state.personal, state.optimizer_state, state.last_round = saved
    set_rng_state(checkpoint.rng)


def _publish_adapter(
    fed: Federation, shared: Mapping[str, Tensor], initial_personal: Mapping[str, Tensor], run: RunDir
) -> None:
    """Write ``global_adapter/``: the global shared tensors with the initial personal (and frozen) tensors."""
    fed.app.load(shared)
    fed.app.load(initial_personal)
    with atomic_dir(run.global_adapter) as tmp:
        fed.model.save_pretrained(tmp)


def _with_round(round_: int, rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    return [{"round": round_, **row} for row in rows]


def _pooled(data: FederatedData) -> ClientData:
    return ClientData(
        POOLED_CLIENT,
        concatenate_datasets([client.train for client in data.clients]),
        concatenate_datasets([client.test for client in data.clients]),
    )


def _load_model(config: RunConfig) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    dtype = getattr(torch, config.model.dtype) if config.model.dtype else None
    return load_model_and_tokenizer(config.model.name, device=config.device, dtype=dtype)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
