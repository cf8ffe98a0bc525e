"""The FedDoRA op's autograd Function on the launchers of :mod:`.launch`, and its entry point
:func:`feddora_lora_triton` (the ``triton`` backend of :func:`fedlora_kernels.feddora_lora`)."""

from __future__ import annotations

import torch

from ..reference import check_inputs, feddora_lora_reference
from .launch import (
    DotMode,
    Scales,
    check_dtypes,
    forward_pass,
    grad_input_pass,
    grad_output_pass,
    parameter_grads,
    scales,
)


class _FedDoRALoRAFunction(torch.autograd.Function):
    """Autograd of the reference's op on 2-D x (N×k) and base (N×d), in :mod:`fedlora_kernels.triton_feddora`'s
    passes: forward one read of x; backward one read of dy and one of x."""

    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,
        direction_a: torch.Tensor,
        magnitude_a: torch.Tensor,
        direction_b: torch.Tensor,
        magnitude_b: torch.Tensor,
        scaling: float,
        dropout_p: float,
        base_out: torch.Tensor | None,
    ) -> torch.Tensor:
        saved = scales(direction_a, magnitude_a, direction_b, magnitude_b, dropout_p)
        y, u = forward_pass(x, direction_a, direction_b, saved, base_out, scaling, dropout_p, DotMode.of(x.dtype))
        ctx.save_for_backward(x, direction_a, direction_b, u, *saved)
        ctx.scaling, ctx.dropout_p, ctx.has_base = scaling, dropout_p, base_out is not None
        return y

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, direction_a, direction_b, u, *saved = ctx.saved_tensors
        saved = Scales(*saved)
        need_dx, *need_params = ctx.needs_input_grad[:5]
        need_weights = any(need_params)
        grad_base = grad_out if ctx.has_base and ctx.needs_input_grad[7] else None
        if not (need_dx or need_weights):
            return None, None, None, None, None, None, None, grad_base

        mode = DotMode.of(x.dtype)
        t, grad_b_parts = grad_output_pass(grad_out, direction_b, u if need_weights else None, mode)
        w_scale = ctx.scaling / (1.0 - ctx.dropout_p)
        dx, grad_a_parts = grad_input_pass(
            x, t, direction_a, saved, w_scale, ctx.dropout_p, need_dx, need_weights, mode
        )
        params = parameter_grads(need_params, grad_a_parts, grad_b_parts, direction_a, direction_b, saved, ctx.scaling)
        return dx, *params, None, None, grad_base


def feddora_lora_triton(
    x: torch.Tensor,
    direction_a: torch.Tensor,
    magnitude_a: torch.Tensor,
    direction_b: torch.Tensor,
    magnitude_b: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    base_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`~fedlora_kernels.reference.feddora_lora_reference` with Triton kernels; same contract.

    x (..., k) and the four parameters share one dtype (fp32, fp16 or bf16); base_out (..., d) may have another, which
    the result takes. Leading dims of x are flattened (a copy only when they cannot be viewed flat); any strides work.
    The dropout mask is drawn from a seed (see :func:`~.launch.draw_dropout_seed`, :func:`~.launch.dropout_keep_mask`).
    """
    params = (direction_a, magnitude_a, direction_b, magnitude_b)
    check_inputs(x, *params, dropout_p, base_out)
    check_dtypes("feddora_lora_triton", "x and the four parameters", (x, *params))
    n_in, n_out = x.shape[-1], direction_b.shape[0]
    lead = x.shape[:-1]
    if base_out is not None and base_out.shape != (*lead, n_out):  # the kernels stream it: no broadcasting
        raise ValueError(f"base_out has shape {tuple(base_out.shape)}, expected {(*lead, n_out)}")
    if x.numel() == 0:
        return feddora_lora_reference(x, *params, scaling, dropout_p, base_out)
    base = None if base_out is None else base_out.reshape(-1, n_out)
    y = _FedDoRALoRAFunction.apply(x.reshape(-1, n_in), *params, float(scaling), float(dropout_p), base)
    return y.view(*lead, n_out)
