"""The Flower app (fedlora.flower).

``fedlora train --engine flower`` (a real SuperLink and two SuperNodes, separate processes on 127.0.0.1) trains 2
rounds of fedlora-opt and ends with the in-process engine's global adapter; ``kill -9`` of a SuperNode mid-round
and of the whole server side, then ``--resume``, ends with the uninterrupted Flower run. The same ServerApp and
ClientApp also run over an in-memory grid (messages serialised as on the wire) for the quicker checks: only shared
tensors travel, the DP mechanisms, failing and lost nodes, resume, a node with its own private data file,
configuration round trips.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import Context, Error, Message, MessageType, RecordDict
from flwr.cli.config_utils import load_and_validate
from flwr.common.config import flatten_dict, parse_config_args
from flwr.common.constant import ErrorCode
from flwr.supercore.task_identity import TaskIdentity
from safetensors.torch import load_file

from fedlora.cli import main
from fedlora.data.samples import DOLLY_SAMPLE
from fedlora.federated import FederatedClient, RunConfig, build_config, train
from fedlora.federated.build import build_client
from fedlora.federated.report import GLOBAL_MODEL
from fedlora.federated.rundir.storage import RunDir
from fedlora.flower import FlowerSettings, write_app
from fedlora.flower.client_app import app as client_app
from fedlora.flower.config import app_run_config, from_run_config, to_run_config
from fedlora.flower.launch import ProcessGroup, run_flower, start_superlink
from fedlora.flower.node import load_node
from fedlora.flower.server_app import serve
from tests.tiny import save_tiny_model

FLOWER_TIMEOUT = 360  # seconds the whole Flower run may take before it is stopped (and the test fails)
TOLERANCE = {"rtol": 1e-5, "atol": 1e-6}  # SuperNodes run torch single-threaded, the reference does not
PARTITIONS = [{"partition-id": 0, "num-partitions": 2}, {"partition-id": 1, "num-partitions": 2}]


# ------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """The tiny Llama and its tokenizer, saved where every process can load them."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    """The first 48 rows of the packaged Dolly sample."""
    path = tmp_path_factory.mktemp("data") / "dolly48.jsonl"
    path.write_text("".join(DOLLY_SAMPLE.read_text().splitlines(keepends=True)[:48]))
    return path


TINY = [  # 2 clients (IID halves of the data file), 2 rounds of one local and one global step, evaluated after round 2
    "data.partition=iid",
    "data.num_clients=2",
    "data.min_examples=8",
    "data.max_length=48",
    "data.global_test_size=4",
    "adapter.r=4",
    "client.batch_size=4",
    "client.local_steps=1",
    "client.global_steps=1",
    "rounds=2",
    "eval.every=2",
    "eval.rouge_examples=0",
]


def tiny_config(model_dir: Path, data_file: Path, output_dir: Path, *overrides: str) -> RunConfig:
    """The :data:`TINY` run of the tiny model on the data file."""
    where = [f"model.name={model_dir}", f"data.path={data_file}", f"output_dir={output_dir}"]
    return build_config({}, [*where, *TINY, *overrides])


@pytest.fixture
def make_config(model_dir, data_file, tmp_path):
    return lambda name, *overrides: tiny_config(model_dir, data_file, tmp_path / name, *overrides)


@pytest.fixture(scope="module")
def reference(model_dir, data_file, tmp_path_factory) -> Path:
    """The in-process engine's run of the tiny configuration."""
    return train(tiny_config(model_dir, data_file, tmp_path_factory.mktemp("reference") / "run"), progress=False)


@pytest.fixture(scope="module")
def roles(model_dir, data_file, tmp_path_factory) -> dict[str, list[str]]:
    """The adapter's tensor names by role (shared: the directions, personal: the magnitudes)."""
    return build_client(tiny_config(model_dir, data_file, tmp_path_factory.mktemp("unused"))).names


def adapter_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "global_adapter/adapter_model.safetensors")


def assert_same_run(got: Path, expected: Path, tolerance: Mapping[str, float] = TOLERANCE) -> None:
    """The same global adapter (to a tight tolerance) and the same per-client evaluation losses."""
    got_tensors, expected_tensors = adapter_tensors(got), adapter_tensors(expected)
    assert set(got_tensors) == set(expected_tensors)
    for name, value in expected_tensors.items():
        torch.testing.assert_close(got_tensors[name], value, **tolerance, msg=name)
    got_rows, expected_rows = eval_rows(got), eval_rows(expected)
    assert (
        set(got_rows)
        == set(expected_rows)
        == {("global", GLOBAL_MODEL), ("local", "client_0"), ("local", "client_1")}  # the global model: once
    )
    for key, row in expected_rows.items():
        assert got_rows[key]["loss"] == pytest.approx(row["loss"], rel=1e-5)
    assert not (got / "clients").exists()  # client state stays on the nodes


