"""A `PeftType` member for the bottleneck adapter, which peft's registry requires before registration."""

from __future__ import annotations

from peft.utils import PeftType


def _extend_peft_type(name: str) -> PeftType:
    """Add `name` to peft's PeftType enum (a str Enum), or return the member if it exists already."""
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = PeftType
    member.__init__(name)
    type.__setattr__(PeftType, name, member)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    return member


BOTTLENECK = _extend_peft_type("BOTTLENECK")
