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
import logging
import random
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, replace
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset, concatenate_datasets
from peft import PeftConfig, PeftModel, get_peft_model
from peft.tuners.tuners_utils import _maybe_include_all_linear_layers
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from fedlora.data import ClientData, DataConfig, FederatedData, build_federated_data
from fedlora.data.samples import DOLLY_SAMPLE
from fedlora.federated.checks import (
    check_clients,
    check_device,
    check_eval_overrides,
    check_resume_rounds,
    check_settings,
)
from fedlora.federated.client import ClientApp, ClientState
from fedlora.federated.config import (
    DOLLY_SAMPLE_ALIAS,
    RunConfig,
    config_differences,
    load_run_config,
    save_config,
)
from fedlora.federated.message import FitIns, FitRes, Rejection
from fedlora.federated.report import format_table, plot_scores, privacy_rows, round_title, summarize, train_rows
from fedlora.federated.server import ServerApp
from fedlora.federated.storage import (
    Checkpoint,
    RunDir,
    atomic_dir,
    atomic_write,
    check_free_space,
    check_writable,
    estimate_run_bytes,
    recover_dir,
    rng_state,
    set_rng_state,
)
from fedlora.federated.strategy import STRATEGIES, Strategy
from fedlora.models import load_model_and_tokenizer

logger = logging.getLogger(__name__)
RESUMABLE_KEYS = ("rounds", "device", "output_dir", "eval.")  # settings --resume may change (prefixes)
POOLED_CLIENT = "pooled"
ADAPTER_FIELDS = ("peft_type", "r", "lora_alpha", "target_modules", "tensor_roles")  # a saved adapter must match


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
    config = check_run_dir(config, resume)
    run_dir = RunDir(config.output_dir)
    checkpoint = run_dir.recover() if resume else None  # before the model loads: a damaged run fails fast
    recover_dir(run_dir.inside(run_dir.global_adapter))
    adapter_dir = run_dir.global_adapter if run_dir.global_adapter.exists() else None
    fed = build_federation(config, adapter_dir=adapter_dir, model=model, tokenizer=tokenizer, progress=progress)
    config = replace(config, data=replace(config.data, prompt_format=fed.data.prompt_format))  # as resolved
    client_ids = [POOLED_CLIENT] if fed.strategy.pooled else [data.client_id for data in fed.data.clients]
    check_clients(config, client_ids)  # each its own state directory; server.min_clients not above their number
    check_free_space(run_dir.path, _run_bytes(fed, config))
    run_dir.path.mkdir(parents=True, exist_ok=True)  # only now that the model and data loaded
    atomic_write(run_dir.inside(run_dir.config), lambda tmp: save_config(config, tmp))
    run_dir.write_client_names(client_ids)
    app = fed.app
    initial_personal = app.snapshot(app.names["personal"])
    eval_states = {data.client_id: app.new_state(data) for data in fed.data.clients}
    train_states = {POOLED_CLIENT: app.new_state(_pooled(fed.data))} if fed.strategy.pooled else eval_states
    server = ServerApp(app.snapshot(app.names["shared"]), config.server, config.seed, config.privacy)
    persisted = bool(app.names["personal"])  # only clients with personal tensors have state to save

    if checkpoint is not None:
        _restore(checkpoint, server, train_states, run_dir)
    publish_adapter(app, server.global_tensors, initial_personal, run_dir)  # also repairs one a crash left stale
    plot_scores(run_dir.read_metrics(), run_dir.inside(run_dir.plot))
    start = checkpoint.round if checkpoint else 0
    sizes = [data.num_train_examples for data in fed.data.clients]
    tqdm.write(
        f"fedlora {config.strategy}: {len(sizes)} clients (train sizes {sizes}, global test "
        f"{len(fed.data.global_test)}), rounds {start + 1}..{config.rounds}, run dir {run_dir.path}"
    )
    rows = initial_scores(fed, eval_states.values(), server.global_tensors, config, progress) if start == 0 else []

    for round_ in tqdm(range(start + 1, config.rounds + 1), desc="rounds", disable=not progress):
        started = time.perf_counter()
        sampled = server.sample(round_, list(train_states))
        ins = server.fit_ins(round_)
        results, failures = fit_clients(app, [train_states[client_id] for client_id in sampled], ins)
        rejected = server.aggregate(results, round_, failures=failures)
        rows += train_rows(round_, results, rejected, failures)
        epsilon = server.epsilon(round_, len(train_states)) if server.privacy else None  # nothing to restore
        rows += privacy_rows(round_, epsilon, config.privacy.delta)
        evaluated = round_ % config.eval.every == 0 or round_ == config.rounds
        if evaluated:
            scores = evaluate_round(fed, eval_states.values(), server.global_tensors, progress)
            summaries = summarize(round_, scores)
            rows += _with_round(round_, scores) + summaries
            title = round_title(
                round_, rows, config.rounds, config.strategy, len(sampled), time.perf_counter() - started
            )
            tqdm.write(format_table(title, summaries))
        with run_dir.committing(round_):  # a failed write (a full disk) names the round the run dir still holds
            run_dir.append_metrics(rows)
            if evaluated:
                plot_scores(run_dir.read_metrics(), run_dir.inside(run_dir.plot))
            checkpoint = Checkpoint(
                round=round_,
                global_tensors=server.global_tensors,
                server_optimizer=server.optimizer.state_dict(),
                client_rounds={cid: s.last_round for cid, s in train_states.items() if s.last_round and persisted},
                metrics_bytes=run_dir.metrics.stat().st_size,
                rng=rng_state(),
            )
            trained = [train_states[result.client_id] for result in results]  # not the failed ones
            run_dir.commit_round(checkpoint, trained if persisted else [])
            publish_adapter(app, server.global_tensors, initial_personal, run_dir)
        rows = []
    return run_dir.path


