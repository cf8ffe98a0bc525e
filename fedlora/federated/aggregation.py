"""Server-side aggregation: combining the clients' updates, and the server optimizers (Reddi et al. 2021).

In round t the server holds the shared tensors x_t; client i returns y_i, trained on n_i examples, so its update is
Δᵢ = yᵢ − x_t. With ``server.clip_norm`` C each update is first scaled to L2 norm at most C, the norm taken over
all shared tensors together (the scale is one number per client, so the update keeps its direction):

    Δᵢ ← Δᵢ · min(1, C / ‖Δᵢ‖₂)

The m updates are then combined elementwise into the aggregated update Δ_t (a negated pseudo-gradient) by
``server.aggregator``:

    mean            Δ_t = Σᵢ nᵢ Δᵢ / Σᵢ nᵢ      (without clipping: x_t + Δ_t = Σᵢ nᵢ yᵢ / Σᵢ nᵢ, FedAvg's average)
    median          Δ_t = the middle of the m sorted values Δ₍₁₎ ≤ … ≤ Δ₍ₘ₎ at each coordinate,
                          (Δ₍⌊(m+1)/2⌋₎ + Δ₍⌊m/2⌋+1₎) / 2, i.e. the mean of the two middle values when m is even
    trimmed-mean    Δ_t = Σ_{j=k+1}^{m−k} Δ₍ⱼ₎ / (m − 2k) at each coordinate, k = ⌊β m⌋, β = ``server.trim_fraction``

Median and trimmed mean weigh every client alike (one vote each, whatever nᵢ): at every coordinate they stay
within the range of the honest clients' values as long as fewer than half of the clients (median) or at most k of
them (trimmed mean) are arbitrary, whereas one client can move the mean anywhere. (With k = 0 the trimmed mean is
the unweighted mean.) Client-level differential privacy replaces the mean by DP-FedAvg's noised, clipped,
unweighted one (see :mod:`fedlora.federated.privacy`).

The server optimizer with learning rate η then sets, elementwise:

    FedAvg    x_{t+1} = x_t + η Δ_t                              (η = 1 and the mean: FedAvg's average)
    FedAvgM   m_t = β m_{t−1} + Δ_t,  x_{t+1} = x_t + η m_t       (Hsu et al. 2019; m_0 = 0)
    FedAdam   m_t = β₁ m_{t−1} + (1 − β₁) Δ_t
              v_t = β₂ v_{t−1} + (1 − β₂) Δ_t²
              x_{t+1} = x_t + η m_t / (√v_t + τ)                  (m_0 = 0, v_0 = τ², no bias correction)
    FedYogi   v_t = v_{t−1} − (1 − β₂) Δ_t² sign(v_{t−1} − Δ_t²), otherwise as FedAdam

("Adaptive Federated Optimization", Reddi et al., ICLR 2021, Algorithm 2; τ bounds the adaptivity.)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from fedlora.federated.config import ServerSettings


def weighted_average(states: Sequence[Mapping[str, Tensor]], weights: Sequence[float]) -> dict[str, Tensor]:
    """Σᵢ wᵢ sᵢ / Σᵢ wᵢ per tensor name, accumulated in float64 and returned in each tensor's dtype."""
    if not states:
        raise ValueError("cannot average zero states")
    if len(states) != len(weights):
        raise ValueError(f"{len(states)} states but {len(weights)} weights")
    total = float(sum(weights))
    if total <= 0 or any(w < 0 for w in weights):
        raise ValueError(f"weights must be non-negative with a positive sum; got {list(weights)}")
    names = set(states[0])
    for state in states[1:]:
        if set(state) != names:
            raise ValueError(f"states hold different tensors: {sorted(names ^ set(state))}")
    average = {}
    for name, first in states[0].items():
        acc = sum(state[name].double() * (weight / total) for state, weight in zip(states, weights, strict=True))
        average[name] = acc.to(first.dtype)
    return average


def update_norm(update: Mapping[str, Tensor]) -> float:
    """‖Δ‖₂ over all tensors together, √(Σ Δ²) over every element of every tensor, accumulated in float64."""
    return math.sqrt(sum(float(tensor.double().square().sum()) for tensor in update.values()))


def clip_update(update: Mapping[str, Tensor], max_norm: float) -> dict[str, Tensor]:
    """Δ · min(1, C / ‖Δ‖₂) with C = ``max_norm``: the update scaled down (never up) to norm at most C."""
    norm = update_norm(update)
    scale = max_norm / norm if norm > max_norm else 1.0
    return {name: tensor * scale for name, tensor in update.items()}


