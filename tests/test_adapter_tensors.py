"""``load_adapter_tensors``: a run's personal tensors (keyed under ``default``) load under any adapter name, and
keys that do not fit are refused, naming them, with nothing copied."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from fedlora import FedDoRAConfig
from fedlora.adapter_tensors import load_adapter_tensors
from tests.tiny import tiny_llama

PREFIX = "base_model.model.model.layers"


def personal_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Random magnitudes for every layer, keyed as a run stores them (adapter ``default``)."""
    generator = torch.Generator().manual_seed(0)
    return {
        name.replace(".other.", ".default."): torch.randn(param.shape, generator=generator)
        for name, param in model.named_parameters()
        if name.endswith("magnitude")
    }


@pytest.fixture
def model():
    config = FedDoRAConfig(r=2, target_modules=["q_proj", "v_proj"], init_weights=False)
    return get_peft_model(tiny_llama(), config, adapter_name="other")


def magnitudes(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("magnitude")}


def test_tensors_load_under_another_adapter_name(model):
    tensors = personal_tensors(model)
    load_adapter_tensors(model, tensors, adapter_name="other")
    loaded = magnitudes(model)
    assert loaded.keys() == {name.replace(".default.", ".other.") for name in tensors}
    assert all(torch.equal(loaded[name.replace(".default.", ".other.")], value) for name, value in tensors.items())


def test_lora_tensors_load_too():
    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]), adapter_name="mine")
    tensors = {
        name.replace(".mine.", ".default."): torch.full_like(param, 0.5)
        for name, param in model.named_parameters()
        if ".lora_B." in name
    }
    load_adapter_tensors(model, tensors, adapter_name="mine")
    assert all((p == 0.5).all() for n, p in model.named_parameters() if ".lora_B." in n)


@pytest.mark.bad_input
@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda t: t.pop(f"{PREFIX}.1.self_attn.v_proj.feddora_B.default.magnitude"), "missing keys: "),
        (
            lambda t: t.update({f"{PREFIX}.7.self_attn.q_proj.feddora_A.default.magnitude": torch.ones(32)}),
            "unexpected",
        ),
        (lambda t: t.update({"lm_head.weight": torch.ones(2)}), "unexpected keys: lm_head.weight"),
        (
            lambda t: t.update({f"{PREFIX}.0.self_attn.q_proj.feddora_A.default.magnitude": torch.ones(3)}),
            "wrong shapes",
        ),
    ],
)
def test_keys_that_do_not_fit_are_refused(model, change, message):
    tensors = personal_tensors(model)
    change(tensors)
    before = magnitudes(model)
    with pytest.raises(ValueError, match=message) as error:
        load_adapter_tensors(model, tensors, adapter_name="other")
    if message == "missing keys: ":
        assert f"{PREFIX}.1.self_attn.v_proj.feddora_B.other.magnitude" in str(error.value)
    assert all(torch.equal(before[n], p) for n, p in magnitudes(model).items())
    with pytest.raises(ValueError, match="no FedDoRA or LoRA parameters of adapter 'default'"):
        load_adapter_tensors(model, personal_tensors(model))