def initial_scores(
    fed: Federation,
    states: Iterable[ClientState],
    shared: Mapping[str, Tensor],
    config: RunConfig,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Round 0: every client's initial model (the base model, since every adapter starts at ΔW = 0) scored and
    printed like a round, so each run shows its improvement. The rows are committed with round 1's."""
    started = time.perf_counter()
    scores = evaluate_round(fed, states, shared, progress)
    summaries = summarize(0, scores)
    title = f"round 0/{config.rounds} · {config.strategy} · initial adapter · {time.perf_counter() - started:.1f} s"
    tqdm.write(format_table(title, summaries))
    return _with_round(0, scores) + summaries


def fit_clients(app: ClientApp, states: Iterable[ClientState], ins: FitIns) -> tuple[list[FitRes], list[Rejection]]:
    """Train each client for round ``ins.round``; returns the replies and the clients whose fit raised, with why.

    A failing client is logged and left out; the others are unaffected, since each client's seeds depend only on
    (seed, round, client) and its state changes only when its fit completes.
    """
    results, failures = [], []
    for state in states:
        try:
            results.append(app.fit(state, ins))
        except Exception as error:
            debug = logger.isEnabledFor(logging.DEBUG)  # the traceback only then (fedlora --debug)
            logger.warning("round %d: client %s failed: %r", ins.round, state.client_id, error, exc_info=debug)
            app.model.zero_grad(set_to_none=True)  # it may have stopped between backward() and the step
            failures.append(Rejection(state.client_id, f"fit raised {type(error).__name__}: {error}"))
    return results, failures


def evaluate_run(
    run_dir: str | Path,
    *,
    overrides: Iterable[str] = (),
    model: nn.Module | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Re-score a saved run: its newest intact checkpoint's global tensors plus each client's personal tensors as
    of it, as during training.

    ``overrides`` (``key=value``) adjust the saved configuration, e.g. ``eval.rouge_examples=20``. The rows
    (per client and summaries) are printed as a table, written to ``<run_dir>/eval.jsonl`` and returned.
    """
    run = RunDir(run_dir)
    if not run.config.exists():
        raise FileNotFoundError(f"{run.path} is not a fedlora run directory (no config.yaml)")
    run.check_links()
    config = load_run_config(run.config, overrides)
    check_eval_overrides(load_run_config(run.config), config)
    check_device(config.device)
    checkpoint = run.load_checkpoint()  # before the model loads
    recover_dir(run.inside(run.global_adapter))
    fed = build_federation(config, adapter_dir=run.global_adapter, model=model, tokenizer=tokenizer, progress=progress)
    states = [fed.app.new_state(data) for data in fed.data.clients]
    if checkpoint is not None:
        _load_clients(checkpoint, states, run)
    shared = checkpoint.global_tensors if checkpoint else fed.app.snapshot(fed.app.names["shared"])
    round_ = checkpoint.round if checkpoint else 0
    scores = evaluate_round(fed, states, shared, progress)
    summaries = summarize(round_, scores)
    rows = _with_round(round_, scores) + summaries
    atomic_write(
        run.inside(run.path / "eval.jsonl"), lambda tmp: tmp.write_text("".join(f"{json.dumps(row)}\n" for row in rows))
    )
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
    strategy = STRATEGIES[config.strategy].with_roles(config.adapter.tensor_roles)
    _seed_everything(config.seed)
    if adapter_dir is None:
        peft_model = get_peft_model(model, strategy.peft_config(config.adapter))
    else:
        _check_adapter_dir(adapter_dir, strategy.peft_config(config.adapter), model)
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


def _check_adapter_dir(adapter_dir: Path, expected: PeftConfig, model: nn.Module) -> None:
    """Raise a ``ValueError`` naming the first of ``ADAPTER_FIELDS`` in which the adapter saved in ``adapter_dir``
    differs from ``expected`` (this run's), with both values; also its base model, as PEFT records it
    (``model.name_or_path``; an absolute local path by its last part, so a moved run directory still loads)."""
    config_file = Path(adapter_dir) / "adapter_config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{adapter_dir} is not a saved adapter (no adapter_config.json)")
    saved = json.loads(config_file.read_text())
    expected = _maybe_include_all_linear_layers(expected, model)  # PEFT saves "all-linear" as the module names
    wanted = {name: getattr(expected, name) for name in ADAPTER_FIELDS if hasattr(expected, name)}
    wanted["base_model_name_or_path"] = getattr(model, "name_or_path", None) or None
    for name, value in wanted.items():
        theirs, ours = _comparable(name, saved.get(name)), _comparable(name, value)
        if theirs != ours:
            raise ValueError(
                f"{adapter_dir} does not fit this run: its {name} is {theirs!r} but this run's is {ours!r} "
                "(was it saved by another run, strategy, adapter setting or model?)"
            )


def _comparable(name: str, value: Any) -> Any:
    """A saved or expected adapter setting in one form: module names sorted, enums as their value, a local model
    path as its last part."""
    if isinstance(value, set | list | tuple):
        return sorted(value)
    if isinstance(value, Enum):
        return value.value
    if name == "base_model_name_or_path" and value is not None and Path(value).is_absolute():
        return Path(value).name
    return value


def data_config(config: RunConfig) -> DataConfig:
    """The :class:`fedlora.data.DataConfig` of a run (``dolly-sample`` names the packaged Dolly sample)."""
    path = str(DOLLY_SAMPLE) if config.data.path == DOLLY_SAMPLE_ALIAS else config.data.path
    return DataConfig(**{**asdict(config.data), "path": path, "seed": config.seed})


def default_output_dir(config: RunConfig) -> Path:
    return Path("runs") / f"{config.strategy}-{time.strftime('%Y%m%d-%H%M%S')}"


def check_run_dir(config: RunConfig, resume: bool) -> RunConfig:
    """Check the output directory can be used (fresh: absent or empty; resume: a run with a compatible config);
    returns the config with its ``output_dir`` filled in."""
    check_settings(config)
    if resume:
        if config.output_dir is None:
            raise ValueError("--resume needs the directory of the run to continue (--output-dir)")
        run_dir = RunDir(config.output_dir)
        run_dir.check_links()
        if not run_dir.config.exists():
            raise FileNotFoundError(f"{run_dir.path} is not a fedlora run directory (no config.yaml)")
        saved = load_run_config(run_dir.config)
        if config.data.prompt_format == "auto":  # the format the run resolved it to (in its config.yaml)
            config = replace(config, data=replace(config.data, prompt_format=saved.data.prompt_format))
        changed = [key for key in config_differences(saved, config) if not key.startswith(RESUMABLE_KEYS)]
        if changed:
            raise ValueError(
                f"--resume: the configuration differs from the saved run in {changed}; only rounds, device, "
                "output_dir and eval.* may change"
            )
        check_resume_rounds(config, run_dir.committed_round())
    else:
        run_dir = RunDir(config.output_dir or default_output_dir(config))
        if run_dir.path.is_dir() and any(run_dir.path.iterdir()):
            raise FileExistsError(
                f"output directory {run_dir.path} exists and is not empty; pass --resume to continue that run "
                "or choose another --output-dir"
            )
    check_writable(run_dir.path)
    # What is known of the run's size before the model loads; train() checks the whole once it is wrapped.
    clients = config.data.num_clients or 1
    check_free_space(
        run_dir.path, estimate_run_bytes(shared=0, personal=0, adapter=0, clients=clients, rounds=config.rounds)
    )
    return replace(config, output_dir=str(run_dir.path))


def _run_bytes(fed: Federation, config: RunConfig) -> int:
    """:func:`~fedlora.federated.storage.estimate_run_bytes` for this run's adapter tensors, clients and rounds."""
    params = dict(fed.model.named_parameters())
    sizes = {
        role: sum(params[n].numel() * params[n].element_size() for n in names) for role, names in fed.app.names.items()
    }
    return estimate_run_bytes(
        shared=sizes["shared"],
        personal=sizes["personal"],
        adapter=sum(sizes.values()),
        clients=len(fed.data.clients),
        rounds=config.rounds,
    )


def _restore(checkpoint: Checkpoint, server: ServerApp, states: Mapping[str, ClientState], run_dir: RunDir) -> None:
    """Put the server and the clients back in their state after ``checkpoint.round``."""
    server.global_tensors = checkpoint.global_tensors
    server.optimizer.load_state_dict(checkpoint.server_optimizer)
    _load_clients(checkpoint, states.values(), run_dir)
    set_rng_state(checkpoint.rng)


def _load_clients(checkpoint: Checkpoint, states: Iterable[ClientState], run_dir: RunDir) -> None:
    """Give each client its personal tensors and local optimizer state as of ``checkpoint`` (one that had not
    trained by then keeps its initial state)."""
    for state in states:
        last_round = checkpoint.client_rounds.get(state.client_id, 0)
        if last_round:
            state.personal, state.optimizer_state = run_dir.load_client(state.client_id, last_round)
            state.last_round = last_round


def publish_adapter(
    app: ClientApp, shared: Mapping[str, Tensor], initial_personal: Mapping[str, Tensor], run: RunDir
) -> None:
    """Write ``global_adapter/``: the global shared tensors with the initial personal (and frozen) tensors."""
    app.load(shared)
    app.load(initial_personal)
    with atomic_dir(run.inside(run.global_adapter)) as tmp:
        app.model.save_pretrained(tmp)


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
