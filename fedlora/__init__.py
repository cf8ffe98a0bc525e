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
from collections.abc import Callable
from types import ModuleType
from typing import Any

__version__ = "0.1.0"
__all__ = ["FEDDORA", "FedDoRAConfig", "FedDoRAModel", "__version__"]


def __getattr__(name: str) -> Any:
    if name in ("FEDDORA", "FedDoRAConfig", "FedDoRAModel"):
        return getattr(importlib.import_module("fedlora.tuners.feddora"), name)
    raise AttributeError(f"module 'fedlora' has no attribute {name!r}")


class _Hook(importlib.abc.MetaPathFinder):
    """Finds top-level module ``name`` as the other finders do, with ``exec_module(loader, module)`` run in place of
    its loader's ``exec_module``."""

    def __init__(self, name: str, exec_module: Callable[[importlib.abc.Loader, ModuleType], None]) -> None:
        self.name, self.exec_module, self.finding = name, exec_module, False

    def find_spec(self, name: str, path: Any = None, target: ModuleType | None = None) -> Any:
        if name != self.name or self.finding:
            return None
        self.finding = True  # the other finders' spec, not ours
        try:
            spec = importlib.util.find_spec(name)
        finally:
            self.finding = False
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader, self.exec_module)
        return spec


class _Loader(importlib.abc.Loader):
    """Runs ``exec_module(loader, module)``, leaving the module with its own loader (for resources, sources)."""

    def __init__(self, loader: importlib.abc.Loader, exec_module: Callable[..., None]) -> None:
        self.loader, self.run = loader, exec_module

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        module.__loader__ = module.__spec__.loader = self.loader
        self.run(self.loader, module)


def _refuse(loader: importlib.abc.Loader, module: ModuleType) -> None:
    raise ImportError(
        "bitsandbytes is held back while PEFT is imported (see fedlora/__init__.py)", name=module.__name__
    )


def _import_peft(loader: importlib.abc.Loader, module: ModuleType) -> None:
    """Run PEFT's import with bitsandbytes held back (``import bitsandbytes`` raises ImportError; finding it still
    succeeds, so availability checks see it), then register FedDoRA."""
    sys.meta_path[:] = [finder for finder in sys.meta_path if not isinstance(finder, _Hook)]
    held = None if "bitsandbytes" in sys.modules else _Hook("bitsandbytes", _refuse)
    if held is not None:
        sys.meta_path.insert(0, held)
    try:
        loader.exec_module(module)
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
elif not any(isinstance(finder, _Hook) for finder in sys.meta_path):
    sys.meta_path.insert(0, _Hook("peft", _import_peft))
