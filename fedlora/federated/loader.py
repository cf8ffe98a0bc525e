"""Reading settings into a tree of dataclasses: TOML, YAML or JSON files, ``key.sub=value`` overrides, and the
coercion of every value to its field's type. Generic: nothing here knows fedlora's settings (the schema is
:mod:`fedlora.federated.config`).

Unknown keys and values of the wrong type raise a ``ValueError`` that names the dotted key; string values are
coerced to each field's type: ``none``/``null`` for optional fields, ``true``/``false`` for booleans,
comma-separated or JSON lists, JSON objects for mappings. Each section's own rules (:mod:`fedlora.rules`) run when
it is built.
"""

from __future__ import annotations

import json
import math
import types
from collections.abc import Callable, Iterable, Mapping
from dataclasses import MISSING, Field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from fedlora.files import missing_file_error

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

T = TypeVar("T")
_NONE_STRINGS = ("none", "null")


def build_dataclass(cls: type[T], values: Mapping[str, Any], overrides: Iterable[str] | Mapping[str, Any] = ()) -> T:
    """A ``cls`` from nested ``values`` with dotted ``overrides`` (``"key.sub=value"`` strings or a mapping)
    applied on top."""
    merged = json.loads(json.dumps(values))  # a deep copy of plain data
    pairs = overrides.items() if isinstance(overrides, Mapping) else (_split_override(o) for o in overrides)
    for key, value in pairs:
        _set_dotted(merged, key, value)
    return _build(cls, merged, "")


def sections(tree: Any) -> list[tuple[Any, str]]:
    """The root of a dataclass tree and each dataclass directly in it, with the prefix of their dotted keys."""
    nested = [(getattr(tree, f.name), f"{f.name}.") for f in fields(tree)]
    return [(tree, "")] + [(section, prefix) for section, prefix in nested if is_dataclass(section)]


def leaves(tree: Any) -> dict[str, Any]:
    """Every setting of a dataclass tree by dotted key."""
    return {
        prefix + f.name: getattr(section, f.name)
        for section, prefix in sections(tree)
        for f in fields(section)
        if not is_dataclass(getattr(section, f.name))
    }


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The nested mapping in a ``.toml``, ``.yaml``/``.yml`` or ``.json`` file."""
    path = Path(path)
    if not path.is_file():
        raise missing_file_error(path, "config file")
    suffix = path.suffix.lower()
    try:
        if suffix == ".toml":
            with path.open("rb") as f:
                data = tomllib.load(f)
        elif suffix in (".yaml", ".yml"):
            data = yaml.safe_load(path.read_text()) or {}
        elif suffix == ".json":
            data = json.loads(path.read_text())
        else:
            raise ValueError(f"unsupported type {suffix!r}; use .toml, .yaml, .yml or .json")
    except (ValueError, yaml.YAMLError) as error:  # TOML and JSON decode errors are ValueErrors
        raise ValueError(f"config file {path}: {error}") from error
    except RecursionError:  # JSON lists or mappings hundreds of levels deep
        raise ValueError(f"config file {path}: values nest too deeply") from None
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping at the top level")
    try:
        _check_plain(data, f"config file {path}", "")
    except RecursionError:  # a YAML anchor that contains itself
        raise ValueError(f"config file {path}: values nest too deeply (or refer to themselves)") from None
    return data


def _check_plain(value: Any, source: str, key: str) -> None:
    """Raise a ``ValueError`` naming the dotted ``key`` of the first value that is not plain JSON data (a string,
    number, boolean, null, list, or mapping with string keys), such as a YAML/TOML date or set."""
    if isinstance(value, dict):
        for name, item in value.items():
            if not isinstance(name, str):
                raise ValueError(f"{source}: key {name!r} under {key or 'the top level'} is not a string")
            _check_plain(item, source, f"{key}.{name}" if key else name)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_plain(item, source, f"{key}[{i}]")
    elif value is not None and not isinstance(value, str | int | float):  # bool is an int
        raise ValueError(
            f"{source}: {key} holds {type(value).__name__} {value!r}, not a plain value (string, number, boolean, "
            "null, list or mapping)"
        )


def _split_override(override: str) -> tuple[str, str]:
    key, sep, value = override.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"override {override!r} must look like key.sub=value")
    key = key.strip()
    if "" in key.split("."):
        raise ValueError(f"override {override!r}: key {key!r} has an empty part between dots; keys look like client.lr")
    return key, value.strip()


def _set_dotted(values: dict[str, Any], key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    node = values
    for i, part in enumerate(parents):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ValueError(f"{'.'.join(parents[: i + 1])} is not a section, so {key!r} cannot be set")
        node = child
    node[leaf] = value


def _build(cls: type, values: Any, prefix: str, base: Any = None) -> Any:
    """A ``cls`` from ``values``: on top of ``base`` (a default instance) if given, each nested dataclass on top of
    its field's default; a ``ValueError`` its construction raises is led by ``prefix``."""
    if not isinstance(values, Mapping):
        raise ValueError(f"{prefix.rstrip('.') or 'the config'} must be a table/mapping; got {values!r}")
    hints = get_type_hints(cls)
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"unknown config key {prefix + unknown[0]!r}; known keys here: {sorted(known)}")
    kwargs = {}
    for name, value in values.items():
        annotation = hints[name]
        if is_dataclass(annotation):
            kwargs[name] = _build(annotation, value, f"{prefix}{name}.", _default(known[name]))
        else:
            kwargs[name] = _coerce(value, annotation, prefix + name)
    try:
        return replace(base, **kwargs) if base is not None else cls(**kwargs)
    except ValueError as error:
        if not prefix or str(error).startswith(prefix):
            raise
        raise ValueError(f"{prefix}{error}") from None


