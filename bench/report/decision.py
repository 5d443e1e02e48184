"""What to pick: the fastest finished cell that fits each GPU memory budget, the largest batch each method fits
in it (runs with a `batch_size` axis), and the Pareto front.

A cell fits a card when its peak reserved memory plus the CUDA context (the driver's context, cuBLAS and
cuDNN handles and loaded kernels, which PyTorch's allocator does not count) fits the card's memory. The
context is measured where a run recorded it (`cuda_context_bytes`, NVML's per-process use less PyTorch's
reserved memory), otherwise `DEFAULT_CONTEXT_BYTES` stands in and the report says so.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pandas as pd

from bench.contract import Status
from bench.summary import images_per_call, ran_native_attention

GIB = 1024**3
DEFAULT_BUDGETS_GB = (80, 48, 24, 16, 12)
DEFAULT_CONTEXT_BYTES = GIB  # what a CUDA 12 context with cuBLAS/cuDNN takes on recent GPUs: 0.5-1 GiB
CONTEXT_COLUMN = "cuda_context_bytes"
DRIFT_PREFERENCE = (("lpips_alex", "LPIPS (AlexNet)"), ("latent_rel_l2", "latent relative L2"), ("ssim", "1 - SSIM"))


@dataclass(frozen=True)
class Pick:
    """One cell chosen for a budget, with what it saves against the bf16 baseline run eagerly."""

    cell_id: str
    label: str
    needs_bytes: float  # peak reserved + CUDA context
    step_s: float
    compile_s: float | None
    memory_saved_bytes: float | None  # against bf16 eager, same device and placement
    memory_saved_share: float | None
    speedup: float | None  # bf16 eager step time / this cell's step time
    is_baseline: bool

    def facts(self) -> str:
        """E.g. `needs 20.8 GiB · 0.193 s/step · compile 77 s · saves 16.1 GiB (44%), 0.95× the speed of bf16
        eager`; a cell that needs more memory than bf16 says how much more."""
        parts = [f"needs {size_text(self.needs_bytes)}", f"{self.step_s:.3g} s/step"]
        if self.compile_s is not None:
            parts.append(f"compile {self.compile_s:.0f} s")
        if self.is_baseline:
            parts.append("bf16 itself")
        elif self.speedup is not None and self.memory_saved_bytes is not None:
            saved = self.memory_saved_bytes
            memory = (
                f"saves {size_text(saved)} ({self.memory_saved_share:.0%})"
                if saved >= 0
                else f"uses {size_text(-saved)} more than bf16 (+{-self.memory_saved_share:.0%})"
            )
            parts.append(f"{memory}, {self.speedup:.2f}× the speed of bf16 eager")
        return " · ".join(parts)


def size_text(size_bytes: float) -> str:
    """Bytes as GiB with one decimal, or as MiB below 1 GiB (tiny models)."""
    return f"{size_bytes / GIB:.1f} GiB" if size_bytes >= GIB else f"{size_bytes / 1024**2:.0f} MiB"


@dataclass(frozen=True)
class BudgetRow:
    budget_gb: int
    eager: Pick | None
    compiled: Pick | None


@dataclass(frozen=True)
class BatchPick:
    """The largest batch of a method that fits a budget, from the cell with the most images per second at it."""

    budget_gb: int
    method: str  # the method with its options, e.g. `torchao[float8dq]`
    batch_size: int
    images_per_s: float | None
    label: str


@dataclass(frozen=True)
class FrontPoint:
    number: int
    cell_id: str
    label: str
    memory: float  # in the unit of the front's memory axis
    value: float  # step seconds or drift


@dataclass(frozen=True)
class Decision:
    """The what-to-pick section of one device's cells."""

    device: str
    budgets: list[BudgetRow]
    context_gib: float
    context_measured: bool
    gpu_memory: bool  # False on runs that measured no GPU memory (CPU): nothing can be said to fit
    real_weights: bool
    gated: bool  # only cells passing the drift gates were candidates
    smallest: Pick | None  # the cell needing least memory, for budgets nothing fits
    eager_ran: bool  # any candidate cell eager / compiled at all: "nothing fits" only says so when one did
    compiled_ran: bool
    speed_front: list[FrontPoint]
    drift_front: list[FrontPoint]
    drift_label: str | None
    memory_label: str
    largest_batches: list[BatchPick]  # empty unless the run had more than one batch size


def decision_table(decision: Decision) -> pd.DataFrame:
    """The what-to-pick table as a DataFrame (notebooks): one row per budget, the picks and their facts."""
    return pd.DataFrame(
        [
            {
                "card": f"{row.budget_gb} GB",
                "fastest eager": row.eager.label if row.eager else none_text(decision.eager_ran, "eager"),
                "eager": row.eager.facts() if row.eager else "",
                "fastest compiled": row.compiled.label
                if row.compiled
                else none_text(decision.compiled_ran, "compiled"),
                "compiled": row.compiled.facts() if row.compiled else "",
            }
            for row in decision.budgets
        ]
    )


