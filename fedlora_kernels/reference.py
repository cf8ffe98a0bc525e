"""Pure-PyTorch reference of the FedDoRA low-rank branch, and the one statement of its math.

Every other implementation (the Triton op in :mod:`fedlora_kernels.triton_feddora`, the fused linear op in
:mod:`fedlora_kernels.triton_feddora_linear`, the native op in :mod:`fedlora_kernels.native` and its C++/CUDA kernels
in ``csrc/``) computes what is stated here, refers to this docstring for it, and is tested against
:func:`feddora_lora_reference` in float64. They all check their inputs with :func:`check_inputs`.

**Forward.** x is (N×k) (leading dims flattened), V_A (r×k), m_A (k,), V_B (d×r), m_B (r,), s the scaling, p the
dropout probability, M the dropout keep-mask of x (0/1, N×k) and q = 1/(1-p)::

    n_A = ‖V_A‖_col   (k,)      g_A = m_A / n_A      A = V_A diag(g_A)   (r×k)
    n_B = ‖V_B‖_col   (r,)      g_B = m_B / n_B      B = V_B diag(g_B)   (d×r)
    x̃   = q M⊙x                                                          (N×k)
    u   = x̃ Aᵀ                                                           (N×r)
    y   = base_out + s u Bᵀ                                              (N×d)

Column norms carry an eps guard inside the square root, ``‖v‖ = sqrt(Σ v² + NORM_EPS)``, so they are smooth and never
zero.

**Backward**, given dy = ∂L/∂y::

    ∂L/∂base_out = dy
    dB = s dyᵀ u                                                         (d×r)
    du = s dy B = s (dy V_B) diag(g_B)                                   (N×r)
    dA = duᵀ x̃                                                           (r×k)
    dx = q M ⊙ (du A)                                                    (N×k)

and, for each factor F = V diag(m/n) (A or B) with gradient dF, the projection through its column norms::

    dm_j = <dF_j, V_j> / n_j                  dV_j = (m_j / n_j) (dF_j − V_j <dF_j, V_j> / n_j²)

dV_j is g_j times dF_j with its component along V_j removed: a cancellation that vanishes (up to NORM_EPS) when
dF_j ∥ V_j, e.g. for every column of a rank-1 V_A, which is why the implementations accumulate <dF_j, V_j> in fp32 or
wider.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NORM_EPS = 1e-12
"""Added to the squared column norm before the square root: ``‖v‖ = sqrt(Σ v² + NORM_EPS)``."""


def column_norm(direction: torch.Tensor) -> torch.Tensor:
    """Euclidean norm of every column of a 2-D ``direction``, accumulated in at least float32.

    Returns a vector of length ``direction.shape[1]`` in ``direction``'s dtype.
    """
    acc_dtype = torch.promote_types(direction.dtype, torch.float32)
    squared = direction.to(acc_dtype).square().sum(dim=0)
    return torch.sqrt(squared + NORM_EPS).to(direction.dtype)


def effective_factors(
    direction_a: torch.Tensor,
    magnitude_a: torch.Tensor,
    direction_b: torch.Tensor,
    magnitude_b: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The LoRA factors A = V_A·diag(m_A/‖V_A‖_col) (r×k) and B = V_B·diag(m_B/‖V_B‖_col) (d×r)."""
    lora_a = direction_a * (magnitude_a / column_norm(direction_a))
    lora_b = direction_b * (magnitude_b / column_norm(direction_b))
    return lora_a, lora_b


def feddora_delta_weight(
    direction_a: torch.Tensor,
    magnitude_a: torch.Tensor,
    direction_b: torch.Tensor,
    magnitude_b: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """The weight update ΔW = s · B A (d×k, PyTorch's out×in layout) that merging adds to the base weight."""
    lora_a, lora_b = effective_factors(direction_a, magnitude_a, direction_b, magnitude_b)
    return scaling * (lora_b @ lora_a)


def check_inputs(
    x: torch.Tensor,
    direction_a: torch.Tensor,
    magnitude_a: torch.Tensor,
    direction_b: torch.Tensor,
    magnitude_b: torch.Tensor,
    dropout_p: float,
    base_out: torch.Tensor | None = None,
) -> None:
    """The input check of every backend: shapes, dtypes and devices that agree, and dropout_p in [0, 1).

    The four parameters share one dtype and device; x is on that device (its dtype is the backend's to check: under
    autocast it may differ); base_out, when given, too. What a backend supports beyond this (dtypes, a base_out of
    exactly x's leading shape) it checks itself.

    Raises:
        ValueError: naming the first mismatch.
    """
    if direction_a.dim() != 2 or direction_b.dim() != 2:
        raise ValueError(
            f"direction_a (r, k) and direction_b (d, r) must be 2-D, got {tuple(direction_a.shape)} and "
            f"{tuple(direction_b.shape)}"
        )
    rank, in_features = direction_a.shape
    if direction_b.shape[1] != rank:
        raise ValueError(
            f"shape mismatch: direction_b has {direction_b.shape[1]} columns but direction_a has rank {rank} rows"
        )
    for name, magnitude, size in (("magnitude_a", magnitude_a, in_features), ("magnitude_b", magnitude_b, rank)):
        if magnitude.shape != (size,):
            raise ValueError(f"shape mismatch: {name} must have shape ({size},), got {tuple(magnitude.shape)}")
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise ValueError(
            f"shape mismatch: x must have shape (..., {in_features}) to match direction_a, got {tuple(x.shape)}"
        )
    factors = {"magnitude_a": magnitude_a, "direction_b": direction_b, "magnitude_b": magnitude_b}
    for name, tensor in factors.items():
        if tensor.dtype != direction_a.dtype or tensor.device != direction_a.device:
            raise ValueError(
                f"{name} is {tensor.dtype} on {tensor.device} but direction_a is {direction_a.dtype} on "
                f"{direction_a.device}"
            )
    for name, tensor in (("x", x), ("base_out", base_out)):
        if tensor is not None and tensor.device != direction_a.device:
            raise ValueError(f"{name} is on {tensor.device} but the adapter's factors are on {direction_a.device}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")


def feddora_lora_reference(
    x: torch.Tensor,
    direction_a: torch.Tensor,
    magnitude_a: torch.Tensor,
    direction_b: torch.Tensor,
    magnitude_b: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    base_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``base_out + s · dropout(x) Aᵀ Bᵀ`` for x of shape (..., k); differentiable in all inputs.

    Args:
        x: input activations, shape (..., k).
        direction_a: V_A, shape (r, k).
        magnitude_a: m_A, shape (k,).
        direction_b: V_B, shape (d, r).
        magnitude_b: m_B, shape (r,).
        scaling: s (lora_alpha / r, or lora_alpha / √r with rsLoRA).
        dropout_p: probability of zeroing an element of x in the low-rank branch only (0 disables it;
            callers pass 0 in eval mode).
        base_out: optional output of the frozen base layer, shape (..., d), to which the branch is added
            (in ``base_out``'s dtype). Without it the branch alone is returned.

    Returns:
        Tensor of shape (..., d).

    Raises:
        ValueError: inconsistent inputs (see :func:`check_inputs`).
    """
    check_inputs(x, direction_a, magnitude_a, direction_b, magnitude_b, dropout_p, base_out)
    lora_a, lora_b = effective_factors(direction_a, magnitude_a, direction_b, magnitude_b)
    if dropout_p > 0.0:
        x = F.dropout(x, p=dropout_p, training=True)
    y = F.linear(F.linear(x, lora_a), lora_b * scaling)
    if base_out is None:
        return y
    return base_out + y.to(base_out.dtype)