def eval_rows(run_dir: Path) -> dict[tuple[str, str], dict[str, Any]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {(row["split"], row["client"]): row for row in rows if row["split"] != "train" and "client" in row}


def assert_only_shared_tensors_on_the_wire(wire: Path, roles: Mapping[str, list[str]], rounds: int = 2) -> None:
    """A node's wire log: the expected messages, each tensor record holding exactly the shared tensors, and no
    personal or frozen tensor name anywhere."""
    entries = [json.loads(line) for line in wire.read_text().splitlines()]
    expected = ["query", "evaluate"] + ["train"] * rounds + ["evaluate"]  # round 0 is evaluated first
    assert [(e["type"], e["direction"]) for e in entries] == [(t, d) for t in expected for d in ("in", "out")]
    private = set(roles["personal"]) | set(roles["frozen"])
    for entry in entries:
        assert "error" not in entry, entry
        records = entry["records"]
        assert set(records) <= {"arrays", "config", "metrics"}
        if entry["type"] == "train" or (entry["type"] == "evaluate" and entry["direction"] == "in"):
            assert records["arrays"] == sorted(roles["shared"])
        else:
            assert "arrays" not in records
        assert not private & {key for keys in records.values() for key in keys}


# ------------------------------------------------------------------------------------------------- in-memory grid


class LocalGrid:
    """A Flower Grid whose nodes run the fedlora ClientApp in this process, each with its own ``context.state``.

    Every message is deflated to bytes and inflated again on its way, as between processes.
    """

    def __init__(
        self, run_config: Mapping[str, Any], node_configs: list[dict[str, Any]], lost: Collection[int] = ()
    ) -> None:
        self.lost = {100 + index for index in lost}  # nodes that answer the query, then never reply (they died)
        self.contexts = {
            node_id: Context(
                run_id=1, node_id=node_id, node_config=cfg, state=RecordDict(), run_config=dict(run_config)
            )
            for node_id, cfg in zip(itertools.count(100), node_configs)
        }
        self.replies: dict[str, Message] = {}

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def push_messages(self, messages) -> list[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = msg.object_id
            ids.append(msg.metadata.message_id)
            if msg.metadata.dst_node_id in self.lost and msg.metadata.message_type != MessageType.QUERY:
                continue
            try:
                reply = client_app(_through_the_wire(msg), self.contexts[msg.metadata.dst_node_id])
            except Exception as error:  # a SuperNode answers for a ClientApp that raised
                reason = f"{type(error).__name__}: {error}"
                reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg)
            reply = _through_the_wire(reply)
            reply.metadata.__dict__["_message_id"] = reply.object_id
            self.replies[msg.metadata.message_id] = reply
        return ids

    def pull_messages(self, message_ids) -> list[Message]:
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]

    def send_and_receive(self, messages, *, timeout: float | None = None) -> list[Message]:
        return self.pull_messages(self.push_messages(messages))


def _through_the_wire(msg: Message) -> Message:
    children = {child.object_id: child for child in msg.children.values()} if msg.children else None
    copy = Message.inflate(msg.deflate(), children=children)
    copy.metadata.__dict__.update(msg.metadata.__dict__)
    return copy


@pytest.fixture
def serve_locally(monkeypatch, tmp_path):
    """``serve_locally(config, settings, node_configs)`` runs the Flower ServerApp over a :class:`LocalGrid`."""
    for name in ("_run_id", "_node_id", "_task_id"):  # the identity of the process that creates messages
        monkeypatch.setattr(TaskIdentity, name, 1)
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flower-home"))  # where the nodes keep their states

    def run(
        config: RunConfig, settings: FlowerSettings, node_configs: list[dict[str, Any]], lost: Collection[int] = ()
    ) -> Path:
        run_config = to_run_config(config, settings)
        return serve(LocalGrid(run_config, node_configs, lost), *from_run_config(run_config))

    return run


