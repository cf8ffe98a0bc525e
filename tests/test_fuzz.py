"""Property-based tests (hypothesis) of the ``fedlora`` command on generated bad input (issue #15).

Generated config files, ``--set`` overrides, data rows, labels and Natural Instructions task files go to
``fedlora train`` (in-process, tiny model, one short round). Every outcome must be one of:

* a clean run (exit 0): its state lies in the run directory, which holds no link;
* ``fedlora: error: ...`` (exit 2) with the run directory as it was before (absent), or, for a round that could not
  be aggregated (exit 1), a run directory that ``--resume`` can continue;

never a Python traceback or an "unexpected" error, and nothing outside the run directory is touched. The examples
are few (derandomized, so CI runs the same ones) to keep the file within about two minutes; ``FEDLORA_FUZZ_SCALE=20``
runs 20 times as many, drawn at random, to search further.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st

from fedlora.cli import main
from tests.test_hardening import snapshot
from tests.tiny import save_tiny_model

pytestmark = pytest.mark.bad_input

BUDGET = [  # keeps every run that passes validation to a second or two
    "rounds=1",
    "client.steps=1",
    "client.local_steps=1",
    "client.global_steps=1",
    "eval.rouge_examples=0",
    "eval.max_new_tokens=1",
    "data.max_length=32",
    "data.max_examples=40",
]
SCALE = int(os.environ.get("FEDLORA_FUZZ_SCALE", "1"))  # e.g. 20: 20 times the examples, drawn at random
FUZZ = settings(
    max_examples=10 * SCALE,
    deadline=None,
    derandomize=SCALE == 1,
    database=None,
    phases=[Phase.explicit, Phase.generate],  # no shrinking: a failure reports its example without rerunning
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
HOSTILE_LABELS = ["../x", "../../escaped", "/tmp/abs", "", "a/b", ".", "..", ".NET", "L" * 300, "C:\\x", "~", "-"]


def rows(labels: list[str], per_label: int = 6) -> list[dict[str, str]]:
    return [
        {"instruction": f"What is {i} plus {i}?", "context": "", "response": f"It is {2 * i}.", "category": label}
        for label in labels
        for i in range(per_label)
    ]


def jsonl(items: list[object]) -> str:
    return "".join(json.dumps(item) + "\n" for item in items)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama")


def run_fedlora(argv: list[str]) -> tuple[int, str]:
    """``fedlora`` in-process: its exit status and stderr."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as exit_info:
            code = exit_info.code
    return code, err.getvalue()


def check_outcome(sandbox: Path, run_dir: Path, before: dict, code: int, err: str) -> None:
    """The property of the module docstring, for a run into ``run_dir`` inside ``sandbox``."""
    event(f"exit {code}")  # --hypothesis-show-statistics shows how many examples trained
    assert "Traceback" not in err and "unexpected" not in err, err
    assert snapshot(sandbox, skip=run_dir) == before, "something outside the run directory changed"
    if code == 0:
        assert (run_dir / "checkpoint" / "state.json").is_file()
        assert not any(isinstance(v, str) and v.startswith("-> ") for v in snapshot(run_dir).values())
        return
    assert "fedlora: error: " in err, err
    if code == 2:
        assert not run_dir.exists(), f"the run directory was written before the error: {err}"
    else:
        assert code == 1 and (run_dir / "config.yaml").is_file(), (code, err)


def train_in_sandbox(model_dir: Path, write, argv: list[str]) -> None:
    """Make a sandbox (a victim file and directory beside the run directory), let ``write(sandbox)`` put the inputs
    in it, run ``fedlora train`` with ``argv`` into ``sandbox/run``, and check the outcome."""
    with tempfile.TemporaryDirectory() as tmp:
        sandbox = Path(tmp)
        (sandbox / "escaped").mkdir()
        (sandbox / "escaped" / "keep.txt").write_text("keep")
        (sandbox / "x").write_text("keep")
        write(sandbox)
        before = snapshot(sandbox)
        run_dir = sandbox / "run"
        common = ["--model", str(model_dir), "--output-dir", str(run_dir), "--no-progress"]
        formatted = [arg.format(sandbox=sandbox) for arg in argv]
        code, err = run_fedlora(["train", *common, *formatted, "--set", *BUDGET])
        check_outcome(sandbox, run_dir, before, code, err)


