"""FedDoRA layer and training-step benchmarks against PEFT LoRA and DoRA: ``python -m benchmarks.kernels``.

Every impl is a frozen base ``nn.Linear(k→d, bias=False)`` plus its adapter (only the adapter trains), called as the
adapted layer itself (the module PEFT puts in the model, without the PeftModel wrapper):

* ``base``: the frozen linear alone, the floor;
* ``peft_lora`` / ``peft_dora``: PEFT's LoRA layer (``use_dora=True`` for DoRA), random nonzero B;
* ``feddora_torch`` / ``feddora_triton`` / ``feddora_native``: the FedDoRA layer with ``FEDLORA_BACKEND`` forcing the
  PyTorch reference, the Triton kernels or the native extension (``FedDoRAConfig(init_weights=False)``: B ≠ 0);
* ``feddora_compile``: the FedDoRA layer on the reference under ``torch.compile`` (static shapes, compiled per case);
* ``feddora_linear_cublas`` / ``feddora_linear_triton``: the same FedDoRA adapter run by the fused op that owns the
  frozen base weight (:func:`fedlora_kernels.triton_feddora_linear.feddora_linear_triton`, ``base_gemm`` cublas or
  triton), instead of the layer's base call + ``feddora_lora``.

All adapters are rank r, alpha 2r, no dropout, in the base's dtype (``autocast_adapter_dtype=False``). Modes: ``fwd``
(under ``no_grad``) and ``fwd_bwd`` (x requires grad, as in the middle of a network, and a random dy is backpropagated;
gradients are reset to None between repetitions). On CUDA the time is the median of ``triton.testing.do_bench`` (L2
flushed before each repetition); on CPU the median of a ``perf_counter`` loop; both after a warm-up call that also
compiles. ``peak_mib`` is ``torch.cuda.max_memory_allocated`` during one call, minus what was allocated before it (the
inputs, weights and adapter); null on CPU. An impl that cannot run is recorded with its ``skipped_reason`` (errors are
also printed, with their traceback) and the run goes on; the exit status is 1 when any impl failed with an error.

``--end-to-end`` adds one AdamW training step (forward, backward, optimizer step) of LLaMA-shaped models built from a
``LlamaConfig`` with random weights (GPU presets: 4 layers of Llama-2-7B and the whole SmolLM2-135M, bf16, 4×2048
tokens; ``smoke``: a tiny one) with FedDoRA (on the backend the dispatcher picks, recorded in ``backend``), PEFT LoRA
and PEFT DoRA on q,k,v,o,gate,up,down at r=16: rows ``e2e_<adapter>``, mode ``train_step``, with ``tokens_per_s``.

Presets (``--shapes KxD,... --tokens ... --ranks ... --dtypes ... --impls ...`` override their fields):

* ``smoke``: CPU-sized fp32 shapes, seconds; ``feddora_triton`` is skipped on CPU unless ``TRITON_INTERPRET=1`` and
  ``feddora_compile`` unless ``--cpu-compile`` (up to a minute of C++ compilation per shape).
* ``targets``: bf16, r=16, 4096→4096 at 2048 and 8192 tokens and 4096→11008 at 8192 tokens, all impls. Estimated on
  one H100: 2-3 min (start-up ~20 s, 42 timings of ~0.3 s, 6 inductor compilations of 5-30 s, Triton JIT ~20 s);
  ``--end-to-end`` adds ~1 min.
* ``full``: Llama-2-7B 4096→4096, 4096→11008, 11008→4096 and SmolLM2-135M 576→576, 576→1536 × tokens {512, 2048, 8192,
  16384} × r {8, 16, 64} × {bf16, fp16}: 120 cases, 1680 timings. Estimated on one H100: ~5 s per case without
  ``feddora_compile`` (~10 min) and ~20 s more per case with it (~40 min more: 240 inductor compilations). It does not
  fit one 10-minute command: split it (``--dtypes``, ``--shapes``, ``--impls``) or repeat one command with
  ``--budget-s 420 --resume --out FILE`` until it reports 0 jobs.

Rows are appended as JSON lines to ``benchmarks/results/kernels-<device>-<UTC date>.jsonl`` after each case (``--out``
names another file, or another directory for that name); a markdown table (``.md``) and a plot (``.png``, if matplotlib
is installed) of all rows of that file are written next to it at the end (see :mod:`benchmarks.report`), and this
run's table is printed. Progress lines give each case's wall time. CPU runs use ``--cpu-threads`` torch threads
(default 1: the smoke shapes are tiny and a shared machine makes multi-threaded timings meaningless).

Row fields: ``impl, mode, n_tokens, in_features, out_features, rank, dtype`` (``fp32|bf16|fp16``), ``ms`` (median),
``peak_mib``, ``skipped_reason`` (null when it ran), ``ratio_to_base``, ``ratio_to_peft_lora`` (ms over theirs on the
same problem and mode), ``backend`` (the FedDoRA backend), ``preset``, ``run_id`` and the provenance of
:func:`benchmarks.common.provenance` (``command, date, machine, cores, device, torch_version, triton_version``);
end-to-end rows add ``model`` and ``tokens_per_s`` (``in_features``/``out_features`` are then the model's
hidden/intermediate sizes).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, fields, replace
from functools import partial
from pathlib import Path
from typing import TypeVar
from unittest import mock

import torch
from torch import nn

from benchmarks import report
from benchmarks.common import RESULTS_DIR, provenance, read_jsonl, slug, write_jsonl

BACKEND_ENV = "FEDLORA_BACKEND"
MODES = ("fwd", "fwd_bwd")
E2E_MODE = "train_step"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ADAPTERS = ("peft_lora", "peft_dora", "feddora")
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
E2E_RANK = 16
CPU_MIN_REPS = 3

T = TypeVar("T")
Outcome = tuple[float | None, float | None, str | None]
"""Median ms, peak MiB (None on CPU) and the reason the impl did not run (None when it ran)."""


class SkipImpl(Exception):
    """An impl that cannot run here, for a reason that is not an error (e.g. no CUDA for Triton)."""


@dataclass(frozen=True)
class Case:
    """One layer problem: ``n_tokens`` rows of x through a k→d linear with a rank-r adapter."""

    n_tokens: int
    in_features: int
    out_features: int
    rank: int
    dtype: str

    def __str__(self) -> str:
        return f"N={self.n_tokens} {self.in_features}→{self.out_features} r={self.rank} {self.dtype}"


@dataclass(frozen=True)
class Grid:
    """Every combination of its shapes (k, d), token counts, ranks and dtypes."""

    shapes: tuple[tuple[int, int], ...]
    tokens: tuple[int, ...]
    ranks: tuple[int, ...]
    dtypes: tuple[str, ...]

    def cases(self) -> list[Case]:
        """The cases, ordered by dtype, rank, shape and tokens (so compilations for one dtype and rank group)."""
        return [
            Case(n, k, d, r, dtype)
            for dtype in self.dtypes
            for r in self.ranks
            for k, d in self.shapes
            for n in self.tokens
        ]


@dataclass(frozen=True)
class Preset:
    """Layer cases (a union of grids), end-to-end models and timing budgets of one ``--preset``."""

    grids: tuple[Grid, ...]
    e2e_models: tuple[str, ...] = ("llama2-7b-4layers", "smollm2-135m")
    e2e_dtype: str = "bf16"
    warmup_ms: float = 25
    """Warm-up time of each timing (``do_bench``'s ``warmup``)."""
    rep_ms: float = 100
    """Timed repetitions of a layer call fill about this long (``do_bench``'s ``rep``)."""
    e2e_rep_ms: float = 1000
    """The same for a training step."""


LLAMA2_7B = ((4096, 4096), (4096, 11008), (11008, 4096))
SMOLLM2_135M = ((576, 576), (576, 1536))
PRESETS = {
    "smoke": Preset(
        (Grid(((64, 64), (64, 96)), (32,), (4,), ("fp32",)),),
        e2e_models=("tiny-llama",),
        e2e_dtype="fp32",
        warmup_ms=2,
        rep_ms=10,
        e2e_rep_ms=20,
    ),
    "targets": Preset(
        (
            Grid(((4096, 4096),), (2048, 8192), (16,), ("bf16",)),
            Grid(((4096, 11008),), (8192,), (16,), ("bf16",)),
        )
    ),
    "full": Preset((Grid(LLAMA2_7B + SMOLLM2_135M, (512, 2048, 8192, 16384), (8, 16, 64), ("bf16", "fp16")),)),
}


@dataclass(frozen=True)
class E2EModel:
    """A randomly initialised LlamaForCausalLM (``LlamaConfig(**config)``) and its batch."""

    config: dict
    batch: int
    seq_len: int


E2E_MODELS = {
    "tiny-llama": E2EModel(
        dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=256,
        ),
        batch=2,
        seq_len=32,
    ),
    "llama2-7b-4layers": E2EModel(
        dict(
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=4,
            num_attention_heads=32,
            num_key_value_heads=32,
            vocab_size=32000,
        ),
        batch=4,
        seq_len=2048,
    ),
    "smollm2-135m": E2EModel(
        dict(
            hidden_size=576,
            intermediate_size=1536,
            num_hidden_layers=30,
            num_attention_heads=9,
            num_key_value_heads=3,
            vocab_size=49152,
            tie_word_embeddings=True,
        ),
        batch=4,
        seq_len=2048,
    ),
}


