"""Federated fine-tuning with FedDoRA (FedLoRA-Optimizer, arXiv 2510.11274) and LoRA baselines: the engine.

:mod:`~fedlora.federated.rounds` (the round driver both engines run, over a transport),
:mod:`~fedlora.federated.run` (the in-process engine and its transport; ``fedlora eval``),
:mod:`~fedlora.federated.build` (the model with the strategy's adapter, as every process builds it),
:mod:`~fedlora.federated.config` (the run configuration's schema) and :mod:`~fedlora.federated.loader` (reading
files and overrides into it), :mod:`~fedlora.federated.strategy` (which tensors are shared, personal or frozen),
:mod:`~fedlora.federated.message` (what crosses the wire), :mod:`~fedlora.federated.client` (local training and
evaluation), :mod:`~fedlora.federated.server` (sampling and aggregation, update checks),
:mod:`~fedlora.federated.aggregation` (weighted, median and trimmed-mean aggregation, clipping, server
optimizers), :mod:`~fedlora.federated.privacy` (DP-FedAvg and its ε), :mod:`~fedlora.federated.rundir` (the run
directory: opening and resuming it, its layout, crash-safe writes and path policy, ``global_adapter/``),
:mod:`~fedlora.federated.checks` (settings checked against the machine before anything is written) and
:mod:`~fedlora.federated.report` (metrics, table, plot). The Flower engine is
:mod:`fedlora.flower`.
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
