"""Submit a fedlora run to a running Flower SuperLink: :func:`run_flower` (what ``fedlora train --engine flower``
calls) and :func:`write_app` (the Flower app directory ``flwr run`` takes).

The app directory holds only a ``pyproject.toml``: its components point at the installed
:mod:`fedlora.flower.server_app` and :mod:`fedlora.flower.client_app`, so every machine needs fedlora installed
(start the SuperLink with ``--disable-runtime-dependency-installation``). ``python -m fedlora.flower DIR`` writes
it for use with ``flwr run DIR``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fedlora.federated.config import RunConfig
from fedlora.flower.config import FlowerSettings, app_run_config, fresh_output_dir, to_run_config, toml_value

CONNECTION = "fedlora"
_APP_PYPROJECT = """\
# The fedlora Flower app: `flwr run <this directory> <superlink connection> --run-config ...`.
# fedlora-config: the whole fedlora run configuration as JSON ("" = the defaults);
# fedlora-set: space-separated fedlora overrides, e.g. "rounds=3 client.local_lr=0.01";
# the other keys are fedlora.flower.config.FlowerSettings (SuperNodes to wait for, timeouts, differential privacy).
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "fedlora-flower"
version = "1.0.0"
description = "FedDoRA / FedLoRA-Optimizer federated fine-tuning with fedlora on Flower"
license = "Apache-2.0"
dependencies = ["fedlora"]

[tool.flwr.app]
publisher = "fedlora"

[tool.flwr.app.components]
serverapp = "fedlora.flower.server_app:app"
clientapp = "fedlora.flower.client_app:app"

[tool.flwr.app.config]
"""


def write_app(directory: str | Path) -> Path:
    """Write the Flower app (its ``pyproject.toml``) into ``directory``; returns the directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "pyproject.toml").write_text(_APP_PYPROJECT + _toml_table(app_run_config()))
    return directory


def run_flower(
    config: RunConfig,
    superlink: str,
    *,
    settings: FlowerSettings | None = None,
    root_certificates: str | Path | None = None,
    stream: bool = True,
    timeout: float | None = None,
) -> Path:
    """Run ``config`` on the SuperNodes of the SuperLink at ``superlink`` (``host:port``); returns the run directory.

    The ServerApp runs on the SuperLink's machine and writes ``config.output_dir`` there (a fresh timestamped
    directory if unset), so call this on that machine to read the results. Without ``root_certificates`` the
    connection is insecure (no TLS). ``stream`` prints the run's log; after ``timeout`` seconds the run is stopped
    and ``TimeoutError`` raised. A run that fails raises ``RuntimeError`` with Flower's reason.
    """
    config = fresh_output_dir(config)
    run_config = to_run_config(config, settings or FlowerSettings())
    with tempfile.TemporaryDirectory(prefix="fedlora-flower-") as tmp:
        app_dir = write_app(Path(tmp) / "app")
        overrides = Path(tmp) / "run-config.toml"
        overrides.write_text(_toml_table(run_config))
        env = {**os.environ, "FLWR_HOME": str(_flower_home(Path(tmp) / "home", superlink, root_certificates))}
        started = _flwr(["run", str(app_dir), CONNECTION, "--run-config", str(overrides), "--format", "json"], env)
        run_id = str(started["run-id"])
        try:
            subprocess.run(
                [_flwr_executable(), "log", run_id, CONNECTION, "--stream"],
                env=env,
                stdout=None if stream else subprocess.DEVNULL,
                check=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired:
            subprocess.run([_flwr_executable(), "stop", run_id, CONNECTION], env=env, capture_output=True)
            raise TimeoutError(f"Flower run {run_id} did not finish within {timeout} s; it was stopped") from None
        (run,) = _flwr(["list", CONNECTION, "--run-id", run_id, "--format", "json"], env)["runs"]
    if run["status"] != "finished:completed":
        raise RuntimeError(f"Flower run {run_id} ended {run['status']}: {run['status-details']}")
    return Path(config.output_dir)


def _flower_home(home: Path, superlink: str, root_certificates: str | Path | None) -> Path:
    """A Flower home whose ``config.toml`` has one SuperLink connection, :data:`CONNECTION`."""
    connection: dict[str, Any] = {"address": superlink}
    if root_certificates is None:
        connection["insecure"] = True
    else:
        connection["root-certificates"] = str(Path(root_certificates).absolute())
    home.mkdir(parents=True)
    text = f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n' + _toml_table(connection)
    (home / "config.toml").write_text(text)
    return home


def _flwr(args: Sequence[str], env: Mapping[str, str]) -> dict[str, Any]:
    """Run a ``flwr`` command with ``--format json``; its JSON output, or a RuntimeError with its error."""
    done = subprocess.run([_flwr_executable(), *args], env=env, capture_output=True, text=True)
    try:
        output = json.loads(done.stdout)
    except json.JSONDecodeError:
        output = {"success": False, "error-message": (done.stdout + done.stderr).strip()}
    if done.returncode != 0 or not output.get("success"):
        raise RuntimeError(f"flwr {args[0]} failed: {output.get('error-message', output)}")
    return output


def _flwr_executable() -> str:
    """The ``flwr`` command of this Python environment (or the first on PATH)."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    executable = shutil.which("flwr", path=path)
    if executable is None:
        raise FileNotFoundError("the `flwr` command was not found; install flwr (a fedlora dependency)")
    return executable


def _toml_table(values: Mapping[str, Any]) -> str:
    return "".join(f"{key} = {toml_value(value)}\n" for key, value in values.items())
