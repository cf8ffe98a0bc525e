"""Model loading: local directories, clear errors for what cannot be loaded."""

import huggingface_hub
import pytest

from fedlora.models import load_model_and_tokenizer, resolve_model_path
from tests.tiny import tiny_llama, tiny_tokenizer


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
