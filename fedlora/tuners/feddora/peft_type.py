"""Adds FEDDORA to PEFT's ``PeftType`` enum, which PEFT 0.21 requires before a method can be registered.

``peft.utils.register_peft_method`` only accepts names that are members of ``PeftType``. Enums cannot be
extended through public API, so the member is created once here, in place, with the same internals the
``enum`` module uses for members declared in the class body (checked on Python 3.11, 3.12 and 3.13).
"""

from __future__ import annotations

from peft.utils import PeftType


def _add_peft_type(name: str) -> PeftType:
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = PeftType
    member._sort_order_ = len(PeftType._member_names_)
    # Set the class attribute first: EnumType.__setattr__ refuses to rebind names already in _member_map_.
    type.__setattr__(PeftType, name, member)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    return member


FEDDORA = _add_peft_type("FEDDORA")
