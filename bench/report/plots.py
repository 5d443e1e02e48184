"""The report's plots, drawn with matplotlib from a cell summary (bench.summary.cell_summary).

Every axis has its unit; each method family keeps one colour in every plot. A plot whose data is not in
the run returns the reason instead of an empty figure.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from bench.cells import compile_variant  # noqa: E402
from bench.contract import Status  # noqa: E402

FAMILY_COLOURS = {
    "baseline": "#333333",
    "bitsandbytes": "#1f77b4",
    "gguf": "#2ca02c",
    "torchao": "#d62728",
    "quanto": "#9467bd",
    "layerwise": "#ff7f0e",
}
GIB = 1024**3
# Bits per weight of GGUF types (block bytes * 8 / block values).
GGUF_BITS = {"F16": 16, "BF16": 16, "Q8_0": 8.5, "Q5_1": 6.0, "Q5_0": 5.5, "Q4_1": 5.0, "Q4_0": 4.5,
             "Q6_K": 6.5625, "Q5_K": 5.5, "Q4_K": 4.5, "Q3_K": 3.4375, "Q2_K": 2.625}  # fmt: skip
DRIFT_PREFERENCE = (("lpips_alex", "LPIPS (AlexNet)"), ("latent_rel_l2", "latent relative L2"), ("ssim", "1 - SSIM"))


@dataclass
class Plot:
    """A drawn figure, or the reason it was not drawn."""

    title: str
    figure: Figure | None = None
    reason: str | None = None


def colour(family: str) -> str:
    return FAMILY_COLOURS.get(family, "#7f7f7f")


def memory_axis(cells: pd.DataFrame) -> tuple[pd.Series, str]:
    """Peak reserved GPU memory when measured, else the transformer's stored tensor size (CPU runs)."""
    if cells["peak_reserved_bytes"].notna().any():
        return cells["peak_reserved_bytes"] / GIB, "peak reserved GPU memory (GiB)"
    return cells["transformer_tensor_bytes"] / GIB, "transformer tensor size (GiB; no GPU memory on this run)"


def drift_axis(cells: pd.DataFrame) -> tuple[pd.Series, str] | None:
    """The first drift metric with values: LPIPS, else latent relative L2, else 1 - SSIM."""
    for metric, label in DRIFT_PREFERENCE:
        if metric in cells and cells[metric].notna().any():
            values = 1 - cells[metric] if metric == "ssim" else cells[metric]
            return values, f"{label} vs reference (lower is closer)"
    return None


def pareto_front(x: np.ndarray, y: np.ndarray) -> list[int]:
    """Indices of points no other point beats on both x and y (both lower is better)."""
    order = np.lexsort((y, x))
    front, best = [], np.inf
    for i in order:
        if y[i] < best:
            front.append(int(i))
            best = y[i]
    return front


