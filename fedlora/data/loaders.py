"""Load instruction data into one normalised schema: ``instruction``, ``context``, ``response``, ``label``, ``history``.

Every loader returns a :class:`datasets.Dataset` with exactly these string columns, so partitioning, tokenisation
and evaluation never need to know where the data came from. ``label`` is what label-based partitioners split on
(Dolly's ``category``, a Natural Instructions task's name, or any user column). ``history`` is the JSON list of
the turns before the final user turn of a conversation (``"[]"`` for single-turn data).

Two row formats are read. Instruction rows: ``instruction`` and ``response`` (and optionally ``context``)
columns. Conversations in the TRL convention: a ``messages`` column holding turns
``{"role": "system" | "user" | "assistant", "content": str}``, an optional system turn first, then user and
assistant turns alternating, ending with an assistant turn; the final user turn becomes ``instruction``, the final
assistant turn ``response`` (the one turn the loss is on), the turns before them ``history``.

Local files are read here (JSON, JSON Lines, CSV; UTF-8, a leading byte-order mark skipped as Excel writes one), so a
malformed file is reported by its line: a row that is not a JSON object, invalid JSON, a CSV row with more cells than
the header. Every value of a mapped column must be a
string (or missing: read as ""); a number, list or object there is an error naming the file, row and column, as is
a malformed conversation turn. Rows whose instruction or response is empty (after stripping whitespace) are
dropped and logged with their row numbers; a source with no usable rows is an error.
"""

from __future__ import annotations

import csv
import itertools
import json
import logging
import re
import reprlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from datasets import Dataset, DatasetDict, load_dataset, load_from_disk

from fedlora.files import missing_file_error

logger = logging.getLogger(__name__)

COLUMNS = ("instruction", "context", "response", "label", "history")
REQUIRED_COLUMNS = ("instruction", "response")
MAPPABLE_COLUMNS = ("instruction", "context", "response", "label", "messages")  # the targets of a column mapping
ROLES = ("system", "user", "assistant")
DOLLY_HUB_ID = "databricks/databricks-dolly-15k"
DOLLY_COLUMNS = {"instruction": "instruction", "context": "context", "response": "response", "label": "category"}
NI_HUB_ID = "Muennighoff/natural-instructions"
"""Natural Instructions on the hub, one row per instance (``task_name``, ``definition``, ``inputs``, ``targets``)."""
NI_HUB_COLUMNS = {"instruction": "definition", "context": "inputs", "response": "targets", "label": "task_name"}

Table = Mapping[str, Sequence[object]]  # column name -> one value per row


def load_instruction_dataset(path: str | Path, columns: Mapping[str, str] | None = None) -> Dataset:
    """Load a local ``.json``/``.jsonl``/``.csv`` file, a dataset saved with ``Dataset.save_to_disk`` or a Hugging
    Face hub dataset id (its ``train`` split).

    A ``.json``/``.jsonl`` file holds a JSON array of objects or JSON Lines (one object per line); a ``.csv`` file
    has a header row, and every cell is read as text (a ``messages`` cell as JSON). ``columns`` maps the normalised
    names to the source's column names, e.g. ``{"instruction": "question", "response": "answer", "context":
    "passage", "label": "topic"}``, or for conversations ``{"messages": "conversation", "label": "category"}``;
    names left out map to themselves. Rows are conversations when ``columns`` maps ``messages`` or the source has
    a ``messages`` column and no ``instruction`` column; otherwise ``instruction`` and ``response`` must exist. A
    missing ``context`` or ``label`` column becomes empty strings.
    """
    return normalise(_read(path), columns, source=str(path))


def load_dolly(path: str | Path = DOLLY_HUB_ID) -> Dataset:
    """databricks-dolly-15k from the hub (default) or a local copy; ``label`` is Dolly's ``category``."""
    return load_instruction_dataset(path, DOLLY_COLUMNS)


