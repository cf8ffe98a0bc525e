"""The ``fedlora`` command line: ``fedlora train`` runs federated fine-tuning, ``fedlora eval`` re-scores a run,
``fedlora export`` writes a run's global or client models for use without fedlora's engine, ``fedlora config keys``
lists every setting.

With no flags, ``fedlora train`` runs the quickstart: the packaged SmolLM2-135M-Instruct, the packaged Dolly
sample split over 4 clients (Dirichlet over category), FedLoRA-Optimizer for a few short rounds on the CPU, in
this process. ``--engine flower`` runs the same configuration on Flower's deployment engine: a local SuperLink and
one SuperNode per client as processes of their own, or the SuperLink at ``--superlink HOST:PORT``.

One parser function per command (:func:`train_parser`, :func:`eval_parser`, :func:`export_parser`,
:func:`config_parser`) and one runner each. torch, transformers, PEFT and Flower are imported only when a command
runs, so ``fedlora --help`` answers at once.

Errors: one handler (:func:`main`) turns every expected error (bad settings, files, directories, a damaged run, a
full disk, Ctrl-C) into ``fedlora: error: ...`` naming the file, key or flag, and a non-zero exit status; an
unexpected exception prints one line too, and its traceback only with ``--debug``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from fedlora import __version__
from fedlora.keys import TRAIN_FLAGS, describe_keys, flag_help

if TYPE_CHECKING:
    from fedlora.federated.config import RunConfig

ENGINES = {
    "in-process": "every client in this process, one after another (default)",
    "flower": "Flower's deployment engine: a local SuperLink and one SuperNode per client, or --superlink",
}
# Errors by "module:class", matched only once their module is loaded (an error of a module never imported cannot
# have been raised): a round that failed (the run directory holds those before it), and the expected errors.
ROUND_ERRORS = (
    "fedlora.federated.rundir.storage:CommitError",
    "fedlora.federated.server:RoundError",
    "fedlora.flower.launch:FlowerRunError",
)
EXPECTED_ERRORS = ("builtins:ValueError", "builtins:OSError", "fedlora.federated.rundir.storage:CheckpointError")
EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedlora", description="Federated fine-tuning with FedDoRA adapters.")
    parser.add_argument("--version", action="version", version=f"fedlora {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    train_parser(commands)
    eval_parser(commands)
    export_parser(commands)
    config_parser(commands)
    return parser


def train_parser(commands: argparse._SubParsersAction) -> None:
    """``fedlora train``."""
    engines = "; ".join(f"{name}: {what}" for name, what in ENGINES.items())
    run = commands.add_parser(
        "train",
        help="run (or resume) federated fine-tuning",
        description="Run federated fine-tuning. Settings: defaults < --config file < flags < --set overrides "
        f"(every key, its type and default: fedlora config keys). Engines: {engines}.",
    )
    run.add_argument("--config", type=Path, help="a .toml, .yaml or .json run configuration")
    for flag in TRAIN_FLAGS:
        run.add_argument(f"--{flag}", help=flag_help(flag))
    run.add_argument("--resume", action="store_true", help="continue the run in --output-dir from its checkpoint")
    run.add_argument("--engine", choices=list(ENGINES), default="in-process", help=engines)
    run.add_argument(
        "--superlink",
        metavar="HOST:PORT",
        help="--engine flower: run on the SuperNodes of this SuperLink instead of starting them here (the run "
        "directory is written on its machine); Flower settings go in --set too, e.g. --set round-timeout=600",
    )
    run.add_argument(
        "--dry-run",
        action="store_true",
        help="print the resolved configuration (the config.yaml the run would write) and check the model, data and "
        "output paths; load, start and write nothing",
    )
    _add_common(run, "override any setting, e.g. --set client.local_lr=5e-3 server.optimizer=fedadam")
    run.set_defaults(run=_train)


def eval_parser(commands: argparse._SubParsersAction) -> None:
    """``fedlora eval``."""
    evaluate = commands.add_parser(
        "eval",
        help="re-evaluate a run's global model and client models",
        description="Score the global model (the saved global adapter) on the global test set and every client's "
        "model (the global adapter with its personal tensors) on its own test split; writes <run-dir>/eval.jsonl.",
    )
    evaluate.add_argument("--run-dir", required=True, type=Path, help="the directory of a `fedlora train` run")
    evaluate.add_argument("--device", help="cpu or cuda")
    _add_common(evaluate, "override evaluation settings, e.g. --set eval.rouge_examples=20 eval.batch_size=4")
    evaluate.set_defaults(run=_eval)


def export_parser(commands: argparse._SubParsersAction) -> None:
    """``fedlora export``."""
    export = commands.add_parser(
        "export",
        help="write a run's global or client models as PEFT adapters or merged models",
        description="Write the global model or a client's (the global adapter with its personal tensors, as "
        "`fedlora eval` scores it) as a self-contained PEFT adapter directory, loadable with "
        "PeftModel.from_pretrained once fedlora is imported, or with --merge as a plain transformers model.",
    )
    export.add_argument("--run-dir", required=True, type=Path, help="the directory of a `fedlora train` run")
    which = export.add_mutually_exclusive_group(required=True)
    which.add_argument("--global", dest="global_model", action="store_true", help="the global model")
    which.add_argument("--client", metavar="ID", help="this client's model (its id, or its directory name)")
    which.add_argument("--all-clients", action="store_true", help="every client's model, each in --out/<client>/")
    export.add_argument("--out", required=True, type=Path, help="the directory to write (absent or empty)")
    export.add_argument(
        "--merge", action="store_true", help="merge the adapter into the base model (merge_and_unload) and save that"
    )
    export.add_argument("--device", default="cpu", help="where the model is built (default: cpu)")
    _add_common(export)
    export.set_defaults(run=_export)


def config_parser(commands: argparse._SubParsersAction) -> None:
    """``fedlora config``."""
    config = commands.add_parser("config", help="show the run settings", description="Show the run settings.")
    actions = config.add_subparsers(dest="action", required=True)
    keys = actions.add_parser(
        "keys",
        help="every --set key with its type, default and help",
        description="Every setting --set (or a --config file) takes: its dotted key, type, default and one line of "
        "help.",
    )
    _add_common(keys)
    keys.set_defaults(run=_config_keys)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fedlora`` command; returns the exit status (argument and input errors exit with 2
    through ``SystemExit``, as argparse does)."""
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
    except KeyboardInterrupt:
        print("\nfedlora: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    args.run_dir_known = getattr(args, "output_dir", None)  # train: the run directory (for the advice on Ctrl-C)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.debug:
        logging.getLogger("fedlora").setLevel(logging.DEBUG)  # also the traceback of a client that fails
    try:
        with _exit_on_ctrl_c(args):
            for module in _command_modules(args):
                importlib.import_module(module)
        return args.run(args)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"\nfedlora: interrupted{_resume_advice(args)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as error:
        if args.debug:
            raise
        if isinstance(error, _loaded(ROUND_ERRORS)):
            print(f"fedlora: error: {error}{_resume_advice(args)}", file=sys.stderr)
            return EXIT_ERROR
        if isinstance(error, _loaded(EXPECTED_ERRORS)):
            parser.exit(EXIT_USAGE, f"fedlora: error: {_with_flag(error, args)}\n")
        parser.exit(  # a bug: one line, the traceback only with --debug
            EXIT_ERROR,
            f"fedlora: error: unexpected {type(error).__name__}: {error} (this is a bug in fedlora; rerun with "
            "--debug for the traceback)\n",
        )


def _command_modules(args: argparse.Namespace) -> list[str]:
    """The modules the command imports: with them torch, transformers, PEFT, datasets, and for ``--engine flower``
    Flower (seconds, and the first moments of every command)."""
    if args.command == "export":
        return ["fedlora.export"]
    if args.command == "config":
        return ["fedlora.federated.config"]
    return ["fedlora.federated.run", *(["fedlora.flower"] if getattr(args, "engine", None) == "flower" else [])]


@contextmanager
def _exit_on_ctrl_c(args: argparse.Namespace) -> Iterator[None]:
    """Ctrl-C ends the process at once (one line, exit status 130) while this block runs: the command's imports.
    A ``KeyboardInterrupt`` raised inside an import can leave torch or NumPy half-imported (a later import then fails
    with an unrelated error, or crashes), be swallowed by a library's ``except``, or abort in C++ code; and nothing
    has been written yet. Only the main thread can set a signal handler; elsewhere this is a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def exit_now(signum: int, frame: object) -> None:
        os.write(2, f"\nfedlora: interrupted{_resume_advice(args)}\n".encode())
        os._exit(EXIT_INTERRUPTED)

    previous = signal.signal(signal.SIGINT, exit_now)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _loaded(names: Sequence[str]) -> tuple[type[BaseException], ...]:
    """The error classes named ``module:class`` whose modules are loaded."""
    return tuple(
        getattr(sys.modules[module], cls)
        for module, _, cls in (name.partition(":") for name in names)
        if module in sys.modules
    )


def _train(args: argparse.Namespace) -> int:
    from fedlora.federated.config import load_config
    from fedlora.federated.rundir.opening import default_output_dir

    flags = {
        key: getattr(args, _dest(flag)) for flag, key in TRAIN_FLAGS.items() if getattr(args, _dest(flag)) is not None
    }
    config_file = args.config
    if args.resume and config_file is None and args.output_dir is not None:
        saved = Path(args.output_dir) / "config.yaml"  # continue with the saved settings
        config_file = saved if saved.is_file() else None
    flower_sets = [item for item in args.set if _is_flower_setting(item)]
    if flower_sets and args.engine != "flower":
        raise ValueError(f"--set {flower_sets[0]}: a Flower setting; it needs --engine flower")
    if args.superlink is not None and args.engine != "flower":
        raise ValueError("--superlink: it needs --engine flower")
    sets = [item for item in args.set if item not in flower_sets]
    config = load_config(config_file, [*(f"{key}={value}" for key, value in flags.items()), *sets])
    if config.output_dir is None and not args.resume:
        config = replace(config, output_dir=str(default_output_dir(config)))
    if args.dry_run:
        return _dry_run(config, args.resume)
    args.run_dir_known = config.output_dir
    if args.engine == "flower":
        _train_on_flower(config, args, flower_sets)
        print(f"done: {config.output_dir} (global_adapter/, nodes/, metrics.jsonl, scores.png)")
    else:
        from fedlora.federated.run import train

        train(config, resume=args.resume, progress=not args.no_progress)
        print(f"done: {config.output_dir} (global_adapter/, clients/, metrics.jsonl, scores.png)")
    return 0


def _dry_run(config: RunConfig, resume: bool) -> int:
    """Check what ``train`` would check before loading anything, plus the model and data paths; print the
    configuration as ``config.yaml`` would hold it (``data.prompt_format: auto`` before the tokenizer resolves it),
    then what the paths name."""
    import yaml

    from fedlora.data.federated import data_path_kind
    from fedlora.federated.rundir.opening import check_run_dir
    from fedlora.models import model_kind

    config = check_run_dir(config, resume)
    model = model_kind(config.model.name)
    paths = [config.data.path] if isinstance(config.data.path, str) else config.data.path
    data = [f"{path} ({data_path_kind(path)})" for path in paths]
    print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")
    print(f"# model: {config.model.name} ({model}); data: {', '.join(data)}; run directory: {config.output_dir}")
    if config.data.prompt_format == "auto":
        print("# data.prompt_format: the run writes chat or alpaca, as the tokenizer has a chat template or not")
    print("# dry run: nothing was loaded or written")
    return 0


def _train_on_flower(config: RunConfig, args: argparse.Namespace, flower_sets: Sequence[str]) -> None:
    """``config`` on Flower: on the SuperLink at ``--superlink`` (whose ServerApp checks the run directory, on its
    machine), or on a local one with one SuperNode per client, the run directory checked here first (nothing is
    started for a bad one)."""
    from fedlora.federated.checks import check_engine
    from fedlora.federated.rundir.opening import absolute_output_dir, check_run_dir
    from fedlora.flower import FlowerSettings, local_federation, run_flower  # flwr takes seconds to import

    values = dict(item.partition("=")[::2] for item in flower_sets)
    settings = FlowerSettings.from_run_config({**values, "resume": args.resume})
    check_engine(config, "flower")
    stream = not args.no_progress
    if args.superlink is not None:
        run_flower(config, args.superlink, settings=settings, stream=stream)
        return
    config = check_run_dir(absolute_output_dir(config), args.resume)
    with local_federation(config, stream=stream) as superlink:
        run_flower(config, superlink, settings=settings, stream=stream)


def _is_flower_setting(item: str) -> bool:
    from fedlora.flower.config import is_settings_key

    return is_settings_key(item.partition("=")[0].strip())


def _eval(args: argparse.Namespace) -> int:
    from fedlora.federated.run import evaluate_run

    overrides = [*args.set, *([f"device={args.device}"] if args.device else [])]
    evaluate_run(args.run_dir, overrides=overrides, progress=not args.no_progress)
    return 0


def _export(args: argparse.Namespace) -> int:
    from fedlora.export import export_all_clients, export_client, export_global

    common = {"merge": args.merge, "device": args.device}
    if args.global_model:
        written = [export_global(args.run_dir, args.out, **common)]
    elif args.client is not None:
        written = [export_client(args.run_dir, args.client, args.out, **common)]
    else:
        written = list(export_all_clients(args.run_dir, args.out, **common).values())
    kind = "merged model" if args.merge else "PEFT adapter"
    print("\n".join(f"wrote {path} ({kind})" for path in written))
    return 0


def _config_keys(args: argparse.Namespace) -> int:
    rows = [("KEY", "TYPE", "DEFAULT", "HELP"), *describe_keys()]
    widths = [max(len(row[column]) for row in rows) for column in range(3)]
    for *columns, text in rows:
        print("  ".join(value.ljust(width) for value, width in zip(columns, widths, strict=True)), text)
    return 0


def _resume_advice(args: argparse.Namespace) -> str:
    """What to do after an interrupted or failed ``train``: resume if its run directory holds a run, else start
    again (nothing to resume)."""
    if args.command != "train":
        return ""
    # No import here: a Ctrl-C while torch imports leaves it half-imported, and importing it again can crash.
    if args.run_dir_known is not None and (Path(args.run_dir_known) / "config.yaml").is_file():
        engine = " --engine flower" if args.engine == "flower" else ""
        return f"; continue with: fedlora train --output-dir {args.run_dir_known} --resume{engine}"
    return "; no run directory was written, so there is nothing to resume: start the run again"


def _with_flag(error: BaseException, args: argparse.Namespace) -> str:
    """The message of ``error``, led by the ``train`` flag that set the key it names (``--seed: seed must be ...``)."""
    message = str(error)
    for flag, key in TRAIN_FLAGS.items() if args.command == "train" else ():
        given = getattr(args, _dest(flag)) is not None
        if given and message.startswith((f"{key} ", f"{key}:")) and f"--{flag}" not in message:
            return f"--{flag}: {message}"
    return message


def _dest(flag: str) -> str:
    """The argparse attribute of ``--flag``."""
    return flag.replace("-", "_")


def _add_common(parser: argparse.ArgumentParser, set_help: str | None = None) -> None:
    """``--debug``, and with ``set_help`` also ``--set`` and ``--no-progress``."""
    if set_help is not None:
        parser.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE", help=set_help)
        parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--debug", action="store_true", help="show the Python traceback of any error")


if __name__ == "__main__":
    sys.exit(main())
