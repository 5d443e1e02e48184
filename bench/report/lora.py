"""The report's LoRA section: what each LoRA mode costs each method against the same cell without an adapter
(step and end-to-end overhead), the adapter's load, fuse and hot-swap times, the graphs compiled after a swap,
peak memory, and drift against the reference pipeline with the same adapter."""

from __future__ import annotations

from typing import Any

import pandas as pd

from bench.contract import Status
from bench.report.numbers import shown

LORA_INTRO = (
    "Each cell with a LoRA adapter against the same cell without one (`lora = none`): `unfused` keeps the LoRA"
    " layers beside the weights, `fused` merges the adapter into them, `hotswap` swaps a second adapter into a model"
    " prepared for it after the warm-up (a compiled model that recompiles shows graphs compiled after the swap)."
    " Drift is against the reference pipeline with the same adapter, unfused."
)
# (key, header): one list for the HTML and the Markdown tables
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
                "timed_compiles": shown(cell["timed_compiles"], "{:.0f}") if compiled else "eager",
                "peak": shown(_scaled(cell["peak_reserved_bytes"], memory_scale), "{:.2f}"),
                "psnr_db": shown(cell.get("psnr_db"), "{:.2f}"),
            }
        )
    return rows


def _last_line(error: Any) -> str:
    lines = error.strip().splitlines() if isinstance(error, str) else []
    return lines[-1] if lines else "no error text"


def _scaled(value: Any, scale: float) -> float | None:
    return None if value is None else float(value) / scale
