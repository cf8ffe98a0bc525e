"""Opening a run, the same for both engines: everything the round driver needs, built once per process.

:func:`open_session` checks the run against its engine (:func:`~fedlora.federated.checks.check_engine`), checks
and opens the run directory (:func:`~fedlora.federated.rundir.opening.open_run`: a fresh run, or with ``resume``
its newest intact checkpoint) before the model loads, builds this process's client trainer
(:func:`~fedlora.federated.build.build_client`, from ``global_adapter/`` when the run has one), settles the prompt
format as the tokenizer resolves it (``config.yaml`` records the resolved one) and builds the server with the
initial global shared tensors. The engine then reaches its clients through a
:class:`~fedlora.federated.rounds.Transport` and hands it to :meth:`Session.run`: the in-process engine in
:func:`fedlora.federated.run.train`, Flower's ServerApp in :func:`fedlora.flower.server_app.serve`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from torch import nn
from transformers import PreTrainedTokenizerBase

from fedlora.data import resolve_prompt_format
from fedlora.federated.build import build_client
from fedlora.federated.checks import Engine, check_engine
from fedlora.federated.client import FederatedClient
from fedlora.federated.config import RunConfig
from fedlora.federated.rounds import Transport, run_rounds
from fedlora.federated.rundir.opening import open_run
from fedlora.federated.rundir.storage import Checkpoint, RunDir
from fedlora.federated.server import FederatedServer


@dataclass
class Session:
    """An opened run: its configuration (``output_dir`` filled in, ``data.prompt_format`` resolved), its run
    directory, the checkpoint to continue from (None: round 1 is next), this process's client trainer and the
    server."""

    config: RunConfig
    run_dir: RunDir
    checkpoint: Checkpoint | None
    client: FederatedClient
    server: FederatedServer

    def run(self, transport: Transport, *, heading: str, progress: bool = True) -> Path:
        """Run the remaining rounds over ``transport`` (:func:`~fedlora.federated.rounds.run_rounds`); returns the
        run directory."""
        return run_rounds(
            self.config,
            self.run_dir,
            self.checkpoint,
            self.server,
            self.client,
            transport,
            heading=heading,
            progress=progress,
        )


def open_session(
    config: RunConfig,
    resume: bool,
    engine: Engine,
    *,
    model: nn.Module | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    progress: bool = True,
) -> Session:
    """Open (with ``resume``, continue) the run described by ``config`` on ``engine`` (see the module docstring).

    ``model``/``tokenizer`` replace loading ``config.model.name``. A fresh run needs an absent or empty output
    directory; ``resume`` needs the run's directory and a configuration that differs from the saved one only in
    ``rounds``, ``device``, ``output_dir`` or ``eval.*``.
    """
    check_engine(config, engine)
    config, run_dir, checkpoint = open_run(config, resume)  # before the model loads: a damaged run fails fast
    adapter_dir = run_dir.global_adapter if run_dir.global_adapter.exists() else None
    client = build_client(config, model=model, tokenizer=tokenizer, adapter_dir=adapter_dir, progress=progress)
    prompt_format = resolve_prompt_format(config.data.prompt_format, client.tokenizer)
    config = replace(config, data=replace(config.data, prompt_format=prompt_format))
    server = FederatedServer(client.snapshot(client.names["shared"]), config.server, config.seed, config.privacy)
    return Session(config, run_dir, checkpoint, client, server)
