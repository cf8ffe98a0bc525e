"""The server app: client sampling, aggregation of the clients' messages, and the global shared tensors."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from torch import Tensor

from fedlora.federated.aggregation import make_server_optimizer, weighted_average
from fedlora.federated.config import ServerSettings
from fedlora.federated.message import FitIns, FitRes


class ServerApp:
    """Holds the global shared tensors x_t and updates them from the clients' :class:`FitRes` messages.

    Each round it samples ``max(1, round(fraction · N))`` clients (seeded by the run seed and the round), sends
    them x_t, and sets x_{t+1} = server_optimizer(x_t, Δ_t) with Δ_t = Σᵢ nᵢ yᵢ / Σᵢ nᵢ − x_t, nᵢ being each
    client's number of training examples (see :mod:`fedlora.federated.aggregation`). It never sees personal
    tensors: it only ever receives messages.
    """

    def __init__(self, global_tensors: Mapping[str, Tensor], settings: ServerSettings, seed: int) -> None:
        self.global_tensors = dict(global_tensors)
        self.optimizer = make_server_optimizer(settings)
        self.fraction = settings.fraction
        self.seed = seed

    def sample(self, round_: int, client_ids: Sequence[str]) -> list[str]:
        """The clients that train in ``round_``, in the given order (a seeded draw without replacement)."""
        count = max(1, round(self.fraction * len(client_ids)))
        chosen = np.random.default_rng([self.seed, round_]).choice(len(client_ids), size=count, replace=False)
        return [client_ids[i] for i in sorted(chosen.tolist())]

    def fit_ins(self, round_: int) -> FitIns:
        """What every sampled client receives: the round and the global shared tensors."""
        return FitIns(round_, {name: tensor.clone() for name, tensor in self.global_tensors.items()})

    def aggregate(self, results: Sequence[FitRes]) -> None:
        """Average the clients' shared tensors by example count and apply the server optimizer."""
        if not results:
            raise ValueError("no client results to aggregate")
        for result in results:
            if set(result.tensors) != set(self.global_tensors):
                raise ValueError(f"client {result.client_id!r} sent tensors that are not the shared set")
        if not self.global_tensors:
            return
        average = weighted_average([r.tensors for r in results], [r.num_examples for r in results])
        delta = {name: average[name] - value for name, value in self.global_tensors.items()}
        self.global_tensors = self.optimizer.step(self.global_tensors, delta)
