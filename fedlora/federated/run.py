"""The in-process engine: one base model, clients one after another, only adapter state swapped.

:func:`train` opens the run as the Flower engine does (:func:`~fedlora.federated.session.open_session`: the run
directory, the model with the strategy's adapter, the server), builds the clients' data (:func:`build_federation`)
and hands the rounds to the round driver with :class:`InProcess` as its transport: a sampled client loads
the global shared tensors and its personal state, trains, and returns a :class:`~fedlora.federated.message.FitRes`
(:func:`fit_clients`); the global model is scored once on the pooled global test set and every client's model on
its own test split (:func:`evaluate_round`); the run directory keeps the clients' states. :func:`evaluate_run`
re-scores a saved run.

Determinism: the data split, the adapter initialisation, client sampling (seed, round) and each client's data
order and dropout (seed, round, client) are all seeded, and the checkpoint holds the global RNG states, so a run
interrupted after round k and resumed ends with exactly the adapter of an uninterrupted run.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from fedlora.data import FederatedData, build_federated_data
from fedlora.federated.build import build_client
from fedlora.federated.checks import check_device, check_eval_overrides
from fedlora.federated.client import ClientState, FederatedClient
from fedlora.federated.config import RunConfig, load_run_config
from fedlora.federated.message import FitIns, FitRes, Rejection
from fedlora.federated.report import GLOBAL_MODEL, format_table, summarize
from fedlora.federated.rounds import RoundReplies, Transport, with_round
from fedlora.federated.rundir.storage import Checkpoint, RunDir, atomic_write, recover_dir
from fedlora.federated.server import FederatedServer
from fedlora.federated.session import open_session
from fedlora.federated.strategy import FederatedStrategy

logger = logging.getLogger(__name__)


@dataclass
class Federation:
    """Everything a run needs in memory: the strategy, the PEFT model, the clients' data and the client app."""

    strategy: FederatedStrategy
    model: nn.Module
    tokenizer: PreTrainedTokenizerBase
    data: FederatedData
    app: FederatedClient


def train(
    config: RunConfig,
    *,
    resume: bool = False,
    model: nn.Module | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    progress: bool = True,
) -> Path:
    """Run (or with ``resume``, continue) the federated training described by ``config``; returns the run dir.

    ``model``/``tokenizer`` replace loading ``config.model.name`` (the model is wrapped in place); what ``resume``
    needs is :func:`~fedlora.federated.session.open_session`'s.
    """
    session = open_session(config, resume, "in-process", model=model, tokenizer=tokenizer, progress=progress)
    fed = build_federation(session.config, session.client)
    transport = InProcess(fed, session.server, progress)
    sizes = [data.num_train_examples for data in fed.data.clients]
    heading = (
        f"fedlora {config.strategy}: {len(sizes)} clients (train sizes {sizes}, global test "
        f"{len(fed.data.global_test)})"
    )
    return session.run(transport, heading=heading, progress=progress)


class InProcess(Transport):
    """The clients of ``fed``, trained one after another on its one model; the run directory keeps their states
    (the strategy's :meth:`~fedlora.federated.strategy.FederatedStrategy.training_clients` train; every client is
    scored)."""

    def __init__(self, fed: Federation, server: FederatedServer, progress: bool = True) -> None:
        self.fed, self.server, self.progress = fed, server, progress
        self.eval_states = {data.client_id: fed.app.new_state(data) for data in fed.data.clients}
        trainers = fed.strategy.training_clients(fed.data.clients)
        self.train_states = {
            data.client_id: self.eval_states.get(data.client_id) or fed.app.new_state(data) for data in trainers
        }
        self.clients = list(self.train_states)

    def train(self, round_: int, client_rounds: Mapping[str, int]) -> RoundReplies:
        sampled = self.server.sample(round_, self.clients)
        states = [self.train_states[client_id] for client_id in sampled]
        results, failures = fit_clients(self.fed.app, states, self.server.fit_ins(round_))
        return RoundReplies(results, self.server.aggregate(results, round_, failures=failures), failures)

    def evaluate(self, round_: int, client_rounds: Mapping[str, int]) -> list[dict[str, Any]]:
        return evaluate_round(self.fed, self.eval_states.values(), self.server.global_tensors, self.progress)

    def trained_states(self, results: Sequence[FitRes]) -> list[ClientState]:
        return [self.train_states[result.client_id] for result in results]  # not the failed ones

    def restore(self, checkpoint: Checkpoint, run_dir: RunDir) -> None:
        _load_clients(checkpoint, self.train_states.values(), run_dir)


def fit_clients(
    app: FederatedClient, states: Iterable[ClientState], ins: FitIns
) -> tuple[list[FitRes], list[Rejection]]:
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
    client = build_client(config, model=model, tokenizer=tokenizer, adapter_dir=run.global_adapter, progress=progress)
    fed = build_federation(config, client)
    states = [fed.app.new_state(data) for data in fed.data.clients]
    if checkpoint is not None:
        _load_clients(checkpoint, states, run)
    shared = checkpoint.global_tensors if checkpoint else fed.app.snapshot(fed.app.names["shared"])
    round_ = checkpoint.round if checkpoint else 0
    scores = evaluate_round(fed, states, shared, progress)
    summaries = summarize(round_, scores)
    rows = with_round(round_, scores) + summaries
    atomic_write(
        run.inside(run.path / "eval.jsonl"), lambda tmp: tmp.write_text("".join(f"{json.dumps(row)}\n" for row in rows))
    )
    tqdm.write(format_table(f"{run.path} · {config.strategy} · after round {round_}", summaries))
    return rows


def evaluate_round(
    fed: Federation, states: Iterable[ClientState], shared: Mapping[str, Tensor], progress: bool = True
) -> list[dict[str, Any]]:
    """The round's scores: **global**, the global model (``shared`` with the common personal values) on the pooled
    global test set, once (client :data:`GLOBAL_MODEL`); **local**, each client's model (``shared`` with its
    personal tensors) on its own test split."""
    (global_scores,) = fed.app.evaluate(None, shared, {"global": fed.data.global_test}).values()
    rows = [{"split": "global", "client": GLOBAL_MODEL, **global_scores}]
    for state in tqdm(list(states), desc="evaluating", leave=False, disable=not progress):
        (local,) = fed.app.evaluate(state, shared, {"local": state.data.test}).values()
        rows.append({"split": "local", "client": state.client_id, **local})
    return rows


def build_federation(config: RunConfig, app: FederatedClient) -> Federation:
    """The federation of ``app`` (a client trainer from :func:`~fedlora.federated.build.build_client`): the clients'
    data split by ``config.data``, and ``app``'s settings as the strategy sets them for that many clients."""
    data = build_federated_data(config.data, app.tokenizer)
    app.settings = app.strategy.client_settings(app.settings, len(data.clients))
    return Federation(app.strategy, app.model, app.tokenizer, data, app)


def _load_clients(checkpoint: Checkpoint, states: Iterable[ClientState], run_dir: RunDir) -> None:
    """Give each client its personal tensors and local optimizer state as of ``checkpoint`` (one that had not
    trained by then keeps its initial state)."""
    for state in states:
        last_round = checkpoint.client_rounds.get(state.client_id, 0)
        if last_round:
            state.personal, state.optimizer_state = run_dir.load_client(state.client_id, last_round)
            state.last_round = last_round