@dataclass(frozen=True)
class ImplSpec:
    """How to build one impl: which adapter (None: the base alone), which forced backend, whether compiled."""

    adapter: str | None = None
    backend: str | None = None
    """``FEDLORA_BACKEND`` while the impl is built and run."""
    compiled: bool = False
    base_gemm: str | None = None
    """With it, the fused linear op (base weight owned by the op) with this ``base_gemm`` replaces the layer."""


IMPLS = {
    "base": ImplSpec(),
    "peft_lora": ImplSpec("peft_lora"),
    "peft_dora": ImplSpec("peft_dora"),
    "feddora_torch": ImplSpec("feddora", "torch"),
    "feddora_compile": ImplSpec("feddora", "torch", compiled=True),
    "feddora_triton": ImplSpec("feddora", "triton"),
    "feddora_native": ImplSpec("feddora", "native"),
    "feddora_linear_cublas": ImplSpec("feddora", "triton", base_gemm="cublas"),
    "feddora_linear_triton": ImplSpec("feddora", "triton", base_gemm="triton"),
}


@dataclass(frozen=True)
class Settings:
    """Where and how long to measure."""

    device: torch.device
    warmup_ms: float
    rep_ms: float
    e2e_rep_ms: float
    cpu_compile: bool


# ---------------------------------------------------------------------------------------------------- impls


