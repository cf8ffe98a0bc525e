"""Federated strategies: each owns its pipeline, the rest of the loop is the same for all.

A strategy names the adapter (FedDoRA or PEFT LoRA) and gives every adapter tensor kind a role:

* ``shared``: trained by the client, sent to the server, averaged (weighted by example counts);
* ``personal``: trained by the client, never sent; each client keeps its own across rounds, starting from the
  common initial value (stored as values, not offsets);
* ``frozen``: never trained, never sent (identical on every client: the common initialisation).

Its pipeline (:meth:`FederatedStrategy.stages`) is the list of :class:`Stage` a client runs every round: which
tensors each stage trains (shared ones with the global optimizer, fresh every round; personal ones with the local
optimizer, whose state each client keeps) and whether the client's own personal tensors are loaded or their common
values (the global model). :meth:`~FederatedStrategy.training_clients` says which clients train.

The **global model** of every strategy is the aggregated shared tensors with the common value of every other
tensor (what ``global_adapter/`` holds); a client's **local model** adds its personal (and, for ``refined`` kinds,
its refined) tensors.

:meth:`FederatedStrategy.with_roles` gives a strategy other roles for some tensor kinds (the run setting
``adapter.tensor_roles``), e.g. ``fedlora-opt`` with ``{"B.direction": "personal"}`` shares the A directions only.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, ClassVar, Literal, Protocol

from datasets import concatenate_datasets
from peft import LoraConfig, PeftConfig
from torch import nn

from fedlora.data import ClientData
from fedlora.tuners.feddora import PAPER_TENSOR_ROLES, FedDoRAConfig
from fedlora.tuners.feddora.config import ROLES

if TYPE_CHECKING:
    from fedlora.federated.config import ClientSettings

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


@dataclass(frozen=True)
class Stage:
    """One stage of a client's round: ``steps`` batches training the tensors of the groups in ``trains``
    (``shared``: the global optimizer; ``personal`` and ``refined``: the local optimizer). With ``personal`` the
    client's own personal tensors are loaded first; without, the stage trains the global model (the personal
    tensors at their common values)."""

    name: str
    steps: int
    trains: tuple[str, ...]
    personal: bool = True


class FederatedStrategy:
    """Base class: the adapter type, the role of each tensor kind, and the pipeline (one joint stage at
    ``client.lr`` over every client's data; subclasses override :meth:`stages`, :meth:`lr` and
    :meth:`training_clients`)."""

    name: ClassVar[str]
    adapter: ClassVar[Literal["feddora", "lora"]]
    roles: Mapping[str, str]  # tensor kind ("A.direction", ... or "A", "B" for LoRA) -> role; a class default
    refined: ClassVar[tuple[str, ...]] = ()
    """Shared tensor kinds that each client also refines locally after the global stage and keeps (its values)."""

    def stages(self, settings: ClientSettings) -> list[Stage]:
        """The client's stages in a round: by default every trained tensor together for ``settings.steps``."""
        return [Stage("joint", settings.steps, ("shared", "personal"))]

    def lr(self, group: str, settings: ClientSettings) -> float:
        """The learning rate of the optimizer of tensor group ``group`` (``shared``, ``personal``, ``refined``)."""
        return settings.lr

    def training_clients(self, clients: Sequence[ClientData]) -> list[ClientData]:
        """The clients that train (by default, each client on its own data)."""
        return list(clients)

    def client_settings(self, settings: ClientSettings, num_clients: int) -> ClientSettings:
        """The client settings the trainer uses in a federation of ``num_clients`` clients (by default as given)."""
        return settings

    @property
    def trains_each_client(self) -> bool:
        """True when every client trains on its own data (so each can run on its own node)."""
        return type(self).training_clients is FederatedStrategy.training_clients

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
        """The model's adapter parameter names by role (in model order), and as ``refined`` the shared ones of the
        :attr:`refined` kinds; every role is a key."""
        names: dict[str, list[str]] = {role: [] for role in (*ROLES, "refined")}
        pattern = _KIND_PATTERNS[self.adapter]
        for name, _ in model.named_parameters():
            role = self.role(name)
            if role is not None:
                names[role].append(name)
                kind = ".".join(part for part in pattern.search(name).groups() if part)
                if role == "shared" and kind in self.refined:
                    names["refined"].append(name)
        if not any(names.values()):
            raise ValueError(f"strategy {self.name!r}: the model has no {self.adapter} adapter tensors")
        return names


class FedLoRAOpt(FederatedStrategy):
    """FedLoRA-Optimizer (arXiv 2510.11274): FedDoRA directions shared (trained by the global optimizer at
    ``client.global_lr``, averaged), magnitudes personal (trained by the local optimizer at ``client.local_lr``,
    whose state each client keeps).

    ``client.order`` picks the pipeline: ``global-then-local`` (default) trains the directions for
    ``global_steps`` under the common magnitudes (so they are trained for the global model), then the client's
    magnitudes for ``local_steps`` with the directions fixed; ``local-first`` / ``global-first`` run the same two
    stages with the client's own magnitudes loaded throughout; ``joint`` steps both optimizers on every one of
    ``local_steps + global_steps`` batches, with the client's magnitudes.
    """

    name = "fedlora-opt"
    adapter = "feddora"
    roles = PAPER_TENSOR_ROLES

    def stages(self, settings: ClientSettings) -> list[Stage]:
        local = Stage("local", settings.local_steps, ("personal", "refined"))
        if settings.order == "joint":
            return [Stage("joint", settings.local_steps + settings.global_steps, ("shared", "personal"))]
        if settings.order == "global-then-local":
            return [Stage("global", settings.global_steps, ("shared",), personal=False), local]
        global_ = Stage("global", settings.global_steps, ("shared",))
        return [local, global_] if settings.order == "local-first" else [global_, local]

    def lr(self, group: str, settings: ClientSettings) -> float:
        return settings.global_lr if group == "shared" else settings.local_lr


class FedLoRAOptSharedMagnitudes(FedLoRAOpt):
    """FedLoRA-Optimizer with the magnitudes also averaged (outside the paper's rule that only directions travel;
    it measures what that rule costs): the global stage trains all four tensors of the global model, the local
    stage then refines the magnitudes, which the client keeps for its own model (refreshed every round). Always
    global-then-local: ``client.order`` does not apply."""

    name = "fedlora-opt-shared-magnitudes"
    roles = dict.fromkeys(PAPER_TENSOR_ROLES, "shared")
    refined = ("A.magnitude", "B.magnitude")

    def stages(self, settings: ClientSettings) -> list[Stage]:
        return [
            Stage("global", settings.global_steps, ("shared",), personal=False),
            Stage("local", settings.local_steps, ("refined",)),
        ]


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

    def training_clients(self, clients: Sequence[ClientData]) -> list[ClientData]:
        return [
            ClientData.of(
                POOLED_CLIENT,
                concatenate_datasets([client.train for client in clients]),
                concatenate_datasets([client.test for client in clients]),
            )
        ]

    def client_settings(self, settings: ClientSettings, num_clients: int) -> ClientSettings:
        return replace(settings, steps=settings.steps * num_clients)  # one client does the work of all of them


POOLED_CLIENT = "pooled"
STRATEGIES: dict[str, FederatedStrategy] = {
    cls.name: cls()
    for cls in (FedLoRAOpt, FedLoRAOptSharedMagnitudes, FedIT, FFALoRA, FedSALoRA, FedDoRAAvg, Local, Centralized)
}
