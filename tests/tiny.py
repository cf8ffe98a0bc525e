"""Tiny, download-free model and tokenizer builders shared by the tests.

The tokenizer is a byte-level BPE trained on a fixed in-file corpus, so it can encode any text and is identical on
every run; like Llama's it prepends ``<s>`` and has an EOS but no pad token. The models are randomly initialised
(seeded) and small enough for CPU tests.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

BOS, EOS = "<s>", "</s>"
MAX_POSITIONS = 512
DEFAULT_VOCAB = 128  # enough for hand-written token ids below 128; pass len(tiny_tokenizer()) for text

_CORPUS = [
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "### Instruction:\nWhat is the capital of France?\n\n### Response:\nThe capital of France is Paris.",
    "### Instruction:\nSummarize the passage.\n\n### Context:\nVirgin Australia commenced services in 2000.",
    "Federated learning trains a shared model across many clients without moving their data to a server.",
    "Low-rank adaptation adds small trainable matrices to the frozen weights of a large language model.",
    "The quick brown fox jumps over the lazy dog. Numbers like 1, 2, 3 and 2024 appear in text too.",
    "Classify each of the following as a fruit or a vegetable: apple, carrot, banana, broccoli.",
    "Give me a list of ideas for a birthday party, and explain why each one would be fun.",
]


def tiny_tokenizer(vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """A fresh byte-level BPE tokenizer (BOS ``<s>`` prepended, EOS ``</s>``, deliberately no pad token)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[BOS, EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS)


def tiny_llama(vocab_size: int = DEFAULT_VOCAB, seed: int = 0, **overrides: int) -> LlamaForCausalLM:
    """A randomly initialised (seeded) 2-layer Llama: hidden 32, MLP 48, 4 query / 2 key-value heads
    (``overrides``: other LlamaConfig values)."""
    torch.manual_seed(seed)
    shape = {
        "hidden_size": 32,
        "intermediate_size": 48,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    }
    config = LlamaConfig(
        vocab_size=vocab_size,
        **{**shape, **overrides},
        max_position_embeddings=MAX_POSITIONS,
        bos_token_id=0,
        eos_token_id=1,
    )
    return LlamaForCausalLM(config)


def tiny_gpt2(vocab_size: int = DEFAULT_VOCAB, seed: int = 0) -> GPT2LMHeadModel:
    """A randomly initialised (seeded) 2-layer GPT-2: hidden 32, 4 heads."""
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=MAX_POSITIONS, bos_token_id=0, eos_token_id=1
    )
    return GPT2LMHeadModel(config)


def save_tiny_model(path: Path, **overrides: int) -> Path:
    """A tiny random Llama (``overrides``: other LlamaConfig values) and its tokenizer saved as a local model
    directory, as ``--model`` takes it."""
    tokenizer = tiny_tokenizer()
    tiny_llama(len(tokenizer), **overrides).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
"""SmolLM2-135M-Instruct's template (ChatML with a default system turn), as its GGUF tokenizer has it."""
_GGUF_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def save_tiny_gguf(path: Path) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """The tiny Llama and tokenizer written as a float32 GGUF file at ``path`` with a ChatML chat template, the way
    llama.cpp's converter writes a Llama (q/k rows permuted for its rotary layout, GPT-2 style BPE vocabulary and
    merges); returns the model and tokenizer it was written from."""
    tokenizer = tiny_tokenizer()
    model = tiny_llama(len(tokenizer))
    config, spec = model.config, json.loads(tokenizer.backend_tokenizer.to_str())
    tokens = [token for token, _ in sorted(spec["model"]["vocab"].items(), key=lambda item: item[1])]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t in (BOS, EOS) else gguf.TokenType.NORMAL for t in tokens])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_chat_template(CHATML)
    heads = {"self_attn.q_proj": config.num_attention_heads, "self_attn.k_proj": config.num_key_value_heads}
    top = {"model.embed_tokens.weight": "token_embd", "model.norm.weight": "output_norm", "lm_head.weight": "output"}
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().float()
        if name in top:
            writer.add_tensor(f"{top[name]}.weight", tensor.numpy())
            continue
        layer, module = name.split(".")[2], name.split(".", 3)[3].removesuffix(".weight")
        if module in heads:  # llama.cpp's rotary layout: each head's two halves interleaved
            n = heads[module]
            tensor = tensor.reshape(n, 2, tensor.shape[0] // n // 2, -1).swapaxes(1, 2).reshape(tensor.shape)
        writer.add_tensor(f"blk.{layer}.{_GGUF_NAMES[module]}.weight", tensor.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model, tokenizer
