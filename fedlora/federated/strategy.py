"""Federated strategies: each is the same loop with its own adapter, tensor roles and two flags.

A strategy names the adapter (FedDoRA or PEFT LoRA) and gives every adapter tensor kind a role:

* ``shared``: trained by the client, sent to the server, averaged (weighted by example counts);
* ``personal``: trained by the client, never sent; each client keeps its own across rounds;
* ``frozen``: never trained, never sent (identical on every client: the common initialisation).

``two_stage`` trains personal and shared tensors in separate stages with separate optimizers (FedLoRA-Optimizer);
otherwise both are trained jointly. ``pooled`` trains one client on the union of all clients' training data.

:meth:`FederatedStrategy.with_roles` gives a strategy other roles for some tensor kinds (the run setting
``adapter.tensor_roles``), e.g. ``fedlora-opt`` with ``{"B.direction": "personal"}`` shares the A directions only.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from typing import ClassVar, Literal, Protocol

from peft import LoraConfig, PeftConfig
from torch import nn

from fedlora.tuners.feddora import PAPER_TENSOR_ROLES, FedDoRAConfig
from fedlora.tuners.feddora.config import ROLES

_KIND_PATTERNS = {
    "feddora": re.compile(r"\.feddora_(?P<factor>[AB])\.[^.]+\.(?P<part>direction|magnitude)$"),
    "lora": re.compile(r"\.lora_(?P<factor>[AB])\.[^.]+\.weight$"),
}


class AdapterShape(Protocol):
    """The adapter settings a strategy's PEFT config takes (``adapter.*`` of the run configuration)."""

    r: int
    alpha: float
    dropout: float
    target_modules: list[str]


class FederatedStrategy:
    """Base class: the adapter type, the role of each tensor kind, and the two loop flags."""

    name: ClassVar[str]
    adapter: ClassVar[Literal["feddora", "lora"]]
    roles: Mapping[str, str]  # tensor kind ("A.direction", ... or "A", "B" for LoRA) -> role; a class default
    two_stage: ClassVar[bool] = False
    pooled: ClassVar[bool] = False

    def peft_config(self, settings: AdapterShape) -> PeftConfig:
        """The PEFT config of this strategy's adapter (FedDoRA configs also record the tensor roles)."""
        modules = "all-linear" if settings.target_modules == ["all-linear"] else list(settings.target_modules)
        common = {
            "r": settings.r,
            "lora_alpha": settings.alpha,
            "lora_dropout": settings.dropout,
            "target_modules": modules,
            "task_type": "CAUSAL_LM",
        }
        if self.adapter == "feddora":
            return FedDoRAConfig(**common, tensor_roles=dict(self.roles))
        return LoraConfig(**common)

    def with_roles(self, tensor_roles: Mapping[str, str] | None) -> FederatedStrategy:
        """This strategy with the tensor kinds named in ``tensor_roles`` given those roles (the others keep this
        strategy's); ``None`` or ``{}`` is this strategy itself. The kinds must be this adapter's, the roles in
        :data:`ROLES`, and at least one tensor kind must stay trained (shared or personal); otherwise a
        ``ValueError`` names the key ``adapter.tensor_roles.<kind>``."""
        if not tensor_roles:
            return self
        for kind, role in tensor_roles.items():
            key = f"adapter.tensor_roles.{kind}"
            if kind not in self.roles:
                raise ValueError(
                    f"{key}: {kind!r} is not a tensor kind of the {self.adapter} adapter of strategy {self.name!r}; "
                    f"its kinds are {list(self.roles)}"
                )
            if role not in ROLES:
                raise ValueError(f"{key} must be one of {list(ROLES)}; got {role!r}")
        roles = {**self.roles, **tensor_roles}
        if all(role == "frozen" for role in roles.values()):
            kinds = ", ".join(f"adapter.tensor_roles.{kind}" for kind in tensor_roles)
            raise ValueError(f"{kinds}: every tensor kind would be frozen; at least one must be shared or personal")
        strategy = copy.copy(self)
        strategy.roles = roles
        return strategy

    def role(self, parameter_name: str) -> str | None:
        """The role of an adapter parameter, or None for a parameter that is not one of this adapter's tensors."""
        match = _KIND_PATTERNS[self.adapter].search(parameter_name)
        if match is None:
            return None
        return self.roles[".".join(part for part in match.groups() if part)]

    def tensor_names(self, model: nn.Module) -> dict[str, list[str]]:
        """The model's adapter parameter names by role (in model order); every role is a key."""
        names: dict[str, list[str]] = {role: [] for role in ROLES}
        for name, _ in model.named_parameters():
            role = self.role(name)
            if role is not None:
                names[role].append(name)
        if not any(names.values()):
            raise ValueError(f"strategy {self.name!r}: the model has no {self.adapter} adapter tensors")
        return names


class FedLoRAOpt(FederatedStrategy):
    """FedLoRA-Optimizer (arXiv 2510.11274): FedDoRA directions shared (trained by a global optimizer, averaged),
    magnitudes personal (trained by a local optimizer that keeps its state per client)."""

    name = "fedlora-opt"
    adapter = "feddora"
    roles = PAPER_TENSOR_ROLES
    two_stage = True


class FedIT(FederatedStrategy):
    """FedIT (Zhang et al. 2024): LoRA, FedAvg over both lora_A and lora_B."""

    name = "fedit"
    adapter = "lora"
    roles = {"A": "shared", "B": "shared"}


class FFALoRA(FederatedStrategy):
    """FFA-LoRA (Sun et al. 2024): lora_A frozen at its (common) initialisation, lora_B averaged."""

    name = "ffa-lora"
    adapter = "lora"
    roles = {"A": "frozen", "B": "shared"}


class FedSALoRA(FederatedStrategy):
    """FedSA-LoRA (Guo et al. 2025): lora_A averaged (general knowledge), lora_B kept by each client."""

    name = "fedsa-lora"
    adapter = "lora"
    roles = {"A": "shared", "B": "personal"}


class FedDoRAAvg(FederatedStrategy):
    """FedDoRA with plain FedAvg: all four tensors trained jointly and averaged."""

    name = "fed-dora"
    adapter = "feddora"
    roles = dict.fromkeys(PAPER_TENSOR_ROLES, "shared")


class Local(FederatedStrategy):
    """No communication: every client trains its own FedDoRA adapter (every tensor personal)."""

    name = "local"
    adapter = "feddora"
    roles = dict.fromkeys(PAPER_TENSOR_ROLES, "personal")


class Centralized(FederatedStrategy):
    """Upper bound: one client trains FedDoRA (all tensors jointly) on the pooled training data of all clients,
    taking as many steps per round as all clients together."""

    name = "centralized"
    adapter = "feddora"
    roles = dict.fromkeys(PAPER_TENSOR_ROLES, "shared")
    pooled = True


STRATEGIES: dict[str, FederatedStrategy] = {
    cls.name: cls() for cls in (FedLoRAOpt, FedIT, FFALoRA, FedSALoRA, FedDoRAAvg, Local, Centralized)
}
