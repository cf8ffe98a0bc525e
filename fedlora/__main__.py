"""``python -m fedlora`` and the ``fedlora`` console script: :func:`fedlora.cli.main`, with a Ctrl-C while the
command line module itself imports (before :func:`~fedlora.cli.main` handles it) exiting 130 without a traceback."""

import sys


def run() -> None:
    """Run the ``fedlora`` command and exit with its status."""
    try:
        from fedlora.cli import main
    except KeyboardInterrupt:
        print("\nfedlora: interrupted", file=sys.stderr)
        sys.exit(130)  # fedlora.cli.EXIT_INTERRUPTED
    sys.exit(main())


if __name__ == "__main__":
    run()
