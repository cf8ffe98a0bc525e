"""``add_weighted_adapter`` for FedDoRA: ``cat`` gives exactly the weighted sum of the adapters' updates; other
combination types are refused by name."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

from fedlora import FedDoRAConfig
from fedlora.tuners.feddora import FedDoRALayer
from tests.tiny import tiny_llama

WEIGHTS = (0.7, -1.3, 0.4)


@pytest.fixture
def model():
    """Three FedDoRA adapters with nonzero updates: ranks 2, 3 and 1, rsLoRA on one, a rank pattern on one, and
    the last on the q projections only."""
    peft_model = get_peft_model(
        tiny_llama(), FedDoRAConfig(r=2, target_modules=["q_proj", "v_proj"], init_weights=False)
    )
    peft_model.add_adapter(
        "b",
        FedDoRAConfig(
            r=3,
            lora_alpha=5,
            use_rslora=True,
            target_modules=["q_proj", "v_proj"],
            init_weights=False,
            rank_pattern={"layers.1.self_attn.v_proj": 4},
        ),
    )
    peft_model.add_adapter("c", FedDoRAConfig(r=1, lora_alpha=3, target_modules=["q_proj"], init_weights=False))
    return peft_model


def test_cat_gives_the_weighted_sum_of_the_updates(model):
    model.add_weighted_adapter(["default", "b", "c"], list(WEIGHTS), "combined", combination_type="cat")
    layers = [module for module in model.modules() if isinstance(module, FedDoRALayer)]
    assert len(layers) == 4 and all("combined" in layer.feddora_A for layer in layers)
    assert model.peft_config["combined"].r == 2 + 4 + 1
    for layer in layers:
        expected = sum(
            weight * layer.get_delta_weight(name)
            for name, weight in zip(("default", "b", "c"), WEIGHTS, strict=True)
            if name in layer.feddora_A
        )
        torch.testing.assert_close(layer.get_delta_weight("combined"), expected, rtol=1e-5, atol=1e-6)
    tokens = torch.tensor([[3, 14, 15, 92, 65]])
    with torch.no_grad():
        model.set_adapter("combined")
        combined = model(tokens).logits
        model.base_model.set_adapter(["default", "b", "c"])
        for layer in (m for m in model.modules() if isinstance(m, FedDoRALayer)):
            for name, weight in zip(("default", "b", "c"), WEIGHTS, strict=True):
                if name in layer.scaling:
                    layer.scaling[name] *= weight  # the three adapters at once, each weighted
        torch.testing.assert_close(model(tokens).logits, combined, rtol=1e-5, atol=1e-5)


@pytest.mark.bad_input
def test_other_combination_types_and_bad_requests_are_refused(model):
    with pytest.raises(NotImplementedError, match="combination_type='cat' only, not 'svd'"):
        model.add_weighted_adapter(["default", "b"], [1.0, 1.0], "svd", combination_type="svd")
    with pytest.raises(ValueError, match=r"no adapters \['nope'\] to combine"):
        model.add_weighted_adapter(["default", "nope"], [1.0, 1.0], "x")
    with pytest.raises(ValueError, match="2 adapters but 1 weights"):
        model.add_weighted_adapter(["default", "b"], [1.0], "x")
    assert set(model.peft_config) == {"default", "b", "c"}
