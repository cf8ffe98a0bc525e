"""The run configuration's schema: a dataclass tree whose defaults are the quickstart, with each value's rules.

Values are layered: the defaults, then a config file (``.toml``, ``.yaml``/``.yml`` or ``.json``), then
``key.sub=value`` overrides (strings, coerced to each field's type; the generic reading and coercion is
:mod:`fedlora.federated.loader`). Every section follows :mod:`fedlora.rules`; unknown keys, values of the wrong
type or out of range, and names missing from their registry raise a ``ValueError`` that names the dotted key.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
import yaml

from fedlora.data.federated import DOLLY_SAMPLE_ALIAS, DataConfig
from fedlora.federated.aggregation import AGGREGATORS, SERVER_OPTIMIZERS
from fedlora.federated.loader import build_dataclass, leaves, read_config_file
from fedlora.federated.strategy import STRATEGIES
from fedlora.rules import AT_LEAST_ONE, NON_NEGATIVE, POSITIVE, UNIT, Rule, Section, one_of

FLOWER_MECHANISMS = ("server-fixed", "client-fixed", "local")  # privacy.mechanism values only Flower implements


@dataclass
class ModelSettings(Section):
    """The base model: a local dir, a hub id, a ``.gguf`` file or the alias ``smollm2-135m-instruct``."""

    name: str = "smollm2-135m-instruct"
    dtype: str | None = None  # a torch dtype name such as "float32" or "bfloat16"; None lets the loader choose
    quantization: Literal["4bit", "8bit"] | None = None  # bitsandbytes base weights (4bit: NF4, QLoRA's); None: dense

    rules = {"dtype": Rule(lambda v: isinstance(getattr(torch, v, None), torch.dtype), "a torch dtype name")}


@dataclass
class AdapterSettings(Section):
    """Adapter shape shared by all strategies (FedDoRA or LoRA, as the strategy requires).

    ``target_modules`` lists module names (suffix match); ``["all-linear"]`` (or the string ``all-linear``)
    selects every linear layer except the output head. ``tensor_roles`` maps tensor kinds (FedDoRA:
    ``A.direction``, ``A.magnitude``, ``B.direction``, ``B.magnitude``; LoRA: ``A``, ``B``) to ``shared``,
    ``personal`` or ``frozen``, replacing the strategy's roles for the kinds it names (None: the strategy's own);
    as an override, a JSON object: ``adapter.tensor_roles={"B.direction": "personal"}``.
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    tensor_roles: dict[str, Literal["shared", "personal", "frozen"]] | None = None

    rules = {"r": AT_LEAST_ONE, "alpha": POSITIVE, "dropout": UNIT}


@dataclass
class ClientSettings(Section):
    """Local training on each client; the strategy decides which of these it uses (see
    :mod:`fedlora.federated.strategy`).

    Single-stage strategies train their shared and personal tensors jointly for ``steps`` steps at ``lr``.
    ``fedlora-opt`` trains the shared tensors with the global optimizer (``global_steps`` at ``global_lr``, fresh
    every round) and the personal ones with the local optimizer (``local_steps`` at ``local_lr``, its state kept
    per client), in ``order``: ``global-then-local`` (the global model first, then the client's own magnitudes),
    ``local-first``, ``global-first`` or ``joint`` (see :class:`~fedlora.federated.strategy.FedLoRAOpt`).
    Gradients are clipped to ``max_grad_norm`` (None: no clipping).
    """

    batch_size: int = 2
    optimizer: Literal["adamw", "sgd"] = "adamw"
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    steps: int = 4
    lr: float = 5e-3
    order: Literal["global-then-local", "local-first", "global-first", "joint"] = "global-then-local"
    local_steps: int = 1  # most steps on the global model: 5 global + 1 local beat 3 + 3 on Dolly and NI (README)
    local_lr: float = 5e-3  # = lr; at 3× (1.5e-2) NI global loss was 3.608 against 2.990 (seed 0; README)
    global_steps: int = 3
    global_lr: float = 5e-3

    rules = {
        "batch_size": AT_LEAST_ONE,
        "weight_decay": NON_NEGATIVE,
        "max_grad_norm": POSITIVE,
        "steps": AT_LEAST_ONE,
        "lr": POSITIVE,
        "local_steps": NON_NEGATIVE,
        "local_lr": POSITIVE,
        "global_steps": NON_NEGATIVE,
        "global_lr": POSITIVE,
    }


