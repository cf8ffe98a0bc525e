"""Launch planning and launchers of the FedDoRA op's kernels (:mod:`.kernels`): tiles, grids, splits over SMs and the
launch options, each launcher one pass of :mod:`fedlora_kernels.triton_feddora`'s plan. The op (:mod:`.op`) and the
fused linear op (:mod:`fedlora_kernels.triton_feddora_linear`) call these by their public names.

``CONFIG`` and ``_sm_count`` are read at every launch, from this module (tests replace ``CONFIG`` with small tiles,
benchmarks.compile_check replaces ``_sm_count`` with a target's SM count, both through the package).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton

from ..reference import NORM_EPS
from .kernels import (
    _column_norm_finish_kernel,
    _column_norm_kernel,
    _factor_grad_kernel,
    _forward_kernel,
    _grad_input_kernel,
    _grad_output_kernel,
    _keep_mask_kernel,
)

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes and launch parameters of every kernel of the op and the fused linear op: the one place to tune them.

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
# Planning
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


def check_dtypes(op: str, what: str, tensors: tuple[torch.Tensor, ...]) -> None:
    """TypeError unless ``tensors`` (described by ``what``) share one of :data:`SUPPORTED_DTYPES`."""
    if tensors[0].dtype not in SUPPORTED_DTYPES or any(t.dtype != tensors[0].dtype for t in tensors):
        raise TypeError(
            f"{op} needs {what} in one of float32/float16/bfloat16, got " + ", ".join(str(t.dtype) for t in tensors)
        )


@dataclass(frozen=True)
class DotMode:
    """How the kernels multiply: fp32 operands (fp32 inputs, or the CPU interpreter) and the fp32 dot precision.

    Dots accumulate in fp32 on bf16/fp16 tensor cores; fp32 inputs use IEEE fp32 dots (TF32 only when
    ``torch.get_float32_matmul_precision()`` allows it). Under ``TRITON_INTERPRET=1`` every dot runs on fp32 operands,
    because the interpreter's bf16 dot is wrong.
    """

    fp32_dot: bool
    precision: str

    @staticmethod
    def of(dtype: torch.dtype) -> DotMode:
        if _interpreting():
            return DotMode(True, "ieee")
        if dtype == torch.float32:
            return DotMode(True, "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32")
        return DotMode(False, "ieee")

    def constexprs(self) -> dict[str, bool | str]:
        """The kernels' FP32_DOT and PRECISION arguments."""
        return {"FP32_DOT": self.fp32_dot, "PRECISION": self.precision}


def rank_tile(rank: int) -> int:
    """Tile along the rank: ``max(16, next_pow2(r))`` (16 is the smallest dot operand dimension)."""
    return max(16, triton.next_power_of_2(rank))


def _pow2_floor(value: int) -> int:
    return 1 << (max(value, 1).bit_length() - 1)


def tile(preferred: int, block_r: int, dtype: torch.dtype) -> int:
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


def _matrix(t: torch.Tensor) -> tuple[int, int, int, int]:
    """(rows, cols, row stride, column stride) of a 2-D tensor, as the per-column kernels take them."""
    return (*t.shape, *t.stride())


# --------------------------------------------------------------------------------------------------------------------
# Launchers: the column scales and factor gradients (small, per column), the dropout seed and mask
# --------------------------------------------------------------------------------------------------------------------


class Scales(NamedTuple):
    """What the op computes before its pass over x and saves for backward: both factors' column norms n and gains
    g = m/n (fp32), and the dropout seed (None without dropout)."""

    norm_a: torch.Tensor
    gain_a: torch.Tensor
    norm_b: torch.Tensor
    gain_b: torch.Tensor
    seed: torch.Tensor | None


def scales(
    direction_a: torch.Tensor,
    magnitude_a: torch.Tensor,
    direction_b: torch.Tensor,
    magnitude_b: torch.Tensor,
    dropout_p: float,
) -> Scales:
    """Both factors' :func:`column_scales`, and a fresh dropout seed when ``dropout_p`` > 0."""
    seed = draw_dropout_seed(direction_a.device) if dropout_p > 0.0 else None
    return Scales(*column_scales(direction_a, magnitude_a), *column_scales(direction_b, magnitude_b), seed)