def none_text(ran: bool, mode: str) -> str:
    """What a budget's empty pick says: nothing fits, or no cell of that mode was a candidate at all."""
    return "nothing fits" if ran else f"no {mode} cell finished"


def front_table(front: list[FrontPoint], memory_label: str, value_label: str) -> pd.DataFrame:
    """A Pareto front as a DataFrame, numbered as in the plots."""
    return pd.DataFrame(
        [{"#": p.number, "cell": p.label, memory_label: round(p.memory, 2), value_label: p.value} for p in front]
    ).set_index("#")


def pareto_front(x: np.ndarray, y: np.ndarray) -> list[int]:
    """Indices of points no other point beats on both x and y (both lower is better), by rising x."""
    order = np.lexsort((y, x))
    front, best = [], np.inf
    for i in order:
        if y[i] < best:
            front.append(int(i))
            best = y[i]
    return front


def step_seconds(cells: pd.DataFrame) -> pd.Series:
    """A cell's median denoising step, or its end-to-end time where steps were not timed."""
    return cells["step_latency_median_s"].fillna(cells["e2e_latency_median_s"])


def context_bytes(frame: pd.DataFrame, cells: pd.DataFrame) -> tuple[pd.Series, bool]:
    """The CUDA context of each cell: measured by its run, else the median measured on the device's other
    cells, else the default; and whether any was measured."""
    if CONTEXT_COLUMN in frame and frame[CONTEXT_COLUMN].notna().any():
        measured = frame.groupby("cell_id")[CONTEXT_COLUMN].median()
        per_cell = cells["cell_id"].map(measured)
        return per_cell.fillna(per_cell.median()), True
    return pd.Series(float(DEFAULT_CONTEXT_BYTES), index=cells.index), False


def is_synthetic_block_gguf(options: object) -> bool:
    """GGUF cells whose blocks hold random values rather than the weights quantized: no drift view shows them."""
    return isinstance(options, str) and json.loads(options).get("synthetic_blocks") is True


def drift_view(cells: pd.DataFrame) -> pd.DataFrame:
    """The cells a drift plot or front may show: real weights, and no synthetic-block GGUF."""
    return cells[(cells["weights"] != "synthetic") & ~cells["method_options"].map(is_synthetic_block_gguf)]


def drift_axis(cells: pd.DataFrame) -> tuple[pd.Series, str] | None:
    """The first drift metric with values: LPIPS, else latent relative L2, else 1 - SSIM."""
    for metric, label in DRIFT_PREFERENCE:
        if metric in cells and cells[metric].notna().any():
            values = 1 - cells[metric] if metric == "ssim" else cells[metric]
            return values, f"{label} vs reference (lower is closer)"
    return None


def decide(frame: pd.DataFrame, cells: pd.DataFrame, device: str, budgets_gb: tuple[int, ...]) -> Decision:
    """The picks per budget and the Pareto fronts of `cells` (one device's summary rows)."""
    ok = cells[(cells["status"] == Status.OK) & step_seconds(cells).notna()].copy()
    gpu_memory = bool(ok["peak_reserved_bytes"].notna().any())
    context, measured = context_bytes(frame, ok)
    ok["needs"] = ok["peak_reserved_bytes"] + context
    ok["step"] = step_seconds(ok)
    real = bool((ok["weights"] != "synthetic").any())
    gated = real and bool(ok["gate_status"].notna().any())
    candidates = ok[ok["gate_status"] == "pass"] if gated else ok
    candidates = candidates[candidates["needs"].notna()]
    base = _bf16_eager(ok)

    def pick(chosen: pd.Series) -> Pick:
        saved = speed = share = None
        if base is not None:
            saved = base["peak_reserved_bytes"] - chosen["peak_reserved_bytes"]
            share = 1 - chosen["peak_reserved_bytes"] / base["peak_reserved_bytes"]
            speed = base["step"] / chosen["step"]
        return Pick(
            cell_id=chosen["cell_id"],
            label=chosen["cell_label"],
            needs_bytes=chosen["needs"],
            step_s=chosen["step"],
            compile_s=None if pd.isna(chosen["compile_s"]) else float(chosen["compile_s"]),
            memory_saved_bytes=saved,
            memory_saved_share=share,
            speedup=speed,
            is_baseline=base is not None and chosen["cell_id"] == base["cell_id"],
        )

    def fastest(subset: pd.DataFrame) -> Pick | None:
        return None if subset.empty else pick(subset.loc[subset["step"].idxmin()])

    rows = []
    if gpu_memory:
        for budget in budgets_gb:
            fits = candidates[candidates["needs"] <= budget * GIB]
            rows.append(
                BudgetRow(budget, fastest(fits[fits["compile"] == "off"]), fastest(fits[fits["compile"] != "off"]))
            )
    smallest = pick(candidates.loc[candidates["needs"].idxmin()]) if gpu_memory and not candidates.empty else None

    memory, what, scale, unit = memory_measure(ok)
    speed_front = _front(ok, memory, ok["step"], scale)
    viewed = drift_view(ok)
    drift = drift_axis(viewed) if not viewed.empty else None
    drift_front = [] if drift is None else _front(viewed, memory[viewed.index], drift[0], scale)
    return Decision(
        device=device,
        budgets=rows,
        context_gib=float(context.median()) / GIB if len(context) else DEFAULT_CONTEXT_BYTES / GIB,
        context_measured=measured,
        gpu_memory=gpu_memory,
        real_weights=real,
        gated=gated,
        smallest=smallest,
        eager_ran=bool((candidates["compile"] == "off").any()),
        compiled_ran=bool((candidates["compile"] != "off").any()),
        speed_front=speed_front,
        drift_front=drift_front,
        drift_label=drift[1] if drift is not None else None,
        memory_label=f"{what} ({unit})",
        largest_batches=largest_batches(candidates, budgets_gb) if gpu_memory else [],
    )