class _OneLinear(nn.Module):
    """The smallest model PEFT can wrap: one Linear named ``proj``."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.proj = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def adapter_config(adapter: str, rank: int, target_modules: list[str]):
    """The PEFT config of ``adapter`` (see :data:`ADAPTERS`): rank r, alpha 2r, no dropout, a nonzero B."""
    if adapter == "feddora":
        from fedlora import FedDoRAConfig  # registers FEDDORA with PEFT

        return FedDoRAConfig(r=rank, lora_alpha=2 * rank, target_modules=target_modules, init_weights=False)
    from peft import LoraConfig

    return LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        target_modules=target_modules,
        lora_dropout=0.0,
        init_lora_weights=False,
        use_dora=adapter == "peft_dora",
    )


def adapt(model: nn.Module, adapter: str, rank: int, target_modules: list[str]) -> nn.Module:
    """``model`` wrapped by PEFT with ``adapter``, its adapter weights kept in the base weights' dtype."""
    from peft import get_peft_model

    return get_peft_model(model, adapter_config(adapter, rank, target_modules), autocast_adapter_dtype=False)


def _forced_backend(name: str | None) -> contextlib.AbstractContextManager:
    """A context in which ``FEDLORA_BACKEND`` is ``name`` (unchanged when None)."""
    return contextlib.nullcontext() if name is None else mock.patch.dict(os.environ, {BACKEND_ENV: name})


def _check_backend(device: torch.device, dtype: torch.dtype, in_features: int) -> None:
    """Raise :class:`SkipImpl` when the backend ``FEDLORA_BACKEND`` forces cannot run such inputs."""
    from fedlora_kernels import BackendUnavailableError, select_backend

    try:
        select_backend(torch.empty(1, in_features, device=device, dtype=dtype))
    except BackendUnavailableError as exc:
        raise SkipImpl(str(exc)) from exc