def _scatter(
    cells: pd.DataFrame, x: pd.Series, y: pd.Series, xlabel: str, ylabel: str, title: str, front: bool
) -> Figure:
    figure, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    for family, group in cells.groupby("method_family"):
        ax.scatter(x[group.index], y[group.index], color=colour(family), label=family, s=40, zorder=3)
    for index, cell in cells.iterrows():
        ax.annotate(cell["cell_label"], (x[index], y[index]), fontsize=7, xytext=(4, 3), textcoords="offset points")
    if front:
        finite = np.isfinite(x.to_numpy()) & np.isfinite(y.to_numpy())
        xs, ys = x.to_numpy()[finite], y.to_numpy()[finite]
        indices = pareto_front(xs, ys)
        ax.step(xs[indices], ys[indices], where="post", color="#999999", linestyle="--", label="Pareto front", zorder=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    figure.tight_layout()
    return figure


def memory_vs_drift(cells: pd.DataFrame) -> Plot:
    title = "Memory vs drift"
    drift = drift_axis(cells)
    if drift is None:
        return Plot(title, reason="no drift metric was measured in this run")
    memory, memory_label = memory_axis(cells)
    return Plot(title, _scatter(cells, memory, drift[0], memory_label, drift[1], title, front=True))


def latency_vs_memory(cells: pd.DataFrame) -> Plot:
    title = "Latency vs memory"
    memory, memory_label = memory_axis(cells)
    return Plot(
        title,
        _scatter(
            cells,
            memory,
            cells["e2e_latency_median_s"],
            memory_label,
            "end-to-end latency, median (s)",
            title,
            front=True,
        ),
    )


def latency_bars(cells: pd.DataFrame) -> Plot:
    """Per-cell end-to-end latency, median with the IQR as error bar."""
    figure, ax = plt.subplots(figsize=(7, 0.35 * len(cells) + 1.5), dpi=100)
    y = np.arange(len(cells))
    ax.barh(
        y,
        cells["e2e_latency_median_s"],
        xerr=cells["e2e_latency_iqr_s"] / 2,
        color=[colour(f) for f in cells["method_family"]],
        capsize=3,
    )
    ax.set_yticks(y, cells["cell_label"], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("end-to-end latency, median ± IQR/2 (s)")
    ax.set_title("Latency per cell")
    ax.grid(axis="x", alpha=0.3)
    figure.tight_layout()
    return Plot("Latency per cell", figure)


def threshold_sweep(cells: pd.DataFrame) -> Plot:
    title = "llm_int8_threshold sweep"
    sweep = cells[(cells["method"] == "bnb_8bit") & cells["threshold"].notna()]
    drift = drift_axis(sweep) if not sweep.empty else None
    if sweep["threshold"].nunique() < 2 or drift is None:
        return Plot(title, reason="needs bnb_8bit cells with at least two thresholds and a drift metric")
    figure, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for label, group in sweep.assign(drift=drift[0]).groupby(["dtype", "compile"]):
        group = group.sort_values("threshold")
        ax.plot(group["threshold"], group["drift"], marker="o", color=colour("bitsandbytes"), label=" ".join(label))
    ax.set_xlabel("llm_int8_threshold (outlier threshold, unitless)")
    ax.set_ylabel(drift[1])
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    figure.tight_layout()
    return Plot(title, figure)


def compile_comparison(cells: pd.DataFrame) -> Plot:
    title = "torch.compile on/off"
    key = cells["method"] + " " + cells["method_options"] + " " + cells["dtype"]
    variant = [
        compile_variant(*values)
        for values in zip(cells["compile"], cells["fullgraph"], cells["inductor"], cells["regional"], strict=True)
    ]
    modes = cells.assign(key=key, variant=variant)
    groups = modes.groupby("key").filter(lambda g: g["variant"].nunique() > 1)
    if groups.empty:
        return Plot(title, reason="needs the same method with compile off and on")
    pivot = groups.pivot_table(index="key", columns="variant", values="e2e_latency_median_s", aggfunc="first")
    figure, ax = plt.subplots(figsize=(7, 0.5 * len(pivot) + 1.8), dpi=100)
    pivot.plot.barh(ax=ax)
    labels = [groups.loc[groups["key"] == k, "cell_label"].iloc[0].split(" compile=")[0] for k in pivot.index]
    ax.set_yticks(range(len(pivot)), labels, fontsize=8)
    ax.set_xlabel("end-to-end latency, median (s)")
    ax.set_ylabel("")
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    figure.tight_layout()
    return Plot(title, figure)


def gguf_ladder(cells: pd.DataFrame) -> Plot:
    title = "GGUF type ladder"
    gguf = cells[(cells["method"] == "gguf") & (cells["status"] == Status.OK)].copy()
    gguf["quant_type"] = [json.loads(o).get("quant_type") for o in gguf["method_options"]]
    gguf = gguf[gguf["quant_type"].isin(GGUF_BITS)]
    if gguf.empty:
        return Plot(title, reason="no GGUF cells of a known type ran")
    gguf["bits"] = gguf["quant_type"].map(GGUF_BITS)
    memory, memory_label = memory_axis(gguf)
    drift = drift_axis(gguf)
    figure, ax = plt.subplots(figsize=(7, 4), dpi=100)
    points = ax.scatter(gguf["bits"], memory, c=drift[0] if drift else colour("gguf"), cmap="viridis", s=60, zorder=3)
    for index, row in gguf.iterrows():
        ax.annotate(
            row["quant_type"], (row["bits"], memory[index]), fontsize=8, xytext=(4, 3), textcoords="offset points"
        )
    if drift:
        figure.colorbar(points, ax=ax, label=drift[1])
    ax.set_xlabel("bits per weight")
    ax.set_ylabel(memory_label)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    figure.tight_layout()
    return Plot(title, figure)


def all_plots(cells: pd.DataFrame) -> list[Plot]:
    """The report's plots over the cells that ran."""
    ran = cells[cells["status"] == Status.OK].reset_index(drop=True)
    if ran.empty:
        return [Plot("Plots", reason="no cell finished")]
    return [
        memory_vs_drift(ran),
        latency_vs_memory(ran),
        latency_bars(ran),
        threshold_sweep(ran),
        compile_comparison(ran),
        gguf_ladder(ran),
    ]


def roofline(cases: pd.DataFrame, peaks: Any) -> Plot:
    """Achieved TFLOP/s against arithmetic intensity (FLOP per byte moved) of every layer case, under the
    device's measured matmul and bandwidth ceilings. Filled markers: eager; open: torch.compile."""
    title = f"Roofline of the quantized linear layers on {peaks.device_name}"
    figure, ax = plt.subplots(figsize=(8, 5), dpi=100)
    intensity = cases["flops"] / cases["bytes_moved"]
    for (family, compiled), group in cases.groupby(["family", "compiled"]):
        ax.scatter(
            intensity[group.index],
            group["tflops"],
            s=30,
            zorder=3,
            label=f"{family}{' (compiled)' if compiled else ''}",
            facecolors="none" if compiled else colour(family),
            edgecolors=colour(family),
        )
    x = np.logspace(np.log10(intensity.min() / 2), np.log10(intensity.max() * 2), 200)
    ceiling = np.minimum(peaks.matmul_tflops, peaks.bandwidth_gbps * x / 1e3)
    ax.plot(x, ceiling, color="#555555", linewidth=1.5, label="measured ceiling")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP / byte moved: weights + activations in and out)")
    ax.set_ylabel("achieved TFLOP/s")
    ax.set_title(
        f"{title}\npeaks measured in the same run: {peaks.matmul_tflops:.3g} TFLOP/s bf16 matmul, "
        f"{peaks.bandwidth_gbps:.3g} GB/s copy",
        fontsize=9,
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    return Plot(title, figure)
