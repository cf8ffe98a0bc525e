"""The run directory, its crash-safe writes, and the checkpoints from which ``--resume`` continues.

::

    <run>/config.yaml          the resolved configuration
    <run>/metrics.jsonl        one JSON object per line (see :mod:`fedlora.federated.report`)
    <run>/scores.png           global and local scores per round
    <run>/global_adapter/      PEFT adapter: the global shared tensors; personal and frozen tensors at their
                               initial values (the common starting point every client's personal state grows from)
    <run>/checkpoint/          server state after the last committed round: state.json (the round, each client's
                               last round, the size and SHA-256 of metrics.jsonl up to that round),
                               global.safetensors (shared tensors only), server_optimizer.safetensors, rng.pt
    <run>/checkpoint.prev/     the same after the round before: the fallback when checkpoint/ is damaged
    <run>/clients/<name>/      a client's state as of checkpoint/: personal.safetensors, optimizer.pt and
                               state.json (the last round it trained in, and the client id)
    <run>/clients.prev/<name>/ the state that one replaced (what checkpoint.prev/ refers to if the client trained
                               in the last round)
    <run>/client_names.json    each client's directory name and its id (the label or file name it came from)

A client's directory name is :func:`~fedlora.federated.rundir.paths.client_dir_name` of its id: ids come from data, so
``../x``, ``/abs``, ``""`` or a 300-character label become safe, bounded names. Every path written or deleted is
checked by the run directory's :class:`~fedlora.federated.rundir.paths.PathGuard`: it lies inside the run directory and
passes through no link there (:meth:`RunDir.check_links` refuses a run directory holding one before anything starts).

Every checkpoint and client state directory also holds ``manifest.json``, the size and SHA-256 of each of its
other files, written last. Directories are written under a temporary name, fsynced, renamed into place and never
modified afterwards. Round k commits as: (1) the metrics rows are appended and fsynced; (2) every client that
trained writes ``clients.pending/<id>/``; (3) ``checkpoint.pending/`` appears: the commit point; (4) it is
rotated in (``checkpoint.prev/`` removed, ``checkpoint/`` renamed to ``checkpoint.prev/``, ``checkpoint.pending/``
to ``checkpoint/``), then each pending client state over ``clients/<id>/`` and ``clients.prev/<id>/`` the same
way. A rotation cut off anywhere is finished by running it again.

Recovery before a resume (:meth:`RunDir.recover`) finishes the rotations of a committed round and drops the
client states of an uncommitted one, then takes the newest intact checkpoint: one whose files, the client states
it refers to and the metrics prefix it recorded all match their digests. A damaged ``checkpoint/`` is logged as a
warning that names the file, and the run rolls back to ``checkpoint.prev/`` (the last round's rotations undone).
``metrics.jsonl`` is truncated to the chosen checkpoint's size. So a crash, Ctrl-C or ``kill -9`` at any point
loses at most the round in progress, and a damaged last checkpoint one round more; when no intact checkpoint is
left, :class:`CheckpointError` says what is damaged and nothing is rolled back.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
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

from fedlora.federated.rundir.paths import CLIENT_NAMES_FILE, PathGuard, client_dir_name, client_dir_names

if TYPE_CHECKING:
    from fedlora.federated.client import ClientState

logger = logging.getLogger(__name__)

_PERSONAL, _OPTIMIZER, _STATE, _MANIFEST = "personal.safetensors", "optimizer.pt", "state.json", "manifest.json"
_MIB = 2**20


class CheckpointError(RuntimeError):
    """A checkpoint or client state is damaged (the message names the file), or no intact checkpoint is left."""


class CommitError(OSError):
    """Writing a round failed; the run directory still holds its last committed round."""


@dataclass
class Checkpoint:
    """The server-side state after ``round`` completed rounds."""

    round: int
    global_tensors: dict[str, Tensor]
    server_optimizer: dict[str, Tensor]
    client_rounds: dict[str, int]  # client id -> last round it trained in (clients that trained at all)
    metrics_bytes: int
    rng: dict[str, Any]
    clients_keep_states: bool = False  # the clients keep their states (Flower's SuperNodes), not clients/


class RunDir:
    """Paths and crash-safe reads/writes of one run directory."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.config = self.path / "config.yaml"
        self.metrics = self.path / "metrics.jsonl"
        self.plot = self.path / "scores.png"
        self.global_adapter = self.path / "global_adapter"
        self.checkpoint = self.path / "checkpoint"
        self.checkpoint_prev = self.path / "checkpoint.prev"
        self.checkpoint_pending = self.path / "checkpoint.pending"
        self.clients = self.path / "clients"
        self.clients_prev = self.path / "clients.prev"
        self.clients_pending = self.path / "clients.pending"
        self.client_names = self.path / CLIENT_NAMES_FILE
        self.guard = PathGuard(self.path)

    def inside(self, path: Path) -> Path:
        """``path``, checked to lie inside the run directory and to pass through no link there (else an
        :class:`~fedlora.federated.rundir.paths.UnsafePathError`): what every write or removal goes through."""
        return self.guard.check(path)

    def check_links(self) -> None:
        """Refuse a run directory that holds a symbolic link anywhere inside it (before anything is touched)."""
        self.guard.scan()

    def client_dir(self, parent: Path, client_id: str) -> Path:
        """Where ``client_id``'s state lies under ``parent`` (``clients``, ``clients.prev`` or ``clients.pending``)."""
        return self.inside(parent / client_dir_name(client_id))

    def write_client_names(self, client_ids: Iterable[str]) -> None:
        """Record each client's directory name and id in ``client_names.json`` (a ``ValueError`` when two ids would share
        a directory: check with :func:`~fedlora.federated.rundir.paths.client_dir_names` before anything is written)."""
        names = {name: client_id for client_id, name in client_dir_names(client_ids).items()}
        text = json.dumps(names, indent=2, ensure_ascii=False) + "\n"
        atomic_write(self.inside(self.client_names), lambda tmp: tmp.write_text(text, encoding="utf-8"))

    def append_metrics(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """Append JSON lines and fsync; returns once they are on disk."""
        with self.inside(self.metrics).open("a") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
            f.flush()
            os.fsync(f.fileno())

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics.exists():
            return []
        return [json.loads(line) for line in self.metrics.read_text().splitlines() if line]

    @contextmanager
    def committing(self, round_: int) -> Iterator[None]:
        """Turn an error while writing ``round_`` into a :class:`CommitError` that says which round the run
        directory still holds. (A full disk raises an OSError from Python's writes, but a ``SafetensorError``
        from safetensors and a ``RuntimeError`` from ``torch.save``.)"""
        try:
            yield
        except Exception as error:
            committed = self.committed_round()
            raise CommitError(
                f"writing round {round_} to {self.path} failed: {type(error).__name__}: {error}. The run directory "
                f"holds round {committed}, its last committed round, intact; once the cause is fixed, resuming "
                f"continues with round {committed + 1}"
            ) from error

    def commit_round(self, checkpoint: Checkpoint, trained: Sequence[ClientState]) -> None:
        """Write the trained clients' states and the checkpoint of a completed round (steps 2-4 above).

        ``trained`` lists the clients whose personal state changed; strategies without personal tensors pass none.
        """
        for client in trained:
            save_client_state(client, self.client_dir(self.clients_pending, client.client_id))
        with atomic_dir(self.inside(self.checkpoint_pending)) as tmp:
            save_file(checkpoint.global_tensors, tmp / "global.safetensors")
            save_file(checkpoint.server_optimizer, tmp / "server_optimizer.safetensors")
            torch.save(checkpoint.rng, tmp / "rng.pt")
            state = {
                "round": checkpoint.round,
                "client_rounds": checkpoint.client_rounds,
                "metrics_bytes": checkpoint.metrics_bytes,
                "metrics_sha256": _sha256(self.metrics, checkpoint.metrics_bytes),
                "clients_keep_states": checkpoint.clients_keep_states,
            }
            (tmp / _STATE).write_text(json.dumps(state, indent=2))
            _write_manifest(tmp)
        self._finish_commit()

    def committed_round(self) -> int:
        """The round of the last committed checkpoint (0 before the first), read without verification or recovery."""
        for directory in (self.checkpoint_pending, self.checkpoint, self.checkpoint_prev):
            if round_ := _round_in(directory):  # the newest one that reads: a commit may be renaming them
                return round_
        return 0

    def load_checkpoint(self) -> Checkpoint | None:
        """The newest intact checkpoint (None before the first round committed), read without changing anything.

        Each damaged newer one is logged as a warning; :class:`CheckpointError` when none is intact.
        """
        found = self._newest_intact()
        return found.checkpoint if found else None

    def recover(self) -> Checkpoint | None:
        """Crash recovery before a resume; returns the checkpoint to continue from (None: from the start).

        Finishes an interrupted commit, rolls back to the newest intact checkpoint (removing what belongs to
        later rounds) and truncates ``metrics.jsonl`` to the size it recorded. Raises :class:`CheckpointError`,
        rolling nothing back, when checkpoints exist but none is intact.
        """
        self.check_links()
        recover_dir(self.inside(self.checkpoint_pending))  # drop a half-written one
        self._finish_commit()
        found = self._newest_intact()
        if found is not None and found.directory == self.checkpoint_prev:  # checkpoint/ is damaged: roll back
            _remove(self.inside(self.checkpoint))
            os.rename(self.inside(self.checkpoint_prev), self.checkpoint)
        client_dirs = {directory.name: directory for directory in (found.client_dirs if found else {}).values()}
        for name in _names(self.clients) | _names(self.clients_prev):
            current, prev = self.inside(self.clients / name), self.inside(self.clients_prev / name)
            if name not in client_dirs:  # it first trained after the checkpoint
                _remove(current)
                _remove(prev)
            elif client_dirs[name] == prev:  # it trained in the round rolled back
                _remove(current)
                os.rename(prev, current)
        if self.metrics.exists():
            with self.inside(self.metrics).open("r+") as f:
                f.truncate(found.checkpoint.metrics_bytes if found else 0)
        return found.checkpoint if found else None

    def load_client(self, client_id: str, last_round: int) -> tuple[dict[str, Tensor], dict[str, Any] | None]:
        """A client's saved personal tensors and local optimizer state after it trained in ``last_round``
        (verified against its manifest)."""
        return load_client_state(self._client_state(client_id, last_round))

    def _finish_commit(self) -> None:
        """Step 4: rotate a pending checkpoint in, then the pending client states of a committed round; drop
        those of a later round (their commit never happened)."""
        if self.checkpoint_pending.exists():
            _rotate(*map(self.inside, (self.checkpoint_pending, self.checkpoint, self.checkpoint_prev)))
        committed = _round_in(self.checkpoint)
        for name in sorted(_names(self.clients_pending)):  # directory names (see client_dir)
            pending = self.clients_pending / name
            if 0 < _round_in(pending) <= committed:
                _rotate(*map(self.inside, (pending, self.clients / name, self.clients_prev / name)))
        _remove(self.inside(self.clients_pending))  # now only uncommitted states and temporaries

    def _newest_intact(self) -> _Intact | None:
        """The newest intact checkpoint (None if there is none at all); each damaged newer one is logged."""
        damaged = []
        for directory in (self.checkpoint_pending, self.checkpoint, self.checkpoint_prev):
            if not directory.exists():
                continue
            try:
                found = self._read_checkpoint(directory)
            except CheckpointError as error:
                logger.warning("checkpoint %s is damaged: %s", directory, error)
                damaged.append(str(error))
                continue
            if damaged:
                logger.warning(
                    "falling back to %s (round %d), the newest intact checkpoint", directory, found.checkpoint.round
                )
            return found
        if damaged:
            raise CheckpointError(
                f"{self.path} has no intact checkpoint left: {'; '.join(damaged)}. Nothing was rolled back; "
                "restore the damaged files or start a new run"
            )
        return None

    def _read_checkpoint(self, directory: Path) -> _Intact:
        _verify(directory)
        state = json.loads((directory / _STATE).read_text())
        size, digest = state["metrics_bytes"], state["metrics_sha256"]
        held = self.metrics.stat().st_size if self.metrics.exists() else 0
        if held < size:
            raise CheckpointError(f"{self.metrics} is truncated: {held} bytes, but {directory} recorded {size}")
        if _sha256(self.metrics, size) != digest:
            raise CheckpointError(f"{self.metrics}: its first {size} bytes do not match the SHA-256 in {directory}")
        kept = state.get("clients_keep_states", False)
        client_dirs = (
            {} if kept else {cid: self._client_state(cid, last) for cid, last in state["client_rounds"].items()}
        )
        checkpoint = Checkpoint(
            round=state["round"],
            global_tensors=load_file(directory / "global.safetensors"),
            server_optimizer=load_file(directory / "server_optimizer.safetensors"),
            client_rounds=state["client_rounds"],
            metrics_bytes=size,
            rng=torch.load(directory / "rng.pt", weights_only=True),
            clients_keep_states=kept,
        )
        return _Intact(checkpoint, directory, client_dirs)

    def _client_state(self, client_id: str, last_round: int) -> Path:
        """The directory of ``client_id``'s intact state of ``last_round``: pending, current or previous."""
        damaged = []
        for parent in (self.clients_pending, self.clients, self.clients_prev):
            directory = self.client_dir(parent, client_id)
            if not directory.exists():
                continue
            try:
                _verify(directory)
            except CheckpointError as error:
                damaged.append(str(error))
                continue
            if _round_in(directory) == last_round:
                return directory
        found = f": {'; '.join(damaged)}" if damaged else ""
        raise CheckpointError(f"{self.path}: client {client_id} has no intact saved state of round {last_round}{found}")


@dataclass
class _Intact:
    """A checkpoint that passed verification, where it lies, and where each client state it refers to lies."""

    checkpoint: Checkpoint
    directory: Path
    client_dirs: dict[str, Path]


def save_client_state(state: ClientState, path: Path) -> None:
    """Write ``state`` (personal tensors, local optimizer state, last round, client id) as the directory ``path``,
    with its manifest, atomically."""
    with atomic_dir(path) as tmp:
        save_file(state.personal, tmp / _PERSONAL)
        torch.save(state.optimizer_state, tmp / _OPTIMIZER)
        (tmp / _STATE).write_text(json.dumps({"round": state.last_round, "client": state.client_id}))
        _write_manifest(tmp)


def load_client_state(directory: Path) -> tuple[dict[str, Tensor], dict[str, Any] | None]:
    """The personal tensors and local optimizer state :func:`save_client_state` wrote to ``directory`` (verified
    against its manifest: a :class:`CheckpointError` names what is damaged)."""
    _verify(directory)
    return load_file(directory / _PERSONAL), torch.load(directory / _OPTIMIZER, weights_only=True)


class ClientRounds:
    """One client's states by round in a directory of its own, as a SuperNode keeps them: ``round-<k>/`` holds
    the state after round k (see :func:`save_client_state`). The newest :data:`KEPT` are kept: the new one and
    the ones the server's two checkpoints (``checkpoint/`` and its fallback) can refer to."""

    KEPT = 3

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def save(self, state: ClientState) -> None:
        """Keep ``state`` as of ``state.last_round`` (replacing a state of that round), then drop older ones."""
        self.path.mkdir(parents=True, exist_ok=True)
        save_client_state(state, self.path / f"round-{state.last_round}")
        for old in self.rounds()[: -self.KEPT]:
            _remove(self.path / f"round-{old}")

    def load(self, state: ClientState, round_: int) -> None:
        """Put the state after ``round_`` into ``state`` (round 0: leave its initial state); a
        :class:`CheckpointError` when it is missing or damaged."""
        if round_ == 0:
            return
        directory = self.path / f"round-{round_}"
        if not directory.is_dir():
            raise CheckpointError(f"{directory} is missing: this node kept no state of round {round_}")
        state.personal, state.optimizer_state = load_client_state(directory)
        state.last_round = round_

    def rounds(self) -> list[int]:
        """The rounds whose states are kept, oldest first."""
        return sorted(int(name.removeprefix("round-")) for name in _names(self.path) if name.startswith("round-"))


def _rotate(pending: Path, current: Path, prev: Path) -> None:
    """Move ``current`` to ``prev`` (replacing it) and the complete ``pending`` to ``current``.

    While ``pending`` exists, ``current`` is the state it replaces or already moved, so running this again after
    a crash anywhere in it finishes it.
    """
    if current.exists():
        _remove(prev)
        prev.parent.mkdir(exist_ok=True)
        os.rename(current, prev)
        fsync_dir(prev.parent)
    current.parent.mkdir(exist_ok=True)
    os.rename(pending, current)
    fsync_dir(current.parent)


def _remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _names(parent: Path) -> set[str]:
    """The names of the (non-temporary) directories in ``parent``."""
    if not parent.is_dir():
        return set()
    return {p.name for p in parent.iterdir() if p.is_dir() and not p.name.startswith(".")}


def _round_in(directory: Path) -> int:
    """The round in ``directory``'s state.json; 0 if it is missing or unreadable."""
    try:
        return int(json.loads((directory / _STATE).read_text())["round"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def _write_manifest(directory: Path) -> None:
    """Record the size and SHA-256 of every file in ``directory`` in its ``manifest.json``."""
    files = {
        file.name: {"bytes": file.stat().st_size, "sha256": _sha256(file)}
        for file in sorted(directory.iterdir())
        if file.is_file() and file.name != _MANIFEST
    }
    (directory / _MANIFEST).write_text(json.dumps({"files": files}, indent=2))


def _verify(directory: Path) -> None:
    """Raise :class:`CheckpointError` naming each file of ``directory`` that does not match its manifest."""
    manifest = directory / _MANIFEST
    try:
        entries = json.loads(manifest.read_text())["files"]
        expected = {name: (int(entry["bytes"]), str(entry["sha256"])) for name, entry in entries.items()}
    except FileNotFoundError:
        raise CheckpointError(f"{manifest} is missing") from None
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise CheckpointError(f"{manifest} is damaged ({type(error).__name__}: {error})") from None
    problems = []
    for name, (size, digest) in expected.items():
        file = directory / name
        if not file.is_file():
            problems.append(f"{file} is missing")
        elif (held := file.stat().st_size) != size:
            problems.append(f"{file} has {held} bytes instead of {size}")
        elif _sha256(file) != digest:
            problems.append(f"{file} does not match its SHA-256 in {manifest}")
    if problems:
        raise CheckpointError("; ".join(problems))


def _sha256(path: Path, size: int | None = None) -> str:
    """The SHA-256 (hex) of ``path``'s contents, or of its first ``size`` bytes (not opened for 0)."""
    digest = hashlib.sha256()
    left = math.inf if size is None else size
    if left:
        with path.open("rb") as f:
            while left and (chunk := f.read(min(_MIB, left))):
                digest.update(chunk)
                left -= len(chunk)
    return digest.hexdigest()


def check_writable(path: Path) -> None:
    """Raise unless ``path`` is, or can be created as, a directory this process may write in."""
    existing = _existing_ancestor(path)
    if not existing.is_dir():
        raise NotADirectoryError(f"output directory {path}: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f"output directory {path}: {existing} is not writable")


def estimate_run_bytes(*, shared: int, personal: int, adapter: int, clients: int, rounds: int) -> int:
    """A conservative bound on the bytes a run directory holds at its peak.

    ``shared``, ``personal`` and ``adapter`` are the byte sizes of the shared tensors, of one client's personal
    tensors and of all adapter tensors. While a round commits, 3 checkpoints exist (prev, current, pending), each
    the shared tensors and a server optimizer state of at most 2 moments, and each client up to 3 states, each
    its personal tensors and a local optimizer state of at most 2 moments; ``global_adapter/`` exists twice while
    it is replaced. Metrics take at most 2 KiB per client and round, file headers 256 KiB per client, and the
    config, plot and the rest 16 MiB::

        9 shared + 9 clients personal + 2 adapter + 2 KiB clients rounds + 256 KiB clients + 16 MiB
    """
    return 9 * shared + 9 * clients * personal + 2 * adapter + (2 * rounds + 256) * 1024 * clients + 16 * _MIB


def check_free_space(path: Path, total: int) -> None:
    """Raise an OSError unless the file system of ``path`` has room for a run directory of ``total`` bytes,
    less what ``path`` already holds."""
    held = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0
    needed = total - held
    free = shutil.disk_usage(_existing_ancestor(path)).free
    if free < needed:
        raise OSError(
            f"not enough free disk space for {path}: the run needs about {needed / _MIB:.1f} MiB more, "
            f"{free / _MIB:.1f} MiB are free"
        )


def _existing_ancestor(path: Path) -> Path:
    """``path`` or its nearest ancestor that exists (file or directory)."""
    path = path.absolute()
    return next(p for p in (path, *path.parents) if p.exists())


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
