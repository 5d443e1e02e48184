"""The report's resolution-change section: for each cell of a `[generation] resolutions` run, each size's first
generation (which carries any recompile the size caused), its later generations, its step time, the graphs
compiled during its generations and its peak memory, with the cell's warm-up compile beside its first size."""

from __future__ import annotations

import json
from typing import Any

import pandas as pd

from bench.report.numbers import shown

RESOLUTION_INTRO = (
    "Each size of `[generation] resolutions`, in the order it ran (the warm-up ran at the first): a compiled cell's"
    " first generation at a new size includes any recompile the size caused, and `graphs compiled` counts the"
    " graphs compiled during that size's generations. `graphs from cache` counts the warm-up's graphs Inductor found"
    " in its cache (compiled before, by this cell's matrix or another), which shortens that compile."
)
# (key, header): one list for the HTML and Markdown tables and the docs
RESOLUTION_COLUMNS = (
    ("cell", "cell"),
    ("size", "size (w×h)"),
    ("compile", "warm-up compile s"),
    ("from_cache", "graphs from cache"),
    ("first", "first generation s"),
    ("later", "later generations s"),
    ("step", "s/step"),
    ("compiles", "graphs compiled"),
    ("peak", "peak reserved"),
)


def resolution_rows(cells: pd.DataFrame, memory_scale: float) -> list[dict[str, str]]:
    """One row per cell and size, from the cells' `per_resolution` (bench.summary.cell_summary records, or any
    frame with one row per cell); [] when no cell ran a `[generation] resolutions` sweep. GPU memory in bytes /
    `memory_scale`."""
    rows = []
    for _, cell in cells.sort_values("cell_label").iterrows():
        sizes = cell.get("per_resolution")
        if not isinstance(sizes, str):
            continue
        compiled = cell["compile"] != "off"
        for index, size in enumerate(json.loads(sizes)):
            first, *later = size["e2e_latency_s"] or [None]
            rows.append(
                {
                    "cell": cell["cell_label"] if index == 0 else "",
                    "size": f"{size['width']}×{size['height']}",
                    "compile": shown(cell.get("compile_s"), "{:.0f}") if index == 0 and compiled else "",
                    "from_cache": _from_cache(cell.get("compile_counts")) if index == 0 and compiled else "",
                    "first": shown(first, "{:.2f}"),
                    "later": shown(sum(later) / len(later) if later else None, "{:.3f}"),
                    "step": shown(size["step_latency_median_s"], "{:.4f}"),
                    "compiles": shown(size["timed_compiles"], "{:.0f}") if compiled else "eager",
                    "peak": shown(
                        None if size["peak_reserved_bytes"] is None else size["peak_reserved_bytes"] / memory_scale,
                        "{:.2f}",
                    ),
                }
            )
    return rows


def _from_cache(counts: Any) -> str:
    return str(json.loads(counts).get("graphs_from_cache", "–")) if isinstance(counts, str) else "–"
