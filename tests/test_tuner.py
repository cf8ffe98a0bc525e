"""FedDoRA as a PEFT adapter: the layer's math, PEFT integration, save/load, merge, several adapters.

Models and tensors live on the ``device`` fixture (tests/conftest.py: CUDA where a GPU is visible, else the CPU), so
the tests run under ``FEDLORA_BACKEND=triton`` both on a GPU and on the CPU (Triton's interpreter).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from peft import PeftConfig, get_peft_model
from safetensors.torch import load_file
from torch import nn

from fedlora import FedDoRAConfig
from fedlora.tuners.feddora import Linear as FedDoRALinear
from fedlora_kernels import NORM_EPS, feddora_lora_reference
from tests.numerics import assert_within_reference_error
from tests.tiny import tiny_gpt2, tiny_llama

# The layer checks run in float64, except under FEDLORA_BACKEND=triton: Triton has no float64, so they run in float32.
LAYER_DTYPE = torch.float32 if os.environ.get("FEDLORA_BACKEND") == "triton" else torch.float64
LAYER_TOL = {torch.float64: {"rtol": 1e-10, "atol": 1e-12}, torch.float32: {"rtol": 1e-4, "atol": 1e-5}}[LAYER_DTYPE]
TOKENS = torch.tensor([[3, 17, 42, 5, 9, 77, 1], [8, 8, 31, 60, 2, 4, 90]])
PARTS = ("direction", "magnitude")


def explicit_branch(x, va, ma, vb, mb, scaling):
    """s · x Aᵀ Bᵀ written out from the definition (‖v‖ = sqrt(Σv² + NORM_EPS)), independently of the op."""
    a = va * (ma / torch.sqrt((va**2).sum(0) + NORM_EPS))
    b = vb * (mb / torch.sqrt((vb**2).sum(0) + NORM_EPS))
    return scaling * x @ a.T @ b.T


def adapted_linear(device, k=13, d=11, r=3, dtype=LAYER_DTYPE, **config_kwargs):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(k, d, dtype=dtype))
    config = FedDoRAConfig(r=r, lora_alpha=6, target_modules=["0"], init_weights=False, **config_kwargs)
    return get_peft_model(model, config).to(device=device, dtype=dtype)


@pytest.mark.parametrize("r", [2, 3, 4, 5])
@pytest.mark.parametrize("init_weights", [True, "paired"])
@pytest.mark.parametrize("model_fn", [tiny_llama, tiny_gpt2])
def test_paired_init_equals_base_model_with_every_tensor_nonzero(model_fn, init_weights, r, device):
    """The default start: B A = 0 through cancelling groups of rank-1 components (pairs; a triple at odd r), while
    every magnitude and direction is non-zero and the factors equal their directions (m = ‖V‖_col)."""
    model, tokens = model_fn().eval().to(device), TOKENS.to(device)
    with torch.no_grad():
        base_logits = model(tokens).logits
    peft_model = get_peft_model(model, FedDoRAConfig(r=r, target_modules="all-linear", init_weights=init_weights))
    with torch.no_grad():
        torch.testing.assert_close(peft_model(tokens).logits, base_logits, rtol=0, atol=1e-6)
    for layer in (m for m in peft_model.modules() if isinstance(m, FedDoRALinear)):
        a, b = layer.feddora_A["default"], layer.feddora_B["default"]
        for factor in (a, b):
            assert torch.all(factor.magnitude > 0) and torch.all(factor.direction.norm(dim=0) > 0)
            torch.testing.assert_close(factor.magnitude, factor.direction.norm(dim=0))
        delta = b.direction @ a.direction
        torch.testing.assert_close(delta, torch.zeros_like(delta))
        assert torch.linalg.matrix_rank(a.direction) >= r // 2  # the groups are independent draws


@pytest.mark.parametrize("init_weights", [True, "zero_A"])
def test_directions_start_as_loras_a(init_weights):
    """V_A and V_B are drawn as LoRA's A, uniform on ±1/√k (k = in_features), whatever the output width: their
    entries stay inside the bound and have its variance 1/(3k); V_B's columns of a paired start are equal in pairs."""
    k, d, r = 256, 384, 8
    torch.manual_seed(0)
    peft_model = get_peft_model(
        nn.Sequential(nn.Linear(k, d)), FedDoRAConfig(r=r, target_modules=["0"], init_weights=init_weights)
    )
    layer = peft_model.base_model.model[0]
    va, vb = layer.feddora_A["default"].direction, layer.feddora_B["default"].direction
    for v in (va, vb[:, ::2] if init_weights is True else vb):  # the independent draws
        assert v.abs().max() <= 1 / k**0.5
        assert v.var().item() == pytest.approx(1 / (3 * k), rel=0.1)
    if init_weights is True:
        torch.testing.assert_close(vb[:, ::2], vb[:, 1::2], rtol=0, atol=0)
        torch.testing.assert_close(va[::2], -va[1::2], rtol=0, atol=0)