def _default(f: Field) -> Any:
    """The default value of a dataclass field (None if it has none)."""
    if f.default is not MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not MISSING else None


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """``value`` as an instance of ``annotation`` (strings are parsed), or a ValueError naming ``key``."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin in (Union, types.UnionType):
        if type(None) in args and (value is None or (isinstance(value, str) and value.lower() in _NONE_STRINGS)):
            return None
        options = [arg for arg in args if arg is not type(None)]
        for option in options[:-1]:  # the first type that takes the value (``str | list[str]``: a string first)
            try:
                return _coerce(value, option, key)
            except ValueError:
                continue
        return _coerce(value, options[-1], key)
    if origin is Literal:
        if value not in args:
            raise ValueError(f"{key} must be one of {list(args)}; got {value!r}")
        return value
    coerce = _SCALARS.get(annotation) or _CONTAINERS.get(origin)
    if coerce is None:
        raise TypeError(f"{key}: unsupported field type {annotation!r}")
    try:
        return coerce(value, args, key)
    except (TypeError, ValueError, OverflowError) as error:
        if str(error).startswith(key):
            raise
        raise ValueError(f"{key} must be {_describe(annotation)}; got {value!r}") from None


def _to_int(value: Any, args: tuple, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(value)
    return int(value)


def _to_float(value: Any, args: tuple, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(value)
    result = float(value)
    if math.isnan(result):
        raise ValueError(value)
    return result


def _to_bool(value: Any, args: tuple, key: str) -> bool:
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if not isinstance(value, bool):
        raise ValueError(value)
    return value


def _to_str(value: Any, args: tuple, key: str) -> str:
    if not isinstance(value, str):
        raise ValueError(value)
    return value


def _to_list(value: Any, args: tuple, key: str) -> list:
    if isinstance(value, str):
        value = json.loads(value) if value.startswith("[") else [item.strip() for item in value.split(",") if item]
    if not isinstance(value, list):
        raise ValueError(value)
    return [_coerce(item, args[0], f"{key}[{i}]") for i, item in enumerate(value)]


def _to_dict(value: Any, args: tuple, key: str) -> dict:
    if isinstance(value, str):
        value = json.loads(value)
    if not isinstance(value, dict):
        raise ValueError(value)
    return {str(k): _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}


_SCALARS: dict[Any, Callable[[Any, tuple, str], Any]] = {
    bool: _to_bool,
    int: _to_int,
    float: _to_float,
    str: _to_str,
}


_CONTAINERS: dict[Any, Callable[[Any, tuple, str], Any]] = {list: _to_list, dict: _to_dict}


def _describe(annotation: Any) -> str:
    origin = get_origin(annotation)
    if origin is list:
        return "a list (or comma-separated string)"
    if origin is dict:
        return "a mapping (or JSON object)"
    return f"a{'n' if annotation is int else ''} {getattr(annotation, '__name__', annotation)}"
