"""The native (C++/CUDA) FedDoRA backend: the compiled extension ``fedlora_kernels._C`` plus torch matmuls.

The math is :mod:`fedlora_kernels.reference`'s docstring. The extension registers two ops (precision in
csrc/feddora_ops.h), each for one factor F = V diag(s m / n) of that docstring with a scale s folded in:

* ``torch.ops.fedlora.scaled_factor(V, m, s=1.0) -> (F, 1/n)``: F in V's dtype and 1/n in float64, in one pass;
* ``torch.ops.fedlora.scaled_factor_backward(dF, V, m, 1/n, s=1.0) -> (dV, dm)``: the projection through the column
  norms (the docstring's dm_j and dV_j, with m replaced by s m), in one pass.

``scaled_factor`` is differentiable on its own (its C++ autograd kernel calls ``scaled_factor_backward``); importing
this module also registers both ops' fake kernels, for ``torch.library.opcheck`` and ``torch.compile``.

:func:`feddora_lora_native` is the reference's op as one autograd node with few launches: two ``scaled_factor`` calls
build A (r×k) and s·B (d×r), dropout is one fused ``native_dropout`` (boolean mask), then u = x̃ Aᵀ (mm) and
y = base_out + u (sB)ᵀ (addmm, beta=1). It saves x (shared with whoever else holds it, e.g. the q/k/v projections of
one input), the mask, the (N×r) u and the small factors; backward is four matmuls, dropout's mask multiply and two
``scaled_factor_backward`` calls. Its low host overhead suits small token counts.
"""

from __future__ import annotations

import torch

from .reference import check_inputs

try:
    from . import _C
except ImportError as exc:  # not built, or built against another torch
    _C = None
    _IMPORT_ERROR: ImportError | None = exc
else:
    _IMPORT_ERROR = None

__all__ = ["feddora_lora_native", "is_available", "unavailable_reason"]

_BUILD_HINT = (
    "reinstall with `pip install --no-build-isolation -v -e .` (torch installed first; a CUDA toolkit for the CUDA "
    "kernels) to build it"
)


def is_available(device: torch.device | str | None = None) -> bool:
    """Whether the extension loaded and, when ``device`` is given, has kernels for that device's type."""
    return not unavailable_reason(device)


def unavailable_reason(device: torch.device | str | None = None) -> str:
    """Why the native backend cannot run (on ``device``, when given); empty when it can."""
    if _C is None:
        return (
            f"the native extension fedlora_kernels._C was not built or does not load: {_IMPORT_ERROR}; "
            f"{_BUILD_HINT}; falling back to the Triton/PyTorch backends"
        )
    device_type = None if device is None else torch.device(device).type
    if device_type in (None, "cpu") or (device_type == "cuda" and _C.with_cuda):
        return ""
    return (
        f"the native extension fedlora_kernels._C has no {device_type} kernels (it was built with "
        f"{'CPU and CUDA' if _C.with_cuda else 'CPU only'} kernels); {_BUILD_HINT}; "
        "falling back to the Triton/PyTorch backends"
    )


def _register_fake_kernels() -> None:
    """Shape/dtype-only kernels of the extension's ops, for FakeTensor tracing (torch.compile, opcheck)."""

    @torch.library.register_fake("fedlora::scaled_factor")
    def _(direction, magnitude, scale=1.0):
        factor = torch.empty(direction.shape, dtype=direction.dtype, device=direction.device)
        return factor, direction.new_empty(direction.shape[1], dtype=torch.float64)

    @torch.library.register_fake("fedlora::scaled_factor_backward")
    def _(grad_factor, direction, magnitude, inv_norm, scale=1.0):
        grad_direction = torch.empty(direction.shape, dtype=direction.dtype, device=direction.device)
        return grad_direction, torch.empty_like(magnitude, memory_format=torch.contiguous_format)


if _C is not None:
    _register_fake_kernels()


