"""Experimental: the FedDoRA layer's whole forward and backward as one op owning the frozen base weight W₀ (and bias b).

Not wired into the FedDoRA layer (which calls :func:`fedlora_kernels.feddora_lora`) and not yet timed on a GPU. It
computes ``F.linear(x, W₀, b)`` plus the branch of :mod:`fedlora_kernels.reference`'s docstring, in the notation of
:mod:`fedlora_kernels.triton_feddora`, on that package's launchers plus one Triton GEMM of its own.

Owning W₀ lets the branch's share of dx be written together with the base's, instead of autograd adding two N×k
tensors (which, at N=8192, 4096→4096, r=16, bf16, was ≈ 0.19 GB of the ≈ 0.64 GB the branch costs beyond the base
GEMMs, counted, not timed). Two ways to run the base GEMMs (``base_gemm``, default ``FEDLORA_BASE_GEMM`` or
``cublas``):

* ``cublas``: torch's GEMMs for x W₀ᵀ + b and dy W₀; the forward kernel adds s u Bᵀ while it streams the base output
  into y (as in :func:`~fedlora_kernels.triton_feddora.feddora_lora_triton`), and the backward's pass over x adds
  its dx into the base's dx in place: no extra N×k tensor, no autograd add.
* ``triton``: :func:`_linear_lora_kernel`, a Triton GEMM whose epilogue adds the low-rank term to y (u from a u-only
  pass over x) and to dx, so neither y nor dx is written twice.

``benchmarks.kernels`` can time both (``feddora_linear_cublas``, ``feddora_linear_triton``) next to the unfused op.
W₀ and b are frozen in PEFT; if they require grad anyway, dW₀ = dyᵀx and db = Σ dy are computed with torch.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch.nn import functional as F

from .reference import check_inputs, feddora_lora_reference
from .triton_feddora import launch
from .triton_feddora.kernels import dropout_keep, mma

BASE_GEMM_ENV = "FEDLORA_BASE_GEMM"
BASE_GEMMS = ("cublas", "triton")


@triton.jit
def _linear_lora_kernel(
    a_ptr,
    w_ptr,
    bias_ptr,
    l_ptr,
    l_gain_ptr,
    r_ptr,
    r_gain_ptr,
    out_ptr,
    seed_ptr,
    n_rows,
    n_out,
    n_red,
    rank,
    stride_a_m,
    stride_a_k,
    stride_w_n,
    stride_w_k,
    stride_r_n,
    stride_r_r,
    l_scale,
    dropout_p,
    HAS_BIAS: tl.constexpr,
    HAS_R_GAIN: tl.constexpr,
    DROPOUT: tl.constexpr,
    FP32_DOT: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """out[R_i, O_j] = a[R_i] W[O_j]ᵀ (+ bias[O_j]) + M ⊙ (L[R_i] diag(l_scale·l_gain) R[O_j]ᵀ), with
    R[o, :] = R₀[o, :] · r_gain[o] and M the dropout keep-mask of out's columns (DROPOUT):

    forward:  a = x, W = W₀ (d×k), L = u, l_gain = g_B, l_scale = s, R₀ = V_B;
    backward: a = dy, W = W₀ᵀ (k×d), L = t, l_gain = g_B, l_scale = s q, R₀ = V_Aᵀ, r_gain = g_A, M = x's mask.

    Programs are ordered in groups of GROUP_M row tiles so that consecutive programs share W tiles in L2.
    """
    pid = tl.program_id(0)
    row_tiles = tl.cdiv(n_rows, BLOCK_M)
    out_tiles = tl.cdiv(n_out, BLOCK_N)
    per_group = GROUP_M * out_tiles
    first_row_tile = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(row_tiles - first_row_tile, GROUP_M)
    pid_m = first_row_tile + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    dtype = w_ptr.dtype.element_ty

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    outs = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    out_ok = outs < n_out
    rows64 = rows.to(tl.int64)
    outs64 = outs.to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, n_red, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < n_red
        ks64 = ks.to(tl.int64)
        a = tl.load(
            a_ptr + rows64[:, None] * stride_a_m + ks64[None, :] * stride_a_k,
            mask=row_ok[:, None] & k_ok[None, :],
            other=0.0,
        ).to(dtype)
        w = tl.load(
            w_ptr + ks64[:, None] * stride_w_k + outs64[None, :] * stride_w_n,
            mask=k_ok[:, None] & out_ok[None, :],
            other=0.0,
        )
        acc = mma(a, w, acc, FP32_DOT, PRECISION)

    # Epilogue: the low-rank term, a (BLOCK_M × BLOCK_R) · (BLOCK_R × BLOCK_N) dot on register tiles.
    ranks = tl.arange(0, BLOCK_R)
    rank_ok = ranks < rank
    low = tl.load(l_ptr + rows64[:, None] * rank + ranks[None, :], mask=row_ok[:, None] & rank_ok[None, :], other=0.0)
    l_gain = tl.load(l_gain_ptr + ranks, mask=rank_ok, other=0.0) * l_scale
    r_t = tl.load(
        r_ptr + ranks[:, None] * stride_r_r + outs64[None, :] * stride_r_n,
        mask=rank_ok[:, None] & out_ok[None, :],
        other=0.0,
    ).to(tl.float32)
    if HAS_R_GAIN:
        r_t = r_t * tl.load(r_gain_ptr + outs, mask=out_ok, other=0.0)[None, :]
    zero = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    branch = mma((low * l_gain[None, :]).to(dtype), r_t.to(dtype), zero, FP32_DOT, PRECISION)
    if DROPOUT:
        branch = branch * dropout_keep(
            tl.load(seed_ptr), rows64, pid_n * BLOCK_N, n_out, dropout_p, BLOCK_N, tl.float32
        )
    acc += branch
    if HAS_BIAS:
        acc += tl.load(bias_ptr + outs, mask=out_ok, other=0.0).to(tl.float32)[None, :]
    mask = row_ok[:, None] & out_ok[None, :]
    tl.store(out_ptr + rows64[:, None] * n_out + outs64[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


def _linear_lora(
    a: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None,
    low: torch.Tensor,
    l_gain: torch.Tensor,
    l_scale: float,
    r0: torch.Tensor,
    r_gain: torch.Tensor | None,
    seed: torch.Tensor | None,
    dropout_p: float,
    mode: launch.DotMode,
) -> torch.Tensor:
    """a wᵀ (+ bias) + M ⊙ (low diag(l_scale·l_gain) (r0 diag r_gain)ᵀ) for a (N×K), w (n_out×K), r0 (n_out×r)."""
    config = launch.CONFIG  # read at each call: tests replace it
    n_rows, n_red = a.shape
    n_out, rank = r0.shape
    out = torch.empty((n_rows, n_out), device=a.device, dtype=a.dtype)
    block_r = launch.rank_tile(rank)
    block_m = launch.tile(config.gemm_block_m, block_r, a.dtype)
    block_n = launch.tile(config.gemm_block_n, block_r, a.dtype)
    block_k = launch.tile(config.gemm_block_k, 16, a.dtype)
    grid = (triton.cdiv(n_rows, block_m) * triton.cdiv(n_out, block_n),)
    _linear_lora_kernel[grid](
        a, w, bias, low, l_gain, r0, r_gain, out, seed, n_rows, n_out, n_red, rank,
        *a.stride(), *w.stride(), *r0.stride(), l_scale, dropout_p,
        HAS_BIAS=bias is not None, HAS_R_GAIN=r_gain is not None, DROPOUT=seed is not None, **mode.constexprs(),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_R=block_r, GROUP_M=8,
        num_warps=config.num_warps_gemm, num_stages=config.num_stages,
    )  # fmt: skip
    return out


class _FedDoRALinearFunction(torch.autograd.Function):
    """Autograd of ``x W₀ᵀ + b`` plus the reference's branch, on 2-D x (N×k)."""

    @staticmethod
    def forward(
        ctx, x, weight, bias, direction_a, magnitude_a, direction_b, magnitude_b, scaling, dropout_p, base_gemm
    ):
        mode = launch.DotMode.of(x.dtype)
        saved = launch.scales(direction_a, magnitude_a, direction_b, magnitude_b, dropout_p)
        inputs = (x, direction_a, direction_b, saved)
        if base_gemm == "triton":
            _, u = launch.forward_pass(*inputs, None, scaling, dropout_p, mode, compute_y=False)
            y = _linear_lora(x, weight, bias, u, saved.gain_b, scaling, direction_b, None, None, 0.0, mode)
        else:
            y, u = launch.forward_pass(*inputs, F.linear(x, weight, bias), scaling, dropout_p, mode)
        ctx.save_for_backward(x, weight, direction_a, direction_b, u, *saved)
        ctx.scaling, ctx.dropout_p, ctx.base_gemm = scaling, dropout_p, base_gemm
        return y

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, direction_a, direction_b, u, *saved = ctx.saved_tensors
        saved = launch.Scales(*saved)
        need_dx, need_w, need_bias, *need_params = ctx.needs_input_grad[:7]
        need_adapter = any(need_params)
        grad_out = grad_out.contiguous()
        mode = launch.DotMode.of(x.dtype)
        w_scale = ctx.scaling / (1.0 - ctx.dropout_p)
        dx = grad_a_parts = grad_b_parts = None
        if need_dx or need_adapter:
            t, grad_b_parts = launch.grad_output_pass(grad_out, direction_b, u if need_adapter else None, mode)
            fused_dx = need_dx and ctx.base_gemm == "triton"
            if fused_dx:  # dx = dy W₀ + the branch's dx, in one GEMM on the (k×d) view W₀ᵀ
                branch = (t, saved.gain_b, w_scale, direction_a.t(), saved.gain_a, saved.seed, ctx.dropout_p)
                dx = _linear_lora(grad_out, weight.t(), None, *branch, mode)
            if (need_dx and not fused_dx) or need_adapter:
                dx_base = grad_out @ weight if need_dx and not fused_dx else None
                dx_branch, grad_a_parts = launch.grad_input_pass(
                    x, t, direction_a, saved, w_scale, ctx.dropout_p, dx_base is not None, need_adapter, mode, dx_base
                )
                dx = dx if fused_dx else dx_branch
        params = launch.parameter_grads(
            need_params, grad_a_parts, grad_b_parts, direction_a, direction_b, saved, ctx.scaling
        )
        grad_weight = grad_out.t() @ x if need_w else None
        grad_bias = grad_out.sum(0) if need_bias else None
        return dx, grad_weight, grad_bias, *params, None, None, None


