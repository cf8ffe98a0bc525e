"""Checks of a run's settings that need more than the configuration itself (the machine, the engine, the data
split ``eval`` scores), all made before anything is written: each raises a ``ValueError`` that names the key or
flag. :mod:`fedlora.federated.config` checks each value on its own (types, ranges, finiteness)."""

from __future__ import annotations

from typing import Literal

import torch

from fedlora.federated.config import FLOWER_MECHANISMS, RunConfig, config_differences
from fedlora.federated.resources import check_memory
from fedlora.federated.strategy import STRATEGIES

EVAL_FIXED_KEYS = ("data.", "seed")  # what `fedlora eval --set` may not change: the data split it scores
Engine = Literal["in-process", "flower"]


def check_device(device: str) -> None:
    """Raise a ``ValueError`` naming ``device`` (``--device``) unless torch knows it and this machine can use it."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError, TypeError) as error:
        raise ValueError(f"device (--device) {device!r} is not a device torch knows: {error}") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device (--device) {device!r}: CUDA is not available on this machine; use --device cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ValueError(
                f"device (--device) {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device (--device) {device!r}: MPS is not available on this machine; use --device cpu")
    try:
        torch.zeros(1, device=parsed)
    except Exception as error:  # a backend torch knows but this build or machine lacks
        raise ValueError(f"device (--device) {device!r} is not usable here: {error}") from None


def check_engine(config: RunConfig, engine: Engine) -> None:
    """What ``engine`` needs of the run: on Flower every client trains on its own node, so a strategy that pools
    the clients' data into one cannot run there; Flower's DP mechanisms (``privacy.mechanism``) run only there."""
    if engine == "flower" and not STRATEGIES[config.strategy].trains_each_client:
        raise ValueError(f"strategy {config.strategy!r} trains one pooled client and cannot run on Flower")
    if engine == "in-process" and config.privacy.mechanism in FLOWER_MECHANISMS:
        raise ValueError(
            f"privacy.mechanism={config.privacy.mechanism} is Flower's; it needs --engine flower (the in-process "
            "engine has dp-fedavg)"
        )


def check_settings(config: RunConfig) -> None:
    """What can be checked before the model and data load: the device, whether the run fits in its memory (see
    :mod:`fedlora.federated.resources`), and ``server.min_clients`` against ``data.num_clients`` when the partition
    fixes it."""
    check_device(config.device)
    check_memory(config)
    if config.data.num_clients is not None:
        check_min_clients(config, config.data.num_clients)


def check_min_clients(config: RunConfig, clients: int) -> None:
    """``server.min_clients`` must not exceed the ``clients`` clients of the federation (a round samples at least
    that many, and needs as many valid results)."""
    if config.server.min_clients > clients:
        raise ValueError(
            f"server.min_clients={config.server.min_clients} is more than the {clients} client(s) of the federation, "
            "so no round could succeed"
        )


def check_eval_overrides(saved: RunConfig, config: RunConfig) -> None:
    """``fedlora eval --set`` may not change what decides the data split (``data.*``, ``seed``): the scores would
    not be of the clients the run trained."""
    changed = [key for key in config_differences(saved, config) if key.startswith(EVAL_FIXED_KEYS)]
    if changed:
        raise ValueError(
            f"--set {', '.join(changed)}: eval scores the clients the run trained on, so it cannot change the data "
            f"split settings ({', '.join(k.rstrip('.') + ('.*' if k.endswith('.') else '') for k in EVAL_FIXED_KEYS)})"
        )
