"""The fused FedDoRA linear op (base weight owned by the op, both base-GEMM modes) against the float64 reference:
output and the gradients of x, the four adapter parameters, and (when asked) the base weight and bias, under
tests/numerics.py's rule. Interpreter-sized with 16-wide tiles on CPU; the same cases on a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch.nn import functional as F

pytest.importorskip("triton")

from fedlora_kernels import feddora_lora_reference, triton_feddora  # noqa: E402
from fedlora_kernels.triton_feddora import draw_dropout_seed, dropout_keep_mask  # noqa: E402
from fedlora_kernels.triton_feddora_linear import feddora_linear_triton  # noqa: E402
from tests.numerics import assert_within_reference_error  # noqa: E402
from tests.test_kernels_triton import DEVICE, DTYPES, ON_CUDA, SMALL_TILES  # noqa: E402

SCALING = 0.75
PARAMS = ("direction_a", "magnitude_a", "direction_b", "magnitude_b")


@dataclass(frozen=True)
class Case:
    lead: tuple[int, ...]
    k: int
    d: int
    r: int
    dropout_p: float = 0.0
    bias: bool = True
    transposed: bool = False
    """x 3-D with its two leading dims swapped in memory."""

    def __str__(self) -> str:
        lead = "x".join(map(str, self.lead))
        tail = ("bias" if self.bias else "nobias") + ("-transposed" if self.transposed else "")
        return f"N{lead}-k{self.k}-d{self.d}-r{self.r}-p{self.dropout_p}-{tail}"


CASES = (
    Case((33,), k=40, d=24, r=4),
    Case((7,), k=24, d=40, r=1, bias=False),
    Case((21,), k=32, d=48, r=16, dropout_p=0.3),
    Case((3, 5), k=33, d=18, r=5, dropout_p=0.5, transposed=True),
)
GPU_CASES = (
    Case((2, 1024), k=4096, d=4096, r=16, dropout_p=0.1),
    Case((333,), k=1000, d=11008, r=16),
    Case((4, 250), k=2048, d=2048, r=64, dropout_p=0.2, bias=False, transposed=True),
)


@pytest.fixture
def small_tiles(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(triton_feddora, "CONFIG", SMALL_TILES)


def _values(case: Case) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    values = {
        "x": torch.randn((*case.lead, case.k), generator=gen, dtype=torch.float64),
        "weight": torch.randn((case.d, case.k), generator=gen, dtype=torch.float64) / case.k**0.5,
        "direction_a": torch.randn((case.r, case.k), generator=gen, dtype=torch.float64),
        "magnitude_a": torch.rand(case.k, generator=gen, dtype=torch.float64) + 0.5,
        "direction_b": torch.randn((case.d, case.r), generator=gen, dtype=torch.float64),
        "magnitude_b": torch.rand(case.r, generator=gen, dtype=torch.float64) + 0.5,
        "dy": torch.randn((*case.lead, case.d), generator=gen, dtype=torch.float64),
    }
    if case.bias:
        values["bias"] = torch.randn(case.d, generator=gen, dtype=torch.float64)
    return values


def _run(op, values, dtype, case, trainable, keep=None):
    leaves = {}
    for name in ("x", "weight", "bias", *PARAMS):
        if name not in values:
            continue
        tensor = values[name].to(DEVICE, dtype)
        if name == "x" and case.transposed:
            tensor = tensor.transpose(0, 1).contiguous().transpose(0, 1)
        leaves[name] = tensor.requires_grad_(name in trainable)
    params = [leaves[name] for name in PARAMS]
    if op == "fused":
        y = feddora_linear_triton(
            leaves["x"], leaves["weight"], leaves.get("bias"), *params, SCALING, case.dropout_p, base_gemm=_run.gemm
        )
    else:
        x = leaves["x"]
        base = F.linear(x, leaves["weight"], leaves.get("bias"))
        dropped = x if keep is None else x * (keep.reshape(x.shape).to(dtype) / (1 - case.dropout_p))
        y = feddora_lora_reference(dropped, *params, SCALING, base_out=base)
    y.backward(values["dy"].to(DEVICE, y.dtype))
    return y.detach(), {name: leaf.grad for name, leaf in leaves.items() if name in trainable}


def _check(case: Case, dtype: torch.dtype, gemm: str, trainable: tuple[str, ...]) -> None:
    values = _values(case)
    _run.gemm = gemm
    torch.manual_seed(1234)
    y, grads = _run("fused", values, dtype, case, trainable)
    keep = None
    if case.dropout_p > 0.0:
        torch.manual_seed(1234)  # the op drew exactly this seed
        keep = dropout_keep_mask(draw_dropout_seed(DEVICE), y.numel() // case.d, case.k, case.dropout_p)
    y_t, grads_t = _run("reference", values, dtype, case, trainable, keep)
    y_64, grads_64 = _run("reference", values, torch.float64, case, trainable, keep)
    assert y.dtype == dtype
    assert_within_reference_error(y, y_t, y_64, "output")
    for name in trainable:
        assert grads[name] is not None, name
        assert_within_reference_error(grads[name], grads_t[name], grads_64[name], f"grad {name}")


@pytest.mark.usefixtures("small_tiles")
@pytest.mark.parametrize("gemm", ["cublas", "triton"])
@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_float64_reference(case: Case, dtype: torch.dtype, gemm: str) -> None:
    _check(case, dtype, gemm, ("x", *PARAMS))


@pytest.mark.skipif(not ON_CUDA, reason="large shapes at the default tiles need a GPU")
@pytest.mark.parametrize("gemm", ["cublas", "triton"])
@pytest.mark.parametrize("case", GPU_CASES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_float64_reference_default_tiles(case: Case, dtype: torch.dtype, gemm: str) -> None:
    _check(case, dtype, gemm, ("x", *PARAMS))


@pytest.mark.usefixtures("small_tiles")
@pytest.mark.parametrize("gemm", ["cublas", "triton"])
@pytest.mark.parametrize(
    "trainable", [("x",), PARAMS, ("x", "weight", "bias")], ids=["x-only", "adapter-only", "base-trainable"]
)
def test_requested_gradients(gemm: str, trainable: tuple[str, ...]) -> None:
    _check(Case((19,), k=24, d=40, r=3, dropout_p=0.2), torch.float32, gemm, trainable)


def test_invalid_inputs() -> None:
    values = _values(Case((1,), k=24, d=16, r=2))
    args = [values[name].to(DEVICE, torch.float32) for name in ("x", "weight", "bias", *PARAMS)]
    with pytest.raises(ValueError, match="base_gemm"):
        feddora_linear_triton(*args, SCALING, base_gemm="cutlass")
    with pytest.raises(ValueError, match="shape mismatch"):
        feddora_linear_triton(args[0], args[1][:, :20], *args[2:], SCALING)
    with pytest.raises(TypeError, match="float32/float16/bfloat16"):
        feddora_linear_triton(args[0], args[1].half(), *args[2:], SCALING)