def test_in_memory_grid_gives_the_in_process_run(reference, make_config, serve_locally, roles, tmp_path):
    wires = [tmp_path / f"wire-{i}.jsonl" for i in range(2)]
    nodes = [{**node, "wire-log": str(wire)} for node, wire in zip(PARTITIONS, wires, strict=True)]
    assert_same_run(serve_locally(make_config("flower"), FlowerSettings(), nodes), reference)
    for wire in wires:
        assert_only_shared_tensors_on_the_wire(wire, roles)


def scored(run_dir: Path) -> dict[int, dict[str, float]]:
    """Round -> the local loss of each client scored in it."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    by_round: dict[int, dict[str, float]] = {}
    for row in rows:
        if row["split"] == "local" and "client" in row:
            by_round.setdefault(row["round"], {})[row["client"]] = row["loss"]
    return by_round


def test_both_engines_score_the_same_sample_of_clients(make_config, serve_locally):
    """One client of two trains a round and one is scored (every round, the same): the Flower nodes, reading their
    states from their disks, and the in-process engine, reading them from the run directory, agree."""
    overrides = ("eval.clients=1", "eval.every=1", "server.fraction=0.5", "rounds=3")
    expected = train(make_config("in-process", *overrides), progress=False)
    got = serve_locally(make_config("flower", *overrides), FlowerSettings(), PARTITIONS)
    assert sorted(scored(got)) == sorted(scored(expected)) == [0, 1, 2, 3]
    for round_, losses in scored(expected).items():
        assert len(losses) == 1 and scored(got)[round_] == pytest.approx(losses, rel=1e-5)
    assert len({client for losses in scored(expected).values() for client in losses}) == 1
    got_tensors, expected_tensors = adapter_tensors(got), adapter_tensors(expected)
    for name, value in expected_tensors.items():
        torch.testing.assert_close(got_tensors[name], value, **TOLERANCE, msg=name)


@pytest.mark.parametrize(
    "privacy",
    [
        ["privacy.mechanism=server-fixed", "privacy.noise_multiplier=0"],
        ["privacy.mechanism=client-fixed", "privacy.noise_multiplier=0"],
        ["privacy.mechanism=local", "privacy.sensitivity=0"],
    ],
    ids=lambda privacy: privacy[0].partition("=")[2],
)
def test_dp_clips_the_update_of_the_shared_tensors(privacy, make_config, serve_locally, roles):
    """With the noise switched off, every Flower DP mechanism bounds the change of the global directions by the
    clipping norm (the update of each client is clipped to it, so their average is too); magnitudes are untouched."""
    config = make_config("dp", "rounds=1", "privacy.clip_norm=1e-3", *privacy)
    initial = build_client(config).snapshot(roles["shared"] + roles["personal"])
    run_dir = serve_locally(config, FlowerSettings(), PARTITIONS)
    final = adapter_tensors(run_dir)
    initial = {name.replace(".default", ""): value for name, value in initial.items()}
    shared = [name.replace(".default", "") for name in roles["shared"]]
    update = torch.cat([(final[n] - initial[n]).flatten() for n in shared])
    assert 0 < update.norm() <= 1e-3 * (1 + 1e-4)
    assert all(
        torch.equal(final[n.replace(".default", "")], initial[n.replace(".default", "")]) for n in roles["personal"]
    )


def test_privacy_is_one_section_for_both_engines(make_config):
    """Flower's central DP needs FedAvg; its mechanisms run only on the Flower engine (checked before anything
    loads); fedlora's DP-FedAvg runs on either."""
    with pytest.raises(ValueError, match="needs server.optimizer=fedavg"):
        make_config("dp", "server.optimizer=fedadam", "privacy.mechanism=client-fixed", "privacy.clip_norm=1")
    with pytest.raises(ValueError, match="privacy.mechanism=local is Flower's; it needs --engine flower"):
        train(make_config("dp", "privacy.mechanism=local", "privacy.clip_norm=1"), progress=False)


@pytest.fixture(scope="module")
def without_client_1(model_dir, data_file, tmp_path_factory) -> Path:
    """The in-process engine's run of the tiny configuration where client_1's fit raises in every round."""
    fit = FederatedClient.fit

    def failing(self, state, ins):
        if state.client_id == "client_1":
            raise RuntimeError("injected failure")
        return fit(self, state, ins)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(FederatedClient, "fit", failing)
        return train(tiny_config(model_dir, data_file, tmp_path_factory.mktemp("without") / "run"), progress=False)


@pytest.fixture(scope="module")
def other_model_dir(tmp_path_factory) -> Path:
    """A tiny Llama with a third layer: a node given it has adapter tensors the server does not send."""
    return save_tiny_model(tmp_path_factory.mktemp("other-llama"), num_hidden_layers=3)


