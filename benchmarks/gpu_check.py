"""One command for a machine with an NVIDIA GPU: ``python -m benchmarks.gpu_check [OUT_DIR]`` (from the repo root).

1. Correctness on CUDA: the kernel tests (tests/test_kernels_triton.py, tests/test_native.py: fp32/fp16/bf16,
   output and all gradients against the float64 reference under tests/numerics.py's rule, ragged shapes) and the
   tuner tests with ``FEDLORA_BACKEND=triton``.
2. Timing: ``benchmarks.kernels --preset targets --end-to-end`` (the issue's target rows: base, PEFT LoRA/DoRA, the
   reference, torch.compile, Triton, native; bf16, r=16) and the small-token crossover between the Triton and
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

REPO = Path(__file__).resolve().parents[1]
CROSSOVER_TOKENS = "1,16,64,128,256,1024"


def _pytest(*paths: str, **env: str) -> int:
    """Exit code of pytest on ``paths`` in a fresh process (so TRITON_INTERPRET and backend env vars are clean)."""
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *paths]
    return subprocess.run(command, cwd=REPO, env={**os.environ, **env}).returncode


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not torch.cuda.is_available():
        raise SystemExit(
            "gpu_check: no CUDA device is visible; run it on a machine with an NVIDIA GPU. Nothing was checked."
        )
    out = Path(argv[0]) if argv else REPO / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    print(f"== correctness on {torch.cuda.get_device_name()}", flush=True)
    failures = _pytest("tests/test_kernels_triton.py", "tests/test_native.py")
    failures |= _pytest("tests/test_tuner.py", FEDLORA_BACKEND="triton")
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