class _FedDoRANative(torch.autograd.Function):
    """The reference's op (its docstring's notation) on flattened (N, ·) views, with autocast off inside.

    The factors are built in the parameters' dtype; the matmuls run in x's dtype (the compute dtype, which differs
    only under autocast), the second one in base_out's dtype when base_out (N, d) is given (x's dtype or a wider one,
    so the branch is not rounded before the add). Every ``.to`` below is a no-op when the dtypes agree.
    """

    @staticmethod
    def forward(ctx, x, direction_a, magnitude_a, direction_b, magnitude_b, scaling, dropout_p, base_out):
        out_dtype = x.dtype if base_out is None else base_out.dtype
        with torch.autocast(x.device.type, enabled=False):
            lora_a, inv_norm_a = torch.ops.fedlora.scaled_factor(direction_a, magnitude_a)  # A (r×k)
            lora_b, inv_norm_b = torch.ops.fedlora.scaled_factor(direction_b, magnitude_b, scaling)  # s·B (d×r)
            lora_a, lora_b = lora_a.to(x.dtype), lora_b.to(out_dtype)
            if dropout_p > 0.0 and x.numel() > 0:
                x_dropped, mask = torch.native_dropout(x, dropout_p, True)
            else:
                x_dropped, mask = x, None
            hidden = torch.mm(x_dropped, lora_a.t()).to(out_dtype)  # u (N×r)
            out = torch.mm(hidden, lora_b.t()) if base_out is None else torch.addmm(base_out, hidden, lora_b.t())
        ctx.save_for_backward(
            x, mask, hidden, lora_a, lora_b, direction_a, magnitude_a, inv_norm_a, direction_b, magnitude_b, inv_norm_b
        )
        ctx.scaling = scaling
        ctx.keep_scale = 1.0 / (1.0 - dropout_p)  # q: x̃ = q M⊙x
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, mask, hidden, lora_a, lora_b, *norm_state = ctx.saved_tensors
        norm_state_a, norm_state_b = norm_state[:3], norm_state[3:]  # (V, m, 1/n) of each factor
        factor_dtype = norm_state_a[0].dtype
        need_x, need_va, need_ma, need_vb, need_mb, _, _, need_base = ctx.needs_input_grad
        grad_x = grad_va = grad_ma = grad_vb = grad_mb = None

        def undo_dropout(t):  # q M⊙t: dropout's backward, and x̃ from x
            return t if mask is None else torch.ops.aten.native_dropout_backward(t, mask, ctx.keep_scale)

        with torch.autocast(x.device.type, enabled=False):
            if need_vb or need_mb:  # d(sB) = dyᵀ u
                grad_vb, grad_mb = torch.ops.fedlora.scaled_factor_backward(
                    torch.mm(grad_out.t(), hidden).to(factor_dtype), *norm_state_b, ctx.scaling
                )
            if need_va or need_ma or need_x:
                grad_hidden = torch.mm(grad_out, lora_b).to(x.dtype)  # du = dy (sB)
            if need_va or need_ma:  # dA = duᵀ x̃
                grad_va, grad_ma = torch.ops.fedlora.scaled_factor_backward(
                    torch.mm(grad_hidden.t(), undo_dropout(x)).to(factor_dtype), *norm_state_a
                )
            if need_x:  # dx = q M⊙(du A)
                grad_x = undo_dropout(torch.mm(grad_hidden, lora_a))
        return grad_x, grad_va, grad_ma, grad_vb, grad_mb, None, None, grad_out if need_base else None


def _compute_dtype(x: torch.Tensor, factor_dtype: torch.dtype) -> torch.dtype:
    """The matmuls' dtype: autocast's where it is on (as for the reference's F.linear), else the factors' (= x's)."""
    if factor_dtype != torch.float64 and torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    if x.dtype != factor_dtype:
        raise ValueError(f"x is {x.dtype} but the adapter's factors are {factor_dtype} (and autocast is off)")
    return factor_dtype


def feddora_lora_native(
    x: torch.Tensor,
    direction_a: torch.Tensor,
    magnitude_a: torch.Tensor,
    direction_b: torch.Tensor,
    magnitude_b: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    base_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`fedlora_kernels.reference.feddora_lora_reference` on the native ops; same signature and semantics.

    The directions and magnitudes share one dtype (float32, float64, float16 or bfloat16) and x's device; x has that
    dtype too, except under autocast, where — as for the reference — the factors are built in their own dtype and the
    matmuls run in autocast's. A ``base_out`` of shape (..., d) on x's device, in the compute dtype or a wider one (e.g.
    float32 for bfloat16), is accumulated by the second matmul (addmm, run in base_out's dtype); any other ``base_out``
    (a narrower dtype, or a broadcast shape) gets the branch added in its own dtype, as in the reference.
    Differentiable in x, the directions, the magnitudes and base_out.

    Raises:
        RuntimeError: the extension is not available for x's device (see :func:`unavailable_reason`).
        ValueError: inconsistent shapes, dtypes or devices, or dropout_p outside [0, 1).
    """
    reason = unavailable_reason(x.device)
    if reason:
        raise RuntimeError(reason)
    check_inputs(x, direction_a, magnitude_a, direction_b, magnitude_b, dropout_p, base_out)
    x = x.to(_compute_dtype(x, direction_a.dtype))
    out_features = direction_b.shape[0]
    out_shape = (*x.shape[:-1], out_features)
    fused_base = (
        base_out is not None
        and base_out.shape == out_shape
        and base_out.device == x.device
        and torch.promote_types(base_out.dtype, x.dtype) == base_out.dtype
    )
    out = _FedDoRANative.apply(
        x.reshape(-1, x.shape[-1]),
        direction_a,
        magnitude_a,
        direction_b,
        magnitude_b,
        float(scaling),
        float(dropout_p),
        base_out.reshape(-1, out_features) if fused_base else None,
    ).view(out_shape)
    if base_out is None or fused_base:
        return out
    return base_out + out.to(base_out.dtype)
