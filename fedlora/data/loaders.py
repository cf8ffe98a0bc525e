"""Load instruction data into one normalised schema: ``instruction``, ``context``, ``response``, ``label`` (all str).

Every loader returns a :class:`datasets.Dataset` with exactly these columns, so partitioning, tokenisation and
evaluation never need to know where the data came from. ``label`` is what label-based partitioners split on
(Dolly's ``category``, a Natural Instructions task's name, or any user column).

Rows whose instruction or response is empty (after stripping whitespace) are dropped and the count is logged;
a source with no usable rows is an error.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

from datasets import Dataset, load_dataset

logger = logging.getLogger(__name__)

COLUMNS = ("instruction", "context", "response", "label")
REQUIRED_COLUMNS = ("instruction", "response")
DOLLY_HUB_ID = "databricks/databricks-dolly-15k"
DOLLY_COLUMNS = {"instruction": "instruction", "context": "context", "response": "response", "label": "category"}
_FILE_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv"}


def load_instruction_dataset(path: str | Path, columns: Mapping[str, str] | None = None) -> Dataset:
    """Load a local ``.json``/``.jsonl``/``.csv`` file or a Hugging Face hub dataset id (its ``train`` split).

    ``columns`` maps the normalised names to the source's column names, e.g.
    ``{"instruction": "question", "response": "answer", "context": "passage", "label": "topic"}``; names left out
    map to themselves. ``instruction`` and ``response`` must exist; a missing ``context`` or ``label`` column
    becomes empty strings.
    """
    return normalise(_read(path), columns, source=str(path))


def load_dolly(path: str | Path = DOLLY_HUB_ID) -> Dataset:
    """databricks-dolly-15k from the hub (default) or a local copy; ``label`` is Dolly's ``category``."""
    return load_instruction_dataset(path, DOLLY_COLUMNS)


def load_natural_instructions(paths: str | Path | Sequence[str | Path]) -> list[Dataset]:
    """One dataset per Natural Instructions task file (``tasks/taskNNN_name.json``), in sorted-path order.

    ``paths`` is a directory (every ``task*.json`` in it) or a list of task files. Each instance becomes a row:
    instruction = the task's ``Definition``, context = the instance ``input``, response = its first ``output``,
    label = the task name (file stem).
    """
    files = _natural_instruction_files(paths)
    return [_load_natural_instruction_task(file) for file in files]


def normalise(dataset: Dataset, columns: Mapping[str, str] | None = None, source: str = "dataset") -> Dataset:
    """Map columns to the schema, coerce values to stripped strings, drop rows lacking instruction or response."""
    columns = columns or {}
    unknown = set(columns) - set(COLUMNS)
    if unknown:
        raise ValueError(f"{source}: unknown target column(s) {sorted(unknown)} in the column mapping; use {COLUMNS}")
    if len(dataset) == 0:
        raise ValueError(f"{source}: the dataset is empty")
    mapping = {target: columns.get(target, target) for target in COLUMNS}
    for target in REQUIRED_COLUMNS + tuple(columns):
        if mapping[target] not in dataset.column_names:
            raise ValueError(
                f"{source}: column {mapping[target]!r} (for {target!r}) not found; "
                f"available columns: {dataset.column_names}"
            )
    present = {target: source_col for target, source_col in mapping.items() if source_col in dataset.column_names}

    def to_schema(batch: dict[str, list]) -> dict[str, list[str]]:
        size = len(batch[present["instruction"]])
        return {
            target: [_clean(v) for v in batch[present[target]]] if target in present else [""] * size
            for target in COLUMNS
        }

    normalised = dataset.map(to_schema, batched=True, remove_columns=dataset.column_names)
    kept = normalised.filter(lambda row: bool(row["instruction"]) and bool(row["response"]))
    dropped = len(normalised) - len(kept)
    if dropped:
        logger.warning(
            "%s: dropped %d of %d rows with an empty instruction or response", source, dropped, len(normalised)
        )
    if len(kept) == 0:
        raise ValueError(f"{source}: no rows left after dropping {dropped} with an empty instruction or response")
    return kept


def _clean(value: object) -> str:
    return "" if value is None else str(value).strip()


def _read(path: str | Path) -> Dataset:
    """A local file by its extension; anything else goes to ``load_dataset`` (hub id, data folder), train split."""
    local = Path(path)
    suffix = local.suffix.lower()
    if local.is_file():
        if suffix not in _FILE_FORMATS:
            raise ValueError(f"{path}: unsupported file type {suffix!r}; expected one of {sorted(_FILE_FORMATS)}")
        return load_dataset(_FILE_FORMATS[suffix], data_files=str(local), split="train")
    if suffix in _FILE_FORMATS:
        raise FileNotFoundError(f"{path}: no such data file")
    try:
        return load_dataset(str(path), split="train")
    except Exception as error:
        raise ValueError(f"{path!r} is not a local file and could not be loaded as a hub dataset: {error}") from error


def _natural_instruction_files(paths: str | Path | Sequence[str | Path]) -> list[Path]:
    if isinstance(paths, str | Path):
        root = Path(paths)
        if root.is_dir():
            files = sorted(root.glob("task*.json"))
            if not files:
                raise FileNotFoundError(f"{root}: directory holds no task*.json files")
            return files
        paths = [root]
    files = sorted(Path(p) for p in paths)
    if not files:
        raise ValueError("no Natural Instructions task files given")
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"Natural Instructions task file(s) not found: {missing}")
    return files


def _load_natural_instruction_task(file: Path) -> Dataset:
    task = json.loads(file.read_text(encoding="utf-8"))
    for key in ("Definition", "Instances"):
        if key not in task:
            raise ValueError(f"{file}: not a Natural Instructions task file (no {key!r} key)")
    definition = task["Definition"]
    if isinstance(definition, list):
        definition = "\n".join(definition)
    instances = task["Instances"]
    rows = {
        "instruction": [definition] * len(instances),
        "context": [instance.get("input", "") for instance in instances],
        "response": [_first_output(instance.get("output")) for instance in instances],
        "label": [file.stem] * len(instances),
    }
    return normalise(Dataset.from_dict(rows), source=str(file))


def _first_output(output: object) -> object:
    """NI instances list several acceptable outputs; the first is the training target."""
    if isinstance(output, list):
        return output[0] if output else ""
    return output
