"""Run directories survive faults: ``kill -9`` anywhere, damaged files, an unusable output directory, a full disk.

Every run here is ``fedlora train`` (the CLI's ``main``) on a tiny random Llama saved to disk: 3 clients, 2 of
them sampled per round, FedAdam on the server, 4 rounds. The reference is the same run uninterrupted; a run that
is killed, damaged or fails to write and is then resumed must end with exactly its tensors and metrics.

One killed run is the ``fedlora`` command in its own interpreter; the others are forks of the test process
(``multiprocessing``), so they start without the 20 s or more that importing torch, transformers and PEFT takes in
a fresh interpreter here, and can be killed at exact points inside the commit protocol; SIGKILL gives either no
chance to clean up.
"""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import SafetensorError

from fedlora.cli import main
from fedlora.federated import build
from fedlora.federated.rundir import adapter, storage
from fedlora.federated.rundir.storage import RunDir
from tests.test_cli import write_rows
from tests.test_federated import final_state
from tests.tiny import save_tiny_model

ROUNDS = 4
SETTINGS = [
    "data.max_length=40",
    "data.min_examples=5",
    "adapter.r=2",
    "client.local_steps=1",
    "client.global_steps=1",
    "server.fraction=0.67",
    "server.optimizer=fedadam",
    "server.lr=0.01",
    "eval.every=2",
    "eval.rouge_examples=0",
]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, Path]:
    """The saved tiny model and a 60-row dataset."""
    root = tmp_path_factory.mktemp("inputs")
    return save_tiny_model(root / "model"), write_rows(root / "rows.jsonl", 60)


@pytest.fixture
def train_argv(inputs):
    model, data = inputs

    def argv(out: Path) -> list[str]:
        common = ["--num-clients", "3", "--rounds", str(ROUNDS), "--no-progress", "--set", *SETTINGS]
        return ["train", "--model", str(model), "--data", str(data), "--output-dir", str(out), *common]

    return argv


def resume_argv(out: Path) -> list[str]:
    return ["train", "--output-dir", str(out), "--resume", "--no-progress"]


@pytest.fixture(scope="module")
def reference(inputs, tmp_path_factory) -> Path:
    """The uninterrupted run."""
    out = tmp_path_factory.mktemp("reference") / "run"
    model, data = inputs
    argv = ["train", "--model", str(model), "--data", str(data), "--output-dir", str(out), "--num-clients", "3"]
    assert main([*argv, "--rounds", str(ROUNDS), "--no-progress", "--set", *SETTINGS]) == 0
    return out


def assert_same_run(got: Path, expected: Path) -> None:
    """Equal global adapter, server optimizer state, client personal states (torch.equal) and metrics."""
    got_state, expected_state = final_state(got), final_state(expected)
    assert set(got_state) == set(expected_state)
    assert all(torch.equal(got_state[k], expected_state[k]) for k in expected_state)
    assert RunDir(got).read_metrics() == RunDir(expected).read_metrics()


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def round_in(directory: Path) -> int:
    return json.loads((directory / "state.json").read_text())["round"]


def no_model(monkeypatch) -> None:
    """Fail the test if the run gets as far as loading the model."""

    def load_model(config, name=None):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(build, "load_model", load_model)


