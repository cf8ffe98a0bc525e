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
    torch.testing.assert_close(out, base, rtol=0, atol=1e-6)  # the paired start: B A = 0 up to summation order


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
    does), so there each step is held to the requantization error it must make, measured on the side (see
    :func:`check_requantized_step`)."""
    peft_model = adapted(model, kwargs, init_weights=False)
    x = inputs(model)
    quantized_base = model.endswith("bit")
    requantizes = pytest.warns(UserWarning, match="re-quantizes") if quantized_base else contextlib.nullcontext()
    with torch.no_grad(), requantizes:
        base, out = build(model)(x), peft_model(x)
        layers = {name: m for name, m in peft_model.base_model.model.named_children() if isinstance(m, FedDoRALayer)}
        bits = int(model.removeprefix("MLP").removesuffix("bit")) if quantized_base else 0
        if quantized_base:
            exact = {
                name: layer._base_weight().clone() + layer.get_delta_weight("default") for name, layer in layers.items()
            }
            adapted_weights = dict(exact)  # W₀ + ΔW: the dense weights of the adapted function
            # The quantized layers' own rounding of the forward (int8 activations, fp16 casts), measured on the base.
            inference_error = (base - dense_mlp({n: m._base_weight() for n, m in layers.items()})(x)).abs().max()

        def check(model: nn.Module, merged: bool, unloaded: dict[str, nn.Module] | None = None) -> None:
            if quantized_base:
                check_requantized_step(
                    model, out, x, layers, unloaded, exact, adapted_weights, merged, bits, inference_error
                )
            else:
                torch.testing.assert_close(model(x), out, **MERGE_TOL)

        peft_model.merge_adapter(safe_merge=True)
        check(peft_model, merged=True)
        if quantized_base:  # unmerging shifts the requantized merged weight back, not W₀ + ΔW
            exact = {name: layer._base_weight() - layer.get_delta_weight("default") for name, layer in layers.items()}
        peft_model.unmerge_adapter()
        check(peft_model, merged=False)
        if quantized_base:
            exact = {
                name: layer._base_weight().clone() + layer.get_delta_weight("default") for name, layer in layers.items()
            }
        merged = peft_model.merge_and_unload()
        assert not any(isinstance(m, FedDoRALayer) for m in merged.modules())
        check(merged, merged=True, unloaded={name: getattr(merged, name) for name in layers})


def requantized(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """``weight`` (out × in) quantized as :func:`quantized` quantizes a layer's (NF4 blocks / int8 rows), then
    dequantized: what an exact requantization of ``weight`` gives."""
    from peft.utils.integrations import dequantize_bnb_weight

    linear = nn.Linear(weight.shape[1], weight.shape[0])
    linear.weight.data = weight.detach().float().clone()
    layer = quantized(linear, bits)
    return dequantize_bnb_weight(layer.weight, state=None if bits == 4 else layer.state).float()


def dense_weight(layer: nn.Module) -> torch.Tensor:
    """A quantized (FedDoRA-wrapped or unloaded) layer's weight, dequantized."""
    if isinstance(layer, FedDoRALayer):
        return layer._base_weight()
    from peft.utils.integrations import dequantize_bnb_weight

    return dequantize_bnb_weight(layer.weight, state=getattr(layer, "state", None)).float()


def dense_mlp(weights: dict[str, torch.Tensor]) -> nn.Module:
    """The quantized MLP (its biases) with dense float32 ``weights`` ({"lin0": ..., "lin1": ...}), in eval mode."""
    mlp = build("MLP").__class__(QUANTIZED_SIZES).eval()
    reference = build("MLP4bit")
    for name, weight in weights.items():
        getattr(mlp, name).weight.data = weight.detach().float().clone()
        getattr(mlp, name).bias.data = getattr(reference, name).bias.detach().clone()
    return mlp


def check_requantized_step(model, out, x, layers, unloaded, exact, adapted_weights, merged, bits, inference_error):
    """After a merge or an unmerge into quantized bases: every weight is the exact shifted one (``exact``) up to the
    error that requantizing ``exact`` itself makes (measured here with bitsandbytes on the side), plus 1e-6 (read
    before ``model`` runs: bitsandbytes repacks a 4-bit weight for CPU inference at its first call, which reading it
    back rounds once more); ``model``'s outputs are those of the requantized weights (dense, + ΔW while unmerged) up
    to 3 × the quantized layers' inference error (measured on the base) plus 1e-5; and they differ from the adapted
    outputs ``out`` by no more than the requantizations so far (this one on ``exact``, measured) move a dense model's
    outputs away from those of ``adapted_weights`` (W₀ + ΔW), plus twice that margin."""
    now, requant = {}, {}
    for name, layer in layers.items():
        weight = dense_weight(unloaded[name] if unloaded else layer)
        expected = requantized(exact[name], bits)
        requantization_error = (expected - exact[name]).abs().max()
        assert 0 < requantization_error < 0.1, (name, requantization_error)
        assert (weight - exact[name]).abs().max() <= requantization_error + 1e-6, name
        delta = 0 if merged else layer.get_delta_weight("default")
        now[name], requant[name] = weight + delta, expected + delta
    value = model(x)
    margin = 3 * inference_error + 1e-5  # that rounding depends on the weights: up to 2.3× the base's, measured
    assert (value - dense_mlp(now)(x)).abs().max() <= margin
    requantization_effect = (dense_mlp(requant)(x) - dense_mlp(adapted_weights)(x)).abs().max()
    assert (value - out).abs().max() <= requantization_effect + 2 * margin


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
