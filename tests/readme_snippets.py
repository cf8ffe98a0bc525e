"""Runs the README's ```python blocks, in order, each in a fresh interpreter, in one working directory.

Used by tests/test_readme.py, so the README's code is exactly what is executed.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

BLOCK = re.compile(r"```python\n(.*?)```", re.DOTALL)


def python_blocks(readme: Path) -> list[str]:
    """The contents of every ```python fenced block of ``readme``."""
    return BLOCK.findall(readme.read_text())


def run_blocks(readme: Path, workdir: Path) -> None:
    """Run each block with this interpreter in ``workdir``; raise CalledProcessError on the first failure."""
    for number, code in enumerate(python_blocks(readme), start=1):
        print(f"--- README python block {number} ---", flush=True)
        subprocess.run([sys.executable, "-c", code], cwd=workdir, check=True)
