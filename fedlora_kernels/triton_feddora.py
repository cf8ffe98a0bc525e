"""Triton kernels and the autograd op of the FedDoRA low-rank branch (one file per op, Liger-Kernel style).

Notation (see :mod:`fedlora_kernels.reference`): x is (N×k), V_A (r×k), m_A (k,), V_B (d×r), m_B (r,), s the scaling,
M the dropout keep-mask of x and q = 1/(1-p). Column norms and gains are kept in fp32::

    n_A = ‖V_A‖_col,  g_A = m_A / n_A        A = V_A diag(g_A)        (‖v‖ = sqrt(Σ v² + NORM_EPS))
    n_B = ‖V_B‖_col,  g_B = m_B / n_B        B = V_B diag(g_B)
    u   = q (M⊙x) Aᵀ                          (N×r, fp32, saved for backward)
    y   = base + s u Bᵀ

Backward, with t = dy V_B (N×r) and w = s q t diag(g_B) (so that q·∂L/∂u = w)::

    d base = dy
    dB     = s dyᵀ u                          dA = wᵀ (M⊙x)                    dx = M ⊙ (w A)

and for each factor F = V diag(m/n) with gradient dF, through the column norms::

    dm_j = <dF_j, V_j> / n_j                  dV_j = (m_j / n_j) (dF_j − V_j <dF_j, V_j> / n_j²)

Passes over the N-sized tensors: the forward reads x once and base once and writes y once (A, B and s·u diag(g_B)
only ever exist as register tiles, y is produced in the epilogue of the second GEMM, so there is no N×k or N×d
temporary; only the N×r fp32 u is stored, for backward). The backward reads dy
once (t and dB together, when t's split partials are smaller than dy, see :func:`_grad_output_pass`) and x once
(dx and dA together), writes dx once, and never stores a copy of x: the dropout mask is regenerated from a Philox
seed. The reductions over N (dB, dA) run split over row groups into fp32 partials; a small kernel sums them and
applies the column-norm projection (the <dF_j, V_j> dots are accumulated in the epilogues of the passes).

Dots accumulate in fp32 on bf16/fp16 tensor cores; fp32 inputs use IEEE fp32 dots (TF32 only when
``torch.get_float32_matmul_precision()`` allows it). Under ``TRITON_INTERPRET=1`` every dot runs on fp32 operands,
because the interpreter's bf16 dot is wrong.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .reference import NORM_EPS, feddora_lora_reference

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes and launch parameters of every kernel in this file: the one place to tune them.

    The defaults target H100/H200 (132 SMs, 228 KB shared memory per SM) at the bf16, r=16 shapes of LLM training.
    Tiles along the rank are ``max(16, next_pow2(r))`` wide; the token, in- and out-feature tiles shrink as r grows so
    that every fp32 accumulator holds at most ``max_acc_elements`` values.
    """

    block_m: int = 64
    """Largest token-row tile."""
    block_k: int = 128
    """In-feature tile (x, dx, V_A)."""
    block_n: int = 64
    """Out-feature tile of the forward (y, base, V_B). 64, not 128: compiled for sm_90 (bf16, r=16, 32-row tiles,
    4 warps), 128 took 72 registers and spilled 24 bytes; 64 takes 60 and does not spill (sm_80: 144 → 96)."""
    block_n_grad: int = 128
    """Out-feature tile of the backward's pass over dy (dy, dB). 128, not 256: compiled for sm_90 (bf16, r=16,
    8 warps, 3 stages), 256 took 116-120 KB of shared memory, one CTA per SM, so the split over tokens (two programs
    per SM) ran in two waves; 128 takes 60-64 KB and 35-63 registers: 3 CTAs per SM (sm_80: 2)."""
    block_m_grad_input: int = 32
    """Token-row tile of the backward's pass over x (dx, dA). 32, not 64: compiled for sm_90 (bf16, r=16, dx and
    dA, 8 warps; benchmarks/compile_check.py), 64 rows took 148 registers (210 with dropout), so one CTA per SM and
    3 waves of 132/132/24 programs at N=8192, 4096²; 32 rows take 66 (86 with dropout): 2-3 CTAs per SM. Estimated
    from registers and shared memory, not timed (no GPU yet)."""
    num_warps_grad_input: int = 8
    gemm_block_m: int = 64
    """Token-row tile of the fused linear op's Triton GEMM (:mod:`fedlora_kernels.triton_feddora_linear`)."""
    gemm_block_n: int = 128
    gemm_block_k: int = 64
    num_warps_gemm: int = 8
    max_acc_elements: int = 4096
    """Largest fp32 accumulator tile (rows × padded rank)."""
    fp32_tile: int = 32
    """Largest token/feature tile for fp32 inputs. Their dots are IEEE fp32 (FMA, no tensor cores) or TF32, with
    twice the operand bytes of bf16; at the bf16 tiles ptxas spilled up to 8.5 KB (forward, sm_80) and 6.7 KB
    (backward, sm_90) per thread, at 32-wide tiles 0-4 bytes (benchmarks/compile_check.py). The fp32 path stays
    (a bf16 model with PEFT's default ``autocast_adapter_dtype`` keeps the adapter, and so this op, in fp32), at
    these tiles; running it in the activation dtype would change the numerics the layer promises."""
    block_reduce: int = 64
    """Column tile of the small column-norm and factor-gradient kernels."""
    programs_per_sm: int = 2
    """Grid size the split reductions over tokens aim at, per SM: at most this many programs per SM (rounded down,
    so that the grid is one wave when this many CTAs fit on an SM, which compile_check shows for the backward's
    passes at the default tiles)."""
    num_warps: int = 4
    num_warps_grad: int = 8
    num_stages: int = 3
    interpreter_sms: int = 4
    """SM count assumed when running under the CPU interpreter."""


