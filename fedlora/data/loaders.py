"""Load instruction data into one normalised schema: ``instruction``, ``context``, ``response``, ``label`` (all str).

Every loader returns a :class:`datasets.Dataset` with exactly these columns, so partitioning, tokenisation and
evaluation never need to know where the data came from. ``label`` is what label-based partitioners split on
(Dolly's ``category``, a Natural Instructions task's name, or any user column).

Local files are read here (JSON, JSON Lines, CSV), so a malformed file is reported by its line: a row that is not
a JSON object, invalid JSON, a CSV row with more cells than the header. Every value of a mapped column must be a
string (or missing: read as ""); a number, list or object there is an error naming the file, row and column.
Rows whose instruction or response is empty (after stripping whitespace) are dropped and logged with their row
numbers; a source with no usable rows is an error.
"""

from __future__ import annotations

import csv
import json
import logging
import reprlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from datasets import Dataset, load_dataset

from fedlora.files import missing_file_error

logger = logging.getLogger(__name__)

COLUMNS = ("instruction", "context", "response", "label")
REQUIRED_COLUMNS = ("instruction", "response")
DOLLY_HUB_ID = "databricks/databricks-dolly-15k"
DOLLY_COLUMNS = {"instruction": "instruction", "context": "context", "response": "response", "label": "category"}

Table = Mapping[str, Sequence[object]]  # column name -> one value per row


def load_instruction_dataset(path: str | Path, columns: Mapping[str, str] | None = None) -> Dataset:
    """Load a local ``.json``/``.jsonl``/``.csv`` file or a Hugging Face hub dataset id (its ``train`` split).

    A ``.json``/``.jsonl`` file holds a JSON array of objects or JSON Lines (one object per line); a ``.csv`` file
    has a header row, and every cell is read as text. ``columns`` maps the normalised names to the source's column
    names, e.g. ``{"instruction": "question", "response": "answer", "context": "passage", "label": "topic"}``;
    names left out map to themselves. ``instruction`` and ``response`` must exist; a missing ``context`` or
    ``label`` column becomes empty strings.
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


def normalise(dataset: Dataset | Table, columns: Mapping[str, str] | None = None, source: str = "dataset") -> Dataset:
    """Map columns to the schema, strip the values, drop rows lacking instruction or response.

    ``dataset`` is a :class:`~datasets.Dataset` or its columns (name → one value per row). A mapped value must be
    a string or None (read as ""); anything else raises a ``ValueError`` naming ``source``, the row (1-based) and
    the column.
    """
    columns = columns or {}
    unknown = set(columns) - set(COLUMNS)
    if unknown:
        raise ValueError(f"{source}: unknown target column(s) {sorted(unknown)} in the column mapping; use {COLUMNS}")
    names = dataset.column_names if isinstance(dataset, Dataset) else list(dataset)
    num_rows = len(dataset) if isinstance(dataset, Dataset) else max(map(len, dataset.values()), default=0)
    if num_rows == 0:
        raise ValueError(f"{source}: the dataset is empty")
    mapping = {target: columns.get(target, target) for target in COLUMNS}
    for target in REQUIRED_COLUMNS + tuple(columns):
        if mapping[target] not in names:
            raise ValueError(
                f"{source}: column {mapping[target]!r} (for {target!r}) not found; available columns: {names}"
            )
    values = {
        target: [_text(value, source, row, name) for row, value in enumerate(dataset[name])] if name in names else None
        for target, name in mapping.items()
    }
    empty = [row for row in range(num_rows) if not values["instruction"][row] or not values["response"][row]]
    if len(empty) == num_rows:
        raise ValueError(f"{source}: no rows left after dropping {num_rows} with an empty instruction or response")
    if empty:
        logger.warning(
            "%s: dropped %d of %d rows with an empty instruction or response (rows %s)",
            source,
            len(empty),
            num_rows,
            reprlib.repr([row + 1 for row in empty]),
        )
    kept = sorted(set(range(num_rows)) - set(empty))
    return Dataset.from_dict(
        {
            target: [""] * len(kept) if column is None else [column[row] for row in kept]
            for target, column in values.items()
        }
    )


def _text(value: object, source: str, row: int, column: str) -> str:
    """A cell as a stripped string; None is ""; any other type is an error naming the row (1-based) and column."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ValueError(
            f"{source}: row {row + 1}: column {column!r} holds {type(value).__name__} {reprlib.repr(value)}, "
            "not a string"
        )
    return value.strip()


