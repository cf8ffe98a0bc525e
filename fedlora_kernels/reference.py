"""Pure-PyTorch reference of the FedDoRA low-rank branch.

For an adapted linear with in_features k, out_features d and rank r::

    g_A = m_A / ‖V_A‖_col            (k,)   column norms of V_A (r×k)
    g_B = m_B / ‖V_B‖_col            (r,)   column norms of V_B (d×r)
    A   = V_A · diag(g_A)            (r×k)
    B   = V_B · diag(g_B)            (d×r)
    y   = base_out + s · dropout(x) Aᵀ Bᵀ

Column norms carry an eps guard inside the square root, ``‖v‖ = sqrt(Σ v² + NORM_EPS)``, so they are smooth
and never zero. Every accelerated backend (Triton, native) implements :func:`feddora_lora_reference`'s
signature unchanged and is tested against it in float64.
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
    """
    lora_a, lora_b = effective_factors(direction_a, magnitude_a, direction_b, magnitude_b)
    if dropout_p > 0.0:
        x = F.dropout(x, p=dropout_p, training=True)
    y = F.linear(F.linear(x, lora_a), lora_b * scaling)
    if base_out is None:
        return y
    return base_out + y.to(base_out.dtype)