def load_natural_instructions(paths: str | Path | Sequence[str | Path]) -> list[Dataset]:
    """One dataset per Natural Instructions task, in sorted order of task file (or task name).

    ``paths`` is one of:

    * a directory: every ``*.json`` file in it that is a task file (a JSON object with ``Definition`` and
      ``Instances``); the other files are skipped with a warning naming each and why;
    * a task file or a list of them (each must be a task file);
    * a hub dataset id such as ``Muennighoff/natural-instructions`` (or a local copy of one, saved with
      ``save_to_disk``) with one row per instance and columns ``task_name``, ``definition``, ``inputs`` and
      ``targets``; its ``train`` split, one dataset per ``task_name``.

    From task files, each instance becomes a row: instruction = the task's ``Definition``, context = the instance
    ``input``, response = its first ``output`` (a number becomes its text as written in the file; a list or
    object is an error), label = the task name (the file stem).
    """
    if isinstance(paths, str | Path):
        path = Path(paths)
        local = path.exists() or path.suffix == ".json" or not may_be_hub_id(paths)
        if _is_saved_dataset(path) or not local:
            return _natural_instructions_dataset(_read(paths), str(paths))
    tasks = _natural_instruction_tasks(paths)
    return [_natural_instruction_task(file, task) for file, task in tasks]


def normalise(dataset: Dataset | Table, columns: Mapping[str, str] | None = None, source: str = "dataset") -> Dataset:
    """Map columns to the schema, strip the values, drop rows lacking instruction or response.

    ``dataset`` is a :class:`~datasets.Dataset` or its columns (name → one value per row). A mapped value must be
    a string or None (read as ""); anything else raises a ``ValueError`` naming ``source``, the row (1-based) and
    the column. A ``messages`` value must be a conversation (see the module docstring), or None (the row is
    dropped); a malformed one raises a ``ValueError`` naming the row and turn.
    """
    columns = dict(columns or {})
    unknown = set(columns) - set(MAPPABLE_COLUMNS)
    if unknown:
        raise ValueError(
            f"{source}: unknown target column(s) {sorted(unknown)} in the column mapping; use {MAPPABLE_COLUMNS}"
        )
    names = dataset.column_names if isinstance(dataset, Dataset) else list(dataset)
    num_rows = len(dataset) if isinstance(dataset, Dataset) else max(map(len, dataset.values()), default=0)
    if num_rows == 0:
        raise ValueError(f"{source}: the dataset is empty")
    mapping = {target: columns.get(target, target) for target in MAPPABLE_COLUMNS}
    chat = "messages" in columns or (mapping["messages"] in names and mapping["instruction"] not in names)
    if chat:
        both = [target for target in ("instruction", "context", "response") if target in columns]
        if both:
            raise ValueError(
                f"{source}: the column mapping names both 'messages' and {both}; a conversation column replaces the "
                "instruction, context and response columns"
            )
    required = ("messages",) if chat else REQUIRED_COLUMNS
    for target in required + tuple(columns):
        if mapping[target] not in names:
            raise ValueError(
                f"{source}: column {mapping[target]!r} (for {target!r}) not found; available columns: {names}"
            )

    def texts(target: str) -> list[str] | None:
        name = mapping[target]
        return [_text(value, source, row, name) for row, value in enumerate(dataset[name])] if name in names else None

    if chat:
        name = mapping["messages"]
        turns = [_conversation(value, source, row, name) for row, value in enumerate(dataset[name])]
        values = {
            "instruction": [t[-2]["content"] if t else "" for t in turns],
            "context": None,
            "response": [t[-1]["content"] if t else "" for t in turns],
            "label": texts("label"),
            "history": [json.dumps(t[:-2] if t else [], ensure_ascii=False) for t in turns],
        }
    else:
        values = {target: texts(target) for target in ("instruction", "context", "response", "label")}
        values["history"] = ["[]"] * num_rows
    what = "final user or assistant turn" if chat else "instruction or response"
    empty = [row for row in range(num_rows) if not values["instruction"][row] or not values["response"][row]]
    if len(empty) == num_rows:
        raise ValueError(f"{source}: no rows left after dropping {num_rows} with an empty {what}")
    if empty:
        logger.warning(
            "%s: dropped %d of %d rows with an empty %s (rows %s)",
            source,
            len(empty),
            num_rows,
            what,
            reprlib.repr([row + 1 for row in empty]),
        )
    kept = sorted(set(range(num_rows)) - set(empty))
    return Dataset.from_dict(
        {
            target: [""] * len(kept) if column is None else [column[row] for row in kept]
            for target, column in values.items()
        }
    )


