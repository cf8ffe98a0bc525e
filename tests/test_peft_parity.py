"""FedDoRA through the checks PEFT runs on every adapter for small custom models, in this project's words.

``LORA_CASES`` are PEFT LoRA's cases on Linear and transformers Conv1D models (``TEST_CASES`` in PEFT's
tests/test_custom_models.py; its DoRA cases set ``use_dora`` and its other cases target an Embedding, which FedDoRA
does not adapt), with their config dicts unchanged and ``FedDoRAConfig`` in place of ``LoraConfig``. Several of
them need what PEFT LoRA allows: ``lin1`` (20 → 2) at the default r = 8 > min(in, out), and ``conv1d`` (5 → 1) has
out_features = 1, so its V_B is fixed. ``QUANTIZED_CASES`` run the same checks on an MLP with its linears in
bitsandbytes' 4-bit (NF4) and 8-bit layers, on the CPU (bitsandbytes 0.50 runs both there, forward and backward);
a tiny Llama loaded in 4 and 8 bits (the run setting ``model.quantization``) trains, saves and reloads.
"""

from __future__ import annotations

import contextlib
import importlib.util

import pytest
import torch
from peft import PeftModel, get_peft_model
from torch import nn
from transformers.pytorch_utils import Conv1D

from fedlora import FedDoRAConfig
from fedlora.federated.build import load_model
from fedlora.federated.config import load_config
from fedlora.models import load_model_and_tokenizer
from fedlora.tuners.feddora import FedDoRALayer
from tests.tiny import tiny_llama, tiny_tokenizer

HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None
BNB = pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes is not installed (it is in the dev extra)")


class MLP(nn.Module):
    """PEFT's test MLP: 10 → 20 → 2 linears (or other ``sizes``), ReLU, dropout 0.5, log-softmax."""

    def __init__(self, sizes: tuple[int, int, int] = (10, 20, 2)) -> None:
        super().__init__()
        self.lin0 = nn.Linear(sizes[0], sizes[1])
        self.relu = nn.ReLU()
        self.drop = nn.Dropout(0.5)
        self.lin1 = nn.Linear(sizes[1], sizes[2])
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.sm(self.lin1(self.drop(self.relu(self.lin0(x.float())))))


class EmbConv1D(nn.Module):
    """PEFT's embedding + transformers Conv1D model: 100 × 5 embedding, Conv1D 5 → 1, flatten, 10 → 2 linear."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(100, 5)
        self.conv1d = Conv1D(1, 5)
        self.relu = nn.ReLU()
        self.flat = nn.Flatten()
        self.lin0 = nn.Linear(10, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.sm(self.lin0(self.flat(self.relu(self.conv1d(self.emb(x))))))


def quantized(linear: nn.Linear, bits: int) -> nn.Module:
    """``linear`` as a bitsandbytes 4-bit (NF4, float32 compute) or 8-bit layer, quantized on the CPU."""
    import bitsandbytes as bnb

    if bits == 4:
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, compute_dtype=torch.float32)
        layer.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, quant_type="nf4")
    else:
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, has_fp16_weights=False, threshold=0.0)
        layer.weight = bnb.nn.Int8Params(linear.weight.data, requires_grad=False, has_fp16_weights=False)
    layer.bias = linear.bias
    return layer.to("cpu")


QUANTIZED_SIZES = (64, 64, 32)
"""The quantized MLP's sizes: bitsandbytes' CPU inference layout of 4-bit weights needs out_features % 32 == 0 and
in_features % 64 == 0 (its block size)."""


def build(model: str) -> nn.Module:
    """A freshly seeded model (so two builds are identical, quantized weights included), in eval mode (which
    bitsandbytes' layers read: their int8 and 4-bit inference paths round differently from training's)."""
    torch.manual_seed(0)
    if model == "EmbConv1D":
        return EmbConv1D().eval()
    if model == "MLP":
        return MLP().eval()
    mlp = MLP(QUANTIZED_SIZES)
    bits = int(model.removeprefix("MLP").removesuffix("bit"))
    mlp.lin0, mlp.lin1 = quantized(mlp.lin0, bits), quantized(mlp.lin1, bits)
    return mlp.eval()


def inputs(model: str) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    if model == "EmbConv1D":
        return torch.randint(0, 100, (9, 10), generator=generator)
    return torch.randn(9, 10 if model == "MLP" else QUANTIZED_SIZES[0], generator=generator)


LORA_CASES = [
    ("Vanilla MLP 1", "MLP", {"target_modules": "lin0"}),
    ("Vanilla MLP 2", "MLP", {"target_modules": ["lin0"]}),
    ("Vanilla MLP 3", "MLP", {"target_modules": ["lin1"]}),
    ("Vanilla MLP 4", "MLP", {"target_modules": ["lin0", "lin1"]}),
    ("Vanilla MLP 5", "MLP", {"target_modules": ["lin0"], "modules_to_save": ["lin1"]}),
    ("Vanilla MLP 6", "MLP", {"target_modules": ["lin0"], "lora_alpha": 4, "lora_dropout": 0.1}),
    ("Embedding + transformers Conv1D 1", "EmbConv1D", {"target_modules": ["conv1d"]}),
]
QUANTIZED_CASES = [  # lora_alpha 32: an update well above the requantization error the merge test compares it with
    (f"MLP {bits}-bit", f"MLP{bits}bit", {"target_modules": ["lin0", "lin1"], "lora_alpha": 32}) for bits in (4, 8)
]
CASES = [pytest.param(model, kwargs, id=name) for name, model, kwargs in LORA_CASES] + [
    pytest.param(model, kwargs, id=name, marks=BNB) for name, model, kwargs in QUANTIZED_CASES
]
MERGE_TOL = {"rtol": 1e-5, "atol": 1e-5}


def adapted(model: str, kwargs: dict, **overrides) -> PeftModel:
    """``build(model)`` with a FedDoRA adapter of the case's config (``overrides`` on top), in eval mode."""
    return get_peft_model(build(model), FedDoRAConfig(**{**kwargs, **overrides})).eval()


