"""Server-side aggregation: example-weighted averaging and the server optimizers (Reddi et al. 2021).

In round t the server holds the shared tensors x_t; client i returns y_i, trained on n_i examples. Then

    avg = Σᵢ nᵢ yᵢ / Σᵢ nᵢ            Δ_t = avg − x_t   (the aggregated update, a negated pseudo-gradient)

and the server optimizer with learning rate η sets, elementwise:

    FedAvg    x_{t+1} = x_t + η Δ_t                              (η = 1 gives x_{t+1} = avg)
    FedAvgM   m_t = β m_{t−1} + Δ_t,  x_{t+1} = x_t + η m_t       (Hsu et al. 2019; m_0 = 0)
    FedAdam   m_t = β₁ m_{t−1} + (1 − β₁) Δ_t
              v_t = β₂ v_{t−1} + (1 − β₂) Δ_t²
              x_{t+1} = x_t + η m_t / (√v_t + τ)                  (m_0 = 0, v_0 = τ², no bias correction)
    FedYogi   v_t = v_{t−1} − (1 − β₂) Δ_t² sign(v_{t−1} − Δ_t²), otherwise as FedAdam

("Adaptive Federated Optimization", Reddi et al., ICLR 2021, Algorithm 2; τ bounds the adaptivity.)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
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


def make_server_optimizer(settings: ServerSettings) -> ServerOptimizer:
    """The server optimizer named by ``settings.optimizer`` with its hyperparameters."""
    adaptive = {"lr": settings.lr, "beta1": settings.beta1, "beta2": settings.beta2, "tau": settings.tau}
    factories = {
        "fedavg": lambda: ServerOptimizer(settings.lr),
        "fedavgm": lambda: FedAvgM(settings.lr, settings.momentum),
        "fedadam": lambda: FedAdam(**adaptive),
        "fedyogi": lambda: FedYogi(**adaptive),
    }
    return factories[settings.optimizer]()