def build_layer(
    spec: ImplSpec, base: nn.Linear, rank: int, settings: Settings
) -> tuple[Callable[[torch.Tensor], torch.Tensor], list[torch.Tensor]]:
    """The impl's forward function on ``base`` and its trainable tensors; run under the spec's forced backend."""
    if spec.compiled and settings.device.type == "cpu" and not settings.cpu_compile:
        raise SkipImpl("torch.compile on CPU spends about a minute per shape building C++; pass --cpu-compile")
    if spec.backend is not None:
        _check_backend(settings.device, base.weight.dtype, base.in_features)
    if spec.adapter is None:
        return base, []
    model = adapt(_OneLinear(base), spec.adapter, rank, ["proj"])
    layer = model.base_model.model.proj
    trainable = [p for p in model.parameters() if p.requires_grad]
    if spec.compiled:
        torch._dynamo.reset()  # each case compiles afresh: no recompile limit across the grid
        layer = torch.compile(layer, dynamic=False)
    if spec.base_gemm is not None:
        from fedlora_kernels.triton_feddora_linear import feddora_linear_triton

        a, b, scaling = layer.feddora_A["default"], layer.feddora_B["default"], layer.scaling["default"]
        params = (a.direction, a.magnitude, b.direction, b.magnitude)
        return partial(_fused_linear, feddora_linear_triton, base, params, scaling, spec.base_gemm), trainable
    return layer, trainable


def _fused_linear(op, base: nn.Linear, params, scaling: float, base_gemm: str, x: torch.Tensor) -> torch.Tensor:
    return op(x, base.weight, base.bias, *params, scaling, 0.0, base_gemm=base_gemm)


# ---------------------------------------------------------------------------------------------------- measuring


def _clear_grads(tensors: Sequence[torch.Tensor]) -> None:
    for tensor in tensors:
        tensor.grad = None


def time_ms(step: Callable[[], object], grads: Sequence[torch.Tensor], settings: Settings, rep_ms: float) -> float:
    """Median ms of ``step`` (``grads`` reset to None before each repetition), ``settings.warmup_ms`` of warm-up."""
    if settings.device.type == "cuda":
        from triton.testing import do_bench

        return float(
            do_bench(
                step, warmup=settings.warmup_ms, rep=rep_ms, grad_to_none=list(grads) or None, return_mode="median"
            )
        )

    def timed() -> float:
        _clear_grads(grads)
        start = time.perf_counter()
        step()
        return (time.perf_counter() - start) * 1e3

    warmed = 0.0
    while warmed < settings.warmup_ms:
        warmed += timed()
    times = [timed()]
    while sum(times) < rep_ms or len(times) < CPU_MIN_REPS:
        times.append(timed())
    return statistics.median(times)