def column_scales(direction: torch.Tensor, magnitude: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
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
    outputs = (magnitude, norm, gain)
    options = {"BLOCK_COLS": block_cols, "num_warps": CONFIG.num_warps}
    _column_norm_kernel[grid](
        direction, *outputs, parts, *_matrix(direction), rows_per_program, NORM_EPS,
        SPLIT=parts is not None, BLOCK_ROWS=block_rows, **options,
    )  # fmt: skip
    if parts is not None:
        _column_norm_finish_kernel[(col_tiles,)](parts, *outputs, grid[0], n_cols, NORM_EPS, BLOCK_PARTS=16, **options)
    return norm, gain


def factor_grads(
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
        parts, dots, direction, gain, norm, grad_direction, grad_magnitude, parts.shape[0], dots.shape[0],
        *_matrix(direction), scale,
        BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols, BLOCK_PARTS=16, num_warps=CONFIG.num_warps,
    )  # fmt: skip
    return grad_direction, grad_magnitude


def parameter_grads(
    needed: Sequence[bool],
    grad_a_parts: tuple[torch.Tensor, torch.Tensor] | None,
    grad_b_parts: tuple[torch.Tensor, torch.Tensor] | None,
    direction_a: torch.Tensor,
    direction_b: torch.Tensor,
    saved: Scales,
    scaling: float,
) -> list[torch.Tensor | None]:
    """[dV_A, dm_A, dV_B, dm_B] (None where ``needed`` is False) from the passes' split partials of dA and dB/s."""
    if not any(needed):
        return [None] * 4
    grads = (
        *factor_grads(*grad_a_parts, direction_a, saved.norm_a, saved.gain_a, 1.0),
        *factor_grads(*grad_b_parts, direction_b, saved.norm_b, saved.gain_b, scaling),
    )
    return [grad if need else None for grad, need in zip(grads, needed, strict=True)]


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


# --------------------------------------------------------------------------------------------------------------------
# Launchers: the passes over the N-sized tensors
# --------------------------------------------------------------------------------------------------------------------


def forward_pass(
    x: torch.Tensor,
    direction_a: torch.Tensor,
    direction_b: torch.Tensor,
    saved: Scales,
    base_out: torch.Tensor | None,
    scaling: float,
    dropout_p: float,
    mode: DotMode,
    compute_y: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(y, u): y in base's dtype (x's without base) and u in fp32, from one read of x; without ``compute_y``, u alone
    (y is None).

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
    block_r = rank_tile(rank)
    block_n = tile(CONFIG.block_n, block_r, x.dtype)
    block_m = tile(CONFIG.block_m, block_r, x.dtype)
    sms = _sm_count(x.device)
    while block_m > 16 and triton.cdiv(n_rows, block_m) < sms:  # smaller row tiles until every SM has one
        block_m //= 2
    row_tiles = triton.cdiv(n_rows, block_m)
    out_splits = max(1, min(sms // row_tiles, triton.cdiv(n_out, block_n)))
    outs_per_program = _split(n_out, out_splits, block_n)
    grid = (row_tiles, triton.cdiv(n_out, outs_per_program) if n_out else 1)
    _forward_kernel[grid](
        x, direction_a, saved.gain_a, direction_b, saved.gain_b, base_out, y, u, saved.seed,
        n_rows, n_in, n_out, rank, *x.stride(), *direction_a.stride(), *direction_b.stride(),
        *((0, 0) if base_out is None else base_out.stride()),
        scaling, dropout_p, 1.0 / (1.0 - dropout_p), outs_per_program,
        HAS_BASE=base_out is not None, DROPOUT=saved.seed is not None, **mode.constexprs(),
        BLOCK_M=block_m, BLOCK_K=tile(CONFIG.block_k, block_r, x.dtype), BLOCK_N=block_n, BLOCK_R=block_r,
        num_warps=CONFIG.num_warps, num_stages=CONFIG.num_stages,
    )  # fmt: skip
    return (y if compute_y else None), u


def grad_output_pass(
    dy: torch.Tensor, direction_b: torch.Tensor, u: torch.Tensor | None, mode: DotMode
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """t = dy V_B (N×r, fp32) and, when ``u`` is given, the split partials of dyᵀu and of its column dots with V_B.

    Both come from one read of dy (t as one partial per out-feature tile, summed here) when those partials cost less
    traffic than reading dy again; otherwise t is computed by token-row tiles over all out-features, and dB by a
    second pass over dy.
    """
    n_rows, n_out = dy.shape
    rank = direction_b.shape[1]
    block_r = rank_tile(rank)
    block_m = tile(CONFIG.block_m, block_r, direction_b.dtype)
    block_n = tile(CONFIG.block_n_grad, block_r, direction_b.dtype)

    def launch(grid, t, db, db_dot, rows_per_program, compute_t, compute_db):
        _grad_output_kernel[grid](
            dy, direction_b, u, t, db, db_dot, n_rows, n_out, rank, *dy.stride(), *direction_b.stride(),
            rows_per_program, COMPUTE_T=compute_t, COMPUTE_DB=compute_db, **mode.constexprs(),
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=block_r,
            num_warps=CONFIG.num_warps_grad, num_stages=CONFIG.num_stages,
        )  # fmt: skip

    empty = functools.partial(torch.empty, device=dy.device, dtype=torch.float32)
    if u is None:
        t = empty((n_rows, rank))
        launch((triton.cdiv(n_rows, block_m), 1), t, None, None, block_m, True, False)
        return t, None

    out_tiles = triton.cdiv(n_out, block_n)
    row_groups = max(1, CONFIG.programs_per_sm * _sm_count(dy.device) // out_tiles)
    rows_per_program = _split(n_rows, row_groups, block_m)
    grid = (triton.cdiv(n_rows, rows_per_program), out_tiles)
    db, db_dot = empty((grid[0], n_out, rank)), empty((grid[0] * grid[1], rank))
    if out_tiles * rank * 4 * 2 <= n_out * dy.element_size():  # writing + summing t's partials < reading dy
        t_parts = empty((out_tiles, n_rows, rank))
        launch(grid, t_parts, db, db_dot, rows_per_program, True, True)
        return t_parts.sum(0), (db, db_dot)
    t, _ = grad_output_pass(dy, direction_b, None, mode)
    launch(grid, None, db, db_dot, rows_per_program, False, True)
    return t, (db, db_dot)


def grad_input_pass(
    x: torch.Tensor,
    t: torch.Tensor,
    direction_a: torch.Tensor,
    saved: Scales,
    w_scale: float,
    dropout_p: float,
    need_dx: bool,
    need_da: bool,
    mode: DotMode,
    dx_into: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, tuple[torch.Tensor, torch.Tensor] | None]:
    """dx and the split partials of dA and of its column dots with V_A, from one read of x (w = w_scale · t diag g_B).

    With ``dx_into`` (contiguous N×k, x's dtype), dx is added to it in place and it is returned as dx."""
    n_rows, n_in = x.shape
    rank = direction_a.shape[0]
    block_r = rank_tile(rank)
    block_m = tile(CONFIG.block_m_grad_input, block_r, x.dtype)
    block_k = tile(CONFIG.block_k, block_r, x.dtype)
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
        x, dx, t, direction_a, saved.gain_a, saved.gain_b, da, da_dot, saved.seed, n_rows, n_in, rank,
        *x.stride(), *direction_a.stride(), w_scale, dropout_p, rows_per_program,
        COMPUTE_DX=need_dx, ACCUMULATE_DX=dx_into is not None, COMPUTE_DA=need_da, DROPOUT=saved.seed is not None,
        **mode.constexprs(), BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_R=block_r,
        num_warps=CONFIG.num_warps_grad_input, num_stages=CONFIG.num_stages,
    )  # fmt: skip
    return dx, ((da, da_dot) if need_da else None)
