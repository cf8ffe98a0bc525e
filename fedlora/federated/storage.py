"""The run directory, its crash-safe writes, and the checkpoint from which ``--resume`` continues.

::

    <run>/config.yaml          the resolved configuration
    <run>/metrics.jsonl        one JSON object per line (see :mod:`fedlora.federated.report`)
    <run>/scores.png           global and local scores per round
    <run>/global_adapter/      PEFT adapter: the global shared tensors; personal and frozen tensors at their
                               initial values (the common starting point every client's personal state grows from)
    <run>/checkpoint/          server state after the last completed round: state.json, global.safetensors
                               (shared tensors only), server_optimizer.safetensors, rng.pt
    <run>/clients/<id>/        a client's personal.safetensors, optimizer.pt and state.json (its last round)

Every file and directory is written under a temporary name, fsynced and renamed into place. Round k commits as:
(1) the metrics rows are appended and fsynced; (2) every client that trained writes ``clients/<id>/pending/``;
(3) ``checkpoint/`` is replaced: the commit point, recording the metrics file size and each client's last round;
(4) the pending files are moved over the client's files. Recovery promotes pending states of the committed round,
drops later ones and truncates ``metrics.jsonl`` to its committed size, so a crash or Ctrl-C at any point loses
at most the round in progress.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

if TYPE_CHECKING:
    from fedlora.federated.client import ClientState

_PERSONAL, _OPTIMIZER, _STATE = "personal.safetensors", "optimizer.pt", "state.json"


@dataclass
class Checkpoint:
    """The server-side state after ``round`` completed rounds."""

    round: int
    global_tensors: dict[str, Tensor]
    server_optimizer: dict[str, Tensor]
    client_rounds: dict[str, int]  # client id -> last round it trained in (clients that trained at all)
    metrics_bytes: int
    rng: dict[str, Any]


class RunDir:
    """Paths and crash-safe reads/writes of one run directory."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.config = self.path / "config.yaml"
        self.metrics = self.path / "metrics.jsonl"
        self.plot = self.path / "scores.png"
        self.global_adapter = self.path / "global_adapter"
        self.checkpoint = self.path / "checkpoint"
        self.clients = self.path / "clients"

    def client_dir(self, client_id: str) -> Path:
        return self.clients / client_id

    def append_metrics(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """Append JSON lines and fsync; returns once they are on disk."""
        with self.metrics.open("a") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
            f.flush()
            os.fsync(f.fileno())

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics.exists():
            return []
        return [json.loads(line) for line in self.metrics.read_text().splitlines() if line]

    def commit_round(self, checkpoint: Checkpoint, trained: Sequence[ClientState]) -> None:
        """Write the trained clients' states and the checkpoint of a completed round (steps 2-4 above).

        ``trained`` lists the clients whose personal state changed; strategies without personal tensors pass none.
        """
        for client in trained:
            with atomic_dir(self.client_dir(client.client_id) / "pending") as tmp:
                save_file(client.personal, tmp / _PERSONAL)
                torch.save(client.optimizer_state, tmp / _OPTIMIZER)
                (tmp / _STATE).write_text(json.dumps({"round": client.last_round}))
        with atomic_dir(self.checkpoint) as tmp:
            save_file(checkpoint.global_tensors, tmp / "global.safetensors")
            save_file(checkpoint.server_optimizer, tmp / "server_optimizer.safetensors")
            torch.save(checkpoint.rng, tmp / "rng.pt")
            state = {
                "round": checkpoint.round,
                "client_rounds": checkpoint.client_rounds,
                "metrics_bytes": checkpoint.metrics_bytes,
            }
            (tmp / _STATE).write_text(json.dumps(state, indent=2))
        for client in trained:
            _promote(self.client_dir(client.client_id), checkpoint.round)

    def committed_round(self) -> int:
        """The round of the last committed checkpoint (0 before the first), read without any recovery."""
        state_file = self.checkpoint / _STATE
        return json.loads(state_file.read_text())["round"] if state_file.exists() else 0

    def load_checkpoint(self) -> Checkpoint | None:
        """The last committed checkpoint (None before the first round completed), after crash recovery."""
        recover_dir(self.checkpoint)
        state_file = self.checkpoint / _STATE
        committed = json.loads(state_file.read_text()) if state_file.exists() else None
        committed_round = committed["round"] if committed else 0
        if self.clients.exists():
            for client_dir in sorted(p for p in self.clients.iterdir() if p.is_dir()):
                recover_dir(client_dir / "pending")
                _promote(client_dir, committed_round)
        metrics_bytes = committed["metrics_bytes"] if committed else 0
        if self.metrics.exists():
            with self.metrics.open("r+") as f:
                f.truncate(metrics_bytes)
        if committed is None:
            return None
        return Checkpoint(
            round=committed_round,
            global_tensors=load_file(self.checkpoint / "global.safetensors"),
            server_optimizer=load_file(self.checkpoint / "server_optimizer.safetensors"),
            client_rounds=committed["client_rounds"],
            metrics_bytes=metrics_bytes,
            rng=torch.load(self.checkpoint / "rng.pt", weights_only=True),
        )

    def load_client(self, client_id: str) -> tuple[dict[str, Tensor], dict[str, Any], int] | None:
        """A client's saved ``(personal tensors, optimizer state, last round)``, or None if it never trained."""
        client_dir = self.client_dir(client_id)
        if not (client_dir / _STATE).exists():
            return None
        optimizer = torch.load(client_dir / _OPTIMIZER, weights_only=True)
        last_round = json.loads((client_dir / _STATE).read_text())["round"]
        return load_file(client_dir / _PERSONAL), optimizer, last_round


def _promote(client_dir: Path, committed_round: int) -> None:
    """Move a committed ``pending/`` state over the client's files; drop one from an uncommitted round."""
    pending = client_dir / "pending"
    if not pending.exists():
        return
    state_file = pending / _STATE
    if state_file.exists() and json.loads(state_file.read_text())["round"] > committed_round:
        shutil.rmtree(pending)
        return
    for name in (_PERSONAL, _OPTIMIZER, _STATE):  # state.json last: while it is pending, so is the promotion
        if (pending / name).exists():
            os.replace(pending / name, client_dir / name)
    fsync_dir(client_dir)
    shutil.rmtree(pending)


def rng_state() -> dict[str, Any]:
    """The global RNG states of torch (CPU and CUDA), numpy and Python's ``random``."""
    kind, key, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": (kind, key.tolist(), pos, has_gauss, gauss),
        "python": random.getstate(),
    }


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, key, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.array(key, dtype=np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])


@contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield an empty temporary directory that, once the block succeeds, replaces ``path`` (fsynced, renamed)."""
    tmp, old = _siblings(path)
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for file in tmp.rglob("*"):
        if file.is_file():
            _fsync_file(file)
    fsync_dir(tmp)
    if path.exists():
        os.rename(path, old)
    os.rename(tmp, path)
    fsync_dir(path.parent)
    shutil.rmtree(old, ignore_errors=True)


def recover_dir(path: Path) -> None:
    """Undo an :func:`atomic_dir` replacement cut off between its two renames; drop unfinished temporaries."""
    tmp, old = _siblings(path)
    if not path.exists() and old.exists():
        os.rename(old, path)
    shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(tmp, ignore_errors=True)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp_path)``, fsync it, then rename it to ``path``."""
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    _fsync_file(tmp)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with path.open("rb+") as f:
        os.fsync(f.fileno())


def _siblings(path: Path) -> tuple[Path, Path]:
    return path.with_name(f".{path.name}.tmp"), path.with_name(f".{path.name}.old")
