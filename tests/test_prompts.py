"""Prompt formats (chat template, Alpaca, plain), conversation data, Natural Instructions as users have it."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import yaml
from datasets import Dataset

from fedlora.cli import main
from fedlora.data import (
    IGNORE_INDEX,
    DataConfig,
    build_federated_data,
    format_prompt,
    load_instruction_dataset,
    load_natural_instructions,
    normalise,
    resolve_prompt_format,
    stop_token_ids,
    tokenize_dataset,
)
from fedlora.evaluation import evaluate, generate_from_prompt_ids, generate_responses
from fedlora.federated.config import build_config, load_run_config
from tests.tiny import CHATML, tiny_llama, tiny_tokenizer

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
# Llama-2-chat style: the template writes BOS itself and ends an answer with EOS.
LLAMA2 = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}<<SYS>>{{ message['content'] }}"
    "<</SYS>>{% elif message['role'] == 'user' %}[INST] {{ message['content'] }} [/INST]"
    "{% else %} {{ message['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)


def chat_tokenizer(template: str = CHATML, eos: str | None = None):
    """The tiny test tokenizer with ChatML special tokens and a chat template (EOS ``</s>`` unless ``eos``)."""
    tokenizer = tiny_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": [IM_START, IM_END]})
    tokenizer.chat_template = template
    if eos is not None:
        tokenizer.eos_token = eos
    return tokenizer


def example(instruction="Name a colour.", context="", response="Blue is a colour.", history="[]"):
    return Dataset.from_dict(
        {"instruction": [instruction], "context": [context], "response": [response], "history": [history]}
    )


def split_row(row: dict) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids) of a tokenised row, checking that labels are -100 exactly on the prompt."""
    n = row["labels"].count(IGNORE_INDEX)
    assert row["labels"][:n] == [IGNORE_INDEX] * n and IGNORE_INDEX not in row["labels"][n:]
    assert row["labels"][n:] == row["input_ids"][n:]
    assert row["prompt_ids"] == row["input_ids"][:n]
    return row["input_ids"][:n], row["input_ids"][n:]


# ------------------------------------------------------------------------------------------------------- formats


def test_auto_resolves_to_chat_only_with_a_template():
    assert resolve_prompt_format("auto", chat_tokenizer()) == "chat"
    assert resolve_prompt_format("auto", tiny_tokenizer()) == "alpaca"
    assert resolve_prompt_format("plain", chat_tokenizer()) == "plain"
    with pytest.raises(ValueError, match="has no chat template; use prompt_format 'alpaca' or 'plain'"):
        resolve_prompt_format("chat", tiny_tokenizer())
    with pytest.raises(ValueError, match="unknown prompt_format 'xml'"):
        resolve_prompt_format("xml", chat_tokenizer())
    with pytest.raises(ValueError, match="prompt_format must be one of"):
        DataConfig(num_clients=2, prompt_format="xml")
    with pytest.raises(ValueError, match=r"data.prompt_format must be one of \['auto', 'chat', 'alpaca', 'plain'\]"):
        build_config({"data": {"prompt_format": "xml"}})