def peak_mib(step: Callable[[], object], device: torch.device) -> float | None:
    """MiB allocated at the peak of one ``step`` above what was allocated before it; None off CUDA."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def measure(
    step: Callable[[], object], grads: Sequence[torch.Tensor], settings: Settings, rep_ms: float
) -> tuple[float, float | None]:
    """Median ms and peak MiB of ``step``, after one warm-up call (which also compiles)."""
    step()
    _clear_grads(grads)
    peak = peak_mib(step, settings.device)
    _clear_grads(grads)
    return time_ms(step, grads, settings, rep_ms), peak


def attempt(label: str, fn: Callable[[], T]) -> tuple[T | None, str | None]:
    """``fn()`` and None, or None and why it did not run; skips are printed in one line, errors with a traceback."""
    try:
        return fn(), None
    except SkipImpl as exc:
        print(f"  skip  {label}: {exc}", flush=True)
        return None, str(exc)
    except Exception as exc:
        print(f"  ERROR {label}:", file=sys.stderr, flush=True)
        traceback.print_exc()
        first_line = (str(exc).strip().splitlines() or [""])[0][:300]
        return None, f"error: {type(exc).__name__}: {first_line}"


# ---------------------------------------------------------------------------------------------------- layer cases


def _layer_step(
    forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, dy: torch.Tensor, mode: str
) -> Callable[[], None]:
    """One call of ``forward`` in ``mode``: ``fwd`` under no_grad, or ``fwd_bwd`` with dy backpropagated."""

    def fwd() -> None:
        with torch.no_grad():
            forward(x)

    def fwd_bwd() -> None:
        forward(x).backward(dy)

    return fwd if mode == "fwd" else fwd_bwd


def _run_mode(
    label: str,
    forward: Callable[[torch.Tensor], torch.Tensor],
    trainable: list[torch.Tensor],
    inputs: tuple[torch.Tensor, torch.Tensor],
    mode: str,
    settings: Settings,
) -> Outcome:
    """Measure one built impl in one mode."""
    x_data, dy = inputs
    x = x_data.detach().requires_grad_(mode == "fwd_bwd")
    grads = [x, *trainable] if mode == "fwd_bwd" else []
    result, reason = attempt(
        f"{label} {mode}", lambda: measure(_layer_step(forward, x, dy, mode), grads, settings, settings.rep_ms)
    )
    return (None, None, reason) if result is None else (*result, None)


def run_impl(
    name: str, case: Case, base: nn.Linear, inputs: tuple[torch.Tensor, torch.Tensor], settings: Settings
) -> dict[str, Outcome]:
    """Build impl ``name`` on ``base`` and measure it in every mode."""
    spec = IMPLS[name]
    label = f"{name} {case}"
    with _forced_backend(spec.backend):
        built, reason = attempt(label, lambda: build_layer(spec, base, case.rank, settings))
        if built is None:
            return dict.fromkeys(MODES, (None, None, reason))
        forward, trainable = built
        return {mode: _run_mode(label, forward, trainable, inputs, mode, settings) for mode in MODES}


def case_fields(case: Case) -> dict:
    """The row fields that describe ``case``."""
    return {field.name: getattr(case, field.name) for field in fields(case)}


def make_row(context: dict, impl: str, mode: str, problem: dict, outcome: Outcome, **extra: object) -> dict:
    """One result row: the run's context, the problem's fields, the outcome (ratios are added later)."""
    ms, peak, reason = outcome
    return {
        "impl": impl,
        "mode": mode,
        **problem,
        "ms": ms,
        "peak_mib": peak,
        "skipped_reason": reason,
        **extra,
        **context,
    }


def add_ratios(rows: list[dict], base_impl: str | None, lora_impl: str) -> None:
    """Set ``ratio_to_base`` and ``ratio_to_peft_lora``: ms over the ms of that impl's row of the same mode."""
    for row in rows:
        for field, reference_impl in (("ratio_to_base", base_impl), ("ratio_to_peft_lora", lora_impl)):
            reference = next((r["ms"] for r in rows if r["impl"] == reference_impl and r["mode"] == row["mode"]), None)
            row[field] = row["ms"] / reference if row["ms"] is not None and reference else None


def _release_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_case(case: Case, impls: Sequence[str], settings: Settings, context: dict) -> list[dict]:
    """Rows of every impl in every mode on one case, all on one shared frozen base linear and one x, dy."""
    torch.manual_seed(0)
    dtype, device = DTYPES[case.dtype], settings.device
    base = nn.Linear(case.in_features, case.out_features, bias=False, device=device, dtype=dtype).requires_grad_(False)
    inputs = (
        torch.randn(case.n_tokens, case.in_features, device=device, dtype=dtype),
        torch.randn(case.n_tokens, case.out_features, device=device, dtype=dtype),
    )
    rows = []
    for name in impls:
        for mode, outcome in run_impl(name, case, base, inputs, settings).items():
            rows.append(make_row(context, name, mode, case_fields(case), outcome, backend=IMPLS[name].backend))
    add_ratios(rows, "base", "peft_lora")
    del base, inputs
    _release_memory(device)
    return rows


# ---------------------------------------------------------------------------------------------------- end to end


