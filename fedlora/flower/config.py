"""What a Flower run is configured with: the fedlora run configuration plus Flower-only settings, as run config.

Flower hands the ServerApp and every ClientApp the same flat *run config* (``context.run_config``: the app's
``[tool.flwr.app.config]`` table with ``flwr run --run-config`` overrides on top). Every setting of
:class:`~fedlora.federated.config.RunConfig` is one key there, named as in ``fedlora train --set``
(``rounds``, ``client.local_lr``, ``data.num_clients``); a value Flower cannot hold is a string that ``--set``
would take (``none``, ``q_proj,v_proj``, a JSON object). The remaining keys are :class:`FlowerSettings`, in
kebab-case (``min-nodes``, ``round-timeout``, ``resume``). So
``flwr run APP CONNECTION --run-config "rounds=3 client.local_lr=0.01 round-timeout=600"`` works as expected.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from fedlora.federated.config import RunConfig, build_config, config_leaves
from fedlora.federated.loader import build_dataclass
from fedlora.rules import NON_NEGATIVE, POSITIVE, Section


@dataclass(frozen=True)
class FlowerSettings(Section):
    """Settings of a Flower run that the in-process engine does not have (run-config keys in kebab-case), built by
    the same loader and rules as every settings section.

    ``min_nodes``: SuperNodes to wait for before round 1 (0: ``data.num_clients``); ``node_timeout``: how long to
    wait for them; ``round_timeout``: how long to wait for the replies of one round; ``resume``: continue the run
    in ``output_dir`` from its checkpoint (as ``fedlora train --resume``). Differential privacy is the run's
    ``privacy.*`` section, as on the in-process engine.
    """

    min_nodes: int = 0
    node_timeout: float = 600.0
    round_timeout: float = 3600.0
    resume: bool = False

    rules = {"min_nodes": NON_NEGATIVE, "node_timeout": POSITIVE, "round_timeout": POSITIVE}

    def to_run_config(self) -> dict[str, Any]:
        """These settings as run-config entries."""
        return {_key(f.name): getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> FlowerSettings:
        """The settings in a run config (absent keys keep their defaults), read as ``--set`` values are (see
        :mod:`fedlora.federated.loader`); an error names the run-config key."""
        values = {f.name: run_config[_key(f.name)] for f in fields(cls) if _key(f.name) in run_config}
        try:
            return build_dataclass(cls, values)
        except ValueError as error:
            name, _, rest = str(error).partition(" ")
            raise ValueError(f"{_key(name)} {rest}") from None

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
