"""Kernels for the FedDoRA low-rank branch: the op, its float64-checkable reference and the backends."""

from .reference import (
    NORM_EPS,
    column_norm,
    effective_factors,
    feddora_delta_weight,
    feddora_lora_reference,
)

feddora_lora = feddora_lora_reference

__all__ = [
    "NORM_EPS",
    "column_norm",
    "effective_factors",
    "feddora_delta_weight",
    "feddora_lora",
    "feddora_lora_reference",
]
