"""Pydantic's validation errors, translated into one MatrixError naming the key, the bad value and the allowed values."""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import BaseModel, ValidationError

from bench.errors import MatrixError
from bench.matrix.schema import MatrixFile
from bench.methods import method_names


def matrix_error(path: Path, error: ValidationError, prefix: str | None = None) -> MatrixError:
    """The first validation problem as a MatrixError with the key path and the allowed values.

    With `prefix`, the error is about a rule's single-value axis: the key is `prefix.<axis>`.
    """
    first = error.errors()[0]
    loc = [str(part) for part in first["loc"] if part != "[key]"]  # pydantic's marker for a bad table key
    key = f"{prefix}.{loc[0]}" if prefix else ".".join(loc)
    message = first["msg"].removeprefix("Value error, ")
    allowed: list[str] | None = None
    if first["type"] == "extra_forbidden":
        message = "unknown key"
        allowed = _keys_at(MatrixFile, loc[:-1])
    elif first["type"] == "missing":
        message = "missing required key"
    elif first["type"] == "literal_error":
        allowed = [s.strip(" '") for s in re.split(r",| or ", first["ctx"]["expected"])]
        message = "not an allowed value"
    elif "unknown method" in message:
        allowed = method_names()
    value = first.get("input") if first["type"] != "missing" else None
    more = len(error.errors()) - 1
    if more:
        message += f" [and {more} more problem{'s' if more > 1 else ''}]"
    return MatrixError(path, key, message, value, allowed)


def _keys_at(model: type[BaseModel], loc: list[str]) -> list[str] | None:
    """The keys a model accepts at a location inside it, for 'unknown key' errors."""
    for part in loc:
        field = model.model_fields.get(part)
        annotation = field.annotation if field else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return sorted(model.model_fields)
