"""Hardening (issue #15): no path outside the run directory is written or deleted, invalid settings are refused
before anything is written, and no traceback reaches a user of the ``fedlora`` command.

The runs use a tiny Llama saved as a local model directory (``tests/tiny.py``) and a few rows per label; each case
checks the run directory and a sandbox around it afterwards.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fedlora.cli
import fedlora.federated.run
import fedlora.federated.rundir.paths
from fedlora.cli import main
from fedlora.federated.client import FederatedClient
from fedlora.federated.rundir.paths import PathGuard, UnsafePathError, client_dir_name, client_dir_names
from fedlora.federated.rundir.storage import RunDir
from fedlora.files import missing_file_error
from tests.test_bad_inputs import files
from tests.tiny import save_tiny_model

TINY = [
    "--no-progress",
    "--set",
    "data.min_examples=2",
    "data.max_length=32",
    "data.test_fraction=0.3",
    "adapter.r=2",
    "eval.rouge_examples=0",
    "client.local_steps=1",
    "client.global_steps=1",
]
HOSTILE_LABELS = ["../x", "{sandbox}/victim", "", "a/b", ".", "..", "L" * 300]


def write_rows(path: Path, labels: list[str], per_label: int = 6) -> Path:
    rows = [
        {"instruction": f"What is {i} plus {i}?", "context": "", "response": f"It is {2 * i}.", "category": label}
        for label in labels
        for i in range(per_label)
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def snapshot(root: Path, skip: Path | None = None) -> dict[str, bytes | str]:
    """Every file and link under ``root`` (except under ``skip``) with its bytes or link target."""
    found: dict[str, bytes | str] = {}
    for directory, subdirs, names in os.walk(root):
        for name in sorted(subdirs + names):
            path = Path(directory) / name
            if skip is not None and (path == skip or skip in path.parents):
                continue
            if path.is_symlink():
                found[str(path)] = f"-> {os.readlink(path)}"
            elif path.is_file():
                found[str(path)] = path.read_bytes()
            else:
                found[str(path)] = "dir"
    return found


def fails(argv: list[str], capsys, code: int = 2) -> str:
    """Run ``fedlora`` in-process; expect exit status ``code`` and a one-line ``fedlora: error:`` without a
    traceback; returns stderr."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == code
    err = capsys.readouterr().err
    assert "fedlora: error: " in err and "Traceback" not in err, err
    return err


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture
def sandbox(tmp_path) -> Path:
    """``tmp_path`` with a victim directory (what an escaping path would overwrite) and a two-label data file."""
    (tmp_path / "victim").mkdir()
    (tmp_path / "victim" / "keep.txt").write_text("keep")
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("keep")
    write_rows(tmp_path / "rows.jsonl", ["c0", "c1"], per_label=10)
    return tmp_path


def train_argv(model_dir: Path, data: Path, out: Path, *extra: str) -> list[str]:
    common = ["--model", str(model_dir), "--data", str(data), "--num-clients", "2", "--output-dir", str(out)]
    return ["train", *common, *TINY, *extra]


@pytest.fixture(scope="module")
def finished_run(model_dir, tmp_path_factory) -> Path:
    """A committed 2-round run (2 clients with personal state) to copy and damage."""
    root = tmp_path_factory.mktemp("finished")
    data = write_rows(root / "rows.jsonl", ["c0", "c1"], per_label=10)
    out = root / "run"
    assert main([*train_argv(model_dir, data, out, "data.partition=label", "data.num_clients=none"), "--rounds=2"]) == 0
    return out


# ------------------------------------------------------------------------------------------------- path policy


