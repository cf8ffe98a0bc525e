"""Prompt formats, tokenisation and padding for causal-LM instruction tuning.

An example becomes ``prompt ids + response ids`` with ``labels`` equal to the ids on the response and
``IGNORE_INDEX`` (-100) on the prompt, so the loss is on the response only. The prompt comes from one of three
formats (``prompt_format``):

* ``chat``: the tokenizer's chat template (``apply_chat_template``), the prompt ending with the template's
  generation prefix (``<|im_start|>assistant\\n`` for ChatML models such as SmolLM2); the response is what the template
  adds after that prefix for the assistant turn, so it ends with the template's end-of-turn token
  (``<|im_end|>``), and EOS is appended only when the template ends the turn with no special token;
* ``alpaca``: the Dolly/Alpaca ``### Instruction / ### Context / ### Response`` prompt, response + EOS;
* ``plain``: the texts joined by blank lines, response + EOS;

and ``auto`` resolves to ``chat`` when the tokenizer has a chat template, else ``alpaca``
(:func:`resolve_prompt_format`). Earlier turns of a conversation (the ``history`` column, see
:mod:`fedlora.data.loaders`) are part of the prompt in every format, so only the last assistant turn is trained on.

Prompt and response are tokenised separately, and the (possibly truncated) prompt ids are kept as ``prompt_ids``,
so generation for evaluation starts from exactly the ids training saw before the response.

Padding never relies on the pad id's value: the attention mask comes from the true lengths and padded label
positions are -100. That is why a tokenizer without a pad token can safely use its EOS as pad
(:func:`ensure_pad_token`), which is what Llama-style tokenizers need.
"""

from __future__ import annotations

import json
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
PromptFormat = Literal["auto", "chat", "alpaca", "plain"]
PROMPT_FORMATS = ("auto", "chat", "alpaca", "plain")
Turn = Mapping[str, str]  # {"role": "system" | "user" | "assistant", "content": text}
_ALPACA_HEADERS = {"user": "### Instruction:", "assistant": "### Response:"}


def resolve_prompt_format(prompt_format: str, tokenizer: PreTrainedTokenizerBase | None) -> str:
    """``auto`` → ``chat`` when ``tokenizer`` has a chat template, else ``alpaca``; a concrete format is checked
    (``chat`` needs a template) and returned."""
    if prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"unknown prompt_format {prompt_format!r}; use one of {list(PROMPT_FORMATS)}")
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if prompt_format == "auto":
        return "chat" if has_template else "alpaca"
    if prompt_format == "chat" and not has_template:
        name = getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__
        raise ValueError(
            f"prompt_format='chat' but tokenizer {name!r} has no chat template; use prompt_format 'alpaca' or 'plain'"
        )
    return prompt_format


