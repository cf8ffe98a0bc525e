"""Prompt template, tokenisation and padding for causal-LM instruction tuning.

An example becomes ``prompt ids + response ids + [eos]`` with ``labels`` equal to the ids on the response (and EOS)
and ``IGNORE_INDEX`` (-100) on the prompt, so the loss is on the response only. Prompt and response are tokenised
separately, so generation from the prompt alone (evaluation) sees exactly the ids training saw.

Padding never relies on the pad id's value: the attention mask comes from the true lengths and padded label
positions are -100. That is why a tokenizer without a pad token can safely use its EOS as pad
(:func:`ensure_pad_token`), which is what Llama-style tokenizers need.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from datasets import Dataset
from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
MIN_RESPONSE_SHARE = 0.25  # a truncated example keeps at least this share of max_length for the response


def format_prompt(instruction: str, context: str = "") -> str:
    """Dolly/Alpaca-style prompt that ends where the response starts; the context section is left out when empty."""
    sections = [f"### Instruction:\n{instruction}"]
    if context:
        sections.append(f"### Context:\n{context}")
    sections.append("### Response:\n")
    return "\n\n".join(sections)


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> None:
    """Give a tokenizer without a pad token ``pad = eos`` (in place, logged), as is usual for Llama-style
    tokenizers; a tokenizer without EOS is an error, with or without a pad token.

    Safe because padding here is identified by lengths, never by comparing ids with the pad id.
    """
    name = tokenizer.name_or_path or type(tokenizer).__name__
    if tokenizer.eos_token_id is None:
        raise ValueError(
            f"tokenizer {name!r} has no EOS token; one is needed to end every response (and as the pad token "
            "when there is none): use a tokenizer with an eos_token"
        )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
        logger.info("tokenizer %r has no pad token; using its EOS token %r as pad", name, tokenizer.eos_token)


def prompt_token_ids(
    tokenizer: PreTrainedTokenizerBase, instructions: Sequence[str], contexts: Sequence[str], max_length: int
) -> list[list[int]]:
    """Token ids of the formatted prompts (with the tokenizer's special prefix such as BOS), at most ``max_length``."""
    prompts = [format_prompt(i, c) for i, c in zip(instructions, contexts, strict=True)]
    return [_truncate_middle(ids, max_length) for ids in tokenizer(prompts, add_special_tokens=True)["input_ids"]]


def tokenize_dataset(dataset: Dataset, tokenizer: PreTrainedTokenizerBase, max_length: int) -> Dataset:
    """Add ``input_ids`` and ``labels`` columns to a normalised dataset, keeping its text columns (used by ROUGE).

    Sequences longer than ``max_length`` are cut so that at least ``MIN_RESPONSE_SHARE * max_length`` response
    tokens survive (or the whole response, if shorter): the response is cut at its end (dropping EOS) and the
    prompt in its middle (keeping the instruction header and the ``### Response:`` marker).
    """
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2 (one prompt and one response token), got {max_length}")
    ensure_pad_token(tokenizer)
    eos = tokenizer.eos_token_id

    def encode(batch: dict[str, list[str]]) -> dict[str, list[list[int]]]:
        prompts = prompt_token_ids(tokenizer, batch["instruction"], batch["context"], max_length)
        responses = tokenizer(batch["response"], add_special_tokens=False)["input_ids"]
        input_ids, labels = [], []
        for prompt, response in zip(prompts, responses, strict=True):
            prompt, response = _fit(prompt, [*response, eos], max_length)
            input_ids.append(prompt + response)
            labels.append([IGNORE_INDEX] * len(prompt) + response)
        return {"input_ids": input_ids, "labels": labels}

    return dataset.map(encode, batched=True, desc="Tokenising")


def _fit(prompt: list[int], response: list[int], max_length: int) -> tuple[list[int], list[int]]:
    """Shorten ``prompt`` (middle) and ``response`` (end) so their total is at most ``max_length``."""
    if len(prompt) + len(response) <= max_length:
        return prompt, response
    reserved = max(1, int(max_length * MIN_RESPONSE_SHARE))
    response_length = min(len(response), max(max_length - len(prompt), reserved))
    return _truncate_middle(prompt, max_length - response_length), response[:response_length]


def _truncate_middle(ids: list[int], length: int) -> list[int]:
    """Keep the first and last ``length / 2`` ids: a prompt's header and its ``### Response:`` marker."""
    if len(ids) <= length:
        return ids
    tail = length // 2
    return ids[: length - tail] + ids[len(ids) - tail :]


def pad_sequences(
    sequences: Sequence[Sequence[int]], value: int, side: Literal["left", "right"] = "right"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad to the longest sequence on ``side``; returns ``(padded, attention_mask)`` as int64 tensors."""
    if not sequences:
        raise ValueError("cannot pad an empty batch")
    width = max(len(s) for s in sequences)
    padded = torch.full((len(sequences), width), value, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        span = slice(width - len(seq), width) if side == "left" else slice(0, len(seq))
        padded[row, span] = torch.as_tensor(seq, dtype=torch.long)
        mask[row, span] = 1
    return padded, mask


@dataclass(frozen=True)
class CausalLMCollator:
    """Batch tokenised examples: right-pad ``input_ids`` with ``pad_token_id`` and ``labels`` with -100.

    Other columns (the text kept for ROUGE) are ignored, so a tokenised split can go straight into a DataLoader.
    """

    pad_token_id: int

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        input_ids, attention_mask = pad_sequences([f["input_ids"] for f in features], self.pad_token_id)
        labels, _ = pad_sequences([f["labels"] for f in features], IGNORE_INDEX)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