@pytest.mark.fault
@pytest.mark.parametrize("fault", ["raises", "lost"])
def test_a_failing_or_lost_node_is_left_out(fault, without_client_1, other_model_dir, make_config, serve_locally):
    """Node 1 fails every round (its ClientApp raises: it was started with another model) or is lost after the
    query (never replies): with server.min_clients=1 each round aggregates node 0 alone, as the in-process engine
    does when client_1's fit raises, and the failure is in metrics.jsonl. With min_clients=2 the round fails."""
    nodes = [
        PARTITIONS[0],
        {**PARTITIONS[1], "model-path": str(other_model_dir)} if fault == "raises" else PARTITIONS[1],
    ]
    lost = [1] if fault == "lost" else []
    settings = FlowerSettings(round_timeout=1.0)
    run_dir = serve_locally(make_config(fault), settings, nodes, lost)
    got, expected = adapter_tensors(run_dir), adapter_tensors(without_client_1)
    assert set(got) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, **TOLERANCE, msg=name)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    failed = [row for row in rows if row.get("status") == "failed"]
    assert [(row["round"], row["client"]) for row in failed] == [(1, "client_1"), (2, "client_1")]
    reason = "not this strategy's shared tensors" if fault == "raises" else "no reply"
    assert all(reason in row["reason"] for row in failed)
    with pytest.raises(RuntimeError, match=r"round 1: 1 of 2 sampled client\(s\) .* client_1"):
        serve_locally(make_config(f"{fault}-strict", "server.min_clients=2"), settings, nodes, lost)


def test_node_with_its_own_data_file(make_config, data_file, tmp_path):
    config = make_config("unused")
    private = tmp_path / "alice.jsonl"
    private.write_text("".join(data_file.read_text().splitlines(keepends=True)[:20]))
    node = load_node(config, {"data-path": str(private)})
    assert node.data.client_id == "alice" and node.global_test is None
    assert len(node.data.train) + len(node.data.test) == 20
    assert load_node(config, {"data-path": str(private), "client-id": "hospital-a"}).data.client_id == "hospital-a"
    partition = load_node(config, {"partition-id": 1, "num-partitions": 2})
    assert partition.data.client_id == "client_1" and partition.global_test is not None
    with pytest.raises(ValueError, match="num-partitions=3"):
        load_node(config, {"partition-id": 0, "num-partitions": 3})
    with pytest.raises(ValueError, match="needs --node-config"):
        load_node(config, {})


def test_a_remote_superlink_checks_the_run_directory_on_its_machine(monkeypatch, tmp_path):
    """With ``--superlink`` the run directory (and the device) lie on the SuperLink's machine: the launcher sends the
    path as given and checks neither; a local federation refuses the same non-empty directory before starting."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs/taken").mkdir(parents=True)
    (tmp_path / "runs/taken/file").write_text("not empty here")
    sent = []
    monkeypatch.setattr("fedlora.flower.run_flower", lambda config, superlink, **kwargs: sent.append(config))
    monkeypatch.setattr("fedlora.flower.local_federation", lambda *args, **kwargs: pytest.fail("started"))
    argv = ["train", "--engine", "flower", "--output-dir", "runs/taken", "--no-progress"]
    assert main([*argv, "--superlink", "superlink.example:9093", "--device", "cuda:99"]) == 0
    assert [config.output_dir for config in sent] == ["runs/taken"]
    with pytest.raises(SystemExit, match="2"):
        main(argv)


def test_run_config_round_trip_and_app(make_config, tmp_path):
    config = make_config("run", "privacy.mechanism=local", "privacy.clip_norm=1", "privacy.epsilon=2")
    settings = FlowerSettings(min_nodes=3, resume=True)
    run_config = to_run_config(config, settings)
    assert set(run_config) == set(app_run_config())  # every key can be overridden with `flwr run --run-config`
    assert from_run_config(run_config) == (config, settings)
    changed, _ = from_run_config({**run_config, "rounds": 5, "client.local_lr": "0.5", "client.max_grad_norm": "none"})
    assert (changed.rounds, changed.client.local_lr, changed.client.max_grad_norm) == (5, 0.5, None)
    assert from_run_config({**app_run_config(), "seed": 5})[0].data.seed == 5  # the data split follows the seed
    flat = parse_config_args(['rounds=3 client.local_lr=0.01 adapter.tensor_roles=\'{"A.magnitude": "shared"}\''])
    changed, _ = from_run_config({**run_config, **flat})  # `flwr run --run-config` keys, as Flower parses them
    assert (changed.rounds, changed.client.local_lr, changed.adapter.tensor_roles) == (
        3,
        0.01,
        {"A.magnitude": "shared"},
    )
    assert FlowerSettings.from_run_config({"resume": "true", "node-timeout": 5}) == FlowerSettings(
        node_timeout=5.0, resume=True
    )
    with pytest.raises(ValueError, match="min-nodes must be at least 0; got -1"):
        FlowerSettings.from_run_config({"min-nodes": "-1"})
    with pytest.raises(ValueError, match="resume must be a bool"):
        FlowerSettings.from_run_config({"resume": "maybe"})
    pyproject, warnings = load_and_validate(write_app(tmp_path / "app") / "pyproject.toml")
    assert not warnings
    assert flatten_dict(pyproject["tool"]["flwr"]["app"]["config"]) == app_run_config()  # as Flower reads it


def test_a_resumed_flower_run_continues_from_the_checkpoint(reference, make_config, serve_locally, tmp_path):
    """Round 1, then ``resume`` with new SuperNode processes (fresh ``context.state``; the nodes read their clients'
    states from disk): the in-process run's adapter."""
    nodes = [{**node, "state-dir": str(tmp_path / "nodes")} for node in PARTITIONS]
    run_dir = serve_locally(make_config("resumed", "rounds=1"), FlowerSettings(), nodes)
    assert json.loads((run_dir / "checkpoint/state.json").read_text())["client_rounds"] == {
        "client_0": 1,
        "client_1": 1,
    }
    assert serve_locally(make_config("resumed"), FlowerSettings(resume=True), nodes) == run_dir
    assert_same_run(run_dir, reference)
    assert sorted(p.name for p in (tmp_path / "nodes").glob("*/client_0/*")) == ["round-1", "round-2"]


