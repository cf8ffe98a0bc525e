"""A Flower strategy whose client sampling, aggregation and server optimizer are fedlora's FederatedServer.

:class:`FedLoraStrategy` implements Flower's message-based :class:`~flwr.serverapp.strategy.Strategy`, so Flower's
strategy wrappers (differential privacy, ``privacy.mechanism``) can wrap it; all the algorithm stays in
:class:`fedlora.federated.server.FederatedServer`. The arrays Flower passes to ``configure_train`` are taken as the
current global shared tensors, so whatever a wrapper did to the last aggregate (e.g. added noise) is what the
clients train from next.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from logging import INFO, WARNING
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    Strategy,
)

from fedlora.federated.config import PrivacySettings
from fedlora.federated.message import FitRes, Rejection
from fedlora.federated.report import GLOBAL_MODEL, summarize
from fedlora.federated.rounds import RoundReplies
from fedlora.federated.server import FederatedServer
from fedlora.flower.records import (
    ARRAYS,
    CONFIG,
    METRICS,
    NUM_EXAMPLES,
    ROUND,
    SCORE_GLOBAL,
    STATE_ROUND,
    to_record,
    to_tensors,
)


class FedLoraStrategy(Strategy):
    """Sends the shared tensors to the clients ``server`` samples and aggregates their replies with ``server``.

    ``nodes`` maps client ids to node ids, in client order. Every message names the round of the state its client
    starts from, ``client_rounds[client]`` (0: its initial state), which the caller sets before each
    ``configure_*``, and ``eval_clients`` (the clients to score) before ``configure_evaluate``. After each
    ``aggregate_train`` / ``aggregate_evaluate``, ``replies`` holds the round's
    :class:`~fedlora.federated.rounds.RoundReplies` and ``scores`` the per-client evaluation rows
    (``{"split", "client", <metric>: value}``, as the in-process engine writes them): Flower's strategy API returns
    only records.
    """

    def __init__(self, server: FederatedServer, nodes: Mapping[str, int]) -> None:
        self.server = server
        self.nodes = dict(nodes)
        self.clients = {node_id: client_id for client_id, node_id in nodes.items()}
        self.client_rounds: Mapping[str, int] = {}
        self.eval_clients: list[str] = list(nodes)
        self.replies = RoundReplies([], [], [])
        self.scores: list[dict[str, Any]] = []
        self._sent: list[Message] = []

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """One train message (the global shared tensors, ``config`` and the round) per sampled client."""
        self.server.global_tensors = to_tensors(arrays)
        sampled = self.server.sample(server_round, list(self.nodes))
        return self._messages(MessageType.TRAIN, server_round, arrays, config, sampled)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate the good replies with the server (which may reject some); returns the new global tensors and
        the example-weighted means of the accepted clients' training metrics.

        A sampled client whose node sent an error or no reply is a failure; failures and rejections are logged and
        count against ``server.min_clients`` (see :meth:`FederatedServer.aggregate <fedlora.federated.server.FederatedServer.
        aggregate>`, which raises when too few clients are left).
        """
        good, failures = self._split_replies(replies, server_round, "failed")
        results = []
        for client_id, reply in good:
            metrics = dict(reply.content.metric_records[METRICS])
            num_examples = int(metrics.pop(NUM_EXAMPLES))
            tensors = to_tensors(reply.content.array_records[ARRAYS])
            results.append(FitRes(client_id, tensors, num_examples, metrics))
        rejected = self.server.aggregate(results, server_round, failures=failures)
        self.replies = RoundReplies(results, rejected, failures)
        left_out = {client_id for client_id, _ in rejected}
        accepted = [r for r in results if r.client_id not in left_out]
        total = sum(r.num_examples for r in accepted)
        names = sorted({name for r in accepted for name in r.metrics})
        means = {n: sum(r.metrics.get(n, 0.0) * r.num_examples for r in accepted) / total for n in names}
        return to_record(self.server.global_tensors), MetricRecord(means)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """One evaluate message (the global shared tensors and the round) per client of ``eval_clients``; the first
        one's also asks for the global model's score on the global test set (once a round)."""
        return self._messages(MessageType.EVALUATE, server_round, arrays, config, self.eval_clients, score_global=True)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Collect the scores of every client that replied (the others are logged); returns the means over them
        (``<split>.<metric>``)."""
        self.scores = []
        good, _ = self._split_replies(replies, server_round, "was not evaluated")
        for client_id, reply in good:
            by_split: dict[str, dict[str, float]] = {}
            for key, value in reply.content.metric_records[METRICS].items():
                split, _, metric = key.partition(".")
                by_split.setdefault(split, {})[metric] = value
            self.scores += [
                {"split": split, "client": GLOBAL_MODEL if split == "global" else client_id, **by_split[split]}
                for split in sorted(by_split)
            ]
        summaries = summarize(server_round, self.scores)
        return MetricRecord({f"{s['split']}.{m}": s[m] for s in summaries for m in s if m not in ("round", "split")})

    def summary(self) -> None:
        """Log the clients and the server optimizer."""
        log(INFO, "\t├── fedlora clients: %s", ", ".join(self.nodes))
        log(INFO, "\t└── server optimizer: %s", type(self.server.optimizer).__name__)

    def _messages(
        self,
        kind: str,
        server_round: int,
        arrays: ArrayRecord,
        config: ConfigRecord,
        client_ids: list[str],
        score_global: bool = False,
    ) -> list[Message]:
        self._sent = []
        for index, cid in enumerate(client_ids):
            values = {**config, ROUND: server_round, STATE_ROUND: self.client_rounds.get(cid, 0)}
            if score_global and index == 0:
                values[SCORE_GLOBAL] = 1
            content = RecordDict({ARRAYS: arrays, CONFIG: ConfigRecord(values)})
            self._sent.append(
                Message(content, dst_node_id=self.nodes[cid], message_type=kind, group_id=str(server_round))
            )
        return self._sent

    def _split_replies(
        self, replies: Iterable[Message], server_round: int, failed: str
    ) -> tuple[list[tuple[str, Message]], list[Rejection]]:
        """The replies to the messages of the last ``configure_*`` call, in client order: ``(client id, reply)`` for
        the good ones, and the clients whose node sent an error or no reply (logged as ``failed``) with why.

        Replies are matched to clients by the message they answer: the SuperLink's error reply for a lost node
        comes from the SuperLink, so its sender cannot tell."""
        client_of = {msg.metadata.message_id: self.clients[msg.metadata.dst_node_id] for msg in self._sent}
        by_client = {client_of[reply.metadata.reply_to_message_id]: reply for reply in replies}
        good, failures = [], []
        for msg in self._sent:
            client_id = self.clients[msg.metadata.dst_node_id]
            reply = by_client.get(client_id)
            if reply is None or reply.has_error():
                reason = "no reply (node lost or round-timeout passed)" if reply is None else reply.error.reason
                log(WARNING, "round %d: client %s %s: %s", server_round, client_id, failed, reason)
                failures.append(Rejection(client_id, reason))
            else:
                good.append((client_id, reply))
        return good, failures


def with_privacy(strategy: Strategy, privacy: PrivacySettings, num_sampled: int) -> Strategy:
    """``strategy`` wrapped in Flower's central-DP wrapper for ``privacy.mechanism`` (``server-fixed`` or
    ``client-fixed``); any other mechanism leaves it as it is (``local`` runs on the nodes, ``dp-fedavg`` in the
    server)."""
    wrappers = {
        "server-fixed": DifferentialPrivacyServerSideFixedClipping,
        "client-fixed": DifferentialPrivacyClientSideFixedClipping,
    }
    if privacy.mechanism not in wrappers:
        return strategy
    return wrappers[privacy.mechanism](strategy, privacy.noise_multiplier, privacy.clip_norm, num_sampled)
