"""FedDoRAModel: injects FedDoRA layers into a transformers (or any torch) model, PEFT-style."""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from peft.utils.other import get_pattern_key
from torch import nn
from transformers.pytorch_utils import Conv1D

from fedlora.tuners.feddora.config import FedDoRAConfig
from fedlora.tuners.feddora.layer import FedDoRALayer, MagnitudeDirection, dispatch_default
from fedlora_kernels import column_norm, effective_factors

logger = logging.getLogger(__name__)


class FedDoRAModel(BaseTuner):
    """Creates a FedDoRA model from a pretrained model (use ``peft.get_peft_model`` with a ``FedDoRAConfig``).

    Every targeted ``nn.Linear``/``Conv1D`` becomes a :class:`~fedlora.tuners.feddora.layer.Linear`, and every
    bitsandbytes ``Linear8bitLt``/``Linear4bit`` one of :mod:`fedlora.tuners.feddora.bnb`'s subclasses of it, whose
    adapter tensors are named ``<module>.feddora_A.<adapter>.direction|magnitude`` and
    ``<module>.feddora_B.<adapter>.direction|magnitude``. Targets default to PEFT's LoRA targets.
    """

    prefix: str = "feddora_"
    tuner_layer_cls = FedDoRALayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    def _create_and_replace(
        self,
        config: FedDoRAConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs: Any,
    ) -> None:
        if current_key is None:
            raise ValueError("current_key must not be None.")
        r = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), current_key), config.r)
        alpha_key = get_pattern_key(config.alpha_pattern.keys(), current_key)
        lora_alpha = config.alpha_pattern.get(alpha_key, config.lora_alpha)
        if isinstance(target, FedDoRALayer):
            target.update_layer(adapter_name, r, lora_alpha, config)
            _report_rank(target, adapter_name, current_key, vars(self).setdefault("_reported", set()))
            return
        new_module = self._create_new_module(config, adapter_name, target, current_key, r=r, lora_alpha=lora_alpha)
        _report_rank(new_module, adapter_name, current_key, vars(self).setdefault("_reported", set()))
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        """Put ``new_module`` in place of ``child``. BaseTuner's version also moves a new module around a
        bitsandbytes 8-bit base wholly to the base's device, which fails for the meta-device adapter of a
        ``low_cpu_mem_usage`` load; PEFT LoRA overrides it too. ``update_layer`` already put the adapter there."""
        setattr(parent, child_name, new_module)

    def add_weighted_adapter(
        self, adapters: Sequence[str], weights: Sequence[float], adapter_name: str, combination_type: str = "cat"
    ) -> None:
        """Add adapter ``adapter_name`` whose update is, in every layer, exactly Σᵢ weights[i]·ΔWᵢ of ``adapters``.

        Only ``combination_type="cat"`` (PEFT LoRA's exact type): the ranks are concatenated, so the new rank is
        their sum (each adapter's largest ``rank_pattern`` rank; a layer where an adapter is smaller or absent keeps
        zeros in its place). A stacks wᵢ·sᵢ·Aᵢ, B places the Bᵢ side by side, and the new scaling is 1
        (``lora_alpha = r``, no rsLoRA), so s·B·A = Σᵢ wᵢ·sᵢ·Bᵢ·Aᵢ. Each factor is stored as its own direction with its
        column norms as magnitude, which gives back exactly that factor. Other types raise ``NotImplementedError``.
        """
        if combination_type != "cat":
            raise NotImplementedError(
                f"FedDoRA's add_weighted_adapter supports combination_type='cat' only, not {combination_type!r}"
            )
        unknown = [adapter for adapter in adapters if adapter not in self.peft_config]
        if unknown or not adapters:
            raise ValueError(
                f"no adapters {list(unknown or adapters)} to combine; the model has {list(self.peft_config)}"
            )
        if len(weights) != len(adapters):
            raise ValueError(f"{len(adapters)} adapters but {len(weights)} weights")
        if adapter_name in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} already exists")
        configs = [self.peft_config[adapter] for adapter in adapters]
        ranks = [max([config.r, *config.rank_pattern.values()]) for config in configs]
        self.peft_config[adapter_name] = replace(
            configs[0],
            r=sum(ranks),
            lora_alpha=sum(ranks),
            use_rslora=False,
            target_modules=_combined_targets([config.target_modules for config in configs]),
            rank_pattern={},
            alpha_pattern={},
        )
        self.inject_adapter(self.model, adapter_name)
        for layer in self.model.modules():
            if isinstance(layer, FedDoRALayer) and adapter_name in layer.feddora_A:
                _concatenate(layer, adapters, weights, ranks, adapter_name)

    @staticmethod
    def _create_new_module(
        config: FedDoRAConfig, adapter_name: str, target: nn.Module, current_key: str, **kwargs: Any
    ) -> nn.Module:
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if isinstance(base, Conv1D) and not config.fan_in_fan_out:
            warnings.warn("fan_in_fan_out is False but the target is a Conv1D; setting it to True.", stacklevel=2)
            config.fan_in_fan_out = True
        elif isinstance(base, nn.Linear) and config.fan_in_fan_out:
            warnings.warn("fan_in_fan_out is True but the target is an nn.Linear; setting it to False.", stacklevel=2)
            config.fan_in_fan_out = False
        for dispatch in _dispatchers():
            new_module = dispatch(target, adapter_name, config, **kwargs)
            if new_module is not None:
                return new_module
        raise TypeError(
            f"FedDoRA cannot adapt module {current_key!r} of type {type(base).__name__}: only torch.nn.Linear, "
            "transformers' Conv1D and bitsandbytes' Linear8bitLt and Linear4bit are supported."
        )