# ------------------------------------------------------------------------------------------------- real processes
#
# `fedlora train --engine flower` starts a SuperLink and one SuperNode per client as processes of their own.


def flower_argv(model_dir: Path, data_file: Path, out: Path) -> list[str]:
    """``fedlora train --engine flower`` of the tiny configuration, with server.min_clients=2 (a round that loses a
    node fails, and is retried on resume)."""
    where = ["--model", str(model_dir), "--data", str(data_file), "--output-dir", str(out)]
    settings = ["--set", *TINY, "server.min_clients=2", "round-timeout=120"]
    return ["train", "--engine", "flower", *where, "--no-progress", *settings]


def fedlora_env() -> dict[str, str]:
    return {
        **os.environ,
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.2",
        "OMP_NUM_THREADS": "1",  # both nodes train at once
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
    }


@pytest.fixture(scope="module")
def flower_run(model_dir, data_file, tmp_path_factory) -> Path:
    """An uninterrupted ``fedlora train --engine flower`` run of the tiny configuration."""
    out = tmp_path_factory.mktemp("flower") / "run"
    with pytest.MonkeyPatch.context() as patch:
        for key, value in fedlora_env().items():
            patch.setenv(key, value)
        assert main(flower_argv(model_dir, data_file, out)) == 0
    return out


def test_engine_flower_gives_the_in_process_run(flower_run, reference):
    assert_same_run(flower_run, reference)  # directions trained and averaged; magnitudes at their initial values
    assert sorted(p.name for p in flower_run.glob("nodes/*/*/round-*")) == sorted(["round-1", "round-2"] * 2)


def test_flower_simulation_gives_the_in_process_run(reference, make_config, tmp_path):
    """Flower's simulation runtime (virtual SuperNodes whose messages Ray worker processes serve, each building the
    model and data once per run) gives the in-process run."""
    pytest.importorskip("ray")  # flwr[simulation], in the dev extra
    config, logs = make_config("simulation"), tmp_path / "flower"
    logs.mkdir()
    with pytest.MonkeyPatch.context() as patch, ProcessGroup(logs) as group:
        for key, value in fedlora_env().items():
            patch.setenv(key, value)
        superlink = start_superlink(group, simulation=True)
        nodes = {"num-supernodes": 2}
        run_dir = run_flower(config, superlink, stream=False, timeout=FLOWER_TIMEOUT, federation_config=nodes)
    assert_same_run(run_dir, reference)