@pytest.mark.parametrize("eos", [None, IM_END])
def test_chat_format_masks_the_prompt_with_its_generation_prefix(eos):
    tokenizer = chat_tokenizer(eos=eos)
    row = tokenize_dataset(example(context="Colours are nice."), tokenizer, max_length=256)[0]  # auto: chat
    prompt, response = split_row(row)
    messages = [{"role": "user", "content": "Name a colour.\n\nColours are nice."}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text.endswith(f"{IM_START}assistant\n")
    assert prompt == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.bos_token_id not in prompt  # ChatML has no BOS; none is added
    assert tokenizer.decode(response) == f"Blue is a colour.{IM_END}"  # the end-of-turn token is a label
    assert response[-1] == tokenizer.convert_tokens_to_ids(IM_END)  # and nothing after it: no extra EOS
    assert stop_token_ids(tokenizer) == list(dict.fromkeys([tokenizer.eos_token_id, response[-1]]))
    assert format_prompt("Name a colour.", "Colours are nice.", prompt_format="chat", tokenizer=tokenizer) == text


def test_chat_template_that_writes_bos_and_eos_itself():
    tokenizer = chat_tokenizer(LLAMA2)
    prompt, response = split_row(tokenize_dataset(example(), tokenizer, max_length=256, prompt_format="chat")[0])
    assert prompt.count(tokenizer.bos_token_id) == 1 and prompt[0] == tokenizer.bos_token_id
    assert tokenizer.decode(prompt) == "<s>[INST] Name a colour. [/INST]"
    assert response[-1] == tokenizer.eos_token_id and response.count(tokenizer.eos_token_id) == 1
    assert tokenizer.decode(response[:-1]).strip() == "Blue is a colour."
    assert stop_token_ids(tokenizer) == [tokenizer.eos_token_id]


def test_alpaca_and_plain_formats_on_a_chat_tokenizer():
    tokenizer = chat_tokenizer()
    rows = example(context="Colours are nice.")
    prompt, response = split_row(tokenize_dataset(rows, tokenizer, max_length=256, prompt_format="alpaca")[0])
    assert prompt == tokenizer(format_prompt("Name a colour.", "Colours are nice."))["input_ids"]
    assert tokenizer.decode(prompt).startswith("<s>### Instruction:\nName a colour.\n\n### Context:\n")
    assert response[-1] == tokenizer.eos_token_id
    prompt, response = split_row(tokenize_dataset(rows, tokenizer, max_length=256, prompt_format="plain")[0])
    assert tokenizer.decode(prompt) == "<s>Name a colour.\n\nColours are nice.\n\n"
    assert tokenizer.decode(response) == "Blue is a colour.</s>"


@pytest.mark.parametrize(
    "prompt_format,head,tail",
    [
        ("chat", f"{IM_START}system\nYou are", f"filler words {IM_END}\n{IM_START}assistant\n"),
        ("alpaca", "<s>### Instruction:\nName a colour.", "### Response:\n"),
        ("plain", "<s>Name a colour.", "filler words \n\n"),
    ],
)
def test_truncation_keeps_prompt_ends_and_part_of_the_response(prompt_format, head, tail):
    tokenizer = chat_tokenizer()
    long = example(context="filler words " * 200, response="the answer " * 50)
    row = tokenize_dataset(long, tokenizer, max_length=64, prompt_format=prompt_format)[0]
    prompt, response = split_row(row)
    assert len(row["input_ids"]) == 64 and len(response) >= 16
    text = tokenizer.decode(prompt)
    assert text.startswith(head) and text.endswith(tail)
    assert response[-1] not in stop_token_ids(tokenizer)  # the response was cut, so it does not end
    full_prompt = tokenize_dataset(example(), tokenizer, 256, prompt_format)[0]["prompt_ids"]
    assert len(full_prompt) < 96 * 3 / 4
    short_prompt = tokenize_dataset(example(response="word " * 300), tokenizer, 96, prompt_format)[0]
    assert split_row(short_prompt)[0] == full_prompt  # a prompt that fits is not cut; the response is


def test_history_is_prompt_and_only_the_last_answer_is_a_label():
    history = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi."},
        {"role": "assistant", "content": "Hello."},
    ]
    rows = example(history=json.dumps(history))
    tokenizer = chat_tokenizer()
    prompt, response = split_row(tokenize_dataset(rows, tokenizer, 256, "chat")[0])
    assert tokenizer.decode(prompt) == (
        f"{IM_START}system\nBe brief.{IM_END}\n{IM_START}user\nHi.{IM_END}\n{IM_START}assistant\nHello.{IM_END}\n"
        f"{IM_START}user\nName a colour.{IM_END}\n{IM_START}assistant\n"
    )
    assert tokenizer.decode(response) == f"Blue is a colour.{IM_END}"
    alpaca = format_prompt("Name a colour.", history=history)
    assert (
        alpaca
        == "Be brief.\n\n### Instruction:\nHi.\n\n### Response:\nHello.\n\n### Instruction:\nName a colour."
        + ("\n\n### Response:\n")
    )
    assert format_prompt(
        "Name a colour.", history=history, prompt_format="plain"
    ) == "Be brief.\n\nHi.\n\nHello.\n\n" + ("Name a colour.\n\n")


