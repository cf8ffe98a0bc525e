"""The run settings (``--set`` keys) as the command line shows them: one line of help for each, the ``train`` flags
that set some of them, and the table of ``fedlora config keys``.

Free of heavy imports (``fedlora train --help`` answers at once); only :func:`describe_keys` imports the
configuration's dataclasses, from which every key's type and default come. :data:`KEY_HELP` must name exactly the
configuration's keys (``tests/test_cli.py`` checks it, so a new setting cannot go undocumented).
"""

from __future__ import annotations

import types
from collections.abc import Iterator
from dataclasses import MISSING, Field, fields, is_dataclass
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

KEY_HELP = {
    "strategy": "the federated strategy (fedlora config keys lists them)",
    "rounds": "number of federated rounds",
    "seed": "seed of data split, initialisation, sampling and data order",
    "device": "cpu, cuda or cuda:N",
    "output_dir": "run directory (none: runs/<strategy>-<timestamp>)",
    "model.name": "base model: local dir, hub id, .gguf file, or smollm2-135m-instruct",
    "model.dtype": "torch dtype of the base model, e.g. float32, bfloat16 (none: float32)",
    "model.quantization": "load the base model's linears with bitsandbytes (4bit: NF4, QLoRA's base)",
    "adapter.r": "adapter rank",
    "adapter.alpha": "scaling numerator: s = alpha / r",
    "adapter.dropout": "dropout on the adapter branch's input",
    "adapter.target_modules": "module names to adapt (suffix match), or all-linear",
    "adapter.tensor_roles": 'tensor kind -> shared|personal|frozen, a JSON object, e.g. {"B.direction": "personal"}',
    "data.source": "dolly (hub id or Dolly file), natural_instructions (task files) or file (any .json/.jsonl/.csv)",
    "data.path": "a .json/.jsonl/.csv file, a directory of task files, a hub dataset id, or dolly-sample",
    "data.columns": 'source=file: normalised name -> column name, a JSON object, e.g. {"label": "category"}',
    "data.partition": "dirichlet (label skew by data.alpha), label (one label per client), iid, files (one per file)",
    "data.num_clients": "number of clients the data is split across (dirichlet, iid)",
    "data.alpha": "Dirichlet concentration; small = heterogeneous clients",
    "data.min_examples": "each client gets at least this many examples",
    "data.test_fraction": "share of each client's examples held out as its test split",
    "data.global_test_size": "cap on the pooled global test set (none: all client test rows)",
    "data.max_examples": "seeded sample of at most this many examples (none: all)",
    "data.max_length": "token budget per example",
    "data.prompt_format": "chat, alpaca, plain, or auto (chat when the tokenizer has a chat template)",
    "data.seed": "seed of the data split (none: the run's seed)",
    "client.batch_size": "local batch size",
    "client.optimizer": "local optimizer",
    "client.weight_decay": "local optimizer's weight decay",
    "client.max_grad_norm": "clip local gradients to this norm (none: no clipping)",
    "client.steps": "local steps per round (strategies other than fedlora-opt)",
    "client.lr": "local learning rate (strategies other than fedlora-opt)",
    "client.order": "fedlora-opt: local-first, global-first (two stages) or joint (one stage, both optimizers)",
    "client.local_steps": "fedlora-opt: steps on the personal tensors per round",
    "client.local_lr": "fedlora-opt: learning rate of the personal tensors",
    "client.global_steps": "fedlora-opt: steps on the shared tensors per round",
    "client.global_lr": "fedlora-opt: learning rate of the shared tensors",
    "server.optimizer": "server optimizer applied to the aggregated update",
    "server.lr": "server learning rate",
    "server.fraction": "fraction of clients sampled each round (at least server.min_clients)",
    "server.momentum": "fedavgm: momentum",
    "server.beta1": "fedadam, fedyogi: first-moment decay",
    "server.beta2": "fedadam, fedyogi: second-moment decay",
    "server.tau": "fedadam, fedyogi: adaptivity (epsilon)",
    "server.min_clients": "a round samples at least this many clients and needs as many valid results",
    "server.max_update_norm": "reject a client update whose norm exceeds this (none: no limit)",
    "server.clip_norm": "clip each client update to this norm (none: no clipping)",
    "server.aggregator": "how the client updates are combined (mean: example-weighted; the others coordinate-wise)",
    "server.trim_fraction": "trimmed-mean: fraction of clients dropped at each end",
    "privacy.noise_multiplier": "noise multiplier z (dp-fedavg: 0 turns privacy off)",
    "privacy.clip_norm": "clipping norm C of each client's update (required when privacy is on)",
    "privacy.delta": "delta of the guarantee (dp-fedavg: at which the run reports the epsilon spent)",
    "privacy.mechanism": "who adds the noise: dp-fedavg (fedlora's server), or Flower's (--engine flower only)",
    "privacy.sensitivity": "local: the sensitivity of Flower's LocalDpMod",
    "privacy.epsilon": "local: the epsilon of Flower's LocalDpMod, per update",
    "eval.every": "evaluate every this many rounds (and after the last)",
    "eval.batch_size": "evaluation batch size",
    "eval.rouge_examples": "rows per split scored by ROUGE-L of greedy generations (0: none)",
    "eval.max_new_tokens": "tokens generated per row for ROUGE-L",
    "eval.fraction": "share of the clients scored on their own test splits (seeded, the same every round)",
    "eval.clients": "number of clients scored on their own test splits (instead of eval.fraction; none: all)",
}

