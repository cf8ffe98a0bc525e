"""Clear errors for a file the user named that cannot be read: absent, a directory, a link loop, a dangling link.

Kept free of other fedlora imports, so the data loaders and the configuration can both use it.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path


def missing_file_error(path: str | Path, what: str) -> OSError:
    """The error for a ``what`` (e.g. ``"config file"``) at ``path`` that is not a readable regular file: it says
    whether ``path`` is a directory, a link loop, a dangling link, or absent."""
    path = Path(path)
    try:
        path.stat()
    except OSError as error:
        if error.errno == errno.ELOOP:
            return OSError(f"{what} {path} is a symbolic link loop, not a file")
        if path.is_symlink():
            return FileNotFoundError(f"{what} {path} is a link to {os.readlink(path)}, which does not exist")
        return FileNotFoundError(f"{what} {path} not found")
    if path.is_dir():
        return IsADirectoryError(f"{what} {path} is a directory, not a file")
    return OSError(f"{what} {path} is not a regular file")