@pytest.mark.bad_input
def test_labels_that_look_like_paths_stay_inside_the_run_directory(model_dir, sandbox, capsys):
    labels = [label.format(sandbox=sandbox) for label in HOSTILE_LABELS]
    data = write_rows(sandbox / "labels.jsonl", labels)
    out = sandbox / "run"
    before = snapshot(sandbox)
    label_split = ["data.partition=label", "data.num_clients=none"]
    assert main([*train_argv(model_dir, data, out, *label_split), "--rounds", "1"]) == 0
    assert main(["train", "--output-dir", str(out), "--resume", "--rounds", "2", "--no-progress"]) == 0
    assert main(["eval", "--run-dir", str(out), "--no-progress"]) == 0
    assert snapshot(sandbox, skip=out) == before  # nothing outside the run directory changed
    rows = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    assert {row["client"] for row in rows if row["split"] == "local" and "client" in row} == set(labels)  # labels
    assert all(row["round"] == 2 for row in rows)
    names = json.loads((out / "client_names.json").read_text())
    assert sorted(names.values()) == sorted(labels)
    assert sorted(p.name for p in (out / "clients").iterdir()) == sorted(names)  # every client's state
    for name, label in names.items():
        assert re.fullmatch(r"[a-z0-9_-]{1,64}", name), name
        assert json.loads((out / "clients" / name / "state.json").read_text()) == {"round": 2, "client": label}


def test_client_dir_names_are_safe_bounded_and_distinct():
    assert client_dir_name("client_0") == "client_0"  # plain names are kept: old run directories still resume
    assert client_dir_name("open_qa") == "open_qa"
    names = client_dir_names(["", ".", "..", "../x", "/abs", "a/b", "A", "a", "a-b", "L" * 300, "é", "\x00"])
    assert len(set(names.values())) == len(names)
    assert all(re.fullmatch(r"[a-z0-9_]{1,40}-[0-9a-f]{10}|[a-z0-9_]{1,64}", name) for name in names.values())


@pytest.mark.bad_input
def test_two_labels_that_would_share_a_directory_are_refused_before_training(model_dir, sandbox, capsys, monkeypatch):
    monkeypatch.setattr(fedlora.federated.rundir.paths, "client_dir_name", lambda client_id: "same")
    out = sandbox / "run"
    argv = train_argv(model_dir, sandbox / "rows.jsonl", out, "data.partition=label", "data.num_clients=none")
    err = fails(argv, capsys)
    assert "clients 'c0' and 'c1' would both keep their state in clients/same/" in err
    assert not out.exists()


@pytest.mark.bad_input
@pytest.mark.parametrize("link", ["metrics.jsonl", "clients", "clients/c0", "global_adapter", "checkpoint.prev"])
@pytest.mark.parametrize("command", ["resume", "eval"])
def test_a_link_inside_the_run_directory_is_refused_and_nothing_is_touched(
    finished_run, tmp_path, capsys, link, command
):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out, symlinks=True)
    target = tmp_path / "elsewhere"
    original = out / link
    if original.is_dir():
        shutil.copytree(original, target)
        shutil.rmtree(original)
    else:
        shutil.copy(original, target)
        original.unlink()
    original.symlink_to(target)
    before = snapshot(tmp_path)
    if command == "resume":
        argv = ["train", "--output-dir", str(out), "--resume", "--rounds", "3", "--no-progress"]
    else:
        argv = ["eval", "--run-dir", str(out), "--no-progress"]
    err = fails(argv, capsys)
    assert f"{out / link} is a symbolic link (to {target}); fedlora does not follow links inside a run" in err
    assert snapshot(tmp_path) == before


def test_path_guard(tmp_path):
    guard = PathGuard(tmp_path / "run")
    (tmp_path / "run" / "sub").mkdir(parents=True)
    assert guard.check(tmp_path / "run" / "sub" / "file") == tmp_path / "run" / "sub" / "file"
    for outside in (tmp_path / "run" / ".." / "x", tmp_path / "other", Path("/etc/passwd")):
        with pytest.raises(UnsafePathError, match="lies outside the run directory"):
            guard.check(outside)
    (tmp_path / "run" / "link").symlink_to(tmp_path)
    with pytest.raises(UnsafePathError, match="link is a symbolic link"):
        guard.check(tmp_path / "run" / "link" / "file")
    (tmp_path / "run" / ".metrics.jsonl.tmp").symlink_to(tmp_path / "other")  # the temporary of a crash-safe write
    with pytest.raises(UnsafePathError, match=r"\.metrics\.jsonl\.tmp is a symbolic link"):
        guard.check(tmp_path / "run" / "metrics.jsonl")
    with pytest.raises(UnsafePathError, match="is a symbolic link"):
        guard.scan()
    (tmp_path / "linked-run").symlink_to(tmp_path / "run" / "sub")  # the run directory itself may be a link
    PathGuard(tmp_path / "linked-run").scan()


