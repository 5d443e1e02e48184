"""Per-cell summaries of a results table, shared by the console, the HTML report, compare and notebooks.

Latency: the median of the per-(prompt, seed) medians, and the median of their IQRs. Drift: the mean over
prompts x seeds with a 95% confidence interval (Student t). Memory is a per-cell measurement.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats as scipy_stats

from bench.cells import ID_DEFAULTS
from bench.contract import Status, worst_status
from bench.drift import METRICS
from bench.heartbeat import warmup_step_speed

CELL_COLUMNS = (
    "cell_label", "method", "method_family", "method_options", "dtype", "threshold", "compile", "fullgraph", "inductor", "regional",
    "components", "placement", "attention", "attention_backend", "dynamic", "batch_size", "per_resolution", "weights", "gpu_name", "device", "resident_reserved_bytes", "peak_reserved_bytes",
    "peak_allocated_bytes", "dequantized_reserved_bytes", "transformer_footprint_bytes", "transformer_tensor_bytes",
    "gpu_memory_note", "load_s", "quantize_s", "warmup_s", "warmup_step_median_s", "compile_s", "timed_compiles", "compile_counts", "inductor_cache_at_start", "prepare_s", "import_s", "cell_wall_s",
    "extrapolated_to_steps", "gate_status", "gate_failures",
    "warmup_peak_reserved_bytes", "energy_j_per_image", "energy_j_per_step", "avg_power_w", "gpu_sm_clock_mhz",
    "gpu_power_limit_w", "gpu_temperature_c", "gpu_throttle_reasons", "gpu_other_processes", "energy_note", "value_dependent_latency",
    "int8_outlier_column_fraction", "quantization_effective", "quantization_note",
    "lora", "lora_rank", "lora_adapter", "lora_load_s", "lora_fuse_s", "lora_swap_s",
)  # fmt: skip


def mean_ci(values: pd.Series) -> tuple[float | None, float | None, float | None]:
    """Mean and 95% confidence interval of the finite-or-infinite values; None where there are none."""
    data = values.dropna().astype(float).to_numpy()
    if data.size == 0:
        return None, None, None
    mean = float(data.mean())
    if data.size < 2 or not np.isfinite(data).all():
        return mean, None, None
    half = float(scipy_stats.t.ppf(0.975, data.size - 1) * data.std(ddof=1) / math.sqrt(data.size))
    return mean, mean - half, mean + half


def cell_summary(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per cell, in the order cells first appear: its axes, status, memory, latency and drift."""
    records = []
    for cell_id, rows in frame.groupby("cell_id", sort=False):
        first = rows.iloc[0]
        record = {"cell_id": cell_id, **{c: first.get(c) for c in CELL_COLUMNS}}
        record["lora"] = record["lora"] if isinstance(record["lora"], str) else "none"  # rows from before the axis
        record["status"] = worst_status(set(rows["status"]))
        errors = rows.loc[rows["status"] != Status.OK, "error"].dropna()
        record["error"] = errors.iloc[0] if len(errors) else None
        record["rows"] = len(rows)
        record["e2e_latency_median_s"] = rows["e2e_latency_median_s"].median()
        record["e2e_latency_iqr_s"] = rows["e2e_latency_iqr_s"].median()
        record["step_latency_median_s"] = rows["step_latency_median_s"].median()
        record["step_latency_iqr_s"] = rows["step_latency_iqr_s"].median()
        record["e2e_latency_extrapolated_s"] = rows["e2e_latency_extrapolated_s"].median()
        record["e2e_latency_per_image_s"] = rows["e2e_latency_per_image_s"].median()
        record["images_per_s"] = rows["images_per_s"].median()
        ok = rows[rows["status"] == Status.OK]
        for metric in METRICS:
            mean, low, high = mean_ci(ok[metric]) if metric in ok else (None, None, None)
            record[metric], record[f"{metric}_ci_low"], record[f"{metric}_ci_high"] = mean, low, high
        records.append(record)
    summary = pd.DataFrame.from_records(records)
    if summary.empty:
        return summary
    # baseline first, then by family and label, so every table and plot lists cells the same way
    summary = summary.sort_values(
        ["method_family", "cell_label"], key=lambda c: c.where(c != "baseline", ""), kind="stable"
    )
    return _against_lora_none(_against_eager(_against_baseline(summary.reset_index(drop=True))))


