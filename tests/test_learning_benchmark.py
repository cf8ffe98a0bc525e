"""The learning benchmark (benchmarks/learning.py) end to end on a tiny model: rows, best-lr summary, table, plot."""

from __future__ import annotations

import json

from benchmarks import learning
from fedlora.data.samples import DOLLY_SAMPLE
from tests.tiny import tiny_llama, tiny_tokenizer


def test_tiny_learning_benchmark(tmp_path):
    model_dir = tmp_path / "tiny-model"
    tokenizer = tiny_tokenizer()
    tiny_llama(len(tokenizer)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    methods = ["peft-lora@1e-3", "feddora@1e-3", "feddora@3e-3", "feddora/zero_B@1e-2"]
    argv = ["--model", str(model_dir), "--data", str(DOLLY_SAMPLE), "--steps", "1", "2", "--seeds", "2"]
    argv += ["--workers", "1", "--results-dir", str(tmp_path), "--name", "tiny", "--methods", *methods]
    learning.main(argv)

    rows = [json.loads(line) for line in (tmp_path / "tiny.jsonl").read_text().splitlines()]
    assert sorted((r["method"], r["lr"], r["seed"]) for r in rows) == sorted(
        (m.split("@")[0], float(m.split("@")[1]), seed) for m in methods for seed in (0, 1)
    )
    for row in rows:
        assert list(row["curve"]) == ["0", "1", "2"] and row["settings"]["eval_steps"] == [0, 1, 2]
    # step 0 is the untrained model: the same loss for every method and seed
    assert len({round(r["curve"]["0"], 5) for r in rows}) == 1

    summary = learning.summarize(rows, [0, 1, 2])
    feddora = [r for r in rows if r["method"] == "feddora"]
    for step in (1, 2):
        best = min((1e-3, 3e-3), key=lambda lr: sum(r["curve"][str(step)] for r in feddora if r["lr"] == lr))
        assert summary["feddora"][step]["lr"] == best and summary["feddora"][step]["n"] == 2
    table = (tmp_path / "tiny.md").read_text()
    assert "| feddora/zero_B |" in table and "(lr 0.01)" in table
    assert (tmp_path / "tiny.png").read_bytes().startswith(b"\x89PNG")

    learning.main(argv)  # every run is in the jsonl already: nothing runs again
    assert len((tmp_path / "tiny.jsonl").read_text().splitlines()) == len(rows)