TRAIN_FLAGS = {
    "model": "model.name",
    "data": "data.path",
    "strategy": "strategy",
    "num-clients": "data.num_clients",
    "rounds": "rounds",
    "seed": "seed",
    "device": "device",
    "output-dir": "output_dir",
}
"""``fedlora train`` flag (without ``--``) -> the key it sets; each flag's help is its key's."""


def flag_help(flag: str) -> str:
    """The help of ``train``'s ``--flag``: its key's, naming the key."""
    key = TRAIN_FLAGS[flag]
    return f"{KEY_HELP[key]} (--set {key}=...)"


def describe_keys() -> list[tuple[str, str, str, str]]:
    """Every setting as (dotted key, type, default, help), in the configuration's order; type and default come
    from the configuration's dataclasses (a registry's names from the field's rule)."""
    from fedlora.federated.config import RunConfig

    return [(key, _type_name(hint), _show(default), KEY_HELP[key]) for key, hint, default in _walk(RunConfig)]


def _walk(cls: type, prefix: str = "", section: Any = None) -> Iterator[tuple[str, Any, Any]]:
    """(dotted key, type, default) of every field of dataclass ``cls`` (nested dataclasses flattened); the type of a
    name checked against a registry is the ``Literal`` of its names; the defaults are ``section``'s values, or the
    fields' own defaults."""
    hints = get_type_hints(cls)
    for f in fields(cls):
        default = getattr(section, f.name) if section is not None else _default(f)
        if is_dataclass(hints[f.name]):
            yield from _walk(hints[f.name], f"{prefix}{f.name}.", default)
        else:
            rule = getattr(cls, "rules", {}).get(f.name)
            choices = Literal[rule.choices] if rule is not None and rule.choices else None  # a registry's names
            yield prefix + f.name, choices or hints[f.name], default


def _default(f: Field) -> Any:
    return f.default if f.default is not MISSING else f.default_factory()


def _type_name(hint: Any) -> str:
    """``int``, ``float|none``, ``adamw|sgd``, ``list[str]``, ``dict[str, shared|personal|frozen]|none``."""
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        return "|".join(_type_name(arg) for arg in args)
    if origin is Literal:
        return "|".join(str(arg) for arg in args)
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(_type_name(arg) for arg in args)}]"
    return "none" if hint is type(None) else hint.__name__


def _show(value: Any) -> str:
    """A default as ``--set`` would take it."""
    if value is None:
        return "none"
    if isinstance(value, list):
        return ",".join(map(str, value))
    return str(value)