def coordinate_median(updates: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """The median over clients at every coordinate (the mean of the two middle values for an even count)."""
    m = len(updates)
    return {name: (column[(m - 1) // 2] + column[m // 2]) / 2 for name, column in _sorted_columns(updates).items()}


def trimmed_mean(updates: Sequence[Mapping[str, Tensor]], trim_fraction: float) -> dict[str, Tensor]:
    """At every coordinate, the mean over clients once the k = ⌊β m⌋ smallest and k largest values are dropped."""
    if not 0 <= trim_fraction < 0.5:
        raise ValueError(f"trim_fraction must be in [0, 0.5); got {trim_fraction}")
    m = len(updates)
    k = math.floor(round(trim_fraction * m, 9))  # round: 0.29 · 100 is 28.999999999999996 in floating point
    return {name: column[k : m - k].mean(dim=0) for name, column in _sorted_columns(updates).items()}


AGGREGATORS: dict[str, Callable[[Sequence[Mapping[str, Tensor]], Sequence[float], float], dict[str, Tensor]]] = {
    "mean": lambda updates, weights, trim_fraction: weighted_average(updates, weights),
    "median": lambda updates, weights, trim_fraction: coordinate_median(updates),
    "trimmed-mean": lambda updates, weights, trim_fraction: trimmed_mean(updates, trim_fraction),
}
"""``server.aggregator`` name -> Δ_t from the updates, their weights and ``server.trim_fraction`` (module docstring)."""


def aggregate_updates(
    updates: Sequence[Mapping[str, Tensor]],
    weights: Sequence[float],
    aggregator: str = "mean",
    trim_fraction: float = 0.0,
) -> dict[str, Tensor]:
    """Δ_t from the clients' updates by ``aggregator`` (module docstring); only ``mean`` uses the ``weights``."""
    if aggregator not in AGGREGATORS:
        raise ValueError(f"unknown aggregator {aggregator!r}; choose one of {list(AGGREGATORS)}")
    return AGGREGATORS[aggregator](updates, weights, trim_fraction)


def _sorted_columns(updates: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """Per tensor name, the clients' values stacked on a new first dimension and sorted along it."""
    if not updates:
        raise ValueError("cannot aggregate zero updates")
    return {name: torch.stack([update[name] for update in updates]).sort(dim=0).values for name in updates[0]}


class ServerOptimizer:
    """FedAvg: x ← x + η Δ. Subclasses change the step direction and keep per-tensor buffers in ``state``."""

    def __init__(self, lr: float = 1.0) -> None:
        self.lr = lr
        self.state: dict[str, Tensor] = {}  # "<buffer>/<tensor name>" -> buffer

    def step(self, params: Mapping[str, Tensor], delta: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The new shared tensors x + η·direction(Δ) (the inputs are not modified)."""
        return {name: value + self.lr * self._direction(name, delta[name]) for name, value in params.items()}

    def _direction(self, name: str, delta: Tensor) -> Tensor:
        return delta

    def _buffer(self, kind: str, name: str, initial: Tensor) -> Tensor:
        return self.state.get(f"{kind}/{name}", initial)

    def state_dict(self) -> dict[str, Tensor]:
        return dict(self.state)

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        self.state = dict(state)


class FedAvgM(ServerOptimizer):
    """Server momentum: m ← β m + Δ, x ← x + η m."""

    def __init__(self, lr: float = 1.0, momentum: float = 0.9) -> None:
        super().__init__(lr)
        self.momentum = momentum

    def _direction(self, name: str, delta: Tensor) -> Tensor:
        m = self.momentum * self._buffer("m", name, torch.zeros_like(delta)) + delta
        self.state[f"m/{name}"] = m
        return m


class FedAdam(ServerOptimizer):
    """m ← β₁ m + (1 − β₁) Δ, v ← β₂ v + (1 − β₂) Δ², x ← x + η m / (√v + τ); m₀ = 0, v₀ = τ²."""

    def __init__(self, lr: float = 1e-2, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3) -> None:
        super().__init__(lr)
        self.beta1, self.beta2, self.tau = beta1, beta2, tau

    def _direction(self, name: str, delta: Tensor) -> Tensor:
        m = self.beta1 * self._buffer("m", name, torch.zeros_like(delta)) + (1 - self.beta1) * delta
        v = self._second_moment(self._buffer("v", name, torch.full_like(delta, self.tau**2)), delta.square())
        self.state[f"m/{name}"], self.state[f"v/{name}"] = m, v
        return m / (v.sqrt() + self.tau)

    def _second_moment(self, v: Tensor, delta_sq: Tensor) -> Tensor:
        return self.beta2 * v + (1 - self.beta2) * delta_sq


class FedYogi(FedAdam):
    """FedAdam with Yogi's additive second moment: v ← v − (1 − β₂) Δ² sign(v − Δ²)."""

    def _second_moment(self, v: Tensor, delta_sq: Tensor) -> Tensor:
        return v - (1 - self.beta2) * delta_sq * torch.sign(v - delta_sq)


SERVER_OPTIMIZERS: dict[str, Callable[[ServerSettings], ServerOptimizer]] = {
    "fedavg": lambda s: ServerOptimizer(s.lr),
    "fedavgm": lambda s: FedAvgM(s.lr, s.momentum),
    "fedadam": lambda s: FedAdam(s.lr, s.beta1, s.beta2, s.tau),
    "fedyogi": lambda s: FedYogi(s.lr, s.beta1, s.beta2, s.tau),
}
"""``server.optimizer`` name -> the server optimizer with the settings' hyperparameters."""


def make_server_optimizer(settings: ServerSettings) -> ServerOptimizer:
    """The server optimizer named by ``settings.optimizer`` with its hyperparameters."""
    return SERVER_OPTIMIZERS[settings.optimizer](settings)