# ------------------------------------------------------------------------------------------ configs and overrides

ANY_VALUE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-3, max_value=10**20),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6),
    st.lists(st.integers(-1, 3), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


GOOD = {  # settings a run may have (combinations can still be invalid: privacy with median, ...)
    "strategy": ["fedlora-opt", "fedit", "fed-dora", "centralized", "fedprox"],
    "seed": [0, 1, 7],
    "device": ["cpu", "cuda", "banana"],
    "adapter.r": [1, 2],
    "adapter.alpha": [2.0, 16],
    "adapter.dropout": [0.0, 0.1],
    "data.partition": ["dirichlet", "iid", "label"],
    "data.num_clients": [2, 3, None],
    "data.alpha": [0.5, 10.0],
    "data.min_examples": [1, 2],
    "data.test_fraction": [0.2, 0.5],
    "data.global_test_size": [2, None],
    "client.batch_size": [1, 4],
    "client.optimizer": ["adamw", "sgd"],
    "client.weight_decay": [0.0, 0.1],
    "client.max_grad_norm": [1.0, None],
    "client.lr": [1e-3, "5e-3"],
    "client.local_lr": [1e-2],
    "client.global_lr": [5e-3],
    "client.order": ["local-first", "global-first"],
    "server.optimizer": ["fedavg", "fedadam", "fedyogi"],
    "server.lr": [1.0, 0.5],
    "server.fraction": [1.0, 0.5],
    "server.min_clients": [1, 2],
    "server.clip_norm": [None, 1.0],
    "server.max_update_norm": [None, 1e5],
    "server.aggregator": ["mean", "median", "trimmed-mean"],
    "server.trim_fraction": [0.1],
    "privacy.noise_multiplier": [0.0, 0.5],
    "privacy.clip_norm": [None, 1.0],
    "privacy.delta": [1e-5],
    "eval.every": [1],
    "eval.batch_size": [2, 8],
}


def nested(flat: dict[str, object]) -> dict[str, object]:
    """``{"a.b": 1}`` as ``{"a": {"b": 1}}``."""
    tree: dict[str, object] = {}
    for key, item in flat.items():
        *parents, leaf = key.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = item
    return tree


@st.composite
def configs(draw) -> dict[str, object]:
    """Some settings at good values, then up to two of them (or an unknown key) at any value."""
    chosen = draw(st.lists(st.sampled_from(sorted(GOOD)), max_size=8, unique=True))
    flat = {key: draw(st.sampled_from(GOOD[key])) for key in chosen}
    for key in draw(st.lists(st.sampled_from([*sorted(GOOD), "bogus", "data.bogus"]), max_size=2)):
        flat[key] = draw(ANY_VALUE)
    return nested(flat)


CONFIG = configs()


@settings(FUZZ, max_examples=15 * SCALE)
@given(config=CONFIG, suffix=st.sampled_from([".yaml", ".json"]))
def test_fuzzed_config_file(model_dir, config, suffix):
    def write(sandbox: Path) -> None:
        (sandbox / "rows.jsonl").write_text(jsonl(rows(["c0", "c1", "c2"])))
        text = yaml.safe_dump(config) if suffix == ".yaml" else json.dumps(config)  # JSON: NaN, Infinity tokens
        (sandbox / f"run{suffix}").write_text(text)

    train_in_sandbox(model_dir, write, ["--data", "{sandbox}/rows.jsonl", "--config", f"{{sandbox}}/run{suffix}"])


KEYS = st.sampled_from(
    [
        "rounds",
        "seed",
        "device",
        "strategy",
        "output_dir",
        "data.path",
        "data.partition",
        "data.num_clients",
        "data.columns",
        "adapter.r",
        "adapter.target_modules",
        "adapter.tensor_roles",
        "client.lr",
        "client.batch_size",
        "server.lr",
        "server.min_clients",
        "privacy.noise_multiplier",
        "privacy.delta",
        "eval.every",
        "model",
        "client",
        "bogus.key",
    ]
)
VALUES = st.one_of(
    st.sampled_from(["inf", "-inf", "nan", "1e999", "-1", "0", "none", "[]", "{}", "[1", '{"A": 1}', "../x", "/"]),
    st.sampled_from(["1", "2", "0.5", "1e-3", "cpu", "fedit", "iid", "q_proj", '{"A.magnitude": "shared"}']),
    st.text(alphabet="abc01.-=[]{},:\"' /", max_size=8),
)


@settings(FUZZ, max_examples=20 * SCALE)
@given(
    overrides=st.lists(st.tuples(KEYS, VALUES), min_size=1, max_size=3), raw=st.lists(st.text(max_size=6), max_size=1)
)
def test_fuzzed_set_overrides(model_dir, overrides, raw):
    def write(sandbox: Path) -> None:
        (sandbox / "rows.jsonl").write_text(jsonl(rows(["c0", "c1"])))

    pairs = [f"{key}={value}" for key, value in overrides] + [item for item in raw if item and not item.startswith("-")]
    argv = [
        "--data",
        "{sandbox}/rows.jsonl",
        "--num-clients",
        "2",
        "--set",
        *(p.replace("{", "{{").replace("}", "}}") for p in pairs),
    ]
    train_in_sandbox(model_dir, write, argv)


# --------------------------------------------------------------------------------------------- data and labels

CELL = st.one_of(
    st.text(max_size=12),
    st.sampled_from(["", " ", "\n", "What is 1 plus 1?", "It is 2."]),
    st.none(),
    st.integers(),
    st.lists(st.text(max_size=2), max_size=2),
)
FIELDS = st.sampled_from(["instruction", "context", "response", "category", "extra"])


@st.composite
def data_rows(draw) -> list[object]:
    """Mostly good rows over two categories, with up to three cells (or whole rows) replaced by anything."""
    items: list[object] = rows(["c0", "c1"], per_label=draw(st.integers(1, 12)))
    for _ in range(draw(st.integers(0, 3))):
        at = draw(st.integers(0, len(items) - 1))
        if isinstance(items[at], dict) and draw(st.booleans()):
            items[at] = {**items[at], draw(FIELDS): draw(CELL)}
        else:
            items[at] = draw(ANY_VALUE)
    return items


@FUZZ
@given(data=data_rows(), partition=st.sampled_from(["iid", "dirichlet", "label"]))
def test_fuzzed_data_rows(model_dir, data, partition):
    def write(sandbox: Path) -> None:
        (sandbox / "rows.jsonl").write_text(jsonl(data))

    argv = ["--data", "{sandbox}/rows.jsonl", "--set", f"data.partition={partition}", "data.min_examples=2"]
    argv += ["data.num_clients=none"] if partition == "label" else ["data.num_clients=2"]
    train_in_sandbox(model_dir, write, argv)


LABEL = st.one_of(st.sampled_from(HOSTILE_LABELS), st.text(max_size=300))


@settings(FUZZ, max_examples=6 * SCALE)
@given(labels=st.lists(LABEL, min_size=1, max_size=4, unique_by=str.strip))
def test_fuzzed_labels_run_resume_and_evaluate(model_dir, labels):
    """Any labels (distinct once stripped, as the loader strips them) train, resume and evaluate with every client's
    state in the run directory."""
    labels = [label.strip() for label in labels]
    with tempfile.TemporaryDirectory() as tmp:
        sandbox = Path(tmp)
        (sandbox / "escaped").mkdir()
        (sandbox / "rows.jsonl").write_text(jsonl(rows(labels)))
        before = snapshot(sandbox)
        out = sandbox / "run"
        argv = ["train", "--model", str(model_dir), "--data", str(sandbox / "rows.jsonl"), "--output-dir", str(out)]
        split = ["data.partition=label", "data.num_clients=none", "data.min_examples=2"]
        code, err = run_fedlora([*argv, "--no-progress", "--set", *BUDGET, *split])
        assert code == 0, err
        code, err = run_fedlora(["train", "--output-dir", str(out), "--resume", "--rounds", "2", "--no-progress"])
        assert code == 0, err
        code, err = run_fedlora(["eval", "--run-dir", str(out), "--no-progress"])
        assert code == 0, err
        assert snapshot(sandbox, skip=out) == before
        scored = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
        assert {row["client"] for row in scored if row["split"] == "local" and "client" in row} == set(labels)
        names = json.loads((out / "client_names.json").read_text())
        assert sorted(names.values()) == sorted(labels)
        assert sorted(os.listdir(out / "clients")) == sorted(names)


# ------------------------------------------------------------------------------------------- task files

TEXT = st.one_of(st.text(max_size=8), st.integers(), st.none(), st.lists(st.text(max_size=3), max_size=2))
INSTANCE = st.one_of(
    st.fixed_dictionaries({"input": TEXT, "output": st.one_of(TEXT, st.lists(TEXT, max_size=2))}),
    ANY_VALUE,
)
TASK = st.one_of(
    st.fixed_dictionaries(
        {
            "Definition": st.one_of(TEXT, st.lists(TEXT, max_size=2), st.dictionaries(st.text(max_size=2), TEXT)),
            "Instances": st.one_of(st.lists(INSTANCE, max_size=12), ANY_VALUE),
        }
    ),
    ANY_VALUE,
)
GOOD_TASK = {
    "Definition": ["Add the numbers."],
    "Instances": [{"input": f"{i}+{i}", "output": [str(2 * i)]} for i in range(8)],
}


@FUZZ
@given(task=TASK)
def test_fuzzed_natural_instructions_task_file(model_dir, task):
    def write(sandbox: Path) -> None:
        (sandbox / "tasks").mkdir()
        (sandbox / "tasks" / "task001_add.json").write_text(json.dumps(GOOD_TASK))
        (sandbox / "tasks" / "task002_fuzzed.json").write_text(json.dumps(task))

    settings_ = [
        "data.source=natural_instructions",
        "data.partition=files",
        "data.num_clients=none",
        "data.min_examples=2",
    ]
    train_in_sandbox(model_dir, write, ["--data", "{sandbox}/tasks", "--set", *settings_])


# ---------------------------------------------------------------------------------------- eval --set overrides


@pytest.fixture(scope="module")
def finished_run(model_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("finished")
    (root / "rows.jsonl").write_text(jsonl(rows(["c0", "c1"])))
    out = root / "run"
    argv = ["train", "--model", str(model_dir), "--data", str(root / "rows.jsonl"), "--output-dir", str(out)]
    code, err = run_fedlora([*argv, "--no-progress", "--set", *BUDGET, "data.min_examples=2", "data.num_clients=2"])
    assert code == 0, err
    return out


@settings(FUZZ, max_examples=10 * SCALE)
@given(overrides=st.lists(st.tuples(KEYS, VALUES), min_size=1, max_size=2))
def test_fuzzed_eval_overrides(finished_run, overrides):
    """``fedlora eval --set``: scores (only eval.jsonl written) or an error with the run directory unchanged."""
    (finished_run / "eval.jsonl").unlink(missing_ok=True)
    before = snapshot(finished_run.parent)
    pairs = [f"{key}={value}" for key, value in overrides]
    code, err = run_fedlora(["eval", "--run-dir", str(finished_run), "--no-progress", "--set", *pairs])
    event(f"exit {code}")
    assert "Traceback" not in err and "unexpected" not in err, err
    if code == 0:
        assert (finished_run / "eval.jsonl").is_file()
        (finished_run / "eval.jsonl").unlink()
    else:
        assert code == 2 and "fedlora: error: " in err, (code, err)
    assert snapshot(finished_run.parent) == before
