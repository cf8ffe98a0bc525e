"""The round driver's transport on Flower: messages to the SuperNodes through the ServerApp's :class:`Grid`.

:class:`FlowerTransport` trains a round with the (possibly DP-wrapped) Flower strategy: ``configure_train``, then
Flower's ``Grid.send_and_receive``, then ``aggregate_train``; it scores the clients the round driver drew with
``configure_evaluate`` and ``aggregate_evaluate`` the same way. The SuperNodes keep their clients' states (see
:mod:`fedlora.flower.node`): every message names the round of the state to start from.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedlora.federated.rounds import RoundReplies, Transport
from fedlora.federated.server import FederatedServer
from fedlora.flower.records import CLIENT_ID, CONFIG, to_record, to_tensors
from fedlora.flower.strategy import FedLoraStrategy

POLL_SECONDS = 0.2


class FlowerTransport(Transport):
    """The clients behind ``fedlora`` (its node of each client) and ``strategy`` (``fedlora`` or a wrapper of it),
    reached through ``grid``; replies are awaited ``round_timeout`` seconds at most."""

    clients_keep_states = True

    def __init__(
        self, grid: Grid, fedlora: FedLoraStrategy, strategy: Strategy, server: FederatedServer, round_timeout: float
    ) -> None:
        self.grid, self.fedlora, self.strategy, self.server = grid, fedlora, strategy, server
        self.round_timeout = round_timeout
        self.clients = list(fedlora.nodes)

    def train(self, round_: int, client_rounds: Mapping[str, int]) -> RoundReplies:
        self.fedlora.client_rounds = dict(client_rounds)
        messages = self.strategy.configure_train(
            round_, to_record(self.server.global_tensors), ConfigRecord(), self.grid
        )
        aggregated, _ = self.strategy.aggregate_train(round_, self._send(messages))
        if aggregated is None:
            raise RuntimeError(f"round {round_}: the strategy did not aggregate the replies (see the log above)")
        self.server.global_tensors = to_tensors(aggregated)  # as a DP wrapper left them
        return self.fedlora.replies

    def evaluate(self, round_: int, client_rounds: Mapping[str, int], clients: Sequence[str]) -> list[dict[str, Any]]:
        self.fedlora.client_rounds = dict(client_rounds)
        self.fedlora.eval_clients = list(clients)
        arrays = to_record(self.server.global_tensors)
        messages = self.strategy.configure_evaluate(round_, arrays, ConfigRecord(), self.grid)
        self.strategy.aggregate_evaluate(round_, self._send(messages))
        return self.fedlora.scores

    def _send(self, messages: Iterable[Message]) -> list[Message]:
        return list(self.grid.send_and_receive(messages, timeout=self.round_timeout))


def wait_for_nodes(grid: Grid, count: int, timeout: float) -> list[int]:
    """The ids of the connected SuperNodes once there are at least ``count``."""
    deadline = time.monotonic() + timeout
    while len(node_ids := sorted(grid.get_node_ids())) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(node_ids)} of {count} SuperNodes connected within {timeout:.0f} s")
        time.sleep(POLL_SECONDS)
    return node_ids


def identify(grid: Grid, node_ids: Iterable[int], timeout: float) -> dict[str, int]:
    """Client id -> node id for every node, in client-id order (which is the in-process engine's client order)."""
    messages = [
        Message(RecordDict({CONFIG: ConfigRecord()}), dst_node_id=node_id, message_type=MessageType.QUERY)
        for node_id in node_ids
    ]
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    if len(replies) < len(messages):
        raise TimeoutError(f"{len(messages) - len(replies)} SuperNode(s) did not reply within {timeout:.0f} s")
    nodes: dict[str, int] = {}
    for reply in replies:
        if reply.has_error():
            raise RuntimeError(f"SuperNode {reply.metadata.src_node_id} failed: {reply.error.reason}")
        client_id = str(reply.content.config_records[CONFIG][CLIENT_ID])
        if client_id in nodes:
            raise ValueError(f"SuperNodes {nodes[client_id]} and {reply.metadata.src_node_id} both hold {client_id!r}")
        nodes[client_id] = reply.metadata.src_node_id
    return dict(sorted(nodes.items()))