def _conversation(value: object, source: str, row: int, column: str) -> list[dict[str, str]]:
    """A ``messages`` value as checked turns with stripped contents; [] for a missing or empty conversation."""
    where = f"{source}: row {row + 1}: column {column!r}"
    if isinstance(value, str):  # a CSV cell, or a column of JSON text
        try:
            value = json.loads(value) if value.strip() else None
        except json.JSONDecodeError as error:
            raise ValueError(f"{where} holds text that is not a JSON list of turns ({error.msg})") from error
        except RecursionError:
            raise ValueError(f"{where}: {_TOO_DEEP}") from None
    if value is None:
        return []
    if not isinstance(value, list):
        raise ValueError(
            f"{where} holds {type(value).__name__} {reprlib.repr(value)}, not a list of turns "
            '{"role": ..., "content": ...}'
        )
    turns = []
    for number, turn in enumerate(value, 1):
        if not isinstance(turn, Mapping) or "role" not in turn or "content" not in turn:
            raise ValueError(f"{where}: turn {number} is not an object with 'role' and 'content': {reprlib.repr(turn)}")
        role, content = turn["role"], turn["content"]
        if role not in ROLES:
            raise ValueError(f"{where}: turn {number} has role {role!r}; use one of {list(ROLES)}")
        if content is not None and not isinstance(content, str):
            raise ValueError(
                f"{where}: turn {number} ({role}) content is {type(content).__name__} {reprlib.repr(content)}, "
                "not a string"
            )
        turns.append({"role": role, "content": (content or "").strip()})
    if not turns:
        return []
    start = 1 if turns[0]["role"] == "system" else 0
    for number, turn in enumerate(turns[start:], start + 1):
        expected = "user" if (number - start) % 2 else "assistant"
        if turn["role"] != expected:
            raise ValueError(
                f"{where}: turn {number} is {turn['role']!r} where {expected!r} was expected; after an optional "
                "first system turn, turns alternate user, assistant, ... and end with an assistant turn"
            )
    if turns[-1]["role"] != "assistant":
        raise ValueError(
            f"{where}: the last turn is {turns[-1]['role']!r}; a conversation must end with the assistant turn "
            "to train on"
        )
    return turns


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
    """A local file by its extension, a ``save_to_disk`` directory (its ``train`` split if it holds several); anything
    else goes to ``load_dataset`` (hub id, data folder), train split."""
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
    if local.is_symlink() and not local.exists():  # a link loop or a dangling link names no hub dataset either
        raise missing_file_error(local, "data path")
    if _is_saved_dataset(local):
        saved = load_from_disk(str(local))
        return saved["train"] if isinstance(saved, DatasetDict) else saved
    try:
        return load_dataset(str(path), split="train")
    except Exception as error:
        raise ValueError(f"{path!r} is not a local file and could not be loaded as a hub dataset: {error}") from error


def _read_json(path: Path) -> Table:
    """A JSON array of objects, or JSON Lines (one object per line), as columns; a key a row lacks is None there."""
    text = path.read_text(encoding="utf-8-sig")
    if text.lstrip().startswith("["):
        try:
            array = _json_value(text)
        except RecursionError:
            raise ValueError(f"{_too_deep_row(text)}: {_TOO_DEEP}") from None
        rows = [(f"row {number}", row) for number, row in enumerate(array, 1)]
    else:
        lines = enumerate(text.splitlines(), 1)
        rows = [(f"line {number}", _json_value(line, number)) for number, line in lines if line.strip()]
    for where, row in rows:
        if not isinstance(row, dict):
            raise ValueError(f"{where} is not a JSON object: {reprlib.repr(row)}")
    names = dict.fromkeys(key for _, row in rows for key in row)
    return {name: [row.get(name) for _, row in rows] for name in names}