@pytest.mark.parametrize("init_weights", ["gaussian", "zero_A", "zero_B"])
@pytest.mark.parametrize("model_fn", [tiny_llama, tiny_gpt2])
def test_zero_init_equals_base_model_exactly(model_fn, init_weights, device):
    model, tokens = model_fn().eval().to(device), TOKENS.to(device)
    with torch.no_grad():
        base_logits = model(tokens).logits
    peft_model = get_peft_model(model, FedDoRAConfig(r=4, target_modules="all-linear", init_weights=init_weights))
    with torch.no_grad():
        assert torch.equal(peft_model(tokens).logits, base_logits)
    layer = next(m for m in peft_model.modules() if isinstance(m, FedDoRALinear))
    zero, other = ("B", "A") if init_weights == "zero_B" else ("A", "B")
    # One factor is 0 through its magnitude; the other equals its direction (m = ‖V‖_col).
    assert torch.count_nonzero(getattr(layer, f"feddora_{zero}")["default"].magnitude) == 0
    assert torch.all(getattr(layer, f"feddora_{zero}")["default"].direction.norm(dim=0) > 0)
    kept = getattr(layer, f"feddora_{other}")["default"]
    torch.testing.assert_close(kept.magnitude, kept.direction.norm(dim=0))


@pytest.mark.parametrize("r", [1, 4])
@pytest.mark.parametrize("init_weights,first", [("zero_A", {"A.magnitude"}), ("zero_B", {"B.magnitude"})])
def test_zero_init_gradients(init_weights, first, r, device):
    """At step 1 only the zero factor's magnitude gets a gradient (m_A: k entries by default, m_B: r with
    ``zero_B``); after one optimizer step every trained tensor does (at r = 1 V_A is fixed, not trained)."""
    config = FedDoRAConfig(r=r, target_modules=["q_proj"], init_weights=init_weights)
    peft_model, tokens = get_peft_model(tiny_llama().to(device), config), TOKENS.to(device)
    tensors = {
        name.split("feddora_")[1].replace(".default.", "."): p
        for name, p in peft_model.named_parameters()
        if p.requires_grad and ".layers.0." in name
    }
    assert set(tensors) == {"A.magnitude", "B.direction", "B.magnitude"} | ({"A.direction"} if r > 1 else set())
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(2):
        peft_model(input_ids=tokens, labels=tokens).loss.backward()
        nonzero = {name for name, t in tensors.items() if t.grad is not None and torch.count_nonzero(t.grad)}
        assert nonzero == (first if step == 0 else set(tensors)), step
        optimizer.step()
        optimizer.zero_grad()


