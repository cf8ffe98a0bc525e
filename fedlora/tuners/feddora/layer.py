"""FedDoRA tuner layers: the magnitude/direction split of both LoRA factors on nn.Linear and Conv1D (bnb.py: on
bitsandbytes' quantized linears)."""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn
from transformers.pytorch_utils import Conv1D

from fedlora.tuners.feddora.config import FedDoRAConfig, zero_factor
from fedlora_kernels import column_norm, feddora_delta_weight, feddora_lora


class MagnitudeDirection(nn.Module):
    """One factor F = V·diag(m/‖V‖_col) stored as its ``direction`` V (rows×cols) and ``magnitude`` m (cols,).

    With a single row (V_A at r = 1, V_B at out_features = 1) every column of V is one entry v, and
    v/‖v‖ = v/sqrt(v² + NORM_EPS) is sign(v) up to NORM_EPS/v²: F = sign(V)·m, whose derivative in v,
    m·NORM_EPS/(v² + NORM_EPS)^(3/2), is ~4e-11·m at |v| = 0.3 (0 in float32). V cannot move F, except by flipping
    a sign as v crosses 0, yet Adam, which normalises gradients, would step it by ~lr. Such a direction is
    ``fixed``: a buffer, saved and loaded with the adapter but no parameter, so it is never trained and in no
    tensor-role set (shared or personal); m alone carries the factor, which loses nothing, since every F of that
    shape is sign(V)·m for some m.
    """

    def __init__(self, rows: int, cols: int) -> None:
        super().__init__()
        direction = torch.empty(rows, cols)
        if rows == 1:
            self.register_buffer("direction", direction)
        else:
            self.direction = nn.Parameter(direction)
        self.magnitude = nn.Parameter(torch.empty(cols))

    @property
    def fixed(self) -> bool:
        """True when V has a single row, so it is a buffer (see the class docstring)."""
        return not isinstance(self.direction, nn.Parameter)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(V, m) in m's dtype: PEFT's adapter-dtype autocast upcasts parameters only, not a fixed V."""
        return self.direction.to(self.magnitude.dtype), self.magnitude

    def reset(self, fan_in: int, gaussian: bool, magnitude_from_norm: bool, groups: str | None = None) -> None:
        """Initialise V uniform on ±1/√fan_in (kaiming-uniform with a = √5, LoRA's A init when fan_in is the layer's
        in_features) or, if ``gaussian``, N(0, 1/rows); and m to ‖V‖_col (the factor equals V) or 0 (it is 0).

        ``groups`` ties the rank-1 components into the cancelling groups of ``init_weights="paired"`` (see
        :func:`cancelling_groups`): ``"sum_zero"`` makes V_A's rows of each group sum to zero, ``"equal"`` makes
        V_B's columns of each group equal."""
        with torch.no_grad():
            if gaussian:
                nn.init.normal_(self.direction, std=1 / self.direction.shape[0])
            else:
                nn.init.uniform_(self.direction, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))
            rank_dim = 0 if groups == "sum_zero" else 1
            for group in cancelling_groups(self.direction.shape[rank_dim]) if groups else ():
                ranks = self.direction.narrow(rank_dim, group[0], len(group))
                if groups == "equal":
                    ranks.copy_(ranks[:, :1].clone().expand_as(ranks))
                else:  # the last row of a group is minus the sum of the others
                    ranks[-1].copy_(-ranks[:-1].sum(dim=0))
            if magnitude_from_norm:
                self.magnitude.copy_(column_norm(self.direction))
            else:
                self.magnitude.zero_()

    def extra_repr(self) -> str:
        rows, cols = self.direction.shape
        return f"direction={rows}×{cols}{' (fixed)' if self.fixed else ''}, magnitude={cols}"


def cancelling_groups(r: int) -> list[range]:
    """The rank-1 components of ``init_weights="paired"`` in groups: pairs, the last a triple at odd r (none at
    r = 1)."""
    starts = list(range(0, r - 1, 2))
    if r % 2 and starts:
        starts.pop()
    return [range(start, start + 2) for start in starts] + ([range(r - 3, r)] if r % 2 and r > 1 else [])