def test_generation_starts_from_the_prompt_training_saw():
    tokenizer = chat_tokenizer()
    rows = Dataset.from_dict(
        {
            "instruction": ["What is the capital of France?", "Summarize the passage."],
            "context": ["", "Virgin Australia commenced services in 2000."],
            "response": ["Paris.", "It started in 2000."],
            "history": ["[]", "[]"],
        }
    )
    split = tokenize_dataset(rows, tokenizer, max_length=96)
    model = tiny_llama(len(tokenizer))
    from_split = generate_from_prompt_ids(model, tokenizer, split["prompt_ids"], max_new_tokens=4)
    from_text = generate_responses(
        model, tokenizer, rows["instruction"], rows["context"], prompt_format="chat", max_new_tokens=4
    )
    assert from_split == from_text and len(from_split) == 2
    metrics = evaluate(model, tokenizer, split, rouge_examples=2, max_new_tokens=4)
    assert 0.0 <= metrics["rougeL"] <= 1.0
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['prompt_ids'\]"):
        evaluate(model, tokenizer, split.remove_columns("prompt_ids"), rouge_examples=1)


# ------------------------------------------------------------------------------------------------- conversations


def conversation(i: int) -> list[dict]:
    turns = [{"role": "user", "content": f"What is {i} plus {i}?"}, {"role": "assistant", "content": f"It is {2 * i}."}]
    if i % 3 == 0:
        turns = [{"role": "system", "content": "You add numbers."}, *turns]
    if i % 4 == 0:
        turns += [{"role": "user", "content": "And twice that?"}, {"role": "assistant", "content": f"{4 * i}."}]
    return turns


def write_conversations(path: Path, count: int = 40) -> Path:
    rows = [{"messages": conversation(i), "category": f"c{i % 2}"} for i in range(count)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_messages_rows_load_as_the_last_exchange_with_history(tmp_path, caplog):
    path = write_conversations(tmp_path / "chat.jsonl", 8)
    ds = load_instruction_dataset(path, {"label": "category"})
    expected = {"instruction": "What is 1 plus 1?", "context": "", "response": "It is 2.", "label": "c1"}
    assert ds[1] == {**expected, "history": "[]"}
    assert ds[4]["instruction"] == "And twice that?" and ds[4]["response"] == "16."
    assert json.loads(ds[4]["history"]) == conversation(4)[:2]
    assert json.loads(ds[3]["history"]) == [{"role": "system", "content": "You add numbers."}]
    # A hub-style dataset (a list of structs per row) and a CSV of JSON cells read the same.
    hub = Dataset.from_dict(
        {"messages": [conversation(i) for i in range(8)], "category": [f"c{i % 2}" for i in range(8)]}
    )
    assert normalise(hub, {"label": "category"}).to_list() == ds.to_list()
    hub.save_to_disk(str(tmp_path / "saved"))  # a local copy of a hub dataset loads like the hub id would
    assert load_instruction_dataset(tmp_path / "saved", {"label": "category"}).to_list() == ds.to_list()
    csv_path = tmp_path / "chat.csv"
    csv_path.write_text('messages\n"' + json.dumps(conversation(5)).replace('"', '""') + '"\n')
    assert load_instruction_dataset(csv_path)[0]["response"] == "It is 10."
    empty = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "  "}]
    with caplog.at_level(logging.WARNING, logger="fedlora.data.loaders"):
        kept = normalise({"messages": [conversation(1), empty, None]})
    assert (
        len(kept) == 1 and "dropped 2 of 3 rows with an empty final user or assistant turn (rows [2, 3])" in caplog.text
    )


