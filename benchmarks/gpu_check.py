"""One command for a machine with an NVIDIA GPU: ``python -m benchmarks.gpu_check [OUT_DIR]`` (from the repo root).

1. Correctness on CUDA: the kernel tests (tests/test_kernels_triton.py, tests/test_feddora_linear.py (the fused
   linear op, both base-GEMM modes), tests/test_native.py: fp32/fp16/bf16,
   output and all gradients against the float64 reference under tests/numerics.py's rule, ragged shapes, dropout +
   backward at k % 16 == 0, offsets past int32) and the tuner tests with ``FEDLORA_BACKEND=triton``; each pytest
   run's output and JUnit XML go to ``OUT_DIR/gpu-check-<device>-<date>-<name>.{log,xml}``.
2. The compile check against the hardware (``benchmarks.compile_check --on-device``): the kernel variants real
   launches compile, and their registers as the driver reports them, next to what the CPU-side stand-in capture
   predicts (``compile-check-device.jsonl``; a mismatch fails the check).
3. Timing: ``benchmarks.kernels --preset targets --end-to-end`` (the issue's target rows: base, PEFT LoRA/DoRA, the
   reference, torch.compile, Triton, the fused linear op with cuBLAS and Triton base GEMMs, native; bf16, r=16) and the small-token crossover between the Triton and
   native backends at 4096→4096 (which sets ``backend.TRITON_MIN_TOKENS``).

Results go to OUT_DIR (default benchmarks/results/). Exits non-zero when a correctness check fails, and with one
line (no traceback) on a machine without CUDA.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from benchmarks import kernels
from benchmarks.common import REPO, RESULTS_DIR, slug, today

CROSSOVER_TOKENS = "1,16,64,128,256,1024"


def _run(command: list[str], log: Path | None = None, **env: str) -> int:
    """Exit code of ``command`` in a fresh process (so TRITON_INTERPRET and backend env vars are clean), its output
    echoed and, with ``log``, also written there."""
    proc = subprocess.Popen(
        command, cwd=REPO, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    with open(log, "w") if log else open(os.devnull, "w") as sink:
        for line in proc.stdout:
            sys.stdout.write(line)
            sink.write(line)
    return proc.wait()


def _pytest(out: Path, tag: str, name: str, *paths: str, **env: str) -> int:
    """Exit code of pytest on ``paths``; its output and JUnit XML in ``out/<tag>-<name>.{log,xml}``."""
    junit = f"--junitxml={out / f'{tag}-{name}.xml'}"
    command = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", junit, *paths]
    return _run(command, out / f"{tag}-{name}.log", **env)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not torch.cuda.is_available():
        raise SystemExit(
            "gpu_check: no CUDA device is visible; run it on a machine with an NVIDIA GPU. Nothing was checked."
        )
    out = Path(argv[0]) if argv else RESULTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name()
    tag = f"gpu-check-{slug(device)}-{today()}"
    print(f"== correctness on {device}", flush=True)
    kernel_tests = ("tests/test_kernels_triton.py", "tests/test_feddora_linear.py", "tests/test_native.py")
    failures = _pytest(out, tag, "kernels", *kernel_tests)
    failures |= _pytest(out, tag, "tuner-triton", "tests/test_tuner.py", FEDLORA_BACKEND="triton")
    print("== compile check against the hardware", flush=True)
    command = [sys.executable, "-m", "benchmarks.compile_check", "--on-device", "--out", str(out)]
    failures |= _run(command, out / f"{tag}-compile-check.log")
    print("== timing: target rows", flush=True)
    kernels.main(["--preset", "targets", "--end-to-end", "--budget-s", "300", "--out", str(out)])
    print("== timing: small-token crossover, Triton vs native", flush=True)
    kernels.main(
        ["--preset", "targets", "--shapes", "4096x4096", "--tokens", CROSSOVER_TOKENS,
         "--impls", "base,peft_lora,feddora_triton,feddora_native", "--budget-s", "90", "--out", str(out)]
    )  # fmt: skip
    print("correctness:", "PASSED" if failures == 0 else "FAILED")
    return int(failures != 0)


if __name__ == "__main__":
    raise SystemExit(main())
