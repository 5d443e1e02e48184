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


def rate(value: float) -> str:
    """A rate such as images per second: two decimals, or three significant digits below 0.1 (an offloaded
    method's 0.00412 images/s)."""
    return f"{value:.2f}" if abs(value) >= 0.1 else f"{value:.3g}"


def shown(value: Any, fmt: str) -> str:
    """`number` as a table cell writes it: "–" where the value is missing."""
    return number(value, fmt, "–")