def test_a_process_serving_many_nodes_builds_the_model_and_data_once_per_run(make_config):
    """A node is its partition of the data the process built for the run, on the model it built for the run; a
    run with other settings builds its own."""
    config = make_config("many-nodes")
    first, second = (load_node(config, partition) for partition in PARTITIONS)
    assert first.app is second.app and first.data.source is second.data.source
    assert (first.data.client_id, second.data.client_id) == ("client_0", "client_1")
    assert load_node(config, PARTITIONS[0]).data.train_rows.tolist() == first.data.train_rows.tolist()
    other = load_node(make_config("many-nodes", "data.seed=5"), PARTITIONS[0])
    assert other.app is not first.app and other.data.source is not first.data.source


def processes() -> dict[int, tuple[int, str]]:
    """Every process of this machine: pid -> (parent pid, command line)."""
    found = {}
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError, ValueError, IndexError):
            parent = int((entry / "stat").read_text().rpartition(")")[2].split()[1])
            found[int(entry.name)] = (parent, (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode())
    return found


def descendants(pid: int) -> list[int]:
    table, found, frontier = processes(), [], [pid]
    while frontier:
        children = [child for child, (parent, _) in table.items() if parent in frontier]
        found += children
        frontier = children
    return found


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and every process under it."""
    for victim in [pid, *descendants(pid)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim, signal.SIGKILL)


def alive(pid: int) -> bool:
    with contextlib.suppress(OSError):
        return (Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]) != "Z"
    return False


def wait_until(condition, run: subprocess.Popen | None, timeout: float = FLOWER_TIMEOUT) -> None:
    """Wait for ``condition``; fail if ``run`` (unless None) exits first."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert run is None or run.poll() is None, f"fedlora exited with {run.returncode} before the kill"
        assert time.monotonic() < deadline, "timed out waiting for the moment to kill"
        time.sleep(0.05)


def committed(out: Path) -> int:
    with contextlib.suppress(OSError, ValueError):
        return json.loads((out / "checkpoint/state.json").read_text())["round"]
    return 0


@pytest.mark.fault
def test_kill_9_of_a_supernode_and_of_the_server_then_resume(flower_run, model_dir, data_file, tmp_path):
    """``kill -9`` of SuperNode 1 while round 2 runs, then, once node 0 has trained round 2 (a state the server
    never committed), of the whole server side (fedlora, the SuperLink, its ServerApp and node 0). ``--resume``
    starts new nodes, which continue from their clients' round-1 states on disk: the uninterrupted run's adapter,
    metrics and node states."""
    out = tmp_path / "run"
    command = [sys.executable, "-m", "fedlora.cli"]
    log = (tmp_path / "fedlora.log").open("w")
    started = {"env": fedlora_env(), "stdout": log, "stderr": subprocess.STDOUT, "start_new_session": True}
    run = subprocess.Popen([*command, *flower_argv(model_dir, data_file, out)], **started)
    try:
        wait_until(lambda: committed(out) == 1, run)
        (node_1,) = [pid for pid in descendants(run.pid) if "partition-id=1" in processes()[pid][1]]
        kill_tree(node_1)
        wait_until(lambda: run.poll() is not None or any(out.glob("nodes/*/client_0/round-2")), run=None)
        kill_tree(run.pid)
        run.wait()
        assert committed(out) == 1
        resume = ["train", "--engine", "flower", "--output-dir", str(out), "--resume", "--no-progress"]
        run = subprocess.Popen([*command, *resume, "--set", "round-timeout=120"], **started)
        assert run.wait(timeout=FLOWER_TIMEOUT) == 0
    finally:
        kill_tree(run.pid)
        log.close()
        print((tmp_path / "fedlora.log").read_text()[-6000:])
    assert_same_run(out, flower_run, tolerance={"rtol": 0, "atol": 0})
    assert RunDir(out).read_metrics() == RunDir(flower_run).read_metrics()


def test_the_launcher_stops_what_it_started(tmp_path):
    """On an error (as on Ctrl-C or a finished run) every process started, and every process they started, ends."""
    with pytest.raises(RuntimeError, match="the run failed"), ProcessGroup(tmp_path) as started:
        started.start("parent", ["bash", "-c", "sleep 600 & sleep 600"])
        started.start("other", ["sleep", "600"])
        time.sleep(0.5)
        pids = [child for process in started.processes for child in [process.pid, *descendants(process.pid)]]
        assert len(pids) >= 3
        raise RuntimeError("the run failed")
    deadline = time.monotonic() + 5  # SIGKILL is delivered at once, but a loaded machine may take a moment to end them
    while [pid for pid in pids if alive(pid)] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [pid for pid in pids if alive(pid)]
