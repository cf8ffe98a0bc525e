"""Data layer of the federated engine: load instruction data, tokenise it, and split it across clients.

The engine normally needs only :func:`build_federated_data` (with a :class:`DataConfig`) and :class:`CausalLMCollator`;
the loaders, partitioners and tokenisation helpers are public for custom pipelines and tests.
"""

from fedlora.data.federated import ClientData, DataConfig, FederatedData, build_federated_data, split_train_test
from fedlora.data.loaders import (
    COLUMNS,
    DOLLY_HUB_ID,
    NI_HUB_ID,
    load_dolly,
    load_instruction_dataset,
    load_natural_instructions,
    normalise,
)
from fedlora.data.partition import dirichlet_partition, iid_partition, label_partition, sample_indices
from fedlora.data.tokenization import (
    IGNORE_INDEX,
    PROMPT_FORMATS,
    CausalLMCollator,
    ensure_pad_token,
    format_prompt,
    pad_sequences,
    prompt_token_ids,
    resolve_prompt_format,
    stop_token_ids,
    tokenize_dataset,
    truncate_middle,
)

__all__ = [
    "COLUMNS",
    "DOLLY_HUB_ID",
    "IGNORE_INDEX",
    "NI_HUB_ID",
    "PROMPT_FORMATS",
    "CausalLMCollator",
    "ClientData",
    "DataConfig",
    "FederatedData",
    "build_federated_data",
    "dirichlet_partition",
    "ensure_pad_token",
    "format_prompt",
    "iid_partition",
    "label_partition",
    "load_dolly",
    "load_instruction_dataset",
    "load_natural_instructions",
    "normalise",
    "pad_sequences",
    "prompt_token_ids",
    "resolve_prompt_format",
    "sample_indices",
    "split_train_test",
    "stop_token_ids",
    "tokenize_dataset",
    "truncate_middle",
]
