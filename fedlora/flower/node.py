"""What a SuperNode builds from the run configuration: its client's trainer, data and kept states.

Every node builds its trainer with :func:`fedlora.federated.build.build_client`, as the in-process engine and the
ServerApp do, so the personal and frozen tensors start from the same values everywhere and the shared tensors
come from the server. A node's data is either its partition of the run's dataset (node config ``partition-id``,
split with the run's partitioner and seed, so partition N is the in-process engine's client N) or a private file
only that node has (``data-path``, in the run's ``data.source`` format, one client named ``client-id`` or the
file's stem).

The client's state after each round it trains (personal tensors, local optimizer state) is written to the node's
disk, atomically, under ``<state-dir>/<run>/<client>/round-<k>/`` (:class:`~fedlora.federated.rundir.storage.ClientRounds`;
``state-dir`` defaults to ``fedlora-state`` in the SuperNode's Flower home, ``<run>`` is named after the run's
``output_dir``), so a node that is killed and restarted with the same data continues with its own state: the server
names the round of the state to train or be scored from in every message.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

from datasets import Dataset

from fedlora.data import ClientData, build_federated_data
from fedlora.federated.build import build_client
from fedlora.federated.client import ClientState, FederatedClient
from fedlora.federated.config import RunConfig, config_leaves
from fedlora.federated.rundir.paths import client_dir_name
from fedlora.federated.rundir.storage import ClientRounds

PARTITION_ID, NUM_PARTITIONS = "partition-id", "num-partitions"
DATA_PATH, CLIENT_ID, MODEL_PATH, STATE_DIR = "data-path", "client-id", "model-path", "state-dir"
T = TypeVar("T")


@dataclass
class Node:
    """One SuperNode's client: the client app (model + adapter), its data, the global test set if it has one, and
    where its states are kept."""

    app: FederatedClient
    data: ClientData
    global_test: Dataset | None
    kept: ClientRounds

    def state(self, round_: int) -> ClientState:
        """The client's state after ``round_`` (0: its initial state), read from the node's disk."""
        state = self.app.new_state(self.data)
        self.kept.load(state, round_)
        return state


def load_node(config: RunConfig, node_config: Mapping[str, Any]) -> Node:
    """The client of the SuperNode started with ``node_config`` (``--node-config``)."""
    run = json.dumps(config_leaves(config), sort_keys=True, default=str)
    model_path = node_config.get(MODEL_PATH)
    app = _once_per_run(
        "client", f"{run} {model_path}", lambda: build_client(config, model_path=model_path, progress=False)
    )
    if DATA_PATH in node_config:
        files = replace(config.data, path=[str(node_config[DATA_PATH])], partition="files", num_clients=None)
        (client,) = build_federated_data(files, app.tokenizer).clients
        data, global_test = replace(client, client_id=str(node_config.get(CLIENT_ID, client.client_id))), None
    elif PARTITION_ID in node_config:
        federated = _once_per_run(
            "data", f"{run} {model_path}", lambda: build_federated_data(config.data, app.tokenizer)
        )
        count, partition = len(federated.clients), int(node_config[PARTITION_ID])
        if node_config.get(NUM_PARTITIONS, count) != count:
            raise ValueError(f"{NUM_PARTITIONS}={node_config[NUM_PARTITIONS]} but the run's data has {count} clients")
        if not 0 <= partition < count:
            raise ValueError(f"{PARTITION_ID}={partition} is not in [0, {count}) (the run's data has {count} clients)")
        data, global_test = federated.clients[partition], federated.global_test
    else:
        raise ValueError(f'a SuperNode needs --node-config with {PARTITION_ID}=N or {DATA_PATH}="FILE"')
    return Node(app, data, global_test, ClientRounds(state_dir(config, node_config, data.client_id)))


_BUILT: dict[str, tuple[str, Any]] = {}  # kind -> (run key, what this process built for that run last)


def _once_per_run(kind: str, key: str, build: Callable[[], T]) -> T:
    """``build()``, or what it returned when last called for ``kind`` in this process if that was for the same run
    (``key``). A real SuperNode starts a process per message, so this builds every time; Flower's simulation engine
    runs many virtual SuperNodes' messages in each worker process, which then builds the model and the partitioned
    data once per run, not once per message (every message loads all the tensors it trains or scores, as the
    in-process engine's one model does for every client)."""
    cached = _BUILT.get(kind)
    if cached is None or cached[0] != key:
        _BUILT[kind] = cached = (key, build())
    return cached[1]


def state_dir(config: RunConfig, node_config: Mapping[str, Any], client_id: str) -> Path:
    """Where the node keeps ``client_id``'s states for the run ``config``."""
    home = Path(os.environ.get("FLWR_HOME", Path.home() / ".flwr"))
    root = Path(str(node_config.get(STATE_DIR, home / "fedlora-state")))
    return root / client_dir_name(str(config.output_dir)) / client_dir_name(client_id)
