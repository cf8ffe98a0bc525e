"""The path policy of a run directory: nothing outside it is written or deleted, and no link inside it is followed.

* :class:`PathGuard` checks every path the engine creates, replaces or deletes: it must lie inside the run directory
  (lexically and once resolved), and no part of it below the run directory, nor the temporary siblings that crash-safe
  writes use, may be a symbolic link. The run directory itself may be a link (a run kept on another disk).
  :meth:`PathGuard.scan` refuses a run directory that holds a link anywhere, before anything is touched.
* :func:`client_dir_name` maps a client id, which comes from data (a label value, a file name), to a safe, bounded
  directory name: the id itself when it is a short lowercase name (``client_0``, ``open_qa``,
  ``task001_quoref_question_generation``), otherwise a slug of it plus a short hash of the whole id
  (``../x`` → ``x-1b4f0e9851``). :func:`client_dir_names` maps a run's clients and refuses two that would share a
  name. The run directory records the mapping in ``client_names.json`` so the original labels stay visible.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable
from pathlib import Path

CLIENT_NAMES_FILE = "client_names.json"
_PLAIN = re.compile(r"[a-z0-9][a-z0-9_]{0,63}")  # taken as is: no dot, dash, slash, upper case; at most 64 chars
_SLUG_CHARS = re.compile(r"[^a-z0-9_]+")
_SLUG_LENGTH, _HASH_LENGTH = 40, 10


class UnsafePathError(ValueError):
    """A path the engine would write or delete lies outside the run directory, or passes through a link in it."""


def client_dir_name(client_id: str) -> str:
    """A safe, bounded directory name for ``client_id`` (see the module docstring); the same id always gives the
    same name, and a hashed name (it holds a ``-``) never equals a name taken as is."""
    if _PLAIN.fullmatch(client_id):
        return client_id
    slug = _SLUG_CHARS.sub("_", client_id.lower()).strip("_")[:_SLUG_LENGTH].rstrip("_") or "client"
    digest = hashlib.sha256(client_id.encode("utf-8", "surrogatepass")).hexdigest()[:_HASH_LENGTH]
    return f"{slug}-{digest}"


def client_dir_names(client_ids: Iterable[str]) -> dict[str, str]:
    """``{client id: directory name}``; a ``ValueError`` when two ids are equal or map to the same name."""
    names: dict[str, str] = {}
    owners: dict[str, str] = {}
    for client_id in client_ids:
        if not isinstance(client_id, str):
            raise ValueError(f"client id {client_id!r} is not a string")
        if client_id in names:
            raise ValueError(f"two clients have the id {client_id!r}")
        name = client_dir_name(client_id)
        if name in owners:
            raise ValueError(
                f"clients {owners[name]!r} and {client_id!r} would both keep their state in clients/{name}/; "
                "rename one of the labels (or files)"
            )
        names[client_id], owners[name] = name, client_id
    return names


class PathGuard:
    """Checks paths against the run directory ``root`` (see the module docstring)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(os.path.abspath(root))

    def check(self, path: str | Path) -> Path:
        """``path``, after checking that it lies inside the run directory and that neither it, any directory
        between it and the run directory, nor its ``.<name>.tmp``/``.<name>.old`` siblings is a link; else an
        :class:`UnsafePathError` naming it. Nothing is created."""
        path = Path(path)
        absolute = Path(os.path.abspath(path))  # ".." taken lexically: no link below the root can redirect it
        if absolute != self.root and self.root not in absolute.parents:
            raise UnsafePathError(f"{path} lies outside the run directory {self.root}; fedlora writes only inside it")
        current = self.root
        for part in absolute.relative_to(self.root).parts:
            current = current / part
            _refuse_link(current, self.root)
        if absolute != self.root:
            for sibling in (absolute.with_name(f".{absolute.name}.tmp"), absolute.with_name(f".{absolute.name}.old")):
                _refuse_link(sibling, self.root)
        if self.root.exists():
            resolved_root, resolved = self.root.resolve(), absolute.resolve()
            if resolved != resolved_root and resolved_root not in resolved.parents:
                raise UnsafePathError(f"{path} resolves to {resolved}, outside the run directory {resolved_root}")
        return path

    def scan(self) -> None:
        """Refuse (:class:`UnsafePathError`, naming it) a run directory that holds a link anywhere inside it."""
        if not self.root.is_dir():
            return
        for directory, subdirs, files in os.walk(self.root, followlinks=False):
            for name in sorted(subdirs + files):
                _refuse_link(Path(directory) / name, self.root)


def _refuse_link(path: Path, root: Path) -> None:
    if path.is_symlink():
        raise UnsafePathError(
            f"{path} is a symbolic link (to {os.readlink(path)}); fedlora does not follow links inside a run "
            f"directory ({root}). Nothing was changed; replace the link by a real file or directory, or remove it"
        )
