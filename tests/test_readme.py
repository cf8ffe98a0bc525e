"""The README's code runs as written."""

from pathlib import Path

from tests.readme_snippets import python_blocks, run_blocks

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run(tmp_path):
    assert len(python_blocks(README)) >= 2
    run_blocks(README, tmp_path)
