"""FedDoRAModel: injects FedDoRA layers into a transformers (or any torch) model, PEFT-style."""

from __future__ import annotations

import warnings
from typing import Any

from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from peft.utils.other import get_pattern_key
from torch import nn
from transformers.pytorch_utils import Conv1D

from fedlora.tuners.feddora.config import FedDoRAConfig
from fedlora.tuners.feddora.layer import FedDoRALayer, Linear


class FedDoRAModel(BaseTuner):
    """Creates a FedDoRA model from a pretrained model (use ``peft.get_peft_model`` with a ``FedDoRAConfig``).

    Every targeted ``nn.Linear``/``Conv1D`` becomes a :class:`~fedlora.tuners.feddora.layer.Linear` whose
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
        _check_rank(r, current_key, target)
        if isinstance(target, FedDoRALayer):
            target.update_layer(adapter_name, r, lora_alpha, config)
            return
        new_module = self._create_new_module(config, adapter_name, target, current_key, r=r, lora_alpha=lora_alpha)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

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
        elif not isinstance(base, (nn.Linear, Conv1D)):
            raise TypeError(
                f"FedDoRA cannot adapt module {current_key!r} of type {type(base).__name__}: "
                "only torch.nn.Linear and transformers' Conv1D are supported."
            )
        return Linear(target, adapter_name, config=config, **kwargs)


def _check_rank(r: int, key: str, target: nn.Module) -> None:
    """ΔW = s·B·A of a layer with in_features k and out_features d has rank at most min(k, d), so a larger ``r`` is
    an error naming the layer and its shape (layers of other types are rejected by ``_create_new_module``)."""
    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    if not isinstance(base, nn.Linear | Conv1D):
        return
    in_features, out_features = (
        (base.in_features, base.out_features) if isinstance(base, nn.Linear) else base.weight.shape
    )
    if r > min(in_features, out_features):
        raise ValueError(
            f"FedDoRA rank r={r} is too large for layer {key!r} (in_features={in_features}, "
            f"out_features={out_features}): the update has rank at most {min(in_features, out_features)}; lower r "
            "(or its rank_pattern entry) or leave the layer out of target_modules."
        )
