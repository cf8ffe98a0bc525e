"""A Flower strategy whose client sampling, aggregation and server optimizer are fedlora's ServerApp.

:class:`FedLoraStrategy` implements Flower's message-based :class:`~flwr.serverapp.strategy.Strategy`, so Flower's
strategy wrappers (differential privacy) can wrap it; all the algorithm stays in
:class:`fedlora.federated.server.ServerApp`. The arrays Flower passes to ``configure_train`` are taken as the
current global shared tensors, so whatever a wrapper did to the last aggregate (e.g. added noise) is what the
clients train from next.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from logging import INFO
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    Strategy,
)

from fedlora.federated.config import RunConfig
from fedlora.federated.message import FitRes
from fedlora.federated.report import summarize
from fedlora.federated.server import ServerApp
from fedlora.flower.config import CENTRAL_DP, FlowerSettings
from fedlora.flower.records import ARRAYS, CONFIG, METRICS, NUM_EXAMPLES, ROUND, to_record, to_tensors


class FedLoraStrategy(Strategy):
    """Sends the shared tensors to the clients ``server`` samples and aggregates their replies with ``server``.

    ``nodes`` maps client ids to node ids, in client order. After each ``aggregate_train`` / ``aggregate_evaluate``,
    ``results`` holds the round's :class:`~fedlora.federated.message.FitRes` and ``scores`` the per-client
    evaluation rows (``{"split", "client", <metric>: value}``, as the in-process engine writes them).
    """

    def __init__(self, server: ServerApp, nodes: Mapping[str, int]) -> None:
        self.server = server
        self.nodes = dict(nodes)
        self.clients = {node_id: client_id for client_id, node_id in nodes.items()}
        self.results: list[FitRes] = []
        self.scores: list[dict[str, Any]] = []

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
        """Average the replies' shared tensors by example count and apply the server optimizer."""
        self.results = []
        for reply in self._in_client_order(replies):
            metrics = dict(reply.content.metric_records[METRICS])
            num_examples = int(metrics.pop(NUM_EXAMPLES))
            tensors = to_tensors(reply.content.array_records[ARRAYS])
            self.results.append(FitRes(self.clients[reply.metadata.src_node_id], tensors, num_examples, metrics))
        self.server.aggregate(self.results)
        total = sum(r.num_examples for r in self.results)
        names = sorted({name for r in self.results for name in r.metrics})
        means = {n: sum(r.metrics.get(n, 0.0) * r.num_examples for r in self.results) / total for n in names}
        return to_record(self.server.global_tensors), MetricRecord(means)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """One evaluate message (the global shared tensors and the round) per client."""
        return self._messages(MessageType.EVALUATE, server_round, arrays, config, list(self.nodes))

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Collect every client's scores; returns the means over clients (``<split>.<metric>``)."""
        self.scores = []
        for reply in self._in_client_order(replies):
            by_split: dict[str, dict[str, float]] = {}
            for key, value in reply.content.metric_records[METRICS].items():
                split, _, metric = key.partition(".")
                by_split.setdefault(split, {})[metric] = value
            client = self.clients[reply.metadata.src_node_id]
            self.scores += [{"split": split, "client": client, **by_split[split]} for split in sorted(by_split)]
        summaries = summarize(server_round, self.scores)
        return MetricRecord({f"{s['split']}.{m}": s[m] for s in summaries for m in s if m not in ("round", "split")})

    def summary(self) -> None:
        """Log the clients and the server optimizer."""
        log(INFO, "\t├── fedlora clients: %s", ", ".join(self.nodes))
        log(INFO, "\t└── server optimizer: %s", type(self.server.optimizer).__name__)

    def _messages(
        self, kind: str, server_round: int, arrays: ArrayRecord, config: ConfigRecord, client_ids: list[str]
    ) -> list[Message]:
        content = RecordDict({ARRAYS: arrays, CONFIG: ConfigRecord({**config, ROUND: server_round})})
        return [
            Message(content, dst_node_id=self.nodes[cid], message_type=kind, group_id=str(server_round))
            for cid in client_ids
        ]

    def _in_client_order(self, replies: Iterable[Message]) -> list[Message]:
        order = {node_id: i for i, node_id in enumerate(self.nodes.values())}
        return sorted(replies, key=lambda reply: order[reply.metadata.src_node_id])


def with_privacy(strategy: Strategy, settings: FlowerSettings, num_sampled: int) -> Strategy:
    """``strategy`` wrapped in the central-DP wrapper ``settings.dp`` names (``local`` DP runs on the nodes)."""
    wrappers = {
        "server-fixed": DifferentialPrivacyServerSideFixedClipping,
        "client-fixed": DifferentialPrivacyClientSideFixedClipping,
    }
    if settings.dp not in wrappers:
        return strategy
    return wrappers[settings.dp](strategy, settings.dp_noise_multiplier, settings.dp_clipping_norm, num_sampled)


def check_privacy(config: RunConfig, settings: FlowerSettings) -> None:
    """Central DP adds noise to the new global tensors, calibrated for a plain average: it needs FedAvg."""
    if settings.dp in CENTRAL_DP and config.server.optimizer != "fedavg":
        raise ValueError(
            f"dp={settings.dp!r} calibrates its noise for an average of the clients' tensors; it needs "
            f"server.optimizer=fedavg, not {config.server.optimizer!r}"
        )
