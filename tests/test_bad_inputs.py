"""Bad inputs (issue #8): each is rejected with an error naming the problem, before the run directory is written.

Every case starts a run (``train``, ``evaluate_run`` or the ``fedlora`` command) on a tiny in-memory model, expects
the error type and message, and checks the output directory afterwards: still absent for a fresh run, byte for
byte unchanged for an existing one.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import huggingface_hub
import pytest
from peft import get_peft_model

from fedlora.cli import main
from fedlora.data.loaders import load_instruction_dataset
from fedlora.federated.build import check_adapter_dir
from fedlora.federated.config import build_config, load_config, save_config
from fedlora.federated.run import evaluate_run, train
from fedlora.federated.strategy import STRATEGIES
from fedlora.models import load_model_and_tokenizer
from tests.tiny import save_tiny_model, tiny_llama, tiny_tokenizer

ROWS = [
    {"instruction": f"What is {i} plus {i}?", "context": "", "response": f"It is {2 * i}.", "category": f"c{i % 2}"}
    for i in range(40)
]
SETTINGS = [
    "rounds=1",
    "data.num_clients=2",
    "data.min_examples=5",
    "data.max_length=40",
    "adapter.r=2",
    "eval.rouge_examples=0",
]


def jsonl(rows: list[object]) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


DEEP = '{"instruction": ' + "[" * 5000 + "]" * 5000 + "}"  # a row nested deeper than Python's recursion limit


def files(path: Path) -> dict[str, bytes] | None:
    """Every file under ``path`` with its bytes; None when ``path`` does not exist."""
    if not path.exists():
        return None
    return {str(file.relative_to(path)): file.read_bytes() for file in sorted(path.rglob("*")) if file.is_file()}


def run_config(tmp_path: Path, *overrides: str, config_file: Path | None = None):
    """The test run: ``rows.jsonl`` in ``tmp_path`` split over 2 clients, output to ``tmp_path / "run"``."""
    base = [f"data.path={tmp_path / 'rows.jsonl'}", f"output_dir={tmp_path / 'run'}", *SETTINGS]
    return load_config(config_file, [*base, *overrides])


def start(tmp_path: Path, *overrides: str, config_file: Path | None = None, resume: bool = False, tokenizer=None):
    tokenizer = tokenizer or tiny_tokenizer()
    config = run_config(tmp_path, *overrides, config_file=config_file)
    return train(config, resume=resume, model=tiny_llama(len(tokenizer)), tokenizer=tokenizer, progress=False)


def rejected_before_writing(action, error: type[Exception], match: str, run_dir: Path) -> None:
    before = files(run_dir)
    with pytest.raises(error, match=match):
        action()
    assert files(run_dir) == before


@pytest.fixture
def rows_file(tmp_path) -> Path:
    path = tmp_path / "rows.jsonl"
    path.write_text(jsonl(ROWS))
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama")


# ---------------------------------------------------------------------------- configuration, strategy, adapter shape


@pytest.mark.bad_input
@pytest.mark.parametrize(
    ("overrides", "config_file", "error", "match"),
    [
        pytest.param(["rounds=two"], None, ValueError, r"rounds must be an int; got 'two'", id="wrong-type"),
        pytest.param(
            ["data.test_fraction=1.5"], None, ValueError, r"data.test_fraction must be in \(0, 1\)", id="range"
        ),
        pytest.param(["data.min_examples=0"], None, ValueError, r"data.min_examples must be at least 1", id="range-2"),
        pytest.param(["data.colums=x"], None, ValueError, r"unknown config key 'data.colums'", id="unknown-key"),
        pytest.param(
            ["client.lr.=0.1"],
            None,
            ValueError,
            r"override 'client.lr.=0.1': key 'client.lr.' has an empty part between dots",
            id="empty-key-part",
        ),
        pytest.param(
            ["client..lr=0.1"], None, ValueError, r"key 'client..lr' has an empty part", id="empty-key-part-2"
        ),
        pytest.param([], ("run.yaml", "rounds: [1\n"), ValueError, r"config file .*run.yaml: while parsing", id="yaml"),
        pytest.param([], ("run.toml", "rounds =\n"), ValueError, r"config file .*run.toml: Invalid value", id="toml"),
        pytest.param([], ("run.json", '{"rounds": 1,}'), ValueError, r"config file .*run.json: Expecting", id="json"),
        pytest.param([], ("run.yaml", "- rounds\n"), ValueError, r"must hold a mapping at the top level", id="not-map"),
        pytest.param(
            [], ("run.json", DEEP), ValueError, r"config file .*run.json: values nest too deeply", id="deep-json"
        ),
        pytest.param([], ("run.ini", "rounds=1\n"), ValueError, r"run.ini: unsupported type '.ini'", id="file-type"),
        pytest.param(
            [], ("missing.yaml", None), FileNotFoundError, r"config file .*missing.yaml not found", id="no-file"
        ),
        pytest.param(
            ["strategy=fedprox"],
            None,
            ValueError,
            r"strategy must be one of \['fedlora-opt', .*\]; got 'fedprox'",
            id="strategy",
        ),
        pytest.param(
            ["adapter.target_modules=qkv_proj"],
            None,
            ValueError,
            r"Target modules \{'qkv_proj'\} not found in the base model",
            id="target-modules-match-nothing",
        ),
    ],
)
def test_bad_configuration(tmp_path, rows_file, overrides, config_file, error, match):
    path = None
    if config_file is not None:
        name, text = config_file
        path = tmp_path / name
        if text is not None:
            path.write_text(text)
    rejected_before_writing(lambda: start(tmp_path, *overrides, config_file=path), error, match, tmp_path / "run")


# ------------------------------------------------------------------------------------------------------ data files


@pytest.mark.bad_input
@pytest.mark.parametrize(
    ("name", "text", "match"),
    [
        pytest.param("rows.jsonl", "", r"rows.jsonl: the dataset is empty", id="empty-file"),
        pytest.param("rows.json", "[]", r"rows.json: the dataset is empty", id="empty-array"),
        pytest.param("rows.csv", "", r"rows.csv: the dataset is empty", id="empty-csv"),
        pytest.param(
            "rows.jsonl", jsonl([*ROWS, [1, 2]]), r"rows.jsonl: line 41 is not a JSON object: \[1, 2\]", id="row-list"
        ),
        pytest.param(
            "rows.json", json.dumps([*ROWS, "hi"]), r"rows.json: row 41 is not a JSON object: 'hi'", id="item-str"
        ),
        pytest.param(
            "rows.jsonl",
            jsonl(ROWS) + '{"instruction": "q",\n',
            r"rows.jsonl: invalid JSON at line 41, column 21: Expecting property name",
            id="invalid-json",
        ),
        pytest.param(
            "rows.jsonl",
            jsonl([{**row, "response": " "} for row in ROWS]),
            r"rows.jsonl: no rows left after dropping 40 with an empty instruction or response",
            id="empty-responses",
        ),
        pytest.param(
            "rows.jsonl",
            jsonl([*ROWS[:2], {**ROWS[2], "response": 6}, *ROWS[3:]]),
            r"rows.jsonl: row 3: column 'response' holds int 6, not a string",
            id="number-value",
        ),
        pytest.param(
            "rows.jsonl",
            jsonl([{**row, "instruction": [row["instruction"]]} for row in ROWS]),
            r"rows.jsonl: row 1: column 'instruction' holds list \['What is 0 plus 0\?'\], not a string",
            id="list-value",
        ),
        pytest.param(
            "rows.jsonl",
            jsonl([{"prompt": row["instruction"], "response": row["response"]} for row in ROWS]),
            r"rows.jsonl: column 'instruction' \(for 'instruction'\) not found; available columns: \['prompt', 'response'\]",
            id="missing-column",
        ),
        pytest.param(
            "rows.jsonl",
            jsonl(ROWS[:3]) + DEEP + "\n",
            r"rows.jsonl: line 4: values nest too deeply to read",
            id="deep-jsonl",
        ),
        pytest.param(
            "rows.json",
            "[\n" + ",\n".join([*map(json.dumps, ROWS[:3]), DEEP]) + "\n]",
            r"rows.json: row 4 \(line 5\): values nest too deeply to read",
            id="deep-json",
        ),
        pytest.param(
            "rows.csv",
            "instruction,response,category\nq,a,c\nq,a,c,extra\n",
            r"rows.csv: line 3 has 4 cells, the header 3",
            id="csv-extra-cell",
        ),
    ],
)
def test_bad_data_file(tmp_path, name, text, match):
    (tmp_path / name).write_text(text)
    action = lambda: start(tmp_path, f"data.path={tmp_path / name}")  # noqa: E731
    rejected_before_writing(action, ValueError, match, tmp_path / "run")


@pytest.mark.bad_input
@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("rows.csv", "q,a,category\n" + "".join(f"{row['instruction']},{row['response']},c\n" for row in ROWS)),
        ("rows.jsonl", jsonl([{"q": row["instruction"], "a": row["response"]} for row in ROWS])),
        ("rows.json", json.dumps([{"q": row["instruction"], "a": row["response"]} for row in ROWS])),
    ],
)
def test_a_byte_order_mark_is_skipped(tmp_path, name, text):
    """A file that starts with a UTF-8 byte-order mark (Excel's "CSV UTF-8") reads as the same file without it: the
    first column is ``q``, not ``'\\ufeffq'``."""
    (tmp_path / name).write_text("\ufeff" + text, encoding="utf-8")
    rows = load_instruction_dataset(tmp_path / name, {"instruction": "q", "response": "a"})
    assert rows["instruction"] == [row["instruction"] for row in ROWS]


@pytest.mark.bad_input
@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        pytest.param(
            ["data.partition=iid", "data.num_clients=8", "data.min_examples=10"],
            r"clients with fewer than min_examples=10 examples: \{'client_0': 5, ",
            id="too-few-examples",
        ),
        pytest.param(["data.num_clients=50"], r"cannot split 40 examples across 50 clients", id="zero-examples"),
        pytest.param(
            ["data.partition=iid", "data.num_clients=20", "data.min_examples=1", "data.test_fraction=0.9"],
            r"client 'client_00': cannot split 2 examples into non-empty train and test",
            id="no-train-split",
        ),
    ],
)
def test_client_without_enough_examples(tmp_path, rows_file, overrides, match):
    rejected_before_writing(lambda: start(tmp_path, *overrides), ValueError, match, tmp_path / "run")


# ------------------------------------------------------------------------------------------- model and tokenizer


@pytest.mark.bad_input
def test_tokenizer_without_pad_or_eos(tmp_path, rows_file):
    tokenizer = tiny_tokenizer()
    tokenizer.eos_token = None
    action = lambda: start(tmp_path, tokenizer=tokenizer)  # noqa: E731
    rejected_before_writing(action, ValueError, r"tokenizer .* has no EOS token", tmp_path / "run")


def test_tokenizer_without_pad_uses_eos_and_says_so(model_dir, caplog):
    with caplog.at_level(logging.INFO, logger="fedlora.data.tokenization"):
        _, tokenizer = load_model_and_tokenizer(str(model_dir))
    assert tokenizer.pad_token == tokenizer.eos_token == "</s>"
    assert "has no pad token; using its EOS token '</s>' as pad" in caplog.text


@pytest.mark.bad_input
@pytest.mark.parametrize(
    ("name", "error", "match"),
    [
        pytest.param(
            "{tmp}/no/such/model", FileNotFoundError, r"Model directory '.*/no/such/model' does not exist", id="dir"
        ),
        pytest.param("{tmp}/rows.jsonl", ValueError, r"is a file but not a .gguf file", id="file"),
        pytest.param("{tmp}/model.gguf", FileNotFoundError, r"GGUF file '.*model.gguf' does not exist", id="gguf"),
        pytest.param("{tmp}", FileNotFoundError, r"Model directory '.*' has no config.json", id="not-a-model-dir"),
        pytest.param(
            "no-such-org/no-such-model",
            FileNotFoundError,
            r"Could not load model 'no-such-org/no-such-model': .* hub id could not be fetched .* Offline, pass",
            id="hub-id-offline",
        ),
    ],
)
def test_model_that_cannot_be_found(tmp_path, rows_file, monkeypatch, name, error, match):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read once, at import
    config = run_config(tmp_path, f"model.name={name.format(tmp=tmp_path)}")
    rejected_before_writing(lambda: train(config, progress=False), error, match, tmp_path / "run")


# ------------------------------------------------------------------------------------ run directory and resuming


@pytest.mark.bad_input
def test_non_empty_output_dir_without_resume(tmp_path, rows_file):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("keep")
    rejected_before_writing(lambda: start(tmp_path), FileExistsError, r"run exists and is not empty", tmp_path / "run")


@pytest.mark.bad_input
def test_resume_without_a_run(tmp_path, rows_file):
    action = lambda: start(tmp_path, resume=True)  # noqa: E731
    rejected_before_writing(action, FileNotFoundError, r"run is not a fedlora run directory", tmp_path / "run")


@pytest.mark.bad_input
def test_resume_with_a_changed_configuration(tmp_path, rows_file):
    (tmp_path / "run").mkdir()
    save_config(run_config(tmp_path), tmp_path / "run" / "config.yaml")
    action = lambda: start(tmp_path, "client.lr=0.5", "adapter.r=4", resume=True)  # noqa: E731
    match = r"differs from the saved run in \['adapter.r', 'client.lr'\]"
    rejected_before_writing(action, ValueError, match, tmp_path / "run")


ADAPTERS = [  # how the saved global_adapter/ differs from the run's (fedlora-opt, r=2, q_proj+v_proj, in-memory model)
    pytest.param("fedit", [], None, r"its peft_type is 'LORA' but this run's is 'FEDDORA'", id="peft-type"),
    pytest.param("fedlora-opt", ["adapter.r=4"], None, r"its r is 4 but this run's is 2", id="rank"),
    pytest.param("fedlora-opt", ["adapter.alpha=4"], None, r"its lora_alpha is 4.0 but this run's is 16.0", id="alpha"),
    pytest.param(
        "fedlora-opt",
        ["adapter.target_modules=q_proj"],
        None,
        r"its target_modules is \['q_proj'\] but this run's is \['q_proj', 'v_proj'\]",
        id="target-modules",
    ),
    pytest.param(
        "fed-dora",
        [],
        None,
        r"its tensor_roles is \{.*'A.magnitude': 'shared'.*\} but this run's is \{.*'A.magnitude': 'personal'",
        id="roles",
    ),
    pytest.param(
        "fedlora-opt",
        [],
        "org/other-model",
        r"its base_model_name_or_path is 'org/other-model' but this run's is None",
        id="base-model",
    ),
]


def save_run_with_adapter(tmp_path: Path, strategy: str, overrides: list[str], base_model: str | None) -> Path:
    """A run directory (this test run's config.yaml) whose ``global_adapter/`` was saved with other settings."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    save_config(run_config(tmp_path), run_dir / "config.yaml")
    other = build_config({}, [*SETTINGS, f"strategy={strategy}", *overrides])
    model = tiny_llama(len(tiny_tokenizer()))
    model.name_or_path = base_model
    peft_model = get_peft_model(model, STRATEGIES[strategy].peft_config(other.adapter))
    peft_model.save_pretrained(run_dir / "global_adapter", save_embedding_layers=False)  # no lookup of base_model
    return run_dir


@pytest.mark.bad_input
@pytest.mark.parametrize("entry", ["resume", "eval"])
@pytest.mark.parametrize(("strategy", "overrides", "base_model", "match"), ADAPTERS)
def test_incompatible_adapter_dir(tmp_path, rows_file, entry, strategy, overrides, base_model, match):
    run_dir = save_run_with_adapter(tmp_path, strategy, overrides, base_model)
    tokenizer = tiny_tokenizer()
    if entry == "resume":
        action = lambda: start(tmp_path, resume=True, tokenizer=tokenizer)  # noqa: E731
    else:
        action = lambda: evaluate_run(run_dir, model=tiny_llama(len(tokenizer)), tokenizer=tokenizer, progress=False)  # noqa: E731
    rejected_before_writing(action, ValueError, rf"global_adapter does not fit this run: {match}", run_dir)


def test_matching_adapter_dir_passes_the_check(tmp_path):
    """All-linear adapters are saved with the module names, and a local base model may have moved."""
    config = build_config({}, [*SETTINGS, "adapter.target_modules=all-linear"])
    peft_config = STRATEGIES[config.strategy].peft_config
    saved = tiny_llama()
    saved.name_or_path = "/home/someone/models/tiny-llama"
    get_peft_model(saved, peft_config(config.adapter)).save_pretrained(
        tmp_path / "adapter", save_embedding_layers=False
    )
    here = tiny_llama()
    here.name_or_path = str(tmp_path / "tiny-llama")
    check_adapter_dir(tmp_path / "adapter", peft_config(config.adapter), here)
    with pytest.raises(ValueError, match=r"its target_modules is \['model.layers.0.mlp.down_proj', "):
        check_adapter_dir(tmp_path / "adapter", peft_config(build_config({}, SETTINGS).adapter), here)
    with pytest.raises(FileNotFoundError, match=r"is not a saved adapter \(no adapter_config.json\)"):
        check_adapter_dir(tmp_path, peft_config(config.adapter), here)


# ---------------------------------------------------------------------------------------- the command line


@pytest.mark.bad_input
@pytest.mark.parametrize(
    ("argv", "match"),
    [
        pytest.param(["--config", "{tmp}/rows.yaml"], r"config file .*rows.yaml: while parsing", id="bad-yaml"),
        pytest.param(["--model", "{tmp}/no/model"], r"Model directory '.*/no/model' does not exist", id="no-model"),
        pytest.param(
            ["--model", "{model}", "--data", "{tmp}/rows.jsonl"],
            r"rows.jsonl: line 2 is not a JSON object",
            id="bad-row",
        ),
    ],
)
def test_command_line_reports_bad_input(tmp_path, model_dir, capsys, argv, match):
    (tmp_path / "rows.yaml").write_text("rounds: [1\n")
    (tmp_path / "rows.jsonl").write_text(jsonl([ROWS[0], "not a row"]))
    args = [arg.format(tmp=tmp_path, model=model_dir) for arg in argv]
    with pytest.raises(SystemExit) as exit_info:
        main(["train", *args, "--output-dir", str(tmp_path / "run"), "--no-progress"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert re.search(f"fedlora: error: .*{match}", err), err
    assert not (tmp_path / "run").exists()
