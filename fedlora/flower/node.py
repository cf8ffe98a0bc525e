"""What a Flower process builds from the run configuration: the adapted model, and on a SuperNode its client's data.

The server and every node build the same freshly initialised adapter (seeded by ``config.seed`` right before the
adapter is added, as :func:`fedlora.federated.run.build_federation` does), so the personal and frozen tensors
start from the same values everywhere and the shared tensors come from the server. A node's data is either its
partition of the run's dataset (node config ``partition-id``, split with the run's partitioner and seed, so
partition N is the in-process engine's client N) or a private file only that node has (``data-path``, in the
run's ``data.source`` format, one client named ``client-id`` or the file's stem).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
from datasets import Dataset
from peft import get_peft_model
from transformers import set_seed

from fedlora.data import ClientData, build_federated_data
from fedlora.federated.client import ClientApp
from fedlora.federated.config import RunConfig
from fedlora.federated.run import data_config
from fedlora.federated.strategy import STRATEGIES
from fedlora.models import load_model_and_tokenizer

PARTITION_ID, NUM_PARTITIONS = "partition-id", "num-partitions"
DATA_PATH, CLIENT_ID, MODEL_PATH = "data-path", "client-id", "model-path"


@dataclass
class Node:
    """One SuperNode's client: the client app (model + adapter), its data, and the global test set if it has one."""

    app: ClientApp
    data: ClientData
    global_test: Dataset | None


def build_adapter(config: RunConfig, model_path: str | None = None) -> ClientApp:
    """The base model (``model_path`` or ``config.model.name``) with the strategy's seeded initial adapter."""
    dtype = getattr(torch, config.model.dtype) if config.model.dtype else None
    model, tokenizer = load_model_and_tokenizer(model_path or config.model.name, device=config.device, dtype=dtype)
    strategy = STRATEGIES[config.strategy].with_roles(config.adapter.tensor_roles)
    set_seed(config.seed)
    peft_model = get_peft_model(model, strategy.peft_config(config.adapter))
    return ClientApp(
        peft_model,
        tokenizer,
        strategy,
        config.client,
        config.eval,
        max_length=config.data.max_length,
        seed=config.seed,
        progress=False,
    )


def load_node(config: RunConfig, node_config: Mapping[str, Any]) -> Node:
    """The client of the SuperNode started with ``node_config`` (``--node-config``)."""
    app = build_adapter(config, node_config.get(MODEL_PATH))
    if DATA_PATH in node_config:
        files = replace(data_config(config), path=[str(node_config[DATA_PATH])], partition="files", num_clients=None)
        (client,) = build_federated_data(files, app.tokenizer).clients
        client_id = str(node_config.get(CLIENT_ID, client.client_id))
        return Node(app, ClientData(client_id, client.train, client.test), None)
    if PARTITION_ID not in node_config:
        raise ValueError(f'a SuperNode needs --node-config with {PARTITION_ID}=N or {DATA_PATH}="FILE"')
    data = build_federated_data(data_config(config), app.tokenizer)
    count, partition = len(data.clients), int(node_config[PARTITION_ID])
    if node_config.get(NUM_PARTITIONS, count) != count:
        raise ValueError(f"{NUM_PARTITIONS}={node_config[NUM_PARTITIONS]} but the run's data has {count} clients")
    if not 0 <= partition < count:
        raise ValueError(f"{PARTITION_ID}={partition} is not in [0, {count}) (the run's data has {count} clients)")
    return Node(app, data.clients[partition], data.global_test)