def narrow_model(dtype=LAYER_DTYPE):
    """10 → 20 → 2 → 1 linears: the last two are narrower than most ranks, the last has out_features = 1."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 20), nn.Tanh(), nn.Linear(20, 2), nn.Tanh(), nn.Linear(2, 1)).to(dtype)


def trained_tensors(peft_model) -> dict[str, torch.Tensor]:
    return {name: p for name, p in peft_model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("r", [1, 2, 3, 8, 25])
def test_every_trained_tensor_changes_in_one_step(r, device):
    """For every r ≥ 1 (above min(in, out) too, and on an out_features = 1 layer) every tensor the config trains
    gets a nonzero gradient and moves in the first optimizer step; the fixed directions are no parameters."""
    config = FedDoRAConfig(r=r, target_modules=["0", "2", "4"], init_weights=False)
    peft_model = get_peft_model(narrow_model().to(device), config)
    trained = trained_tensors(peft_model)
    fixed = {"0": "A" * (r == 1), "2": "A" * (r == 1), "4": "AB" if r == 1 else "B"}
    expected = {
        f"base_model.model.{layer}.feddora_{factor}.default.{part}"
        for layer in "024"
        for factor in "AB"
        for part in PARTS
        if part == "magnitude" or factor not in fixed[layer]
    }
    assert set(trained) == expected
    before = {name: p.detach().clone() for name, p in trained.items()}
    optimizer = torch.optim.Adam(list(trained.values()), lr=1e-2)
    peft_model(torch.randn(8, 10, dtype=LAYER_DTYPE, device=device)).square().sum().backward()
    optimizer.step()
    assert [name for name, p in trained.items() if torch.equal(p, before[name])] == []


@pytest.mark.parametrize("r", [1, 3, 7])
@pytest.mark.parametrize("d", [1, 3])
def test_any_rank_output_and_gradients_match_formula(r, d, device):
    """r > min(in_features, out_features) is accepted, as by PEFT LoRA, with a warning naming the layer; output and
    every gradient match the formula, fixed directions included as constants."""
    torch.manual_seed(0)
    config = FedDoRAConfig(r=r, lora_alpha=6, target_modules=["0"], init_weights=False)
    model = nn.Sequential(nn.Linear(5, d, dtype=LAYER_DTYPE, device=device))
    if r > min(5, d):
        with pytest.warns(
            UserWarning, match=rf"r={r} of layer '0' is larger than min\(in_features=5, out_features={d}\)"
        ):
            peft_model = get_peft_model(model, config)
    else:
        peft_model = get_peft_model(model, config)
    layer = peft_model.base_model.model[0]
    a, b = layer.feddora_A["default"], layer.feddora_B["default"]
    trained = [t for t in (a.direction, a.magnitude, b.direction, b.magnitude) if t.requires_grad]
    x = torch.randn(4, 5, dtype=LAYER_DTYPE, device=device, requires_grad=True)
    grad_out = torch.randn(4, d, dtype=LAYER_DTYPE, device=device)
    out = peft_model(x)
    expected_out = layer.base_layer(x) + explicit_branch(x, a.direction, a.magnitude, b.direction, b.magnitude, 6 / r)
    torch.testing.assert_close(out, expected_out, **LAYER_TOL)
    got = torch.autograd.grad(out, [x, *trained], grad_out)
    expected = torch.autograd.grad(expected_out, [x, *trained], grad_out)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, **LAYER_TOL)


def test_rank_warnings_are_given_once_per_distinct_message(caplog):
    """r above a layer's min(in, out), or r = 1: one warning per layer shape, not one per layer (58 on SmolLM2)."""
    config = FedDoRAConfig(r=100, target_modules=["q_proj", "v_proj"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        get_peft_model(tiny_llama(), config)  # 2 layers; q_proj 32 → 32, v_proj 32 → 16
    ranks = [str(w.message) for w in caught if "is larger than min(" in str(w.message)]
    assert len(ranks) == 2, ranks
    assert (
        "r=100 of layer 'model.layers.0.self_attn.q_proj' is larger than min(in_features=32, out_features=32)"
        in ranks[0]
    )
    with caplog.at_level("WARNING", logger="fedlora.tuners.feddora.model"):
        get_peft_model(tiny_llama(), FedDoRAConfig(r=1, target_modules=["q_proj", "v_proj"]))
    assert sum("A.direction has one row (r=1)" in record.getMessage() for record in caplog.records) == 1


def test_single_row_directions_are_fixed_buffers_out_of_every_role(caplog, device):
    """V_A at r = 1 and V_B at out_features = 1 are buffers: logged, saved, but neither trained nor shared."""
    from fedlora.federated.strategy import STRATEGIES

    with caplog.at_level("WARNING", logger="fedlora.tuners.feddora.model"):
        peft_model = get_peft_model(tiny_llama().to(device), FedDoRAConfig(r=1, target_modules=["q_proj", "lm_head"]))
    logged = [record.getMessage() for record in caplog.records]
    assert any("'model.layers.0.self_attn.q_proj': A.direction has one row (r=1)" in m for m in logged)
    assert not any("q_proj': B.direction" in m for m in logged)
    params, state = dict(peft_model.named_parameters()), peft_model.state_dict()
    a_direction = "base_model.model.model.layers.0.self_attn.q_proj.feddora_A.default.direction"
    assert a_direction in state and a_direction not in params
    assert a_direction.replace("_A.", "_B.") in params
    names = STRATEGIES["fedlora-opt"].tensor_names(peft_model)
    assert not any(name.endswith("feddora_A.default.direction") for role in names.values() for name in role)
    assert all(name.endswith("feddora_B.default.direction") for name in names["shared"])
    with torch.no_grad():
        peft_model(TOKENS.to(device))


def test_fixed_direction_follows_the_adapter_dtype(device):
    """PEFT's autocast keeps a bfloat16 model's adapter parameters in float32 but not a fixed direction's buffer;
    the layer uses it in the magnitude's dtype."""
    config = FedDoRAConfig(r=1, target_modules=["0", "2", "4"], init_weights=False)
    peft_model = get_peft_model(narrow_model(torch.bfloat16).to(device), config)
    layer = peft_model.base_model.model[4]
    assert layer.feddora_B["default"].direction.dtype == torch.bfloat16
    assert layer.feddora_B["default"].magnitude.dtype == torch.float32
    out = peft_model(torch.randn(3, 10, dtype=torch.bfloat16, device=device))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_naming_contract_and_shapes():
    peft_model = get_peft_model(tiny_llama(), FedDoRAConfig(r=4, target_modules=["q_proj", "down_proj"]))
    params = dict(peft_model.named_parameters())
    prefix = "base_model.model.model.layers.0.mlp.down_proj"
    assert params[f"{prefix}.feddora_A.default.direction"].shape == (4, 48)
    assert params[f"{prefix}.feddora_A.default.magnitude"].shape == (48,)
    assert params[f"{prefix}.feddora_B.default.direction"].shape == (32, 4)
    assert params[f"{prefix}.feddora_B.default.magnitude"].shape == (4,)
    trainable = {n for n, p in params.items() if p.requires_grad}
    assert trainable == {n for n in params if ".feddora_" in n}
    assert len(trainable) == 2 * 2 * 4  # 2 layers × 2 modules × 4 tensors


@pytest.mark.parametrize("use_rslora", [False, True])
def test_layer_output_matches_formula(use_rslora, device):
    peft_model = adapted_linear(device, use_rslora=use_rslora)
    layer = peft_model.base_model.model[0]
    a, b = layer.feddora_A["default"], layer.feddora_B["default"]
    scaling = 6 / (math.sqrt(3) if use_rslora else 3)
    x = torch.randn(2, 5, 13, dtype=LAYER_DTYPE, device=device)
    expected = layer.base_layer(x) + explicit_branch(x, a.direction, a.magnitude, b.direction, b.magnitude, scaling)
    torch.testing.assert_close(peft_model(x), expected, **LAYER_TOL)


def test_gradients_of_all_tensors_match_formula(device):
    peft_model = adapted_linear(device)
    layer = peft_model.base_model.model[0]
    a, b = layer.feddora_A["default"], layer.feddora_B["default"]
    params = [a.direction, a.magnitude, b.direction, b.magnitude]
    x = torch.randn(4, 13, dtype=LAYER_DTYPE, device=device, requires_grad=True)
    grad_out = torch.randn(4, 11, dtype=LAYER_DTYPE, device=device)
    got = torch.autograd.grad(peft_model(x), [x, *params], grad_out)
    expected_out = layer.base_layer(x) + explicit_branch(x, *params, 2.0)
    expected = torch.autograd.grad(expected_out, [x, *params], grad_out)
    for name, g, e in zip(["x", "V_A", "m_A", "V_B", "m_B"], got, expected, strict=True):
        torch.testing.assert_close(g, e, **LAYER_TOL, msg=f"gradient of {name}")
        assert torch.count_nonzero(g) > 0, f"gradient of {name} is zero"


def test_gradcheck_op_all_inputs_float64():
    torch.manual_seed(0)
    inputs = [
        torch.randn(3, 2, 6, dtype=torch.float64),
        torch.randn(2, 6, dtype=torch.float64),
        torch.rand(6, dtype=torch.float64) + 0.5,
        torch.randn(5, 2, dtype=torch.float64),
        torch.rand(2, dtype=torch.float64) + 0.5,
        torch.randn(3, 2, 5, dtype=torch.float64),
    ]
    for t in inputs:
        t.requires_grad_(True)

    def op(x, va, ma, vb, mb, base_out):
        return feddora_lora_reference(x, va, ma, vb, mb, 0.7, base_out=base_out)

    assert torch.autograd.gradcheck(op, inputs)


def test_frozen_role_is_not_trained_even_after_set_adapter(device):
    roles = {"A.direction": "frozen", "B.direction": "shared", "A.magnitude": "personal", "B.magnitude": "frozen"}
    peft_model = get_peft_model(
        tiny_llama().to(device), FedDoRAConfig(r=2, target_modules=["q_proj"], tensor_roles=roles)
    )
    peft_model.set_adapter("default")
    trainable = {
        n.split("feddora_")[1].replace(".default.", ".") for n, p in peft_model.named_parameters() if p.requires_grad
    }
    assert trainable == {"B.direction", "A.magnitude"}


def test_disable_adapter_and_dropout_behaviour(device):
    peft_model = adapted_linear(device, lora_dropout=0.5)
    x = torch.randn(6, 13, dtype=LAYER_DTYPE, device=device)
    base = peft_model.base_model.model[0].base_layer(x)
    with peft_model.disable_adapter():
        torch.testing.assert_close(peft_model(x), base)
    peft_model.eval()
    assert torch.equal(peft_model(x), peft_model(x))
    peft_model.train()
    assert not torch.equal(peft_model(x), peft_model(x))


@pytest.mark.parametrize("model_fn", [tiny_llama, tiny_gpt2])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 5e-2)])
def test_merge_unmerge_and_merge_and_unload(model_fn, dtype, tol, device):
    model, tokens = model_fn().eval().to(device=device, dtype=dtype), TOKENS.to(device)
    with torch.no_grad():
        base_logits = model(tokens).logits.float()
    config = FedDoRAConfig(r=4, lora_alpha=32, target_modules="all-linear", init_weights=False)  # a visible update
    peft_model = get_peft_model(model, config, autocast_adapter_dtype=False).eval()
    with torch.no_grad():
        adapted = peft_model(tokens).logits.float()
        assert (adapted - base_logits).abs().max() > 10 * tol
        peft_model.merge_adapter()
        torch.testing.assert_close(peft_model(tokens).logits.float(), adapted, rtol=tol, atol=tol)
        peft_model.unmerge_adapter()
        torch.testing.assert_close(peft_model(tokens).logits.float(), adapted, rtol=tol, atol=tol)
        merged_model = peft_model.merge_and_unload()
        assert not any("feddora" in n for n, _ in merged_model.named_parameters())
        torch.testing.assert_close(merged_model(tokens).logits.float(), adapted, rtol=tol, atol=tol)