def _json_value(text: str, line: int | None = None) -> object:
    """``json.loads``, with a ``ValueError`` that names the line (``line``: the line ``text`` is, in its file). A
    whole file's text (``line`` None) that nests too deeply raises ``RecursionError`` (see :func:`_too_deep_row`)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"invalid JSON at line {line or error.lineno}, column {error.colno}: {error.msg}") from error
    except RecursionError:
        if line is None:
            raise
        raise ValueError(f"line {line}: {_TOO_DEEP}") from None


_TOO_DEEP = "values nest too deeply to read (lists or objects inside each other, hundreds of levels deep)"
_ARRAY_SEPARATOR = re.compile(r"\s*,?\s*")


def _too_deep_row(text: str) -> str:
    """Where the JSON array ``text`` nests too deeply for ``json.loads``, as ``row N (line L)``: its rows are decoded
    one by one until one raises ``RecursionError`` (the rows before it decoded, so the array's syntax holds until
    there)."""
    decoder, position = json.JSONDecoder(), text.index("[") + 1
    for row in itertools.count(1):
        position = _ARRAY_SEPARATOR.match(text, position).end()
        try:
            _, position = decoder.raw_decode(text, position)
        except RecursionError:
            line = text.count("\n", 0, position) + 1
            return f"row {row} (line {line})"
        except json.JSONDecodeError:  # the end of the array: decoding only the rows recursed less deeply
            break
    return "the JSON array"


def _read_csv(path: Path) -> Table:
    """A CSV file with a header row, every cell as text; a short row gets "" cells, a row with extra cells fails."""
    with path.open(newline="", encoding="utf-8-sig") as f:
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


def _natural_instruction_tasks(paths: str | Path | Sequence[str | Path]) -> list[tuple[Path, dict]]:
    """(file, parsed task) for a directory's task files (others skipped with a warning) or for listed files."""
    if isinstance(paths, str | Path) and Path(paths).is_dir():
        root = Path(paths)
        tasks, skipped = [], []
        for file in sorted(root.glob("*.json")):
            try:
                tasks.append((file, _natural_instruction_task_file(file)))
            except ValueError as error:
                skipped.append(str(error))
                logger.warning("skipping %s", error)
        if not tasks:
            why = f": {'; '.join(skipped)}" if skipped else ""
            raise FileNotFoundError(f"{root}: directory holds no Natural Instructions task files (*.json){why}")
        return tasks
    files = sorted(Path(p) for p in ([paths] if isinstance(paths, str | Path) else paths))
    if not files:
        raise ValueError("no Natural Instructions task files given")
    for file in files:
        if not file.is_file():  # absent, a directory, a link loop
            raise missing_file_error(file, "Natural Instructions task file")
    return [(file, _natural_instruction_task_file(file)) for file in files]


def _natural_instruction_task_file(file: Path) -> dict:
    """A task file's JSON, numbers read as their text; a ``ValueError`` naming the file when it is no task file."""
    try:
        task = json.loads(file.read_text(encoding="utf-8-sig"), parse_int=str, parse_float=str)
    except json.JSONDecodeError as error:
        raise ValueError(f"{file}: invalid JSON at line {error.lineno}, column {error.colno}: {error.msg}") from error
    except RecursionError:
        raise ValueError(f"{file}: {_TOO_DEEP}") from None
    except ValueError as error:  # invalid UTF-8
        raise ValueError(f"{file}: {error}") from error
    for key in ("Definition", "Instances"):
        if not isinstance(task, dict) or key not in task:
            raise ValueError(f"{file}: not a Natural Instructions task file (no {key!r} key)")
    return task


def _natural_instruction_task(file: Path, task: dict) -> Dataset:
    definition = task["Definition"]
    if isinstance(definition, list) and all(isinstance(part, str) for part in definition):
        definition = "\n".join(definition)  # numbers were read as their text
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


def _natural_instructions_dataset(dataset: Dataset | Table, source: str) -> list[Dataset]:
    """A hub-style NI dataset (one row per instance) as one normalised dataset per ``task_name``."""
    names = dataset.column_names if isinstance(dataset, Dataset) else list(dataset)
    missing = [name for name in NI_HUB_COLUMNS.values() if name not in names]
    if missing:
        raise ValueError(
            f"{source}: not a Natural Instructions dataset: no column(s) {missing} (needs "
            f"{list(NI_HUB_COLUMNS.values())}); available columns: {names}"
        )
    rows = {target: list(dataset[name]) for target, name in NI_HUB_COLUMNS.items()}
    rows["response"] = [_first_output(value) for value in rows["response"]]
    rows["context"] = [_number_text(value) for value in rows["context"]]
    whole = normalise(rows, source=source)
    by_task: dict[str, list[int]] = {}
    for row, label in enumerate(whole["label"]):
        by_task.setdefault(label, []).append(row)
    return [whole.select(by_task[task]) for task in sorted(by_task)]


def _first_output(output: object) -> object:
    """NI instances list several acceptable outputs; the first is the training target (a number as its text)."""
    if isinstance(output, list):
        output = output[0] if output else ""
    return _number_text(output)


def _number_text(value: object) -> object:
    """An int or float as its text (``str``); anything else unchanged (a bool is no number here)."""
    return str(value) if isinstance(value, int | float) and not isinstance(value, bool) else value


def _is_saved_dataset(path: Path) -> bool:
    """Whether ``path`` is a directory written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``."""
    return path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file())


def may_be_hub_id(path: str | Path) -> bool:
    """Whether ``path`` could name a hub dataset (``name`` or ``org/name``) rather than a local path."""
    text = str(path)
    return not (Path(text).is_absolute() or text.startswith((".", "~")) or text.count("/") > 1 or not text)
