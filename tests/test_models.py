"""Model loading: local directories, clear errors for what cannot be loaded, portable names in saved adapters."""

import json
import math
from pathlib import Path

import huggingface_hub
import pytest
import torch
import yaml
from peft import get_peft_model

import fedlora.models
from fedlora import FedDoRAConfig
from fedlora.federated import build_config, train
from fedlora.federated.rundir.storage import RunDir
from fedlora.models import (
    PACKAGED_SMOLLM2,
    SMOLLM2_HUB_ID,
    load_model_and_tokenizer,
    portable_model_name,
    resolve_model_path,
)
from tests.tiny import CHATML, save_tiny_gguf, save_tiny_model, tiny_llama, tiny_tokenizer


def test_local_directory_loads_and_gets_a_pad_token(tmp_path):
    tokenizer = tiny_tokenizer()
    tiny_llama(len(tokenizer)).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model, loaded = load_model_and_tokenizer(str(tmp_path))
    assert model.config.vocab_size == len(tokenizer)
    assert loaded.pad_token == loaded.eos_token


def test_unreachable_hub_id_names_offline_alternatives(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read once, at import
    with pytest.raises(FileNotFoundError, match="smollm2-135m-instruct"):
        load_model_and_tokenizer("no-such-org/no-such-model")


def test_missing_gguf_and_incomplete_directory_are_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model_path(str(tmp_path / "model.gguf"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        resolve_model_path(str(tmp_path))


def saved_adapter_names(model, out) -> tuple[str, str]:
    """The base model a saved FedDoRA adapter of ``model`` names: in adapter_config.json and in the model card."""
    get_peft_model(model, FedDoRAConfig(r=2, target_modules=["q_proj"])).save_pretrained(out)
    config = json.loads((out / "adapter_config.json").read_text())
    card = yaml.safe_load((out / "README.md").read_text().split("---")[1])
    return config["base_model_name_or_path"], card["base_model"]


def test_saved_adapters_name_the_packaged_model_by_its_hub_id(tmp_path, monkeypatch):
    model_dir = save_tiny_model(tmp_path / "cache" / "gguf" / "SmolLM2-135M-Instruct.Q4_1-1234")
    monkeypatch.setattr(fedlora.models, "resolve_model_path", lambda name: str(model_dir))  # no GGUF conversion
    model, _ = load_model_and_tokenizer(PACKAGED_SMOLLM2)
    assert saved_adapter_names(model, tmp_path / "adapter") == (SMOLLM2_HUB_ID, SMOLLM2_HUB_ID)


def test_saved_adapters_name_a_local_model_as_given(tmp_path, monkeypatch):
    save_tiny_model(tmp_path / "tiny")
    monkeypatch.chdir(tmp_path)
    model, _ = load_model_and_tokenizer("tiny")
    assert saved_adapter_names(model, tmp_path / "adapter") == ("tiny", "tiny")


def test_portable_model_names(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDLORA_CACHE", str(tmp_path))
    assert portable_model_name(PACKAGED_SMOLLM2) == SMOLLM2_HUB_ID
    assert portable_model_name(str(tmp_path / "gguf" / "SmolLM2-135M-Instruct.Q4_1-1234")) == SMOLLM2_HUB_ID
    assert portable_model_name(str(tmp_path / "gguf" / "other-1234")) == str(tmp_path / "gguf" / "other-1234")
    assert portable_model_name("org/model") == "org/model"
    assert portable_model_name("/models/llama") == "/models/llama"


def test_gguf_converts_once_exactly_and_trains_with_its_chat_template(tmp_path, monkeypatch):
    """The packaged model's path, on a tiny GGUF: converted once into cached safetensors that hold exactly the model
    the file was written from, its chat template kept and chosen by ``prompt_format=auto``, then one federated round
    of one training step on a slice of the packaged sample; the saved adapter names the GGUF, not the cache."""
    monkeypatch.setenv("FEDLORA_CACHE", str(tmp_path / "cache"))
    gguf_file = tmp_path / "tiny.gguf"
    original, tokenizer = save_tiny_gguf(gguf_file)
    converted = Path(resolve_model_path(str(gguf_file)))
    assert converted.parent == tmp_path / "cache" / "gguf" and (converted / "model.safetensors").is_file()
    model, loaded_tokenizer = load_model_and_tokenizer(str(gguf_file))
    ids = tokenizer("The capital of France is Paris.", return_tensors="pt").input_ids
    torch.testing.assert_close(model(ids).logits, original(ids).logits, rtol=0, atol=0)  # float32 in, float32 out
    assert loaded_tokenizer.chat_template == CHATML
    converted_at = (converted / "model.safetensors").stat().st_mtime_ns

    settings = {"model.name": str(gguf_file), "data.path": "dolly-sample", "data.num_clients": 2, "rounds": 1}
    settings |= {"data.max_examples": 40, "data.max_length": 64, "client.global_steps": 1, "client.local_steps": 1}
    settings |= {"eval.rouge_examples": 0, "output_dir": str(tmp_path / "run")}
    run_dir = train(build_config({}, settings), progress=False)
    assert (converted / "model.safetensors").stat().st_mtime_ns == converted_at  # not converted again
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["data"]["prompt_format"] == "chat"
    adapter = json.loads((run_dir / "global_adapter" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(gguf_file)
    trained = [row for row in RunDir(run_dir).read_metrics() if row["split"] == "train"]
    assert len(trained) == 2 and all(math.isfinite(row["train_loss_global"]) for row in trained)