# --------------------------------------------------------------------------- settings refused before writing


@pytest.mark.bad_input
@pytest.mark.parametrize(
    ("settings", "match"),
    [
        (["server.lr=inf"], r"server.lr must be finite; got inf"),
        (["client.local_lr=inf"], r"client.local_lr must be finite; got inf"),
        (["client.global_lr=-inf"], r"client.global_lr must be finite; got -inf"),
        (["client.lr=1e999"], r"client.lr must be finite; got inf"),
        (["client.max_grad_norm=inf"], r"client.max_grad_norm must be finite"),
        (["server.clip_norm=inf"], r"server.clip_norm must be finite"),
        (["privacy.noise_multiplier=1", "privacy.clip_norm=inf"], r"privacy.clip_norm must be finite"),
        (["client.weight_decay=inf"], r"client.weight_decay must be finite"),
        (["server.min_clients=3"], r"server.min_clients=3 is more than the 2 client\(s\) of the federation"),
        (
            ["data.partition=label", "data.num_clients=none", "server.min_clients=3"],
            r"server.min_clients=3 is more than the 2 client\(s\) of the federation",
        ),
        (["device=banana"], r"device \(--device\) 'banana' is not a device torch knows"),
        (["seed=-1"], r"seed must be in \[0, 2\*\*63\); got -1"),
    ],
)
def test_invalid_settings_are_refused_before_writing(model_dir, sandbox, capsys, settings, match):
    out = sandbox / "run"
    err = fails([*train_argv(model_dir, sandbox / "rows.jsonl", out), *settings, "--rounds", "1"], capsys)
    assert re.search(match, err), err
    assert not out.exists()


@pytest.mark.bad_input
@pytest.mark.parametrize(
    ("flag", "match"),
    [
        (["--device", "banana"], r"fedlora: error: device \(--device\) 'banana' is not a device torch knows"),
        (["--device", "cuda:99"], r"fedlora: error: device \(--device\) 'cuda:99': "),
        (["--seed", "-1"], r"fedlora: error: --seed: seed must be in \[0, 2\*\*63\); got -1"),
        (["--rounds", "0"], r"fedlora: error: --rounds: rounds must be at least 1; got 0"),
    ],
)
def test_bad_flags_are_named(model_dir, sandbox, capsys, flag, match):
    out = sandbox / "run"
    err = fails([*train_argv(model_dir, sandbox / "rows.jsonl", out), *flag], capsys)
    assert re.search(match, err), err
    assert not out.exists()


@pytest.mark.bad_input
@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda(model_dir, sandbox, capsys):
    err = fails([*train_argv(model_dir, sandbox / "rows.jsonl", sandbox / "run"), "--device", "cuda"], capsys)
    assert "device (--device) 'cuda': CUDA is not available on this machine; use --device cpu" in err
    assert not (sandbox / "run").exists()


