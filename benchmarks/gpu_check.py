"""One command for a machine with an NVIDIA GPU: ``python -m benchmarks.gpu_check [OUT_DIR]`` (from the repo root);
``python -m benchmarks.gpu_check --dry-run [--out DIR]`` runs the same steps on the CPU, to prove the wiring.

Steps, each a fresh process (so ``TRITON_INTERPRET`` and ``FEDLORA_BACKEND`` are clean) with a wall-clock cap, past
which it is killed: a check step (build, tests, compile check) killed so fails; a timing step killed so is ``cut``
(the rows it wrote are kept, the run goes on). The caps add up to 8 minutes (480 s), the most the GPU run may take on
one H200 (they are caps, set from the CPU-side timings and the kernels benchmark's H100 estimates, not yet measured
on an H200; each step's seconds go into the summary):

====================  ======  ==============================================================================
step                  cap, s  what it runs
====================  ======  ==============================================================================
build-native              90  ``setup.py build_ext --inplace`` with ``FEDLORA_REQUIRE_NATIVE=1``, for this GPU's
                              architecture only, when ``fedlora_kernels._C`` lacks CUDA kernels (a fresh clone:
                              ``*.so`` is not tracked); skipped when it has them
kernels                  120  pytest: tests/test_kernels_triton.py, tests/test_feddora_linear.py (the fused linear
                              op, both base-GEMM modes), tests/test_native.py and tests/test_native_cuda.py (the
                              extension's CPU and CUDA kernels): fp32/fp16/bf16, outputs and all gradients against
                              the float64 reference under tests/numerics.py's rule, ragged shapes, dropout +
                              backward at k % 16 == 0, offsets past int32
tuner-triton              40  pytest tests/test_tuner.py with ``FEDLORA_BACKEND=triton`` (models on CUDA: the
                              ``device`` fixture of tests/conftest.py)
tuner-native              25  the same with ``FEDLORA_BACKEND=native`` (the CUDA kernels, float64 included)
compile-check             60  ``benchmarks.compile_check --on-device``: the kernel variants real launches compile,
                              with their registers as the driver reports them, next to what the CPU-side stand-in
                              capture predicts (``compile-check-device.jsonl``; a mismatch fails the step)
timing-targets            70  ``benchmarks.kernels --preset targets --budget-s 45``: the issue's target rows (base,
                              PEFT LoRA/DoRA, the reference, torch.compile, Triton, the fused linear op with cuBLAS
                              and Triton base GEMMs, native; bf16, r=16); no case starts after 45 s
timing-end-to-end         45  ``benchmarks.kernels --preset targets --no-kernels --end-to-end --budget-s 15``: one
                              AdamW step of the LLaMA-shaped models (FedDoRA, PEFT LoRA, PEFT DoRA)
timing-crossover          30  ``--shapes 4096x4096 --tokens 1,16,64,128,256,1024`` of base, PEFT LoRA, Triton and
                              native, ``--budget-s 20``: the small-token crossover that sets
                              ``backend.TRITON_MIN_TOKENS``
====================  ======  ==============================================================================

Output, all in OUT_DIR (default ``benchmarks/results/``): each pytest step's log and JUnit XML
``gpu-check-<device>-<date>-<step>.{log,xml}``, every other step's log ``...-<step>.log``, the timing rows in
``kernels-<device>-<date>.jsonl`` (with its ``.md``/``.png``), ``compile-check-device.jsonl``, and
``gpu-check-<device>-<date>-summary.json`` (each step's command, status, seconds and cap). Exits non-zero when a
check step fails or runs past its cap, or a timing step fails (an error, not a cut), and with one line (no traceback)
on a machine without CUDA.

``--dry-run`` (no GPU needed; what CI runs, tests/test_gpu_check.py): every step on the CPU, Triton under its
interpreter, into ``--out`` (default: a new temporary directory): build-native checks the extension has CPU kernels
(and builds it when not); the pytest steps run the same files with a few fast tests selected (``-k``), the CUDA
ones collected and skipped; compile-check runs the CPU stand-in capture and compile of ``--quick``'s grid for
sm_90/sm_80 (``--on-device`` needs a GPU); the timing steps run the ``smoke`` preset's shapes with second-sized
budgets. Its caps are the CPU's (about 2 minutes in all on a 2-core machine with a warm Triton cache).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from benchmarks.common import REPO, RESULTS_DIR, slug, today

CROSSOVER_TOKENS = "1,16,64,128,256,1024"
GPU_BUDGET_S = 480
KERNEL_TESTS = (
    "tests/test_kernels_triton.py",
    "tests/test_feddora_linear.py",
    "tests/test_native.py",
    "tests/test_native_cuda.py",
)
DRY_RUN_TESTS = {
    "kernels": "dropout_mask or invalid_inputs or forced_triton_runs or native_matches_reference or cuda",
    "tuner": "layer_output_matches_formula or gradients_of_all_tensors_match_formula",
}
"""``-k`` selections of the dry run's pytest steps: a few fast tests of each file (the CUDA ones collect and skip)."""


