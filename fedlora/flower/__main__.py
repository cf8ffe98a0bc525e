"""``python -m fedlora.flower DIR``: write the fedlora Flower app into DIR, for ``flwr run DIR <connection>``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from fedlora.flower.launch import write_app


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fedlora.flower",
        description="Write the fedlora Flower app (a pyproject.toml whose components are the installed "
        "fedlora.flower ServerApp and ClientApp) into DIRECTORY, for `flwr run DIRECTORY <superlink connection>`.",
    )
    parser.add_argument("directory", type=Path)
    args = parser.parse_args(argv)
    print(f"wrote {write_app(args.directory) / 'pyproject.toml'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
