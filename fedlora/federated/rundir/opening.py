"""Opening a run directory: its default name, the checks before a fresh run or a resume, and crash recovery.

Both engines open their run this way (:func:`open_run`), before the model loads and before anything is written: a
fresh run needs an absent or empty directory; a resume needs a run whose saved configuration differs from this one
only in :data:`RESUMABLE_KEYS`, and continues from its newest intact checkpoint (see
:meth:`~fedlora.federated.rundir.storage.RunDir.recover`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from fedlora.federated.checks import check_min_clients, check_settings
from fedlora.federated.config import RunConfig, config_differences, load_run_config
from fedlora.federated.rundir.paths import client_dir_names
from fedlora.federated.rundir.storage import (
    Checkpoint,
    RunDir,
    check_free_space,
    check_writable,
    estimate_run_bytes,
    recover_dir,
)

RESUMABLE_KEYS = ("rounds", "device", "output_dir", "eval.")  # settings --resume may change (prefixes)


def default_output_dir(config: RunConfig) -> Path:
    """``runs/<strategy>-<timestamp>``."""
    return Path("runs") / f"{config.strategy}-{time.strftime('%Y%m%d-%H%M%S')}"


def absolute_output_dir(config: RunConfig) -> RunConfig:
    """``config`` with an absolute ``output_dir`` on this machine (:func:`default_output_dir` if unset): what
    Flower's processes name the run by."""
    return replace(config, output_dir=str(Path(config.output_dir or default_output_dir(config)).absolute()))


def open_run(config: RunConfig, resume: bool) -> tuple[RunConfig, RunDir, Checkpoint | None]:
    """Check the run directory (:func:`check_run_dir`), and on ``resume`` recover it; returns the config with its
    ``output_dir`` filled in, the run directory and the checkpoint to continue from (None: round 1 is next)."""
    config = check_run_dir(config, resume)
    run_dir = RunDir(config.output_dir)
    checkpoint = run_dir.recover() if resume else None
    recover_dir(run_dir.inside(run_dir.global_adapter))
    return config, run_dir, checkpoint


def check_run_dir(config: RunConfig, resume: bool) -> RunConfig:
    """Check the output directory can be used (fresh: absent or empty; resume: a run with a compatible config);
    returns the config with its ``output_dir`` filled in."""
    check_settings(config)
    if resume:
        if config.output_dir is None:
            raise ValueError("--resume needs the directory of the run to continue (--output-dir)")
        run_dir = RunDir(config.output_dir)
        run_dir.check_links()
        if not run_dir.config.exists():
            raise FileNotFoundError(f"{run_dir.path} is not a fedlora run directory (no config.yaml)")
        saved = load_run_config(run_dir.config)
        if config.data.prompt_format == "auto":  # the format the run resolved it to (in its config.yaml)
            config = replace(config, data=replace(config.data, prompt_format=saved.data.prompt_format))
        changed = [key for key in config_differences(saved, config) if not key.startswith(RESUMABLE_KEYS)]
        if changed:
            raise ValueError(
                f"--resume: the configuration differs from the saved run in {changed}; only rounds, device, "
                "output_dir and eval.* may change"
            )
        check_resume_rounds(config, run_dir.committed_round())
    else:
        run_dir = RunDir(config.output_dir or default_output_dir(config))
        if run_dir.path.is_dir() and any(run_dir.path.iterdir()):
            raise FileExistsError(
                f"output directory {run_dir.path} exists and is not empty; pass --resume to continue that run "
                "or choose another --output-dir"
            )
    check_writable(run_dir.path)
    # What is known of the run's size before the model loads; the round driver checks the whole once it is built.
    clients = config.data.num_clients or 1
    check_free_space(
        run_dir.path, estimate_run_bytes(shared=0, personal=0, adapter=0, clients=clients, rounds=config.rounds)
    )
    return replace(config, output_dir=str(run_dir.path))


def check_clients(config: RunConfig, client_ids: Sequence[str]) -> None:
    """Once the data is split: every client that trains (``client_ids``) gets its own state directory, and a round
    can sample ``server.min_clients`` of them."""
    client_dir_names(client_ids)
    check_min_clients(config, len(client_ids))


def check_resume_rounds(config: RunConfig, committed: int) -> None:
    """``--resume --rounds N`` needs N at least the rounds the run directory already committed."""
    if config.rounds < committed:
        raise ValueError(
            f"rounds (--rounds) {config.rounds} is below the {committed} round(s) {config.output_dir} already "
            f"committed; pass --rounds {committed} or more to continue it"
        )
