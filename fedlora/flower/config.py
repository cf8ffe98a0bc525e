"""What a Flower run is configured with: the fedlora run configuration plus Flower-only settings, as run config.

Flower hands the ServerApp and every ClientApp the same flat *run config* (``context.run_config``: the app's
``[tool.flwr.app.config]`` table with ``flwr run --run-config`` overrides on top). Every setting of
:class:`~fedlora.federated.config.RunConfig` is one key there, named as in ``fedlora train --set``
(``rounds``, ``client.local_lr``, ``data.num_clients``); a value Flower cannot hold is a string that ``--set``
would take (``none``, ``q_proj,v_proj``, a JSON object). The remaining keys are :class:`FlowerSettings`, in
kebab-case (``min-nodes``, ``round-timeout``, ``dp``, ``resume``). So
``flwr run APP CONNECTION --run-config "rounds=3 client.local_lr=0.01 round-timeout=600"`` works as expected.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Literal

from fedlora.federated.config import RunConfig, build_config, config_leaves

PRIVACY_MODES = ("none", "server-fixed", "client-fixed", "local")
CENTRAL_DP = ("server-fixed", "client-fixed")


@dataclass(frozen=True)
class FlowerSettings:
    """Settings of a Flower run that the in-process engine does not have (run-config keys in kebab-case).

    ``min_nodes``: SuperNodes to wait for before round 1 (0: ``data.num_clients``); ``node_timeout``: how long to
    wait for them; ``round_timeout``: how long to wait for the replies of one round; ``resume``: continue the run
    in ``output_dir`` from its checkpoint (as ``fedlora train --resume``). ``dp`` adds differential
    privacy to the shared tensors: ``server-fixed`` / ``client-fixed`` (central DP, Flower's
    ``DifferentialPrivacy{Server,Client}SideFixedClipping``: updates clipped to ``dp_clipping_norm`` on the
    server / on the nodes, Gaussian noise of std ``dp_noise_multiplier · dp_clipping_norm / sampled clients``
    added to the average) or ``local`` (Flower's ``LocalDpMod`` on every node: update clipped to
    ``dp_clipping_norm``, noise of std ``dp_sensitivity · √(2 ln(1.25/dp_delta)) / dp_epsilon`` added).
    """

    min_nodes: int = 0
    node_timeout: float = 600.0
    round_timeout: float = 3600.0
    resume: bool = False
    dp: Literal["none", "server-fixed", "client-fixed", "local"] = "none"
    dp_noise_multiplier: float = 1.0
    dp_clipping_norm: float = 1.0
    dp_sensitivity: float = 1.0
    dp_epsilon: float = 1.0
    dp_delta: float = 1e-5

    def __post_init__(self) -> None:
        if self.dp not in PRIVACY_MODES:
            raise ValueError(f"dp must be one of {list(PRIVACY_MODES)}; got {self.dp!r}")
        if self.min_nodes < 0:
            raise ValueError(f"min-nodes must be at least 0; got {self.min_nodes}")
        positive = ("node_timeout", "round_timeout", "dp_clipping_norm", "dp_epsilon", "dp_delta")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"{_key(name)} must be positive; got {getattr(self, name)!r}")
        for name in ("dp_noise_multiplier", "dp_sensitivity"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{_key(name)} must be at least 0; got {getattr(self, name)!r}")

    def to_run_config(self) -> dict[str, Any]:
        """These settings as run-config entries."""
        return {_key(f.name): getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> FlowerSettings:
        """The settings in a run config (absent keys keep their defaults); ints are accepted for floats, and
        strings (``fedlora train --set``) for numbers and booleans."""
        values = {}
        for f in fields(cls):
            key = _key(f.name)
            if key in run_config:
                value = run_config[key]
                try:
                    if f.type in ("int", "float"):
                        value = {"int": int, "float": float}[f.type](value)
                    elif f.type == "bool" and isinstance(value, str):
                        value = {"true": True, "false": False}[value.lower()]
                except (KeyError, ValueError):
                    raise ValueError(
                        f"{key} must be a{'n' if f.type == 'int' else ''} {f.type}; got {value!r}"
                    ) from None
                values[f.name] = value
        return cls(**values)

    def min_nodes_for(self, config: RunConfig) -> int:
        """The number of SuperNodes to wait for."""
        return self.min_nodes or config.data.num_clients or 1


def is_settings_key(key: str) -> bool:
    """Whether ``key`` names one of the :class:`FlowerSettings` (else it is a run configuration key)."""
    return key in {_key(f.name) for f in fields(FlowerSettings)}


def to_run_config(config: RunConfig, settings: FlowerSettings) -> dict[str, Any]:
    """The run config that carries ``config`` and ``settings`` (what ``flwr run --run-config`` gets); a
    ``data.seed`` equal to ``seed`` is ``none`` (the run's seed), so that ``--run-config seed=N`` moves both."""
    leaves = config_leaves(config)
    if leaves["data.seed"] == config.seed:
        leaves["data.seed"] = None
    return {**{key: _flat(value) for key, value in leaves.items()}, **settings.to_run_config()}


def from_run_config(run_config: Mapping[str, Any]) -> tuple[RunConfig, FlowerSettings]:
    """The fedlora run configuration and the Flower settings in a run config."""
    overrides = {key: value for key, value in run_config.items() if not is_settings_key(key)}
    return build_config({}, overrides), FlowerSettings.from_run_config(run_config)


def app_run_config() -> dict[str, Any]:
    """The defaults of the Flower app's ``[tool.flwr.app.config]``: every key ``--run-config`` may override."""
    return to_run_config(RunConfig(), FlowerSettings())


def toml_value(value: Any) -> str:
    """A scalar as a TOML value (JSON strings are valid TOML basic strings)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"TOML cannot hold {value!r}")
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))


def _flat(value: Any) -> bool | int | float | str:
    """A setting as a run-config value: scalars as they are, else the string ``--set`` takes."""
    if value is None:
        return "none"
    if isinstance(value, list):
        return ",".join(map(str, value))
    if isinstance(value, dict):
        return json.dumps(value)
    return value


def _key(name: str) -> str:
    return name.replace("_", "-")