@pytest.mark.bad_input
def test_resume_with_fewer_rounds_than_committed(finished_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    before = files(out)
    err = fails(["train", "--output-dir", str(out), "--resume", "--rounds", "1", "--no-progress"], capsys)
    assert f"rounds (--rounds) 1 is below the 2 round(s) {out} already committed; pass --rounds 2 or more" in err
    assert files(out) == before  # config.yaml not rewritten
    assert main(["train", "--output-dir", str(out), "--resume", "--rounds", "2", "--no-progress"]) == 0


@pytest.mark.bad_input
@pytest.mark.parametrize("setting", ["seed=1", "data.num_clients=3", "data.test_fraction=0.5", "data.alpha=0.9"])
def test_eval_refuses_settings_that_change_the_data_split(finished_run, capsys, setting):
    before = files(finished_run)
    err = fails(["eval", "--run-dir", str(finished_run), "--no-progress", "--set", setting], capsys)
    key = setting.partition("=")[0]
    assert f"--set {key}: eval scores the clients the run trained on, so it cannot change" in err
    assert files(finished_run) == before


@pytest.mark.bad_input
@pytest.mark.parametrize(
    ("name", "text", "match"),
    [
        ("run.yaml", "seed: 2020-01-01\n", r"run.yaml: seed holds date datetime.date\(2020, 1, 1\), not a plain value"),
        ("run.yaml", "client:\n  lr: !!set {a: null}\n", r"run.yaml: client.lr holds set"),
        ("run.yaml", "data:\n  columns: {1: x}\n", r"run.yaml: key 1 under data.columns is not a string"),
        ("run.yaml", "adapter:\n  target_modules: &a [q_proj, *a]\n", r"run.yaml: values nest too deeply"),
        ("run.toml", "[eval]\nevery = 1979-05-27T07:32:00Z\n", r"run.toml: eval.every holds datetime"),
        ("run.yaml", "server:\n  lr: .inf\n", r"server.lr must be finite; got inf"),
        ("run.yaml", "server:\n  lr: .nan\n", r"server.lr must be a float; got nan"),
    ],
)
def test_config_file_values_must_be_plain(model_dir, sandbox, capsys, name, text, match):
    (sandbox / name).write_text(text)
    err = fails(
        [*train_argv(model_dir, sandbox / "rows.jsonl", sandbox / "run"), "--config", str(sandbox / name)], capsys
    )
    assert re.search(match, err), err
    assert not (sandbox / "run").exists()


# ------------------------------------------------------------------------------------- files that are not files


@pytest.mark.bad_input
@pytest.mark.parametrize("what", ["config", "data"])
@pytest.mark.parametrize(
    ("kind", "match"), [("directory", "is a directory, not a file"), ("loop", "is a symbolic link loop")]
)
def test_a_directory_or_link_loop_is_named_as_such(model_dir, sandbox, capsys, what, kind, match):
    path = sandbox / ("run.yaml" if what == "config" else "data.jsonl")
    if kind == "directory":
        path.mkdir()
    else:
        path.symlink_to(path)
    argv = train_argv(model_dir, sandbox / "rows.jsonl", sandbox / "run")
    argv += ["--config", str(path)] if what == "config" else ["--data", str(path)]
    err = fails(argv, capsys)
    assert f"{what} file {path} {match}" in err
    assert not (sandbox / "run").exists()


@pytest.mark.bad_input
@pytest.mark.parametrize("dry_run", [False, True])
@pytest.mark.parametrize(("kind", "match"), [("loop", "is a symbolic link loop"), ("dangling", "is a link to")])
def test_a_data_path_that_is_a_broken_link_is_not_tried_on_the_hub(
    model_dir, sandbox, capsys, monkeypatch, dry_run, kind, match
):
    """A data path without a file type that is a link loop or a dangling link: named at once, not fetched from the
    hub (where retries took 25 s and ended in a hub miss)."""
    monkeypatch.setattr("fedlora.data.loaders.load_dataset", lambda *a, **k: pytest.fail("data path tried on the hub"))
    path = sandbox / "data"
    path.symlink_to(path if kind == "loop" else sandbox / "absent")
    argv = [*train_argv(model_dir, path, sandbox / "run", "data.source=file"), *(["--dry-run"] if dry_run else [])]
    err = fails(argv, capsys)
    assert f"data{'.' if dry_run else ' '}path {path} {match}" in err, err
    assert not (sandbox / "run").exists()


@pytest.mark.bad_input
@pytest.mark.parametrize("dry_run", [False, True])
@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("{}", r"config.json has no 'model_type' \(the architecture"),
        (
            '{"model_type": "banana"}',
            r"config.json: model_type 'banana' is not an architecture this transformers knows",
        ),
        ("[]", r"config.json holds list, not a JSON object of model settings"),
        ('{"model_type": ', r"config.json: invalid JSON at line 1, column 16: Expecting value"),
    ],
)
def test_a_model_directory_whose_config_is_no_model_configuration(sandbox, capsys, dry_run, text, match):
    """The model directory's config.json is named with what is wrong with it (before: a message about the
    tokenizer's sentencepiece backend)."""
    model = sandbox / "model"
    model.mkdir()
    (model / "config.json").write_text(text)
    argv = [*train_argv(model, sandbox / "rows.jsonl", sandbox / "run"), *(["--dry-run"] if dry_run else [])]
    err = fails(argv, capsys)
    assert re.search(f"fedlora: error: {re.escape(str(model))}/{match}", err), err
    assert not (sandbox / "run").exists()


