"""Data layer: loaders, partitioners, tokenisation/label masking, collator and build_federated_data."""

from __future__ import annotations

import csv
import json
import logging
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from datasets import Dataset

from fedlora.data import (
    COLUMNS,
    IGNORE_INDEX,
    CausalLMCollator,
    DataConfig,
    build_federated_data,
    dirichlet_partition,
    ensure_pad_token,
    format_prompt,
    iid_partition,
    label_partition,
    load_dolly,
    load_instruction_dataset,
    load_natural_instructions,
    sample_indices,
    split_train_test,
    tokenize_dataset,
)
from fedlora.data.samples import DOLLY_SAMPLE
from tests.tiny import tiny_tokenizer

DOLLY = DOLLY_SAMPLE  # the packaged 400-row Dolly sample, 50 rows per category
DOLLY_ROWS = 400


@pytest.fixture(scope="module")
def dolly_rows() -> list[dict]:
    with DOLLY.open() as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def dolly_slice(dolly_rows, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("dolly") / "dolly-slice.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in dolly_rows))
    return path


def write_ni_task(directory: Path, name: str, outputs: list[list[str]]) -> Path:
    task = {
        "Definition": [f"Definition of {name}."],
        "Positive Examples": [],
        "Instances": [
            {"id": f"{name}-{i}", "input": f"input {i} of {name}", "output": out} for i, out in enumerate(outputs)
        ],
    }
    path = directory / f"{name}.json"
    path.write_text(json.dumps(task))
    return path


@pytest.fixture
def ni_dir(tmp_path) -> Path:
    directory = tmp_path / "tasks"
    directory.mkdir()
    for number, size in [(1, 12), (22, 15), (333, 20)]:
        write_ni_task(directory, f"task{number:03d}_demo", [[f"answer {i}", "alt"] for i in range(size)])
    return directory


# ---------------------------------------------------------------------------------------------------------- loaders


def test_load_dolly_slice_normalises_columns(dolly_rows, dolly_slice):
    ds = load_dolly(dolly_slice)
    assert tuple(ds.column_names) == COLUMNS
    assert len(ds) == DOLLY_ROWS
    assert ds["label"] == [row["category"] for row in dolly_rows]
    assert ds[0]["instruction"] == dolly_rows[0]["instruction"].strip()
    assert len(set(ds["label"])) == 8


def test_generic_csv_and_jsonl_with_column_mapping(tmp_path, caplog):
    rows = [
        {"question": "What is 2+2?", "answer": "4", "passage": "", "topic": "math"},
        {"question": "Capital of France?", "answer": "Paris", "passage": "France is in Europe.", "topic": "geo"},
        {"question": "Dropped row", "answer": "   ", "passage": "x", "topic": "geo"},
    ]
    csv_path, jsonl_path = tmp_path / "data.csv", tmp_path / "data.jsonl"
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    jsonl_path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    mapping = {"instruction": "question", "response": "answer", "context": "passage", "label": "topic"}
    with caplog.at_level(logging.WARNING, logger="fedlora.data.loaders"):
        from_csv = load_instruction_dataset(csv_path, mapping)
        from_jsonl = load_instruction_dataset(jsonl_path, mapping)
    assert "dropped 1 of 3 rows" in caplog.text
    assert from_csv.to_list() == from_jsonl.to_list()
    assert from_csv.to_list() == [
        {"instruction": "What is 2+2?", "context": "", "response": "4", "label": "math", "history": "[]"},
        {
            "instruction": "Capital of France?",
            "context": "France is in Europe.",
            "response": "Paris",
            "label": "geo",
            "history": "[]",
        },
    ]
    # Unmapped optional columns become empty strings.
    minimal = load_instruction_dataset(jsonl_path, {"instruction": "question", "response": "answer"})
    assert set(minimal["label"]) == {""} and set(minimal["context"]) == {""}


def test_loader_errors_are_clear(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    with pytest.raises(ValueError, match=r"column 'prompt' \(for 'instruction'\) not found; available columns: \["):
        load_instruction_dataset(path, {"instruction": "prompt", "response": "answer"})
    with pytest.raises(ValueError, match="unknown target column"):
        load_instruction_dataset(path, {"question": "instruction"})
    with pytest.raises(FileNotFoundError, match="no such data file"):
        load_instruction_dataset(tmp_path / "missing.jsonl")
    (tmp_path / "data.txt").write_text("text")
    with pytest.raises(ValueError, match="unsupported file type"):
        load_instruction_dataset(tmp_path / "data.txt")
    path.write_text(json.dumps({"instruction": "q", "response": ""}) + "\n")
    with pytest.raises(ValueError, match="no rows left"):
        load_instruction_dataset(path)


def test_natural_instructions_one_dataset_per_task(ni_dir):
    tasks = load_natural_instructions(ni_dir)
    assert [ds[0]["label"] for ds in tasks] == ["task001_demo", "task022_demo", "task333_demo"]
    assert [len(ds) for ds in tasks] == [12, 15, 20]
    first = tasks[0][3]
    assert first == {
        "instruction": "Definition of task001_demo.",
        "context": "input 3 of task001_demo",
        "response": "answer 3",
        "label": "task001_demo",
        "history": "[]",
    }
    listed = load_natural_instructions([ni_dir / "task333_demo.json", ni_dir / "task001_demo.json"])
    assert [ds[0]["label"] for ds in listed] == ["task001_demo", "task333_demo"]


def test_natural_instructions_errors(tmp_path, ni_dir):
    with pytest.raises(FileNotFoundError, match="holds no Natural Instructions task files"):
        load_natural_instructions(tmp_path)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_natural_instructions([ni_dir / "task999_missing.json"])
    bad = tmp_path / "task5_bad.json"
    bad.write_text(json.dumps({"Instances": []}))
    with pytest.raises(ValueError, match="no 'Definition' key"):
        load_natural_instructions([bad])
    empty = write_ni_task(tmp_path, "task6_empty", [])
    with pytest.raises(ValueError, match="empty"):
        load_natural_instructions([empty])


# ------------------------------------------------------------------------------------------------------ partitioners

LABELS = [f"label{i % 5}" for i in range(500)] + ["label0"] * 100


def assert_exact_cover(parts: list[list[int]], n: int) -> None:
    flat = [i for part in parts for i in part]
    assert sorted(flat) == list(range(n))


def test_iid_partition_covers_evenly_and_is_seeded():
    parts = iid_partition(103, 10, seed=1)
    assert_exact_cover(parts, 103)
    assert {len(p) for p in parts} == {10, 11}
    assert parts == iid_partition(103, 10, seed=1)
    assert parts != iid_partition(103, 10, seed=2)
    with pytest.raises(ValueError, match="cannot split 5 examples across 10 clients"):
        iid_partition(5, 10, seed=0)


def label_skew(parts: list[list[int]]) -> float:
    """Mean over clients of the largest label's share: 1 = one label per client."""
    return float(np.mean([max(Counter(LABELS[i] for i in p).values()) / len(p) for p in parts]))


def test_dirichlet_partition_covers_is_seeded_and_respects_min_examples():
    parts = dirichlet_partition(LABELS, num_clients=8, alpha=0.5, seed=3, min_examples=20)
    assert_exact_cover(parts, len(LABELS))
    assert min(len(p) for p in parts) >= 20
    assert parts == dirichlet_partition(LABELS, num_clients=8, alpha=0.5, seed=3, min_examples=20)
    assert parts != dirichlet_partition(LABELS, num_clients=8, alpha=0.5, seed=4, min_examples=20)


def test_dirichlet_small_alpha_is_heterogeneous_large_alpha_is_not():
    skewed = dirichlet_partition(LABELS, num_clients=5, alpha=0.05, seed=0, min_examples=5)
    uniform = dirichlet_partition(LABELS, num_clients=5, alpha=1000.0, seed=0, min_examples=5)
    assert label_skew(skewed) > 0.7
    assert label_skew(uniform) < 0.45


def test_dirichlet_errors():
    with pytest.raises(ValueError, match="alpha must be positive"):
        dirichlet_partition(LABELS, 4, alpha=0.0, seed=0)
    with pytest.raises(ValueError, match="cannot give 10 clients 100 examples each"):
        dirichlet_partition(LABELS, 10, alpha=1.0, seed=0, min_examples=100)
    with pytest.raises(ValueError, match="fewer than 55 examples in 3 attempts; raise alpha"):
        dirichlet_partition(LABELS, 10, alpha=0.01, seed=0, min_examples=55, max_attempts=3)


def test_label_partition_one_label_per_client():
    parts = label_partition(LABELS, 5)
    assert_exact_cover(parts, len(LABELS))
    assert [{LABELS[i] for i in p} for p in parts] == [{f"label{k}"} for k in range(5)]
    with pytest.raises(ValueError, match=r"num_clients == number of labels \(5"):
        label_partition(LABELS, 4)


def test_sample_indices_is_seeded_and_bounded():
    assert sample_indices(50, 10, 7) == sample_indices(50, 10, 7)
    assert len(set(sample_indices(50, 10, 7))) == 10
    assert sample_indices(5, 10, 7) == [0, 1, 2, 3, 4]


def test_split_train_test():
    ds = Dataset.from_dict({"x": list(range(21))})
    train, test = split_train_test(ds, 0.2, seed=0)
    assert len(test) == 4 and len(train) == 17
    assert sorted([*train["x"], *test["x"]]) == list(range(21))
    assert list(test["x"]) == list(split_train_test(ds, 0.2, seed=0)[1]["x"])
    with pytest.raises(ValueError, match="non-empty train and test"):
        split_train_test(ds.select([0]), 0.5, seed=0)


# ------------------------------------------------------------------------------------------------------ tokenisation


def example(instruction="Name a colour.", context="", response="Blue is a colour."):
    return Dataset.from_dict({"instruction": [instruction], "context": [context], "response": [response]})


def test_labels_mask_prompt_and_keep_response_with_eos():
    tokenizer = tiny_tokenizer()
    row = tokenize_dataset(example(context="Colours are nice."), tokenizer, max_length=256)[0]
    prompt_ids = tokenizer(format_prompt("Name a colour.", "Colours are nice."))["input_ids"]
    n = len(prompt_ids)
    assert row["input_ids"][:n] == prompt_ids and prompt_ids[0] == tokenizer.bos_token_id
    assert row["labels"][:n] == [IGNORE_INDEX] * n
    assert row["labels"][n:] == row["input_ids"][n:]
    assert row["input_ids"][-1] == tokenizer.eos_token_id
    assert tokenizer.decode(row["labels"][n:-1]) == "Blue is a colour."


def test_truncation_keeps_prompt_ends_and_part_of_response():
    tokenizer = tiny_tokenizer()
    long = example(context="filler words " * 200, response="the answer " * 50)
    row = tokenize_dataset(long, tokenizer, max_length=64)[0]
    assert len(row["input_ids"]) == 64
    response_tokens = sum(label != IGNORE_INDEX for label in row["labels"])
    assert response_tokens >= 16
    prompt = tokenizer.decode(row["input_ids"][: 64 - response_tokens])
    assert prompt.startswith("<s>### Instruction:\nName a colour.") and prompt.endswith("### Response:\n")
    assert row["input_ids"][-1] != tokenizer.eos_token_id  # the response was cut, so it does not end
    short_prompt = tokenize_dataset(example(response="word " * 300), tokenizer, max_length=64)[0]
    assert short_prompt["labels"].count(IGNORE_INDEX) == len(tokenizer(format_prompt("Name a colour."))["input_ids"])
    with pytest.raises(ValueError, match="max_length must be at least 2"):
        tokenize_dataset(example(), tokenizer, max_length=1)


def test_pad_token_defaults_to_eos_and_eos_is_required():
    tokenizer = tiny_tokenizer()
    assert tokenizer.pad_token is None
    ensure_pad_token(tokenizer)
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    tokenizer.eos_token = None
    with pytest.raises(ValueError, match="no EOS token"):
        ensure_pad_token(tokenizer)


def test_collator_right_pads_and_masks_padding():
    batch = CausalLMCollator(pad_token_id=1)(
        [
            {"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "instruction": "ignored"},
            {"input_ids": [8], "labels": [8], "instruction": "ignored"},
        ]
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 1, 1]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]


# ----------------------------------------------------------------------------------------------- build_federated_data


def test_build_federated_dirichlet_on_dolly(dolly_slice):
    config = DataConfig(
        source="dolly", path=str(dolly_slice), num_clients=4, alpha=0.3, test_fraction=0.2, max_length=64, seed=5
    )
    tokenizer = tiny_tokenizer()
    data = build_federated_data(config, tokenizer)
    assert [c.client_id for c in data.clients] == ["client_0", "client_1", "client_2", "client_3"]
    assert sum(c.num_train_examples + len(c.test) for c in data.clients) == DOLLY_ROWS
    assert len(data.global_test) == sum(len(c.test) for c in data.clients)

    def rows(ds):
        return Counter(zip(ds["instruction"], ds["context"], ds["response"], strict=True))

    # Every row lands in exactly one client split, and the global test set is the union of the client test splits.
    assert sum((rows(c.train) + rows(c.test) for c in data.clients), Counter()) == rows(load_dolly(dolly_slice))
    assert rows(data.global_test) == sum((rows(c.test) for c in data.clients), Counter())
    assert {"input_ids", "labels", "response"} <= set(data.global_test.column_names)
    assert sum(data.client_weights()) == pytest.approx(1.0)
    assert tokenizer.pad_token_id == tokenizer.eos_token_id

    again = build_federated_data(config)
    assert [c.train["instruction"] for c in again.clients] == [c.train["instruction"] for c in data.clients]
    other = build_federated_data(replace(config, seed=6))
    assert [c.num_train_examples for c in other.clients] != [c.num_train_examples for c in data.clients]

    capped = build_federated_data(replace(config, global_test_size=10, max_examples=200))
    assert len(capped.global_test) == 10
    assert sum(c.num_train_examples + len(c.test) for c in capped.clients) == 200


def test_build_federated_label_and_iid_partitions(dolly_slice):
    by_label = build_federated_data(DataConfig(path=str(dolly_slice), partition="label", num_clients=None))
    assert len(by_label.clients) == 8
    for client in by_label.clients:
        assert set(client.train["label"]) | set(client.test["label"]) == {client.client_id}
    iid = build_federated_data(DataConfig(path=str(dolly_slice), partition="iid", num_clients=7))
    assert {c.num_train_examples + len(c.test) for c in iid.clients} <= {57, 58}
    with pytest.raises(ValueError, match="num_clients == number of labels"):
        build_federated_data(DataConfig(path=str(dolly_slice), partition="label", num_clients=3))


def test_build_federated_one_client_per_file(ni_dir, tmp_path):
    data = build_federated_data(DataConfig(source="natural_instructions", path=str(ni_dir), partition="files"))
    assert [c.client_id for c in data.clients] == ["task001_demo", "task022_demo", "task333_demo"]
    assert [c.num_train_examples for c in data.clients] == [11, 13, 18]
    assert len(data.global_test) == 1 + 2 + 2
    with pytest.raises(ValueError, match="gives 3 clients but num_clients=5"):
        build_federated_data(DataConfig(source="natural_instructions", path=ni_dir, partition="files", num_clients=5))
    with pytest.raises(ValueError, match=r"fewer than min_examples=13 examples: \{'task001_demo': 12\}"):
        build_federated_data(
            DataConfig(source="natural_instructions", path=ni_dir, partition="files", num_clients=None, min_examples=13)
        )
    # Generic files, one per client, through a column mapping.
    files = []
    for k in range(2):
        path = tmp_path / f"hospital{k}.jsonl"
        path.write_text("".join(json.dumps({"q": f"q{k}-{i}", "a": f"a{i}"}) + "\n" for i in range(10)))
        files.append(str(path))
    config = DataConfig(source="file", path=files, columns={"instruction": "q", "response": "a"}, partition="files")
    assert [c.client_id for c in build_federated_data(config).clients] == ["hospital0", "hospital1"]


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"source": "alpaca"}, "source must be one of"),
        ({"partition": "shards"}, "partition must be one of"),
        ({"columns": {"instruction": "q"}}, "columns only applies to source='file'"),
        ({"num_clients": None}, "needs num_clients"),
        ({"test_fraction": 1.0}, "test_fraction"),
        ({"max_examples": 0}, "max_examples must be positive"),
    ],
)
def test_data_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DataConfig(**{"num_clients": 4, **kwargs})
