"""The in-process engine: one base model, clients one after another, only adapter state swapped.

:func:`train` opens the run as the Flower engine does (:func:`~fedlora.federated.session.open_session`: the run
directory, the model with the strategy's adapter, the server), builds the clients' data (:func:`build_federation`)
and hands the rounds to the round driver with :class:`InProcess` as its transport: a sampled client loads
the global shared tensors and its personal state, trains, and returns a :class:`~fedlora.federated.message.FitRes`
(:func:`fit_clients`); the global model is scored once on the pooled global test set and each scored client's model
on its own test split (:func:`evaluate_round`). Only the clients of the current round are in memory: the run directory
keeps every client's state, read when the client trains or is scored (:func:`load_state`). :func:`evaluate_run`
re-scores a saved run.

Determinism: the data split, the adapter initialisation, client sampling (seed, round) and each client's data
order and dropout (seed, round, client) are all seeded, and the checkpoint holds the global RNG states, so a run
interrupted after round k and resumed ends with exactly the adapter of an uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from fedlora.data import ClientData, FederatedData, build_federated_data
from fedlora.federated.build import build_client
from fedlora.federated.checks import check_device, check_eval_overrides
from fedlora.federated.client import ClientState, FederatedClient
from fedlora.federated.config import RunConfig, load_run_config
from fedlora.federated.message import FitIns, FitRes, Rejection
from fedlora.federated.report import GLOBAL_MODEL, format_table, summarize
from fedlora.federated.rounds import RoundReplies, Transport, with_round
from fedlora.federated.rundir.storage import RunDir, atomic_write, recover_dir
from fedlora.federated.sampling import eval_clients
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
    transport = InProcess(fed, session.server, session.run_dir, progress)
    sizes = [data.num_train_examples for data in fed.data.clients]
    shown = str(sizes) if len(sizes) <= 16 else f"{min(sizes)} to {max(sizes)}, median {statistics.median_low(sizes)}"
    heading = (
        f"fedlora {config.strategy}: {len(sizes)} clients (train sizes {shown}, global test "
        f"{len(fed.data.global_test)})"
    )
    return session.run(transport, heading=heading, progress=progress)


class InProcess(Transport):
    """The clients of ``fed``, trained one after another on its one model (the strategy's
    :meth:`~fedlora.federated.strategy.FederatedStrategy.training_clients` train; every client of the data can be
    scored).

    Memory holds the clients' data and, during a round, the states of that round's sampled clients: a client's state
    is read from ``run_dir`` (or is the initial one) when it trains or is scored, and the states trained in a round
    are dropped once the next round starts, after the round driver has committed them to ``run_dir``.
    """

    def __init__(self, fed: Federation, server: FederatedServer, run_dir: RunDir, progress: bool = True) -> None:
        self.fed, self.server, self.run_dir, self.progress = fed, server, run_dir, progress
        self.train_data = {data.client_id: data for data in fed.strategy.training_clients(fed.data.clients)}
        self.clients = list(self.train_data)
        self.eval_data = {data.client_id: data for data in fed.data.clients}
        self.trained: dict[str, ClientState] = {}  # this round's, until the next round: not yet in run_dir

    def train(self, round_: int, client_rounds: Mapping[str, int]) -> RoundReplies:
        self.trained = {}
        sampled = self.server.sample(round_, self.clients)
        states = [self._state(self.train_data[client_id], client_rounds) for client_id in sampled]
        results, failures = fit_clients(self.fed.app, states, self.server.fit_ins(round_))
        by_id = {state.client_id: state for state in states}
        self.trained = {result.client_id: by_id[result.client_id] for result in results}  # not the failed ones
        return RoundReplies(results, self.server.aggregate(results, round_, failures=failures), failures)

    @property
    def eval_clients(self) -> list[str]:
        return list(self.eval_data)

    def evaluate(self, round_: int, client_rounds: Mapping[str, int], clients: Sequence[str]) -> list[dict[str, Any]]:
        states = (self._state(self.eval_data[client_id], client_rounds) for client_id in clients)
        return evaluate_round(self.fed, states, self.server.global_tensors, self.progress, len(clients))

    def trained_states(self, results: Sequence[FitRes]) -> list[ClientState]:
        return [self.trained[result.client_id] for result in results]

    def _state(self, data: ClientData, client_rounds: Mapping[str, int]) -> ClientState:
        """The client's state as of ``client_rounds``: trained this round (held), else as ``run_dir`` keeps it."""
        if data.client_id in self.trained:
            return self.trained[data.client_id]
        return load_state(self.fed.app, data, self.run_dir, client_rounds.get(data.client_id, 0))


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
    """Re-score a saved run: its newest intact checkpoint's global tensors plus the personal tensors as of it of
    each client the run scores (:func:`~fedlora.federated.sampling.eval_clients`), as during training.

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
    client_rounds = checkpoint.client_rounds if checkpoint else {}
    scored = set(eval_clients(config.eval, config.seed, [data.client_id for data in fed.data.clients]))
    clients = [data for data in fed.data.clients if data.client_id in scored]
    states = (load_state(fed.app, data, run, client_rounds.get(data.client_id, 0)) for data in clients)
    shared = checkpoint.global_tensors if checkpoint else fed.app.snapshot(fed.app.names["shared"])
    round_ = checkpoint.round if checkpoint else 0
    scores = evaluate_round(fed, states, shared, progress, len(clients))
    summaries = summarize(round_, scores, len(fed.data.clients))
    rows = with_round(round_, scores) + summaries
    atomic_write(
        run.inside(run.path / "eval.jsonl"), lambda tmp: tmp.write_text("".join(f"{json.dumps(row)}\n" for row in rows))
    )
    tqdm.write(format_table(f"{run.path} · {config.strategy} · after round {round_}", summaries))
    return rows


def evaluate_round(
    fed: Federation,
    states: Iterable[ClientState],
    shared: Mapping[str, Tensor],
    progress: bool = True,
    total: int | None = None,
) -> list[dict[str, Any]]:
    """The round's scores: **global**, the global model (``shared`` with the common personal values) on the pooled
    global test set, once (client :data:`GLOBAL_MODEL`); **local**, each client's model (``shared`` with its
    personal tensors) on its own test split. ``states`` is consumed one at a time (it may load each on demand);
    ``total`` is their number, for the progress bar."""
    (global_scores,) = fed.app.evaluate(None, shared, {"global": fed.data.global_test}).values()
    rows = [{"split": "global", "client": GLOBAL_MODEL, **global_scores}]
    for state in tqdm(states, total=total, desc="evaluating", leave=False, disable=not progress):
        (local,) = fed.app.evaluate(state, shared, {"local": state.data.test}).values()
        rows.append({"split": "local", "client": state.client_id, **local})
    return rows


def build_federation(config: RunConfig, app: FederatedClient) -> Federation:
    """The federation of ``app`` (a client trainer from :func:`~fedlora.federated.build.build_client`): the clients'
    data split by ``config.data``, and ``app``'s settings as the strategy sets them for that many clients."""
    data = build_federated_data(config.data, app.tokenizer)
    app.settings = app.strategy.client_settings(app.settings, len(data.clients))
    return Federation(app.strategy, app.model, app.tokenizer, data, app)


def load_state(app: FederatedClient, data: ClientData, run_dir: RunDir, last_round: int) -> ClientState:
    """``data``'s client as of ``last_round``, the last round it trained in: its initial state (0: it never trained,
    so its personal tensors have their common values) or its personal tensors and local optimizer state as
    ``run_dir`` keeps them (verified against their digests)."""
    state = app.new_state(data)
    if last_round:
        state.personal, state.optimizer_state = run_dir.load_client(data.client_id, last_round)
        state.last_round = last_round
    return state