@dataclass
class ServerSettings(Section):
    """Client sampling, the checks on every client's result, how the updates are combined, and the server optimizer
    (the math is in ``aggregation``).

    Each round samples ``fraction`` of the clients and at least ``min_clients`` (all when the federation has fewer;
    see :mod:`fedlora.federated.sampling`), as Flower's ``fraction_fit`` and ``min_fit_clients`` do. The server
    rejects a client's result (logs why and leaves it out of the round; the run writes a ``"status": "rejected"``
    train row) when its tensors are not exactly the shared set, differ in shape or dtype, hold NaN or Inf, or its
    update norm ‖yᵢ − x_t‖₂ (over all shared tensors) exceeds ``max_update_norm`` (None: no limit). The default is
    far above what local training produces (Adam moves each element by about lr per step: roughly
    lr · steps · √(shared elements) in all), so it only stops diverged or garbage updates. A round with
    fewer than ``min_clients`` valid results (failed and rejected clients alike count against it) raises and commits
    nothing, so ``--resume`` retries it. Each update may be clipped to norm ``clip_norm`` (None: no clipping), then
    ``aggregator`` (a name in :data:`~fedlora.federated.aggregation.AGGREGATORS`) combines them; ``trimmed-mean``
    drops ``trim_fraction`` of the clients at each end. ``optimizer`` (a name in
    :data:`~fedlora.federated.aggregation.SERVER_OPTIMIZERS`) with ``lr`` (and ``momentum``, or ``beta1``,
    ``beta2``, ``tau``) turns the aggregated update into the new global tensors.
    """

    optimizer: str = "fedavg"
    lr: float = 1.0
    fraction: float = 1.0
    momentum: float = 0.9
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3
    min_clients: int = 1
    max_update_norm: float | None = 1e5
    clip_norm: float | None = None
    aggregator: str = "mean"
    trim_fraction: float = 0.1

    rules = {
        "optimizer": one_of(SERVER_OPTIMIZERS),
        "aggregator": one_of(AGGREGATORS),
        "lr": POSITIVE,
        "fraction": Rule(lambda v: 0 < v <= 1, "in (0, 1]"),
        "momentum": UNIT,
        "beta1": UNIT,
        "beta2": UNIT,
        "tau": POSITIVE,
        "min_clients": AT_LEAST_ONE,
        "max_update_norm": POSITIVE,
        "clip_norm": POSITIVE,
        "trim_fraction": Rule(lambda v: 0 <= v < 0.5, "in [0, 0.5)"),
    }


@dataclass
class PrivacySettings(Section):
    """Client-level differential privacy on the shared tensors: one section for both engines.

    ``mechanism`` says who clips the updates and adds the noise:

    * ``dp-fedavg`` (either engine; off while ``noise_multiplier`` is 0): fedlora's server, DP-FedAvg (see
      ``privacy``). With ``noise_multiplier`` z > 0 it clips every client's update to L2 norm ``clip_norm`` C, sums
      the clipped updates, adds Gaussian noise of standard deviation z·C per coordinate and divides by the number of
      sampled clients m; the aggregate is thus an unweighted mean, and ``server.aggregator`` must be ``mean``. After
      every round the run reports the ε spent so far at ``delta`` (δ, best below 1 / the number of clients).
    * :data:`FLOWER_MECHANISMS` (the Flower engine only, on whenever chosen; Flower's own implementations, see
      ``docs/flower.md``): ``server-fixed`` / ``client-fixed``, central DP (updates clipped to C on the server / on
      the nodes, Gaussian noise of std z·C / m added to the average; they need ``server.optimizer=fedavg``), or
      ``local`` (every node clips its update to C and adds noise of std ``sensitivity`` · √(2 ln(1.25/δ)) /
      ``epsilon``).

    Whenever privacy is on, ``clip_norm`` is required.
    """

    noise_multiplier: float = 0.0
    clip_norm: float | None = None
    delta: float = 1e-5
    mechanism: Literal["dp-fedavg", "server-fixed", "client-fixed", "local"] = "dp-fedavg"
    sensitivity: float = 1.0
    epsilon: float = 1.0

    rules = {
        "noise_multiplier": NON_NEGATIVE,
        "clip_norm": POSITIVE,
        "delta": Rule(lambda v: 0 < v < 1, "in (0, 1)"),
        "sensitivity": NON_NEGATIVE,
        "epsilon": POSITIVE,
    }

    @property
    def enabled(self) -> bool:
        """Whether any mechanism is on."""
        return self.mechanism in FLOWER_MECHANISMS or self.noise_multiplier > 0

    @property
    def dp_fedavg(self) -> bool:
        """Whether fedlora's server applies DP-FedAvg."""
        return self.mechanism == "dp-fedavg" and self.noise_multiplier > 0

    def check(self, server: ServerSettings) -> None:
        """Raise a ValueError naming the keys when these settings do not fit together or with ``server``."""
        if self.enabled and self.clip_norm is None:
            on = "privacy.noise_multiplier > 0" if self.dp_fedavg else f"privacy.mechanism={self.mechanism}"
            raise ValueError(f"privacy.clip_norm is required when {on} (the clipping and noise scale to it)")
        if not self.enabled and self.clip_norm is not None:
            raise ValueError(
                "privacy.clip_norm is set but privacy.noise_multiplier is 0 (privacy off); to clip without noise, "
                "set server.clip_norm"
            )
        if self.dp_fedavg and server.aggregator != "mean":
            raise ValueError(f"privacy.noise_multiplier > 0 needs server.aggregator=mean, not {server.aggregator!r}")
        if self.mechanism in ("server-fixed", "client-fixed") and server.optimizer != "fedavg":
            raise ValueError(
                f"privacy.mechanism={self.mechanism} calibrates its noise for an average of the clients' tensors; it "
                f"needs server.optimizer=fedavg, not {server.optimizer!r}"
            )


