"""Test-session setup: Triton runs under its CPU interpreter when no GPU is present; torch runs on one CPU thread;
the ``device`` fixture is where tests put the models and tensors the FedDoRA op sees.

``device`` is CUDA where a GPU is visible, else the CPU. A forced backend (``FEDLORA_BACKEND``) must be able to run
on the tests' tensors: Triton runs on CUDA tensors, and on CPU tensors only under its interpreter, which is set
here only without a GPU; so on a GPU machine the tuner tests must build CUDA models, or every call under
``FEDLORA_BACKEND=triton`` would raise ``BackendUnavailableError``.

One thread: the test models are tiny, so threads buy nothing, and ``tests/test_faults.py`` forks runs to kill them,
which hangs once the parent has started an OpenMP thread pool (GNU OpenMP does not survive ``fork``).
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Must be set before any module decorates a kernel with @triton.jit.
    os.environ.setdefault("TRITON_INTERPRET", "1")
torch.set_num_threads(1)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="session")
def device() -> torch.device:
    """The device the kernels' backends run on in this session: CUDA where a GPU is visible, else the CPU."""
    return DEVICE


def pytest_terminal_summary(terminalreporter):
    """Count what the reliability tests tried: tests marked ``fault`` and ``bad_input``, by outcome."""
    counts = {}
    for outcome in ("passed", "failed", "skipped"):
        for report in terminalreporter.stats.get(outcome, []):
            if report.when != "call" and outcome != "skipped":
                continue
            for marker in ("fault", "bad_input"):
                if marker in report.keywords:
                    counts.setdefault(marker, {}).setdefault(outcome, 0)
                    counts[marker][outcome] += 1
    for marker, by_outcome in sorted(counts.items()):
        terminalreporter.write_line(f"reliability: {marker}: " + ", ".join(f"{n} {o}" for o, n in by_outcome.items()))