@pytest.mark.parametrize(
    "messages,message",
    [
        ("not json", "row 1: column 'messages' holds text that is not a JSON list of turns"),
        ({"role": "user"}, "row 1: column 'messages' holds dict .* not a list of turns"),
        (["hello"], "turn 1 is not an object with 'role' and 'content'"),
        ([{"role": "tool", "content": "x"}], r"turn 1 has role 'tool'; use one of \['system', 'user', 'assistant'\]"),
        ([{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}], r"turn 1 \(user\) content is int 5"),
        ([{"role": "assistant", "content": "x"}], "turn 1 is 'assistant' where 'user' was expected"),
        (
            [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}],
            "turn 2 is 'system' where 'assistant' was expected",
        ),
        ([{"role": "user", "content": "a"}], "the last turn is 'user'; a conversation must end with the assistant"),
    ],
)
def test_malformed_conversations_are_clear_errors(messages, message):
    with pytest.raises(ValueError, match=message):
        normalise({"messages": [messages]}, source="chat.jsonl")


def test_messages_mapping_errors(tmp_path):
    path = write_conversations(tmp_path / "chat.jsonl", 4)
    with pytest.raises(ValueError, match=r"names both 'messages' and \['instruction'\]"):
        load_instruction_dataset(path, {"messages": "messages", "instruction": "messages"})
    with pytest.raises(ValueError, match=r"column 'conversation' \(for 'messages'\) not found"):
        load_instruction_dataset(path, {"messages": "conversation"})
    with pytest.raises(ValueError, match=r"column 'topic' \(for 'label'\) not found"):
        load_instruction_dataset(path, {"label": "topic"})


def save_chat_model(path: Path) -> Path:
    tokenizer = chat_tokenizer()
    tiny_llama(len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_cli_trains_messages_data_by_label_in_chat_format_and_resumes(tmp_path, capsys):
    model_dir = save_chat_model(tmp_path / "tiny-chat")
    data = write_conversations(tmp_path / "chat.jsonl")
    out = tmp_path / "run"
    settings = ["data.source=file", 'data.columns={"label": "category"}', "data.partition=label"]
    settings += ["data.max_length=48", "data.min_examples=5", "adapter.r=2", "eval.rouge_examples=1"]
    argv = ["train", "--model", str(model_dir), "--data", str(data), "--num-clients", "2", "--rounds", "1"]
    assert main([*argv, "--output-dir", str(out), "--no-progress", "--set", *settings, "eval.max_new_tokens=2"]) == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["data"]["prompt_format"] == "chat"  # auto, resolved for a tokenizer with a chat template
    assert saved["data"]["columns"] == {"label": "category"}
    # --resume with the saved settings, and with prompt_format=auto (the saved, resolved format is used).
    resume = ["train", "--output-dir", str(out), "--resume", "--no-progress"]
    assert main([*resume, "--rounds", "2"]) == 0
    assert main([*resume, "--rounds", "3", "--set", "data.prompt_format=auto"]) == 0
    assert yaml.safe_load((out / "config.yaml").read_text())["data"]["prompt_format"] == "chat"
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main([*resume, "--rounds", "4", "--set", "data.prompt_format=alpaca"])
    assert "differs from the saved run in ['data.prompt_format']" in capsys.readouterr().err
    assert main(["eval", "--run-dir", str(out), "--no-progress", "--set", "eval.rouge_examples=0"]) == 0
    rows = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    assert {r["client"] for r in rows if r["split"] == "local" and "client" in r} == {"c0", "c1"}


def test_a_run_config_saved_before_prompt_formats_reads_as_alpaca(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"data": {"max_length": 64}}))
    assert load_run_config(path).data.prompt_format == "alpaca"
    assert load_run_config(path, ["data.prompt_format=chat"]).data.prompt_format == "chat"
    path.write_text(yaml.safe_dump({"data": {"prompt_format": "auto"}}))
    assert load_run_config(path).data.prompt_format == "auto"


# -------------------------------------------------------------------------------------------- Natural Instructions


def write_task(path: Path, outputs: list, definition: str = "Solve it.") -> Path:
    instances = [{"id": f"{path.stem}-{i}", "input": f"input {i}", "output": out} for i, out in enumerate(outputs)]
    path.write_text(json.dumps({"Definition": [definition], "Instances": instances}))
    return path


