"""FedDoRAConfig's module-selection and per-module settings behave as PEFT LoRA's: ``rank_pattern``,
``alpha_pattern`` (with ``use_rslora`` too), ``layers_to_transform`` (+ ``layers_pattern``) and ``exclude_modules``.

Each case builds a PEFT ``LoraConfig`` and a ``FedDoRAConfig`` with the same settings on the same tiny Llama and
GPT-2 and requires the same adapted modules, with the same rank, lora_alpha and scaling on each, and factor shapes of
that rank; and, so that no case passes by the settings having no effect, a different result than without them.
"""

from __future__ import annotations

import pytest
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer

from fedlora import FedDoRAConfig
from fedlora.tuners.feddora import FedDoRALayer
from tests.tiny import tiny_gpt2, tiny_llama

CASES = {
    "rank_pattern and alpha_pattern, suffix and full keys": dict(
        target_modules="all-linear",
        r=4,
        lora_alpha=8,
        rank_pattern={"q_proj": 2, "model.layers.1.mlp.down_proj": 7},
        alpha_pattern={"v_proj": 3, "layers.0.self_attn.o_proj": 11, "model.layers.1.self_attn.q_proj": 5},
    ),
    "regex keys": dict(
        target_modules=["q_proj", "v_proj", "up_proj"],
        r=3,
        lora_alpha=6,
        rank_pattern={r"layers\.1\.self_attn\.\w_proj": 5},
        alpha_pattern={r".*mlp\..*": 2},
    ),
    "use_rslora with patterns": dict(
        target_modules=["k_proj", "gate_proj"],
        r=4,
        lora_alpha=16,
        use_rslora=True,
        rank_pattern={"gate_proj": 9},
        alpha_pattern={"layers.1.self_attn.k_proj": 5},
    ),
    "layers_to_transform with layers_pattern": dict(
        target_modules=["q_proj", "down_proj"], layers_to_transform=[1], layers_pattern="layers"
    ),
    "layers_to_transform as an int, no pattern": dict(target_modules=["k_proj", "o_proj"], layers_to_transform=0),
    "layers_to_transform with a pattern list and rank_pattern": dict(
        target_modules=["q_proj", "v_proj"],
        layers_to_transform=[0],
        layers_pattern=["layers"],
        rank_pattern={"v_proj": 6},
    ),
    "exclude_modules as names": dict(target_modules="all-linear", exclude_modules=["q_proj", "down_proj"]),
    "exclude_modules as a regex": dict(
        target_modules=["q_proj", "v_proj", "gate_proj"], exclude_modules=r".*layers\.0\..*"
    ),
}
GPT2_CASES = {  # Conv1D bases (fan_in_fan_out) and GPT-2's own layer list name, "h"
    "gpt2 rank_pattern and layers_to_transform": dict(
        target_modules=["c_attn", "c_fc"],
        fan_in_fan_out=True,
        rank_pattern={"c_fc": 6},
        alpha_pattern={"h.1.attn.c_attn": 12},
        layers_to_transform=[1],
        layers_pattern="h",
    ),
    "gpt2 exclude_modules": dict(target_modules=["c_attn", "c_proj"], fan_in_fan_out=True, exclude_modules=["c_proj"]),
}
PATTERN_SETTINGS = ("rank_pattern", "alpha_pattern", "layers_to_transform", "layers_pattern", "exclude_modules")


def adapted_modules(model, layer_type, factor: str) -> dict[str, tuple]:
    """{module name: (r, lora_alpha, scaling, shape of the A factor)} of every adapted module of ``model``."""
    found = {}
    for name, module in model.base_model.model.named_modules():
        if isinstance(module, layer_type):
            a = getattr(module, factor)["default"]
            shape = tuple(a.weight.shape if hasattr(a, "weight") else a.direction.shape)
            found[name] = (module.r["default"], module.lora_alpha["default"], module.scaling["default"], shape)
    return found


def both(model_fn, settings: dict) -> tuple[dict, dict]:
    lora = get_peft_model(model_fn(), LoraConfig(**settings))
    feddora = get_peft_model(model_fn(), FedDoRAConfig(**settings))
    return adapted_modules(lora, LoraLayer, "lora_A"), adapted_modules(feddora, FedDoRALayer, "feddora_A")


@pytest.mark.parametrize(
    "model_fn,settings",
    [pytest.param(tiny_llama, s, id=name) for name, s in CASES.items()]
    + [pytest.param(tiny_gpt2, s, id=name) for name, s in GPT2_CASES.items()],
)
def test_same_modules_ranks_and_scalings_as_peft_lora(model_fn, settings):
    lora, feddora = both(model_fn, settings)
    assert feddora == lora
    assert lora and all(shape[0] == r for r, _, _, shape in lora.values())
    plain = {name: value for name, value in settings.items() if name not in PATTERN_SETTINGS}
    assert both(model_fn, plain)[0] != lora, "the settings change nothing on this model: the case proves nothing"
