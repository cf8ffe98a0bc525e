"""Federated fine-tuning with FedDoRA (FedLoRA-Optimizer, arXiv 2510.11274) and LoRA baselines: the engine.

Its public names are below; the module map is the README's Layout section, and ``docs/architecture.md`` follows a
round through the modules. The Flower engine is :mod:`fedlora.flower`.
"""

from fedlora.federated.aggregation import FedAdam, FedAvgM, FedYogi, ServerOptimizer, weighted_average
from fedlora.federated.client import ClientState, FederatedClient
from fedlora.federated.config import RunConfig, build_config, load_config
from fedlora.federated.message import FitIns, FitRes, Rejection
from fedlora.federated.run import evaluate_run, train
from fedlora.federated.server import FederatedServer
from fedlora.federated.strategy import STRATEGIES, FederatedStrategy

__all__ = [
    "STRATEGIES",
    "FederatedClient",
    "ClientState",
    "FedAdam",
    "FedAvgM",
    "FedYogi",
    "FitIns",
    "FitRes",
    "Rejection",
    "RunConfig",
    "FederatedServer",
    "ServerOptimizer",
    "FederatedStrategy",
    "build_config",
    "evaluate_run",
    "load_config",
    "train",
    "weighted_average",
]
