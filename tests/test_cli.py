"""The `fedlora` command line: argument errors exit with status 2 and a message; train + eval end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedlora.cli import main
from tests.tiny import save_tiny_model


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
    assert "unknown strategy 'fedprox'" in fails(["train", "--strategy", "fedprox"], capsys)
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
    assert {r["client"] for r in rows if "client" in r} == {"client_0", "client_1"}
    assert all(r["round"] == 2 and "rougeL" not in r for r in rows)
    assert Path(out / "global_adapter/adapter_config.json").is_file()
