"""Loading saved adapter tensors (a client's personal tensors, a run's global ones) into a PEFT model under any
adapter name.

A run stores tensors by the model's parameter names, which include the adapter name they were trained under
(``...q_proj.feddora_A.default.magnitude``), so PEFT's ``set_peft_model_state_dict`` puts them in place only under
that same name, and under another one silently loads nothing. :func:`load_adapter_tensors` loads them into any
adapter and refuses keys that do not fit.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import Tensor, nn

_KEY = re.compile(
    r"^(?P<module>.+)\.(?P<layer>feddora|lora)_(?P<factor>[AB])\.(?P<adapter>[^.]+)\.(?P<leaf>direction|magnitude|weight)$"
)


def load_adapter_tensors(model: nn.Module, tensors: Mapping[str, Tensor], adapter_name: str = "default") -> None:
    """Copy ``tensors`` into adapter ``adapter_name`` of ``model`` (a PEFT model with FedDoRA or LoRA layers).

    Each key is a parameter name of a FedDoRA or LoRA adapter tensor under any adapter name (as a run stores a
    client's personal tensors, e.g. ``base_model.model.model.layers.0.self_attn.q_proj.feddora_A.default.magnitude``);
    its adapter part is replaced by ``adapter_name``. Every key must name a parameter of that adapter with the same
    shape, and for each tensor kind given (``feddora_A.*.magnitude``, ``lora_B.*.weight``, ...) every layer's tensor
    of that kind must be given; otherwise a ``ValueError`` names the unexpected, missing or misshapen keys and
    nothing is copied. Values are cast to each parameter's dtype and device.
    """
    params = {name: param for name, param in model.named_parameters() if _adapter_of(name) == adapter_name}
    if not params:
        raise ValueError(f"the model has no FedDoRA or LoRA parameters of adapter {adapter_name!r}")
    renamed, kinds, unexpected = {}, set(), []
    for key, value in tensors.items():
        match = _KEY.match(key)
        if match is None:
            unexpected.append(key)
            continue
        name = f"{match['module']}.{match['layer']}_{match['factor']}.{adapter_name}.{match['leaf']}"
        renamed[name] = value
        kinds.add(_kind(name))
    unexpected += sorted(name for name in renamed if name not in params)
    missing = sorted(name for name in params if _kind(name) in kinds and name not in renamed)
    misshapen = sorted(
        f"{name} {tuple(value.shape)} (the model's: {tuple(params[name].shape)})"
        for name, value in renamed.items()
        if name in params and value.shape != params[name].shape
    )
    problems = [
        f"{what}: {', '.join(keys)}"
        for what, keys in (("unexpected keys", unexpected), ("missing keys", missing), ("wrong shapes", misshapen))
        if keys
    ]
    if problems:
        raise ValueError(f"the tensors do not fit adapter {adapter_name!r} of the model; {'; '.join(problems)}")
    with torch.no_grad():
        for name, value in renamed.items():
            params[name].copy_(value)


def _adapter_of(name: str) -> str | None:
    match = _KEY.match(name)
    return match["adapter"] if match else None


def _kind(name: str) -> tuple[str, str, str]:
    """(layer, factor, leaf) of an adapter parameter name: ``("feddora", "A", "magnitude")``."""
    match = _KEY.match(name)
    return match["layer"], match["factor"], match["leaf"]
