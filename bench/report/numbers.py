"""How the report writes a number: formatted, ±∞ for an infinite value, and a missing one (None, NaN) as
`missing`."""

from __future__ import annotations

import math
from typing import Any


def number(value: Any, fmt: str, missing: str | None = None) -> str | None:
    """`fmt.format(value)`; "∞" / "-∞" for an infinite float; `missing` for None or NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return missing
    if isinstance(value, float) and math.isinf(value):
        return "∞" if value > 0 else "-∞"
    return fmt.format(value)


def shown(value: Any, fmt: str) -> str:
    """`number` as a table cell writes it: "–" where the value is missing."""
    return number(value, fmt, "–")