@pytest.mark.bad_input
def test_a_natural_instructions_task_file_that_is_a_link_loop(model_dir, sandbox, capsys):
    loop = sandbox / "task001_loop.json"
    loop.symlink_to(loop)
    argv = train_argv(model_dir, loop, sandbox / "run", "data.source=natural_instructions", "data.partition=files")
    err = fails([*argv, "data.num_clients=none"], capsys)
    assert f"Natural Instructions task file {loop} is a symbolic link loop, not a file" in err
    assert not (sandbox / "run").exists()


NI_TASK = {
    "Definition": ["Add the numbers."],
    "Instances": [{"input": f"{i}+{i}", "output": [str(2 * i)]} for i in range(12)],
}


@pytest.mark.bad_input
@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"Instances": {"input": "1+1", "output": ["2"]}}, r"'Instances' is dict, not a list of instances"),
        ({"Instances": "all of them"}, r"'Instances' is str, not a list of instances"),
        (
            {"Definition": ["Add", ["the", "numbers"]]},
            r"'Definition' must be a string or a list of strings; got \['Add'",
        ),
        ({"Definition": {"text": "Add"}}, r"'Definition' must be a string or a list of strings; got \{'text'"),
    ],
)
def test_malformed_natural_instructions_task(model_dir, sandbox, capsys, change, match):
    tasks = sandbox / "tasks"
    tasks.mkdir()
    (tasks / "task001_add.json").write_text(json.dumps(NI_TASK))
    (tasks / "task002_bad.json").write_text(json.dumps({**NI_TASK, **change}))
    argv = train_argv(model_dir, tasks, sandbox / "run", "data.source=natural_instructions", "data.partition=files")
    err = fails([*argv, "data.num_clients=none"], capsys)
    assert re.search(rf"task002_bad.json: {match}", err), err
    assert not (sandbox / "run").exists()


# ------------------------------------------------------------------------------------ interrupts and bugs


