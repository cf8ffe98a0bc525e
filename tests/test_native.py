"""The native extension fedlora_kernels._C (CPU kernels): its ops and feddora_lora_native against the float64 reference.

Every value is checked with the rule of tests/numerics.py: error vs float64 ≤ 2 × the same-dtype PyTorch reference's
error + atol. Without the extension the tests skip with the reason, or fail when FEDLORA_REQUIRE_NATIVE=1 (CI).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from fedlora_kernels import native
from fedlora_kernels.reference import NORM_EPS, column_norm, feddora_lora_reference
from tests.numerics import assert_within_reference_error

REQUIRE_NATIVE = os.environ.get("FEDLORA_REQUIRE_NATIVE") == "1"
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
OPS = torch.ops.fedlora


@pytest.fixture(autouse=True)
def _native_extension_built():
    """Without the extension every test here skips, naming the reason, or fails under FEDLORA_REQUIRE_NATIVE=1 (CI)."""
    if not native.is_available():
        if REQUIRE_NATIVE:
            pytest.fail(f"FEDLORA_REQUIRE_NATIVE=1 but {native.unavailable_reason()}", pytrace=False)
        pytest.skip(native.unavailable_reason())


def random_inputs(shapes: dict[str, tuple[int, ...]], dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    """Tensors of the given shapes in ``dtype``; names starting with ``magnitude`` are positive, the rest N(0, 1)."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in shapes.items():
        value = (
            torch.rand(shape, generator=gen) + 0.5
            if name.startswith("magnitude")
            else torch.randn(shape, generator=gen)
        )
        tensors[name] = value.to(dtype)
    return tensors


def value_and_grads(fn, inputs: dict[str, torch.Tensor], grad_out: torch.Tensor, **kwargs):
    """``fn(**inputs, **kwargs)`` and the gradients of ``<out, grad_out>`` w.r.t. every input."""
    leaves = {name: t.detach().clone().requires_grad_() for name, t in inputs.items()}
    out = fn(**leaves, **kwargs)
    out.backward(grad_out.to(out.dtype))
    return {"output": out.detach(), **{f"grad {name}": leaf.grad for name, leaf in leaves.items()}}


def assert_matches_reference(impl_fn, ref_fn, inputs: dict[str, torch.Tensor], grad_out: torch.Tensor, **kwargs):
    """``impl_fn``'s output and gradients pass the numerics rule against ``ref_fn`` in float64 and in the inputs' dtype."""
    impl = value_and_grads(impl_fn, inputs, grad_out, **kwargs)
    same_dtype = value_and_grads(ref_fn, inputs, grad_out, **kwargs)
    ref64 = value_and_grads(ref_fn, {name: t.double() for name, t in inputs.items()}, grad_out.double(), **kwargs)
    for name, value in impl.items():
        assert value.dtype == same_dtype[name].dtype, f"{name}: dtype {value.dtype} != {same_dtype[name].dtype}"
        assert_within_reference_error(value, same_dtype[name], ref64[name], name)


def reference_factor(direction: torch.Tensor, magnitude: torch.Tensor, scale: float) -> torch.Tensor:
    """The reference's scaled factor: V·diag(m/‖V‖_col) · s, in V's dtype."""
    return direction * (magnitude / column_norm(direction)) * scale


def native_factor(direction: torch.Tensor, magnitude: torch.Tensor, scale: float) -> torch.Tensor:
    return OPS.scaled_factor(direction, magnitude, scale)[0]


