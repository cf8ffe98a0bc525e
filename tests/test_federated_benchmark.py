"""The federated benchmark (benchmarks/federated.py) in a tiny mode: well-formed rows, table and plot.

A tiny random Llama saved to disk stands in for SmolLM2; 2 clients of the packaged Dolly sample, 2 rounds each
evaluated, 2 strategies and the A-direction-only ablation. Scores are never asserted, only that every documented
field is there with a sensible shape.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from benchmarks import federated
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
            "--no-progress",
            "--set",
        ]
        + settings
    )

    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert [row["variant"] for row in rows] == STRATEGIES
    for row in rows:
        assert row["final_round"] == 2 and row["seed"] == 0 and row["partition"] == "dirichlet"
        assert row["command"].startswith("python -m benchmarks.federated")
        assert row["config"]["strategy"] == row["strategy"] and row["config"]["data"]["num_clients"] == 2
        for split in ("global", "local"):
            for metric in ("loss", "perplexity", "rougeL"):
                assert math.isfinite(row[split][metric]) and row[split][f"{metric}_std"] >= 0
        assert [point["round"] for point in row["curves"]] == [1, 2]
        assert all({"global_loss", "local_rougeL"} <= set(point) for point in row["curves"])
        assert len(row["bytes_sent_per_round"]) == 2 and min(row["bytes_sent_per_round"]) > 0
        assert row["trainable_params"] == row["shared_params"] + row["personal_params"] > 0
        assert row["wall_s"] > 0 and row["resumed"] is False
    opt, fedit, a_only = rows
    assert opt["personal_params"] > 0 and fedit["personal_params"] == 0
    # each of the 2 clients sends its shared float32 tensors once per round
    assert opt["bytes_sent_per_round"] == [2 * 4 * opt["shared_params"]] * 2
    # the B directions move from shared to personal; A directions stay shared
    assert a_only["config"]["adapter"]["tensor_roles"] == {"B.direction": "personal"}
    assert 0 < a_only["shared_params"] < opt["shared_params"] and a_only["trainable_params"] == opt["trainable_params"]
    assert a_only["overrides"] == {"adapter.tensor_roles": {"B.direction": "personal"}}

    table = results.with_suffix(".md").read_text().splitlines()
    assert len(table) == 2 + len(STRATEGIES)
    assert all(line.startswith("|") and line.count("|") == table[0].count("|") for line in table)
    assert results.with_suffix(".png").read_bytes().startswith(b"\x89PNG")