def device_label(gpu_name: object) -> str:
    """What a row ran on, for grouping: its GPU name, or "CPU"."""
    return gpu_name if isinstance(gpu_name, str) else "CPU"


def _against_baseline(summary: pd.DataFrame) -> pd.DataFrame:
    """Speedup and memory saving of each cell against the uncompiled baseline cell on the same placement, the
    same device (GPU name, so cells from different GPUs are never compared with each other), the same batch
    size and LoRA adapter in the same mode (`unfused` for `hotswap`), with `native` attention where the run has
    it (as drift is scored)."""
    summary = summary.copy()
    summary["speedup"] = np.nan
    summary["memory_saving"] = np.nan
    summary["transformer_size_ratio"] = np.nan
    baselines = summary[
        (summary["method"] == "baseline") & (summary["compile"] == "off") & (summary["status"] == Status.OK)
    ]
    for index, cell in summary.iterrows():
        candidates = baselines[
            (baselines["placement"] == cell["placement"])
            & (baselines["gpu_name"].map(device_label) == device_label(cell["gpu_name"]))
            & (baselines["lora"] == eager_lora_mode(cell["lora"]))  # against bf16 with its adapter, same mode
            & (baselines["lora_rank"].fillna(0) == (0 if pd.isna(cell["lora_rank"]) else cell["lora_rank"]))
            & (images_per_call(baselines) == (1 if pd.isna(cell["batch_size"]) else cell["batch_size"]))
        ]
        if candidates.empty:
            continue
        native = candidates[ran_native_attention(candidates)]
        base = (native if not native.empty else candidates).iloc[0]
        summary.loc[index, "speedup"] = base["e2e_latency_median_s"] / cell["e2e_latency_median_s"]
        summary.loc[index, "memory_saving"] = 1 - cell["peak_reserved_bytes"] / base["peak_reserved_bytes"]
        summary.loc[index, "transformer_size_ratio"] = (
            cell["transformer_tensor_bytes"] / base["transformer_tensor_bytes"]
        )
    return summary


def eager_lora_mode(mode: object) -> object:
    """The LoRA mode of a cell's uncompiled counterparts: `unfused` for `hotswap` (compiled only; its swapped-in
    adapter is loaded unfused, as an `unfused` cell's), else the mode itself."""
    return "unfused" if mode == "hotswap" else mode


def images_per_call(cells: pd.DataFrame) -> pd.Series:
    """Each cell's `batch_size`; 1 for rows from before the axis."""
    return cells["batch_size"].fillna(1).astype(int)


def ran_native_attention(cells: pd.DataFrame) -> pd.Series:
    """Whether each cell ran torch's own attention (`native`, as rows from before the axis did)."""
    return cells["attention"].fillna("native") == "native"


# what makes a compiled cell's eager twin: the same cell with compile off (and the same device)
EAGER_TWIN_COLUMNS = (
    "method", "method_options", "dtype", "threshold", "components", "placement", "attention", "batch_size", "lora",
    "lora_rank",
)  # fmt: skip
# what makes a LoRA cell's twin without an adapter: every axis but `lora` and `lora_rank` (and the same device)
LORA_TWIN_COLUMNS = (
    "method", "method_options", "dtype", "threshold", "compile", "fullgraph", "inductor", "regional", "dynamic",
    "components", "placement", "attention", "batch_size",
)  # fmt: skip


