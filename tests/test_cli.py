"""The `fedlora` command line: argument errors exit with status 2 and a message; train + eval end to end; it
answers --help at once; --dry-run writes nothing; `config keys` lists every setting."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from fedlora.cli import main
from fedlora.federated.config import ClientSettings, RunConfig, config_leaves, load_config
from fedlora.federated.report import GLOBAL_MODEL
from fedlora.keys import KEY_HELP, TRAIN_FLAGS
from tests.tiny import save_tiny_model

ROOT = Path(__file__).resolve().parents[1]


def write_rows(path: Path, count: int = 40) -> Path:
    """``count`` short instruction rows over two categories, as a JSON-lines file."""
    rows = [
        {"instruction": f"What is {i} plus {i}?", "context": "", "response": f"It is {2 * i}.", "category": f"c{i % 2}"}
        for i in range(count)
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def fails(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_configuration_errors_exit_with_a_message(tmp_path, capsys):
    assert "unknown config key 'bogus'" in fails(["train", "--set", "bogus=1"], capsys)
    assert "--strategy: strategy must be one of [" in fails(["train", "--strategy", "fedprox"], capsys)
    assert "rounds must be at least 1" in fails(["train", "--rounds", "0"], capsys)
    assert "needs the directory" in fails(["train", "--resume"], capsys)
    assert "not a fedlora run directory" in fails(["train", "--resume", "--output-dir", str(tmp_path)], capsys)
    assert "not a fedlora run directory" in fails(["eval", "--run-dir", str(tmp_path)], capsys)
    (tmp_path / "notes.txt").write_text("keep")
    assert "not empty" in fails(["train", "--output-dir", str(tmp_path)], capsys)
    assert (tmp_path / "notes.txt").read_text() == "keep"


def test_train_then_eval_a_local_model(tmp_path, capsys):
    model_dir = save_tiny_model(tmp_path / "tiny-llama")
    data = write_rows(tmp_path / "rows.jsonl")
    out = tmp_path / "run"
    common = ["--set", "data.max_length=40", "data.min_examples=5", "adapter.r=2", "eval.rouge_examples=1"]
    argv = ["train", "--model", str(model_dir), "--data", str(data), "--num-clients", "2", "--rounds", "1"]
    assert main([*argv, "--output-dir", str(out), "--no-progress", *common, "eval.max_new_tokens=2"]) == 0
    assert "round 1/1" in capsys.readouterr().out
    # --resume continues the saved run with more rounds; the saved settings are reused.
    assert main(["train", "--output-dir", str(out), "--resume", "--rounds", "2", "--no-progress"]) == 0
    assert json.loads((out / "checkpoint/state.json").read_text())["round"] == 2
    assert main(["eval", "--run-dir", str(out), "--no-progress", "--set", "eval.rouge_examples=0"]) == 0
    rows = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    assert {(r["split"], r["client"]) for r in rows if "client" in r} == {
        ("global", GLOBAL_MODEL),
        ("local", "client_0"),
        ("local", "client_1"),
    }
    assert all(r["round"] == 2 and "rougeL" not in r for r in rows)
    assert Path(out / "global_adapter/adapter_config.json").is_file()


def python(*args: str) -> subprocess.CompletedProcess:
    """``python *args`` in a process of its own, in the repository root (so it imports this checkout's fedlora)."""
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT)


def fedlora_process(*argv: str) -> tuple[subprocess.CompletedProcess, float]:
    """``python -m fedlora *argv``, and how long it took."""
    started = time.perf_counter()
    result = python("-m", "fedlora", *argv)
    return result, time.perf_counter() - started


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["export", "--help"], ["--version"]])
def test_the_command_answers_at_once(argv):
    result, seconds = fedlora_process(*argv)
    assert result.returncode == 0, result.stderr
    assert seconds < 3, f"fedlora {' '.join(argv)} took {seconds:.1f} s"
    assert result.stdout.startswith("fedlora 0.1.0" if argv == ["--version"] else "usage: fedlora")


