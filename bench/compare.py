"""`quantbench compare OLD NEW`: per-cell deltas between two runs, with noise-aware regression flags.

Defaults (`Thresholds`): the generation's peak reserved memory or the transformer's stored size more than +2 % (they
barely move between runs on one GPU model: in an H200 A/A pair bf16 and nf4 peaks were identical to the byte, a torchao
cell quantized on the GPU through a device map 44 MiB apart); the resident figure (the reserved peak while loading,
which the generation's peak, measured after the warm-up with the peaks reset, does not include) more than +10 %:
on-GPU quantization while loading leaves it to the allocator's caching (torchao float8wo through a device map: 4.8 %
apart between two runs of one harness commit, its generation peak 0.4 %);
drift beyond the cell's gate (a gate that passed and now fails); more graph breaks in a compiled cell (where both
rows counted them); a status that was ok and is not. Exit code 1 when any cell regressed.

Latency rule. Each run pools the cell's samples over its ok rows: every timed denoising step (`step_times_s`,
steps x repeats x prompts x seeds of them), or, where a run has fewer than `latency_min_samples` steps, every
end-to-end time (`e2e_times_s`). The change is median(new) / median(old) - 1, with a 95 % percentile bootstrap
interval (scipy.stats.bootstrap, the two runs resampled independently, `latency_resamples` resamples, seeded so
a verdict is reproducible). A cell regressed when the whole interval lies above +`latency_increase` (5 %): the
change is then larger than the threshold with 95 % confidence (one-sided 97.5 %). A slowdown smaller than the
threshold is never flagged, and one just above it only when the samples pin it down, so the threshold is the
smallest slowdown worth a red build, not a noise allowance. Samples within a run are treated as independent;
drift between runs (a busier machine, clocks) that shifts every sample is what the threshold absorbs.
Rows written before per-sample columns existed (schema 1), and cells with fewer than `latency_min_samples` samples of
either kind, fall back to the old rule, and the table says which of the two: the e2e median beyond max(5 %, 3 x the
larger IQR). `benchmarks/regression_detection.py` measures the rule's false alarms (A/A runs) and its detection of
injected slowdowns (`QUANTBENCH_INJECT_FAULT=slow=10%`).

When a cell regressed, compare also prints the library versions (and lock hash, harness commit) that differ
between the two runs.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bench.atomic import write_text_atomic
from bench.contract import Status
from bench.errors import UserError
from bench.measure import measurement_footnotes
from bench.store import read_results
from bench.summary import cell_summary, cells_that_ran, device_label, run_times


@dataclass(frozen=True)
class Thresholds:
    memory_increase: float = 0.02  # the generation's peak, the transformer's stored size
    resident_increase: float = 0.10  # the reserved peak while loading (module docstring: why wider)
    latency_increase: float = 0.05  # the smallest slowdown flagged: the whole interval must lie above it
    latency_confidence: float = 0.95
    latency_resamples: int = 2000
    latency_min_samples: int = 5  # per run and kind of sample; fewer: the next kind, then the old rule
    latency_seed: int = 0
    latency_iqr_multiple: float = 3.0  # the old rule, for rows without samples


@dataclass(frozen=True)
class LatencyChange:
    """A cell's latency change, new / old - 1 of the medians, with its bootstrap interval."""

    samples: str  # what it was computed from, e.g. "28 -> 28 steps"
    change: float
    low: float
    high: float

    def regressed(self, thresholds: Thresholds) -> bool:
        return self.low > thresholds.latency_increase

    def describe(self) -> str:
        return f"{self.change:+.1%} [{self.low:+.1%}, {self.high:+.1%}]"


SAMPLE_COLUMNS = (("step_times_s", "steps"), ("e2e_times_s", "e2e times"))
OLD_RULE = "medians and IQR"  # a cell's latency_samples under the old rule: f"{OLD_RULE}: {why}"
NO_SAMPLES = "rows without per-sample times (written before results schema 2)"


