"""The native extension's CUDA kernels (csrc/feddora_ops_cuda.cu) against the float64 reference, on a GPU.

The same checks as tests/test_native.py's for the CPU kernels, on CUDA tensors: ``scaled_factor`` and
``scaled_factor_backward`` (the .cu op: one block per group of up to 32 columns, fp64 column sums reduced over
``threadIdx.y`` in shared memory) and :func:`fedlora_kernels.native.feddora_lora_native` built on them, in float32,
bfloat16 (and float16, float64), outputs and every gradient, under tests/numerics.py's rule (error vs float64 ≤
2 × the same-dtype PyTorch reference's error + atol). Shapes are ragged on purpose: a single row or column, column
counts that are not multiples of the 32-column block, more rows than a block has threads (1024), so every launch
path of the kernels runs.

Collected everywhere, skipped only where no CUDA device is visible. With a GPU, an extension built without CUDA
kernels (or not built) fails these tests with the reason: a GPU check must not pass by skipping them
(``python -m benchmarks.gpu_check`` builds the extension with its CUDA kernels first).
"""

from __future__ import annotations

import pytest
import torch

from fedlora_kernels import native
from fedlora_kernels.reference import NORM_EPS, column_norm, feddora_lora_reference
from tests.numerics import assert_within_reference_error
from tests.test_native import (
    check_dropout_on_the_kept_inputs,
    lora_inputs,
    random_inputs,
    reference_factor,
    value_and_grads,
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device is visible")

CUDA = torch.device("cuda")
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
OPS = torch.ops.fedlora


@pytest.fixture(autouse=True)
def _cuda_kernels_built():
    """With a GPU present, the extension must have its CUDA kernels: a missing build fails, it does not skip."""
    if not native.is_available(CUDA):
        pytest.fail(native.unavailable_reason(CUDA), pytrace=False)


def on_cuda(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: t.to(CUDA) for name, t in tensors.items()}


def assert_matches_reference(impl_fn, ref_fn, inputs: dict[str, torch.Tensor], grad_out: torch.Tensor, **kwargs):
    """``impl_fn`` on CUDA: its output and gradients pass the numerics rule against ``ref_fn`` (float64 on the CPU,
    and in the inputs' dtype on CUDA), and every one of them is a CUDA tensor."""
    inputs, grad_out = on_cuda(inputs), grad_out.to(CUDA)
    impl = value_and_grads(impl_fn, inputs, grad_out, **kwargs)
    same_dtype = value_and_grads(ref_fn, inputs, grad_out, **kwargs)
    ref64 = value_and_grads(
        ref_fn, {name: t.double().cpu() for name, t in inputs.items()}, grad_out.double().cpu(), **kwargs
    )
    for name, value in impl.items():
        assert value.device.type == "cuda", f"{name} is on {value.device}"
        assert value.dtype == same_dtype[name].dtype, f"{name}: dtype {value.dtype} != {same_dtype[name].dtype}"
        assert_within_reference_error(value.cpu(), same_dtype[name].cpu(), ref64[name], name)


def native_factor(direction: torch.Tensor, magnitude: torch.Tensor, scale: float) -> torch.Tensor:
    return OPS.scaled_factor(direction, magnitude, scale)[0]


# (rows, cols): r = 1; ragged column counts (37, 300: not multiples of the 32-column block; 3, 1: narrower than one);
# 1500 and 4100 rows: more rows than a 1024-thread block has, so each thread sums several rows.
FACTOR_SHAPES = [(1, 1), (1, 4097), (4, 37), (16, 300), (300, 3), (23, 1), (1500, 33), (4100, 16)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,cols", FACTOR_SHAPES)
@pytest.mark.parametrize("scale", [1.0, 0.37])
def test_cuda_scaled_factor_and_backward_match_reference(dtype, rows, cols, scale):
    inputs = random_inputs({"direction": (rows, cols), "magnitude": (cols,)}, dtype)
    grad_out = torch.randn(rows, cols, generator=torch.Generator().manual_seed(1)).to(dtype)
    assert_matches_reference(native_factor, reference_factor, inputs, grad_out, scale=scale)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,cols", [(9, 70), (2000, 5)])
def test_cuda_inv_norm_is_float64_reciprocal_column_norm(dtype, rows, cols):
    inputs = on_cuda(random_inputs({"direction": (rows, cols), "magnitude": (cols,)}, dtype))
    _, inv_norm = OPS.scaled_factor(inputs["direction"], inputs["magnitude"])
    expected = 1.0 / column_norm(inputs["direction"].cpu().double())
    assert inv_norm.dtype == torch.float64 and inv_norm.device.type == "cuda"
    torch.testing.assert_close(inv_norm.cpu(), expected, rtol=1e-12, atol=0)


def test_cuda_zero_column_uses_norm_eps():
    inputs = random_inputs({"direction": (5, 40), "magnitude": (40,)}, torch.float64)
    inputs["direction"][:, 2] = 0.0
    inputs["direction"][:, 35] = 0.0  # in the second column block
    _, inv_norm = OPS.scaled_factor(*on_cuda(inputs).values())
    assert inv_norm[2].item() == pytest.approx(NORM_EPS**-0.5, rel=1e-12)
    assert inv_norm[35].item() == pytest.approx(NORM_EPS**-0.5, rel=1e-12)
    grad_out = torch.randn(5, 40, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert_matches_reference(native_factor, reference_factor, inputs, grad_out, scale=1.0)


def test_cuda_scaled_factor_accepts_non_contiguous_direction():
    inputs = on_cuda(random_inputs({"direction": (40, 7), "magnitude": (40,)}, torch.float32))
    direction = inputs["direction"].t()  # (7, 40), column-major
    factor, _ = OPS.scaled_factor(direction, inputs["magnitude"], 2.0)
    expected = reference_factor(direction.cpu().double(), inputs["magnitude"].cpu().double(), 2.0)
    torch.testing.assert_close(factor.cpu().double(), expected, rtol=1e-5, atol=1e-6)


def test_cuda_op_gradcheck_float64():
    """scaled_factor's registered autograd (scaled_factor_backward's CUDA kernel) against finite differences."""
    inputs = on_cuda(random_inputs({"direction": (6, 37), "magnitude": (37,)}, torch.float64))
    leaves = [inputs["direction"].requires_grad_(), inputs["magnitude"].requires_grad_()]
    assert torch.autograd.gradcheck(lambda v, m: OPS.scaled_factor(v, m, 0.7)[0], leaves)


def test_cuda_ops_opcheck():
    """Schemas, fake kernels and autograd registration are consistent with the CUDA kernels."""
    inputs = on_cuda(random_inputs({"direction": (6, 35), "magnitude": (35,)}, torch.float32))
    direction, magnitude = inputs["direction"], inputs["magnitude"]
    factor, inv_norm = OPS.scaled_factor(direction, magnitude, 0.5)
    torch.library.opcheck(OPS.scaled_factor.default, (direction.requires_grad_(), magnitude.requires_grad_(), 0.5))
    torch.library.opcheck(
        OPS.scaled_factor_backward.default, (torch.randn_like(factor), direction.detach(), magnitude.detach(), inv_norm)
    )


# (leading shape of x, k, r, d): ragged 2-D with r = 1, 3-D input, k above one column block, d above 1024 rows of V_B.
LORA_SHAPES = [((7,), 37, 1, 19), ((2, 5), 64, 8, 48), ((33,), 300, 16, 23), ((17,), 45, 4, 1100)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead,k,r,d", LORA_SHAPES)
@pytest.mark.parametrize("base", ["none", "same", "float32"])
def test_cuda_feddora_lora_native_matches_reference(dtype, lead, k, r, d, base):
    inputs = lora_inputs(lead, k, r, d, dtype, base)
    grad_out = torch.randn(*lead, d, generator=torch.Generator().manual_seed(2))
    assert_matches_reference(native.feddora_lora_native, feddora_lora_reference, inputs, grad_out, scaling=1.7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_dropout_matches_reference_on_the_kept_inputs(dtype):
    """As tests/test_native.py's dropout test: x's zero gradient recovers the mask; everything then equals the
    reference (dropout off) on x̃ = x ⊙ mask / (1 − p), with dL/dx = mask / (1 − p) ⊙ dL/dx̃."""
    check_dropout_on_the_kept_inputs(dtype, CUDA)


def test_cuda_feddora_lora_native_gradcheck_float64():
    inputs = on_cuda(lora_inputs((2, 3), 40, 3, 7, torch.float64, "same"))
    names = list(inputs)
    leaves = [inputs[name].requires_grad_() for name in names]

    def fn(*tensors):
        return native.feddora_lora_native(scaling=0.8, **dict(zip(names, tensors, strict=True)))

    assert torch.autograd.gradcheck(fn, leaves)


def test_cuda_matches_the_cpu_kernels():
    """The CUDA and CPU kernels compute the same fp64 sums: float64 factors and gradients agree to rounding."""
    inputs = random_inputs({"direction": (50, 70), "magnitude": (70,)}, torch.float64)
    grad = torch.randn(50, 70, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    cpu = value_and_grads(native_factor, inputs, grad, scale=0.9)
    gpu = value_and_grads(native_factor, on_cuda(inputs), grad.to(CUDA), scale=0.9)
    for name, value in cpu.items():
        torch.testing.assert_close(gpu[name].cpu(), value, rtol=1e-12, atol=1e-14, msg=name)
