"""The ``@triton.jit`` kernels of the FedDoRA op: what one program computes, in the notation of
:mod:`fedlora_kernels.reference`'s docstring and of :mod:`fedlora_kernels.triton_feddora`'s (t, w, split partials).
Grids, tiles and launch options are :mod:`.launch`'s.

Dots accumulate in fp32 (:func:`mma`); every kernel that applies or rebuilds the dropout mask M calls
:func:`dropout_keep` with the same (row, column) indexing.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def mma(a, b, acc, FP32_DOT: tl.constexpr, PRECISION: tl.constexpr):
    """acc + a @ b with fp32 accumulation: on fp32 operands when FP32_DOT, else on a's and b's (16-bit) dtype."""
    f32 = tl.float32
    return tl.dot(a.to(f32), b.to(f32), acc, input_precision=PRECISION) if FP32_DOT else tl.dot(a, b, acc)


@triton.jit
def dropout_keep(seed, rows64, col0, n_cols, dropout_p, BLOCK_COLS: tl.constexpr, DTYPE: tl.constexpr):
    """Dropout keep-mask M of the x tile rows × [col0, col0 + BLOCK_COLS) as 0/1 in ``DTYPE`` (col0 % 4 == 0)::

        M[i, j] = uniform(Philox(seed, i·⌈n_cols/4⌉ + ⌊j/4⌋)[j mod 4]) ≥ p

    One Philox call gives four 32-bit values, each used for one column. Compiled for sm_90 (a 16×64 mask tile, 4
    warps, cuobjdump -sass), ``tl.rand`` per element took 552 instructions per thread for its 8 elements (69 per
    element: one full Philox each), this 240 (30, stores and addressing included); the bf16 r=16 forward with
    dropout went from 168 to 100 registers, the 64-row dx+dA backward pass from 250 to 210
    (benchmarks/compile_check.py). Not timed: no GPU yet. Every kernel that applies or rebuilds M
    calls this function with the same (row, column) indexing, so the forward, the backward and
    :func:`~.launch.dropout_keep_mask` see the same mask whatever their tiles (all multiples of 4 wide).
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
def _store_scales(squares, m_ptr, norm_ptr, gain_ptr, cols, col_ok, eps):
    """n_c = sqrt(S_c + eps) and g_c = m_c / n_c in fp32, from the column sums of squares S."""
    norm = tl.sqrt(squares + eps)
    magnitude = tl.load(m_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    tl.store(norm_ptr + cols, norm, mask=col_ok)
    tl.store(gain_ptr + cols, magnitude / norm, mask=col_ok)


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
    group) it writes n and g (:func:`_store_scales`); with SPLIT, S as partial i, which
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
        _store_scales(squares, m_ptr, norm_ptr, gain_ptr, cols, col_ok, eps)


@triton.jit
def _column_norm_finish_kernel(
    part_ptr, m_ptr, norm_ptr, gain_ptr, n_parts, n_cols, eps, BLOCK_PARTS: tl.constexpr, BLOCK_COLS: tl.constexpr
):
    """n and g (:func:`_store_scales`) from the partials S_p of a split :func:`_column_norm_kernel`: S = Σ_p S_p."""
    cols = tl.program_id(0) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    col_ok = cols < n_cols
    squares = tl.zeros((BLOCK_COLS,), dtype=tl.float32)
    for p0 in range(0, n_parts, BLOCK_PARTS):
        parts = p0 + tl.arange(0, BLOCK_PARTS)
        mask = (parts < n_parts)[:, None] & col_ok[None, :]
        squares += tl.sum(tl.load(part_ptr + parts[:, None] * n_cols + cols[None, :], mask=mask, other=0.0), axis=0)
    _store_scales(squares, m_ptr, norm_ptr, gain_ptr, cols, col_ok, eps)


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
    """Program (i, j): u for token rows i (A = V_A diag g_A scaled on load; u stored by j = 0), then y for
    out-features [j·outs_per_program, (j+1)·outs_per_program), as (s u diag g_B) V_Bᵀ plus base in the epilogue."""
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
            x = x * dropout_keep(seed, rows64, k0, n_in, dropout_p, BLOCK_K, tl.float32 if FP32_DOT else dtype)
        va_t = tl.load(
            va_ptr + cols[:, None] * stride_va_k + ranks[None, :] * stride_va_r,
            mask=col_ok[:, None] & rank_ok[None, :],
            other=0.0,
        )
        gain_a = tl.load(gain_a_ptr + cols, mask=col_ok, other=0.0)
        u = mma(x, (va_t.to(tl.float32) * gain_a[:, None]).to(dtype), u, FP32_DOT, PRECISION)
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
        y = mma(h, vb_t, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), FP32_DOT, PRECISION)
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
            db = mma(tl.trans(dy), u.to(dtype), db, FP32_DOT, PRECISION)
            if COMPUTE_T:
                t = mma(dy, vb, tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32), FP32_DOT, PRECISION)
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
            t = mma(dy, vb, t, FP32_DOT, PRECISION)
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
    formed on load (w_scale = s q, so that w = q du):

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
            keep = dropout_keep(
                seed, rows64, pid_k * BLOCK_K, n_in, dropout_p, BLOCK_K, tl.float32 if FP32_DOT else dtype
            )
        if COMPUTE_DA:
            x_offsets = rows64[:, None] * stride_x_m + cols[None, :].to(tl.int64) * stride_x_k
            x = tl.load(x_ptr + x_offsets, mask=mask, other=0.0)
            if DROPOUT:
                x = x * keep
            da = mma(tl.trans(w), x, da, FP32_DOT, PRECISION)
        if COMPUTE_DX:
            dx = mma(w, a, tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32), FP32_DOT, PRECISION)
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
    """(dV, dm) of a factor F = V diag(g), g = m/n, by the column-norm projection of the reference's docstring, from
    split partials of its gradient: dF = scale Σ_p P_p and <dF_c, V_c> = scale Σ_q D_q[c]. Row block 0 writes dm."""
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
    keep = dropout_keep(tl.load(seed_ptr), rows64, tl.program_id(1) * BLOCK_N, n_cols, dropout_p, BLOCK_N, tl.float32)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    tl.store(keep_ptr + rows64[:, None] * n_cols + cols[None, :], keep != 0.0, mask=mask)
