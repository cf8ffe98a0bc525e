"""fedlora on Flower: the same federated fine-tuning across machines, one SuperNode per client.

A Flower app on the Message API (flwr 1.42): :mod:`~fedlora.flower.server_app` (the ServerApp, on the SuperLink's
machine) and :mod:`~fedlora.flower.client_app` (the ClientApp, on every SuperNode) run the in-process engine's
strategy, client training, aggregation and evaluation (:mod:`fedlora.federated`) and exchange only the shared
tensors; personal tensors and local optimizer state stay on each SuperNode's disk.
:mod:`~fedlora.flower.config` carries the configuration in Flower's run config, :mod:`~fedlora.flower.node` builds
a node's model, data and kept states, :mod:`~fedlora.flower.records` maps tensors and rounds to Flower records,
:mod:`~fedlora.flower.strategy` adapts fedlora's server to Flower's strategy API (and its DP wrappers),
:mod:`~fedlora.flower.transport` is the round driver's way to the SuperNodes, and :mod:`~fedlora.flower.launch`
submits a run to a SuperLink or starts one with its SuperNodes. See ``docs/flower.md``.
"""

from fedlora.flower.config import FlowerSettings
from fedlora.flower.launch import local_federation, run_flower, write_app

__all__ = ["FlowerSettings", "local_federation", "run_flower", "write_app"]