def train_step(peft_model: PeftModel, model: str) -> None:
    """One Adam step on every trainable tensor, in train mode (dropout on), back in eval mode after."""
    peft_model.train()
    optimizer = torch.optim.Adam([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    peft_model(inputs(model)).sum().neg().backward()
    optimizer.step()
    peft_model.eval()


@pytest.mark.parametrize("model,kwargs", CASES)
def test_forward_starts_at_the_base_model(model, kwargs):
    x = inputs(model)
    with torch.no_grad():
        base = build(model)(x)
        out = adapted(model, kwargs)(x)
    assert torch.isfinite(out).all()
    assert torch.equal(out, base)


@pytest.mark.parametrize("model,kwargs", CASES)
def test_only_trainable_tensors_change_and_all_of_them_do(model, kwargs):
    peft_model = adapted(model, kwargs, init_weights=False)
    before = {name: t.clone() for name, t in peft_model.state_dict().items()}
    trainable = {name for name, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("feddora_" in name or "modules_to_save" in name for name in trainable)
    train_step(peft_model, model)
    changed = {name for name, t in peft_model.state_dict().items() if not torch.equal(t, before[name])}
    assert changed == trainable


@pytest.mark.parametrize("model,kwargs", CASES)
def test_save_and_reload_give_identical_outputs(model, kwargs, tmp_path):
    peft_model = adapted(model, kwargs, init_weights=False)
    train_step(peft_model, model)
    x = inputs(model)
    with torch.no_grad():
        out = peft_model(x)
    peft_model.save_pretrained(tmp_path)
    for low_cpu_mem_usage in (False, True):
        reloaded = PeftModel.from_pretrained(build(model), tmp_path, low_cpu_mem_usage=low_cpu_mem_usage).eval()
        with torch.no_grad():
            assert torch.equal(reloaded(x), out), low_cpu_mem_usage
        assert reloaded.state_dict().keys() == peft_model.state_dict().keys()


@pytest.mark.parametrize("model,kwargs", CASES)
def test_merge_unmerge_and_unload(model, kwargs):
    """Dense bases merge to float32 rounding; quantized ones are dequantized, shifted and requantized (as PEFT LoRA
    does), so there the merged outputs need only be closer to the adapted ones than the base outputs are."""
    peft_model = adapted(model, kwargs, init_weights=False)
    x = inputs(model)
    quantized_base = model.endswith("bit")
    requantizes = pytest.warns(UserWarning, match="re-quantizes") if quantized_base else contextlib.nullcontext()
    with torch.no_grad(), requantizes:
        base, out = build(model)(x), peft_model(x)

        def check(value: torch.Tensor) -> None:
            if quantized_base:
                assert (value - out).abs().max() < 0.5 * (base - out).abs().max()
            else:
                torch.testing.assert_close(value, out, **MERGE_TOL)

        peft_model.merge_adapter(safe_merge=True)
        check(peft_model(x))
        peft_model.unmerge_adapter()
        check(peft_model(x))
        merged = peft_model.merge_and_unload()
        assert not any(isinstance(m, FedDoRALayer) for m in merged.modules())
        check(merged(x))


@pytest.mark.parametrize("model,kwargs", CASES)
def test_disable_adapter_gives_the_base_model(model, kwargs):
    peft_model = adapted(model, kwargs, init_weights=False)
    x = inputs(model)
    with torch.no_grad():
        base = build(model)(x)
        assert not torch.equal(peft_model(x), base)
        with peft_model.disable_adapter():
            assert torch.equal(peft_model(x), base)


@pytest.mark.parametrize("model,kwargs", CASES)
def test_several_adapters_switch_combine_and_delete(model, kwargs):
    peft_model = adapted(model, kwargs, init_weights=False)
    peft_model.add_adapter("other", FedDoRAConfig(**kwargs, init_weights=False))
    x = inputs(model)
    with torch.no_grad():
        base, first = build(model)(x), peft_model(x)
        peft_model.set_adapter("other")
        other = peft_model(x)
        assert not torch.allclose(first, other)
        trainable = [name for name, p in peft_model.named_parameters() if p.requires_grad and "feddora_" in name]
        assert trainable and all(".other." in name for name in trainable)
        if "modules_to_save" not in kwargs:  # PEFT's modules_to_save take one active adapter at a time
            peft_model.base_model.set_adapter(["default", "other"])
            both = peft_model(x)
            assert not torch.allclose(both, first) and not torch.allclose(both, other)
        peft_model.set_adapter("default")
        peft_model.delete_adapter("other")
        assert not any(".other." in name for name in peft_model.state_dict())
        assert torch.equal(peft_model(x), first)
    assert peft_model.active_adapters == ["default"] and not torch.equal(first, base)


@BNB
@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
def test_quantized_causal_lm_trains_saves_and_reloads_identically(quantization, tmp_path):
    """``load_model_and_tokenizer(..., quantization=...)`` (the run setting ``model.quantization``) gives
    bitsandbytes linears; a FedDoRA adapter on them trains, and reloads onto a fresh quantized base with identical
    logits."""
    import bitsandbytes as bnb

    tokenizer = tiny_tokenizer()
    tiny_llama(len(tokenizer), hidden_size=64, intermediate_size=128).save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    model, _ = load_model_and_tokenizer(str(tmp_path / "base"), quantization=quantization)
    layer_type = bnb.nn.Linear4bit if quantization == "4bit" else bnb.nn.Linear8bitLt
    assert isinstance(model.model.layers[0].mlp.down_proj, layer_type)
    peft_model = get_peft_model(model, FedDoRAConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    tokens = torch.tensor([tokenizer("Federated learning trains a shared model.")["input_ids"]])
    optimizer = torch.optim.Adam([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(5):
        loss = peft_model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    peft_model.eval()
    with torch.no_grad():
        logits = peft_model(tokens).logits
    peft_model.save_pretrained(tmp_path / "adapter")
    base, _ = load_model_and_tokenizer(str(tmp_path / "base"), quantization=quantization)
    reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(tokens).logits, logits)


@BNB
def test_run_setting_model_quantization_loads_the_base_quantized(tmp_path):
    """``fedlora train --set model.quantization=4bit`` reaches the loader: the run's base has 4-bit linears."""
    import bitsandbytes as bnb

    tokenizer = tiny_tokenizer()
    tiny_llama(len(tokenizer), hidden_size=64, intermediate_size=128).save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    config = load_config(overrides=[f"model.name={tmp_path / 'base'}", "model.quantization=4bit"])
    model, _ = load_model(config)
    assert isinstance(model.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)


def test_run_setting_model_quantization_is_checked():
    assert load_config(overrides=["model.quantization=4bit"]).model.quantization == "4bit"
    assert load_config().model.quantization is None
    with pytest.raises(ValueError, match=r"model.quantization must be one of \['4bit', '8bit'\]; got '3bit'"):
        load_config(overrides=["model.quantization=3bit"])
