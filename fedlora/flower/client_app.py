"""The Flower ClientApp: one SuperNode's client, running fedlora's :class:`~fedlora.federated.client.FederatedClient`.

A SuperNode starts a fresh ClientApp process for every message, so each handler builds the node (model, adapter,
data; see :mod:`fedlora.flower.node`; a simulation worker serving many nodes builds them once per run) and reads the
client's state of the round the message names from the node's disk:

* ``query``: reply the node's client id (the server maps nodes to clients with it);
* ``train``: load the received shared tensors, run :meth:`FederatedClient.fit <fedlora.federated.client.FederatedClient.fit>`,
  write the new personal tensors and local optimizer state to the node's disk (atomically, before replying), reply
  the shared tensors and the number of training examples;
* ``evaluate``: score the client's model (the received shared tensors with the node's personal tensors) on its
  test split and, when the message asks for it and the node holds the global test set (partition nodes), the global
  model (the shared tensors with the common personal values) on it; reply the scores.

Mods: :func:`wire_log_mod` (outermost) records the record keys of every message in and out when the node config
sets ``wire-log``; :func:`privacy_mod` applies Flower's client-side DP mod the run's ``privacy.mechanism`` calls for.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import LocalDpMod, fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable
from torch import Tensor

from fedlora.federated.message import FitIns
from fedlora.flower.config import from_run_config
from fedlora.flower.node import Node, load_node
from fedlora.flower.records import (
    ARRAYS,
    CLIENT_ID,
    CONFIG,
    METRICS,
    NUM_EXAMPLES,
    ROUND,
    SCORE_GLOBAL,
    STATE_ROUND,
    to_record,
    to_tensors,
)

WIRE_LOG = "wire-log"


def wire_log_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Append one JSON line per message received and sent (time, type, round, record names and their keys; never
    values) to the file named by the node config ``wire-log``, if set."""
    path = context.node_config.get(WIRE_LOG)
    if not path:
        return call_next(msg, context)
    _log_keys(Path(str(path)), "in", msg)
    reply = call_next(msg, context)
    _log_keys(Path(str(path)), "out", reply)
    return reply


def privacy_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower's ``fixedclipping_mod`` (``privacy.mechanism=client-fixed``) or ``LocalDpMod``
    (``privacy.mechanism=local``), else nothing."""
    config, _ = from_run_config(context.run_config)
    privacy = config.privacy
    if privacy.mechanism == "client-fixed":
        return fixedclipping_mod(msg, context, call_next)
    if privacy.mechanism == "local":
        mod = LocalDpMod(privacy.clip_norm, privacy.sensitivity, privacy.epsilon, privacy.delta)
        return mod(msg, context, call_next)
    return call_next(msg, context)


app = ClientApp(mods=[wire_log_mod])


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Reply the node's client id (this also checks, before round 1, that the node's model and data load)."""
    node = _node(context)
    return Message(RecordDict({CONFIG: ConfigRecord({CLIENT_ID: node.data.client_id})}), reply_to=msg)


@app.train(mods=[privacy_mod])
def train(msg: Message, context: Context) -> Message:
    """Train the node's client for one round; reply its shared tensors (in the order received) and example count."""
    node = _node(context)
    config = msg.content.config_records[CONFIG]
    state = node.state(int(config[STATE_ROUND]))
    received = msg.content.array_records[ARRAYS]
    result = node.app.fit(state, FitIns(int(config[ROUND]), _shared(node, received)))
    if node.app.kept_names:  # else there is no state to keep
        node.kept.save(state)
    arrays = to_record({name: result.tensors[name] for name in received})
    metrics = MetricRecord({NUM_EXAMPLES: result.num_examples, **result.metrics})
    return Message(RecordDict({ARRAYS: arrays, METRICS: metrics}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Score the client's model (and if asked the global model); reply ``<split>.<metric>`` values."""
    node = _node(context)
    config = msg.content.config_records[CONFIG]
    shared = _shared(node, msg.content.array_records[ARRAYS])
    state = node.state(int(config[STATE_ROUND]))
    scores = node.app.evaluate(state, shared, {"local": node.data.test})
    if config.get(SCORE_GLOBAL) and node.global_test is not None:
        scores |= node.app.evaluate(None, shared, {"global": node.global_test})
    metrics = MetricRecord({f"{split}.{name}": value for split, row in scores.items() for name, value in row.items()})
    return Message(RecordDict({METRICS: metrics}), reply_to=msg)


def _node(context: Context) -> Node:
    config, _ = from_run_config(context.run_config)
    return load_node(config, context.node_config)


def _shared(node: Node, record: ArrayRecord) -> dict[str, Tensor]:
    """The received tensors, which must be exactly the strategy's shared tensors."""
    tensors = to_tensors(record)
    if set(tensors) != set(node.app.names["shared"]):
        raise ValueError("the server sent tensors that are not this strategy's shared tensors")
    return tensors


def _log_keys(path: Path, direction: str, msg: Message) -> None:
    entry = {
        "time": time.time(),
        "direction": direction,
        "type": msg.metadata.message_type,
        "round": msg.metadata.group_id,
    }
    if msg.has_error():
        entry["error"] = msg.error.reason
    else:
        entry["records"] = {name: sorted(record) for name, record in msg.content.items()}
    with path.open("a") as f:
        f.write(json.dumps(entry) + "\n")
