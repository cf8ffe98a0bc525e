"""The one place that picks the implementation behind :func:`fedlora_kernels.feddora_lora`.

Every backend computes ``base_out + s · dropout(x) Aᵀ Bᵀ`` with :func:`~fedlora_kernels.reference.feddora_lora_reference`'s
signature:

* ``triton``: the fused kernels of :mod:`fedlora_kernels.triton_feddora`; runs on CUDA tensors, and on CPU tensors
  under Triton's interpreter (``TRITON_INTERPRET=1``, slow, for tests); float32/float16/bfloat16.
* ``native``: the compiled extension, :mod:`fedlora_kernels.native` (optional; it may be missing or unbuilt).
* ``torch``: the PyTorch reference, runs everywhere.

``FEDLORA_BACKEND=triton|torch|native`` forces one; a forced backend that cannot run for the given tensors raises
:class:`BackendUnavailableError` naming the backend and why. Unset (or empty), each call takes the first backend that
can run, in this order of preference:

* CUDA tensors with at least :data:`TRITON_MIN_TOKENS` tokens: ``triton`` (one fused pass over x, base and dy),
  ``native``, ``torch``;
* CUDA tensors with fewer tokens: ``native`` (fewer, cheaper launches, which is what such small calls pay for),
  ``triton``, ``torch``;
* other devices: ``torch``. On CPU the native op measured no faster than the reference (fwd+bwd, 256 tokens,
  576→576, r=8, one thread: 27.9–29.7 ms vs 28.9–29.3 ms), so it runs there only when forced.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable

import torch

from .reference import feddora_lora_reference

BACKENDS = ("triton", "native", "torch")
BACKEND_ENV = "FEDLORA_BACKEND"
TRITON_MIN_TOKENS = 128
"""Token count (rows of x) from which Triton goes first on CUDA. Not measured: a guess until benchmarks/gpu_check.py's
crossover step runs on a GPU (none has yet)."""

FedDoRALoRA = Callable[..., torch.Tensor]


class BackendUnavailableError(RuntimeError):
    """A backend forced through ``FEDLORA_BACKEND`` cannot run for the given tensors."""


def _triton(x: torch.Tensor) -> tuple[FedDoRALoRA | None, str]:
    """The Triton implementation, or None and why it cannot run on ``x``."""
    try:
        module = importlib.import_module(f"{__package__}.triton_feddora")
    except ImportError as exc:
        return None, f"triton cannot be imported ({exc})"
    if x.dtype not in module.SUPPORTED_DTYPES:
        return None, f"its kernels support float32, float16 and bfloat16, not {x.dtype}"
    interpreting = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if x.device.type != "cuda" and not (x.device.type == "cpu" and interpreting):
        return None, (
            f"the tensors are on {x.device}; Triton runs on CUDA tensors, or on CPU tensors only under its interpreter "
            "(set TRITON_INTERPRET=1 before triton is imported)"
        )
    return module.feddora_lora_triton, ""


def _native(x: torch.Tensor) -> tuple[FedDoRALoRA | None, str]:
    """The native-extension implementation, or None and why it cannot run."""
    try:
        module = importlib.import_module(f"{__package__}.native")
    except ImportError as exc:
        return None, f"fedlora_kernels.native cannot be imported ({exc})"
    if not module.is_available(x.device):
        return None, module.unavailable_reason(x.device)
    return module.feddora_lora_native, ""


def _torch(x: torch.Tensor) -> tuple[FedDoRALoRA | None, str]:
    """The PyTorch reference, which runs on any tensors."""
    return feddora_lora_reference, ""


_RESOLVERS = {"triton": _triton, "native": _native, "torch": _torch}


def _resolve(x: torch.Tensor) -> tuple[str, FedDoRALoRA]:
    forced = os.environ.get(BACKEND_ENV, "").strip().lower()
    if forced:
        if forced not in _RESOLVERS:
            raise ValueError(f"{BACKEND_ENV}={forced!r} is not a backend; choose one of {', '.join(BACKENDS)}")
        impl, reason = _RESOLVERS[forced](x)
        if impl is None:
            raise BackendUnavailableError(
                f"{BACKEND_ENV}={forced} forces the {forced} backend, which cannot run: {reason}"
            )
        return forced, impl
    if x.device.type != "cuda":
        return "torch", feddora_lora_reference
    many_tokens = x.numel() >= TRITON_MIN_TOKENS * x.shape[-1]
    preference = ("triton", "native") if many_tokens else ("native", "triton")
    for name in preference:
        impl, _ = _RESOLVERS[name](x)
        if impl is not None:
            return name, impl
    return "torch", feddora_lora_reference


def select_backend(x: torch.Tensor) -> str:
    """Name of the backend :func:`feddora_lora` uses for input ``x`` under the current ``FEDLORA_BACKEND``."""
    return _resolve(x)[0]


def feddora_lora(
    x: torch.Tensor,
    direction_a: torch.Tensor,
    magnitude_a: torch.Tensor,
    direction_b: torch.Tensor,
    magnitude_b: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    base_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``base_out + s · dropout(x) Aᵀ Bᵀ`` on the backend :func:`select_backend` picks; same contract as
    :func:`~fedlora_kernels.reference.feddora_lora_reference`."""
    _, impl = _resolve(x)
    return impl(x, direction_a, magnitude_a, direction_b, magnitude_b, scaling, dropout_p=dropout_p, base_out=base_out)