CONFIG = KernelConfig()
"""The configuration every launch reads (tests replace it with small tiles)."""


# --------------------------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------------------------


@triton.jit
def _mma(a, b, acc, FP32_DOT: tl.constexpr, PRECISION: tl.constexpr):
    """acc + a @ b with fp32 accumulation: on fp32 operands when FP32_DOT, else on a's and b's (16-bit) dtype."""
    f32 = tl.float32
    return tl.dot(a.to(f32), b.to(f32), acc, input_precision=PRECISION) if FP32_DOT else tl.dot(a, b, acc)


@triton.jit
def _keep(seed, rows64, col0, n_cols, dropout_p, BLOCK_COLS: tl.constexpr, DTYPE: tl.constexpr):
    """Dropout keep-mask M of the x tile rows × [col0, col0 + BLOCK_COLS) as 0/1 in ``DTYPE`` (col0 % 4 == 0)::

        M[i, j] = uniform(Philox(seed, i·⌈n_cols/4⌉ + ⌊j/4⌋)[j mod 4]) ≥ p

    One Philox call gives four 32-bit values, each used for one column. Compiled for sm_90 (a 16×64 mask tile, 4
    warps, cuobjdump -sass), ``tl.rand`` per element took 552 instructions per thread for its 8 elements (69 per
    element: one full Philox each), this 240 (30, stores and addressing included); the bf16 r=16 forward with
    dropout went from 168 to 100 registers, the 64-row dx+dA backward pass from 250 to 210
    (benchmarks/compile_check.py). Not timed: no GPU yet. Every kernel that applies or rebuilds M
    calls this function with the same (row, column) indexing, so the forward, the backward and
    :func:`dropout_keep_mask` see the same mask whatever their tiles (all multiples of 4 wide).
    """
    groups = col0 // 4 + tl.arange(0, BLOCK_COLS // 4)
    r0, r1, r2, r3 = tl.randint4x(seed, rows64[:, None] * ((n_cols + 3) // 4) + groups[None, :])
    k0 = tl.where(tl.random.uint_to_uniform_float(r0) >= dropout_p, 1.0, 0.0).to(DTYPE)
    k1 = tl.where(tl.random.uint_to_uniform_float(r1) >= dropout_p, 1.0, 0.0).to(DTYPE)
    k2 = tl.where(tl.random.uint_to_uniform_float(r2) >= dropout_p, 1.0, 0.0).to(DTYPE)
    k3 = tl.where(tl.random.uint_to_uniform_float(r3) >= dropout_p, 1.0, 0.0).to(DTYPE)
    # [i, g, a, b] = k_(2a+b)[i, g], so that the row-major reshape puts k_q[i, g] at column 4g + q
    keep = tl.join(tl.join(k0, k2), tl.join(k1, k3))
    return tl.reshape(keep, (rows64.shape[0], BLOCK_COLS))


@triton.jit
def _column_norm_kernel(
    v_ptr,
    m_ptr,
    norm_ptr,
    gain_ptr,
    part_ptr,
    n_rows,
    n_cols,
    stride_v_r,
    stride_v_c,
    rows_per_program,
    eps,
    SPLIT: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
):
    """Program (i, j): S = Σ V[R_i, c]² over row group R_i for the columns c of block j. Without SPLIT (one row
    group) it writes n_c = sqrt(S + eps) and g_c = m_c / n_c in fp32; with SPLIT, S as partial i, which
    :func:`_column_norm_finish_kernel` sums. V_B (d×r) has few columns and many rows: unsplit, one program would
    stream all d rows (at lm_head sizes, megabytes through one SM)."""
    pid_r = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    col_ok = cols < n_cols
    row_end = tl.minimum((pid_r + 1) * rows_per_program, n_rows)
    squares = tl.zeros((BLOCK_COLS,), dtype=tl.float32)
    for r0 in range(pid_r * rows_per_program, row_end, BLOCK_ROWS):
        rows = r0 + tl.arange(0, BLOCK_ROWS)
        mask = (rows < row_end)[:, None] & col_ok[None, :]
        v = tl.load(v_ptr + rows[:, None] * stride_v_r + cols[None, :] * stride_v_c, mask=mask, other=0.0)
        v = v.to(tl.float32)
        squares += tl.sum(v * v, axis=0)
    if SPLIT:
        tl.store(part_ptr + pid_r * n_cols + cols, squares, mask=col_ok)
    else:
        norm = tl.sqrt(squares + eps)
        magnitude = tl.load(m_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        tl.store(norm_ptr + cols, norm, mask=col_ok)
        tl.store(gain_ptr + cols, magnitude / norm, mask=col_ok)


@triton.jit
def _column_norm_finish_kernel(
    part_ptr, m_ptr, norm_ptr, gain_ptr, n_parts, n_cols, eps, BLOCK_PARTS: tl.constexpr, BLOCK_COLS: tl.constexpr
):
    """n_c = sqrt(Σ_p S_p[c] + eps) and g_c = m_c / n_c from the partials of a split :func:`_column_norm_kernel`."""
    cols = tl.program_id(0) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    col_ok = cols < n_cols
    squares = tl.zeros((BLOCK_COLS,), dtype=tl.float32)
    for p0 in range(0, n_parts, BLOCK_PARTS):
        parts = p0 + tl.arange(0, BLOCK_PARTS)
        mask = (parts < n_parts)[:, None] & col_ok[None, :]
        squares += tl.sum(tl.load(part_ptr + parts[:, None] * n_cols + cols[None, :], mask=mask, other=0.0), axis=0)
    norm = tl.sqrt(squares + eps)
    magnitude = tl.load(m_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    tl.store(norm_ptr + cols, norm, mask=col_ok)
    tl.store(gain_ptr + cols, magnitude / norm, mask=col_ok)


@triton.jit
def _forward_kernel(
    x_ptr,
    va_ptr,
    gain_a_ptr,
    vb_ptr,
    gain_b_ptr,
    base_ptr,
    y_ptr,
    u_ptr,
    seed_ptr,
    n_rows,
    n_in,
    n_out,
    rank,
    stride_x_m,
    stride_x_k,
    stride_va_r,
    stride_va_k,
    stride_vb_d,
    stride_vb_r,
    stride_base_m,
    stride_base_d,
    scaling,
    dropout_p,
    keep_scale,
    outs_per_program,
    HAS_BASE: tl.constexpr,
    DROPOUT: tl.constexpr,
    FP32_DOT: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """Program (i, j): u = q (M⊙x) Aᵀ for token rows i (prologue scales A = V_A diag g_A on load, stored by j = 0),
    then y = base + (s u diag g_B) V_Bᵀ for out-features [j·outs_per_program, (j+1)·outs_per_program)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    dtype = va_ptr.dtype.element_ty
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    rows64 = rows.to(tl.int64)
    ranks = tl.arange(0, BLOCK_R)
    rank_ok = ranks < rank
    if DROPOUT:
        seed = tl.load(seed_ptr)

    u = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, n_in, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < n_in
        x = tl.load(
            x_ptr + rows64[:, None] * stride_x_m + cols[None, :].to(tl.int64) * stride_x_k,
            mask=row_ok[:, None] & col_ok[None, :],
            other=0.0,
        )
        if DROPOUT:
            x = x * _keep(seed, rows64, k0, n_in, dropout_p, BLOCK_K, tl.float32 if FP32_DOT else dtype)
        va_t = tl.load(
            va_ptr + cols[:, None] * stride_va_k + ranks[None, :] * stride_va_r,
            mask=col_ok[:, None] & rank_ok[None, :],
            other=0.0,
        )
        gain_a = tl.load(gain_a_ptr + cols, mask=col_ok, other=0.0)
        u = _mma(x, (va_t.to(tl.float32) * gain_a[:, None]).to(dtype), u, FP32_DOT, PRECISION)
    u = u * keep_scale
    u_stored = ranks < tl.where(pid_n == 0, rank, 0)  # one program per token tile stores u
    tl.store(u_ptr + rows64[:, None] * rank + ranks[None, :], u, mask=row_ok[:, None] & u_stored[None, :])

    gain_b = tl.load(gain_b_ptr + ranks, mask=rank_ok, other=0.0)
    h = (u * (gain_b * scaling)[None, :]).to(dtype)
    out_start = pid_n * outs_per_program
    out_end = tl.minimum(out_start + outs_per_program, n_out)
    for n0 in range(out_start, out_end, BLOCK_N):
        outs = n0 + tl.arange(0, BLOCK_N)
        out_ok = outs < out_end
        vb_t = tl.load(
            vb_ptr + ranks[:, None] * stride_vb_r + outs[None, :] * stride_vb_d,
            mask=rank_ok[:, None] & out_ok[None, :],
            other=0.0,
        )
        y = _mma(h, vb_t, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), FP32_DOT, PRECISION)
        mask = row_ok[:, None] & out_ok[None, :]
        if HAS_BASE:
            base_offsets = rows64[:, None] * stride_base_m + outs[None, :].to(tl.int64) * stride_base_d
            base = tl.load(base_ptr + base_offsets, mask=mask)
            y += base.to(tl.float32)
        tl.store(y_ptr + rows64[:, None] * n_out + outs[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _grad_output_kernel(
    dy_ptr,
    vb_ptr,
    u_ptr,
    t_ptr,
    db_ptr,
    db_dot_ptr,
    n_rows,
    n_out,
    rank,
    stride_dy_m,
    stride_dy_d,
    stride_vb_d,
    stride_vb_r,
    rows_per_program,
    COMPUTE_T: tl.constexpr,
    COMPUTE_DB: tl.constexpr,
    FP32_DOT: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """One read of dy. With COMPUTE_DB, program (i, j) streams the token rows R_i of out-feature tile O_j and writes

    T_j[R_i] = dy[R_i, O_j] V_B[O_j]                          (t = Σ_j T_j; only when COMPUTE_T)
    P_i[O_j] = dy[R_i, O_j]ᵀ u[R_i]                           (dB = s Σ_i P_i)
    D_ij     = <P_i[O_j]_c, V_B[O_j]_c> for every column c     (<dB_c, V_B,c> = s Σ_ij D_ij)

    Without it, program i streams all out-features of token-row tile i and writes t[tile i] = dy[tile i] V_B whole.
    Either way the streaming loop is the only loop, so it is software-pipelined.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    dtype = vb_ptr.dtype.element_ty
    ranks = tl.arange(0, BLOCK_R)
    rank_ok = ranks < rank
    if COMPUTE_DB:
        outs = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        vb_mask = (outs < n_out)[:, None] & rank_ok[None, :]
        vb = tl.load(vb_ptr + outs[:, None] * stride_vb_d + ranks[None, :] * stride_vb_r, mask=vb_mask, other=0.0)
        db = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
        row_end = tl.minimum((pid_m + 1) * rows_per_program, n_rows)
        for m0 in range(pid_m * rows_per_program, row_end, BLOCK_M):
            rows = m0 + tl.arange(0, BLOCK_M)
            rows64 = rows.to(tl.int64)
            row_rank_mask = (rows < row_end)[:, None] & rank_ok[None, :]
            dy = tl.load(
                dy_ptr + rows64[:, None] * stride_dy_m + outs[None, :].to(tl.int64) * stride_dy_d,
                mask=(rows < row_end)[:, None] & (outs < n_out)[None, :],
                other=0.0,
            ).to(dtype)
            u = tl.load(u_ptr + rows64[:, None] * rank + ranks[None, :], mask=row_rank_mask, other=0.0)
            db = _mma(tl.trans(dy), u.to(dtype), db, FP32_DOT, PRECISION)
            if COMPUTE_T:
                t = _mma(dy, vb, tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32), FP32_DOT, PRECISION)
                t_part = t_ptr + pid_n.to(tl.int64) * n_rows * rank
                tl.store(t_part + rows64[:, None] * rank + ranks[None, :], t, mask=row_rank_mask)
        tl.store(db_ptr + pid_m.to(tl.int64) * n_out * rank + outs[:, None] * rank + ranks[None, :], db, mask=vb_mask)
        dots = tl.sum(db * vb.to(tl.float32), axis=0)
        tl.store(db_dot_ptr + (pid_m * tl.num_programs(1) + pid_n) * rank + ranks, dots, mask=rank_ok)
    else:
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rows64 = rows.to(tl.int64)
        t = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for n0 in range(0, n_out, BLOCK_N):
            outs = n0 + tl.arange(0, BLOCK_N)
            dy = tl.load(
                dy_ptr + rows64[:, None] * stride_dy_m + outs[None, :].to(tl.int64) * stride_dy_d,
                mask=(rows < n_rows)[:, None] & (outs < n_out)[None, :],
                other=0.0,
            ).to(dtype)
            vb_mask = (outs < n_out)[:, None] & rank_ok[None, :]
            vb = tl.load(vb_ptr + outs[:, None] * stride_vb_d + ranks[None, :] * stride_vb_r, mask=vb_mask, other=0.0)
            t = _mma(dy, vb, t, FP32_DOT, PRECISION)
        tl.store(t_ptr + rows64[:, None] * rank + ranks[None, :], t, mask=(rows < n_rows)[:, None] & rank_ok[None, :])


@triton.jit
def _grad_input_kernel(
    x_ptr,
    dx_ptr,
    t_ptr,
    va_ptr,
    gain_a_ptr,
    gain_b_ptr,
    da_ptr,
    da_dot_ptr,
    seed_ptr,
    n_rows,
    n_in,
    rank,
    stride_x_m,
    stride_x_k,
    stride_va_r,
    stride_va_k,
    w_scale,
    dropout_p,
    rows_per_program,
    COMPUTE_DX: tl.constexpr,
    ACCUMULATE_DX: tl.constexpr,
    COMPUTE_DA: tl.constexpr,
    DROPOUT: tl.constexpr,
    FP32_DOT: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """Program (i, j) streams x over token rows R_i and in-features C_j once, with w = w_scale · t diag(g_B)
    formed on load (w_scale = s q):

    dx[R_i, C_j] = M ⊙ (w[R_i] A[:, C_j])                      (A = V_A diag g_A, scaled on load)
    P_i[:, C_j]  = w[R_i]ᵀ (M⊙x)[R_i, C_j]                     (dA = Σ_i P_i)
    D_i[C_j]     = <P_i[:, c], V_A[:, c]> for every c in C_j     (<dA_c, V_A,c> = Σ_i D_i[c])
    """
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    dtype = va_ptr.dtype.element_ty
    ranks = tl.arange(0, BLOCK_R)
    rank_ok = ranks < rank
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    col_ok = cols < n_in
    row_start = pid_m * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    if DROPOUT:
        seed = tl.load(seed_ptr)

    va = tl.load(
        va_ptr + ranks[:, None] * stride_va_r + cols[None, :] * stride_va_k,
        mask=rank_ok[:, None] & col_ok[None, :],
        other=0.0,
    ).to(tl.float32)
    a = (va * tl.load(gain_a_ptr + cols, mask=col_ok, other=0.0)[None, :]).to(dtype)
    w_col_scale = tl.load(gain_b_ptr + ranks, mask=rank_ok, other=0.0) * w_scale
    da = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    for m0 in range(row_start, row_end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < row_end
        rows64 = rows.to(tl.int64)
        mask = row_ok[:, None] & col_ok[None, :]
        w = tl.load(t_ptr + rows64[:, None] * rank + ranks[None, :], mask=row_ok[:, None] & rank_ok[None, :], other=0.0)
        w = (w * w_col_scale[None, :]).to(dtype)
        if DROPOUT:
            # The mask is a 0/1 multiplier in a float type, not an i1 (nor an integer, which folds back to i1):
            # with dx and dA both needed it is used in two register layouts (x as a dot operand, dx in the MMA
            # accumulator's), and converting between them goes through shared memory, which Triton cannot do for
            # 1-bit elements. Compiling for sm_80/sm_90 (benchmarks/compile_check.py) failed for every fp16/bf16 and
            # TF32 variant with k % 16 == 0 (Triton 3.9: "shared-memory element type bit width must be a multiple of
            # 8; got 1"; 3.6: an assertion in ConvertTritonGPUToLLVM). As in torch's dropout (x · mask), a dropped inf/NaN
            # of x gives NaN, here and in the forward.
            # (16 bits suffice for 0/1; the interpreter's bf16 products are wrong, it uses fp32)
            keep = _keep(seed, rows64, pid_k * BLOCK_K, n_in, dropout_p, BLOCK_K, tl.float32 if FP32_DOT else dtype)
        if COMPUTE_DA:
            x_offsets = rows64[:, None] * stride_x_m + cols[None, :].to(tl.int64) * stride_x_k
            x = tl.load(x_ptr + x_offsets, mask=mask, other=0.0)
            if DROPOUT:
                x = x * keep
            da = _mma(tl.trans(w), x, da, FP32_DOT, PRECISION)
        if COMPUTE_DX:
            dx = _mma(w, a, tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32), FP32_DOT, PRECISION)
            if DROPOUT:
                dx = dx * keep.to(tl.float32)
            dx_tile = dx_ptr + rows64[:, None] * n_in + cols[None, :]
            if ACCUMULATE_DX:  # dx += the base's dx, already in dx_ptr (saves autograd's separate add)
                dx += tl.load(dx_tile, mask=mask, other=0.0).to(tl.float32)
            tl.store(dx_tile, dx.to(dx_ptr.dtype.element_ty), mask=mask)

    if COMPUTE_DA:
        mask = rank_ok[:, None] & col_ok[None, :]
        tl.store(da_ptr + pid_m.to(tl.int64) * rank * n_in + ranks[:, None] * n_in + cols[None, :], da, mask=mask)
        tl.store(da_dot_ptr + pid_m.to(tl.int64) * n_in + cols, tl.sum(da * va, axis=0), mask=col_ok)


@triton.jit
def _factor_grad_kernel(
    part_ptr,
    dot_ptr,
    v_ptr,
    gain_ptr,
    norm_ptr,
    dv_ptr,
    dm_ptr,
    n_parts,
    n_dot_parts,
    n_rows,
    n_cols,
    stride_v_r,
    stride_v_c,
    scale,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
    BLOCK_PARTS: tl.constexpr,
):
    """Projection through the column norms of a factor F = V diag(g), g = m/n, given split partials of its gradient:

    dF = scale Σ_p P_p,   <dF_c, V_c> = scale Σ_q D_q[c],
    dV[:, c] = g_c (dF[:, c] − V[:, c] <dF_c, V_c> / n_c²),   dm_c = <dF_c, V_c> / n_c   (written by row block 0).
    """
    pid_r = tl.program_id(0)
    rows = pid_r * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.program_id(1) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    col_ok = cols < n_cols
    mask = (rows < n_rows)[:, None] & col_ok[None, :]
    offsets = rows[:, None] * n_cols + cols[None, :]

    grad = tl.zeros((BLOCK_ROWS, BLOCK_COLS), dtype=tl.float32)
    part = part_ptr + offsets
    for _ in range(0, n_parts):  # a pointer step per part: no p·n_rows·n_cols product to overflow int32
        grad += tl.load(part, mask=mask, other=0.0)
        part += n_rows * n_cols
    dots = tl.zeros((BLOCK_COLS,), dtype=tl.float32)
    for q0 in range(0, n_dot_parts, BLOCK_PARTS):
        parts = q0 + tl.arange(0, BLOCK_PARTS)
        dot_mask = (parts < n_dot_parts)[:, None] & col_ok[None, :]
        dots += tl.sum(tl.load(dot_ptr + parts[:, None] * n_cols + cols[None, :], mask=dot_mask, other=0.0), axis=0)
    grad *= scale
    dots *= scale

    norm = tl.load(norm_ptr + cols, mask=col_ok, other=1.0)
    gain = tl.load(gain_ptr + cols, mask=col_ok, other=0.0)
    v = tl.load(v_ptr + rows[:, None] * stride_v_r + cols[None, :] * stride_v_c, mask=mask, other=0.0)
    dv = gain[None, :] * (grad - v.to(tl.float32) * (dots / (norm * norm))[None, :])
    tl.store(dv_ptr + offsets, dv.to(dv_ptr.dtype.element_ty), mask=mask)
    dm_stored = cols < tl.where(pid_r == 0, n_cols, 0)  # row block 0 stores dm
    tl.store(dm_ptr + cols, (dots / norm).to(dm_ptr.dtype.element_ty), mask=dm_stored)


@triton.jit
def _keep_mask_kernel(seed_ptr, keep_ptr, n_rows, n_cols, dropout_p, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Materialises the keep-mask M (n_rows × n_cols) that the op's kernels regenerate from the seed."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows64 = rows.to(tl.int64)
    keep = _keep(tl.load(seed_ptr), rows64, tl.program_id(1) * BLOCK_N, n_cols, dropout_p, BLOCK_N, tl.float32)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    tl.store(keep_ptr + rows64[:, None] * n_cols + cols[None, :], keep != 0.0, mask=mask)


# --------------------------------------------------------------------------------------------------------------------
# Launch planning
# --------------------------------------------------------------------------------------------------------------------


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return CONFIG.interpreter_sms


def _pow2_floor(value: int) -> int:
    return 1 << (max(value, 1).bit_length() - 1)


def _tile(preferred: int, block_r: int, dtype: torch.dtype) -> int:
    """``preferred`` (at most ``fp32_tile`` for fp32 inputs) shrunk, to a power of two and at least 16, until a
    (tile × block_r) fp32 accumulator fits."""
    if dtype == torch.float32:
        preferred = min(preferred, CONFIG.fp32_tile)
    return max(16, min(preferred, _pow2_floor(CONFIG.max_acc_elements // block_r)))


def _split(total: int, groups: int, tile: int) -> int:
    """Extent per program when ``total`` is cut into at most ``groups`` pieces of whole tiles."""
    return triton.cdiv(triton.cdiv(total, max(groups, 1)), tile) * tile


def _reduce_tiles(n_rows: int, n_cols: int) -> tuple[int, int]:
    """(rows, cols) tile of the small per-column kernels: up to ``block_reduce`` columns, rows to fill the budget."""
    block_cols = min(CONFIG.block_reduce, triton.next_power_of_2(n_cols))
    return min(triton.next_power_of_2(n_rows), max(1, CONFIG.max_acc_elements // block_cols)), block_cols


@dataclass(frozen=True)
class _DotMode:
    """How the kernels multiply: fp32 operands (fp32 inputs, or the CPU interpreter) and the fp32 dot precision."""

    fp32_dot: bool
    precision: str

    @staticmethod
    def of(dtype: torch.dtype) -> _DotMode:
        if _interpreting():
            return _DotMode(True, "ieee")
        if dtype == torch.float32:
            return _DotMode(True, "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32")
        return _DotMode(False, "ieee")


def _column_scales(direction: torch.Tensor, magnitude: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, g) in fp32: n = ‖direction‖_col, g = magnitude / n.

    When the column blocks alone leave SMs idle and there are many rows (V_B: d×r), the rows are split over
    programs too (at least two row tiles each) and a second small kernel sums their partials.
    """
    n_rows, n_cols = direction.shape
    norm = torch.empty(n_cols, device=direction.device, dtype=torch.float32)
    gain = torch.empty_like(norm)
    block_rows, block_cols = _reduce_tiles(n_rows, n_cols)
    col_tiles = triton.cdiv(n_cols, block_cols)
    row_groups = min(triton.cdiv(n_rows, 2 * block_rows), _sm_count(direction.device) // col_tiles)
    rows_per_program = _split(n_rows, row_groups, block_rows)
    grid = (triton.cdiv(n_rows, rows_per_program), col_tiles)
    parts = torch.empty((grid[0], n_cols), device=direction.device, dtype=torch.float32) if grid[0] > 1 else None
    _column_norm_kernel[grid](
        direction,
        magnitude,
        norm,
        gain,
        parts,
        n_rows,
        n_cols,
        direction.stride(0),
        direction.stride(1),
        rows_per_program,
        NORM_EPS,
        SPLIT=parts is not None,
        BLOCK_ROWS=block_rows,
        BLOCK_COLS=block_cols,
        num_warps=CONFIG.num_warps,
    )
    if parts is not None:
        _column_norm_finish_kernel[(col_tiles,)](
            parts,
            magnitude,
            norm,
            gain,
            grid[0],
            n_cols,
            NORM_EPS,
            BLOCK_PARTS=16,
            BLOCK_COLS=block_cols,
            num_warps=CONFIG.num_warps,
        )
    return norm, gain


def _factor_grads(
    parts: torch.Tensor,
    dots: torch.Tensor,
    direction: torch.Tensor,
    norm: torch.Tensor,
    gain: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dV, dm) of F = direction·diag(gain) from the split partials ``parts`` of dF/scale and ``dots`` of <dF, V>/scale."""
    n_rows, n_cols = direction.shape
    grad_direction = torch.empty((n_rows, n_cols), device=direction.device, dtype=direction.dtype)
    grad_magnitude = torch.empty(n_cols, device=direction.device, dtype=direction.dtype)
    block_rows, block_cols = _reduce_tiles(n_rows, n_cols)
    grid = (triton.cdiv(n_rows, block_rows), triton.cdiv(n_cols, block_cols))
    _factor_grad_kernel[grid](
        parts,
        dots,
        direction,
        gain,
        norm,
        grad_direction,
        grad_magnitude,
        parts.shape[0],
        dots.shape[0],
        n_rows,
        n_cols,
        direction.stride(0),
        direction.stride(1),
        scale,
        BLOCK_ROWS=block_rows,
        BLOCK_COLS=block_cols,
        BLOCK_PARTS=16,
        num_warps=CONFIG.num_warps,
    )
    return grad_direction, grad_magnitude


def _forward_pass(
    x: torch.Tensor,
    direction_a: torch.Tensor,
    gain_a: torch.Tensor,
    direction_b: torch.Tensor,
    gain_b: torch.Tensor,
    base_out: torch.Tensor | None,
    seed: torch.Tensor | None,
    scaling: float,
    dropout_p: float,
    mode: _DotMode,
    compute_y: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(y, u): y = base + s u Bᵀ in base's dtype (x's without base) and u = q (M⊙x) Aᵀ in fp32, from one read of x;
    without ``compute_y``, u alone (y is None).

    Row tiles shrink until every SM has one; when the token count still leaves SMs idle, the out-features are split
    over programs too (each recomputes u for its rows, which costs little because x is then small).
    """
    n_rows, n_in = x.shape
    n_out, rank = direction_b.shape
    out_dtype = x.dtype if base_out is None else base_out.dtype
    u = torch.empty((n_rows, rank), device=x.device, dtype=torch.float32)
    if not compute_y:
        n_out = 0  # the kernel's y loop is then empty
    y = torch.empty((n_rows, n_out), device=x.device, dtype=out_dtype)
    block_r = max(16, triton.next_power_of_2(rank))
    block_n = _tile(CONFIG.block_n, block_r, x.dtype)
    block_m = _tile(CONFIG.block_m, block_r, x.dtype)
    sms = _sm_count(x.device)
    while block_m > 16 and triton.cdiv(n_rows, block_m) < sms:  # smaller row tiles until every SM has one
        block_m //= 2
    row_tiles = triton.cdiv(n_rows, block_m)
    out_splits = max(1, min(sms // row_tiles, triton.cdiv(n_out, block_n)))
    outs_per_program = _split(n_out, out_splits, block_n)
    grid = (row_tiles, triton.cdiv(n_out, outs_per_program) if n_out else 1)
    _forward_kernel[grid](
        x,
        direction_a,
        gain_a,
        direction_b,
        gain_b,
        base_out,
        y,
        u,
        seed,
        n_rows,
        n_in,
        n_out,
        rank,
        x.stride(0),
        x.stride(1),
        direction_a.stride(0),
        direction_a.stride(1),
        direction_b.stride(0),
        direction_b.stride(1),
        0 if base_out is None else base_out.stride(0),
        0 if base_out is None else base_out.stride(1),
        scaling,
        dropout_p,
        1.0 / (1.0 - dropout_p),
        outs_per_program,
        HAS_BASE=base_out is not None,
        DROPOUT=seed is not None,
        FP32_DOT=mode.fp32_dot,
        PRECISION=mode.precision,
        BLOCK_M=block_m,
        BLOCK_K=_tile(CONFIG.block_k, block_r, x.dtype),
        BLOCK_N=block_n,
        BLOCK_R=block_r,
        num_warps=CONFIG.num_warps,
        num_stages=CONFIG.num_stages,
    )
    return (y if compute_y else None), u


def _grad_output_pass(
    dy: torch.Tensor, direction_b: torch.Tensor, u: torch.Tensor | None, mode: _DotMode
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """t = dy V_B (N×r, fp32) and, when ``u`` is given, the split partials of dyᵀu and of its column dots with V_B.

    Both come from one read of dy (t as one partial per out-feature tile, summed here) when those partials cost less
    traffic than reading dy again; otherwise t is computed by token-row tiles over all out-features, and dB by a
    second pass over dy.
    """
    n_rows, n_out = dy.shape
    rank = direction_b.shape[1]
    block_r = max(16, triton.next_power_of_2(rank))
    block_m = _tile(CONFIG.block_m, block_r, direction_b.dtype)
    block_n = _tile(CONFIG.block_n_grad, block_r, direction_b.dtype)

    def launch(grid, t, db, db_dot, rows_per_program, compute_t, compute_db):
        _grad_output_kernel[grid](
            dy,
            direction_b,
            u,
            t,
            db,
            db_dot,
            n_rows,
            n_out,
            rank,
            dy.stride(0),
            dy.stride(1),
            direction_b.stride(0),
            direction_b.stride(1),
            rows_per_program,
            COMPUTE_T=compute_t,
            COMPUTE_DB=compute_db,
            FP32_DOT=mode.fp32_dot,
            PRECISION=mode.precision,
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            BLOCK_R=block_r,
            num_warps=CONFIG.num_warps_grad,
            num_stages=CONFIG.num_stages,
        )

    empty = functools.partial(torch.empty, device=dy.device, dtype=torch.float32)
    if u is None:
        t = empty((n_rows, rank))
        launch((triton.cdiv(n_rows, block_m), 1), t, None, None, block_m, True, False)
        return t, None, None

    out_tiles = triton.cdiv(n_out, block_n)
    row_groups = max(1, CONFIG.programs_per_sm * _sm_count(dy.device) // out_tiles)
    rows_per_program = _split(n_rows, row_groups, block_m)
    grid = (triton.cdiv(n_rows, rows_per_program), out_tiles)
    db, db_dot = empty((grid[0], n_out, rank)), empty((grid[0] * grid[1], rank))
    if out_tiles * rank * 4 * 2 <= n_out * dy.element_size():  # writing + summing t's partials < reading dy
        t_parts = empty((out_tiles, n_rows, rank))
        launch(grid, t_parts, db, db_dot, rows_per_program, True, True)
        return t_parts.sum(0), db, db_dot
    t, _, _ = _grad_output_pass(dy, direction_b, None, mode)
    launch(grid, None, db, db_dot, rows_per_program, False, True)
    return t, db, db_dot


def _grad_input_pass(
    x: torch.Tensor,
    t: torch.Tensor,
    direction_a: torch.Tensor,
    gain_a: torch.Tensor,
    gain_b: torch.Tensor,
    seed: torch.Tensor | None,
    w_scale: float,
    dropout_p: float,
    need_dx: bool,
    need_da: bool,
    mode: _DotMode,
    dx_into: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """dx = M ⊙ (w A) and the split partials of dA = wᵀ(M⊙x) and of its column dots with V_A, from one read of x.

    With ``dx_into`` (contiguous N×k, x's dtype), dx is added to it in place and it is returned as dx."""
    n_rows, n_in = x.shape
    rank = direction_a.shape[0]
    block_r = max(16, triton.next_power_of_2(rank))
    block_m = _tile(CONFIG.block_m_grad_input, block_r, x.dtype)
    block_k = _tile(CONFIG.block_k, block_r, x.dtype)
    col_tiles = triton.cdiv(n_in, block_k)
    row_groups = max(1, CONFIG.programs_per_sm * _sm_count(x.device) // col_tiles) if need_da else n_rows
    rows_per_program = _split(n_rows, row_groups, block_m)
    grid = (triton.cdiv(n_rows, rows_per_program), col_tiles)
    dx = None
    if need_dx:
        dx = torch.empty((n_rows, n_in), device=x.device, dtype=x.dtype) if dx_into is None else dx_into
    da = da_dot = None
    if need_da:
        da = torch.empty((grid[0], rank, n_in), device=x.device, dtype=torch.float32)
        da_dot = torch.empty((grid[0], n_in), device=x.device, dtype=torch.float32)
    _grad_input_kernel[grid](
        x,
        dx,
        t,
        direction_a,
        gain_a,
        gain_b,
        da,
        da_dot,
        seed,
        n_rows,
        n_in,
        rank,
        x.stride(0),
        x.stride(1),
        direction_a.stride(0),
        direction_a.stride(1),
        w_scale,
        dropout_p,
        rows_per_program,
        COMPUTE_DX=need_dx,
        ACCUMULATE_DX=dx_into is not None,
        COMPUTE_DA=need_da,
        DROPOUT=seed is not None,
        FP32_DOT=mode.fp32_dot,
        PRECISION=mode.precision,
        BLOCK_M=block_m,
        BLOCK_K=block_k,
        BLOCK_R=block_r,
        num_warps=CONFIG.num_warps_grad_input,
        num_stages=CONFIG.num_stages,
    )
    return dx, da, da_dot


# --------------------------------------------------------------------------------------------------------------------
# The op
# --------------------------------------------------------------------------------------------------------------------


def draw_dropout_seed(device: torch.device) -> torch.Tensor:
    """The Philox seed of one dropout mask: a 1-element int64 tensor drawn from ``device``'s torch generator.

    It stays on the device (no host sync, CUDA-graph safe); the kernels load it.
    """
    return torch.randint(0, 2**62, (1,), device=device, dtype=torch.int64)


def dropout_keep_mask(seed: torch.Tensor, n_rows: int, n_cols: int, dropout_p: float) -> torch.Tensor:
    """The boolean keep-mask M (n_rows × n_cols) of the flattened input that the op regenerates from ``seed``.

    Lets a caller rebuild the op's dropout exactly: ``dropout(x) = x.reshape(-1, k) * M / (1 - p)``.
    """
    keep = torch.empty((n_rows, n_cols), device=seed.device, dtype=torch.bool)
    grid = (triton.cdiv(n_rows, 16), triton.cdiv(n_cols, 64))
    _keep_mask_kernel[grid](seed, keep, n_rows, n_cols, dropout_p, BLOCK_M=16, BLOCK_N=64)
    return keep


class _FedDoRALoRAFunction(torch.autograd.Function):
    """Autograd of ``base + s·dropout(x) Aᵀ Bᵀ`` on 2-D x (N×k) and base (N×d); see the module docstring."""

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
        mode = _DotMode.of(x.dtype)
        norm_a, gain_a = _column_scales(direction_a, magnitude_a)
        norm_b, gain_b = _column_scales(direction_b, magnitude_b)
        seed = draw_dropout_seed(x.device) if dropout_p > 0.0 else None
        y, u = _forward_pass(x, direction_a, gain_a, direction_b, gain_b, base_out, seed, scaling, dropout_p, mode)
        ctx.save_for_backward(x, direction_a, direction_b, norm_a, gain_a, norm_b, gain_b, u, seed)
        ctx.scaling, ctx.dropout_p, ctx.has_base = scaling, dropout_p, base_out is not None
        return y

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, direction_a, direction_b, norm_a, gain_a, norm_b, gain_b, u, seed = ctx.saved_tensors
        need_dx = ctx.needs_input_grad[0]
        need_weights = any(ctx.needs_input_grad[1:5])
        grad_base = grad_out if ctx.has_base and ctx.needs_input_grad[7] else None
        if not (need_dx or need_weights):
            return None, None, None, None, None, None, None, grad_base

        mode = _DotMode.of(x.dtype)
        t, db, db_dot = _grad_output_pass(grad_out, direction_b, u if need_weights else None, mode)
        dx, da, da_dot = _grad_input_pass(
            x,
            t,
            direction_a,
            gain_a,
            gain_b,
            seed,
            ctx.scaling / (1.0 - ctx.dropout_p),
            ctx.dropout_p,
            need_dx,
            need_weights,
            mode,
        )
        grads_a = grads_b = (None, None)
        if need_weights:
            grads_a = _factor_grads(da, da_dot, direction_a, norm_a, gain_a, 1.0)
            grads_b = _factor_grads(db, db_dot, direction_b, norm_b, gain_b, ctx.scaling)
        weight_grads = [
            g if needed else None for g, needed in zip((*grads_a, *grads_b), ctx.needs_input_grad[1:5], strict=True)
        ]
        return dx, *weight_grads, None, None, grad_base


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
    """``base_out + s · dropout(x) Aᵀ Bᵀ`` with Triton kernels; same contract as
    :func:`~fedlora_kernels.reference.feddora_lora_reference`.

    x (..., k) and the four parameters share one dtype (fp32, fp16 or bf16); base_out (..., d) may have another, which
    the result takes. Leading dims of x are flattened (a copy only when they cannot be viewed flat); any strides work.
    The dropout mask is drawn from a seed (see :func:`draw_dropout_seed`, :func:`dropout_keep_mask`).
    """
    rank, n_in = direction_a.shape
    n_out = direction_b.shape[0]
    if (
        x.shape[-1] != n_in
        or direction_b.shape[1] != rank
        or magnitude_a.shape != (n_in,)
        or magnitude_b.shape != (rank,)
    ):
        raise ValueError(
            f"shape mismatch: x {tuple(x.shape)}, V_A {tuple(direction_a.shape)}, m_A {tuple(magnitude_a.shape)}, "
            f"V_B {tuple(direction_b.shape)}, m_B {tuple(magnitude_b.shape)}"
        )
    tensors = (x, direction_a, magnitude_a, direction_b, magnitude_b)
    if x.dtype not in SUPPORTED_DTYPES or any(t.dtype != x.dtype for t in tensors):
        raise TypeError(
            "feddora_lora_triton needs x and the four parameters in one of float32/float16/bfloat16, got "
            + ", ".join(str(t.dtype) for t in tensors)
        )
    if any(t.device != x.device for t in (*tensors, base_out) if t is not None):
        raise ValueError("x, the four parameters and base_out must be on one device")
    lead = x.shape[:-1]
    if base_out is not None and base_out.shape != (*lead, n_out):
        raise ValueError(f"base_out has shape {tuple(base_out.shape)}, expected {(*lead, n_out)}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if x.numel() == 0:
        return feddora_lora_reference(x, *tensors[1:], scaling, dropout_p, base_out)
    y = _FedDoRALoRAFunction.apply(
        x.reshape(-1, n_in),
        direction_a,
        magnitude_a,
        direction_b,
        magnitude_b,
        float(scaling),
        float(dropout_p),
        None if base_out is None else base_out.reshape(-1, n_out),
    )
    return y.view(*lead, n_out)
