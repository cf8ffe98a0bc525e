"""The messages exchanged between server and clients: explicit dicts of tensors plus counts and metrics.

Only these objects cross the client/server boundary, so what a strategy communicates is exactly the key set of
``FitIns.tensors`` and ``FitRes.tensors``: the shared adapter tensors, never personal or frozen ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from torch import Tensor


@dataclass(frozen=True)
class FitIns:
    """Server → client: the round number and the current global shared tensors."""

    round: int
    tensors: dict[str, Tensor]


@dataclass(frozen=True)
class FitRes:
    """Client → server after local training: its shared tensors, its training-set size (the averaging weight)
    and its training metrics."""

    client_id: str
    tensors: dict[str, Tensor]
    num_examples: int
    metrics: dict[str, float]


class Rejection(NamedTuple):
    """A sampled client left out of a round's aggregate, and why: its fit raised, or its :class:`FitRes` failed
    the server's checks (missing or extra tensors, wrong shape or dtype, NaN/Inf, an absurd update norm)."""

    client_id: str
    reason: str
