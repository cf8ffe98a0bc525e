"""Evaluate a causal LM (plain or PEFT-wrapped) on tokenised instruction data.

Two measures: the mean cross-entropy per response token (and its perplexity) on a whole split, and ROUGE-L F1
(``rouge-score``, stemmed) of greedy generations against the reference responses on a seeded sample. Both run
under ``torch.no_grad`` in eval mode and restore the model's train/eval mode afterwards.

The split is one produced by :func:`fedlora.data.tokenize_dataset`: ``input_ids``/``labels`` for the loss,
``prompt_ids`` (the prompt in the format the split was tokenised with: chat template, Alpaca or plain) for
generation and ``response`` as its reference, so training, loss and generation all see the same prompt.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from datasets import Dataset
from rouge_score import rouge_scorer
from torch import nn
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from fedlora.data import (
    IGNORE_INDEX,
    CausalLMCollator,
    ensure_pad_token,
    pad_sequences,
    prompt_token_ids,
    sample_indices,
    stop_token_ids,
    truncate_middle,
)


def evaluate(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    dataset: Dataset,
    *,
    batch_size: int = 8,
    rouge_examples: int = 0,
    max_new_tokens: int = 128,
    max_prompt_length: int = 512,
    seed: int = 0,
) -> dict[str, float]:
    """``{"loss", "perplexity", "num_tokens"}`` over ``dataset``, plus ``"rougeL"`` when ``rouge_examples > 0``.

    ROUGE-L is computed on a sample of ``min(rouge_examples, len(dataset))`` rows drawn with ``seed``, generating
    at most ``max_new_tokens`` tokens greedily from their ``prompt_ids`` (cut to ``max_prompt_length`` tokens).
    ``num_tokens`` (the scored response tokens) is the weight for averaging losses across clients.
    """
    ensure_pad_token(tokenizer)
    metrics = evaluate_loss(model, dataset, tokenizer.pad_token_id, batch_size=batch_size)
    if rouge_examples > 0:
        _check_columns(dataset, ("prompt_ids", "response"))
        sample = dataset.select(sample_indices(len(dataset), rouge_examples, seed))
        predictions = generate_from_prompt_ids(
            model,
            tokenizer,
            sample["prompt_ids"],
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            max_prompt_length=max_prompt_length,
        )
        metrics["rougeL"] = rouge_l(predictions, sample["response"])
    return metrics


def evaluate_loss(model: nn.Module, dataset: Dataset, pad_token_id: int, batch_size: int = 8) -> dict[str, float]:
    """Token-weighted mean next-token cross-entropy over the response tokens (labels ≠ -100) and ``exp`` of it."""
    _check_columns(dataset, ("input_ids", "labels"))
    loader = DataLoader(
        dataset.select_columns(["input_ids", "labels"]),
        batch_size=batch_size,
        collate_fn=CausalLMCollator(pad_token_id),
    )
    device = _device(model)
    total, count = 0.0, 0
    with _inference(model):
        for batch in loader:
            batch = {name: tensor.to(device) for name, tensor in batch.items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            targets = batch["labels"][:, 1:]
            scored = targets != IGNORE_INDEX
            nll = nn.functional.cross_entropy(logits[:, :-1][scored].float(), targets[scored], reduction="sum")
            total += nll.item()
            count += int(scored.sum())
    if count == 0:
        raise ValueError("the dataset has no response tokens to score (every label is -100)")
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(loss) if loss < 700 else math.inf, "num_tokens": float(count)}


def generate_responses(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    instructions: Sequence[str],
    contexts: Sequence[str],
    *,
    prompt_format: str = "auto",
    histories: Sequence[Sequence[Mapping[str, str]] | str] | None = None,
    max_new_tokens: int = 128,
    batch_size: int = 8,
    max_prompt_length: int = 512,
) -> list[str]:
    """Greedy completions of the prompts formatted in ``prompt_format`` (``histories``: earlier turns of each
    conversation; see ``prompt_token_ids``); see :func:`generate_from_prompt_ids`."""
    ensure_pad_token(tokenizer)
    limit = _prompt_limit(model, max_new_tokens, max_prompt_length)
    prompts = prompt_token_ids(
        tokenizer, instructions, contexts, limit, prompt_format=prompt_format, histories=histories
    )
    return generate_from_prompt_ids(
        model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, max_prompt_length=limit
    )


def generate_from_prompt_ids(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 128,
    batch_size: int = 8,
    max_prompt_length: int = 512,
) -> list[str]:
    """Greedy completions of tokenised prompts, left-padded in batches; special tokens stripped from the text.

    Generation stops at EOS or the chat template's end-of-turn token (``stop_token_ids``). Prompts keep their head
    and tail (see ``truncate_middle``) within ``max_prompt_length`` tokens, further capped so that prompt plus
    ``max_new_tokens`` fits the model's ``max_position_embeddings`` when it has one.
    """
    ensure_pad_token(tokenizer)
    limit = _prompt_limit(model, max_new_tokens, max_prompt_length)
    prompts = [truncate_middle(list(ids), limit) for ids in prompts]
    stops = stop_token_ids(tokenizer)
    device = _device(model)
    responses: list[str] = []
    with _inference(model):
        for start in range(0, len(prompts), batch_size):
            input_ids, attention_mask = pad_sequences(
                prompts[start : start + batch_size], tokenizer.pad_token_id, "left"
            )
            generated = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=stops if len(stops) > 1 else stops[0],
            )
            new_tokens = generated[:, input_ids.shape[1] :]
            responses.extend(text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    return responses


def _prompt_limit(model: nn.Module, max_new_tokens: int, max_prompt_length: int) -> int:
    """``max_prompt_length``, capped so that prompt plus ``max_new_tokens`` fits the model's positions."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
    max_positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if max_positions is not None:
        max_prompt_length = min(max_prompt_length, max_positions - max_new_tokens)
    if max_prompt_length < 1:
        raise ValueError(f"no room for a prompt: max_new_tokens={max_new_tokens}, model positions={max_positions}")
    return max_prompt_length


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F1 (Porter-stemmed, as in the Dolly/NI literature) of predictions against references."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise ValueError("ROUGE-L needs at least one prediction")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    scores = [scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references, strict=True)]
    return sum(scores) / len(scores)


@contextmanager
def _inference(model: nn.Module) -> Iterator[None]:
    """Eval mode and no autograd for the block; every submodule's previous mode is restored, even on error."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, training in modes:
            module.training = training


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _check_columns(dataset: Dataset, required: Sequence[str]) -> None:
    """A clear error for an empty split or one that did not come from ``tokenize_dataset``."""
    if len(dataset) == 0:
        raise ValueError("cannot evaluate on an empty dataset")
    missing = [name for name in required if name not in dataset.column_names]
    if missing:
        raise ValueError(
            f"dataset lacks column(s) {missing} (has {dataset.column_names}); evaluate a split made by "
            "fedlora.data.tokenize_dataset (or build_federated_data with a tokenizer)"
        )
