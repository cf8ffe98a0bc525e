"""Tolerance rule shared by the kernel and tuner tests (flash-attention's rule).

An implementation in dtype ``t`` passes when, element-wise in max-norm,
``|impl - ref64| ≤ 2 · |torch_t - ref64| + atol · max(1, |ref64|)``, where ``ref64`` is the float64 PyTorch reference and
``torch_t`` the same PyTorch reference computed in dtype ``t``.
"""

from __future__ import annotations

import torch

ATOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def max_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    """Largest absolute difference, computed in float64."""
    return (value.double() - reference.double()).abs().max().item()


def assert_within_reference_error(
    impl: torch.Tensor, same_dtype_torch: torch.Tensor, ref64: torch.Tensor, name: str = "output"
) -> None:
    """Assert ``impl`` is at most twice as far from ``ref64`` as ``same_dtype_torch`` is, plus the dtype's atol."""
    assert impl.shape == ref64.shape, f"{name}: shape {tuple(impl.shape)} != {tuple(ref64.shape)}"
    scale = max(ref64.abs().max().item(), 1.0)
    atol = ATOL[same_dtype_torch.dtype] * scale
    impl_err = max_error(impl, ref64)
    torch_err = max_error(same_dtype_torch, ref64)
    assert impl_err <= 2 * torch_err + atol, (
        f"{name}: error {impl_err:.3e} > 2 × torch error {torch_err:.3e} + atol {atol:.3e}"
    )