def exit_message(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


# ------------------------------------------------------------------------------------------------- kill -9


def _kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _train_until_killed(argv: list[str], point: str) -> None:
    """The forked run: ``main(argv)``, after arming a SIGKILL at ``point`` inside the commit protocol."""
    if point == "pending-checkpoint":  # round 2's checkpoint.pending/ complete: the commit point just passed
        finish = RunDir._finish_commit

        def finish_commit(self):
            if storage._round_in(self.checkpoint_pending) == 2:
                _kill_self()
            finish(self)

        RunDir._finish_commit = finish_commit
    elif point == "between-checkpoint-renames":  # round 3: checkpoint/ renamed to checkpoint.prev/, no checkpoint/
        rename = os.rename

        def killing_rename(src, dst):
            rename(src, dst)
            if (
                Path(dst).name == "checkpoint.prev"
                and storage._round_in(Path(dst).with_name("checkpoint.pending")) == 3
            ):
                _kill_self()

        os.rename = killing_rename
    elif point == "between-client-rotations":  # round 3: the first trained client's state rotated in, not the second
        rotate = storage._rotate

        def killing_rotate(pending, current, prev):
            rotate(pending, current, prev)
            if current.parent.name == "clients" and round_in(current) == 3:
                _kill_self()

        storage._rotate = killing_rotate
    main(argv)


@pytest.mark.fault
@pytest.mark.parametrize(
    "point",
    [
        "after-round-1",  # killed from outside as soon as round 1 has committed
        "mid-round-3",  # killed from outside 0.1 s after round 2 has committed
        "pending-checkpoint",
        "between-checkpoint-renames",
        "between-client-rotations",
    ],
)
def test_kill_9_then_resume_equals_an_uninterrupted_run(point, reference, train_argv, tmp_path):
    out = tmp_path / "run"
    process = multiprocessing.get_context("fork").Process(target=_train_until_killed, args=(train_argv(out), point))
    process.start()
    if point in ("after-round-1", "mid-round-3"):
        committed = 1 if point == "after-round-1" else 2
        deadline = time.monotonic() + 120
        while RunDir(out).committed_round() < committed:
            assert process.is_alive() and time.monotonic() < deadline, f"round {committed} never committed"
            time.sleep(0.005)
        time.sleep(0.1 if point == "mid-round-3" else 0)
        os.kill(process.pid, signal.SIGKILL)
    process.join(120)
    assert process.exitcode == -signal.SIGKILL  # it was killed, not finished
    run_dir = RunDir(out)
    assert run_dir.committed_round() < ROUNDS
    if point == "pending-checkpoint":
        assert round_in(run_dir.checkpoint_pending) == 2
    elif point == "between-checkpoint-renames":
        assert not run_dir.checkpoint.exists() and round_in(run_dir.checkpoint_pending) == 3
    elif point == "between-client-rotations":
        assert len(list(run_dir.clients_pending.iterdir())) == 1

    assert main(resume_argv(out)) == 0
    assert_same_run(out, reference)
    assert not run_dir.checkpoint_pending.exists() and not run_dir.clients_pending.exists()


@pytest.mark.fault
def test_kill_9_of_the_fedlora_command_then_resume_equals_an_uninterrupted_run(reference, train_argv, tmp_path):
    """The issue's acceptance check with a real ``fedlora train`` process (its own interpreter): SIGKILL of its
    process group once round 1 has committed, then the same command with ``--resume``."""
    out = tmp_path / "run"
    command = [sys.executable, "-m", "fedlora.cli", *train_argv(out)]
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}  # sums in torch depend on the thread count
    process = subprocess.Popen(
        command, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 300
        while RunDir(out).committed_round() < 1:
            assert process.poll() is None, process.stderr.read().decode()
            assert time.monotonic() < deadline, "round 1 never committed"
            time.sleep(0.01)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        process.stderr.close()
    assert process.returncode == -signal.SIGKILL
    assert 1 <= RunDir(out).committed_round() < ROUNDS
    assert main(resume_argv(out)) == 0
    assert_same_run(out, reference)


# ------------------------------------------------------------------------------------------------- damaged files


def damage(file: Path, how: str, at: int | None = None) -> None:
    """Truncate ``file`` to half, flip the bits of one byte (at ``at``, default its middle), or delete it."""
    data = file.read_bytes()
    if how == "truncate":
        file.write_bytes(data[: len(data) // 2])
    elif how == "flip":
        i = len(data) // 2 if at is None else at
        file.write_bytes(data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1 :])
    else:
        file.unlink()


def last_trained(run_dir: RunDir, trained: bool) -> str:
    """A client that trained in the last round (``trained``), or one that trained before it but not in it."""
    rounds = json.loads((run_dir.checkpoint / "state.json").read_text())["client_rounds"]
    return next(cid for cid, last in sorted(rounds.items()) if (last == ROUNDS) == trained)


def copy_of(reference: Path, tmp_path: Path) -> RunDir:
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    return RunDir(out)


@pytest.mark.fault
@pytest.mark.parametrize(
    "where, name, how",
    [
        ("checkpoint", "global.safetensors", "truncate"),
        ("checkpoint", "server_optimizer.safetensors", "flip"),
        ("checkpoint", "rng.pt", "delete"),
        ("checkpoint", "state.json", "flip"),
        ("checkpoint", "manifest.json", "delete"),
        ("client", "personal.safetensors", "flip"),
        ("client", "optimizer.pt", "truncate"),
        ("metrics", "metrics.jsonl", "flip"),
    ],
)
def test_a_damaged_last_checkpoint_falls_back_to_the_one_before(where, name, how, reference, tmp_path, caplog):
    run_dir = copy_of(reference, tmp_path)
    if where == "checkpoint":
        damage(file := run_dir.checkpoint / name, how)
    elif where == "client":
        damage(file := run_dir.clients / last_trained(run_dir, True) / name, how)
    else:  # a byte of the last round's rows, after what the checkpoint before it recorded
        before = json.loads((run_dir.checkpoint_prev / "state.json").read_text())["metrics_bytes"]
        damage(file := run_dir.metrics, how, at=(before + run_dir.metrics.stat().st_size) // 2)

    assert main(resume_argv(run_dir.path)) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(str(file) in w for w in warnings), warnings
    assert any(f"falling back to {run_dir.checkpoint_prev} (round {ROUNDS - 1})" in w for w in warnings), warnings
    assert_same_run(run_dir.path, reference)


@pytest.mark.fault
@pytest.mark.parametrize("damaged", ["both checkpoints", "metrics of round 1", "state of an unsampled client"])
def test_no_intact_checkpoint_left_is_an_error_that_changes_nothing(damaged, reference, tmp_path, capsys, monkeypatch):
    run_dir = copy_of(reference, tmp_path)
    if damaged == "both checkpoints":
        files = [run_dir.checkpoint / "global.safetensors", run_dir.checkpoint_prev / "global.safetensors"]
    elif damaged == "metrics of round 1":  # inside what both checkpoints recorded
        files = [run_dir.metrics]
    else:  # its only saved state: the client did not train in the last round, so both checkpoints refer to it
        files = [run_dir.clients / last_trained(run_dir, False) / "personal.safetensors"]
    for file in files:
        damage(file, "flip", at=10)
    before = snapshot(run_dir.path)
    no_model(monkeypatch)

    message = exit_message(resume_argv(run_dir.path), capsys)
    assert f"{run_dir.path} has no intact checkpoint left" in message
    assert all(str(file) in message for file in files), message
    assert snapshot(run_dir.path) == before


# ------------------------------------------------------------------------------------------------- pre-flight


@pytest.mark.parametrize(
    "case, message",
    [
        pytest.param("under a file", "notes.txt is a file, not a directory", marks=pytest.mark.bad_input),
        pytest.param("is a file", "notes.txt is a file, not a directory", marks=pytest.mark.bad_input),
        pytest.param("not writable", "is not writable", marks=pytest.mark.bad_input),
        pytest.param("disk nearly full", "not enough free disk space", marks=pytest.mark.fault),
    ],
)
def test_an_unusable_output_directory_fails_before_the_model_loads(
    case, message, train_argv, tmp_path, capsys, monkeypatch
):
    notes = tmp_path / "notes.txt"
    notes.write_text("keep")
    out = {"under a file": notes / "run", "is a file": notes}.get(case, tmp_path / "runs" / "run")
    if case == "not writable":  # chmod does not stop root, so os.access answers for the file system
        access = os.access
        monkeypatch.setattr(os, "access", lambda path, mode: False if Path(path) == tmp_path else access(path, mode))
    elif case == "disk nearly full":
        monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(free=2**20))
    no_model(monkeypatch)

    assert message in exit_message(train_argv(out), capsys)
    assert snapshot(tmp_path) == {"notes.txt": b"keep"} and not (tmp_path / "runs").exists()


@pytest.mark.fault
def test_too_little_disk_for_the_wrapped_model_fails_before_anything_is_written(
    train_argv, tmp_path, capsys, monkeypatch
):
    # Room for the part of the estimate known before the model loads, not for the adapter's tensors.
    floor = storage.estimate_run_bytes(shared=0, personal=0, adapter=0, clients=3, rounds=ROUNDS)
    disk_usage = shutil.disk_usage

    def small_disk(path):
        return SimpleNamespace(free=floor) if Path(path).is_relative_to(tmp_path) else disk_usage(path)

    monkeypatch.setattr(shutil, "disk_usage", small_disk)
    message = exit_message(train_argv(tmp_path / "run"), capsys)
    assert "not enough free disk space" in message and f"{floor / 2**20:.1f} MiB are free" in message
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------------------------------------- failing writes


# What each writer raises on a full disk (seen on a full tmpfs): Python's writes an OSError, torch.save a
# RuntimeError, safetensors (also under PEFT's save_pretrained) a SafetensorError.
FULL_DISK = {
    "metrics": OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),
    "client state": RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"),
    "checkpoint": SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"),
    "adapter": SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"),
}


def fail_writing(monkeypatch, target: str) -> None:
    """Make round 3's write of ``target`` fail as on a full disk: the writer raises after writing part of it."""
    error = FULL_DISK[target]
    if target == "metrics":
        append = RunDir.append_metrics

        def append_metrics(self, rows):
            rows = list(rows)
            append(self, rows[:1] if rows[0]["round"] == 3 else rows)
            if rows[0]["round"] == 3:
                raise error

        monkeypatch.setattr(RunDir, "append_metrics", append_metrics)
    elif target == "client state":  # run/clients.pending/.<id>.tmp/optimizer.pt
        save = torch.save

        def torch_save(obj, file, *args, **kwargs):
            tmp = Path(file).parent
            if tmp.parent.name == "clients.pending" and RunDir(tmp.parent.parent).committed_round() == 2:
                Path(file).write_bytes(b"PK\x03\x04")
                raise error
            save(obj, file, *args, **kwargs)

        monkeypatch.setattr(torch, "save", torch_save)
    elif target == "checkpoint":  # run/.checkpoint.pending.tmp/global.safetensors
        save_file = storage.save_file

        def safetensors_save_file(tensors, file, *args, **kwargs):
            tmp = Path(file).parent
            if tmp.name == ".checkpoint.pending.tmp" and RunDir(tmp.parent).committed_round() == 2:
                Path(file).write_bytes(bytes(8))
                raise error
            save_file(tensors, file, *args, **kwargs)

        monkeypatch.setattr(storage, "save_file", safetensors_save_file)
    else:  # global_adapter/, published after round 3 committed
        atomic_dir = adapter.atomic_dir

        @contextmanager
        def failing_atomic_dir(path: Path) -> Iterator[Path]:
            with atomic_dir(path) as tmp:
                yield tmp
                if RunDir(path.parent).committed_round() == 3:
                    raise error

        monkeypatch.setattr(adapter, "atomic_dir", failing_atomic_dir)


@pytest.mark.fault
@pytest.mark.parametrize("target, holds", [("metrics", 2), ("client state", 2), ("checkpoint", 2), ("adapter", 3)])
def test_a_failing_write_keeps_the_last_committed_round(target, holds, reference, train_argv, tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.MonkeyPatch.context() as patch:
        fail_writing(patch, target)
        assert main(train_argv(out)) == 1
    message = capsys.readouterr().err
    error = FULL_DISK[target]
    assert f"writing round 3 to {out} failed: {type(error).__name__}: {error}." in message
    assert f"holds round {holds}, its last committed round, intact" in message
    assert f"continue with: fedlora train --output-dir {out} --resume" in message
    assert RunDir(out).committed_round() == holds

    assert main(resume_argv(out)) == 0
    assert_same_run(out, reference)


def test_a_run_keeps_two_checkpoints_and_the_client_states_they_refer_to(reference):
    run_dir = RunDir(reference)
    assert [round_in(run_dir.checkpoint), round_in(run_dir.checkpoint_prev)] == [ROUNDS, ROUNDS - 1]
    for checkpoint in (run_dir.checkpoint, run_dir.checkpoint_prev):
        storage._verify(checkpoint)
        for client_id, last_round in json.loads((checkpoint / "state.json").read_text())["client_rounds"].items():
            run_dir.load_client(client_id, last_round)  # verified against its manifest
    assert sorted(p.name for p in reference.iterdir() if p.name.startswith(("checkpoint", "clients"))) == [
        "checkpoint",
        "checkpoint.prev",
        "clients",
        "clients.prev",
    ]
