"""Every Triton kernel variant the FedDoRA op launches compiles for sm_90 and sm_80, without a GPU.

Runs ``python -m benchmarks.compile_check`` (see its docstring: the real op on meta tensors under a stand-in driver
captures each launch's specialisation; Triton's compiler and bundled ptxas compile them) in a fresh process, because
this test session imports the kernels under ``TRITON_INTERPRET=1``. About 2-3 minutes on 2 cores with a cold Triton
cache, seconds with a warm one.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

REPO = Path(__file__).resolve().parents[1]
KERNEL_FILES = ("triton_feddora/kernels.py", "triton_feddora_linear.py")


def test_every_launched_variant_compiles_for_hopper_and_ampere(tmp_path: Path) -> None:
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    env["OMP_NUM_THREADS"] = "1"
    command = [sys.executable, "-m", "benchmarks.compile_check", "--out", str(tmp_path), "--jobs", "2"]
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    report = tmp_path / "compile-check.jsonl"
    assert report.exists(), f"compile_check wrote no report (exit {proc.returncode}):\n{proc.stderr[-4000:]}"
    rows = [json.loads(line) for line in report.read_text().splitlines()]
    failed = [
        f"{row['target']} {row['kernel']} {row.get('constexprs')} ({row['example']}): {row['error']}"
        for row in rows
        if row.get("error")
    ]
    assert not failed, "\n".join(failed)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

    # Every kernel the module defines was launched by the captured calls, on both targets.
    sources = "".join((REPO / "fedlora_kernels" / name).read_text() for name in KERNEL_FILES)
    defined = set(re.findall(r"@triton\.jit\s*\ndef (\w+_kernel)\(", sources))
    for target in ("sm_90", "sm_80"):
        compiled = {row["kernel"] for row in rows if row["target"] == target}
        assert defined <= compiled, f"{target}: never launched: {sorted(defined - compiled)}"
    assert (tmp_path / "compile-check.md").read_text().startswith("# Ahead-of-time compile check")
