"""FedDoRA on bitsandbytes' quantized linears (QLoRA-style bases): ``Linear8bitLt`` and ``Linear4bit``.

The branch s·dropout(x) Aᵀ Bᵀ is the same op as on a dense base: it reads x and the base layer's output, never the
base weight, so it needs no dequantized weight. Merging is PEFT LoRA's for these layers: dequantize the weight, add
(or subtract) ΔW = s·B A, quantize the result again; merged outputs therefore differ from unmerged ones by that
rounding, and unmerging does not restore the original quantized weight exactly.
"""

from __future__ import annotations

import warnings
from typing import Any

import bitsandbytes as bnb
import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.integrations import dequantize_bnb_weight
from torch import nn

from fedlora.tuners.feddora.config import FedDoRAConfig
from fedlora.tuners.feddora.layer import Linear

_REQUANTIZE_WARNING = (
    "Merging FedDoRA into (or out of) a {} base layer re-quantizes its weight: outputs may differ by rounding."
)


class Linear8bitLt(Linear):
    """FedDoRA around a ``bnb.nn.Linear8bitLt`` (int8 weight, one scale per output row)."""

    def _base_weight(self) -> torch.Tensor:
        base = self.get_base_layer()
        return dequantize_bnb_weight(base.weight, state=base.state)

    def _set_base_weight(self, weight: torch.Tensor) -> None:
        warnings.warn(_REQUANTIZE_WARNING.format("8-bit"), stacklevel=3)
        base = self.get_base_layer()
        old = base.weight
        base.weight = bnb.nn.Int8Params(
            weight.to("cpu"), requires_grad=False, has_fp16_weights=old.has_fp16_weights
        ).to(old.device)
        base.state.reset_grads()


class Linear4bit(Linear):
    """FedDoRA around a ``bnb.nn.Linear4bit`` (NF4/FP4 weight in blocks, QLoRA's base)."""

    def _base_weight(self) -> torch.Tensor:
        weight = self.get_base_layer().weight
        if getattr(weight.quant_state, "packing_format_for_cpu", False):
            # bitsandbytes repacks the weight at its first CPU inference call (on AVX512-BF16 CPUs) into a layout
            # dequantize_4bit does not read; restore the standard one first, as its own state-dict saving does.
            weight.data, weight.quant_state = bnb.functional._convert_weight_packed_for_cpu_inverse(
                weight.data, weight.quant_state
            )
        return dequantize_bnb_weight(weight, state=weight.quant_state)

    def _set_base_weight(self, weight: torch.Tensor) -> None:
        warnings.warn(_REQUANTIZE_WARNING.format("4-bit"), stacklevel=3)
        base = self.get_base_layer()
        old = base.weight
        # The quantization settings (block size, quant type, storage, ...) of the old weight; a fresh quant state.
        settings = {k: v for k, v in old.__dict__.items() if not k.startswith("_") and k not in ("data", "quant_state")}
        settings.update(requires_grad=False, bnb_quantized=False)
        base.weight = bnb.nn.Params4bit(weight.to("cpu"), **settings).to(old.device)


def dispatch_bnb(target: nn.Module, adapter_name: str, config: FedDoRAConfig, **kwargs: Any) -> Linear | None:
    """The FedDoRA layer for a bitsandbytes ``Linear8bitLt`` or ``Linear4bit`` base; None for other bases."""
    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    for base_type, layer_type in ((bnb.nn.Linear8bitLt, Linear8bitLt), (bnb.nn.Linear4bit, Linear4bit)):
        if isinstance(base, base_type):
            return layer_type(target, adapter_name, config=config, **kwargs)
    return None
