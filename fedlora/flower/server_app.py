"""The Flower ServerApp: fedlora's round driver over the SuperNodes connected to the SuperLink.

:func:`serve` opens the run as the in-process engine does (:func:`~fedlora.federated.session.open_session`: a
fresh run, or with ``resume`` its newest intact checkpoint), waits for the SuperNodes, asks each for its client id, and hands the rounds to
:func:`fedlora.federated.rounds.run_rounds` with a :class:`~fedlora.flower.transport.FlowerTransport`:
:class:`~fedlora.flower.strategy.FedLoraStrategy` (wrapped by Flower's DP wrapper when ``privacy.mechanism`` names one) samples and
aggregates. The run directory on the SuperLink's machine gets what the in-process engine writes there except the
client states, which the SuperNodes keep on their disks; its checkpoint records each client's last round.
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedlora.federated.config import RunConfig
from fedlora.federated.rundir.opening import absolute_output_dir
from fedlora.federated.session import open_session
from fedlora.flower.config import FlowerSettings, from_run_config
from fedlora.flower.strategy import FedLoraStrategy, with_privacy
from fedlora.flower.transport import FlowerTransport, identify, wait_for_nodes

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point of ``flwr run``: the configuration comes from the run config (see :mod:`fedlora.flower.config`)."""
    serve(grid, *from_run_config(context.run_config))


def serve(grid: Grid, config: RunConfig, settings: FlowerSettings) -> Path:
    """Run (with ``settings.resume``, continue) the federation described by ``config`` on ``grid``'s SuperNodes;
    returns the run directory (``output_dir``, made absolute on this machine)."""
    session = open_session(absolute_output_dir(config), settings.resume, "flower", progress=False)
    config, server = session.config, session.server
    node_ids = wait_for_nodes(grid, settings.min_nodes_for(config), settings.node_timeout)
    nodes = identify(grid, node_ids, settings.round_timeout)
    fedlora = FedLoraStrategy(server, nodes)
    strategy = with_privacy(fedlora, config.privacy, len(server.sample(1, list(nodes))))
    strategy.summary()
    transport = FlowerTransport(grid, fedlora, strategy, server, settings.round_timeout)
    names = list(nodes) if len(nodes) <= 16 else f"{len(nodes)} ({', '.join(list(nodes)[:3])}, …)"
    return session.run(transport, heading=f"fedlora {config.strategy} on Flower: clients {names}", progress=False)
