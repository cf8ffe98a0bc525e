"""Configuration of the FedDoRA adapter (FedLoRA-Optimizer, arXiv 2510.11274)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from peft.config import PeftConfig

from fedlora.tuners.feddora.peft_type import FEDDORA

ROLES = ("shared", "personal", "frozen")
TENSORS = ("A.direction", "A.magnitude", "B.direction", "B.magnitude")
INIT_WEIGHTS = (True, False, "paired", "gaussian", "zero_A", "zero_B")
PAPER_TENSOR_ROLES = {
    "A.direction": "shared",
    "B.direction": "shared",
    "A.magnitude": "personal",
    "B.magnitude": "personal",
}


@dataclass
class FedDoRAConfig(PeftConfig):
    """Configuration of a FedDoRA adapter: LoRA with both factors split into magnitude and direction.

    For an adapted linear with in_features k, out_features d and rank r:
    A = V_A·diag(m_A/‖V_A‖_col) with V_A (r×k) and m_A (k,); B = V_B·diag(m_B/‖V_B‖_col) with V_B (d×r) and
    m_B (r,); y = base(x) + s·dropout(x)AᵀBᵀ with s = lora_alpha/r (lora_alpha/√r with ``use_rslora``).

    Args:
        r: Rank of the low-rank update.
        lora_alpha: Scaling numerator: s = lora_alpha / r (or lora_alpha / √r with ``use_rslora``).
        lora_dropout: Dropout probability applied to the input of the low-rank branch during training.
        target_modules: Module names (exact or suffix match), a regex string, or ``"all-linear"``. ``None``
            uses PEFT's LoRA defaults for known architectures.
        exclude_modules: Module names or a regex that must not be adapted.
        bias: ``"none"``, ``"all"`` or ``"feddora_only"``: which biases train.
        fan_in_fan_out: True when the base layer stores its weight as (in, out), as transformers' Conv1D does.
        use_rslora: Use s = lora_alpha/√r (rank-stabilised LoRA).
        modules_to_save: Extra (non-adapter) modules that are trained and saved.
        layers_to_transform: Layer indices to adapt (with ``layers_pattern`` naming the ModuleList).
        layers_pattern: Name of the layers ModuleList, used with ``layers_to_transform``.
        rank_pattern: Per-module rank overrides, ``{regex: r}``.
        alpha_pattern: Per-module lora_alpha overrides, ``{regex: alpha}``.
        init_weights: V_A and V_B start as LoRA's A (uniform on ±1/√k) and the adapted model equals the base
            model (B A = 0). ``True`` (= ``"paired"``): every tensor non-zero, so that a global model of directions
            alone can move under common magnitudes: the rank-1 components come in cancelling groups (pairs; at odd r
            the last group is a triple): within a group B's columns are equal and A's rows sum to zero (v, −v; or
            v, w, −(v + w)), and m = ‖V‖_col (A = V_A, B = V_B), so B A = 0 exactly for pairs and to rounding for
            the triple. At r = 1 no group exists and ``"paired"`` falls back to ``"zero_A"``. ``"zero_A"``: m_A = 0,
            m_B = ‖V_B‖_col (B = V_B); ``"zero_B"``: m_A = ‖V_A‖_col (A = V_A), m_B = 0 and V_B kaiming-uniform
            with its own fan-in r; ``"gaussian"``: ``"zero_A"`` with V_A ~ N(0, 1/r); ``False``: independent
            directions with m = ‖V‖_col, a nonzero update (for tests and experiments). The magnitudes' initial
            values are the common values of a federation (see ``fedlora.federated.strategy``).
        tensor_roles: For each of ``A.direction``, ``A.magnitude``, ``B.direction``, ``B.magnitude``: ``"shared"``
            (trained and averaged by the server), ``"personal"`` (trained, never leaves the client) or
            ``"frozen"`` (not trained). Defaults to the paper: directions shared, magnitudes personal.
    """

    r: int = field(default=8, metadata={"help": "Rank of the low-rank update."})
    lora_alpha: float = field(default=8, metadata={"help": "Scaling numerator: s = lora_alpha / r."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the low-rank branch's input."})
    target_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Module names, a regex, or 'all-linear'."}
    )
    exclude_modules: list[str] | str | None = field(default=None, metadata={"help": "Modules never adapted."})
    bias: Literal["none", "all", "feddora_only"] = field(default="none", metadata={"help": "Which biases train."})
    fan_in_fan_out: bool = field(default=False, metadata={"help": "Base weight stored as (in, out) (Conv1D)."})
    use_rslora: bool = field(default=False, metadata={"help": "s = lora_alpha / sqrt(r)."})
    modules_to_save: list[str] | None = field(default=None, metadata={"help": "Extra modules to train and save."})
    layers_to_transform: list[int] | int | None = field(default=None, metadata={"help": "Layer indices to adapt."})
    layers_pattern: list[str] | str | None = field(default=None, metadata={"help": "Name of the layers ModuleList."})
    rank_pattern: dict = field(default_factory=dict, metadata={"help": "Per-module rank overrides {regex: r}."})
    alpha_pattern: dict = field(default_factory=dict, metadata={"help": "Per-module alpha overrides {regex: a}."})
    init_weights: bool | Literal["gaussian", "zero_A", "zero_B"] = field(
        default=True,
        metadata={
            "help": "True/'paired': cancelling rank-1 pairs, every tensor non-zero; 'zero_A': m_A = 0; 'zero_B': "
            "m_B = 0; 'gaussian': zero_A with V_A ~ N(0, 1/r); False: BA ≠ 0."
        },
    )
    tensor_roles: dict[str, str] = field(
        default_factory=lambda: dict(PAPER_TENSOR_ROLES),
        metadata={"help": "Role of each tensor: shared (aggregated), personal (kept by the client) or frozen."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = FEDDORA
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        self._validate()

    def _validate(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"FedDoRAConfig.r must be a positive integer; got {self.r!r}.")
        for name, rank in self.rank_pattern.items():
            if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
                raise ValueError(f"FedDoRAConfig.rank_pattern[{name!r}] must be a positive integer; got {rank!r}.")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"FedDoRAConfig.lora_dropout must be in [0, 1); got {self.lora_dropout!r}.")
        if self.bias not in ("none", "all", "feddora_only"):
            raise ValueError(f"FedDoRAConfig.bias must be 'none', 'all' or 'feddora_only'; got {self.bias!r}.")
        if not isinstance(self.init_weights, bool | str) or self.init_weights not in INIT_WEIGHTS:
            raise ValueError(
                f"FedDoRAConfig.init_weights must be one of {list(INIT_WEIGHTS)}; got {self.init_weights!r}."
            )
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError("FedDoRAConfig.layers_to_transform cannot be used when target_modules is a regex string.")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("FedDoRAConfig.layers_pattern requires layers_to_transform.")
        unknown = set(self.tensor_roles) - set(TENSORS)
        missing = set(TENSORS) - set(self.tensor_roles)
        if unknown or missing:
            raise ValueError(
                f"FedDoRAConfig.tensor_roles must name exactly {list(TENSORS)}; "
                f"unknown: {sorted(unknown)}, missing: {sorted(missing)}."
            )
        bad = {tensor: role for tensor, role in self.tensor_roles.items() if role not in ROLES}
        if bad:
            raise ValueError(f"FedDoRAConfig.tensor_roles values must be one of {list(ROLES)}; got {bad}.")

    def tensors_with_role(self, role: str) -> list[str]:
        """The tensor names (``"A.direction"``, ...) whose role is ``role`` (shared, personal or frozen)."""
        if role not in ROLES:
            raise ValueError(f"Unknown tensor role {role!r}; expected one of {list(ROLES)}.")
        return [tensor for tensor in TENSORS if self.tensor_roles[tensor] == role]


def zero_factor(init_weights: bool | str, r: int) -> str | None:
    """The factor (``"A"`` or ``"B"``) that ``init_weights`` starts at zero at rank ``r``; None when neither is
    (``False``, and ``"paired"`` above rank 1)."""
    if init_weights is False or (init_weights in (True, "paired") and r > 1):
        return None
    if init_weights == "zero_B":
        return "B"
    return "A"
