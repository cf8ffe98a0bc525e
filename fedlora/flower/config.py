"""What a Flower run is configured with: the fedlora run configuration plus Flower-only settings, as run config.

Flower hands the ServerApp and every ClientApp the same flat *run config* (``context.run_config``: the app's
``[tool.flwr.app.config]`` table with ``flwr run --run-config`` overrides on top). fedlora's whole
:class:`~fedlora.federated.config.RunConfig` travels in it as JSON (``fedlora-config``), optionally adjusted by
``key=value`` overrides (``fedlora-set``); the remaining keys are :class:`FlowerSettings`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Literal

from fedlora.federated.config import RunConfig, build_config
from fedlora.federated.run import check_run_dir, default_output_dir

CONFIG_KEY = "fedlora-config"  # the RunConfig as JSON ("" = the defaults)
SET_KEY = "fedlora-set"  # whitespace-separated key=value overrides of it
PRIVACY_MODES = ("none", "server-fixed", "client-fixed", "local")
CENTRAL_DP = ("server-fixed", "client-fixed")


@dataclass(frozen=True)
class FlowerSettings:
    """Settings of a Flower run that the in-process engine does not have (run-config keys in kebab-case).

    ``min_nodes``: SuperNodes to wait for before round 1 (0: ``data.num_clients``); ``node_timeout``: how long to
    wait for them; ``round_timeout``: how long to wait for the replies of one round. ``dp`` adds differential
    privacy to the shared tensors: ``server-fixed`` / ``client-fixed`` (central DP, Flower's
    ``DifferentialPrivacy{Server,Client}SideFixedClipping``: updates clipped to ``dp_clipping_norm`` on the
    server / on the nodes, Gaussian noise of std ``dp_noise_multiplier · dp_clipping_norm / sampled clients``
    added to the average) or ``local`` (Flower's ``LocalDpMod`` on every node: update clipped to
    ``dp_clipping_norm``, noise of std ``dp_sensitivity · √(2 ln(1.25/dp_delta)) / dp_epsilon`` added).
    """

    min_nodes: int = 0
    node_timeout: float = 600.0
    round_timeout: float = 3600.0
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
        """The settings in a run config (absent keys keep their defaults); ints are accepted for floats."""
        values = {}
        for f in fields(cls):
            if _key(f.name) in run_config:
                value = run_config[_key(f.name)]
                values[f.name] = float(value) if f.type == "float" else value
        return cls(**values)

    def min_nodes_for(self, config: RunConfig) -> int:
        """The number of SuperNodes to wait for."""
        return self.min_nodes or config.data.num_clients or 1


def to_run_config(config: RunConfig, settings: FlowerSettings) -> dict[str, Any]:
    """The run config that carries ``config`` and ``settings`` (what ``flwr run --run-config`` gets)."""
    return {CONFIG_KEY: json.dumps(config.to_dict()), SET_KEY: "", **settings.to_run_config()}


def from_run_config(run_config: Mapping[str, Any]) -> tuple[RunConfig, FlowerSettings]:
    """The fedlora run configuration and the Flower settings in a run config."""
    text = run_config.get(CONFIG_KEY, "")
    values = json.loads(text) if text else {}
    overrides = str(run_config.get(SET_KEY, "")).split()
    return build_config(values, overrides), FlowerSettings.from_run_config(run_config)


def app_run_config() -> dict[str, Any]:
    """The defaults of the Flower app's ``[tool.flwr.app.config]``: every key ``--run-config`` may override."""
    return {CONFIG_KEY: "", SET_KEY: "", **FlowerSettings().to_run_config()}


def fresh_output_dir(config: RunConfig) -> RunConfig:
    """``config`` with an absolute ``output_dir`` (a new timestamped one if unset) that a fresh run can use (see
    :func:`~fedlora.federated.run.check_run_dir`)."""
    path = Path(config.output_dir or default_output_dir(config)).absolute()
    return check_run_dir(replace(config, output_dir=str(path)), resume=False)


def toml_value(value: Any) -> str:
    """A scalar as a TOML value (JSON strings are valid TOML basic strings)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"TOML cannot hold {value!r}")
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))


def _key(name: str) -> str:
    return name.replace("_", "-")
