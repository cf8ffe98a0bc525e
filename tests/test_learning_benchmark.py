"""The learning benchmark (benchmarks/learning.py) end to end on a tiny model: rows, best-lr summary, table, plot."""

from __future__ import annotations

import json

from benchmarks import learning
from benchmarks.common import git_commit
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
        assert list(row["curve"]) == list(row["val_curve"]) == ["0", "1", "2"]
        assert row["settings"]["eval_steps"] == [0, 1, 2] and row["commit"] == git_commit()
    # validation and test are different rows: their losses differ
    assert all(row["curve"]["0"] != row["val_curve"]["0"] for row in rows)
    # step 0 is the untrained model: the same loss for every method and seed
    assert len({round(r["curve"]["0"], 5) for r in rows}) == 1

    summary = learning.summarize(rows, [0, 1, 2])
    feddora = [r for r in rows if r["method"] == "feddora"]
    for step in (1, 2):  # the lr is chosen on the validation rows, and a two-point grid brackets nothing
        best = min((1e-3, 3e-3), key=lambda lr: sum(r["val_curve"][str(step)] for r in feddora if r["lr"] == lr))
        assert summary["feddora"][step]["lr"] == best and summary["feddora"][step]["n"] == 2
        assert summary["feddora"][step]["bracketed"] is False
        test = [r["curve"][str(step)] for r in feddora if r["lr"] == best]
        assert summary["feddora"][step]["mean"] == sum(test) / 2
    bracket = [{"method": "m", "lr": lr, "seed": 0, "val_curve": {"1": v}, "curve": {"1": v}} for lr, v in
               ((1e-3, 2.0), (2e-3, 1.0), (3e-3, 1.5))]  # fmt: skip
    assert learning.summarize(bracket, [1])["m"][1] == {"lr": 2e-3, "mean": 1.0, "std": 0.0, "n": 1, "bracketed": True}
    assert learning.summarize(bracket[1:], [1])["m"][1]["bracketed"] is False
    table = (tmp_path / "tiny.md").read_text()
    assert "| feddora/zero_B |" in table and "(lr 0.01, at the grid edge)" in table
    assert (tmp_path / "tiny.png").read_bytes().startswith(b"\x89PNG")

    learning.main(argv)  # every run is in the jsonl already: nothing runs again
    assert len((tmp_path / "tiny.jsonl").read_text().splitlines()) == len(rows)