def feddora_linear_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    direction_a: torch.Tensor,
    magnitude_a: torch.Tensor,
    direction_b: torch.Tensor,
    magnitude_b: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    base_gemm: str | None = None,
) -> torch.Tensor:
    """Experimental (see the module docstring): ``F.linear(x, weight, bias)`` plus the FedDoRA branch as one op.

    x (..., k), weight (d×k), bias (d,) or None and the four adapter parameters share one dtype (fp32, fp16 or bf16);
    the dropout mask is the one of :func:`~fedlora_kernels.triton_feddora.dropout_keep_mask` for the op's seed."""
    base_gemm = base_gemm or os.environ.get(BASE_GEMM_ENV) or "cublas"
    if base_gemm not in BASE_GEMMS:
        raise ValueError(f"base_gemm must be one of {', '.join(BASE_GEMMS)}, got {base_gemm!r}")
    params = (direction_a, magnitude_a, direction_b, magnitude_b)
    check_inputs(x, *params, dropout_p)
    n_in, n_out = x.shape[-1], direction_b.shape[0]
    if weight.shape != (n_out, n_in) or (bias is not None and bias.shape != (n_out,)):
        raise ValueError(
            f"shape mismatch: weight {tuple(weight.shape)}, bias {None if bias is None else tuple(bias.shape)}, "
            f"expected ({n_out}, {n_in}) and ({n_out},)"
        )
    base = (weight,) if bias is None else (weight, bias)
    launch.check_dtypes("feddora_linear_triton", "x, the base weight/bias and the four parameters", (x, *base, *params))
    if x.numel() == 0:
        return feddora_lora_reference(x, *params, scaling, dropout_p, F.linear(x, weight, bias))
    y = _FedDoRALinearFunction.apply(
        x.reshape(-1, n_in), weight, bias, *params, float(scaling), float(dropout_p), base_gemm
    )
    return y.view(*x.shape[:-1], n_out)
