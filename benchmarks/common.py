"""What every benchmark shares: where results and the Dolly data are, the provenance of a row, and the writers and
readers of JSON-lines results and markdown tables."""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import json
import os
import platform
import re
import shlex
import subprocess
from collections.abc import Callable, Hashable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "benchmarks" / "results"
DEFAULT_DATA = REPO.parent / "shared" / "data" / "dolly" / "databricks-dolly-15k.jsonl"
"""Dolly-15k where the project's machines keep it: ``shared/`` next to the repository."""
NI_DATA = REPO.parent / "shared" / "data" / "ni"
"""The Natural Instructions task files (one client per task), beside Dolly."""


def add_data_argument(parser: argparse.ArgumentParser, help: str = "Dolly-15k .jsonl") -> None:
    """``--data PATH``: the Dolly file (a :class:`~pathlib.Path`), by default :data:`DEFAULT_DATA`."""
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help=f"{help} (default: {DEFAULT_DATA})")


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "cpu"


def provenance(module: str, argv: Sequence[str], device: torch.device | None = None) -> dict[str, Any]:
    """Where and how results were measured: the ``commit`` of the code (:func:`git_commit`), the ``command`` that
    reruns them (``python -m module *argv``), the UTC ``date`` (ISO 8601), the ``machine`` (host and platform), its
    ``cores``, the ``device``'s name (by default the GPU if there is one, else the CPU), ``torch_version`` and
    ``triton_version`` (None without triton)."""
    try:
        import triton
    except ImportError:
        triton = None
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return {
        "commit": git_commit(),
        "command": shlex.join(["python", "-m", module, *argv]),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.node()} ({platform.platform()})",
        "cores": os.cpu_count(),
        "device": device_name(device),
        "torch_version": torch.__version__,
        "triton_version": triton.__version__ if triton else None,
    }


def git_commit() -> str:
    """The repository's HEAD commit, with ``-dirty`` when tracked files other than results (``benchmarks/results/``)
    differ from it (``unknown`` outside git)."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        changed = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!benchmarks/results")
        return commit + ("-dirty" if changed else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def config_hash(config: Any) -> str:
    """A short hash of a resolved configuration (JSON-serialisable, keys sorted): rows with one hash ran one
    configuration."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def check_one_commit(rows: Sequence[dict[str, Any]], what: str) -> None:
    """Raise a ``ValueError`` when ``rows`` (of one comparison, ``what``) were not all made by one commit of the
    code (rows without a commit count as one unknown commit): a comparison is produced by one command."""
    commits = sorted({str(row.get("commit")) for row in rows})
    if len(commits) > 1:
        raise ValueError(f"{what}: rows from several commits ({', '.join(commits)}); a comparison needs one")


def today() -> str:
    """The UTC date as ``YYYYMMDD``, as results file names carry it."""
    return f"{dt.datetime.now(dt.timezone.utc):%Y%m%d}"


def slug(name: str) -> str:
    """``name`` for a file name: lower case, every run of other characters than letters and digits one ``-``."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]], append: bool = False) -> None:
    """``rows`` as JSON lines in ``path`` (its directory created), replacing what was there unless ``append``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a" if append else "w") as out:
        out.writelines(json.dumps(row) + "\n" for row in rows)


def read_jsonl(path: Path, key: Callable[[dict[str, Any]], Hashable] | None = None) -> list[dict[str, Any]]:
    """The rows of a JSON-lines file, none when it does not exist. With ``key``, of the rows with one key (re-runs of
    one measurement) only the last, at the place of the first."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    if key is None:
        return rows
    latest: dict[Hashable, dict[str, Any]] = {}
    for row in rows:
        latest[key(row)] = row
    return list(latest.values())


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A markdown table: ``header``, then one line per row of cells (each as ``str``), ending with a newline."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in cells) + " |" for cells in rows]
    return "\n".join(lines) + "\n"