def format_prompt(
    instruction: str,
    context: str = "",
    *,
    history: Sequence[Turn] = (),
    prompt_format: str = "alpaca",
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> str:
    """The prompt text of one example in ``prompt_format``, ending where the response starts.

    ``alpaca``: the Dolly/Alpaca prompt (the context section left out when empty); earlier turns come first, a
    system turn as a plain paragraph, user turns under ``### Instruction:``, assistant turns under ``### Response:``.
    ``plain``: the turns' contents, instruction and context joined by blank lines, then a blank line. ``chat``
    (needs ``tokenizer``): the chat template applied to the earlier turns plus a user turn (instruction, a blank
    line, context), with the generation prefix.
    """
    prompt_format = resolve_prompt_format(prompt_format, tokenizer)
    if prompt_format == "chat":
        return _chat_prompt(tokenizer, [_messages(history, instruction, context)])[0]
    if prompt_format == "plain":
        texts = [*(turn["content"] for turn in history), instruction, *([context] if context else [])]
        return "\n\n".join(texts) + "\n\n"
    sections = [turn["content"] if turn["role"] == "system" else _alpaca(turn) for turn in history]
    sections.append(f"### Instruction:\n{instruction}")
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


def stop_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The ids that end a generated response: EOS, and the chat template's end-of-turn token when it has another one
    (such as ``<|im_end|>`` of a ChatML template whose tokenizer's EOS is ``<|endoftext|>``)."""
    ids = [tokenizer.eos_token_id]
    if getattr(tokenizer, "chat_template", None):
        try:
            prompt = _chat_prompt(tokenizer, [[{"role": "user", "content": "1"}]])[0]
            suffix = _chat_full(tokenizer, [[{"role": "user", "content": "1"}]], ["2"])[0]
        except Exception:  # a template that cannot render this probe has no end-of-turn token we can find
            return ids
        if suffix.startswith(prompt):
            special = _special_ids(tokenizer)
            ending = [i for i in _encode(tokenizer, [suffix[len(prompt) :].rstrip()], False)[0] if i in special]
            if ending and ending[-1] not in ids:
                ids.append(ending[-1])
    return ids


def prompt_token_ids(
    tokenizer: PreTrainedTokenizerBase,
    instructions: Sequence[str],
    contexts: Sequence[str],
    max_length: int,
    *,
    prompt_format: str = "auto",
    histories: Sequence[Sequence[Turn] | str] | None = None,
) -> list[list[int]]:
    """Token ids of the formatted prompts, at most ``max_length`` (the middle is cut).

    ``alpaca``/``plain`` prompts get the tokenizer's special prefix such as BOS; ``chat`` prompts get only what the
    template writes (a template adds BOS itself when the model wants one). ``histories``: each example's earlier
    turns (a list, or the JSON of the ``history`` column); none by default.
    """
    prompt_format = resolve_prompt_format(prompt_format, tokenizer)
    histories = [_history(h) for h in histories] if histories is not None else [[] for _ in instructions]
    if prompt_format == "chat":
        conversations = [_messages(h, i, c) for h, i, c in zip(histories, instructions, contexts, strict=True)]
        ids = _encode(tokenizer, _chat_prompt(tokenizer, conversations), False)
    else:
        texts = [
            format_prompt(i, c, history=h, prompt_format=prompt_format)
            for h, i, c in zip(histories, instructions, contexts, strict=True)
        ]
        ids = _encode(tokenizer, texts, True)
    return [truncate_middle(row, max_length) for row in ids]


def tokenize_dataset(
    dataset: Dataset, tokenizer: PreTrainedTokenizerBase, max_length: int, prompt_format: str = "auto"
) -> Dataset:
    """Add ``input_ids``, ``labels`` and ``prompt_ids`` columns to a normalised dataset, keeping its text columns
    (used by ROUGE); ``prompt_format`` is ``chat``, ``alpaca``, ``plain`` or ``auto`` (see the module docstring).

    Sequences longer than ``max_length`` are cut so that at least ``MIN_RESPONSE_SHARE * max_length`` response
    tokens survive (or the whole response, if shorter): the response is cut at its end (dropping EOS or the
    end-of-turn token) and the prompt in its middle (keeping its head and the generation prefix or the
    ``### Response:`` marker). ``prompt_ids`` are the prompt as it ends up in ``input_ids``.
    """
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2 (one prompt and one response token), got {max_length}")
    ensure_pad_token(tokenizer)
    prompt_format = resolve_prompt_format(prompt_format, tokenizer)
    eos = tokenizer.eos_token_id
    stops = set(stop_token_ids(tokenizer)) | _special_ids(tokenizer)

    def encode(batch: dict[str, list[Any]]) -> dict[str, list[list[int]]]:
        n = len(batch["instruction"])
        histories = batch["history"] if "history" in batch else [None] * n
        prompts = prompt_token_ids(
            tokenizer,
            batch["instruction"],
            batch["context"],
            max_length,
            prompt_format=prompt_format,
            histories=histories,
        )
        if prompt_format == "chat":
            responses = _chat_responses(tokenizer, batch, histories)
            responses = [ids if ids and ids[-1] in stops else [*ids, eos] for ids in responses]
        else:
            responses = [[*ids, eos] for ids in _encode(tokenizer, batch["response"], False)]
        input_ids, labels, prompt_ids = [], [], []
        for prompt, response in zip(prompts, responses, strict=True):
            prompt, response = _fit(prompt, response, max_length)
            input_ids.append(prompt + response)
            labels.append([IGNORE_INDEX] * len(prompt) + response)
            prompt_ids.append(prompt)
        return {"input_ids": input_ids, "labels": labels, "prompt_ids": prompt_ids}

    return dataset.map(encode, batched=True, desc="Tokenising")


def truncate_middle(ids: list[int], length: int) -> list[int]:
    """Keep the first and last ``length / 2`` ids: a prompt's header and its end (the response marker)."""
    if len(ids) <= length:
        return ids
    tail = length // 2
    return ids[: length - tail] + ids[len(ids) - tail :]


def _fit(prompt: list[int], response: list[int], max_length: int) -> tuple[list[int], list[int]]:
    """Shorten ``prompt`` (middle) and ``response`` (end) so their total is at most ``max_length``."""
    if len(prompt) + len(response) <= max_length:
        return prompt, response
    reserved = max(1, int(max_length * MIN_RESPONSE_SHARE))
    response_length = min(len(response), max(max_length - len(prompt), reserved))
    return truncate_middle(prompt, max_length - response_length), response[:response_length]


def _alpaca(turn: Turn) -> str:
    return f"{_ALPACA_HEADERS[turn['role']]}\n{turn['content']}"


def _history(value: Sequence[Turn] | str | None) -> list[Turn]:
    """Earlier turns from the ``history`` column (JSON text; "" or None: none) or as a list already."""
    if value is None or value == "":
        return []
    return json.loads(value) if isinstance(value, str) else list(value)


def _messages(history: Sequence[Turn], instruction: str, context: str) -> list[dict[str, str]]:
    """The conversation up to the final user turn (instruction, then the context after a blank line)."""
    user = f"{instruction}\n\n{context}" if context else instruction
    return [{"role": t["role"], "content": t["content"]} for t in history] + [{"role": "user", "content": user}]


def _chat_prompt(tokenizer: PreTrainedTokenizerBase, conversations: list[list[dict[str, str]]]) -> list[str]:
    return tokenizer.apply_chat_template(conversations, add_generation_prompt=True, tokenize=False)


def _chat_full(
    tokenizer: PreTrainedTokenizerBase, conversations: list[list[dict[str, str]]], responses: Sequence[str]
) -> list[str]:
    full = [[*c, {"role": "assistant", "content": r}] for c, r in zip(conversations, responses, strict=True)]
    return tokenizer.apply_chat_template(full, tokenize=False)


def _chat_responses(
    tokenizer: PreTrainedTokenizerBase, batch: Mapping[str, list[Any]], histories: Sequence[Any]
) -> list[list[int]]:
    """The ids the chat template writes after the generation prefix for each example's final assistant turn
    (the response and the template's end of turn; trailing whitespace after it is left out)."""
    conversations = [
        _messages(_history(h), i, c) for h, i, c in zip(histories, batch["instruction"], batch["context"], strict=True)
    ]
    prompts = _chat_prompt(tokenizer, conversations)
    fulls = _chat_full(tokenizer, conversations, batch["response"])
    suffixes = []
    for prompt, full in zip(prompts, fulls, strict=True):
        if not full.startswith(prompt):
            raise ValueError(
                "the tokenizer's chat template renders a conversation with its answer differently from the prompt "
                f"it renders for generation (prompt {prompt[-80:]!r}, with the answer {full[: len(prompt)][-80:]!r}); "
                "the response-only loss needs the prompt to be a prefix: use prompt_format 'alpaca' or 'plain'"
            )
        suffixes.append(full[len(prompt) :].rstrip())
    return _encode(tokenizer, suffixes, False)


def _encode(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], special: bool) -> list[list[int]]:
    if not texts:
        return []
    return tokenizer(list(texts), add_special_tokens=special)["input_ids"]


def _special_ids(tokenizer: PreTrainedTokenizerBase) -> set[int]:
    ids = set(tokenizer.all_special_ids)
    ids.update(i for i, token in getattr(tokenizer, "added_tokens_decoder", {}).items() if token.special)
    return ids


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

    Other columns (the text kept for ROUGE, ``prompt_ids``) are ignored, so a tokenised split can go straight into
    a DataLoader.
    """

    pad_token_id: int

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        input_ids, attention_mask = pad_sequences([f["input_ids"] for f in features], self.pad_token_id)
        labels, _ = pad_sequences([f["labels"] for f in features], IGNORE_INDEX)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