def pooled_samples(rows: pd.DataFrame, column: str) -> np.ndarray:
    """Every sample of `column` (a list per row) in the cell's ok rows; empty for rows written without it."""
    if column not in rows:
        return np.empty(0)
    lists = _sample_lists(rows, column)
    return np.concatenate([np.asarray(values, dtype=float) for values in lists]) if lists else np.empty(0)


def _sample_lists(rows: pd.DataFrame, column: str) -> list[Any]:
    """The per-row sample lists of `column` in the cell's ok rows (rows written without it have none)."""
    return [values for values in rows.loc[rows["status"] == Status.OK, column] if _is_list(values)]


def _is_list(values: Any) -> bool:
    return values is not None and not (isinstance(values, float) and np.isnan(values))


def why_old_rule(old_rows: pd.DataFrame, new_rows: pd.DataFrame, thresholds: Thresholds) -> str:
    """Why a cell's latency falls back to the old rule: rows written without samples, or too few of them (a
    generation's first step is no sample, so 2 steps x 2 repeats give 2 step samples)."""
    if not all(
        column in rows and _sample_lists(rows, column) for rows in (old_rows, new_rows) for column, _ in SAMPLE_COLUMNS
    ):
        return NO_SAMPLES
    steps, e2e = (
        min(len(pooled_samples(rows, column)) for rows in (old_rows, new_rows)) for column, _ in SAMPLE_COLUMNS
    )
    if max(steps, e2e) >= thresholds.latency_min_samples:  # enough of a kind, so its old median was 0
        return "the old run's median is 0 s"
    return (
        f"{steps} step samples and {e2e} end-to-end times, fewer than the {thresholds.latency_min_samples} the latency"
        " rule needs: raise num_inference_steps or repeats"
    )


def latency_change(old_rows: pd.DataFrame, new_rows: pd.DataFrame, thresholds: Thresholds) -> LatencyChange | None:
    """The change of the first kind of sample both runs have enough of, with its bootstrap interval; None when
    neither kind has enough (the caller then applies the old rule)."""
    from scipy.stats import bootstrap

    for column, kind in SAMPLE_COLUMNS:
        old, new = pooled_samples(old_rows, column), pooled_samples(new_rows, column)
        if min(len(old), len(new)) < thresholds.latency_min_samples or np.median(old) <= 0:
            continue
        interval = bootstrap(
            (old, new),
            _median_ratio,
            vectorized=True,
            paired=False,
            confidence_level=thresholds.latency_confidence,
            n_resamples=thresholds.latency_resamples,
            method="percentile",
            random_state=np.random.default_rng(thresholds.latency_seed),  # (`rng` only from scipy 1.15)
        ).confidence_interval
        return LatencyChange(
            f"{len(old)} -> {len(new)} {kind}",
            float(_median_ratio(old, new, axis=-1)),
            float(interval.low),
            float(interval.high),
        )
    return None


def _median_ratio(old: np.ndarray, new: np.ndarray, axis: int) -> np.ndarray:
    return np.median(new, axis=axis) / np.median(old, axis=axis) - 1


MEMORY_COLUMNS = ("peak_reserved_bytes", "resident_reserved_bytes", "transformer_tensor_bytes")
COMPARISON_COLUMNS = (
    "cell_id", "cell", "old_status", "new_status", "note",
    *(f"{column}_change" for column in MEMORY_COLUMNS), "e2e_latency_change",
    "latency_samples", "latency_change", "latency_change_low", "latency_change_high",
    "regressions",
)  # fmt: skip


