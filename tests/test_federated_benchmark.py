"""The federated benchmark (benchmarks/federated.py) in a tiny mode: well-formed rows, table and plot.

A tiny random Llama saved to disk stands in for SmolLM2; 2 clients of the packaged Dolly sample, 2 rounds each
evaluated, 2 strategies and the A-direction-only ablation, 2 seeds. Scores are never asserted, only that every
documented field is there with a sensible shape, and that the tables aggregate over seeds and pair by seed.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from benchmarks import federated
from benchmarks.common import git_commit
from tests.tiny import tiny_llama, tiny_tokenizer

STRATEGIES = ["fedlora-opt", "fedit", "fedlora-opt/shared-A-direction"]


@pytest.fixture
def restore_threads():
    """The benchmark's ``--cpu-threads`` sets a process-wide torch setting; put it back for the other tests."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_tiny_benchmark_writes_rows_table_and_plot(tmp_path, restore_threads):
    model_dir = tmp_path / "tiny-model"
    tokenizer = tiny_tokenizer()
    tiny_llama(len(tokenizer)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    settings = [
        "server.fraction=1",
        "data.num_clients=2",
        "data.max_examples=40",
        "data.max_length=64",
        "rounds=2",
        "client.steps=2",
        "adapter.target_modules=q_proj,v_proj",  # the cpu preset's names SmolLM2's top 15 layers
    ]
    settings += ["client.local_steps=1", "client.global_steps=1", "eval.every=1", "eval.rouge_examples=1"]
    settings += ["eval.max_new_tokens=4"]
    results = federated.main(
        ["--model", str(model_dir), "--data", "dolly-sample", "--out", str(tmp_path / "runs")]
        + [
            "--results-dir",
            str(tmp_path / "results"),
            "--strategies",
            *STRATEGIES,
            "--cpu-threads",
            "1",
            "--seeds",
            "0",
            "1",
            "--no-progress",
            "--set",
        ]
        + settings
    )

    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert [(row["variant"], row["seed"]) for row in rows] == [(v, seed) for seed in (0, 1) for v in STRATEGIES]
    for row in rows:
        assert row["final_round"] == 2 and row["partition"] == "dirichlet"
        assert row["command"].startswith("python -m benchmarks.federated")
        assert row["config"]["strategy"] == row["strategy"] and row["config"]["data"]["num_clients"] == 2
        for split in ("global", "local"):
            for metric in ("loss", "perplexity", "rougeL"):
                assert math.isfinite(row[split][metric]) and row[split][f"{metric}_std"] >= 0
        assert [point["round"] for point in row["curves"]] == [0, 1, 2]  # round 0: the base model
        assert all({"global_loss", "local_rougeL"} <= set(point) for point in row["curves"])
        assert len(row["bytes_sent_per_round"]) == 2 and min(row["bytes_sent_per_round"]) > 0
        assert row["trainable_params"] == row["shared_params"] + row["personal_params"] > 0
        assert row["wall_s"] > 0 and row["resumed"] is False
        assert row["commit"] == git_commit() and len(row["config_hash"]) == 16 and row["data_seed"] == row["seed"]
    # round 0 is the base model: the same scores for every variant of a seed
    for seed in (0, 1):
        initial = {round(r["curves"][0]["global_loss"], 5) for r in rows if r["seed"] == seed}
        assert len(initial) == 1
    opt, fedit, a_only = rows[:3]
    assert opt["personal_params"] > 0 and fedit["personal_params"] == 0
    # each of the 2 clients sends its shared float32 tensors once per round
    assert opt["bytes_sent_per_round"] == [2 * 4 * opt["shared_params"]] * 2
    # the B directions move from shared to personal; A directions stay shared
    assert a_only["config"]["adapter"]["tensor_roles"] == {"B.direction": "personal"}
    assert 0 < a_only["shared_params"] < opt["shared_params"] and a_only["trainable_params"] == opt["trainable_params"]
    assert a_only["overrides"] == {"adapter.tensor_roles": {"B.direction": "personal"}}

    heading, table, paired = results.with_suffix(".md").read_text().split("\n\n", 2)
    assert heading.startswith(f"Commit `{rows[0]['commit']}`")
    table = table.splitlines()
    assert len(table) == 2 + len(STRATEGIES)
    assert all(line.startswith("|") and line.count("|") == table[0].count("|") for line in table)
    assert all(line.split(" | ")[1] == "0,1" for line in table[2:])  # both seeds aggregated
    paired_rows = [line for line in paired.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [line.split(" | ")[0] for line in paired_rows] == ["| fedit", "| fedlora-opt/shared-A-direction"]
    d = rows[0]["global"]["loss"] - rows[1]["global"]["loss"]  # fedlora-opt minus fedit, seed 0
    assert f"{d:+.4f}" in paired_rows[0]
    assert results.with_suffix(".png").read_bytes().startswith(b"\x89PNG")

    # Provenance: a comparison mixing commits, or pairing rows of other data, is refused.
    foreign = {**rows[1], "commit": "0" * 40}
    results.write_text(results.read_text() + json.dumps(foreign) + "\n")
    with pytest.raises(ValueError, match="several commits"):
        federated.write_reports(results)
    other_data = {**rows[1], "config": {**rows[1]["config"], "data": {**rows[1]["config"]["data"], "seed": 99}}}
    with pytest.raises(ValueError, match="data settings differ"):
        federated.paired_table([rows[0], other_data])
    other_start = {**rows[1], "curves": [{**rows[1]["curves"][0], "global_loss": 99.0}, *rows[1]["curves"][1:]]}
    with pytest.raises(ValueError, match="round-0 global_loss"):
        federated.paired_table([rows[0], other_start])


def test_tune_lr_extends_an_edge_until_the_best_lr_is_bracketed():
    """A best lr at an edge of the grid adds the next point on that side (by the grid's ratio there) until a worse
    one is found, or the extensions run out."""
    tried = []

    def run(lr, optimum):
        tried.append(lr)
        loss = 2.0 + (math.log(lr) - math.log(optimum)) ** 2
        return {"global": {"loss": loss}, "local": {"loss": loss}, "lr": lr}

    variant = federated.VARIANTS_BY_NAME["fedit"]
    best, rows = federated.tune_lr(variant, [1e-3, 2e-3], 2, lambda lr: run(lr, 4e-3))
    assert best == 4e-3 and tried == [1e-3, 2e-3, 4e-3, 8e-3] and [row["lr"] for row in rows] == tried
    tried.clear()
    best, _ = federated.tune_lr(variant, [2e-3, 4e-3], 1, lambda lr: run(lr, 1e-4))  # the optimum lies beyond reach
    assert best == 1e-3 and tried == [2e-3, 4e-3, 1e-3]
    table = federated.tuning_table([row | {"variant": "fedit", "seed": 0} for row in rows])
    assert "| fedit | 0.004 |" in table and "**chosen**" in table and "grid edge" not in table


def test_split_halves_are_disjoint_and_cover_the_source(tmp_path):
    dolly = tmp_path / "dolly.jsonl"
    dolly.write_text("".join(json.dumps({"instruction": f"q{i}", "response": "a"}) + "\n" for i in range(7)))
    tune, report = federated.split_halves(dolly, "dolly", tmp_path / "out")
    tune_rows, report_rows = (path.read_text().splitlines() for path in (tune, report))
    assert len(tune_rows) == 3 and len(report_rows) == 4
    assert sorted(tune_rows + report_rows) == sorted(dolly.read_text().splitlines())
    ni = tmp_path / "ni"
    ni.mkdir()
    task = {"Definition": ["Count."], "Instances": [{"id": str(i), "input": "x", "output": ["y"]} for i in range(5)]}
    (ni / "task1_count.json").write_text(json.dumps(task))
    tune, report = federated.split_halves(ni, "ni", tmp_path / "ni-out")
    halves = [json.loads((half / "task1_count.json").read_text()) for half in (tune, report)]
    assert [[i["id"] for i in half["Instances"]] for half in halves] == [["1", "3"], ["0", "2", "4"]]
    assert all(half["Definition"] == ["Count."] for half in halves)


def test_tiny_benchmark_tunes_on_one_half_and_reports_on_the_other(tmp_path, restore_threads):
    model_dir = tmp_path / "tiny-model"
    tokenizer = tiny_tokenizer()
    tiny_llama(len(tokenizer)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    settings = ["server.fraction=1", "data.num_clients=2", "data.max_examples=40", "data.max_length=32", "rounds=1"]
    settings += ["client.steps=1", "adapter.target_modules=q_proj,v_proj", "eval.every=1", "eval.rouge_examples=0"]
    results = federated.main(
        ["--model", str(model_dir), "--data", "dolly-sample", "--out", str(tmp_path / "runs")]
        + ["--results-dir", str(tmp_path / "results"), "--strategies", "fedit", "--seeds", "0", "--no-progress"]
        + ["--tune-lr", "1e-3", "1e-2", "--tune-extend", "1", "--set", *settings]
    )
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    tuning = [row for row in rows if row["phase"] == "tune"]
    (report,) = [row for row in rows if row["phase"] == "report"]
    assert {1e-3, 1e-2} <= {row["lr"] for row in tuning} and len(tuning) == 3  # one edge extension
    best = min(tuning, key=federated.validation_score)
    assert report["lr"] == best["lr"] and report["config"]["client"]["lr"] == best["lr"]
    assert {row["config"]["data"]["path"] for row in tuning} == {str(tmp_path / "runs" / "tune-data.jsonl")}
    assert report["config"]["data"]["path"] == str(tmp_path / "runs" / "report-data.jsonl")
    text = results.with_suffix(".md").read_text()
    assert "Learning rates tuned on the tuning half" in text and "chosen" in text