class FedDoRALayer(BaseTunerLayer):
    """Holds, per adapter name, ``feddora_A[name]`` (V_A r×k, m_A k) and ``feddora_B[name]`` (V_B d×r, m_B r).

    Any r ≥ 1 is accepted, as PEFT LoRA does: with r > min(k, d) the update s·B A still has rank at most
    min(k, d). At r = 1 V_A, and at d = 1 V_B, is fixed (see :class:`MagnitudeDirection`).
    """

    adapter_layer_names = ("feddora_A", "feddora_B")
    other_param_names = ("r", "lora_alpha", "scaling", "dropout_p", "frozen_tensors")

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.dropout_p: dict[str, float] = {}
        self.frozen_tensors: dict[str, list[str]] = {}
        self.feddora_A = nn.ModuleDict({})
        self.feddora_B = nn.ModuleDict({})
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.kwargs = kwargs

        base = self.get_base_layer()
        if isinstance(base, nn.Linear):
            self.in_features, self.out_features = base.in_features, base.out_features
        elif isinstance(base, Conv1D):
            self.in_features, self.out_features = base.weight.shape
        else:
            raise TypeError(f"FedDoRA supports nn.Linear and transformers Conv1D base layers, got {type(base)}.")

    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, config: FedDoRAConfig) -> None:
        """Create (or re-create) adapter ``adapter_name`` with rank ``r`` on this layer."""
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.scaling[adapter_name] = lora_alpha / (math.sqrt(r) if config.use_rslora else r)
        self.dropout_p[adapter_name] = config.lora_dropout
        self.frozen_tensors[adapter_name] = config.tensors_with_role("frozen")
        self.feddora_A[adapter_name] = MagnitudeDirection(r, self.in_features)
        self.feddora_B[adapter_name] = MagnitudeDirection(self.out_features, r)
        self.reset_feddora_parameters(adapter_name, config.init_weights)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def reset_feddora_parameters(self, adapter_name: str, init_weights: bool | str) -> None:
        """The start ``init_weights`` names (see ``FedDoRAConfig``): V_A and V_B drawn as LoRA's A (fan-in k),
        except V_B under ``zero_B``, which keeps its own fan-in r; B A = 0 through cancelling groups of rank-1
        components (``paired``) or one factor's zero magnitude."""
        r = self.r[adapter_name]
        zero = zero_factor(init_weights, r)
        paired = init_weights in (True, "paired") and zero is None
        a, b = self.feddora_A[adapter_name], self.feddora_B[adapter_name]
        a.reset(self.in_features, init_weights == "gaussian", zero != "A", groups="sum_zero" if paired else None)
        fan_in_b = r if zero == "B" else self.in_features
        b.reset(fan_in_b, False, zero != "B", groups="equal" if paired else None)

    def _freeze_non_trainable_peft_weights(self, adapter_names: str | list[str] | None = None) -> None:
        """Keep the tensors whose configured role is ``frozen`` out of training, whatever set_adapter enabled."""
        if adapter_names is None:
            adapter_names = list(self.frozen_tensors)
        elif isinstance(adapter_names, str):
            adapter_names = [adapter_names]
        for adapter_name in adapter_names:
            for tensor in self.frozen_tensors.get(adapter_name, ()):
                factor, param = tensor.split(".")
                module_dict = getattr(self, f"feddora_{factor}")
                if adapter_name in module_dict:
                    getattr(module_dict[adapter_name], param).requires_grad_(False)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """ΔW = s·B A in the base weight's layout ((d, k), or (k, d) for fan_in_fan_out)."""
        a, b = self.feddora_A[adapter_name], self.feddora_B[adapter_name]
        delta = feddora_delta_weight(*a.tensors(), *b.tensors(), self.scaling[adapter_name])
        return delta.T if self.fan_in_fan_out else delta


class Linear(nn.Module, FedDoRALayer):
    """FedDoRA around an ``nn.Linear`` or a transformers ``Conv1D`` (``fan_in_fan_out=True``)."""

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        config: FedDoRAConfig,
        r: int,
        lora_alpha: float,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        FedDoRALayer.__init__(self, base_layer, **kwargs)
        self.fan_in_fan_out = config.fan_in_fan_out
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha, config)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Add s·B A of each given (default: active) adapter to the base weight."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        for adapter_name in adapter_names:
            if adapter_name not in self.feddora_A:
                continue
            with torch.no_grad():
                merged = self._shifted_base_weight(adapter_name, 1)
                if safe_merge and not torch.isfinite(merged).all():
                    raise ValueError(f"NaNs detected in the merged weights; adapter {adapter_name!r} seems broken.")
                self._set_base_weight(merged)
            self.merged_adapters.append(adapter_name)

    def unmerge(self) -> None:
        """Subtract every merged adapter's s·B A from the base weight again (last merged first)."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        while self.merged_adapters:
            adapter_name = self.merged_adapters.pop()
            if adapter_name in self.feddora_A:
                with torch.no_grad():
                    self._set_base_weight(self._shifted_base_weight(adapter_name, -1))

    def _shifted_base_weight(self, adapter_name: str, sign: int) -> torch.Tensor:
        """The base weight plus ``sign`` times the adapter's ΔW, in the base weight's (dense) dtype."""
        weight = self._base_weight()
        return weight + sign * self.get_delta_weight(adapter_name).to(weight.dtype)

    def _base_weight(self) -> torch.Tensor:
        """The base layer's weight as a dense tensor in its layout (quantized layers dequantize it)."""
        return self.get_base_layer().weight.data

    def _set_base_weight(self, weight: torch.Tensor) -> None:
        """Make ``weight`` (dense, the base layout) the base layer's weight (quantized layers requantize it)."""
        self.get_base_layer().weight.data = weight

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """base(x) + Σ over active adapters of s·dropout(x) Aᵀ Bᵀ (unless disabled or merged)."""
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        for adapter_name in self.active_adapters:
            if adapter_name not in self.feddora_A:
                continue
            a, b = self.feddora_A[adapter_name], self.feddora_B[adapter_name]
            result = feddora_lora(
                self._cast_input_dtype(x, a.magnitude.dtype),
                *a.tensors(),
                *b.tensors(),
                self.scaling[adapter_name],
                dropout_p=self.dropout_p[adapter_name] if self.training else 0.0,
                base_out=result,
            )
        return result

    def __repr__(self) -> str:
        return "feddora." + super().__repr__()


def dispatch_default(target: nn.Module, adapter_name: str, config: FedDoRAConfig, **kwargs: Any) -> Linear | None:
    """A :class:`Linear` for an ``nn.Linear`` or ``Conv1D`` base; None for other bases."""
    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    if not isinstance(base, nn.Linear | Conv1D):
        return None
    return Linear(target, adapter_name, config=config, **kwargs)
