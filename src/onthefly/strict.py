"""The base of every validated request body: strict types, no unknown fields, JSON's integers.

Strict: a number must be a JSON number, as the schema says (no "0.5", no true as 1). JSON Schema's
integer is a number with no fractional part, so 3 and 3.0 are the same integer (1.5 is not).
"""

from __future__ import annotations

import types
import typing
from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator

__all__ = ["StrictModel"]


def _kinds(annotation: Any) -> set[Any]:
    """The plain types an annotation admits (through Optional, unions, Annotated, list)."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _kinds(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return set().union(*(_kinds(a) for a in typing.get_args(annotation)))
    return {annotation}


def _whole(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _json_integers(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for name, field in cls.model_fields.items():
            if name not in data:
                continue
            kinds = _kinds(field.annotation)
            if int in kinds and float not in kinds:
                data[name] = _whole(data[name])
            elif any(typing.get_origin(k) is list and typing.get_args(k) and _kinds(typing.get_args(k)[0]) == {int}
                     for k in kinds) and isinstance(data[name], list):
                data[name] = [_whole(v) for v in data[name]]
        return data
