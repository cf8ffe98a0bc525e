"""fedlora: the FedDoRA PEFT adapter and federated fine-tuning (FedLoRA-Optimizer, arXiv 2510.11274).

Importing this package registers the ``FEDDORA`` adapter type with PEFT, so ``get_peft_model``,
``PeftModel.from_pretrained`` and ``AutoPeftModelForCausalLM`` accept FedDoRA configs and checkpoints. The import
itself is light (no torch, transformers or PEFT, so ``fedlora --help`` answers at once): the registration happens
now if PEFT is already imported, else right after PEFT's own import, whoever imports it. ``FEDDORA``,
``FedDoRAConfig`` and ``FedDoRAModel`` are loaded on first access.

PEFT imports bitsandbytes eagerly (``peft.helpers``), and bitsandbytes' import costs seconds and logs a warning about
optional CPU kernels; while PEFT is imported through this hook, bitsandbytes is held back, so it loads only when a
quantized base model needs it (transformers then imports it).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
from types import ModuleType
from typing import Any

__version__ = "0.1.0"
__all__ = ["FEDDORA", "FedDoRAConfig", "FedDoRAModel", "__version__"]


def __getattr__(name: str) -> Any:
    if name in ("FEDDORA", "FedDoRAConfig", "FedDoRAModel"):
        return getattr(importlib.import_module("fedlora.tuners.feddora"), name)
    raise AttributeError(f"module 'fedlora' has no attribute {name!r}")


class _HeldBack(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Makes ``import bitsandbytes`` raise ImportError while installed; ``find_spec`` answers as usual (so
    availability checks such as ``importlib.util.find_spec`` still see bitsandbytes)."""

    def find_spec(self, name: str, path: Any = None, target: ModuleType | None = None) -> Any:
        if name != "bitsandbytes":
            return None
        return importlib.machinery.ModuleSpec(name, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> None:
        return None

    def exec_module(self, module: ModuleType) -> None:
        raise ImportError("bitsandbytes is held back while PEFT is imported (fedlora)", name="bitsandbytes")


class _AfterPeft(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports PEFT through the real loader with bitsandbytes held back, then registers FedDoRA."""

    def find_spec(self, name: str, path: Any = None, target: ModuleType | None = None) -> Any:
        if name != "peft":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        self.loader = spec.loader
        spec.loader = self
        return spec

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        held = None if "bitsandbytes" in sys.modules else _HeldBack()
        if held is not None:
            sys.meta_path.insert(0, held)
        try:
            self.loader.exec_module(module)
        finally:
            if held is not None:
                sys.meta_path.remove(held)
                _forget_bitsandbytes_checks()
        importlib.import_module("fedlora.tuners.feddora")


def _forget_bitsandbytes_checks() -> None:
    """PEFT caches whether bitsandbytes' 4-bit layers exist; one asked while it was held back is asked again."""
    import_utils = sys.modules.get("peft.import_utils")
    for check in ("is_bnb_available", "is_bnb_4bit_available"):
        cached = getattr(import_utils, check, None)
        if hasattr(cached, "cache_clear"):
            cached.cache_clear()


if "peft" in sys.modules:
    importlib.import_module("fedlora.tuners.feddora")
elif not any(isinstance(finder, _AfterPeft) for finder in sys.meta_path):
    sys.meta_path.insert(0, _AfterPeft())