def _e2e_train_step(spec: E2EModel, adapter: str, dtype: torch.dtype, device: torch.device) -> Callable[[], None]:
    """One AdamW training step of a fresh random LlamaForCausalLM with ``adapter`` on :data:`LLAMA_TARGETS`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**spec.config, use_cache=False, attn_implementation="sdpa")
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    model = adapt(model, adapter, E2E_RANK, LLAMA_TARGETS)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, config.vocab_size, (spec.batch, spec.seq_len), device=device)

    def step() -> None:
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def _measure_e2e(model_name: str, adapter: str, dtype: torch.dtype, settings: Settings) -> tuple:
    """Median ms and peak MiB of a training step, and the FedDoRA backend the dispatcher picks (None for PEFT's)."""
    spec = E2E_MODELS[model_name]
    step = _e2e_train_step(spec, adapter, dtype, settings.device)
    backend = None
    if adapter == "feddora":
        from fedlora_kernels import select_backend

        hidden = torch.empty(spec.batch * spec.seq_len, spec.config["hidden_size"], device=settings.device, dtype=dtype)
        backend = select_backend(hidden)
    return (*measure(step, [], settings, settings.e2e_rep_ms), backend)


def run_e2e(model_name: str, dtype_name: str, settings: Settings, context: dict) -> list[dict]:
    """Rows ``e2e_<adapter>`` (mode ``train_step``) of one model, every adapter at rank :data:`E2E_RANK`.

    Their ``in_features`` and ``out_features`` are the model's hidden and intermediate sizes.
    """
    spec = E2E_MODELS[model_name]
    n_tokens = spec.batch * spec.seq_len
    problem = {
        "n_tokens": n_tokens,
        "in_features": spec.config["hidden_size"],
        "out_features": spec.config["intermediate_size"],
        "rank": E2E_RANK,
        "dtype": dtype_name,
    }
    rows = []
    for adapter in ADAPTERS:
        result, reason = attempt(
            f"e2e_{adapter} {model_name}",
            lambda adapter=adapter: _measure_e2e(model_name, adapter, DTYPES[dtype_name], settings),
        )
        ms, peak, backend = result or (None, None, None)
        extra = {"model": model_name, "tokens_per_s": n_tokens / (ms / 1e3) if ms else None, "backend": backend}
        rows.append(make_row(context, f"e2e_{adapter}", E2E_MODE, problem, (ms, peak, reason), **extra))
        _release_memory(settings.device)
    add_ratios(rows, None, "e2e_peft_lora")
    return rows


# ---------------------------------------------------------------------------------------------------- run


def run_context(device: torch.device, preset: str, argv: Sequence[str]) -> dict:
    """Fields shared by every row of this run: its provenance, the preset and a run id."""
    context = provenance("benchmarks.kernels", argv, device)
    started = dt.datetime.fromisoformat(context["date"])
    return {**context, "preset": preset, "run_id": f"{started:%Y%m%dT%H%M%S}-{os.getpid()}"}


def output_path(out: Path | None, context: dict) -> Path:
    """``out`` when it names a file, else ``kernels-<device slug>-<UTC date>.jsonl`` in the directory ``out`` (default
    ``benchmarks/results``)."""
    if out is not None and not out.is_dir():
        return out
    date = context["date"][:10].replace("-", "")
    return (out or RESULTS_DIR) / f"kernels-{slug(context['device'])}-{date}.jsonl"


def select_cases(preset: Preset, args: argparse.Namespace) -> list[Case]:
    """The preset's cases, with every grid's shapes, tokens, ranks or dtypes replaced by those given on the CLI."""
    overrides = {name: getattr(args, name) for name in ("shapes", "tokens", "ranks", "dtypes") if getattr(args, name)}
    return list(dict.fromkeys(case for grid in preset.grids for case in replace(grid, **overrides).cases()))


def pending_cases(cases: list[Case], impls: Sequence[str], out: Path, device: str) -> list[Case]:
    """The cases of which ``out`` lacks a row (run or skipped) for some impl and mode on ``device``."""
    done = {report.row_key(row) for row in read_jsonl(out)}

    def complete(case: Case) -> bool:
        keys = (
            report.row_key({"impl": impl, "mode": mode, **case_fields(case), "device": device})
            for impl in impls
            for mode in MODES
        )
        return all(key in done for key in keys)

    return [case for case in cases if not complete(case)]


Job = tuple[str, Callable[[], list[dict]]]
"""A label and a function returning result rows: one layer case, or one end-to-end model."""


def plan_jobs(args: argparse.Namespace, settings: Settings, context: dict, out: Path) -> list[Job]:
    """The layer cases (those ``out`` lacks with ``--resume``), then the end-to-end models (``--end-to-end``)."""
    preset = PRESETS[args.preset]
    jobs: list[Job] = []
    if args.kernels:
        cases = select_cases(preset, args)
        if args.resume:
            cases = pending_cases(cases, args.impls, out, context["device"])
        jobs += [(str(case), partial(run_case, case, args.impls, settings, context)) for case in cases]
    if args.end_to_end:
        jobs += [
            (f"e2e {name} {preset.e2e_dtype}", partial(run_e2e, name, preset.e2e_dtype, settings, context))
            for name in preset.e2e_models
        ]
    return jobs


def run_jobs(jobs: list[Job], out: Path, deadline: float) -> list[dict]:
    """Run the jobs in order, appending each one's rows to ``out``; none is started after ``deadline``."""
    rows: list[dict] = []
    for i, (label, job) in enumerate(jobs):
        if time.monotonic() > deadline:
            print(f"budget spent: {len(jobs) - i} job(s) not started; rerun with --resume to continue", flush=True)
            break
        start = time.monotonic()
        print(f"[{i + 1}/{len(jobs)}] {label}", flush=True)
        job_rows = job()
        print(f"      {label}: {time.monotonic() - start:.1f} s", flush=True)
        write_jsonl(out, job_rows, append=True)
        rows += job_rows
    return rows


@contextlib.contextmanager
def cpu_threads(device: torch.device, n_threads: int) -> Iterator[None]:
    """torch's intra-op thread count set to ``n_threads`` while benchmarking on CPU, restored afterwards."""
    previous = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(n_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _csv(kind: Callable[[str], T]) -> Callable[[str], tuple[T, ...]]:
    return lambda text: tuple(kind(item.strip()) for item in text.split(",") if item.strip())


def _choice(options: Sequence[str]) -> Callable[[str], str]:
    def parse(name: str) -> str:
        if name not in options:
            raise argparse.ArgumentTypeError(f"{name!r} is not one of {', '.join(options)}")
        return name

    return parse


def _shape(text: str) -> tuple[int, int]:
    k, _, d = text.lower().partition("x")
    return int(k), int(d)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=PRESETS, default="smoke")
    parser.add_argument("--device", type=torch.device, default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--impls", type=_csv(_choice(list(IMPLS))), default=tuple(IMPLS), help="comma-separated")
    parser.add_argument("--shapes", type=_csv(_shape), help="comma-separated KxD, e.g. 4096x4096,4096x11008")
    parser.add_argument("--tokens", type=_csv(int), help="comma-separated token counts")
    parser.add_argument("--ranks", type=_csv(int), help="comma-separated ranks")
    parser.add_argument("--dtypes", type=_csv(_choice(list(DTYPES))), help="comma-separated: fp32, bf16, fp16")
    parser.add_argument("--kernels", action=argparse.BooleanOptionalAction, default=True, help="run the layer cases")
    parser.add_argument("--end-to-end", action="store_true", help="also time training steps of LLaMA-shaped models")
    parser.add_argument(
        "--out", type=Path, help="JSON-lines file to append to, or an existing directory to put the default name in"
    )
    parser.add_argument("--cpu-compile", action="store_true", help="run feddora_compile on CPU too (slow)")
    parser.add_argument("--budget-s", type=float, help="start no new case or model after this many seconds")
    parser.add_argument("--resume", action="store_true", help="skip layer cases that --out already has rows for")
    parser.add_argument(
        "--cpu-threads", type=int, default=1, help="torch threads on CPU (default 1: shared machines, tiny shapes)"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; 0 unless some impl failed with an error (skips are not errors)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    preset = PRESETS[args.preset]
    settings = Settings(args.device, preset.warmup_ms, preset.rep_ms, preset.e2e_rep_ms, args.cpu_compile)
    context = run_context(args.device, args.preset, argv)
    out = output_path(args.out, context)
    deadline = time.monotonic() + (args.budget_s if args.budget_s is not None else float("inf"))
    print(f"fedlora benchmarks on {context['device']} (torch {torch.__version__}, triton {context['triton_version']})")
    jobs = plan_jobs(args, settings, context, out)
    print(f"{len(jobs)} job(s), impls {', '.join(args.impls)}, modes {', '.join(MODES)} → {out}", flush=True)
    with cpu_threads(args.device, args.cpu_threads):
        rows = run_jobs(jobs, out, deadline)

    print("\n" + report.results_table(rows))
    if out.exists():
        for path in (out, *report.write_reports(out)):
            if path is not None:
                print(f"wrote {path}")
    errors = [row for row in rows if (row["skipped_reason"] or "").startswith("error:")]
    if errors:
        print(f"{len(errors)} row(s) failed with an error (tracebacks above)", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
