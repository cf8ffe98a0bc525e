"""The round driver: the loop of a federated run, the same whichever engine reaches the clients.

:func:`run_rounds` owns everything but the reaching: after round 0 (a fresh run's initial adapter, every client
scored and printed, so each run shows its improvement; its rows are committed with round 1's), each round t

1. trains the sampled clients and aggregates their replies into the new global shared tensors
   x_{t+1} = server_optimizer(x_t, Δ_t) (:meth:`Transport.train`);
2. adds one ``train`` row per sampled client and, with differential privacy, the ε spent so far at δ;
3. every ``eval.every`` rounds and after the last, scores the global model (x_{t+1} with the common personal
   values: what ``global_adapter/`` holds) on the global test set once, and the model of each scored client
   (x_{t+1} with its personal tensors) on its own test split, and prints the round's table; the scored clients are
   one seeded sample drawn once per run (:func:`~fedlora.federated.sampling.eval_clients`; all by default);
4. commits the round: the metrics rows, the plot, the trained clients' states (where the run directory keeps
   them) and the checkpoint (global tensors, server optimizer, each client's last round, RNG states);
5. publishes ``global_adapter/``: the global model.

A :class:`Transport` reaches the clients: :class:`fedlora.federated.run.InProcess` calls them in this process,
:class:`fedlora.flower.transport.FlowerTransport` sends Flower messages to SuperNodes, which keep their clients'
states on their own disks.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from fedlora.federated.client import ClientState, FederatedClient
from fedlora.federated.config import RunConfig, save_config
from fedlora.federated.message import FitRes, Rejection
from fedlora.federated.report import format_table, plot_scores, privacy_rows, round_title, summarize, train_rows
from fedlora.federated.rundir.adapter import publish_adapter, run_bytes
from fedlora.federated.rundir.opening import check_clients
from fedlora.federated.rundir.storage import (
    Checkpoint,
    RunDir,
    atomic_write,
    check_free_space,
    rng_state,
    set_rng_state,
)
from fedlora.federated.sampling import eval_clients
from fedlora.federated.server import FederatedServer


@dataclass
class RoundReplies:
    """What one round of training gave: the sampled clients' results (rejected ones included), the rejections among
    them and the clients whose fit failed, each with why."""

    results: list[FitRes]
    rejected: list[Rejection]
    failures: list[Rejection]

    @property
    def sampled(self) -> int:
        return len(self.results) + len(self.failures)


class Transport:
    """How the driver reaches the clients; ``clients`` are the ids of those that train, in client order, and
    :attr:`eval_clients` those that can be scored.

    ``client_rounds`` maps each client to the last round it trained in (absent: never): as of the round before for
    :meth:`train`, as of this round for :meth:`evaluate`; the state a client trains or is scored from, which the
    transport reads (from the run directory, or its nodes' disks) when it needs it. ``clients_keep_states``: the
    clients keep their own states (the checkpoint then only records their rounds).
    """

    clients: list[str]
    clients_keep_states = False

    def train(self, round_: int, client_rounds: Mapping[str, int]) -> RoundReplies:
        """Sample, train and aggregate round ``round_``: the server's global tensors become x_{t+1}."""
        raise NotImplementedError

    @property
    def eval_clients(self) -> list[str]:
        """The ids of the clients that can be scored on their own test split, in client order: those that train."""
        return self.clients

    def evaluate(self, round_: int, client_rounds: Mapping[str, int], clients: Sequence[str]) -> list[dict[str, Any]]:
        """The global model's score on the global test set and that of each of ``clients`` (among
        :attr:`eval_clients`) on its own test split, with the server's global tensors: ``{"split", "client",
        <metric>: value}`` rows."""
        raise NotImplementedError

    def trained_states(self, results: Sequence[FitRes]) -> list[ClientState]:
        """The states of the clients that sent ``results``, for the run directory to keep (none: they keep them)."""
        return []


def run_rounds(
    config: RunConfig,
    run_dir: RunDir,
    checkpoint: Checkpoint | None,
    server: FederatedServer,
    client: FederatedClient,
    transport: Transport,
    *,
    heading: str,
    progress: bool = True,
) -> Path:
    """Run rounds ``checkpoint.round + 1`` (or 1) to ``config.rounds`` of the run in ``run_dir``; returns its path.

    ``client`` is this process's model with the run's initial adapter: it gives the tensor names, the common
    personal values that ``global_adapter/`` holds, and the run's size on disk. ``heading`` is printed first.
    """
    client_ids = transport.clients
    check_clients(config, client_ids)  # each its own state directory; server.min_clients not above their number
    check_free_space(run_dir.path, run_bytes(client, len(client_ids), config.rounds))
    run_dir.path.mkdir(parents=True, exist_ok=True)  # only now that the model and data loaded
    atomic_write(run_dir.inside(run_dir.config), lambda tmp: save_config(config, tmp))
    run_dir.write_client_names(client_ids)
    persisted = bool(client.kept_names)  # only clients that keep tensors have state to keep
    client_rounds: dict[str, int] = {}
    if checkpoint is not None:
        server.global_tensors = checkpoint.global_tensors
        server.optimizer.load_state_dict(checkpoint.server_optimizer)
        set_rng_state(checkpoint.rng)
        client_rounds = dict(checkpoint.client_rounds)
    publish_adapter(client, server.global_tensors, run_dir)  # also repairs one a crash left stale
    plot_scores(run_dir.read_metrics(), run_dir.inside(run_dir.plot))
    start = checkpoint.round if checkpoint else 0
    scored = eval_clients(config.eval, config.seed, transport.eval_clients)
    population = len(transport.eval_clients)
    tqdm.write(
        f"{heading}, rounds {start + 1}..{config.rounds}, scoring {len(scored)} of {population} clients, "
        f"run dir {run_dir.path}"
    )
    rows = []
    if start == 0:
        started = time.perf_counter()
        scores = transport.evaluate(0, client_rounds, scored)
        summaries = summarize(0, scores, population)
        title = f"round 0/{config.rounds} · {config.strategy} · initial adapter · {time.perf_counter() - started:.1f} s"
        tqdm.write(format_table(title, summaries))
        rows = with_round(0, scores) + summaries

    for round_ in tqdm(range(start + 1, config.rounds + 1), desc="rounds", disable=not progress):
        started = time.perf_counter()
        replies = transport.train(round_, client_rounds)
        if persisted:
            client_rounds.update(dict.fromkeys((result.client_id for result in replies.results), round_))
        rows += train_rows(round_, replies.results, replies.rejected, replies.failures)
        epsilon = server.epsilon(round_, len(client_ids)) if server.privacy else None  # nothing to restore
        rows += privacy_rows(round_, epsilon, config.privacy.delta)
        evaluated = round_ % config.eval.every == 0 or round_ == config.rounds
        if evaluated:
            scores = transport.evaluate(round_, client_rounds, scored)
            summaries = summarize(round_, scores, population)
            rows += with_round(round_, scores) + summaries
            seconds = time.perf_counter() - started
            title = round_title(round_, rows, config.rounds, config.strategy, replies.sampled, seconds)
            tqdm.write(format_table(title, summaries))
        with run_dir.committing(round_):  # a failed write (a full disk) names the round the run dir still holds
            run_dir.append_metrics(rows)
            if evaluated:
                plot_scores(run_dir.read_metrics(), run_dir.inside(run_dir.plot))
            checkpoint = Checkpoint(
                round=round_,
                global_tensors=server.global_tensors,
                server_optimizer=server.optimizer.state_dict(),
                client_rounds=dict(client_rounds),
                metrics_bytes=run_dir.metrics.stat().st_size,
                rng=rng_state(),
                clients_keep_states=transport.clients_keep_states,
            )
            run_dir.commit_round(checkpoint, transport.trained_states(replies.results) if persisted else [])
            publish_adapter(client, server.global_tensors, run_dir)
        rows = []
    return run_dir.path


def with_round(round_: int, rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """``rows``, each led by ``"round": round_``."""
    return [{"round": round_, **row} for row in rows]
