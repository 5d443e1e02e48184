"""`quantbench compare OLD NEW`: per-cell deltas between two runs, with noise-aware regression flags.

Defaults: memory +2 %; latency beyond max(5 %, 3 x IQR); drift beyond the cell's gate (a gate that passed
and now fails); more graph breaks in a compiled cell (where both rows counted them). Exit code 1 when any
cell regressed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from bench.contract import Status
from bench.errors import UserError
from bench.measure import measurement_footnotes
from bench.store import read_results
from bench.summary import cell_summary, cells_that_ran, device_label, run_times


@dataclass(frozen=True)
class Thresholds:
    memory_increase: float = 0.02
    latency_increase: float = 0.05
    latency_iqr_multiple: float = 3.0


MEMORY_COLUMNS = ("peak_reserved_bytes", "resident_reserved_bytes", "transformer_tensor_bytes")
COMPARISON_COLUMNS = (
    "cell_id", "cell", "old_status", "new_status", "note",
    *(f"{column}_change" for column in MEMORY_COLUMNS), "e2e_latency_change", "regressions",
)  # fmt: skip


def compare_frames(old: pd.DataFrame, new: pd.DataFrame, thresholds: Thresholds = Thresholds()) -> pd.DataFrame:
    """One row per cell present in both runs: old and new values, deltas, and the regressions found."""
    old_cells, new_cells = cell_summary(old).set_index("cell_id"), cell_summary(new).set_index("cell_id")
    records = []
    for cell_id in new_cells.index.intersection(old_cells.index):
        before, after = old_cells.loc[cell_id], new_cells.loc[cell_id]
        record = {
            "cell_id": cell_id,
            "cell": after["cell_label"],
            "old_status": before["status"],
            "new_status": after["status"],
            "note": "",
        }
        old_device, new_device = device_label(before["gpu_name"]), device_label(after["gpu_name"])
        if old_device != new_device:  # different hardware: the numbers say nothing about a regression
            record["note"] = f"not compared: ran on {old_device}, now on {new_device}"
            record["regressions"] = ""
            records.append(record)
            continue
        regressions = []
        if before["status"] == Status.OK and after["status"] != Status.OK:
            regressions.append(f"status {before['status']} -> {after['status']}")
        for column in MEMORY_COLUMNS:
            change = _relative(before[column], after[column])
            record[f"{column}_change"] = change
            if change is not None and change > thresholds.memory_increase:
                regressions.append(f"{column} +{change:.1%} (limit +{thresholds.memory_increase:.0%})")
        latency_change = _relative(before["e2e_latency_median_s"], after["e2e_latency_median_s"])
        record["e2e_latency_change"] = latency_change
        if latency_change is not None:
            noise = thresholds.latency_iqr_multiple * max(before["e2e_latency_iqr_s"], after["e2e_latency_iqr_s"])
            allowed = max(thresholds.latency_increase * before["e2e_latency_median_s"], noise)
            if after["e2e_latency_median_s"] - before["e2e_latency_median_s"] > allowed:
                regressions.append(f"e2e latency +{latency_change:.1%} (beyond max(5 %, 3 x IQR))")
        breaks_before, breaks_after = _graph_breaks(before["compile_counts"]), _graph_breaks(after["compile_counts"])
        if breaks_before is not None and breaks_after is not None and breaks_after > breaks_before:
            regressions.append(f"graph breaks {breaks_before} -> {breaks_after} (the cell's log gives the reasons)")
        if before["gate_status"] == "pass" and after["gate_status"] == "fail":
            regressions.append(f"drift gate now fails: {after['gate_failures']}")
        record["regressions"] = "; ".join(regressions)
        records.append(record)
    return pd.DataFrame.from_records(records, columns=COMPARISON_COLUMNS)


def _graph_breaks(counts_json: Any) -> int | None:
    """The graph breaks a compiled cell's `compile_counts` recorded; None for eager cells and for rows written
    before graph breaks were counted."""
    if not isinstance(counts_json, str):
        return None
    return json.loads(counts_json).get("graph_breaks")


def _relative(before: float, after: float) -> float | None:
    if before is None or after is None or pd.isna(before) or pd.isna(after) or before == 0:
        return None
    return float(after / before - 1)


def compare_runs(old: Path, new: Path, output: Path | None = None) -> int:
    """Print the comparison table (and write it as CSV); exit code 1 on a regression."""
    from rich.markup import escape
    from rich.table import Table

    from bench.console import console

    frames = []
    for path in (old, new):
        if not Path(path).exists():
            raise UserError(f"{path}: no such results folder or Parquet file")
        frames.append(read_results(path))
    table = compare_frames(*frames)
    if table.empty:
        raise UserError(f"{old} and {new} share no cell ids: nothing to compare")
    if (table["note"] != "").all():  # a reference from another GPU model: no verdict either way
        raise UserError(f"{old} and {new} ran on different devices ({table['note'].iloc[0]}): nothing to compare")
    if output:
        table.to_csv(output, index=False)
    view = Table(title=f"{old} -> {new}")
    for column in ("cell id", "cell", "status", "peak memory", "transformer size", "e2e latency", "regression"):
        view.add_column(column)
    for _, row in table.iterrows():
        view.add_row(
            row["cell_id"],
            escape(row["cell"]),
            f"{row['old_status']} -> {row['new_status']}",
            _percent(row["peak_reserved_bytes_change"]),
            _percent(row["transformer_tensor_bytes_change"]),
            _percent(row["e2e_latency_change"]),
            f"[red]{escape(row['regressions'])}[/]"
            if row["regressions"]
            else f"[yellow]{escape(row['note'])}[/]"
            if row["note"]
            else "[green]none[/]",
        )
    console.print(view)
    for note in measurement_footnotes(frames[1], table["cell_id"]):
        console.print(f"[yellow]{escape(note)}[/]", soft_wrap=True)
    timing = wall_time_comparison(*frames)
    if timing:
        console.print(timing)
    not_rerun = set(frames[0]["cell_id"]) - set(frames[1]["cell_id"])
    if not_rerun:  # e.g. a --quick or --select subset, or a run stopped by --max-time
        many = len(not_rerun) != 1
        console.print(
            f"{len(not_rerun)} cell{'s' * many} of {old} {'are' if many else 'is'} not in {new}: not compared",
            soft_wrap=True,
        )
    regressed = int((table["regressions"] != "").sum())
    console.print(
        f"{regressed} of {len(table)} cells regressed" if regressed else f"no regression in {len(table)} cells"
    )
    return 1 if regressed else 0


def wall_time_comparison(old: pd.DataFrame, new: pd.DataFrame) -> str | None:
    """One line on the wall time of the cells both runs ran: with N side by side in the new run (N GPUs),
    its wall time as a multiple of the old run's over N, the scaling a several-GPU run is judged by."""
    common = set(cells_that_ran(old).index) & set(cells_that_ran(new).index)
    before, after = run_times(old, common), run_times(new, common)
    if before is None or after is None:
        return None
    line = (
        f"wall time of the {len(common)} cells both runs ran: {before.busy_s:.0f} s "
        f"({before.most_at_once} at a time) -> {after.busy_s:.0f} s ({after.most_at_once} at a time)"
    )
    if after.most_at_once > before.most_at_once:
        speedup = after.most_at_once / before.most_at_once
        line += f"; new = {after.busy_s / (before.busy_s / speedup):.2f} x (old / {speedup:g})"
    return line


def _percent(value: float | None) -> str:
    return "n/a" if value is None or pd.isna(value) else f"{value:+.1%}"