def compare_frames(old: pd.DataFrame, new: pd.DataFrame, thresholds: Thresholds = Thresholds()) -> pd.DataFrame:
    """One row per cell present in both runs: old and new values, deltas, and the regressions found."""
    old_cells, new_cells = cell_summary(old).set_index("cell_id"), cell_summary(new).set_index("cell_id")
    old_rows, new_rows = dict(tuple(old.groupby("cell_id"))), dict(tuple(new.groupby("cell_id")))
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
            limit = thresholds.resident_increase if column == "resident_reserved_bytes" else thresholds.memory_increase
            if change is not None and change > limit:
                regressions.append(f"{column} +{change:.1%} (limit +{limit:.0%})")
        record["e2e_latency_change"] = _relative(before["e2e_latency_median_s"], after["e2e_latency_median_s"])
        regressions.extend(_latency_regression(record, before, after, old_rows[cell_id], new_rows[cell_id], thresholds))
        breaks_before, breaks_after = _graph_breaks(before["compile_counts"]), _graph_breaks(after["compile_counts"])
        if breaks_before is not None and breaks_after is not None and breaks_after > breaks_before:
            regressions.append(f"graph breaks {breaks_before} -> {breaks_after} (the cell's log gives the reasons)")
        if before["gate_status"] == "pass" and after["gate_status"] == "fail":
            regressions.append(f"drift gate now fails: {after['gate_failures']}")
        record["regressions"] = "; ".join(regressions)
        records.append(record)
    return pd.DataFrame.from_records(records, columns=COMPARISON_COLUMNS)


def _latency_regression(
    record: dict[str, Any],
    before: pd.Series,
    after: pd.Series,
    old_rows: pd.DataFrame,
    new_rows: pd.DataFrame,
    thresholds: Thresholds,
) -> list[str]:
    """Fill the record's latency columns; the latency regression found, if any (module docstring: the rule)."""
    change = latency_change(old_rows, new_rows, thresholds)
    if change is not None:
        record["latency_samples"] = change.samples
        record["latency_change"], record["latency_change_low"], record["latency_change_high"] = (
            change.change,
            change.low,
            change.high,
        )
        if change.regressed(thresholds):
            return [
                f"latency {change.describe()} ({change.samples}; the {thresholds.latency_confidence:.0%} interval"
                f" lies above +{thresholds.latency_increase:.0%})"
            ]
        return []
    old_change = record["e2e_latency_change"]
    if old_change is None:
        return []
    record["latency_samples"] = f"{OLD_RULE}: {why_old_rule(old_rows, new_rows, thresholds)}"
    record["latency_change"] = old_change
    noise = thresholds.latency_iqr_multiple * max(before["e2e_latency_iqr_s"], after["e2e_latency_iqr_s"])
    allowed = max(thresholds.latency_increase * before["e2e_latency_median_s"], noise)
    if after["e2e_latency_median_s"] - before["e2e_latency_median_s"] > allowed:
        return [
            f"e2e latency {old_change:+.1%} (beyond max({thresholds.latency_increase:.0%},"
            f" {thresholds.latency_iqr_multiple:g} x IQR); {OLD_RULE})"
        ]
    return []


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
    ran_in_both = (table["old_status"] == Status.OK) & (table["new_status"] == Status.OK) & (table["note"] == "")
    if not (ran_in_both | (table["regressions"] != "")).any():  # e.g. every shared cell skipped on this machine
        statuses = ", ".join(
            f"{count} {pair}"
            for pair, count in (table["old_status"] + " -> " + table["new_status"]).value_counts().items()
        )
        raise UserError(f"{old} and {new}: no cell ran (status ok) on the same device in both ({statuses}): no verdict")
    if output:
        _write_csv(table, output)
    view = Table(title=f"{old} -> {new}")
    for column in ("cell id", "cell", "status", "peak memory", "transformer size", "latency [95 % interval]",
                   "regression"):  # fmt: skip
        view.add_column(column)
    for _, row in table.iterrows():
        view.add_row(
            row["cell_id"],
            escape(row["cell"]),
            f"{row['old_status']} -> {row['new_status']}",
            _percent(row["peak_reserved_bytes_change"]),
            _percent(row["transformer_tensor_bytes_change"]),
            latency_text(row),
            f"[red]{escape(row['regressions'])}[/]"
            if row["regressions"]
            else f"[yellow]{escape(row['note'])}[/]"
            if row["note"]
            else "[green]none[/]",
        )
    console.print(view)
    for note in measurement_footnotes(frames[1], table["cell_id"]):
        console.print(f"[yellow]{escape(note)}[/]", soft_wrap=True)
    compared = frames[1][frames[1]["cell_id"].isin(table.loc[ran_in_both, "cell_id"])]
    if compared["gpu_name"].isna().any():  # skipped and unsupported cells have none on a GPU too
        console.print(
            "[yellow]cells that ran on a CPU: their latency moves with whatever else the machine runs; "
            "compare runs from an otherwise idle machine before reading a latency regression[/]",
            soft_wrap=True,
        )
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
    old_rule = table["latency_samples"].dropna().astype(str)  # float NaN only when no cell had a latency
    for why, cells in old_rule[old_rule.str.startswith(f"{OLD_RULE}: ")].value_counts(sort=False).items():
        console.print(
            f"latency of {cells} cell{'s' * (cells != 1)} judged by the old rule, e2e median beyond max(5 %, 3 x IQR):"
            f" {why.removeprefix(f'{OLD_RULE}: ')}",
            soft_wrap=True,
        )
    regressed = int((table["regressions"] != "").sum())
    console.print(
        f"{regressed} of {len(table)} cells regressed" if regressed else f"no regression in {len(table)} cells"
    )
    if regressed:
        console.print(environment_difference(*frames), soft_wrap=True)
    return 1 if regressed else 0


