"""The Flower ServerApp: fedlora's round driver over the SuperNodes connected to the SuperLink.

:func:`serve` opens the run directory as the in-process engine does (a fresh run, or with ``resume`` its newest
intact checkpoint), waits for the SuperNodes, asks each for its client id, and hands the rounds to
:func:`fedlora.federated.rounds.run_rounds` with a :class:`~fedlora.flower.transport.FlowerTransport`:
:class:`~fedlora.flower.strategy.FedLoraStrategy` (optionally wrapped by a Flower DP wrapper) samples and
aggregates. The run directory on the SuperLink's machine gets what the in-process engine writes there except the
client states, which the SuperNodes keep on their disks; its checkpoint records each client's last round.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedlora.data import resolve_prompt_format
from fedlora.federated.build import build_client
from fedlora.federated.config import RunConfig
from fedlora.federated.rounds import run_rounds
from fedlora.federated.rundir.opening import open_run
from fedlora.federated.server import FederatedServer
from fedlora.federated.strategy import STRATEGIES
from fedlora.flower.config import FlowerSettings, from_run_config, run_output_dir
from fedlora.flower.strategy import FedLoraStrategy, check_privacy, with_privacy
from fedlora.flower.transport import FlowerTransport, identify, wait_for_nodes

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point of ``flwr run``: the configuration comes from the run config (see :mod:`fedlora.flower.config`)."""
    serve(grid, *from_run_config(context.run_config))


def serve(grid: Grid, config: RunConfig, settings: FlowerSettings) -> Path:
    """Run (with ``settings.resume``, continue) the federation described by ``config`` on ``grid``'s SuperNodes;
    returns the run directory."""
    if not STRATEGIES[config.strategy].trains_each_client:
        raise ValueError(f"strategy {config.strategy!r} trains one pooled client and cannot run on Flower")
    check_privacy(config, settings)
    config, run_dir, checkpoint = open_run(run_output_dir(config, settings.resume), settings.resume)
    adapter_dir = run_dir.global_adapter if run_dir.global_adapter.exists() else None
    client = build_client(config, adapter_dir=adapter_dir, progress=False)
    prompt_format = resolve_prompt_format(config.data.prompt_format, client.tokenizer)  # as the nodes resolve it
    config = replace(config, data=replace(config.data, prompt_format=prompt_format))
    node_ids = wait_for_nodes(grid, settings.min_nodes_for(config), settings.node_timeout)
    nodes = identify(grid, node_ids, settings.round_timeout)
    server = FederatedServer(client.snapshot(client.names["shared"]), config.server, config.seed, config.privacy)
    fedlora = FedLoraStrategy(server, nodes)
    strategy = with_privacy(fedlora, settings, len(server.sample(1, list(nodes))))
    strategy.summary()
    transport = FlowerTransport(grid, fedlora, strategy, server, settings.round_timeout)
    heading = f"fedlora {config.strategy} on Flower: clients {list(nodes)}"
    return run_rounds(config, run_dir, checkpoint, server, client, transport, heading=heading, progress=False)
