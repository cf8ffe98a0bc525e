"""fedlora on Flower: the same federated fine-tuning across machines, one SuperNode per client.

A Flower app on the Message API (flwr 1.42): the ServerApp (on the SuperLink's machine) and the ClientApp (on every
SuperNode) run the in-process engine's strategy, client training, aggregation and evaluation
(:mod:`fedlora.federated`) and exchange only the shared tensors; personal tensors and local optimizer state stay on
each SuperNode's disk. The module map is the README's Layout section; the how-to is ``docs/flower.md``.
"""

from fedlora.flower.config import FlowerSettings
from fedlora.flower.launch import local_federation, run_flower, write_app

__all__ = ["FlowerSettings", "local_federation", "run_flower", "write_app"]
