"""Ahead-of-time compile check of the Triton kernels for Hopper and Ampere, without a GPU:
``python -m benchmarks.compile_check [--out DIR] [--jobs 2] [--quick] [--on-device]``.

**What is compiled.** Not a hand-kept list of signatures: the project's real ops
(:func:`fedlora_kernels.triton_feddora.feddora_lora_triton` and the fused linear op of
:mod:`fedlora_kernels.triton_feddora_linear`, forward and backward) run on ``meta`` tensors of real
model shapes under a stand-in Triton driver that reports the target (``GPUTarget("cuda", 90, 32)`` or ``(80, …)``) and
the target's SM count to the launch planning. Every ``kernel[grid](...)`` launch then goes through Triton's own
binder (argument types, ``tt.divisibility`` / ``== 1`` specialisations, constexprs, launch options), and Triton's
``jit_cache_hook`` records the resulting specialisation instead of compiling and launching. The distinct variants
are then compiled with ``JITFunction.preload`` — ``triton.compile(ASTSource(fn, signature, constexprs, attrs),
target=GPUTarget(...))``, the path a real launch takes — through ptxas (bundled with Triton), in ``--jobs`` worker
processes. A new kernel, a new launch parameter or a changed tile choice is covered as soon as the op launches it.

**Grid** (:func:`grid` picks a subset): dtypes fp32 (IEEE dots), fp32 with TF32 dots, fp16, bf16; dropout off/on;
the gradients asked for: dx only (frozen adapter, mid-network), dA/dB only (first layer), both; ``(k, d)`` pairs from SmolLM2-135M
(576, 1536), TinyLlama/Llama-3.2-1B (2048), Llama-2-7B (4096, 11008) and Llama-3-8B/Mistral-7B (4096, 14336); r in
{1, 8, 16, 64}; 8192 tokens, and a ragged 1000-token batch; see :func:`grid` for the subset captured. Launches
that differ only in runtime values compile once; ``points`` counts the grid points that use a variant.

**Output**: one JSON line per (target, variant) in ``DIR/compile-check.jsonl`` (kernel, constexprs, warps, stages,
registers, spill stores/loads, stack frame, shared memory, estimated CTAs per SM, error) and a markdown summary and
table in ``DIR/compile-check.md``. Registers and spills come from ``ptxas -v``; shared memory from Triton's metadata;
CTAs/SM is an estimate from registers (65536 per SM, allocated per warp in units of 256), shared memory (228 KB per
SM on sm_90, 164 KB on sm_80, 1 KB reserved per CTA) and 64 warps per SM. The exit status is 1 when any variant fails
to compile. Measured on the project's 2-core CPU machine (shared with other jobs, load 5-7): about 4 minutes with a
cold Triton cache (≈ 3 CPU-minutes for 335 variants), 18 s warm. Triton's cache (``TRITON_CACHE_DIR``, default
``~/.triton/cache``; its keys include the kernels' line numbers, so any edit of a kernel file recompiles) makes reruns
fast; the ptxas figures of cached kernels are kept next to it (``fedlora-compile-check/``).

``--on-device`` (on a CUDA GPU, see ``benchmarks.gpu_check``): runs the op for real and checks that every variant a
launch compiled is one the capture predicted, with the registers the stand-in compile predicted.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import io
import itertools
import json
import math
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.common import RESULTS_DIR, markdown_table, write_jsonl

STEM = "compile-check"


@dataclass(frozen=True)
class Target:
    name: str
    arch: int
    sms: int
    """SM count the launch planning sees (H100/H200 SXM: 132, A100: 108)."""
    smem_per_sm: int


TARGETS = (Target("sm_90", 90, 132, 228 * 1024), Target("sm_80", 80, 108, 164 * 1024))
DTYPES = ("fp32", "fp32-tf32", "fp16", "bf16")
GRADS = ("dx", "dA", "both")
SHAPES = ((576, 1536), (1536, 576), (2048, 2048), (4096, 11008), (11008, 4096), (4096, 14336), (14336, 4096))
RANKS = (1, 8, 16, 64)


@dataclass(frozen=True)
class Point:
    """One call of the op: fwd + bwd of x (tokens × k) through a rank-r adapter to d out-features, with a base."""

    dtype: str
    dropout: bool
    grads: str
    k: int
    d: int
    r: int
    tokens: int
    op: str = "lora"
    """``lora``: :func:`feddora_lora_triton` (base output given); ``linear-cublas`` / ``linear-triton``:
    :func:`~fedlora_kernels.triton_feddora_linear.feddora_linear_triton` with that ``base_gemm`` (owns W₀ and b)."""

    def __str__(self) -> str:
        drop = "p0.1" if self.dropout else "p0"
        op = "" if self.op == "lora" else f"{self.op}-"
        return f"{op}{self.dtype}-{drop}-{self.grads}-N{self.tokens}-k{self.k}-d{self.d}-r{self.r}"


def grid(quick: bool = False) -> list[Point]:
    """The points to capture (their variants, deduplicated, are what is compiled), chosen to fit ~3 CPU minutes:

    * bf16 (the training path): dropout × gradients × r in {1, 8, 16, 64} at Llama-2-7B's 4096→11008, 8192 tokens;
    * fp16 and fp32: dropout × gradients × r in {16, 64} there (r 1 and 8 only change the rank's specialisation);
    * every (k, d) pair at r=16, both gradients, dropout on, bf16 and fp32 (tiles of the per-column kernels, splits);
    * a ragged 1000-token batch (no divisibility specialisation of the row counts): bf16, dropout × gradients;
    * fp32 with TF32 dots (``torch.set_float32_matmul_precision("high")``): r=16, both gradients, dropout on/off;
    * the fused linear op (``linear-cublas``, ``linear-triton``): bf16/fp16/fp32, r=16, dropout on/off; bf16 r=64.

    ``quick``: bf16 and fp32 at 4096→4096, r 16 and 64 (a fast local loop).
    """
    product = itertools.product
    if quick:
        return [
            Point(dtype, dropout, grads, 4096, 4096, r, 8192)
            for dtype, dropout, grads, r in product(("fp32", "bf16"), (False, True), GRADS, (16, 64))
        ]
    drops = (False, True)
    points = [Point("bf16", p, g, 4096, 11008, r, 8192) for p, g, r in product(drops, GRADS, RANKS)]
    points += [
        Point(dtype, p, g, 4096, 11008, r, 8192) for dtype, p, g, r in product(("fp16", "fp32"), drops, GRADS, (16, 64))
    ]
    points += [Point(dtype, True, "both", k, d, 16, 8192) for dtype, (k, d) in product(("bf16", "fp32"), SHAPES)]
    points += [Point("bf16", p, g, 4096, 11008, 16, 1000) for p, g in product(drops, GRADS)]
    points += [Point("fp32-tf32", p, "both", 4096, 11008, 16, 8192) for p in drops]
    # The fused linear op (base weight owned by the op), both base-GEMM modes.
    for op, dtype, p in product(("linear-cublas", "linear-triton"), ("bf16", "fp16", "fp32"), drops):
        points.append(Point(dtype, p, "both", 4096, 11008, 16, 8192, op))
    points += [Point("bf16", True, g, 4096, 11008, 64, 8192, "linear-triton") for g in ("dx", "both")]
    return list(dict.fromkeys(points))


# --------------------------------------------------------------------------------------------------------------------
# Capture: the real op on meta tensors under a stand-in driver
# --------------------------------------------------------------------------------------------------------------------


class _StandInDriver:
    """The part of Triton's driver interface that kernel launches and ``preload`` use, for a GPU that is not there.

    The device id is the arch, so that one process can hold binders for several targets.
    """

    def __init__(self, target: Target):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", target.arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self) -> int:
        return self.target.arch

    def get_current_stream(self, device=None) -> int:
        return 0

    def get_active_torch_device(self):
        import torch

        return torch.device("meta")


def _import_kernels():
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("compile_check needs TRITON_INTERPRET unset (the interpreter replaces the JIT functions)")
    from fedlora_kernels import triton_feddora, triton_feddora_linear  # noqa: F401  (the second registers its kernel)

    return triton_feddora


def _kernel(qualified: str):
    """The JIT function ``module:name``."""
    import importlib

    module, name = qualified.split(":")
    return getattr(importlib.import_module(module), name)


@contextlib.contextmanager
def _stand_in(target: Target, hook=None):
    """Triton's driver replaced by the stand-in for ``target`` (and ``hook`` as jit_cache_hook) within the block."""
    from triton import knobs
    from triton.runtime import driver

    kernels = _import_kernels()
    saved_sm_count, saved_hook = kernels._sm_count, knobs.runtime.jit_cache_hook
    driver.set_active(_StandInDriver(target))
    kernels._sm_count = lambda device: target.sms
    knobs.runtime.jit_cache_hook = hook
    try:
        yield kernels
    finally:
        knobs.runtime.jit_cache_hook = saved_hook
        kernels._sm_count = saved_sm_count
        driver._active = None  # back to the default driver, created lazily (and never, off a GPU)


def _run_point(kernels, point: Point, device: str = "meta") -> None:
    """Forward and backward of the op at ``point``: on meta tensors (capture), or on random ones on ``device``."""
    import torch

    dtype = {"fp32": torch.float32, "fp32-tf32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    dt = dtype[point.dtype]
    x_grad = point.grads in ("dx", "both")
    w_grad = point.grads in ("dA", "both")

    def empty(*shape, grad=False):
        make = torch.empty if device == "meta" else torch.randn
        return make(shape, device=device, dtype=dt).requires_grad_(grad)

    x = empty(point.tokens, point.k, grad=x_grad)
    params = [empty(point.r, point.k, grad=w_grad), empty(point.k, grad=w_grad)]
    params += [empty(point.d, point.r, grad=w_grad), empty(point.r, grad=w_grad)]
    base = empty(point.tokens, point.d)
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if point.dtype == "fp32-tf32" else "highest")
    p = 0.1 if point.dropout else 0.0
    try:
        if point.op == "lora":
            y = kernels.feddora_lora_triton(x, *params, 2.0, p, base)
        else:
            from fedlora_kernels.triton_feddora_linear import feddora_linear_triton

            weight, bias = empty(point.d, point.k), empty(point.d)
            y = feddora_linear_triton(x, weight, bias, *params, 2.0, p, base_gemm=point.op.removeprefix("linear-"))
        y.backward(torch.empty_like(y) if device == "meta" else torch.randn_like(y))
    finally:
        torch.set_float32_matmul_precision(precision)


def capture(target: Target, points: list[Point]) -> dict[tuple[str, str], list[Point | str]]:
    """{(kernel name, Triton specialisation data): [points launching it]} of the op's launches at ``points``."""
    found: dict[tuple[str, str], list[Point | str]] = {}
    current: list[Point | str] = [""]

    def hook(*, fn, compile, **_):
        qualified = f"{fn.jit_function.fn.__module__}:{fn.name}"
        found.setdefault((qualified, compile["specialization_data"]), []).append(current[0])
        return True  # do not compile, do not launch

    with _stand_in(target, hook) as kernels:
        import torch

        for point in points:
            current[0] = point
            _run_point(kernels, point)
        current[0] = "dropout_keep_mask"
        seed = torch.empty(1, device="meta", dtype=torch.int64)
        kernels.dropout_keep_mask(seed, 8192, 4096, 0.1)
    return found


def _capture_task(target: Target, points: list[Point]) -> list[tuple[str, str, list[Point | str]]]:
    return [(name, spec, users) for (name, spec), users in capture(target, points).items()]


# --------------------------------------------------------------------------------------------------------------------
# Compile one variant
# --------------------------------------------------------------------------------------------------------------------

_PTXAS_STACK = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_REGS = re.compile(r"Used (\d+) registers")


def _ptxas_stats(log: str) -> dict[str, int] | None:
    stack, regs = _PTXAS_STACK.search(log), _PTXAS_REGS.search(log)
    if not (stack and regs):
        return None
    return {
        "registers": int(regs.group(1)),
        "stack_bytes": int(stack.group(1)),
        "spill_stores": int(stack.group(2)),
        "spill_loads": int(stack.group(3)),
    }


def _ptxas_rerun(ptx: str, arch: int) -> str:
    """``ptxas -v`` of a cached kernel's PTX (whose log was not kept), as Triton's make_cubin calls it."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        command = [get_ptxas(arch).path, "-lineinfo", "-v", "--regAllocOptLevel=2"]
        command += [f"--gpu-name={sm_arch_from_capability(arch)}", str(src), "-o", str(Path(tmp) / "kernel.o")]
        return subprocess.run(command, capture_output=True, text=True, check=True).stderr


def _ctas_per_sm(target: Target, registers: int, warps: int, shared: int) -> int:
    """Resident CTAs per SM allowed by registers (per-warp allocation in units of 256), shared memory and warps."""
    regs_per_warp = math.ceil(registers * 32 / 256) * 256
    by_regs = (65536 // regs_per_warp) // warps if regs_per_warp else 32
    by_smem = target.smem_per_sm // (shared + 1024)
    return max(0, min(by_regs, by_smem, 64 // warps, 32))


@contextlib.contextmanager
def _stderr_to(path: Path):
    """File descriptor 2 (where MLIR writes its diagnostics and pass reproducers) redirected to ``path``."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(path, "w") as sink:
        os.dup2(sink.fileno(), 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def _error_summary(exc: BaseException, stderr: str) -> str:
    lines = [line.strip() for line in stderr.splitlines() if "error:" in line or "Assertion" in line]
    lines.append(f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}")
    return " | ".join(dict.fromkeys(lines))[:2000]


def compile_variant(target: Target, name: str, spec: str) -> dict:
    """Compile one captured variant for ``target``; its ptxas figures, or the error."""
    from triton import knobs

    spec_data = json.loads(spec)
    with _stand_in(target):
        fn = _kernel(name)
        name = name.split(":")[1]
        params = [p.name for p in fn.params]
        keys, values = spec_data["constant_keys"], spec_data["constant_vals"]
        constexprs = {params[key[0]]: value for key, value in zip(keys, values, strict=True)}
        row = {
            "target": target.name,
            "kernel": name,
            "constexprs": {k: v for k, v in constexprs.items() if k.isupper()},
            "num_warps": spec_data["options"]["num_warps"],
            "num_stages": spec_data["options"]["num_stages"],
            "key": spec_data["key"],
        }
        log = io.StringIO()
        saved_dump = knobs.nvidia.dump_ptxas_log
        knobs.nvidia.dump_ptxas_log = True
        start = time.perf_counter()
        with tempfile.NamedTemporaryFile("r", suffix=".log") as err:
            try:
                with _stderr_to(Path(err.name)), contextlib.redirect_stdout(log):
                    kernel = fn.preload(spec)
            except Exception as exc:  # any compile error is the finding
                row["error"] = _error_summary(exc, Path(err.name).read_text(errors="replace"))
                return row
            finally:
                knobs.nvidia.dump_ptxas_log = saved_dump
        row["compile_s"] = round(time.perf_counter() - start, 2)
    stats_file = Path(knobs.cache.dir) / "fedlora-compile-check" / f"{kernel.hash}-{target.arch}.json"
    stats = _ptxas_stats(log.getvalue())
    if stats is None and stats_file.exists():
        stats = json.loads(stats_file.read_text())
    if stats is None:  # compiled earlier by another process: Triton's cache kept the cubin, not the ptxas log
        stats = _ptxas_stats(_ptxas_rerun(kernel.asm["ptx"], target.arch))
    if stats is not None:
        stats_file.parent.mkdir(parents=True, exist_ok=True)
        stats_file.write_text(json.dumps(stats))
    shared = int(kernel.metadata.shared)
    row.update(stats or {}, shared_bytes=shared, error=None)
    if stats:
        row["ctas_per_sm"] = _ctas_per_sm(target, stats["registers"], row["num_warps"], shared)
    return row


def _compile_task(target: Target, name: str, spec: str) -> dict:
    return compile_variant(target, name, spec)


def device_check(points: list[Point]) -> list[dict]:
    """On a CUDA GPU: the op runs for real at ``points``; for every kernel variant it launched, the registers and
    spills the driver reports next to what the stand-in capture and compile predict for this GPU (same variant key
    expected: the capture sees what a launch sees; same registers expected: same compiler)."""
    import torch

    kernels = _import_kernels()
    major, minor = torch.cuda.get_device_capability()
    props = torch.cuda.get_device_properties(0)
    target = Target(f"sm_{major}{minor}", major * 10 + minor, props.multi_processor_count, 0)
    predicted = {json.dumps(json.loads(spec)["key"]): (name, spec) for name, spec in capture(target, points)}
    for point in points:
        _run_point(kernels, point, "cuda")
    torch.cuda.synchronize()
    rows = []
    device = torch.cuda.current_device()
    for name in sorted({name for name, _ in predicted.values()}):
        kernel_cache = _kernel(name).device_caches[device][0]
        for key, kernel in kernel_cache.items():
            kernel._init_handles()
            row = {"device": props.name, "kernel": name, "registers": kernel.n_regs, "spills": kernel.n_spills}
            match = predicted.pop(json.dumps(key), None)
            row["captured"] = match is not None
            if match is not None:
                stand_in = compile_variant(target, *match)
                row.update(predicted_registers=stand_in.get("registers"), predicted_error=stand_in.get("error"))
            rows.append(row)
    rows += [{"device": props.name, "kernel": name, "launched": False} for name, _ in predicted.values()]
    return rows


# --------------------------------------------------------------------------------------------------------------------
# Driver: capture and compile in worker processes, write the table
# --------------------------------------------------------------------------------------------------------------------


def _pool(jobs: int) -> concurrent.futures.ProcessPoolExecutor:
    # spawn: a fresh interpreter per worker (no inherited TRITON_INTERPRET state, no forked OpenMP pools)
    return concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"))


def _map(jobs: int, fn, tasks: list[tuple]) -> list:
    """``[fn(*task) for task in tasks]`` on ``jobs`` worker processes; a task whose worker dies (a compiler abort)
    is rerun alone, and if it kills its worker again its result is the exception."""
    results: list = [None] * len(tasks)
    pending = list(range(len(tasks)))
    try:
        with _pool(jobs) as pool:
            futures = {pool.submit(fn, *tasks[i]): i for i in pending}
            for future in concurrent.futures.as_completed(futures):
                results[futures[future]] = future.result()
                pending.remove(futures[future])
    except concurrent.futures.process.BrokenProcessPool:
        for i in list(pending):
            try:
                with _pool(1) as pool:
                    results[i] = pool.submit(fn, *tasks[i]).result()
            except concurrent.futures.process.BrokenProcessPool as exc:
                results[i] = exc
    return results


def run(points: list[Point], jobs: int) -> list[dict]:
    """Capture the variants of ``points`` for every target and compile them; one row per (target, variant)."""
    chunks = [points[i::jobs] for i in range(jobs)]
    capture_tasks = [(target, chunk) for target in TARGETS for chunk in chunks if chunk]
    variants: dict[tuple[Target, str, str], list[Point | str]] = {}
    for (target, _), found in zip(capture_tasks, _map(jobs, _capture_task, capture_tasks), strict=True):
        if isinstance(found, BaseException):
            raise RuntimeError(f"capturing the launches for {target.name} crashed: {found}")
        for name, spec, users in found:
            variants.setdefault((target, name, spec), []).extend(users)
    compile_tasks = sorted(variants, key=lambda v: (not v[1].endswith(":_grad_input_kernel"), v[0].name, v[1]))
    rows = []
    for task, row in zip(compile_tasks, _map(jobs, _compile_task, compile_tasks), strict=True):
        target, name, spec = task
        if isinstance(row, BaseException):
            row = {"target": target.name, "kernel": name.split(":")[1], "error": f"crash: {row}"}
        users = variants[task]
        row["dtype"] = users[0].dtype if isinstance(users[0], Point) else "-"
        row["points"] = len(users)
        row["example"] = str(users[0])
        rows.append(row)
    rows.sort(key=lambda row: (row["target"], row["kernel"], str(row.get("dtype")), json.dumps(row.get("constexprs"))))
    return rows


def _fmt_constexprs(constexprs: dict) -> str:
    short = {"FP32_DOT": "fp32dot", "PRECISION": "", "HAS_BASE": "base"}
    parts = []
    for key, value in constexprs.items():
        if isinstance(value, bool):
            if value:
                parts.append(short.get(key, key.lower()))
        elif key == "PRECISION":
            parts.append(value) if constexprs.get("FP32_DOT") else None
        else:
            parts.append(f"{key.removeprefix('BLOCK_')}={value}")
    return " ".join(parts)


SUMMARY_COLUMNS = (
    "target",
    "variants",
    "compiled",
    "failed",
    "max registers",
    "max spill stores, bf16/fp16",
    "max spill stores, fp32",
    "max shared KB",
    "min CTAs/SM",
)
VARIANT_COLUMNS = (
    "target",
    "kernel",
    "dtype",
    "constexprs",
    "warps",
    "stages",
    "registers",
    "spill st/ld B",
    "shared KB",
    "CTAs/SM",
    "points",
    "example point",
    "error",
)


def _summary_cells(target: Target, rows: list[dict]) -> list:
    mine = [row for row in rows if row["target"] == target.name]
    ok = [row for row in mine if not row.get("error")]
    half = [row["spill_stores"] for row in ok if row["dtype"] in ("bf16", "fp16")]
    full = [row["spill_stores"] for row in ok if row["dtype"].startswith("fp32")]
    return [
        target.name,
        len(mine),
        len(ok),
        len(mine) - len(ok),
        max((row["registers"] for row in ok), default="-"),
        max(half, default="-"),
        max(full, default="-"),
        f"{max((row['shared_bytes'] for row in ok), default=0) / 1024:.0f}",
        min((row["ctas_per_sm"] for row in ok), default="-"),
    ]


def _variant_cells(row: dict) -> list:
    if row.get("error"):
        figures = ["-"] * 4
    else:
        figures = [
            row["registers"],
            f"{row['spill_stores']}/{row['spill_loads']}",
            f"{row['shared_bytes'] / 1024:.1f}",
            row["ctas_per_sm"],
        ]
    return [
        row["target"],
        f"`{row['kernel']}`",
        row.get("dtype", "-"),
        _fmt_constexprs(row.get("constexprs", {})),
        row.get("num_warps", "-"),
        row.get("num_stages", "-"),
        *figures,
        row["points"],
        row["example"],
        (row.get("error") or "").replace("|", "/")[:300],
    ]


def markdown(rows: list[dict], points: int, wall_s: float) -> str:
    import triton

    intro = (
        f"`python -m benchmarks.compile_check`: {points} grid points of the real op (fwd + bwd) captured per target, "
        f"Triton {triton.__version__}, {wall_s:.0f} s wall. Registers and spills from ptxas, shared memory from "
        "Triton's metadata, CTAs/SM estimated from both (see the module docstring)."
    )
    summary = markdown_table(SUMMARY_COLUMNS, (_summary_cells(target, rows) for target in TARGETS))
    variants = markdown_table(VARIANT_COLUMNS, map(_variant_cells, rows))
    return f"# Ahead-of-time compile check of the Triton kernels\n\n{intro}\n\n{summary}\n{variants}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.compile_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="directory for compile-check.{jsonl,md}")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--quick", action="store_true", help="a small grid (fp32/bf16, 4096², r 16/64)")
    parser.add_argument(
        "--on-device",
        action="store_true",
        help="on a CUDA GPU: compare the variants real launches compile (and their registers) with the capture's "
        "(writes compile-check-device.jsonl; the --quick grid)",
    )
    args = parser.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)  # the workers must see JIT functions, not the interpreter
    if args.on_device:
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("compile_check --on-device: no CUDA device is visible")
        rows = device_check(grid(quick=True))
        write_jsonl(args.out / f"{STEM}-device.jsonl", rows)
        bad = [
            row
            for row in rows
            if not row.get("captured")
            or row.get("predicted_error")
            or row["registers"] != row.get("predicted_registers")
        ]
        for row in bad:
            print("MISMATCH", row)
        print(f"{len(rows)} launched variants, {len(bad)} not as captured; wrote {args.out / STEM}-device.jsonl")
        return int(bool(bad))
    start = time.perf_counter()
    points = grid(args.quick)
    rows = run(points, max(1, args.jobs))
    wall = time.perf_counter() - start
    write_jsonl(args.out / f"{STEM}.jsonl", ({k: v for k, v in row.items() if k != "key"} for row in rows))
    table = markdown(rows, len(points), wall)
    (args.out / f"{STEM}.md").write_text(table)
    print("\n".join(table.splitlines()[:9]))
    failed = [row for row in rows if row.get("error")]
    for row in failed:
        print(f"FAILED {row['target']} {row['kernel']} {row.get('constexprs')} ({row['example']}): {row['error']}")
    print(f"{len(rows)} variants, {len(failed)} failed, {wall:.0f} s; wrote {args.out / STEM}.{{jsonl,md}}")
    return int(bool(failed))


if __name__ == "__main__":
    raise SystemExit(main())
