"""How fedlora's tensors and client state map onto Flower records.

Messages carry the shared tensors in one :class:`~flwr.app.ArrayRecord` (``"arrays"``), the round in a
:class:`~flwr.app.ConfigRecord` (``"config"``) and results in a :class:`~flwr.app.MetricRecord` (``"metrics"``);
this single-record layout is what Flower's DP strategy wrappers and client mods expect. A node keeps its
:class:`~fedlora.federated.client.ClientState` (personal tensors, local optimizer state, last round) in
``context.state``, which stays on the SuperNode and is never part of a message.
"""

from __future__ import annotations

import io
from collections.abc import Mapping

import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict
from torch import Tensor

from fedlora.federated.client import ClientState

ARRAYS, CONFIG, METRICS = "arrays", "config", "metrics"
ROUND = "server-round"
NUM_EXAMPLES = "num-examples"
CLIENT_ID = "client-id"
_PERSONAL, _CLIENT = "fedlora.personal", "fedlora.client"
_LAST_ROUND, _OPTIMIZER = "last-round", "optimizer"


def to_record(tensors: Mapping[str, Tensor]) -> ArrayRecord:
    """An ArrayRecord of the tensors, in their order."""
    return ArrayRecord({name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()})


def to_tensors(record: ArrayRecord) -> dict[str, Tensor]:
    """The tensors of an ArrayRecord, in its order."""
    return dict(record.to_torch_state_dict())


def save_client_state(state: ClientState, store: RecordDict) -> None:
    """Keep a client's personal tensors, local optimizer state and last round in ``store`` (``context.state``)."""
    meta = ConfigRecord({_LAST_ROUND: state.last_round})
    if state.optimizer_state is not None:
        buffer = io.BytesIO()
        torch.save(state.optimizer_state, buffer)
        meta[_OPTIMIZER] = buffer.getvalue()
    store[_PERSONAL] = to_record(state.personal)
    store[_CLIENT] = meta


def load_client_state(state: ClientState, store: RecordDict) -> None:
    """Restore into ``state`` what :func:`save_client_state` kept; a client that never trained keeps ``state``."""
    if _PERSONAL not in store.array_records:
        return
    meta = store.config_records[_CLIENT]
    state.personal = to_tensors(store.array_records[_PERSONAL])
    state.last_round = int(meta[_LAST_ROUND])
    if _OPTIMIZER in meta:
        state.optimizer_state = torch.load(io.BytesIO(meta[_OPTIMIZER]), weights_only=True)