def _dispatchers() -> list[Callable[..., nn.Module | None]]:
    """Layer constructors tried in order, the first that returns a layer wins (as in PEFT LoRA): bitsandbytes'
    quantized linears before the dense ones they subclass. A model can hold bitsandbytes layers only once
    bitsandbytes is imported, so until then it is not imported here either (it takes seconds)."""
    if "bitsandbytes" not in sys.modules:
        return [dispatch_default]
    from fedlora.tuners.feddora.bnb import dispatch_bnb

    return [dispatch_bnb, dispatch_default]


def _concatenate(
    layer: FedDoRALayer, adapters: Sequence[str], weights: Sequence[float], ranks: Sequence[int], target: str
) -> None:
    """Set ``layer``'s adapter ``target`` to the rank concatenation of ``adapters`` (see ``add_weighted_adapter``)."""
    new_a, new_b = layer.feddora_A[target], layer.feddora_B[target]
    a_cat = torch.zeros(new_a.direction.shape, dtype=torch.float32, device=new_a.direction.device)
    b_cat = torch.zeros(new_b.direction.shape, dtype=torch.float32, device=new_b.direction.device)
    offset = 0
    for adapter, weight, rank in zip(adapters, weights, ranks, strict=True):
        if adapter in layer.feddora_A:
            factors = (*layer.feddora_A[adapter].tensors(), *layer.feddora_B[adapter].tensors())
            a, b = (factor.float() for factor in effective_factors(*factors))
            r = layer.r[adapter]
            a_cat[offset : offset + r] = weight * layer.scaling[adapter] * a
            b_cat[:, offset : offset + r] = b
        offset += rank
    _set_factor(new_a, a_cat)
    _set_factor(new_b, b_cat)


def _set_factor(factor: MagnitudeDirection, value: torch.Tensor) -> None:
    """Store ``value`` as ``factor``: direction ``value``, magnitude its column norms (so the factor is ``value``)."""
    with torch.no_grad():
        factor.direction.copy_(value)
        factor.magnitude.copy_(column_norm(factor.direction.to(factor.magnitude.dtype)))


def _combined_targets(targets: Sequence[set[str] | str | None]) -> set[str] | str:
    """The target modules of every adapter combined: module-name sets joined, regexes alternated."""
    if all(isinstance(target, set) for target in targets):
        return set().union(*targets)
    if all(isinstance(target, str) for target in targets):
        return "|".join(f"({target})" for target in targets)
    raise ValueError(f"cannot combine adapters whose target_modules mix module-name sets and regexes: {list(targets)}")


def _report_rank(layer: FedDoRALayer, adapter_name: str, key: str, reported: set[tuple]) -> None:
    """Warn, naming the layer, when r > min(in_features, out_features) (accepted, as PEFT LoRA does: ΔW = s·B A has
    rank at most min(k, d) whatever r), and log each direction that is fixed (see ``MagnitudeDirection``). Each
    distinct message once per model: its first layer stands for every other layer of the same shape (``reported``
    holds the messages given so far)."""
    r, in_features, out_features = layer.r[adapter_name], layer.in_features, layer.out_features
    if r > min(in_features, out_features) and ("rank", r, in_features, out_features) not in reported:
        reported.add(("rank", r, in_features, out_features))
        warnings.warn(
            f"FedDoRA rank r={r} of layer {key!r} is larger than min(in_features={in_features}, "
            f"out_features={out_features}); the update has rank at most {min(in_features, out_features)}, so the "
            "extra rank adds parameters but no expressiveness (warned once for all target layers of this shape).",
            stacklevel=4,
        )
    for factor, reason in (("A", f"r={r}"), ("B", f"out_features={out_features}")):
        if getattr(layer, f"feddora_{factor}")[adapter_name].fixed and ("fixed", factor, reason) not in reported:
            reported.add(("fixed", factor, reason))
            logger.warning(
                "FedDoRA layer %r: %s.direction has one row (%s), so its unit columns are signs with zero gradient; "
                "it is fixed (a buffer: not trained, not shared) and %s.magnitude carries the factor (logged once "
                "for all target layers with %s).",
                key,
                factor,
                reason,
                factor,
                reason,
            )
