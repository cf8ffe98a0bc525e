"""Triton kernels and the autograd op of the FedDoRA low-rank branch, in layers (as Liger-Kernel's ``ops/<op>.py``):

* :mod:`.kernels`: the ``@triton.jit`` kernels, each what one program computes;
* :mod:`.launch`: launch planning (tiles, grids, splits over SMs; :class:`~.launch.KernelConfig`) and one launcher
  per pass;
* :mod:`.op`: the autograd Function and :func:`feddora_lora_triton`, the ``triton`` backend.

The fused linear op that also owns the base weight (:mod:`fedlora_kernels.triton_feddora_linear`) reuses the
launchers. The math is :mod:`fedlora_kernels.reference`'s docstring; on top of its notation the kernels name
t = dy V_B (N×r, fp32) and w = q du = s q t diag(g_B), and keep u (N×r) in fp32 for backward.

Passes over the N-sized tensors: the forward reads x once and base once and writes y once (A, B and s·u diag(g_B)
only ever exist as register tiles, y is produced in the epilogue of the second GEMM, so there is no N×k or N×d
temporary; only the N×r fp32 u is stored, for backward). The backward reads dy once (t and dB together, when t's
split partials are smaller than dy, see :func:`~.launch.grad_output_pass`) and x once (dx and dA together), writes dx
once, and never stores a copy of x: the dropout mask is regenerated from a Philox seed. The reductions over N (dB, dA)
run split over row groups into fp32 partials; a small kernel sums them and applies the column-norm projection (the
<dF_j, V_j> dots are accumulated in the epilogues of the passes).
"""

from __future__ import annotations

import sys
import types

from . import launch
from .launch import SUPPORTED_DTYPES, KernelConfig, draw_dropout_seed, dropout_keep_mask
from .op import feddora_lora_triton

__all__ = [
    "SUPPORTED_DTYPES",
    "KernelConfig",
    "draw_dropout_seed",
    "dropout_keep_mask",
    "feddora_lora_triton",
]


def _launch_setting(name: str) -> property:
    """The attribute ``name`` of :mod:`.launch`, read and set through the package."""
    return property(lambda _: getattr(launch, name), lambda _, value: setattr(launch, name, value))


class _Package(types.ModuleType):
    """This package's module type: its ``CONFIG`` (tile sizes) and ``_sm_count`` (a device's SM count) are
    :mod:`.launch`'s, which every launch reads. Tests set ``CONFIG`` to small tiles and benchmarks.compile_check sets
    ``_sm_count`` to a target's, on the package."""

    CONFIG = _launch_setting("CONFIG")
    _sm_count = _launch_setting("_sm_count")


sys.modules[__name__].__class__ = _Package
