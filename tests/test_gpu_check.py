"""benchmarks/gpu_check.py's wiring, without a GPU: ``--dry-run`` runs every step the GPU run takes, on the CPU.

The dry run is one subprocess (about 1.5-2 minutes on 2 cores with a warm Triton cache): the native build check, the
three pytest steps (a few fast tests each, the CUDA ones collected), the compile check's CPU stand-in on its quick
grid and the three timing steps on the smoke preset. The GPU plan's caps are checked to fit its 8 minutes, and the
step runner's timeout and failure handling are checked on tiny commands.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_check
from benchmarks.common import REPO, read_jsonl

STEPS = [
    "build-native",
    "kernels",
    "tuner-triton",
    "tuner-native",
    "compile-check",
    "timing-targets",
    "timing-end-to-end",
    "timing-crossover",
]


def test_dry_run_runs_every_step_on_the_cpu(tmp_path: Path) -> None:
    env = {name: value for name, value in os.environ.items() if name not in ("TRITON_INTERPRET", "FEDLORA_BACKEND")}
    command = [sys.executable, "-m", "benchmarks.gpu_check", "--dry-run", "--out", str(tmp_path)]
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert proc.stdout.rstrip().endswith("gpu_check: PASSED")

    (summary,) = tmp_path.glob("gpu-check-dry-run-*-summary.json")
    tag = summary.name.removesuffix("-summary.json")
    outcomes = {row["step"]: row for row in json.loads(summary.read_text())}
    assert list(outcomes) == STEPS
    # The extension is there (it is built for the test session), so the build is skipped, saying why.
    assert outcomes["build-native"]["status"] in ("passed", "skipped"), outcomes["build-native"]
    for name in STEPS[1:]:
        assert outcomes[name]["status"] == "passed", outcomes[name]
        assert outcomes[name]["seconds"] <= outcomes[name]["cap_s"]
        assert (tmp_path / f"{tag}-{name}.log").stat().st_size > 0, name

    # Each pytest step ran tests (none failed); the CUDA tests of the native extension were collected and skipped.
    for name in ("kernels", "tuner-triton", "tuner-native"):
        suite = ET.parse(tmp_path / f"{tag}-{name}.xml").getroot().find("testsuite")
        counts = {key: int(suite.get(key)) for key in ("tests", "failures", "errors", "skipped")}
        assert counts["failures"] == counts["errors"] == 0, (name, counts)
        assert counts["tests"] - counts["skipped"] >= 2, (name, counts)
    kernel_cases = ET.parse(tmp_path / f"{tag}-kernels.xml").getroot().iter("testcase")
    assert any("test_native_cuda" in case.get("classname") for case in kernel_cases)
    assert "FEDLORA_BACKEND=native" not in proc.stdout  # the backends go through the environment, not the command

    compile_rows = read_jsonl(tmp_path / "compile-check.jsonl")
    assert {row["target"] for row in compile_rows} == {"sm_90", "sm_80"}
    assert not [row for row in compile_rows if row.get("error")]

    (timings,) = tmp_path.glob("kernels-*.jsonl")
    rows = read_jsonl(timings)
    layer = {(row["impl"], row["n_tokens"]) for row in rows if row["skipped_reason"] is None}
    assert {("feddora_triton", 32), ("feddora_native", 32), ("feddora_triton", 1), ("feddora_native", 1)} <= layer
    assert {"e2e_feddora", "e2e_peft_lora", "e2e_peft_dora"} <= {row["impl"] for row in rows}


def test_the_gpu_plan_has_the_dry_runs_steps_and_fits_eight_minutes(tmp_path: Path) -> None:
    gpu, dry = gpu_check.plan(tmp_path, dry_run=False), gpu_check.plan(tmp_path, dry_run=True)
    assert ["build-native", *(step.name for step in gpu)] == STEPS
    assert [step.name for step in dry] == STEPS[1:]
    assert gpu_check.BUILD_CAP_S[False] + sum(step.cap_s for step in gpu) <= gpu_check.GPU_BUDGET_S == 8 * 60
    for step in gpu:
        assert "TRITON_INTERPRET" not in step.env, step.name  # the GPU run must test the compiled kernels
        assert "-k" not in step.command, step.name  # and every test, not the dry run's selection
        assert "--dry-run" not in step.command and "smoke" not in step.command, step.name
    (kernels,) = [step for step in gpu if step.name == "kernels"]
    assert "tests/test_native_cuda.py" in kernels.command
    backends = {step.name: step.env.get("FEDLORA_BACKEND") for step in gpu}
    assert backends["tuner-triton"] == "triton" and backends["tuner-native"] == "native"
    assert "--on-device" in next(step for step in gpu if step.name == "compile-check").command
    assert all(str(tmp_path) in " ".join(step.command) for step in gpu if not step.junit)


def test_a_step_past_its_cap_is_killed_and_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    sleeper = gpu_check.Step(
        "sleeper", (sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"), 2
    )
    outcome = gpu_check.run_step(sleeper, tmp_path, "t")
    assert outcome.status == "timeout" and outcome.seconds < 30, outcome
    assert (tmp_path / "t-sleeper.log").read_text().startswith("started")
    timing = gpu_check.run_step(dataclasses.replace(sleeper, name="timing", timing=True), tmp_path, "t")
    assert timing.status == "cut" and timing.seconds < 30, timing  # a timing step cut at its cap keeps its rows
    assert gpu_check.failed_steps([outcome, timing]) == ["sleeper"]

    probe = "import os, sys; print(os.environ.get('TRITON_INTERPRET')); sys.exit(3)"
    failing = gpu_check.run_step(gpu_check.Step("failing", (sys.executable, "-c", probe), 30), tmp_path, "t")
    assert failing.status == "failed" and failing.detail == "exit 3"
    assert gpu_check.failed_steps([timing, failing]) == ["failing"]
    assert (tmp_path / "t-failing.log").read_text().strip() == "None"  # a step without it runs without the interpreter


def test_without_cuda_it_says_so_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="no CUDA device is visible.*--dry-run") as exc:
        gpu_check.main([])
    assert "\n" not in str(exc.value.code)
