"""Kernels for the FedDoRA low-rank branch: the op, its float64-checkable reference and the backends."""

from .backend import BackendUnavailableError, feddora_lora, select_backend
from .reference import (
    NORM_EPS,
    column_norm,
    effective_factors,
    feddora_delta_weight,
    feddora_lora_reference,
)

__all__ = [
    "NORM_EPS",
    "BackendUnavailableError",
    "column_norm",
    "effective_factors",
    "feddora_delta_weight",
    "feddora_lora",
    "feddora_lora_reference",
    "select_backend",
]
