"""The Triton FedDoRA op against the float64 reference (tests/numerics.py's rule), and the backend selection.

Without CUDA the kernels run under Triton's CPU interpreter (conftest.py sets TRITON_INTERPRET=1) with 16-wide tiles,
so that the small shapes below still span several tiles, row groups and split partials. With CUDA the same cases run
on the GPU, plus larger ragged shapes at the default (H100) tiles; ``python -m benchmarks.gpu_check`` runs this file.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

pytest.importorskip("triton")

from fedlora_kernels import backend, feddora_lora, feddora_lora_reference, triton_feddora  # noqa: E402
from fedlora_kernels.triton_feddora import (  # noqa: E402
    KernelConfig,
    draw_dropout_seed,
    dropout_keep_mask,
    feddora_lora_triton,
)
from tests.numerics import assert_within_reference_error  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_CUDA = DEVICE.type == "cuda"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SCALING = 0.75
SMALL_TILES = KernelConfig(
    block_m=16,
    block_k=16,
    block_n=16,
    block_n_grad=16,
    block_m_grad_input=16,
    gemm_block_m=16,
    gemm_block_n=16,
    gemm_block_k=16,
    block_reduce=16,
    max_acc_elements=256,
    programs_per_sm=1,
    interpreter_sms=4,
)
GRAD_NAMES = ("x", "direction_a", "magnitude_a", "direction_b", "magnitude_b", "base_out")


@pytest.fixture
def small_tiles(monkeypatch: pytest.MonkeyPatch) -> None:
    """16-wide tiles (16-row column-norm tiles) and a 4-program target grid, so that small shapes exercise every
    multi-tile and split path."""
    monkeypatch.setattr(triton_feddora, "CONFIG", SMALL_TILES)


@dataclass(frozen=True)
class Case:
    """One problem: x of shape (*lead, k), rank r, out-features d."""

    lead: tuple[int, ...]
    k: int
    d: int
    r: int
    dropout_p: float = 0.0
    base: bool = True
    layout: str = "contiguous"
    """``strided``: x and base_out have a last-dim stride of 2; ``transposed``: 3-D with the two leading dims swapped."""

    def __str__(self) -> str:
        tokens = "x".join(map(str, self.lead))
        return f"N{tokens}-k{self.k}-d{self.d}-r{self.r}-p{self.dropout_p}-{'base' if self.base else 'nobase'}-{self.layout}"


SMALL_CASES = (
    Case((1,), k=40, d=24, r=4),
    Case((7,), k=24, d=40, r=1, base=False),
    Case((33,), k=40, d=24, r=4, dropout_p=0.3, layout="strided"),
    Case((3, 5), k=24, d=40, r=5, layout="transposed"),
    Case((17,), k=33, d=18, r=20, dropout_p=0.5, base=False),
    # k % 16 == 0 with dropout and backward: the shape class whose fp16/bf16 backward once failed to compile on GPUs
    Case((21,), k=32, d=24, r=4, dropout_p=0.3),
    Case((2, 9), k=48, d=40, r=16, dropout_p=0.5, base=False, layout="transposed"),
    # many out-features: V_B's column norm split over row groups (partials + finishing kernel)
    Case((5,), k=32, d=600, r=2, dropout_p=0.25),
)
GPU_CASES = (
    Case((1,), k=4096, d=4096, r=16),
    Case((333,), k=1000, d=11008, r=16, dropout_p=0.1),
    Case((2049,), k=768, d=3072, r=64, layout="strided"),
    Case((4, 77), k=1024, d=1000, r=256, layout="transposed"),
    Case((129,), k=4096, d=4096, r=1, base=False),
    # k % 16 == 0 with dropout and backward (bf16/fp16 once failed to compile there)
    Case((2, 1024), k=4096, d=4096, r=16, dropout_p=0.1),
    Case((300,), k=576, d=1536, r=8, dropout_p=0.05, layout="strided"),
    Case((1000,), k=2048, d=2048, r=64, dropout_p=0.2, base=False),
)


def _layout(values: torch.Tensor, layout: str, dtype: torch.dtype) -> torch.Tensor:
    """A leaf tensor equal to ``values`` in ``dtype`` on DEVICE, with the memory layout the case asks for."""
    values = values.to(device=DEVICE, dtype=dtype)
    if layout == "strided":
        buffer = torch.zeros((*values.shape[:-1], 2 * values.shape[-1]), device=DEVICE, dtype=dtype)
        buffer[..., ::2] = values
        tensor = buffer[..., ::2]
    elif layout == "transposed":
        tensor = values.transpose(0, 1).contiguous().transpose(0, 1)
    else:
        tensor = values.clone()
    return tensor.detach().requires_grad_()


def _problem(case: Case, seed: int = 0) -> dict[str, torch.Tensor]:
    """Float64 CPU values of x, the four parameters, base_out (or absent) and the output gradient dy."""
    gen = torch.Generator().manual_seed(seed)
    values = {
        "x": torch.randn((*case.lead, case.k), generator=gen, dtype=torch.float64),
        "direction_a": torch.randn((case.r, case.k), generator=gen, dtype=torch.float64),
        "magnitude_a": torch.rand(case.k, generator=gen, dtype=torch.float64) + 0.5,
        "direction_b": torch.randn((case.d, case.r), generator=gen, dtype=torch.float64),
        "magnitude_b": torch.rand(case.r, generator=gen, dtype=torch.float64) + 0.5,
        "dy": torch.randn((*case.lead, case.d), generator=gen, dtype=torch.float64),
    }
    if case.base:
        values["base_out"] = torch.randn((*case.lead, case.d), generator=gen, dtype=torch.float64)
    return values


def _forward_backward(
    op: Callable[..., torch.Tensor],
    values: dict[str, torch.Tensor],
    dtype: torch.dtype,
    base_dtype: torch.dtype,
    layout: str,
    dropout_p: float,
    keep: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor | None]]:
    """Output and gradients of ``op`` on leaves built from ``values``; with ``keep``, x is dropped out by hand."""
    leaves = {name: _layout(values[name], layout if name == "x" else "contiguous", dtype) for name in GRAD_NAMES[:5]}
    if "base_out" in values:
        leaves["base_out"] = _layout(values["base_out"], layout, base_dtype)
    x = leaves["x"]
    if keep is not None:
        x = x * (keep.reshape(x.shape).to(dtype) / (1 - dropout_p))
        dropout_p = 0.0
    params = [leaves[name] for name in GRAD_NAMES[1:5]]
    y = op(x, *params, SCALING, dropout_p=dropout_p, base_out=leaves.get("base_out"))
    y.backward(values["dy"].to(device=DEVICE, dtype=y.dtype))
    return y.detach(), {name: leaf.grad for name, leaf in leaves.items()}


def _check(case: Case, dtype: torch.dtype, base_dtype: torch.dtype | None = None) -> None:
    """Triton output and every gradient within 2× PyTorch's same-dtype error (+ atol) of the float64 reference."""
    base_dtype = base_dtype or dtype
    values = _problem(case)
    torch.manual_seed(1234)
    y, grads = _forward_backward(feddora_lora_triton, values, dtype, base_dtype, case.layout, case.dropout_p)
    keep = None
    if case.dropout_p > 0.0:
        torch.manual_seed(1234)  # the op drew exactly this seed
        keep = dropout_keep_mask(draw_dropout_seed(DEVICE), y.numel() // case.d, case.k, case.dropout_p)
    y_t, grads_t = _forward_backward(
        feddora_lora_reference, values, dtype, base_dtype, "contiguous", case.dropout_p, keep
    )
    y_64, grads_64 = _forward_backward(
        feddora_lora_reference, values, torch.float64, torch.float64, "contiguous", case.dropout_p, keep
    )
    assert y.dtype == base_dtype
    assert_within_reference_error(y, y_t, y_64, "output")
    for name, grad in grads.items():
        assert grad is not None, name
        assert_within_reference_error(grad, grads_t[name], grads_64[name], f"grad {name}")


@pytest.mark.usefixtures("small_tiles")
@pytest.mark.parametrize("case", SMALL_CASES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_float64_reference(case: Case, dtype: torch.dtype) -> None:
    _check(case, dtype)


def test_bf16_dropout_backward_k4096() -> None:
    """bf16, dropout, all gradients at k = 4096 with the default (GPU) tiles: the variant that failed to compile for
    sm_80/sm_90 until the keep-mask was held in a float type; few tokens and a small rank keep it interpreter-sized."""
    _check(Case((6,), k=4096, d=48, r=4, dropout_p=0.1), torch.bfloat16)


@pytest.mark.skipif(not ON_CUDA, reason="large shapes at the default tiles need a GPU")
@pytest.mark.parametrize("case", GPU_CASES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_float64_reference_default_tiles(case: Case, dtype: torch.dtype) -> None:
    _check(case, dtype)


@pytest.mark.skipif(
    not ON_CUDA or torch.cuda.get_device_properties(0).total_memory < 24 * 2**30, reason="needs a GPU with 24 GB"
)
def test_offsets_past_int32() -> None:
    """Column-major x with k·N > 2³¹ elements: x[i, j] sits at j·N + i, past int32 for the last columns."""
    n, k, d, r = 600_000, 4096, 64, 4
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randn((k, n), device=DEVICE, dtype=torch.bfloat16, generator=gen).t()  # (n, k), strides (1, n)
    values = _problem(Case((1,), k=k, d=d, r=r, base=False))
    params = [values[name].to(DEVICE, torch.bfloat16) for name in GRAD_NAMES[1:5]]
    y = feddora_lora_triton(x, *params, SCALING)
    rows = x[n - 8 :]
    y_t = feddora_lora_reference(rows, *params, SCALING)
    y_64 = feddora_lora_reference(rows.double(), *(p.double() for p in params), SCALING)
    assert_within_reference_error(y[n - 8 :], y_t, y_64, "output")


@pytest.mark.usefixtures("small_tiles")
def test_base_out_in_another_dtype() -> None:
    """float32 adapter (x cast to it by the layer) on a bfloat16 base output: the result is bfloat16."""
    _check(Case((9,), k=40, d=24, r=4, dropout_p=0.2), torch.float32, base_dtype=torch.bfloat16)


@pytest.mark.usefixtures("small_tiles")
@pytest.mark.parametrize("trainable", [("x",), GRAD_NAMES[1:5], ("base_out",)], ids=["x", "params", "base"])
def test_only_requested_gradients(trainable: tuple[str, ...]) -> None:
    """Backward computes exactly the gradients asked for and they match the reference."""
    values = _problem(Case((19,), k=24, d=40, r=3))
    outputs = []
    for op, dtype in ((feddora_lora_triton, torch.float32), (feddora_lora_reference, torch.float64)):
        leaves = {name: values[name].to(DEVICE, dtype).requires_grad_(name in trainable) for name in GRAD_NAMES}
        y = op(*(leaves[name] for name in GRAD_NAMES[:5]), SCALING, base_out=leaves["base_out"])
        y.backward(values["dy"].to(DEVICE, dtype))
        outputs.append({name: leaf.grad for name, leaf in leaves.items()})
    impl, ref = outputs
    for name in GRAD_NAMES:
        assert (impl[name] is not None) == (name in trainable), name
        if name in trainable:
            torch.testing.assert_close(impl[name].double(), ref[name], rtol=1e-4, atol=1e-5)


@pytest.mark.usefixtures("small_tiles")
def test_dropout_mask() -> None:
    """The keep-mask is a function of the seed, keeps a 1-p fraction, and is the one the op applies."""
    seed = draw_dropout_seed(DEVICE)
    keep = dropout_keep_mask(seed, 64, 256, 0.25)
    assert torch.equal(keep, dropout_keep_mask(seed.clone(), 64, 256, 0.25))
    assert not torch.equal(keep, dropout_keep_mask(seed + 1, 64, 256, 0.25))
    assert abs(keep.float().mean().item() - 0.75) < 0.02

    values = _problem(Case((8,), k=24, d=16, r=2, base=False))
    args = [values[name].to(DEVICE, torch.float32) for name in GRAD_NAMES[:5]]
    torch.manual_seed(7)
    first = feddora_lora_triton(*args, SCALING, dropout_p=0.5)
    torch.manual_seed(7)
    assert torch.equal(first, feddora_lora_triton(*args, SCALING, dropout_p=0.5))
    assert not torch.equal(first, feddora_lora_triton(*args, SCALING, dropout_p=0.5))


def test_empty_and_invalid_inputs() -> None:
    values = _problem(Case((1,), k=24, d=16, r=2))
    params = [values[name].to(DEVICE, torch.float32) for name in GRAD_NAMES[1:5]]
    x = torch.zeros((2, 0, 24), device=DEVICE, requires_grad=True)
    y = feddora_lora_triton(x, *params, SCALING)
    assert y.shape == (2, 0, 16)
    y.sum().backward()
    assert x.grad.shape == x.shape

    x = values["x"].to(DEVICE, torch.float32)
    with pytest.raises(TypeError, match="float32/float16/bfloat16"):
        feddora_lora_triton(x.half(), *params, SCALING)
    with pytest.raises(ValueError, match="base_out has shape"):
        feddora_lora_triton(x, *params, SCALING, base_out=torch.zeros(1, 17, device=DEVICE))
    with pytest.raises(ValueError, match="shape mismatch"):
        feddora_lora_triton(x[:, :20], *params, SCALING)


# --------------------------------------------------------------------------------------------------------------------
# Backend selection
# --------------------------------------------------------------------------------------------------------------------


def _args(device: torch.device = DEVICE, dtype: torch.dtype = torch.float32, tokens: int = 5) -> list:
    values = _problem(Case((tokens,), k=24, d=16, r=2))
    return [values[name].to(device, dtype) for name in GRAD_NAMES[:5]] + [SCALING]


def _fake_native(monkeypatch: pytest.MonkeyPatch, available: bool) -> None:
    """Replace fedlora_kernels.native by a stub that is (un)available and returns a marker tensor."""
    fake = types.ModuleType("fedlora_kernels.native")
    fake.is_available = lambda device=None: available
    fake.unavailable_reason = lambda device=None: "" if available else "stub: extension not built"
    fake.feddora_lora_native = lambda *args, **kwargs: torch.full((1,), 42.0)
    monkeypatch.setitem(sys.modules, "fedlora_kernels.native", fake)


def test_package_exports_the_dispatcher() -> None:
    import fedlora_kernels

    assert fedlora_kernels.feddora_lora is backend.feddora_lora


def test_forced_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(backend.BACKEND_ENV, "torch")
    args = _args()
    assert backend.select_backend(args[0]) == "torch"
    assert torch.equal(feddora_lora(*args), feddora_lora_reference(*args))


@pytest.mark.usefixtures("small_tiles")
def test_forced_triton_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Forced Triton runs on CUDA tensors, and on CPU tensors under the interpreter."""
    monkeypatch.setenv(backend.BACKEND_ENV, "triton")
    args = _args()
    assert backend.select_backend(args[0]) == "triton"
    assert torch.equal(feddora_lora(*args), feddora_lora_triton(*args))


def test_forced_triton_cannot_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(backend.BACKEND_ENV, "triton")
    cpu_args = _args(torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(backend.BackendUnavailableError, match=r"FEDLORA_BACKEND=triton .*TRITON_INTERPRET=1"):
        feddora_lora(*cpu_args)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(backend.BackendUnavailableError, match="triton .*float64"):
        feddora_lora(*_args(torch.device("cpu"), torch.float64))
    monkeypatch.setitem(sys.modules, "fedlora_kernels.triton_feddora", None)
    with pytest.raises(backend.BackendUnavailableError, match="triton cannot be imported"):
        feddora_lora(*cpu_args)


def test_forced_native(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(backend.BACKEND_ENV, "native")
    args = _args()
    _fake_native(monkeypatch, available=True)
    assert feddora_lora(*args).item() == 42.0
    _fake_native(monkeypatch, available=False)
    with pytest.raises(backend.BackendUnavailableError, match="native backend, which cannot run: stub: extension not"):
        feddora_lora(*args)
    monkeypatch.setitem(sys.modules, "fedlora_kernels.native", None)
    with pytest.raises(backend.BackendUnavailableError, match="fedlora_kernels.native cannot be imported"):
        feddora_lora(*args)


def test_unknown_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(backend.BACKEND_ENV, "cuda")
    with pytest.raises(ValueError, match="choose one of triton, native, torch"):
        feddora_lora(*_args())


def test_default_off_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """Off CUDA the default is the reference: never the (slow) Triton interpreter, nor native (no faster on CPU)."""
    monkeypatch.delenv(backend.BACKEND_ENV, raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x = _args(torch.device("cpu"))[0]
    for available in (True, False):
        _fake_native(monkeypatch, available=available)
        assert backend.select_backend(x) == "torch"


@pytest.mark.skipif(not ON_CUDA, reason="needs CUDA tensors")
def test_default_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """On CUDA: Triton from TRITON_MIN_TOKENS tokens on, native below it when available."""
    monkeypatch.delenv(backend.BACKEND_ENV, raising=False)
    _fake_native(monkeypatch, available=True)
    assert backend.select_backend(_args(tokens=backend.TRITON_MIN_TOKENS)[0]) == "triton"
    assert backend.select_backend(_args(tokens=backend.TRITON_MIN_TOKENS - 1)[0]) == "native"
    _fake_native(monkeypatch, available=False)
    assert backend.select_backend(_args(tokens=1)[0]) == "triton"