def largest_batches(candidates: pd.DataFrame, budgets_gb: tuple[int, ...]) -> list[BatchPick]:
    """For each budget and method (with its options), the largest `batch_size` among the candidate cells that
    fit, from its cell with the most images per second; [] when the cells have a single batch size."""
    batch = images_per_call(candidates) if "batch_size" in candidates else None
    if batch is None or batch.nunique() < 2:
        return []
    cells = candidates.assign(batch=batch, method_label=candidates.apply(_method_label, axis=1))
    picks = []
    for budget in budgets_gb:
        fits = cells[cells["needs"] <= budget * GIB]
        for method, group in fits.groupby("method_label", sort=False):
            largest = group[group["batch"] == group["batch"].max()]
            speed = largest["images_per_s"]
            best = largest.loc[speed.idxmax()] if speed.notna().any() else largest.iloc[0]
            rate = None if pd.isna(best["images_per_s"]) else float(best["images_per_s"])
            picks.append(BatchPick(budget, method, int(best["batch"]), rate, best["cell_label"]))
    return picks


def _method_label(cell: pd.Series) -> str:
    """`method[option values]`, as cell labels begin."""
    options = json.loads(cell["method_options"]) if isinstance(cell["method_options"], str) else {}
    return f"{cell['method']}[{','.join(map(str, options.values()))}]" if options else cell["method"]


def _bf16_eager(ok: pd.DataFrame) -> pd.Series | None:
    """The bf16 baseline run eagerly with the pipeline on the device, one image per call, `native` attention,
    without a LoRA adapter (each where the run has that cell): what savings are measured against."""
    base = ok[(ok["method"] == "baseline") & (ok["compile"] == "off") & (ok["dtype"] == "bf16")]
    for preferred in (
        lambda cells: cells["lora"] == "none",
        lambda cells: cells["placement"] == "device",
        lambda cells: images_per_call(cells) == 1,
        ran_native_attention,
    ):
        narrowed = base[preferred(base)]
        base = narrowed if not narrowed.empty else base
    return None if base.empty else base.iloc[0]


def memory_measure(cells: pd.DataFrame) -> tuple[pd.Series, str, float, str]:
    """What memory the cells are compared by, in bytes: peak reserved GPU memory, else (CPU runs) the
    transformer's stored size; with its name, and the unit to show it in (GiB at real size, MiB below 1 GiB)."""
    if cells["peak_reserved_bytes"].notna().any():
        values, what = cells["peak_reserved_bytes"], "peak reserved GPU memory"
    else:
        values, what = cells["transformer_tensor_bytes"], "transformer tensor size, no GPU memory on this run"
    scale, unit = (GIB, "GiB") if values.max() >= GIB else (1024**2, "MiB")
    return values, what, scale, unit


def _front(ok: pd.DataFrame, memory: pd.Series, value: pd.Series, scale: float) -> list[FrontPoint]:
    finite = memory.notna() & value.notna() & np.isfinite(value.astype(float))
    cells, x, y = ok[finite], memory[finite].to_numpy(float), value[finite].to_numpy(float)
    return [
        FrontPoint(number, cells.iloc[i]["cell_id"], cells.iloc[i]["cell_label"], x[i] / scale, y[i])
        for number, i in enumerate(pareto_front(x, y), start=1)
    ]