def _write_csv(table: pd.DataFrame, output: Path) -> None:
    """The comparison as CSV at `output`, its folder created if missing (as `report -o` does), written atomically."""
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(output, table.to_csv(index=False))
    except OSError as error:
        raise UserError(f"{output}: cannot write the comparison: {error.strerror or error}") from None


def latency_text(row: pd.Series) -> str:
    """The latency change with its interval ("+10.2 % [+8.1 %, +12.4 %]", "+3.0 % (medians)" by the old rule)."""
    change = row.get("latency_change")
    if change is None or pd.isna(change):
        return "n/a"
    low, high = row.get("latency_change_low"), row.get("latency_change_high")
    if low is None or pd.isna(low):
        return f"{change:+.1%} (medians)"
    return LatencyChange("", change, low, high).describe()


def environment_difference(old: pd.DataFrame, new: pd.DataFrame) -> str:
    """One line: the library versions, lock hash and harness commit that differ between the two runs (a run whose
    rows differ among themselves shows each value: "a, b"), then apart those only one run records (rows from
    before a column existed, or a library installed on one side only)."""
    from bench.environment import LIBRARIES, differing_versions, version_field

    names = {version_field(name): name for name in ("python", *LIBRARIES)} | {
        "lock_sha256": "lock", "harness_commit": "harness commit"
    }  # fmt: skip
    before, after = _run_environment(old, names), _run_environment(new, names)
    differing = differing_versions(before, after)
    if before["harness_commit"] != after["harness_commit"]:
        differing["harness_commit"] = (before["harness_commit"], after["harness_commit"])
    if not differing:
        return "the two runs have the same library versions, lock and harness commit"
    both = [f"{names.get(field, field)} {a} -> {b}" for field, (a, b) in differing.items() if a and b]
    one = [
        f"{names.get(field, field)} ({'old' if a else 'new'}: {a or b})"
        for field, (a, b) in differing.items()
        if not (a and b)
    ]
    lines = [f"differing between the two runs: {', '.join(both)}"] if both else []
    lines += [f"recorded by one run only: {', '.join(one)}"] if one else []
    return "; ".join(lines)


def _run_environment(rows: pd.DataFrame, columns: Iterable[str]) -> dict[str, str | None]:
    """Each of `columns` over a run's rows: its values, sorted and joined; None where no row has one."""
    values = {}
    for column in columns:
        known = sorted({str(value) for value in rows[column].dropna()}) if column in rows else []
        values[column] = ", ".join(known) or None
    return values


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