def _read(path: str | Path) -> Dataset | Table:
    """A local file by its extension; anything else goes to ``load_dataset`` (hub id, data folder), train split."""
    local = Path(path)
    suffix = local.suffix.lower()
    if local.is_file():
        if suffix not in _FILE_READERS:
            raise ValueError(f"{path}: unsupported file type {suffix!r}; expected one of {sorted(_FILE_READERS)}")
        try:
            return _FILE_READERS[suffix](local)
        except ValueError as error:  # also invalid UTF-8 (UnicodeDecodeError)
            raise ValueError(f"{path}: {error}") from error
    if suffix in _FILE_READERS:
        if not local.exists() and not local.is_symlink():
            raise FileNotFoundError(f"{path}: no such data file")
        raise missing_file_error(local, "data file")  # a directory, a link loop, a dangling link
    try:
        return load_dataset(str(path), split="train")
    except Exception as error:
        raise ValueError(f"{path!r} is not a local file and could not be loaded as a hub dataset: {error}") from error


def _read_json(path: Path) -> Table:
    """A JSON array of objects, or JSON Lines (one object per line), as columns; a key a row lacks is None there."""
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        rows = [(f"row {number}", row) for number, row in enumerate(_json_value(text), 1)]
    else:
        lines = enumerate(text.splitlines(), 1)
        rows = [(f"line {number}", _json_value(line, number)) for number, line in lines if line.strip()]
    for where, row in rows:
        if not isinstance(row, dict):
            raise ValueError(f"{where} is not a JSON object: {reprlib.repr(row)}")
    names = dict.fromkeys(key for _, row in rows for key in row)
    return {name: [row.get(name) for _, row in rows] for name in names}


def _json_value(text: str, line: int | None = None) -> object:
    """``json.loads``, with a ``ValueError`` that names the line (``line``: the line ``text`` is, in its file)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"invalid JSON at line {line or error.lineno}, column {error.colno}: {error.msg}") from error


def _read_csv(path: Path) -> Table:
    """A CSV file with a header row, every cell as text; a short row gets "" cells, a row with extra cells fails."""
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        rows = []
        try:
            header = next(reader, [])
            for row in filter(None, reader):  # blank lines are skipped
                if len(row) > len(header):
                    raise ValueError(f"line {reader.line_num} has {len(row)} cells, the header {len(header)}")
                rows.append(row + [""] * (len(header) - len(row)))
        except csv.Error as error:
            raise ValueError(f"invalid CSV at line {reader.line_num}: {error}") from error
    return {name: [row[i] for row in rows] for i, name in enumerate(header)}


_FILE_READERS: dict[str, Callable[[Path], Table]] = {".json": _read_json, ".jsonl": _read_json, ".csv": _read_csv}


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
    try:
        task = _json_value(file.read_text(encoding="utf-8"))
    except ValueError as error:
        raise ValueError(f"{file}: {error}") from error
    for key in ("Definition", "Instances"):
        if not isinstance(task, dict) or key not in task:
            raise ValueError(f"{file}: not a Natural Instructions task file (no {key!r} key)")
    definition = task["Definition"]
    if isinstance(definition, list) and all(isinstance(part, str) for part in definition):
        definition = "\n".join(definition)
    if not isinstance(definition, str):
        raise ValueError(f"{file}: 'Definition' must be a string or a list of strings; got {reprlib.repr(definition)}")
    instances = task["Instances"]
    if not isinstance(instances, list):
        raise ValueError(f"{file}: 'Instances' is {type(instances).__name__}, not a list of instances")
    for number, instance in enumerate(instances, 1):
        if not isinstance(instance, dict):
            raise ValueError(f"{file}: instance {number} is not a JSON object: {reprlib.repr(instance)}")
    rows = {
        "instruction": [definition] * len(instances),
        "context": [instance.get("input") for instance in instances],
        "response": [_first_output(instance.get("output")) for instance in instances],
        "label": [file.stem] * len(instances),
    }
    return normalise(rows, source=str(file))


def _first_output(output: object) -> object:
    """NI instances list several acceptable outputs; the first is the training target."""
    if isinstance(output, list):
        return output[0] if output else ""
    return output
