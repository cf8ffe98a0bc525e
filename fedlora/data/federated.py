"""Build the per-client train/test splits the federated engine trains and evaluates on.

:func:`build_federated_data` loads a source (:mod:`fedlora.data.loaders`), optionally caps and tokenises it,
partitions it across clients (:mod:`fedlora.data.partition`, or one client per file), splits every client into
train/test, and pools the client test splits into a global test set. Every random step is seeded by
``DataConfig.seed``, so the same config gives the same clients.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from datasets import Dataset, concatenate_datasets
from transformers import PreTrainedTokenizerBase

from fedlora.data.loaders import (
    DOLLY_COLUMNS,
    DOLLY_HUB_ID,
    load_instruction_dataset,
    load_natural_instructions,
    may_be_hub_id,
)
from fedlora.data.partition import dirichlet_partition, iid_partition, label_partition, sample_indices
from fedlora.data.samples import DOLLY_SAMPLE
from fedlora.data.tokenization import PromptFormat, resolve_prompt_format, tokenize_dataset
from fedlora.files import missing_file_error
from fedlora.rules import AT_LEAST_ONE, NON_NEGATIVE, POSITIVE, Rule, Section

logger = logging.getLogger(__name__)

Source = Literal["dolly", "natural_instructions", "file"]
Partition = Literal["dirichlet", "label", "iid", "files"]


DOLLY_SAMPLE_ALIAS = "dolly-sample"  # a path naming the packaged Dolly sample (fedlora.data.samples.DOLLY_SAMPLE)


def data_path_kind(path: str | Path) -> str:
    """What a ``data.path`` entry names, checked without reading it: the packaged Dolly sample, a local file or
    directory, or a hub dataset id (not checked: that needs the network); a ``FileNotFoundError`` for a local path
    that does not exist (an ``OSError`` for a link loop)."""
    if str(path) == DOLLY_SAMPLE_ALIAS:
        return "the packaged Dolly sample"
    local = Path(path)
    if local.exists():
        return "local directory" if local.is_dir() else "local file"
    if local.is_symlink():
        raise missing_file_error(local, "data.path")  # a link loop or a dangling link
    if may_be_hub_id(path):
        return "hub dataset id, not checked"
    raise FileNotFoundError(f"data.path {str(path)!r} does not exist (and it is not a hub dataset id)")


@dataclass(frozen=True)
class DataConfig(Section):
    """Where the data comes from and how it is split across clients: also the ``data.*`` settings of a run
    (:class:`fedlora.federated.config.RunConfig`, whose defaults are the quickstart's).

    Attributes:
        source: ``"dolly"`` (hub id or local Dolly .json/.jsonl), ``"natural_instructions"`` (task files) or
            ``"file"`` (any .json/.jsonl/.csv file or hub id, read through ``columns``).
        path: a hub id, a file, a directory of NI task files, a list of files, or ``dolly-sample`` (the packaged
            Dolly sample).
        columns: for ``source="file"``: normalised name → the file's column name, e.g. ``{"label": "category"}``
            (see ``load_instruction_dataset``; ``messages`` names a column of conversations).
        partition: ``"dirichlet"`` (label skew, ``alpha``), ``"label"`` (one label per client), ``"iid"`` or
            ``"files"`` (each file of ``path`` is one client; for NI, each task).
        num_clients: required for ``dirichlet``/``iid``; for ``label``/``files`` it follows from the data and, if
            given, must match.
        alpha: Dirichlet concentration; small = heterogeneous.
        min_examples: every client must get at least this many examples (before its train/test split).
        test_fraction: share of each client's examples held out as its test split (at least one example).
        global_test_size: cap on the pooled global test set (a seeded sample); ``None`` keeps all client tests.
        max_examples: seeded sample of at most this many examples from each partitioned dataset, i.e. in total,
            or per client for ``partition="files"``; ``None`` keeps everything.
        max_length: token budget per example when a tokenizer is given.
        prompt_format: ``"chat"`` (the tokenizer's chat template), ``"alpaca"``, ``"plain"`` or ``"auto"``
            (``chat`` when the tokenizer has a chat template, else ``alpaca``); see :mod:`fedlora.data.tokenization`.
            A run saves the format it resolved to in its config.yaml.
        seed: seeds sampling, partitioning and the train/test splits; None (a run's default) is the run's ``seed``.
    """

    source: Source = "dolly"
    path: str | list[str] = DOLLY_HUB_ID
    columns: dict[str, str] | None = None
    partition: Partition = "dirichlet"
    num_clients: int | None = None
    alpha: float = 0.5
    min_examples: int = 10
    test_fraction: float = 0.1
    global_test_size: int | None = None
    max_examples: int | None = None
    max_length: int = 512
    prompt_format: PromptFormat = "auto"
    seed: int | None = 0

    rules = {
        "num_clients": AT_LEAST_ONE,
        "alpha": POSITIVE,
        "min_examples": AT_LEAST_ONE,
        "test_fraction": Rule(lambda v: 0 < v < 1, "in (0, 1)"),
        "global_test_size": POSITIVE,
        "max_examples": POSITIVE,
        "max_length": Rule(lambda v: v >= 2, "at least 2"),
        "seed": NON_NEGATIVE,
    }

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.columns is not None and self.source != "file":
            raise ValueError(f"columns only applies to source='file', not {self.source!r}")
        if self.partition in ("dirichlet", "iid") and self.num_clients is None:
            raise ValueError(f"partition={self.partition!r} needs num_clients")


@dataclass(frozen=True, eq=False)
class ClientData:
    """One client's private data: rows ``train_rows`` and ``test_rows`` of ``source``, each split selected when it is
    read, so a federation holds its sources and every client's row indices, not two datasets per client.
    ``num_train_examples`` is the client's weight in sample-weighted averaging."""

    client_id: str
    source: Dataset
    train_rows: np.ndarray
    test_rows: np.ndarray

    @classmethod
    def of(cls, client_id: str, train: Dataset, test: Dataset) -> ClientData:
        """A client whose splits are the datasets ``train`` and ``test``."""
        rows = np.arange(len(train) + len(test))
        return cls(client_id, concatenate_datasets([train, test]), rows[: len(train)], rows[len(train) :])

    @property
    def train(self) -> Dataset:
        return self.source.select(self.train_rows)

    @property
    def test(self) -> Dataset:
        return self.source.select(self.test_rows)

    @property
    def num_train_examples(self) -> int:
        return len(self.train_rows)


@dataclass(frozen=True)
class FederatedData:
    """All clients plus the global test set (the union of client test splits, possibly sampled down), and the prompt
    format they were tokenised with (``chat``, ``alpaca`` or ``plain``; None when not tokenised)."""

    clients: list[ClientData]
    global_test: Dataset
    prompt_format: str | None = None

    def client_weights(self) -> list[float]:
        """Each client's share of all training examples (FedAvg weights), in client order; sums to 1."""
        sizes = np.array([client.num_train_examples for client in self.clients], dtype=float)
        return (sizes / sizes.sum()).tolist()


def build_federated_data(config: DataConfig, tokenizer: PreTrainedTokenizerBase | None = None) -> FederatedData:
    """Load, (optionally) tokenise, partition and split the data described by ``config``.

    With a tokenizer every split also has ``input_ids``, ``labels`` and ``prompt_ids`` in ``config.prompt_format``
    (``auto`` resolved for this tokenizer, see ``tokenize_dataset``; the tokenizer gets ``pad = eos`` if it had no
    pad token); without one, splits hold only the normalised text columns.
    """
    prompt_format = resolve_prompt_format(config.prompt_format, tokenizer) if tokenizer is not None else None
    named = _load_named_datasets(config)
    rng = np.random.default_rng(config.seed)
    if config.max_examples is not None:
        named = [(name, _sample(ds, config.max_examples, rng)) for name, ds in named]
    if tokenizer is not None:
        named = [(name, tokenize_dataset(ds, tokenizer, config.max_length, prompt_format)) for name, ds in named]
    client_rows = _client_rows(named, config)
    _check_client_sizes(client_rows, config)

    clients = []
    for index, (client_id, source, rows) in enumerate(client_rows):
        try:
            train, test = split_rows(len(rows), config.test_fraction, seed=(config.seed, index))
        except ValueError as error:
            raise ValueError(f"client {client_id!r}: {error}") from error
        clients.append(ClientData(client_id, source, rows[train], rows[test]))
    tests = [(source, [c.test_rows for c in clients if c.source is source]) for _, source in named]
    global_test = concatenate_datasets([source.select(np.concatenate(rows)) for source, rows in tests])  # client order
    if config.global_test_size is not None:
        global_test = _sample(global_test, config.global_test_size, rng)
    sizes = [c.num_train_examples for c in clients]
    logger.info(
        "%d clients, train sizes %d to %d, global test %d, prompt format %s",
        len(clients),
        min(sizes),
        max(sizes),
        len(global_test),
        prompt_format,
    )
    return FederatedData(clients, global_test, prompt_format)


def split_train_test(dataset: Dataset, test_fraction: float, seed: int | tuple[int, ...]) -> tuple[Dataset, Dataset]:
    """``dataset``'s train and test splits by :func:`split_rows`."""
    train, test = split_rows(len(dataset), test_fraction, seed)
    return dataset.select(train), dataset.select(test)


def split_rows(n: int, test_fraction: float, seed: int | tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """A seeded shuffle-split of rows ``0..n-1``, each part in ascending order: the test part gets
    ``round(test_fraction · n)`` rows but at least one, train at least one."""
    n_test = max(1, round(test_fraction * n))
    if n_test >= n:
        raise ValueError(f"cannot split {n} examples into non-empty train and test (test={n_test})")
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[n_test:]), np.sort(order[:n_test])


def _load_named_datasets(config: DataConfig) -> list[tuple[str, Dataset]]:
    """One (name, dataset) per client file for ``partition="files"``, else a single pooled dataset."""
    if config.source == "natural_instructions":
        named = [(ds[0]["label"], ds) for ds in load_natural_instructions(config.path)]
    else:
        paths = [config.path] if isinstance(config.path, str | Path) else list(config.path)
        paths = [DOLLY_SAMPLE if str(p) == DOLLY_SAMPLE_ALIAS else p for p in paths]
        if not paths:
            raise ValueError("DataConfig.path is an empty list")
        columns = DOLLY_COLUMNS if config.source == "dolly" else config.columns
        stems = [Path(p).stem for p in paths]
        names = stems if len(set(stems)) == len(stems) else [str(p) for p in paths]
        named = [(name, load_instruction_dataset(p, columns)) for name, p in zip(names, paths, strict=True)]
    if config.partition == "files":
        return named
    return [("all", concatenate_datasets([ds for _, ds in named]))]


def _client_rows(named: list[tuple[str, Dataset]], config: DataConfig) -> list[tuple[str, Dataset, np.ndarray]]:
    """(client id, source, the client's rows of it) per client: each file whole for ``partition="files"``, else the
    one pooled dataset partitioned by ``config``."""
    if config.partition == "files":
        return [(name, dataset, np.arange(len(dataset))) for name, dataset in named]
    ((_, dataset),) = named
    if config.partition == "label":
        labels = dataset["label"]
        shares = label_partition(labels, config.num_clients or len(set(labels)))
        return [(labels[rows[0]], dataset, np.asarray(rows)) for rows in shares]
    if config.partition == "dirichlet":
        shares = dirichlet_partition(
            dataset["label"], config.num_clients, config.alpha, config.seed, min_examples=config.min_examples
        )
    else:
        shares = iid_partition(len(dataset), config.num_clients, config.seed)
    width = len(str(len(shares) - 1))
    return [(f"client_{i:0{width}d}", dataset, np.asarray(rows)) for i, rows in enumerate(shares)]


def _check_client_sizes(client_rows: list[tuple[str, Dataset, np.ndarray]], config: DataConfig) -> None:
    if config.partition == "files" and config.num_clients not in (None, len(client_rows)):
        raise ValueError(f"partition='files' gives {len(client_rows)} clients but num_clients={config.num_clients}")
    small = {name: len(rows) for name, _, rows in client_rows if len(rows) < config.min_examples}
    if small:
        raise ValueError(f"clients with fewer than min_examples={config.min_examples} examples: {small}")


def _sample(dataset: Dataset, size: int, rng: np.random.Generator) -> Dataset:
    """A seeded sample of at most ``size`` rows, in original order."""
    return dataset if len(dataset) <= size else dataset.select(sample_indices(len(dataset), size, rng))