@dataclass
class EvalSettings(Section):
    """Evaluation after every ``every`` rounds (and after the last): loss, perplexity, and ROUGE-L of greedy
    generations on a seeded sample of ``rouge_examples`` rows per split (0 disables ROUGE).

    The global model is scored once on the global test set; of the clients, a seeded sample is scored on their own
    test splits, drawn once per run so every round scores the same ones (comparable curves): ``clients`` of them
    (all when the federation has fewer), or else ``fraction`` of them, ``max(1, round(fraction · N))`` (so at least
    one); the default scores every client. Set one of the two (see :mod:`fedlora.federated.sampling`).
    """

    every: int = 1
    batch_size: int = 8
    rouge_examples: int = 2
    max_new_tokens: int = 16
    fraction: float = 1.0
    clients: int | None = None

    rules = {
        "every": AT_LEAST_ONE,
        "batch_size": AT_LEAST_ONE,
        "rouge_examples": NON_NEGATIVE,
        "max_new_tokens": AT_LEAST_ONE,
        "fraction": Rule(lambda v: 0 < v <= 1, "in (0, 1]"),
        "clients": AT_LEAST_ONE,
    }

    def check(self) -> None:
        """Raise a ValueError naming the keys when both ``clients`` and ``fraction`` are set."""
        if self.clients is not None and self.fraction != 1.0:
            raise ValueError(
                f"eval.clients={self.clients} and eval.fraction={self.fraction} are alternatives; set one of them"
            )


RUN_DATA = DataConfig(path=DOLLY_SAMPLE_ALIAS, num_clients=4, global_test_size=8, max_length=128, seed=None)
"""A run's data settings unless set: the packaged Dolly sample over 4 clients, split by the run's seed."""


@dataclass
class RunConfig(Section):
    """A whole run. ``seed`` seeds the data split, adapter initialisation, client sampling and data order."""

    strategy: str = "fedlora-opt"
    rounds: int = 2
    seed: int = 0
    device: str = "cpu"
    output_dir: str | None = None
    model: ModelSettings = field(default_factory=ModelSettings)
    adapter: AdapterSettings = field(default_factory=AdapterSettings)
    data: DataConfig = RUN_DATA
    client: ClientSettings = field(default_factory=ClientSettings)
    server: ServerSettings = field(default_factory=ServerSettings)
    privacy: PrivacySettings = field(default_factory=PrivacySettings)
    eval: EvalSettings = field(default_factory=EvalSettings)

    rules = {
        "strategy": one_of(STRATEGIES),
        "rounds": AT_LEAST_ONE,
        "seed": Rule(lambda v: 0 <= v < 2**63, "in [0, 2**63)"),
    }

    def __post_init__(self) -> None:
        super().__post_init__()  # each section checked its own fields when it was built
        STRATEGIES[self.strategy].with_roles(self.adapter.tensor_roles)  # raises naming adapter.tensor_roles.<kind>
        if self.client.local_steps + self.client.global_steps == 0:
            raise ValueError("client.local_steps and client.global_steps cannot both be 0")
        self.privacy.check(self.server)
        self.eval.check()
        if self.data.seed is None:  # the data split follows the run's seed
            self.data = replace(self.data, seed=self.seed)

    def to_dict(self) -> dict[str, Any]:
        """The configuration as plain nested dicts (what ``config.yaml`` holds)."""
        return asdict(self)


def load_config(path: str | Path | None = None, overrides: Iterable[str] | Mapping[str, Any] = ()) -> RunConfig:
    """The defaults, updated by the file at ``path`` (if any), then by ``overrides`` (see
    :mod:`fedlora.federated.loader`)."""
    values = read_config_file(path) if path is not None else {}
    return build_config(values, overrides)


def build_config(values: Mapping[str, Any], overrides: Iterable[str] | Mapping[str, Any] = ()) -> RunConfig:
    """A validated :class:`RunConfig` from nested ``values`` with dotted ``overrides`` applied on top."""
    return build_dataclass(RunConfig, values, overrides)


def load_run_config(path: str | Path, overrides: Iterable[str] | Mapping[str, Any] = ()) -> RunConfig:
    """A run's saved ``config.yaml`` with ``overrides`` applied; one saved before ``data.prompt_format`` existed
    reads as ``alpaca``, the only prompt format then (so such a run resumes and evaluates as it trained)."""
    values = read_config_file(path)
    data = values.get("data")
    if isinstance(data, dict) and "prompt_format" not in data:
        values = {**values, "data": {**data, "prompt_format": "alpaca"}}
    return build_config(values, overrides)


def save_config(config: RunConfig, path: str | Path) -> None:
    """Write the resolved configuration as YAML."""
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))


def config_differences(a: RunConfig, b: RunConfig) -> list[str]:
    """The dotted keys whose values differ between two configurations."""
    leaves_a, leaves_b = config_leaves(a), config_leaves(b)
    return sorted(key for key in leaves_a if leaves_a[key] != leaves_b[key])


def config_leaves(config: RunConfig) -> dict[str, Any]:
    """Every setting by dotted key."""
    return leaves(config)