def test_several_named_adapters(device):
    tokens = TOKENS.to(device)
    peft_model = get_peft_model(
        tiny_llama().to(device), FedDoRAConfig(r=2, target_modules=["q_proj", "v_proj"], init_weights=False)
    )
    peft_model.add_adapter("second", FedDoRAConfig(r=3, target_modules=["q_proj"], init_weights=False))
    peft_model.eval()
    with torch.no_grad():
        first = peft_model(tokens).logits
        peft_model.set_adapter("second")
        second = peft_model(tokens).logits
    assert not torch.allclose(first, second)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all(".second." in n for n in trainable)
    peft_model.set_adapter("default")
    peft_model.delete_adapter("second")
    assert not any(".second." in n for n, _ in peft_model.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(peft_model(tokens).logits, first)


def test_save_reload_in_fresh_interpreter_gives_identical_logits(tmp_path, device):
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    tiny_llama().save_pretrained(base_dir)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir).to(device)
    peft_model = get_peft_model(model, FedDoRAConfig(r=4, target_modules="all-linear", init_weights=False)).eval()
    with torch.no_grad():
        logits = peft_model(TOKENS.to(device)).logits
    peft_model.save_pretrained(adapter_dir)

    saved = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert saved["peft_type"] == "FEDDORA"
    assert saved["tensor_roles"]["A.magnitude"] == "personal"
    keys = load_file(adapter_dir / "adapter_model.safetensors").keys()
    assert "base_model.model.model.layers.0.self_attn.q_proj.feddora_A.direction" in keys
    assert isinstance(PeftConfig.from_pretrained(adapter_dir), FedDoRAConfig)

    script = textwrap.dedent(
        f"""
        import torch, fedlora
        from peft import AutoPeftModelForCausalLM, PeftModel
        from transformers import AutoModelForCausalLM
        tokens = torch.tensor({TOKENS.tolist()}, device={str(device)!r})
        base = AutoModelForCausalLM.from_pretrained({str(base_dir)!r}).to({str(device)!r})
        model = PeftModel.from_pretrained(base, {str(adapter_dir)!r}).eval()
        auto = AutoPeftModelForCausalLM.from_pretrained({str(adapter_dir)!r}).to({str(device)!r}).eval()
        with torch.no_grad():
            torch.save([model(tokens).logits, auto(tokens).logits], {str(tmp_path / "logits.pt")!r})
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True)
    reloaded, auto = torch.load(tmp_path / "logits.pt", map_location=device)
    assert torch.equal(reloaded, logits)
    assert torch.equal(auto, logits)


def test_gradient_checkpointing_gives_same_gradients(device):
    tokens = TOKENS.to(device)

    def grads(checkpointing: bool):
        peft_model = get_peft_model(
            tiny_llama().to(device), FedDoRAConfig(r=2, target_modules="all-linear", init_weights=False)
        )
        if checkpointing:
            peft_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
            peft_model.enable_input_require_grads()
        peft_model.train()
        peft_model(tokens, labels=tokens).loss.backward()
        return {n: p.grad for n, p in peft_model.named_parameters() if p.requires_grad}

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-4, atol=1e-6, msg=name)


def test_trainer_run_decreases_loss(tmp_path, device):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    torch.manual_seed(0)
    rows = torch.randint(0, 96, (2, 12)).repeat(4, 1)
    data = Dataset.from_dict({"input_ids": rows.tolist(), "labels": rows.tolist()})
    peft_model = get_peft_model(tiny_llama(), FedDoRAConfig(r=4, lora_alpha=16, target_modules="all-linear"))
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=8,
        max_steps=30,
        learning_rate=1e-2,  # zero_A (the default) learns best at a lower lr than zero_B (benchmarks.learning)
        lr_scheduler_type="constant",
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=device.type == "cpu",  # else the Trainer puts the model on the GPU, where the kernels run
    )
    trainer = Trainer(model=peft_model, args=args, train_dataset=data)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 30
    assert losses[-1] < 0.9 * losses[0]


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"r": 0}, "positive integer"),
        ({"lora_dropout": 1.5}, "lora_dropout"),
        ({"bias": "some"}, "bias"),
        ({"init_weights": "orthogonal"}, "init_weights"),
        ({"tensor_roles": {"A.direction": "shared"}}, "missing"),
        (
            {
                "tensor_roles": {
                    **dict.fromkeys(["A.direction", "A.magnitude", "B.direction"], "shared"),
                    "B.magnitude": "global",
                }
            },
            "values",
        ),
        ({"rank_pattern": {"q_proj": -1}}, "rank_pattern"),
        ({"layers_pattern": "layers"}, "layers_to_transform"),
    ],
)
def test_bad_config_raises_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FedDoRAConfig(**kwargs)


def test_unsupported_target_names_module_and_type():
    with pytest.raises(TypeError, match=r"embed_tokens.*Embedding"):
        get_peft_model(tiny_llama(), FedDoRAConfig(target_modules=["embed_tokens"]))


def test_target_matching_nothing_raises():
    with pytest.raises(ValueError, match="not found in the base model"):
        get_peft_model(tiny_llama(), FedDoRAConfig(target_modules=["no_such_module"]))


# --------------------------------------------------------------------------------------------------------------------
# The layer with non-trivial magnitudes against a float64 hand formula, and against PEFT LoRA given the same A and B
# --------------------------------------------------------------------------------------------------------------------


def randomize_magnitudes(peft_model, seed: int = 1) -> None:
    """Every adapted layer's m_A and m_B set to random positive values (0.2 to 2.2), far from ‖V‖_col, so A ≠ V_A and
    B ≠ V_B: the magnitudes then matter to every output, merge and gradient."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in peft_model.modules():
            if isinstance(module, FedDoRALinear):
                for factor in (module.feddora_A["default"], module.feddora_B["default"]):
                    magnitude = factor.magnitude
                    value = torch.rand(magnitude.shape, generator=gen, dtype=torch.float64) * 2 + 0.2
                    magnitude.copy_(value.to(magnitude))


def hand_factors(layer, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """A = V_A·m_A/sqrt(Σ V_A² + eps) and B = V_B·m_B/sqrt(Σ V_B² + eps) (column-wise) from the layer's tensors,
    written out in ``dtype``."""
    a, b = layer.feddora_A["default"], layer.feddora_B["default"]
    va, ma, vb, mb = (t.detach().to(dtype) for t in (a.direction, a.magnitude, b.direction, b.magnitude))
    lora_a = va * ma / torch.sqrt((va * va).sum(dim=0) + NORM_EPS)
    lora_b = vb * mb / torch.sqrt((vb * vb).sum(dim=0) + NORM_EPS)
    return lora_a, lora_b


def hand_delta_weight(layer, dtype=torch.float64) -> torch.Tensor:
    """ΔW = s·B A (d×k) from :func:`hand_factors` in ``dtype``."""
    lora_a, lora_b = hand_factors(layer, dtype)
    return layer.scaling["default"] * (lora_b @ lora_a)


def hand_output(layer, x, dtype=torch.float64) -> torch.Tensor:
    """x W₀ᵀ + bias + x ΔWᵀ in ``dtype`` (W₀ in the (d, k) layout, whatever the base's layout)."""
    base = layer.get_base_layer()
    w0 = base.weight.detach().to(dtype)
    w0 = w0.T if layer.fan_in_fan_out else w0
    return x.detach().to(dtype) @ (w0 + hand_delta_weight(layer, dtype)).T + base.bias.detach().to(dtype)


def adapted_single_layer(kind: str, device, use_rslora: bool = False):
    """A k=13 → d=11 nn.Linear, or transformers Conv1D ((in, out) weight layout), with a rank-3 FedDoRA adapter
    (lora_alpha 6) whose magnitudes are random; in LAYER_DTYPE on ``device``."""
    torch.manual_seed(0)
    if kind == "linear":
        model = nn.Sequential(nn.Linear(13, 11))
    else:
        from transformers.pytorch_utils import Conv1D

        model = nn.Sequential(Conv1D(11, 13))
        nn.init.normal_(model[0].bias)
    config = FedDoRAConfig(
        r=3,
        lora_alpha=6,
        target_modules=["0"],
        init_weights=False,
        use_rslora=use_rslora,
        fan_in_fan_out=kind != "linear",
    )
    peft_model = get_peft_model(model, config).to(device=device, dtype=LAYER_DTYPE)
    randomize_magnitudes(peft_model)
    return peft_model, peft_model.base_model.model[0]


@pytest.mark.parametrize("kind,use_rslora", [("linear", False), ("linear", True), ("conv1d", False)])
def test_random_magnitudes_output_and_gradients_match_float64_formula(kind, use_rslora, device):
    peft_model, layer = adapted_single_layer(kind, device, use_rslora)
    assert layer.scaling["default"] == pytest.approx(6 / (math.sqrt(3) if use_rslora else 3))
    a, b = layer.feddora_A["default"], layer.feddora_B["default"]
    assert (a.magnitude - a.direction.norm(dim=0)).abs().min() > 1e-3  # the magnitudes are not the norms
    x = torch.randn(2, 5, 13, dtype=LAYER_DTYPE, device=device)
    out = peft_model(x)
    assert_within_reference_error(out, hand_output(layer, x, LAYER_DTYPE), hand_output(layer, x), "output")

    params = {"V_A": a.direction, "m_A": a.magnitude, "V_B": b.direction, "m_B": b.magnitude}
    grad_out = torch.randn_like(out)
    got = torch.autograd.grad(out, list(params.values()), grad_out)

    def hand_gradients(dtype):
        leaves = {name: p.detach().to(dtype).requires_grad_() for name, p in params.items()}
        lora_a = leaves["V_A"] * leaves["m_A"] / torch.sqrt((leaves["V_A"] ** 2).sum(0) + NORM_EPS)
        lora_b = leaves["V_B"] * leaves["m_B"] / torch.sqrt((leaves["V_B"] ** 2).sum(0) + NORM_EPS)
        branch = layer.scaling["default"] * x.to(dtype) @ lora_a.T @ lora_b.T
        return torch.autograd.grad(branch, list(leaves.values()), grad_out.to(dtype))

    same_dtype, ref64 = hand_gradients(LAYER_DTYPE), hand_gradients(torch.float64)
    for name, g, s, r in zip(params, got, same_dtype, ref64, strict=True):
        assert_within_reference_error(g, s, r, f"gradient of {name}")


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_random_magnitudes_merge_matches_float64_formula(kind, device):
    """merge adds s·B A (in the base's layout) to the weight, so merged outputs are the formula's too; unmerge restores
    W₀."""
    peft_model, layer = adapted_single_layer(kind, device)
    peft_model.eval()
    x = torch.randn(6, 13, dtype=LAYER_DTYPE, device=device)
    w0 = layer.get_base_layer().weight.detach().clone()
    delta64 = hand_delta_weight(layer)
    delta = hand_delta_weight(layer, LAYER_DTYPE)
    layout = (lambda w: w.T) if layer.fan_in_fan_out else (lambda w: w)
    assert delta64.abs().max() > 0.1  # a visible update
    expected, expected64 = hand_output(layer, x, LAYER_DTYPE), hand_output(layer, x)  # from W₀, before merging
    with torch.no_grad():
        assert_within_reference_error(peft_model(x), expected, expected64, "unmerged output")
        peft_model.merge_adapter()
        merged_weight = layer.get_base_layer().weight.detach()
        assert_within_reference_error(
            layout(merged_weight), layout(w0) + delta, layout(w0).double() + delta64, "merged weight"
        )
        merged = peft_model(x)
        assert_within_reference_error(merged, expected, expected64, "merged output")
        peft_model.unmerge_adapter()
        restored = layer.get_base_layer().weight.detach()
        assert_within_reference_error(restored, (w0 + layout(delta)) - layout(delta), w0.double(), "unmerged weight")


def test_matches_peft_lora_given_the_same_a_and_b(device):
    """A PEFT LoRA model on the same tiny Llama, with lora_A = A and lora_B = B copied from FedDoRA's (random
    magnitudes) and the same r and lora_alpha (so the same s), gives FedDoRA's logits: in float64 (LoRA in float64
    with A, B computed in float64) to float64 rounding, in LAYER_DTYPE within the numerics rule."""
    from peft import LoraConfig

    targets = ["q_proj", "v_proj", "down_proj"]
    tokens = TOKENS.to(device)
    feddora = get_peft_model(
        tiny_llama().to(device=device, dtype=LAYER_DTYPE),
        FedDoRAConfig(r=4, lora_alpha=12, target_modules=targets, init_weights=False),
    ).eval()
    randomize_magnitudes(feddora)
    factors = {}
    for name, module in feddora.base_model.model.named_modules():
        if isinstance(module, FedDoRALinear):
            factors[name] = hand_factors(module)
    assert len(factors) == 2 * len(targets)

    def lora_logits(dtype):
        config = LoraConfig(r=4, lora_alpha=12, target_modules=targets, init_lora_weights=False)
        lora = get_peft_model(tiny_llama().to(device=device, dtype=dtype), config).eval()
        copied = 0
        for name, module in lora.base_model.model.named_modules():
            if name in factors:
                assert module.scaling["default"] == 3.0
                with torch.no_grad():
                    module.lora_A["default"].weight.copy_(factors[name][0])
                    module.lora_B["default"].weight.copy_(factors[name][1])
                copied += 1
        assert copied == len(factors)
        with torch.no_grad():
            return lora(tokens).logits

    with torch.no_grad():
        got = feddora(tokens).logits
        base = tiny_llama().to(device=device, dtype=LAYER_DTYPE)(tokens).logits
    lora64 = lora_logits(torch.float64)
    assert (lora64 - base.double()).abs().max() > 0.1  # the adapters change the logits visibly
    assert_within_reference_error(got, lora_logits(LAYER_DTYPE), lora64, "logits")