@dataclass(frozen=True)
class Step:
    """One step: ``command`` run in REPO with ``env`` on top of the environment, killed after ``cap_s`` seconds."""

    name: str
    command: tuple[str, ...]
    cap_s: float
    env: dict[str, str] = field(default_factory=dict)
    junit: bool = False
    timing: bool = False
    """A timing step: killed at its cap it is ``cut`` (its rows so far kept), not failed."""


@dataclass
class Outcome:
    step: str
    status: str  # passed, failed, timeout (a check step past its cap), cut (a timing step past it) or skipped
    seconds: float
    cap_s: float
    command: str
    detail: str = ""


def _python(*args: str) -> tuple[str, ...]:
    return (sys.executable, *args)


def _pytest(name: str, paths: tuple[str, ...], cap_s: float, dry_run: bool, **env: str) -> Step:
    command = _python("-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *paths)
    if dry_run:
        command += ("-k", DRY_RUN_TESTS["tuner" if name.startswith("tuner") else name])
    return Step(name, command, cap_s, env, junit=True)


def plan(out: Path, dry_run: bool) -> list[Step]:
    """The steps after build-native, with their caps (see the module docstring), for the GPU or the dry run."""
    kernels = ("-m", "benchmarks.kernels", "--out", str(out))
    crossover_impls = ("--impls", "base,peft_lora,feddora_triton,feddora_native")
    if dry_run:
        interpret = {"TRITON_INTERPRET": "1"}
        timing = (*kernels, "--preset", "smoke", "--device", "cpu")
        crossover = (*timing, "--shapes", "64x64", "--tokens", "1", *crossover_impls, "--budget-s", "5")
        return [
            _pytest("kernels", KERNEL_TESTS, 90, True, **interpret),
            _pytest("tuner-triton", ("tests/test_tuner.py",), 60, True, FEDLORA_BACKEND="triton", **interpret),
            _pytest("tuner-native", ("tests/test_tuner.py",), 60, True, FEDLORA_BACKEND="native", **interpret),
            Step("compile-check", _python("-m", "benchmarks.compile_check", "--quick", "--out", str(out)), 240),
            Step("timing-targets", _python(*timing, "--budget-s", "5"), 120, interpret, timing=True),
            Step("timing-end-to-end", _python(*timing, "--no-kernels", "--end-to-end"), 120, timing=True),
            Step("timing-crossover", _python(*crossover), 120, interpret, timing=True),
        ]
    targets = (*kernels, "--preset", "targets")
    crossover = (*targets, "--shapes", "4096x4096", "--tokens", CROSSOVER_TOKENS, *crossover_impls, "--budget-s", "20")
    return [
        _pytest("kernels", KERNEL_TESTS, 120, False),
        _pytest("tuner-triton", ("tests/test_tuner.py",), 40, False, FEDLORA_BACKEND="triton"),
        _pytest("tuner-native", ("tests/test_tuner.py",), 25, False, FEDLORA_BACKEND="native"),
        Step("compile-check", _python("-m", "benchmarks.compile_check", "--on-device", "--out", str(out)), 60),
        Step("timing-targets", _python(*targets, "--budget-s", "45"), 70, timing=True),
        Step(
            "timing-end-to-end", _python(*targets, "--no-kernels", "--end-to-end", "--budget-s", "15"), 45, timing=True
        ),
        Step("timing-crossover", _python(*crossover), 30, timing=True),
    ]


BUILD_CAP_S = {False: 90, True: 600}
"""build-native's cap on the GPU (16 cores, one architecture) and in the dry run (2 cores; it builds only when the
extension is missing)."""


def native_reason(device: str) -> str:
    """Why ``fedlora_kernels._C`` cannot run on ``device`` (empty when it can), asked of a fresh process: this one
    must not hold the library that a build is about to replace."""
    probe = f"from fedlora_kernels import native; print(native.unavailable_reason({device!r}), end='')"
    result = subprocess.run(_python("-c", probe), cwd=REPO, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        return "fedlora_kernels.native does not import: " + (result.stderr.strip().splitlines() or ["?"])[-1]
    return result.stdout.strip()


def build_step(device: str, dry_run: bool) -> tuple[Step, str]:
    """build-native and the reason it must run (empty: the extension already has kernels for ``device``)."""
    env = {"FEDLORA_REQUIRE_NATIVE": "1", "MAX_JOBS": str(os.cpu_count() or 1)}
    if device == "cuda":
        major, minor = torch.cuda.get_device_capability()
        env["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}"
    step = Step("build-native", _python("setup.py", "build_ext", "--inplace"), BUILD_CAP_S[dry_run], env)
    return step, native_reason(device)


def run_step(step: Step, out: Path, tag: str) -> Outcome:
    """Run ``step``: its output echoed and written to ``out/<tag>-<name>.log`` (JUnit XML next to it for pytest)."""
    command = step.command + ((f"--junitxml={out / f'{tag}-{step.name}.xml'}",) if step.junit else ())
    env = {**os.environ, **step.env}
    if "TRITON_INTERPRET" not in step.env:
        env.pop("TRITON_INTERPRET", None)  # a leftover interpreter setting would make the GPU run test nothing real
    print(f"== {step.name} (cap {step.cap_s:.0f} s): {' '.join(command)}", flush=True)
    start = time.monotonic()
    with open(out / f"{tag}-{step.name}.log", "w") as log:
        proc = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, text=True, start_new_session=True
        )
        try:
            code = proc.wait(timeout=step.cap_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the step's whole process group: pytest, compile workers, ...
            proc.wait()
            code = None
    seconds = time.monotonic() - start
    tail = (out / f"{tag}-{step.name}.log").read_text(errors="replace").splitlines()[-15:]
    print("\n".join(f"   | {line}" for line in tail), flush=True)
    status = ("cut" if step.timing else "timeout") if code is None else ("passed" if code == 0 else "failed")
    detail = f"killed after {step.cap_s:.0f} s" if code is None else f"exit {code}"
    print(f"== {step.name}: {status} ({detail}), {seconds:.1f} s", flush=True)
    return Outcome(step.name, status, round(seconds, 1), step.cap_s, " ".join(command), detail)


def failed_steps(outcomes: list[Outcome]) -> list[str]:
    """The steps that fail the check: any that failed, and check steps past their caps (a timing step cut at its cap
    does not: its rows so far are kept)."""
    return [outcome.step for outcome in outcomes if outcome.status in ("failed", "timeout")]


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", nargs="?", type=Path, help="output directory (default benchmarks/results/)")
    parser.add_argument("--out", type=Path, help="output directory (the same as OUT_DIR)")
    parser.add_argument(
        "--dry-run", action="store_true", help="every step on the CPU, tiny, into --out (default: a temporary dir)"
    )
    args = parser.parse_args(argv)
    if args.out and args.out_dir and args.out != args.out_dir:
        parser.error("give the output directory once (OUT_DIR or --out)")
    args.out = args.out or args.out_dir
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit(
            "gpu_check: no CUDA device is visible; run it on a machine with an NVIDIA GPU (or use --dry-run to "
            "check the wiring on the CPU). Nothing was checked."
        )
    if args.dry_run:
        out = args.out or Path(tempfile.mkdtemp(prefix="gpu-check-dry-run-"))
        device, tag = "cpu", f"gpu-check-dry-run-{today()}"
    else:
        out = args.out or RESULTS_DIR
        device, tag = "cuda", f"gpu-check-{slug(torch.cuda.get_device_name())}-{today()}"
    out.mkdir(parents=True, exist_ok=True)
    print(f"gpu_check{' --dry-run' if args.dry_run else ''} on {device}: results in {out}", flush=True)

    outcomes = []
    build, reason = build_step(device, args.dry_run)
    if reason:
        print(f"== build-native: {reason}", flush=True)
        outcome = run_step(build, out, tag)
        after = native_reason(device)
        if outcome.status == "passed" and after:
            outcome.status, outcome.detail = "failed", f"built, but still unavailable: {after}"
        outcomes.append(outcome)
    else:
        detail = f"fedlora_kernels._C already has {device} kernels"
        print(f"== build-native: skipped ({detail})", flush=True)
        outcomes.append(Outcome(build.name, "skipped", 0.0, build.cap_s, " ".join(build.command), detail))
    outcomes += [run_step(step, out, tag) for step in plan(out, args.dry_run)]

    summary = out / f"{tag}-summary.json"
    summary.write_text(json.dumps([vars(outcome) for outcome in outcomes], indent=1) + "\n")
    total = sum(outcome.seconds for outcome in outcomes)
    print(f"\n{'step':<20} {'status':<8} {'seconds':>8} {'cap':>5}")
    for outcome in outcomes:
        print(f"{outcome.step:<20} {outcome.status:<8} {outcome.seconds:>8.1f} {outcome.cap_s:>5.0f}")
    bad = failed_steps(outcomes)
    print(f"total {total:.0f} s; wrote {summary}")
    print("gpu_check:", "PASSED" if not bad else f"FAILED ({', '.join(bad)})")
    return int(bool(bad))


if __name__ == "__main__":
    raise SystemExit(main())
