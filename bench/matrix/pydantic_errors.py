"""Pydantic's validation errors, translated into one MatrixError naming the key, the bad value and the allowed values."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from bench.errors import MatrixError, did_you_mean
from bench.matrix.schema import MatrixFile
from bench.methods import method_names


def matrix_error(path: Path, error: ValidationError, prefix: str | None = None) -> MatrixError:
    """The most telling validation problem as a MatrixError with the key path and the allowed values.

    An unknown key comes first (a misspelled table also makes the real one missing), a missing key last.
    With `prefix`, the error is about a rule's single-value axis: the key is `prefix.<axis>`.
    """
    problems = sorted(error.errors(), key=_rank)
    first = problems[0]
    loc = _loc(first)
    key = f"{prefix}.{loc[0]}" if prefix else ".".join(loc)
    message = first["msg"].removeprefix("Value error, ")
    allowed: list[str] | None = None
    more = problems[1:]
    if first["type"] == "extra_forbidden":
        allowed = _keys_at(MatrixFile, loc[:-1])
        message = "unknown key" + did_you_mean(loc[-1], allowed or [])
    elif first["type"] == "missing":
        also = [p for p in more if p["type"] == "missing" and _loc(p)[:-1] == loc[:-1]]
        more = [p for p in more if p not in also]
        message = "missing required key"
        if also:
            message += f" (also missing: {', '.join(_loc(p)[-1] for p in also)})"
    elif first["type"] == "literal_error":
        allowed = [s.strip(" '") for s in re.split(r",| or ", first["ctx"]["expected"])]
        message = "not an allowed value"
    elif "unknown method" in message:
        allowed = method_names()
    value = first.get("input") if first["type"] != "missing" else None
    if more:
        message += f" [and {len(more)} more problem{'s' if len(more) > 1 else ''}]"
    return MatrixError(path, key, message, value, allowed)


def _rank(problem: dict[str, Any]) -> int:
    """Unknown keys first, missing keys last, every other problem in between (a stable sort keeps their order)."""
    return {"extra_forbidden": 0, "missing": 2}.get(problem["type"], 1)


def _loc(problem: dict[str, Any]) -> list[str]:
    return [str(part) for part in problem["loc"] if part != "[key]"]  # pydantic's marker for a bad table key


def _keys_at(model: type[BaseModel], loc: list[str]) -> list[str] | None:
    """The keys a model accepts at a location inside it, for 'unknown key' errors."""
    for part in loc:
        field = model.model_fields.get(part)
        annotation = field.annotation if field else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return sorted(model.model_fields)
