"""The README's code runs as written; every path docs/architecture.md names exists."""

import re
from pathlib import Path

from tests.readme_snippets import python_blocks, run_blocks

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def test_readme_python_blocks_run(tmp_path):
    assert len(python_blocks(README)) >= 2
    run_blocks(README, tmp_path)


def test_architecture_names_files_that_exist():
    """Every `path/with/a/slash` in docs/architecture.md (its worked examples name the files each change touches)
    lies in this repository."""
    named = set(re.findall(r"`([\w.-]+/[\w./-]+)`", (ROOT / "docs/architecture.md").read_text()))
    assert len(named) >= 20
    assert sorted(path for path in named if not (ROOT / path).exists()) == []
