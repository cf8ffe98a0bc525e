"""What every engine builds from a run configuration: a client trainer (the model with the strategy's adapter).

:func:`build_client` is the one way a process gets its model: the in-process engine builds one for all clients,
the Flower ServerApp one for the tensor names and ``global_adapter/``, every SuperNode one for its client. The
adapter is added right after seeding everything with ``config.seed``, so the personal and frozen tensors start
from the same values in every process, and the shared ones come from the server.
"""

from __future__ import annotations

import json
import random
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peft import PeftConfig, PeftModel, get_peft_model
from peft.tuners.tuners_utils import _maybe_include_all_linear_layers
from torch import nn
from transformers import PreTrainedTokenizerBase

from fedlora.federated.client import FederatedClient
from fedlora.federated.config import RunConfig
from fedlora.federated.strategy import STRATEGIES
from fedlora.models import load_model_and_tokenizer, portable_model_name

ADAPTER_FIELDS = ("peft_type", "r", "lora_alpha", "target_modules", "tensor_roles")  # a saved adapter must match


def build_client(
    config: RunConfig,
    *,
    model: nn.Module | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    model_path: str | None = None,
    adapter_dir: Path | None = None,
    progress: bool = True,
) -> FederatedClient:
    """The client trainer of a run: the base model (``model``/``tokenizer``, else loaded from ``model_path`` or
    ``config.model.name``; wrapped in place) with the strategy's adapter, a fresh seeded one or the one saved in
    ``adapter_dir``."""
    if model is None or tokenizer is None:
        model, tokenizer = load_model(config, model_path)
    if getattr(model, "hf_quantizer", None) is None:  # a quantized base is placed while it loads
        model.to(config.device)
    strategy = STRATEGIES[config.strategy].with_roles(config.adapter.tensor_roles)
    seed_everything(config.seed)
    if adapter_dir is None:
        peft_model = get_peft_model(model, strategy.peft_config(config.adapter))
    else:
        check_adapter_dir(adapter_dir, strategy.peft_config(config.adapter), model)
        peft_model = PeftModel.from_pretrained(model, adapter_dir, is_trainable=True)
    return FederatedClient(
        peft_model,
        tokenizer,
        strategy,
        config.client,
        config.eval,
        max_length=config.data.max_length,
        seed=config.seed,
        progress=progress,
    )


def load_model(config: RunConfig, name: str | None = None) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """The base model ``name`` (default ``config.model.name``) in ``config.model.dtype`` (with its linears quantized
    by ``config.model.quantization``), and its tokenizer."""
    dtype = getattr(torch, config.model.dtype) if config.model.dtype else None
    return load_model_and_tokenizer(
        name or config.model.name, device=config.device, dtype=dtype, quantization=config.model.quantization
    )


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global RNGs."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def check_adapter_dir(adapter_dir: Path, expected: PeftConfig, model: nn.Module) -> None:
    """Raise a ``ValueError`` naming the first of ``ADAPTER_FIELDS`` in which the adapter saved in ``adapter_dir``
    differs from ``expected`` (this run's), with both values; also its base model, as PEFT records it
    (``model.name_or_path`` as :func:`~fedlora.models.portable_model_name` names it; an absolute local path by its
    last part, so a moved run directory still loads)."""
    config_file = Path(adapter_dir) / "adapter_config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{adapter_dir} is not a saved adapter (no adapter_config.json)")
    saved = json.loads(config_file.read_text())
    expected = _maybe_include_all_linear_layers(expected, model)  # PEFT saves "all-linear" as the module names
    wanted = {name: getattr(expected, name) for name in ADAPTER_FIELDS if hasattr(expected, name)}
    wanted["base_model_name_or_path"] = getattr(model, "name_or_path", None) or None
    for name, value in wanted.items():
        theirs, ours = _comparable(name, saved.get(name)), _comparable(name, value)
        if theirs != ours:
            raise ValueError(
                f"{adapter_dir} does not fit this run: its {name} is {theirs!r} but this run's is {ours!r} "
                "(was it saved by another run, strategy, adapter setting or model?)"
            )


def _comparable(name: str, value: Any) -> Any:
    """A saved or expected adapter setting in one form: module names sorted, enums as their value, a base model by
    its portable name, and a local model path by its last part."""
    if isinstance(value, set | list | tuple):
        return sorted(value)
    if isinstance(value, Enum):
        return value.value
    if name == "base_model_name_or_path" and value is not None:
        value = portable_model_name(value)
        return Path(value).name if Path(value).is_absolute() else value
    return value
