"""The unquantized reference: every component in the cell's dtype."""

from __future__ import annotations

from typing import ClassVar

from bench.methods.base import Method


class Baseline(Method):
    name: ClassVar[str] = "baseline"
    family: ClassVar[str] = "baseline"
    quantizes: ClassVar[bool] = False
