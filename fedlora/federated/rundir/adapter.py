"""What the run directory holds of the model: ``global_adapter/`` (the global model, published after every round)
and the size on disk of a run of this adapter."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor

from fedlora.federated.client import FederatedClient
from fedlora.federated.rundir.storage import RunDir, atomic_dir, estimate_run_bytes


def publish_adapter(client: FederatedClient, shared: Mapping[str, Tensor], run: RunDir) -> None:
    """Write ``global_adapter/``: the global model, the global shared tensors with the common personal (and frozen)
    values."""
    client.load_model(shared)
    with atomic_dir(run.inside(run.global_adapter)) as tmp:
        client.model.save_pretrained(tmp, save_embedding_layers=False)  # no hub lookup: adapters only


def run_bytes(client: FederatedClient, clients: int, rounds: int) -> int:
    """:func:`~fedlora.federated.rundir.storage.estimate_run_bytes` for this adapter's tensors, ``clients`` and ``rounds``."""
    params = dict(client.model.named_parameters())

    def size(names: Sequence[str]) -> int:
        return sum(params[n].numel() * params[n].element_size() for n in names)

    adapter = sum(size(client.names[role]) for role in ("shared", "personal", "frozen"))
    return estimate_run_bytes(
        shared=size(client.names["shared"]),
        personal=size(client.kept_names),
        adapter=adapter,
        clients=clients,
        rounds=rounds,
    )