def test_ni_directory_loads_every_task_file_and_names_the_skipped(tmp_path, caplog):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    write_task(tasks / "task001_words.json", [["yes", "y"]] * 12)
    numeric = tasks / "testset_task1290_math.json"  # not named task*.json; every output a number
    numeric.write_text(
        '{"Definition": ["Answer with a number."], "Instances": ['
        + ",".join(f'{{"input": "{i} + 1?", "output": [{i + 1}]}}' for i in range(10))
        + ', {"input": "half of 5?", "output": [2.50]}, {"input": "tiny?", "output": 1e-5}]}'
    )
    (tasks / "splits.json").write_text(json.dumps({"train": ["task001_words"]}))
    (tasks / "broken.json").write_text("{not json")
    (tasks / "README.md").write_text("not a task")
    with caplog.at_level(logging.WARNING, logger="fedlora.data.loaders"):
        loaded = load_natural_instructions(tasks)
    assert [ds[0]["label"] for ds in loaded] == ["task001_words", "testset_task1290_math"]
    assert loaded[1]["response"] == [str(i + 1) for i in range(10)] + ["2.50", "1e-5"]  # as written in the file
    assert f"{tasks / 'splits.json'}: not a Natural Instructions task file (no 'Definition' key)" in caplog.text
    assert f"{tasks / 'broken.json'}: invalid JSON at line 1" in caplog.text
    assert "README" not in caplog.text
    data = build_federated_data(DataConfig(source="natural_instructions", path=str(tasks), partition="files"))
    assert [client.client_id for client in data.clients] == ["task001_words", "testset_task1290_math"]


@pytest.mark.parametrize(
    "output,message",
    [([[1, 2]], "column 'response' holds list"), ({"a": 1}, "column 'response' holds dict"), (True, "holds bool")],
)
def test_ni_outputs_that_are_not_text_or_numbers_stay_errors(tmp_path, output, message):
    with pytest.raises(ValueError, match=message):
        load_natural_instructions([write_task(tmp_path / "task9_bad.json", [output])])


def ni_hub_rows() -> Dataset:
    """Rows as the hub's ``Muennighoff/natural-instructions`` has them (one per instance)."""
    names = ["task002_b"] * 11 + ["task001_a"] * 12
    return Dataset.from_dict(
        {
            "task_name": names,
            "id": [f"{name}-{i}" for i, name in enumerate(names)],
            "definition": [f"Definition of {name}." for name in names],
            "inputs": [f"input {i}" for i in range(len(names))],
            "targets": [f"target {i}" for i in range(len(names))],
        }
    )


def test_ni_hub_dataset_by_id_and_from_a_saved_copy(tmp_path, monkeypatch):
    saved = tmp_path / "ni-copy"
    ni_hub_rows().save_to_disk(str(saved))
    from_disk = load_natural_instructions(saved)
    assert [(ds[0]["label"], len(ds)) for ds in from_disk] == [("task001_a", 12), ("task002_b", 11)]
    assert from_disk[0][0] == {
        "instruction": "Definition of task001_a.",
        "context": "input 11",
        "response": "target 11",
        "label": "task001_a",
        "history": "[]",
    }
    calls = []

    def fake_load_dataset(path, split):  # the hub, offline
        calls.append((path, split))
        return ni_hub_rows()

    monkeypatch.setattr("fedlora.data.loaders.load_dataset", fake_load_dataset)
    by_id = load_natural_instructions("Muennighoff/natural-instructions")
    assert calls == [("Muennighoff/natural-instructions", "train")]
    assert [ds.to_list() for ds in by_id] == [ds.to_list() for ds in from_disk]
    config = DataConfig(source="natural_instructions", path="Muennighoff/natural-instructions", partition="files")
    assert [c.client_id for c in build_federated_data(config).clients] == ["task001_a", "task002_b"]
    monkeypatch.setattr("fedlora.data.loaders.load_dataset", lambda path, split: Dataset.from_dict({"text": ["x"]}))
    with pytest.raises(ValueError, match=r"not a Natural Instructions dataset: no column\(s\) \['definition'"):
        load_natural_instructions("someone/other-data")
