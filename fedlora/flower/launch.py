"""Run fedlora on Flower's deployment engine: :func:`run_flower` submits a run to a SuperLink (what
``fedlora train --engine flower --superlink HOST:PORT`` calls), :func:`local_federation` starts a SuperLink and one
SuperNode per client on this machine (what ``fedlora train --engine flower`` alone uses; :func:`start_superlink`
starts its SuperLink, or one running Flower's simulation runtime), and :func:`write_app` writes the Flower app
directory ``flwr run`` takes.

The app directory holds only a ``pyproject.toml``: its components point at the installed
:mod:`fedlora.flower.server_app` and :mod:`fedlora.flower.client_app`, so every machine needs fedlora installed
(start the SuperLink with ``--disable-runtime-dependency-installation``). ``python -m fedlora.flower DIR`` writes
it for use with ``flwr run DIR``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from fedlora.federated.config import RunConfig
from fedlora.federated.rundir.opening import default_output_dir
from fedlora.flower.config import FlowerSettings, app_run_config, to_run_config, toml_value
from fedlora.flower.node import NUM_PARTITIONS, PARTITION_ID, STATE_DIR

CONNECTION = "fedlora"


class FlowerRunError(RuntimeError):
    """A Flower run ended without completing (its ServerApp raised, or it was stopped); the run directory holds
    the rounds it committed."""


_APP_PYPROJECT = """\
# The fedlora Flower app: `flwr run <this directory> <superlink connection> --run-config ...`.
# Every fedlora setting is a key, named as in `fedlora train --set`, e.g. --run-config "rounds=3 client.local_lr=0.01";
# the kebab-case keys are fedlora.flower.config.FlowerSettings (SuperNodes to wait for, timeouts, resume).
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
    federation_config: Mapping[str, Any] | None = None,
) -> Path:
    """Run ``config`` on the SuperNodes of the SuperLink at ``superlink`` (``host:port``); returns the run directory.

    The ServerApp runs on the SuperLink's machine and checks and writes ``config.output_dir`` there (a fresh
    timestamped directory if unset; with ``settings.resume`` the run to continue; a relative path is taken from the
    ServerApp's working directory), so call this on that machine to read the results; nothing here checks it. Without ``root_certificates`` the connection is insecure (no TLS). ``stream`` prints the run's log;
    after ``timeout`` seconds (or on Ctrl-C) the run is stopped and ``TimeoutError`` (``KeyboardInterrupt``)
    raised. A run that fails raises :class:`FlowerRunError` with Flower's reason. ``federation_config`` is passed
    as ``flwr run --federation-config`` (a simulation SuperLink's options, e.g. ``{"num-supernodes": 100}``).
    """
    settings = settings or FlowerSettings()
    if config.output_dir is None and not settings.resume:
        config = replace(config, output_dir=str(default_output_dir(config)))
    run_config = to_run_config(config, settings)
    with tempfile.TemporaryDirectory(prefix="fedlora-flower-") as tmp:
        app_dir = write_app(Path(tmp) / "app")
        overrides = Path(tmp) / "run-config.toml"
        overrides.write_text(_toml_table(run_config))
        env = {**os.environ, "FLWR_HOME": str(_flower_home(Path(tmp) / "home", superlink, root_certificates))}
        federation = [f"{key}={toml_value(value)}" for key, value in (federation_config or {}).items()]
        federation_args = ["--federation-config", " ".join(federation)] if federation else []
        command = ["run", str(app_dir), CONNECTION, "--run-config", str(overrides), *federation_args]
        started = _flwr([*command, "--format", "json"], env)
        run_id = str(started["run-id"])
        try:
            subprocess.run(
                [_flwr_executable(), "log", run_id, CONNECTION, "--stream"],
                env=env,
                stdout=None if stream else subprocess.DEVNULL,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired:
            subprocess.run([_flwr_executable(), "stop", run_id, CONNECTION], env=env, capture_output=True)
            raise TimeoutError(f"Flower run {run_id} did not finish within {timeout} s; it was stopped") from None
        except KeyboardInterrupt:  # Ctrl-C stops the run too, not only the log stream
            subprocess.run([_flwr_executable(), "stop", run_id, CONNECTION], env=env, capture_output=True)
            raise
        (run,) = _flwr(["list", CONNECTION, "--run-id", run_id, "--format", "json"], env)["runs"]
    if run["status"] != "finished:completed":
        raise FlowerRunError(f"Flower run {run_id} ended {run['status']}: {run['status-details']}")
    return Path(config.output_dir)


@contextlib.contextmanager
def local_federation(config: RunConfig, *, stream: bool = True, startup_timeout: float = 120.0) -> Iterator[str]:
    """A SuperLink and one SuperNode per client (partition N of ``data.num_clients``) on 127.0.0.1, on free ports,
    each a process of its own; yields the SuperLink's address. The nodes keep their clients' states in
    ``<output_dir>/nodes/``, so a resumed run finds them. On leaving (a finished run, an error, Ctrl-C) every
    process they started is stopped: SIGTERM to their process group, SIGKILL after a grace period. Their logs
    (``superlink.log``, ``supernode-N.log``) are printed when the block fails, unless ``stream`` is off."""
    if config.data.num_clients is None:
        raise ValueError("data.num_clients (--num-clients): --engine flower starts one SuperNode per client")
    with tempfile.TemporaryDirectory(prefix="fedlora-flower-") as tmp, ProcessGroup(Path(tmp)) as processes:
        address = start_superlink(processes, timeout=startup_timeout)
        state_dir = Path(str(config.output_dir)).absolute() / "nodes"
        count = config.data.num_clients
        for index in range(count):
            node_config = f"{PARTITION_ID}={index} {NUM_PARTITIONS}={count} {STATE_DIR}={json.dumps(str(state_dir))}"
            args = ["flower-supernode", "--insecure", "--superlink", address, "--port", str(_free_port())]
            processes.start(f"supernode-{index}", [*args, "--node-config", node_config])
        try:
            yield address
        except BaseException:
            if stream:
                print(processes.tail(), file=sys.stderr)
            raise


def start_superlink(processes: ProcessGroup, *, simulation: bool = False, timeout: float = 120.0) -> str:
    """Start an insecure SuperLink on a free port of 127.0.0.1 in ``processes``; its address, once it listens. With
    ``simulation`` it runs Flower's simulation runtime: ``run_flower(..., federation_config={"num-supernodes": N})``
    then runs the clients as N virtual SuperNodes in a pool of Ray worker processes (``pip install
    'flwr[simulation]'``), each worker serving many nodes' messages."""
    port = _free_port()
    command = ["flower-superlink", "--insecure", "--port", str(port), "--disable-runtime-dependency-installation"]
    superlink = processes.start("superlink", [*command, *(["--simulation"] if simulation else [])])
    _wait_for_port(port, superlink, timeout)
    return f"127.0.0.1:{port}"


class ProcessGroup:
    """Processes started in one process group of their own (so Ctrl-C at the terminal reaches only the caller,
    which stops them all) with logs and Flower homes in ``directory``."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.processes: list[subprocess.Popen] = []

    def __enter__(self) -> ProcessGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, name: str, command: Sequence[str]) -> subprocess.Popen:
        """Start ``command`` (a script of this Python environment) with its own Flower home; output to ``<name>.log``."""
        group = self.processes[0].pid if self.processes else 0
        env = {
            **os.environ,
            "FLWR_HOME": str(self.directory / f"{name}-home"),
            "FLWR_TELEMETRY_ENABLED": "0",
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        }
        executable = shutil.which(command[0], path=env["PATH"]) or command[0]
        with (self.directory / f"{name}.log").open("w") as log:
            process = subprocess.Popen(
                [executable, *command[1:]],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=lambda: os.setpgid(0, group),  # the first one leads the group
            )
        self.processes.append(process)
        return process

    def stop(self, grace: float = 10.0) -> None:
        if not self.processes:
            return
        group = self.processes[0].pid
        _signal_group(group, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for process in self.processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
        _signal_group(group, signal.SIGKILL)  # whatever is left, their children included
        for process in self.processes:
            process.wait()

    def tail(self, lines: int = 30) -> str:
        logs = sorted(self.directory.glob("*.log"))
        return "\n".join(f"--- {log.name}\n" + "\n".join(log.read_text().splitlines()[-lines:]) for log in logs)


def _signal_group(group: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(group, sig)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, process: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[0]} exited with status {process.returncode} before it listened")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"the SuperLink did not listen on port {port} within {timeout:.0f} s")


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