def _against_lora_none(summary: pd.DataFrame) -> pd.DataFrame:
    """`lora_step_overhead` and `lora_e2e_overhead` of each LoRA cell: its median step (end-to-end) time over
    that of the same cell with `lora = none` on the same device, minus 1 (0.25: 25 % slower), where that cell is
    `ok`."""

    def twin_key(cell: pd.Series) -> tuple:
        axes = tuple(None if _missing(cell.get(column)) else cell[column] for column in LORA_TWIN_COLUMNS)
        return (*axes, device_label(cell["gpu_name"]))

    summary = summary.copy()
    without = {
        twin_key(cell): cell
        for _, cell in summary[(summary["lora"] == "none") & (summary["status"] == Status.OK)].iterrows()
    }
    for column, latency in (
        ("lora_step_overhead", "step_latency_median_s"),
        ("lora_e2e_overhead", "e2e_latency_median_s"),
    ):
        summary[column] = [
            cell[latency] / without[twin_key(cell)][latency] - 1
            if cell["lora"] != "none" and twin_key(cell) in without
            else np.nan
            for _, cell in summary.iterrows()
        ]
    return summary


def _missing(value: object) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _against_eager(summary: pd.DataFrame) -> pd.DataFrame:
    """`eager_step_latency_median_s` of each compiled cell: the median step of the same cell uncompiled (same
    attention backend, batch size and adapter) on the same device, where the summary has it `ok`, so a compile
    that did not pay off shows."""

    def twin_key(cell: pd.Series) -> tuple:
        # rows from before an axis read as its default (native attention, one image, no adapter)
        axes = {c: ID_DEFAULTS.get(c) if _missing(cell[c]) else cell[c] for c in EAGER_TWIN_COLUMNS}
        axes["lora"] = eager_lora_mode(axes["lora"])
        return (*axes.values(), device_label(cell["gpu_name"]))

    summary = summary.copy()
    eager_steps: dict[tuple, float] = {}
    for _, cell in summary[(summary["compile"] == "off") & (summary["status"] == Status.OK)].iterrows():
        eager_steps.setdefault(twin_key(cell), cell["step_latency_median_s"])
    summary["eager_step_latency_median_s"] = [
        eager_steps.get(twin_key(cell), np.nan) if cell["compile"] != "off" else np.nan
        for _, cell in summary.iterrows()
    ]
    return summary


# (column, the phase as a cell's log names it, what it covers)
TIME_PHASES = (
    ("import_s", "imports", "cell start to its libraries and model classes imported"),
    ("prepare_s", "prepare", "preparing (writing GGUF files, pre-quantized checkpoints; cached after the first time)"),
    ("quantize_s", "quantize", "loading the quantized components (quantizing happens here)"),
    ("serialize_save_s", "save", "serialization round trip: save"),
    ("serialize_reload_s", "reload", "serialization round trip: reload"),
    ("load_s", "load and place", "loading the rest of the pipeline and placing it"),
    ("warmup_s", "warm-up", "warm-up generations (torch.compile compiles here)"),
    (
        "timed_s",
        "timed runs",
        "timed generations (median x repeats per prompt and seed, and the `resolutions` sweep)",
    ),
)


def phases_run(cell: pd.Series) -> str:
    """How long a cell's process ran and the phases it recorded, e.g. `ran 1500 s: imports 7.1 s, quantize
    23.8 s, load and place 3.2 s, warm-up 1065.8 s (its steps after the first: median 55.204 s)`; "" for a cell
    that did not run."""
    if pd.isna(cell.get("cell_wall_s")):
        return ""
    done = [
        f"{name} {cell[column]:.1f} s"
        + (warmup_step_speed(cell.get("warmup_step_median_s")) if column == "warmup_s" else "")
        for column, name, _ in TIME_PHASES
        if pd.notna(cell.get(column))
    ]  # the warm-up's step time: how fast the model ran, even when the timed runs never ended
    return f"ran {cell['cell_wall_s']:.0f} s" + (f": {', '.join(done)}" if done else "")


