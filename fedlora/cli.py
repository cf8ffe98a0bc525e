"""The ``fedlora`` command line: ``fedlora train`` runs federated fine-tuning, ``fedlora eval`` re-scores a run.

With no flags, ``fedlora train`` runs the quickstart: the packaged SmolLM2-135M-Instruct, the packaged Dolly
sample split over 4 clients (Dirichlet over category), FedLoRA-Optimizer for a few short rounds on the CPU, in
this process. ``--engine flower`` runs the same configuration on Flower's deployment engine: a local SuperLink and
one SuperNode per client as processes of their own, or the SuperLink at ``--superlink HOST:PORT``.

One parser function per subcommand (:func:`train_parser`, :func:`eval_parser`) and one runner each.

Errors: one handler (:func:`main`) turns every expected error (bad settings, files, directories, a damaged run, a
full disk, Ctrl-C) into ``fedlora: error: ...`` naming the file, key or flag, and a non-zero exit status; an
unexpected exception prints one line too, and its traceback only with ``--debug``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from fedlora.federated.config import RunConfig, load_config
from fedlora.federated.run import evaluate_run, train
from fedlora.federated.rundir import default_output_dir
from fedlora.federated.server import RoundError
from fedlora.federated.storage import CheckpointError, CommitError, RunDir
from fedlora.federated.strategy import STRATEGIES
from fedlora.flower.launch import FlowerRunError

# train flag (argparse dest) -> dotted config key
_FLAG_KEYS = {
    "model": "model.name",
    "data": "data.path",
    "strategy": "strategy",
    "num_clients": "data.num_clients",
    "rounds": "rounds",
    "seed": "seed",
    "device": "device",
    "output_dir": "output_dir",
}
ENGINES = {
    "in-process": "every client in this process, one after another (default)",
    "flower": "Flower's deployment engine: a local SuperLink and one SuperNode per client, or --superlink",
}
EXPECTED_ERRORS = (ValueError, OSError, CheckpointError)  # bad settings or files, an unusable directory or disk
EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedlora", description="Federated fine-tuning with FedDoRA adapters.")
    commands = parser.add_subparsers(dest="command", required=True)
    train_parser(commands)
    eval_parser(commands)
    return parser


def train_parser(commands: argparse._SubParsersAction) -> None:
    """``fedlora train``."""
    engines = "; ".join(f"{name}: {what}" for name, what in ENGINES.items())
    run = commands.add_parser(
        "train",
        help="run (or resume) federated fine-tuning",
        description="Run federated fine-tuning. Settings: defaults < --config file < flags < --set overrides. "
        f"Engines: {engines}.",
    )
    run.add_argument("--config", type=Path, help="a .toml, .yaml or .json run configuration")
    run.add_argument("--model", help="local dir, hub id, .gguf file, or 'smollm2-135m-instruct' (default)")
    run.add_argument("--data", help="a .json/.jsonl/.csv file or hub dataset id (default: the packaged Dolly sample)")
    run.add_argument("--strategy", help=f"one of {', '.join(STRATEGIES)} (default: fedlora-opt)")
    run.add_argument("--num-clients", type=int, help="number of clients the data is split across")
    run.add_argument("--rounds", type=int, help="number of federated rounds")
    run.add_argument("--seed", type=int, help="seed of data split, initialisation, sampling and data order")
    run.add_argument("--device", help="cpu or cuda")
    run.add_argument("--output-dir", help="run directory (default: runs/<strategy>-<timestamp>)")
    run.add_argument("--resume", action="store_true", help="continue the run in --output-dir from its checkpoint")
    run.add_argument("--engine", choices=list(ENGINES), default="in-process", help=engines)
    run.add_argument(
        "--superlink",
        metavar="HOST:PORT",
        help="--engine flower: run on the SuperNodes of this SuperLink instead of starting them here (the run "
        "directory is written on its machine); Flower settings go in --set too, e.g. --set round-timeout=600",
    )
    _add_common(run)
    run.set_defaults(run=_train)


def eval_parser(commands: argparse._SubParsersAction) -> None:
    """``fedlora eval``."""
    evaluate = commands.add_parser(
        "eval",
        help="re-evaluate a run's global adapter and client personal states",
        description="Score every client's model (saved global adapter + its personal tensors) on its own test "
        "split and on the global test set; writes <run-dir>/eval.jsonl.",
    )
    evaluate.add_argument("--run-dir", required=True, type=Path, help="the directory of a `fedlora train` run")
    evaluate.add_argument("--device", help="cpu or cuda")
    _add_common(evaluate)
    evaluate.set_defaults(run=_eval)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fedlora`` command; returns the exit status (argument and input errors exit with 2
    through ``SystemExit``, as argparse does)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.run_dir_known = None  # train: the run directory, once the settings name it (for the advice on Ctrl-C)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.debug:
        logging.getLogger("fedlora").setLevel(logging.DEBUG)  # also the traceback of a client that fails
    try:
        return args.run(args)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"\nfedlora: interrupted{_resume_advice(args)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (CommitError, RoundError, FlowerRunError) as error:  # a round failed; the run dir holds those before it
        if args.debug:
            raise
        print(f"fedlora: error: {error}{_resume_advice(args)}", file=sys.stderr)
        return EXIT_ERROR
    except EXPECTED_ERRORS as error:
        if args.debug:
            raise
        parser.exit(EXIT_USAGE, f"fedlora: error: {_with_flag(error, args)}\n")
    except Exception as error:  # a bug: one line, the traceback only with --debug
        if args.debug:
            raise
        parser.exit(
            EXIT_ERROR,
            f"fedlora: error: unexpected {type(error).__name__}: {error} (this is a bug in fedlora; rerun with "
            "--debug for the traceback)\n",
        )


def _train(args: argparse.Namespace) -> int:
    flags = {key: getattr(args, dest) for dest, key in _FLAG_KEYS.items() if getattr(args, dest) is not None}
    config_file = args.config
    if args.resume and config_file is None and args.output_dir is not None:
        saved = Path(args.output_dir) / "config.yaml"  # continue with the saved settings
        config_file = saved if saved.is_file() else None
    args.run_dir_known = args.output_dir
    flower_sets = [item for item in args.set if _is_flower_setting(item)]
    if flower_sets and args.engine != "flower":
        raise ValueError(f"--set {flower_sets[0]}: a Flower setting; it needs --engine flower")
    if args.superlink is not None and args.engine != "flower":
        raise ValueError("--superlink: it needs --engine flower")
    sets = [item for item in args.set if item not in flower_sets]
    config = load_config(config_file, [*(f"{key}={value}" for key, value in flags.items()), *sets])
    if config.output_dir is None and not args.resume:
        config = replace(config, output_dir=str(default_output_dir(config)))
    args.run_dir_known = config.output_dir
    if args.engine == "flower":
        _train_on_flower(config, args, flower_sets)
        print(f"done: {config.output_dir} (global_adapter/, nodes/, metrics.jsonl, scores.png)")
    else:
        train(config, resume=args.resume, progress=not args.no_progress)
        print(f"done: {config.output_dir} (global_adapter/, clients/, metrics.jsonl, scores.png)")
    return 0


def _train_on_flower(config: RunConfig, args: argparse.Namespace, flower_sets: Sequence[str]) -> None:
    """``config`` on Flower: checked here first (nothing is started for a bad run directory), then on the SuperLink
    at ``--superlink`` or on a local one with one SuperNode per client."""
    from fedlora.flower import FlowerSettings, local_federation, run_flower  # flwr takes seconds to import
    from fedlora.flower.config import run_output_dir

    values = dict(item.partition("=")[::2] for item in flower_sets)
    settings = FlowerSettings.from_run_config({**values, "resume": args.resume})
    config = run_output_dir(config, args.resume)
    stream = not args.no_progress
    if args.superlink is not None:
        run_flower(config, args.superlink, settings=settings, stream=stream)
        return
    with local_federation(config, stream=stream) as superlink:
        run_flower(config, superlink, settings=settings, stream=stream)


def _is_flower_setting(item: str) -> bool:
    from fedlora.flower.config import is_settings_key

    return is_settings_key(item.partition("=")[0].strip())


def _eval(args: argparse.Namespace) -> int:
    overrides = [*args.set, *([f"device={args.device}"] if args.device else [])]
    evaluate_run(args.run_dir, overrides=overrides, progress=not args.no_progress)
    return 0


def _resume_advice(args: argparse.Namespace) -> str:
    """What to do after an interrupted or failed ``train``: resume if its run directory holds a run, else start
    again (nothing to resume)."""
    if args.command != "train":
        return ""
    if args.run_dir_known is not None and RunDir(args.run_dir_known).config.is_file():
        engine = " --engine flower" if args.engine == "flower" else ""
        return f"; continue with: fedlora train --output-dir {args.run_dir_known} --resume{engine}"
    return "; no run directory was written, so there is nothing to resume: start the run again"


def _with_flag(error: BaseException, args: argparse.Namespace) -> str:
    """The message of ``error``, led by the flag that set the key it names (``--seed: seed must be ...``)."""
    message = str(error)
    for dest, key in _FLAG_KEYS.items():
        flag = f"--{dest.replace('_', '-')}"
        if getattr(args, dest, None) is not None and message.startswith((f"{key} ", f"{key}:")) and flag not in message:
            return f"{flag}: {message}"
    return message


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--set",
        nargs="+",
        action="extend",
        default=[],
        metavar="KEY=VALUE",
        help="override any setting, e.g. --set client.local_lr=5e-3 server.optimizer=fedadam",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--debug", action="store_true", help="show the Python traceback of any error")


if __name__ == "__main__":
    sys.exit(main())
