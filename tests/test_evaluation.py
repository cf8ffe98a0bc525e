"""Evaluation: response-token loss/perplexity, ROUGE-L of greedy generations, mode restoration, errors."""

from __future__ import annotations

import math

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model

from fedlora.data import CausalLMCollator, tokenize_dataset
from fedlora.evaluation import evaluate, evaluate_loss, generate_responses, rouge_l
from tests.tiny import tiny_gpt2, tiny_llama, tiny_tokenizer

ROWS = {
    "instruction": [
        "What is the capital of France?",
        "Summarize the passage.",
        "Give me a list of ideas for a birthday party.",
        "Classify apple and carrot as fruit or vegetable.",
        "Explain federated learning in one sentence.",
        "What is low-rank adaptation?",
    ],
    "context": ["", "Virgin Australia commenced services in 2000.", "", "", "", ""],
    "response": [
        "The capital of France is Paris.",
        "Virgin Australia started flying in 2000.",
        "A picnic, a treasure hunt and a karaoke night.",
        "Apple is a fruit and carrot is a vegetable.",
        "Clients train a shared model without moving their data.",
        "It adds small trainable matrices to frozen weights.",
    ],
    "label": ["open_qa", "summarization", "brainstorming", "classification", "general_qa", "open_qa"],
}


@pytest.fixture
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture
def split(tokenizer) -> Dataset:
    return tokenize_dataset(Dataset.from_dict(ROWS), tokenizer, max_length=96)


@pytest.fixture
def model(tokenizer):
    return tiny_llama(len(tokenizer))


def hand_loss(model, split) -> tuple[float, int]:
    """The token-weighted mean cross-entropy over response tokens, by hand: each row alone (no padding, no batch), its
    logits in float64, -log softmax of the next token summed over the positions whose next label is not -100, divided
    by their number over the whole split."""
    total, count = 0.0, 0
    model.eval()
    for input_ids, labels in zip(split["input_ids"], split["labels"], strict=True):
        with torch.no_grad():
            logits = model(torch.tensor([input_ids])).logits[0].double()
        log_probs = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
        for position in range(len(input_ids) - 1):
            if labels[position + 1] != -100:
                total -= log_probs[position, labels[position + 1]].item()
                count += 1
    return total / count, count


def test_rouge_l_scores():
    assert rouge_l(["The cat sat on the mat."], ["the cat sat on the mat"]) == pytest.approx(1.0)
    assert rouge_l(["running dogs"], ["run dog"]) == pytest.approx(1.0)  # stemming
    assert rouge_l(["alpha beta"], ["gamma delta"]) == 0.0
    assert rouge_l(["a b", "x y"], ["a b", "z w"]) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        rouge_l(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="at least one"):
        rouge_l([], [])


def test_evaluate_is_finite_and_restores_train_mode(model, tokenizer, split):
    model.train()
    model.model.layers[0].eval()  # a mixed-mode model must come back mixed
    metrics = evaluate(model, tokenizer, split, batch_size=4, rouge_examples=4, max_new_tokens=8)
    assert set(metrics) == {"loss", "perplexity", "num_tokens", "rougeL"}
    assert all(math.isfinite(v) for v in metrics.values())
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["loss"]))
    # A random model is close to uniform over the vocabulary.
    assert abs(metrics["loss"] - math.log(len(tokenizer))) < 1.0
    assert 0.0 <= metrics["rougeL"] <= 1.0
    assert metrics["num_tokens"] == sum(sum(label != -100 for label in row) for row in split["labels"])
    assert model.training and not model.model.layers[0].training and model.model.layers[1].training
    assert torch.is_grad_enabled()
    assert "rougeL" not in evaluate(model, tokenizer, split)
    # The loss is the hand computation's to float rounding (after the mode checks: hand_loss sets eval mode).
    assert metrics["loss"] == pytest.approx(hand_loss(model, split)[0], rel=1e-5)


def test_loss_matches_the_models_own_loss_and_ignores_padding(model, tokenizer, split):
    batch = CausalLMCollator(tokenizer.pad_token_id)([split[0]])
    with torch.no_grad():
        own = model(**batch).loss.item()
    assert evaluate_loss(model, split.select([0]), tokenizer.pad_token_id)["loss"] == pytest.approx(own, rel=1e-5)
    one_by_one = evaluate_loss(model, split, tokenizer.pad_token_id, batch_size=1)
    batched = evaluate_loss(model, split, tokenizer.pad_token_id, batch_size=6)
    assert batched["loss"] == pytest.approx(one_by_one["loss"], rel=1e-5)


@pytest.mark.parametrize("batch_size", [1, 4, 6])
def test_loss_is_the_token_weighted_mean_cross_entropy_over_response_tokens(model, tokenizer, split, batch_size):
    """Against :func:`hand_loss`, to float32 rounding, on a model whose rows have very different losses (its output
    layer scaled up), so a mean of per-row or per-batch means, a lost or extra token, or padding scored, would show."""
    with torch.no_grad():
        model.lm_head.weight.mul_(30)
    expected, count = hand_loss(model, split)
    lengths = [sum(label != -100 for label in row) for row in split["labels"]]
    assert len(set(lengths)) > 1  # rows of different response lengths: token and row weights differ
    per_row = [hand_loss(model, split.select([i]))[0] for i in range(len(split))]
    assert max(per_row) - min(per_row) > 1.0 and abs(sum(per_row) / len(per_row) - expected) > 1e-2
    metrics = evaluate_loss(model, split, tokenizer.pad_token_id, batch_size=batch_size)
    assert metrics["num_tokens"] == count
    assert metrics["loss"] == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert metrics["perplexity"] == pytest.approx(math.exp(expected), rel=1e-5)


def test_batched_left_padded_generation_matches_unbatched(model, tokenizer):
    kwargs = {"max_new_tokens": 6, "max_prompt_length": 96}
    batched = generate_responses(model, tokenizer, ROWS["instruction"], ROWS["context"], batch_size=6, **kwargs)
    single = generate_responses(model, tokenizer, ROWS["instruction"], ROWS["context"], batch_size=1, **kwargs)
    assert batched == single
    assert len(batched) == len(ROWS["instruction"])


@pytest.mark.parametrize("wrap", ["gpt2", "peft"])
def test_evaluate_other_models(wrap, tokenizer, split):
    if wrap == "gpt2":
        model = tiny_gpt2(len(tokenizer))
    else:
        model = get_peft_model(tiny_llama(len(tokenizer)), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    metrics = evaluate(model, tokenizer, split, rouge_examples=2, max_new_tokens=4)
    assert all(math.isfinite(v) for v in metrics.values())


def test_bad_inputs_raise_clear_errors(model, tokenizer, split):
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['input_ids', 'labels'\].*tokenize_dataset"):
        evaluate(model, tokenizer, Dataset.from_dict(ROWS))
    with pytest.raises(ValueError, match="empty dataset"):
        evaluate(model, tokenizer, split.select([]))
    with pytest.raises(ValueError, match="no response tokens"):
        evaluate_loss(model, split.map(lambda row: {"labels": [-100] * len(row["labels"])}), tokenizer.pad_token_id)
    with pytest.raises(ValueError, match="max_new_tokens must be positive"):
        generate_responses(model, tokenizer, ["q"], [""], max_new_tokens=0)
    with pytest.raises(ValueError, match="no room for a prompt"):
        generate_responses(model, tokenizer, ["q"], [""], max_new_tokens=model.config.max_position_embeddings)