def test_the_cli_imports_no_heavy_library():
    code = "import sys, fedlora.cli; print(sorted({'torch', 'transformers', 'peft', 'flwr'} & set(sys.modules)))"
    assert python("-c", code).stdout.strip() == "[]"


@pytest.mark.parametrize(
    "imports",
    [
        "import fedlora, fedlora.tuners.feddora",
        "import fedlora, importlib.util; importlib.util.find_spec('peft'); import transformers, peft",  # found first
        "import peft, fedlora",  # PEFT first: it imported bitsandbytes itself
    ],
)
def test_importing_fedlora_registers_feddora_and_holds_back_bitsandbytes(imports):
    registered = "from peft import PEFT_TYPE_TO_CONFIG_MAPPING as types; print('FEDDORA' in types)"
    code = f"import sys; {imports}; print('bitsandbytes' in sys.modules); {registered}"
    result = python("-c", code)
    held_back = not imports.startswith("import peft")
    assert result.stdout.split() == [str(not held_back), "True"], result.stderr
    if held_back:
        assert "gemm_4bit" not in result.stderr, result.stderr


def test_bitsandbytes_loads_when_needed():
    code = "import fedlora, peft, bitsandbytes; from peft.import_utils import is_bnb_4bit_available as a; print(a())"
    assert (
        python("-c", code).stdout.strip() == "True"
    )  # bitsandbytes loads, and PEFT sees it, once a quantized base needs it


def test_dry_run_prints_the_config_and_writes_nothing(tmp_path, capsys, monkeypatch):
    model_dir = save_tiny_model(tmp_path / "tiny-llama")
    data = write_rows(tmp_path / "rows.jsonl")
    monkeypatch.chdir(tmp_path)
    before = sorted(tmp_path.rglob("*"))
    argv = ["train", "--model", str(model_dir), "--data", str(data), "--rounds", "3", "--set", "adapter.r=2"]
    assert main([*argv, "--dry-run"]) == 0
    out = capsys.readouterr().out
    printed = yaml.safe_load(out)
    assert (
        printed
        == load_config(
            None,
            [
                f"model.name={model_dir}",
                f"data.path={data}",
                "rounds=3",
                "adapter.r=2",
                f"output_dir={printed['output_dir']}",
            ],
        ).to_dict()
    )
    assert printed["output_dir"].startswith("runs/fedlora-opt-")
    assert f"# model: {model_dir} (directory); data: {data} (local file)" in out
    assert sorted(tmp_path.rglob("*")) == before  # not even runs/
    assert "does not exist" in fails([*argv, "--dry-run", "--data", str(tmp_path / "absent.jsonl")], capsys)
    assert "does not exist" in fails([*argv, "--dry-run", "--model", str(tmp_path / "absent")], capsys)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("")
    assert "not empty" in fails([*argv, "--dry-run", "--output-dir", str(tmp_path / "busy")], capsys)


def test_config_keys_lists_every_setting_with_type_default_and_help(capsys):
    assert set(KEY_HELP) == set(config_leaves(RunConfig()))  # a new setting needs its line of help
    assert main(["config", "keys"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line.split(maxsplit=3)[1:] for line in lines[1:]}
    assert list(rows) == list(config_leaves(RunConfig()))
    assert rows["client.local_lr"][:2] == ["float", str(ClientSettings.local_lr)]
    assert rows["server.optimizer"][:2] == ["fedavg|fedavgm|fedadam|fedyogi", "fedavg"]
    assert rows["data.seed"][:2] == ["int|none", "none"]
    assert rows["strategy"][0].startswith("fedlora-opt|fedlora-opt-shared-magnitudes|fedit|")


def test_train_flags_and_eval_example_name_real_keys(capsys):
    leaves = config_leaves(RunConfig())
    assert set(TRAIN_FLAGS.values()) <= set(leaves)
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    example = re.search(r"e\.g\. --set (.+?)(?: --|$)", help_text).group(1).split()
    assert example and all(item.split("=")[0] in leaves and item.startswith("eval.") for item in example)
    assert "--num-clients: data.num_clients must be" in fails(["train", "--num-clients", "many"], capsys)