FACTOR_SHAPES = [(1, 1), (4, 37), (16, 300), (300, 3), (23, 1)]  # (rows, cols): r=1, ragged, > one column block


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,cols", FACTOR_SHAPES)
@pytest.mark.parametrize("scale", [1.0, 0.37])
def test_scaled_factor_and_backward_match_reference(dtype, rows, cols, scale):
    inputs = random_inputs({"direction": (rows, cols), "magnitude": (cols,)}, dtype)
    grad_out = torch.randn(rows, cols, generator=torch.Generator().manual_seed(1))
    assert_matches_reference(native_factor, reference_factor, inputs, grad_out.to(dtype), scale=scale)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_inv_norm_is_float64_reciprocal_column_norm(dtype):
    inputs = random_inputs({"direction": (9, 70), "magnitude": (70,)}, dtype)
    _, inv_norm = OPS.scaled_factor(inputs["direction"], inputs["magnitude"])
    expected = 1.0 / column_norm(inputs["direction"].double())
    assert inv_norm.dtype == torch.float64
    torch.testing.assert_close(inv_norm.double(), expected, rtol=1e-12, atol=0)


def test_zero_column_uses_norm_eps():
    """A zero column has norm sqrt(NORM_EPS) (the reference's eps): finite outputs and gradients equal to the reference."""
    inputs = random_inputs({"direction": (5, 4), "magnitude": (4,)}, torch.float64)
    inputs["direction"][:, 2] = 0.0
    _, inv_norm = OPS.scaled_factor(inputs["direction"], inputs["magnitude"])
    assert inv_norm[2].item() == pytest.approx(NORM_EPS**-0.5, rel=1e-12)
    grad_out = torch.randn(5, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert_matches_reference(native_factor, reference_factor, inputs, grad_out, scale=1.0)


def test_scaled_factor_accepts_non_contiguous_direction():
    inputs = random_inputs({"direction": (12, 7), "magnitude": (12,)}, torch.float32)
    direction = inputs["direction"].t()  # (7, 12), column-major
    factor, _ = OPS.scaled_factor(direction, inputs["magnitude"], 2.0)
    torch.testing.assert_close(factor, reference_factor(direction, inputs["magnitude"], 2.0))


def test_ops_gradcheck_float64():
    """scaled_factor's registered autograd (scaled_factor_backward) against finite differences."""
    inputs = random_inputs({"direction": (6, 5), "magnitude": (5,)}, torch.float64)
    leaves = [inputs["direction"].requires_grad_(), inputs["magnitude"].requires_grad_()]
    assert torch.autograd.gradcheck(lambda v, m: OPS.scaled_factor(v, m, 0.7)[0], leaves)


def test_ops_opcheck():
    """Schemas, fake kernels and autograd registration are consistent with the CPU kernels."""
    inputs = random_inputs({"direction": (6, 5), "magnitude": (5,)}, torch.float32)
    direction, magnitude = inputs["direction"], inputs["magnitude"]
    factor, inv_norm = OPS.scaled_factor(direction, magnitude, 0.5)
    torch.library.opcheck(OPS.scaled_factor.default, (direction.requires_grad_(), magnitude.requires_grad_(), 0.5))
    torch.library.opcheck(
        OPS.scaled_factor_backward.default, (torch.randn_like(factor), direction.detach(), magnitude.detach(), inv_norm)
    )


# (leading shape of x, k, r, d): ragged 2-D with r=1, 3-D input, k above one CPU column block (256).
LORA_SHAPES = [((7,), 37, 1, 19), ((2, 5), 64, 8, 48), ((33,), 300, 16, 23)]


def lora_inputs(lead, k, r, d, dtype, base, seed=0):
    shapes = {"x": (*lead, k), "direction_a": (r, k), "magnitude_a": (k,), "direction_b": (d, r), "magnitude_b": (r,)}
    if base != "none":
        shapes["base_out"] = (*lead, d)
    inputs = random_inputs(shapes, dtype, seed)
    if base == "float32":
        inputs["base_out"] = inputs["base_out"].float()
    return inputs


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead,k,r,d", LORA_SHAPES)
@pytest.mark.parametrize("base", ["none", "same", "float32"])
def test_feddora_lora_native_matches_reference(dtype, lead, k, r, d, base):
    inputs = lora_inputs(lead, k, r, d, dtype, base)
    grad_out = torch.randn(*lead, d, generator=torch.Generator().manual_seed(2))
    assert_matches_reference(native.feddora_lora_native, feddora_lora_reference, inputs, grad_out, scaling=1.7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_dropout_matches_reference_on_the_kept_inputs(dtype):
    """With dropout, x's gradient is zero exactly where x was dropped: that recovers the mask, and everything must then
    equal the reference (dropout off) on x̃ = x ⊙ mask / (1 − p), with dL/dx = mask / (1 − p) ⊙ dL/dx̃."""
    check_dropout_on_the_kept_inputs(dtype, torch.device("cpu"))


def check_dropout_on_the_kept_inputs(dtype: torch.dtype, device: torch.device) -> None:
    """The dropout check of :func:`test_dropout_matches_reference_on_the_kept_inputs` on ``device``."""
    p = 0.3
    inputs = {name: t.to(device) for name, t in lora_inputs((4, 6), 40, 4, 24, dtype, "same").items()}
    grad_out = torch.randn(4, 6, 24, generator=torch.Generator().manual_seed(2)).to(device)
    torch.manual_seed(3)
    impl = value_and_grads(native.feddora_lora_native, inputs, grad_out, scaling=0.5, dropout_p=p)
    keep = impl["grad x"] != 0
    assert abs(keep.double().mean().item() - (1 - p)) < 0.1

    kept = {**inputs, "x": inputs["x"] * keep * (1 / (1 - p))}
    same_dtype = value_and_grads(feddora_lora_reference, kept, grad_out, scaling=0.5)
    ref64 = value_and_grads(
        feddora_lora_reference, {name: t.double() for name, t in kept.items()}, grad_out.double(), scaling=0.5
    )
    for grads in (same_dtype, ref64):
        grads["grad x"] = grads["grad x"] * keep / (1 - p)
    for name, value in impl.items():
        assert_within_reference_error(value, same_dtype[name], ref64[name], name)


def under_cpu_autocast(fn):
    def run(**kwargs):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return fn(**kwargs)

    return run


@pytest.mark.parametrize("base", ["none", "bfloat16"])
def test_autocast_matches_reference(base):
    """Under autocast the factors are built in float32 and the matmuls run in bfloat16, as in the reference."""
    inputs = lora_inputs((2, 6), 40, 4, 24, torch.float32, "none")
    if base == "bfloat16":
        inputs["base_out"] = torch.randn(2, 6, 24, generator=torch.Generator().manual_seed(4)).bfloat16()
    grad_out = torch.randn(2, 6, 24, generator=torch.Generator().manual_seed(2))
    impl, ref = under_cpu_autocast(native.feddora_lora_native), under_cpu_autocast(feddora_lora_reference)
    assert_matches_reference(impl, ref, inputs, grad_out, scaling=0.9)


def test_feddora_lora_native_gradcheck_float64():
    inputs = lora_inputs((2, 3), 9, 3, 7, torch.float64, "same")
    names = list(inputs)
    leaves = [inputs[name].requires_grad_() for name in names]

    def fn(*tensors):
        return native.feddora_lora_native(scaling=0.8, **dict(zip(names, tensors, strict=True)))

    assert torch.autograd.gradcheck(fn, leaves)


def test_only_requested_gradients_are_computed():
    inputs = lora_inputs((5,), 12, 2, 6, torch.float64, "same")
    trainable = ("magnitude_a", "magnitude_b")
    impl = {name: t.clone().requires_grad_(name in trainable) for name, t in inputs.items()}
    ref = {name: t.clone().requires_grad_(name in trainable) for name, t in inputs.items()}
    native.feddora_lora_native(scaling=1.0, **impl).sum().backward()
    feddora_lora_reference(scaling=1.0, **ref).sum().backward()
    for name in inputs:
        if name in trainable:
            torch.testing.assert_close(impl[name].grad, ref[name].grad)
        else:
            assert impl[name].grad is None, name


@pytest.mark.parametrize("dropout_p", [0.0, 0.5])
def test_empty_input(dropout_p):
    inputs = lora_inputs((0, 3), 10, 2, 4, torch.float32, "same")
    impl = value_and_grads(native.feddora_lora_native, inputs, torch.zeros(0, 3, 4), scaling=1.0, dropout_p=dropout_p)
    assert impl["output"].shape == (0, 3, 4)
    for name in ("direction_a", "magnitude_a", "direction_b", "magnitude_b"):
        assert torch.count_nonzero(impl[f"grad {name}"]) == 0, name


def test_device_support_is_reported():
    assert native.unavailable_reason() == ""
    assert native.is_available("cpu")
    assert native.is_available("cuda") == bool(native._C.with_cuda)
    assert not native.is_available("meta")
    assert "no meta kernels" in native.unavailable_reason("meta")


OP_ERRORS = [
    (lambda v, m: OPS.scaled_factor(v[0], m), "direction must be a 2-D"),
    (lambda v, m: OPS.scaled_factor(v, m[:-1]), r"magnitude must have shape \(5,\)"),
    (lambda v, m: OPS.scaled_factor(v.long(), m.long()), "must be float32, float64, float16 or bfloat16"),
    (lambda v, m: OPS.scaled_factor(v, m.double()), "magnitude dtype"),
    (lambda v, m: OPS.scaled_factor_backward(v[:2], v, m, m.double()), "grad_factor shape"),
    (lambda v, m: OPS.scaled_factor_backward(v.double(), v, m, m.double()), "grad_factor dtype"),
    (lambda v, m: OPS.scaled_factor_backward(v, v, m, m), "inv_norm must be the"),
    (lambda v, m: OPS.scaled_factor_backward(v, v, m, m.double()[:-1]), "inv_norm must be the"),
]


@pytest.mark.parametrize("call,message", OP_ERRORS)
def test_op_errors(call, message):
    inputs = random_inputs({"direction": (3, 5), "magnitude": (5,)}, torch.float32)
    with pytest.raises(RuntimeError, match=message):
        call(inputs["direction"], inputs["magnitude"])


LORA_ERRORS = [
    ({"x": torch.ones(4, 11)}, {}, "x must have shape"),
    ({"direction_b": torch.ones(6, 3)}, {}, "direction_b has 3 columns"),
    ({"direction_a": torch.ones(12)}, {}, "must be 2-D"),
    ({"magnitude_a": torch.ones(12, dtype=torch.float64)}, {}, "magnitude_a is torch.float64"),
    (
        {"x": torch.ones(4, 12, dtype=torch.float64)},
        {},
        "x is torch.float64 but the adapter's factors are torch.float32",
    ),
    ({"direction_b": torch.ones(6, 2, device="meta")}, {}, "direction_b is torch.float32 on meta"),
    ({}, {"dropout_p": 1.0}, r"dropout_p must be in \[0, 1\)"),
]


@pytest.mark.parametrize("replace,kwargs,message", LORA_ERRORS)
def test_feddora_lora_native_errors(replace, kwargs, message):
    inputs = {**lora_inputs((4,), 12, 2, 6, torch.float32, "none"), **replace}
    with pytest.raises(ValueError, match=message):
        native.feddora_lora_native(scaling=1.0, **inputs, **kwargs)


def test_unavailable_extension_is_explained():
    """Without fedlora_kernels._C, native reports why and refuses to run, naming the fallback."""
    script = (
        "import sys, torch\n"
        "sys.modules['fedlora_kernels._C'] = None\n"
        "from fedlora_kernels import native\n"
        "assert not native.is_available()\n"
        "print(native.unavailable_reason())\n"
        "try:\n"
        "    native.feddora_lora_native(torch.ones(1, 2), torch.ones(1, 2), torch.ones(2), torch.ones(3, 1), torch.ones(1), 1.0)\n"
        "except RuntimeError as exc:\n"
        "    print(exc)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    reasons = result.stdout.splitlines()
    assert len(reasons) == 2 and reasons[0] == reasons[1], result.stdout
    assert "fedlora_kernels._C was not built" in reasons[0]
    assert "falling back to the Triton/PyTorch backends" in reasons[0]
