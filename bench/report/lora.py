"""The report's LoRA sections: the step overhead of each LoRA mode by method (one line per cell without an
adapter), then each LoRA cell against the same cell without one (step and end-to-end overhead), the adapter's
load, fuse and hot-swap times, the graphs compiled after a swap, peak memory, and drift against the reference
pipeline with the same adapter."""

from __future__ import annotations

import json
from typing import Any

import pandas as pd

from bench.contract import Status
from bench.report.numbers import number, shown

LORA_INTRO = (
    "Each cell with a LoRA adapter against the same cell without one (`lora = none`): `unfused` keeps the LoRA"
    " layers beside the weights, `fused` merges the adapter into them, `hotswap` swaps a second adapter into a model"
    " prepared for it after the warm-up (a compiled model that recompiles shows graphs compiled after the swap)."
    " Drift is against the reference pipeline with the same adapter, unfused."
)
OVERVIEW_INTRO = (
    "The step time of each cell without an adapter, and what each LoRA mode adds to it (`unsupported` or another"
    " status where that mode did not run ok; n/a where the cell without an adapter has no ok row; – where the"
    " matrix has no such cell)."
)
OVERVIEW_MODES = ("unfused", "fused", "hotswap")
# (key, header): one list for the HTML and the Markdown tables
OVERVIEW_COLUMNS = (
    ("cell", "cell without an adapter"),
    ("rank", "rank"),
    ("step", "s/step without LoRA"),
    *((mode, f"{mode}: step vs no LoRA") for mode in OVERVIEW_MODES),
)
LORA_COLUMNS = (
    ("cell", "cell"),
    ("mode", "LoRA"),
    ("rank", "rank"),
    ("status", "status"),
    ("step", "s/step"),
    ("step_overhead", "step vs no LoRA"),
    ("e2e", "end-to-end s"),
    ("e2e_overhead", "end-to-end vs no LoRA"),
    ("load", "load s"),
    ("fuse", "fuse s"),
    ("swap", "swap s"),
    ("compile", "compile s"),
    ("timed_compiles", "graphs compiled in the timed runs"),
    ("peak", "peak reserved"),
    ("psnr_db", "PSNR dB vs reference + adapter"),
)


def lora_rows(cells: pd.DataFrame, memory_scale: float) -> list[dict[str, str]]:
    """One row per LoRA cell of one device's summary (bench.summary.cell_summary), method by method; [] when the
    run has none. GPU memory in bytes / `memory_scale`."""
    rows = []
    for _, cell in cells[cells["lora"] != "none"].iterrows():
        ok = cell["status"] == Status.OK
        compiled = cell["compile"] != "off"
        rows.append(
            {
                "cell": cell["cell_label"].split(" lora=")[0],
                "mode": cell["lora"],
                "rank": shown(cell["lora_rank"], "{:.0f}"),
                "status": cell["status"] if ok else f"{cell['status']}: {_last_line(cell['error'])}",
                "step": shown(cell["step_latency_median_s"], "{:.4f}"),
                "step_overhead": shown(cell["lora_step_overhead"] * 100, "{:+.1f} %"),
                "e2e": shown(cell["e2e_latency_median_s"], "{:.3f}"),
                "e2e_overhead": shown(cell["lora_e2e_overhead"] * 100, "{:+.1f} %"),
                "load": shown(cell["lora_load_s"], "{:.3f}"),
                "fuse": shown(cell["lora_fuse_s"], "{:.3f}"),
                "swap": shown(cell["lora_swap_s"], "{:.3f}"),
                "compile": _compile_text(cell) if compiled else "eager",
                "timed_compiles": shown(cell["timed_compiles"], "{:.0f}") if compiled else "eager",
                "peak": shown(_scaled(cell["peak_reserved_bytes"], memory_scale), "{:.2f}"),
                "psnr_db": shown(cell.get("psnr_db"), "{:.2f}"),
            }
        )
    return rows


def lora_overview_rows(cells: pd.DataFrame) -> list[dict[str, str]]:
    """One row per cell without an adapter (and adapter rank) of one device's summary that has LoRA cells: its
    step time and each mode's step overhead; [] when the run has no LoRA cell."""
    plain_steps = {
        cell["cell_label"]: cell["step_latency_median_s"] for _, cell in cells[cells["lora"] == "none"].iterrows()
    }
    rows: dict[tuple[str, str], dict[str, str]] = {}
    for _, cell in cells[cells["lora"] != "none"].iterrows():
        base, rank = cell["cell_label"].split(" lora=")[0], shown(cell["lora_rank"], "{:.0f}")
        row = rows.setdefault(
            (base, rank),
            {"cell": base, "rank": rank, "step": shown(plain_steps.get(base), "{:.4f}")}
            | dict.fromkeys(OVERVIEW_MODES, "–"),
        )
        ok = cell["status"] == Status.OK
        overhead = number(cell["lora_step_overhead"] * 100, "{:+.1f} %", "n/a")
        row[cell["lora"]] = overhead if ok else cell["status"]
    return list(rows.values())


def _compile_text(cell: pd.Series) -> str:
    """A compiled cell's warm-up compile seconds, saying when its graphs came from Inductor's cache (an earlier
    cell compiled them: not what an adapter costs a cold compile)."""
    counts = json.loads(cell["compile_counts"]) if isinstance(cell["compile_counts"], str) else {}
    cached = counts.get("graphs_from_cache", 0)
    return shown(cell["compile_s"], "{:.1f}") + (f" ({cached} graphs from the cache)" if cached else "")


def _last_line(error: Any) -> str:
    lines = error.strip().splitlines() if isinstance(error, str) else []
    return lines[-1] if lines else "no error text"


def _scaled(value: Any, scale: float) -> float | None:
    return None if value is None else float(value) / scale