def cells_that_ran(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per cell whose process ran (it has a wall time), indexed by cell id."""
    return frame[frame["cell_wall_s"].notna()].groupby("cell_id", sort=False).first()


def time_breakdown(frame: pd.DataFrame) -> pd.DataFrame:
    """Where the cells' wall time went, summed over every cell that ran: one row per phase (seconds and
    share of the cells' wall time), then the rest of the cell processes that timed their generations
    (interpreter start, saving images and latents, measuring, exit: the harness's own cost inside the cell),
    and last the rest of those that did not (the phase each was in when it failed or was killed)."""
    ran = frame[frame["cell_wall_s"].notna()]
    cells = cells_that_ran(frame)
    timed = (ran["e2e_latency_median_s"] * ran["repeats"]).groupby(ran["cell_id"], sort=False).sum()
    if "per_resolution" in cells:  # the generations of the `[generation] resolutions` sweep, after those
        timed = timed.add(cells["per_resolution"].map(_resolution_sweep_s), fill_value=0.0)
    phases = cells[[column for column, _, _ in TIME_PHASES if column != "timed_s"]].fillna(0)
    phases["timed_s"] = timed.reindex(cells.index, fill_value=0.0)
    rest = cells["cell_wall_s"] - phases.sum(axis=1)
    finished = ran["e2e_latency_median_s"].notna().groupby(ran["cell_id"], sort=False).any()
    records = [{"phase": label, "seconds": float(phases[column].sum())} for column, _, label in TIME_PHASES]
    records.append({"phase": "rest of the cell process (interpreter start, saving outputs, exit)",
                    "seconds": float(rest[finished].sum())})  # fmt: skip
    records.append({"phase": "rest of the cells that timed nothing (the phase each was in when it failed or was killed)",
                    "seconds": float(rest[~finished].sum())})  # fmt: skip
    wall = float(cells["cell_wall_s"].sum())
    breakdown = pd.DataFrame.from_records(records)
    breakdown["share"] = breakdown["seconds"] / wall if wall > 0 else np.nan
    return breakdown


def _resolution_sweep_s(per_resolution: Any) -> float:
    """Seconds of the generations of the `[generation] resolutions` sweep (each size's, the first's included:
    the sweep runs after the cell's own timed generations)."""
    if not isinstance(per_resolution, str):
        return 0.0
    return float(sum(sum(size["e2e_latency_s"]) for size in json.loads(per_resolution)))


@dataclass(frozen=True)
class RunTimes:
    """How long cells took together: `cell_s` summed over the cells, `busy_s` the wall time while at least
    one of them ran (gaps between the invocations of a resumed run left out), `most_at_once` the most that
    ran side by side (1: one after another; N with N GPUs kept busy)."""

    cells: int
    cell_s: float
    busy_s: float
    most_at_once: int


def run_times(frame: pd.DataFrame, cell_ids: set[str] | None = None) -> RunTimes | None:
    """The RunTimes of the cells that ran (of `cell_ids` only, if given); None when none ran. Each cell's
    interval ends at its row's timestamp (written when it finished, to the second) and lasts `cell_wall_s`."""
    ran = cells_that_ran(frame)
    if cell_ids is not None:
        ran = ran[ran.index.isin(cell_ids)]
    if ran.empty:
        return None
    finished = pd.to_datetime(ran["timestamp_utc"], utc=True)
    ends = (finished - pd.Timestamp(0, tz="UTC")).dt.total_seconds().to_numpy()
    starts = ends - ran["cell_wall_s"].to_numpy()
    busy, _ = _sweep(starts, ends)
    # a finish time is known to the second: a second of overlap is rounding, not cells side by side
    _, most = _sweep(np.minimum(starts + 1.0, ends), ends)
    return RunTimes(len(ran), float(ran["cell_wall_s"].sum()), busy, most)


def _sweep(starts: np.ndarray, ends: np.ndarray) -> tuple[float, int]:
    """The time covered by the intervals, and the most of them that overlap."""
    edges = sorted([(float(t), 1) for t in starts] + [(float(t), -1) for t in ends])  # an end first on a tie
    covered, running, most, since = 0.0, 0, 0, 0.0
    for time, step in edges:
        if running == 0:
            since = time
        running += step
        most = max(most, running)
        if running == 0:
            covered += time - since
    return covered, most
