"""The rules every settings section follows, checked one way however the section is built (the loader, a direct
construction, ``dataclasses.replace``).

A section is a dataclass deriving from :class:`Section`. On construction every field that is not None and not a
nested section must hold: a float is finite, a ``Literal`` field one of its values, and a field named in the
class's ``rules`` (name → :class:`Rule`) passes that rule; the first that does not raises a ``ValueError``
``"<name> must be <description>; got <value>"`` (the loader prefixes the section's dotted key). A name taken from a
registry (strategies, aggregators, server optimizers) has the rule :func:`one_of` that registry.
"""

from __future__ import annotations

import math
import types
from collections.abc import Callable, Iterable
from dataclasses import fields, is_dataclass
from typing import Any, ClassVar, Literal, NamedTuple, Union, get_args, get_origin, get_type_hints


class Rule(NamedTuple):
    """What a value must satisfy (``check``), said as ``description``; ``choices``: the names a :func:`one_of`
    rule takes."""

    check: Callable[[Any], bool]
    description: str
    choices: tuple[str, ...] = ()


POSITIVE = Rule(lambda v: v > 0, "positive")
AT_LEAST_ONE = Rule(lambda v: v >= 1, "at least 1")
NON_NEGATIVE = Rule(lambda v: v >= 0, "at least 0")
UNIT = Rule(lambda v: 0 <= v < 1, "in [0, 1)")


def one_of(names: Iterable[str]) -> Rule:
    """A value must be one of ``names`` (a registry's keys, in its order)."""
    choices = tuple(names)
    return Rule(lambda v: v in choices, f"one of {list(choices)}", choices)


class Section:
    """A settings section: its fields are checked by the rules of the module docstring when it is built."""

    rules: ClassVar[dict[str, Rule]] = {}

    def __post_init__(self) -> None:
        hints = get_type_hints(type(self))
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None or is_dataclass(value):
                continue
            if isinstance(value, float) and not math.isfinite(value):  # learning rates, clip norms, DP values, ...
                raise ValueError(f"{f.name} must be finite; got {value!r}")
            choices = _literal_choices(hints[f.name])
            rule = self.rules.get(f.name) or (
                Rule(choices.__contains__, f"one of {list(choices)}") if choices else None
            )
            if rule is not None and not rule.check(value):
                raise ValueError(f"{f.name} must be {rule.description}; got {value!r}")


def _literal_choices(annotation: Any) -> tuple[Any, ...]:
    """The values of a ``Literal`` annotation (also inside ``X | None``); empty for any other."""
    if get_origin(annotation) is Literal:
        return get_args(annotation)
    if get_origin(annotation) in (Union, types.UnionType):
        return tuple(value for arg in get_args(annotation) for value in _literal_choices(arg))
    return ()