@pytest.mark.bad_input
def test_ctrl_c_before_anything_is_written_says_there_is_nothing_to_resume(model_dir, sandbox, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("fedlora.federated.session.build_client", interrupted)
    assert main(train_argv(model_dir, sandbox / "rows.jsonl", sandbox / "run")) == 130
    err = capsys.readouterr().err
    assert "fedlora: interrupted; no run directory was written, so there is nothing to resume" in err
    assert "Traceback" not in err and not (sandbox / "run").exists()


@pytest.mark.bad_input
def test_ctrl_c_in_the_first_round_says_how_to_resume(model_dir, sandbox, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    out = sandbox / "run"
    with monkeypatch.context() as patch:
        patch.setattr("fedlora.federated.run.fit_clients", interrupted)
        assert main([*train_argv(model_dir, sandbox / "rows.jsonl", out), "--rounds", "1"]) == 130
    err = capsys.readouterr().err
    assert f"fedlora: interrupted; continue with: fedlora train --output-dir {out} --resume" in err
    assert "Traceback" not in err
    assert main(["train", "--output-dir", str(out), "--resume", "--no-progress"]) == 0
    assert RunDir(out).committed_round() == 1


# A ``fedlora train`` process that sends itself SIGINT (Ctrl-C) when it first imports MODULE.
INTERRUPT_AT_IMPORT = """
import os, signal, sys

MODULE = sys.argv[1]

class Interrupt:
    def find_spec(self, name, path=None, target=None):
        if name == MODULE:
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.SIGINT)

sys.meta_path.insert(0, Interrupt())
sys.argv = ["fedlora", "train", "--output-dir", sys.argv[2], "--no-progress"]
from fedlora.__main__ import run
run()
"""


@pytest.mark.bad_input
@pytest.mark.parametrize("module", ["fedlora.cli", "torch.autograd"])
def test_ctrl_c_while_modules_import_prints_one_line(tmp_path, module):
    """Ctrl-C in the first seconds, inside the command line module's import or torch's (which a KeyboardInterrupt
    would leave half-imported): exit status 130, one line, no traceback."""
    command = [sys.executable, "-c", INTERRUPT_AT_IMPORT, module, str(tmp_path / "run")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 130, result.stderr
    assert result.stderr.strip().startswith("fedlora: interrupted"), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.bad_input
def test_an_unexpected_error_has_a_traceback_only_with_debug(model_dir, sandbox, capsys, monkeypatch):
    def bug(*args, **kwargs):
        raise TypeError("something fedlora did not expect")

    monkeypatch.setattr(fedlora.federated.run, "train", bug)  # the CLI imports it when train runs
    argv = train_argv(model_dir, sandbox / "rows.jsonl", sandbox / "run")
    err = fails(argv, capsys, code=1)
    assert "fedlora: error: unexpected TypeError: something fedlora did not expect (this is a bug" in err
    with pytest.raises(TypeError, match="something fedlora did not expect"):
        main([*argv, "--debug"])
    logging.getLogger("fedlora").setLevel(logging.NOTSET)  # --debug set it for this process


@pytest.mark.bad_input
@pytest.mark.parametrize("debug", [False, True])
def test_a_failing_client_is_one_log_line_without_debug(model_dir, sandbox, caplog, monkeypatch, debug):
    fit = FederatedClient.fit

    def failing_fit(self, state, ins):
        if state.client_id == "client_1":
            raise RuntimeError("client 1 broke")
        return fit(self, state, ins)

    monkeypatch.setattr(FederatedClient, "fit", failing_fit)
    argv = [
        *train_argv(model_dir, sandbox / "rows.jsonl", sandbox / "run"),
        "--rounds",
        "1",
        *(["--debug"] if debug else []),
    ]
    with caplog.at_level(logging.WARNING, logger="fedlora"):
        assert main(argv) == 0
    logging.getLogger("fedlora").setLevel(logging.NOTSET)
    (failed,) = [r for r in caplog.records if "failed: RuntimeError('client 1 broke')" in r.getMessage()]
    assert bool(failed.exc_info) == debug


@pytest.mark.bad_input
def test_the_fedlora_command_prints_no_traceback(tmp_path):
    """A real ``fedlora`` process (its own interpreter): a bad flag is one line on stderr."""
    command = [sys.executable, "-m", "fedlora.cli", "train", "--seed", "-1", "--output-dir", str(tmp_path / "run")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1] == "fedlora: error: --seed: seed must be in [0, 2**63); got -1"
    assert not (tmp_path / "run").exists()


@pytest.mark.bad_input
def test_eval_on_a_device_that_does_not_exist(finished_run, capsys):
    before = files(finished_run)
    err = fails(["eval", "--run-dir", str(finished_run), "--no-progress", "--device", "banana"], capsys)
    assert "device (--device) 'banana' is not a device torch knows" in err
    assert files(finished_run) == before


def test_missing_file_errors_say_what_the_path_is(tmp_path):
    (tmp_path / "dir").mkdir()
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    (tmp_path / "dangling").symlink_to(tmp_path / "absent")
    expected = {
        "absent": (FileNotFoundError, "not found"),
        "dir": (IsADirectoryError, "is a directory, not a file"),
        "loop": (OSError, "is a symbolic link loop, not a file"),
        "dangling": (FileNotFoundError, f"is a link to {tmp_path / 'absent'}, which does not exist"),
    }
    for name, (kind, message) in expected.items():
        error = missing_file_error(tmp_path / name, "data file")
        assert isinstance(error, kind) and str(error) == f"data file {tmp_path / name} {message}"
