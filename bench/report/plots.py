"""The report's plots, drawn with matplotlib from a cell summary (bench.summary.cell_summary).

Readable on real data: an axis whose values span more than 10x is logarithmic; a value far off the others
(a pathological compile, a synthetic-block drift) is drawn at the axis edge with its value written instead of
stretching the axis; points carry no text beside them (the Pareto front is numbered where there is room, and
every point names its cell on hover in the SVG); each series has its own colour; memory is in MiB for tiny
models and GiB at real size. Drift is plotted for real weights only, never for synthetic-block GGUF. A plot
whose data is not in the run returns the reason instead of a figure.
"""

from __future__ import annotations

import html
import io
import json
import re
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import matplotlib
import matplotlib.patches
import matplotlib.text
import matplotlib.ticker
import matplotlib.transforms

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from bench.cells import compile_variant  # noqa: E402
from bench.contract import Status  # noqa: E402
from bench.report.decision import drift_axis, drift_view, memory_measure, pareto_front, step_seconds  # noqa: E402

FAMILY_COLOURS = {
    "baseline": "#333333",
    "bitsandbytes": "#1f77b4",
    "gguf": "#2ca02c",
    "torchao": "#d62728",
    "quanto": "#9467bd",
    "layerwise": "#ff7f0e",
    "sdnq": "#8c564b",
    "modelopt": "#76b900",
    "bfl": "#e377c2",
    "auto_round": "#17becf",
    "nunchaku": "#bcbd22",
}
SERIES_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f")  # fmt: skip
SERIES_MARKERS = ("o", "s", "^", "D", "v")
# Bits per weight of GGUF types (block bytes * 8 / block values).
GGUF_BITS = {"F16": 16, "BF16": 16, "Q8_0": 8.5, "Q5_1": 6.0, "Q5_0": 5.5, "Q4_1": 5.0, "Q4_0": 4.5,
             "Q6_K": 6.5625, "Q5_K": 5.5, "Q4_K": 4.5, "Q3_K": 3.4375, "Q2_K": 2.625}  # fmt: skip
LOG_SPAN = 10  # an axis whose values span more than this ratio is logarithmic
OFF_SCALE_DECADES = 1.0  # at least this far (in decades) beyond the quartiles, plus 3 IQRs, is off scale
SYNTHETIC_DRIFT_REASON = (
    "drift plots (memory vs drift, the llm_int8_threshold sweep) are not drawn: the weights are synthetic, so drift"
    " shows only that the pipeline ran, not image quality"
)
POINT_ID = "qb-point-"


@dataclass
class Plot:
    """A drawn figure with the hover text of its points (by artist gid) and notes for its caption, or the
    reason it was not drawn."""

    title: str
    figure: Figure | None = None
    reason: str | None = None
    hover: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def colour(family: str) -> str:
    return FAMILY_COLOURS.get(family, "#7f7f7f")


@dataclass(frozen=True)
class AxisFit:
    """How one axis shows its values: log or linear, its limits, and which values are off its scale (drawn at
    the edge), each as -1 (below) / +1 (above) / 0."""

    log: bool
    low: float
    high: float
    side: np.ndarray

    def placed(self, values: np.ndarray) -> np.ndarray:
        """The values with those off scale moved onto the edge they are beyond."""
        return np.where(self.side < 0, self.low, np.where(self.side > 0, self.high, values))

    def apply(self, ax: Axes, axis: str) -> None:
        """Set the axis's scale and limits; a log axis is labelled at 1, 2 and 5 of each decade in plain numbers."""
        (ax.set_xlim if axis == "x" else ax.set_ylim)(self.low, self.high)
        if self.log:
            (ax.set_xscale if axis == "x" else ax.set_yscale)("log")
            target = ax.xaxis if axis == "x" else ax.yaxis
            decades = np.log10(self.high / self.low)
            target.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0) if decades < 3 else (1.0,)))
            target.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}"))
            target.set_minor_formatter(matplotlib.ticker.NullFormatter())


def fit_axis(values: np.ndarray, *, start_at_zero: bool = False) -> AxisFit:
    """Log when the positive values on scale span more than LOG_SPAN; off scale: beyond the quartiles by 3 IQRs
    and at least OFF_SCALE_DECADES (in log10), or not positive on a log axis."""
    values = np.asarray(values, dtype=float)
    positive = values[np.isfinite(values) & (values > 0)]
    side = np.zeros(len(values), dtype=int)
    if positive.size == 0:
        finite = values[np.isfinite(values)]
        low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        pad = (high - low) * 0.05 or 1.0
        return AxisFit(False, low - pad, high + pad, side)
    logs = np.log10(positive)
    q1, q3 = np.percentile(logs, [25, 75])
    reach = max(3 * (q3 - q1), OFF_SCALE_DECADES)
    fence_low, fence_high = 10 ** (q1 - reach), 10 ** (q3 + reach)
    with np.errstate(invalid="ignore"):
        side[values > fence_high] = 1
        side[(values > 0) & (values < fence_low)] = -1
    on_scale = positive[(positive >= fence_low) & (positive <= fence_high)]
    low, high = float(on_scale.min()), float(on_scale.max())
    log = high / low > LOG_SPAN
    if log:
        with np.errstate(invalid="ignore"):
            side[values <= 0] = -1
        return AxisFit(True, low / 1.35, high * 1.35, side)
    finite = values[np.isfinite(values) & (side == 0)]
    low = 0.0 if start_at_zero else min(low, float(finite.min()))
    pad = (high - low) * 0.08 or abs(high) * 0.1 or 1.0
    return AxisFit(False, low if start_at_zero else low - pad, high + pad, side)


def memory_values(cells: pd.DataFrame) -> tuple[pd.Series, str, str]:
    """The memory the cells are compared by (bench.report.decision.memory_measure) in its unit, with the axis
    label and the unit."""
    values, what, scale, unit = memory_measure(cells)
    return values / scale, f"{what} ({unit})", unit


def hover_text(cell: pd.Series, x_text: str, y_text: str) -> str:
    return f"{cell['cell_label']} ({cell['cell_id']}): {x_text}, {y_text}"


def _legend_outside(ax: Axes, handles: list | None = None) -> None:
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)


def _family_handles(families: list[str], compiled_too: bool) -> list[Line2D]:
    handles = [Line2D([], [], marker="o", linestyle="", color=colour(f), label=f) for f in families]
    if compiled_too:
        handles += [
            Line2D([], [], marker="o", linestyle="", color="#777777", label="eager (filled)"),
            Line2D([], [], marker="o", linestyle="", color="#777777", markerfacecolor="white", label="compiled (open)"),
        ]
    return handles


def _off_scale_notes(ax: Axes, cells: pd.DataFrame, fits: dict[str, AxisFit], raw: dict[str, np.ndarray],
                     units: dict[str, str]) -> list[str]:  # fmt: skip
    """Write the values of off-scale points at the edge (one text per edge, values of close points merged) and
    return a caption line per point naming it."""
    notes = []
    for axis, fit in fits.items():
        for side in (-1, 1):
            where = np.flatnonzero(fit.side == side)
            if where.size == 0:
                continue
            values = raw[axis][where]
            numbers = sorted({_short(v) for v in values})
            arrow = {("x", 1): "→", ("x", -1): "←", ("y", 1): "↑", ("y", -1): "↓"}[(axis, side)]
            text = f"◇ {arrow} {', '.join(numbers)} {units[axis]}"
            if axis == "y":
                ax.annotate(text, (1.0, 1.0 if side > 0 else 0.0), xycoords="axes fraction", ha="right",
                            va="top" if side > 0 else "bottom", fontsize=7, color="#b00",
                            xytext=(-3, -3 if side > 0 else 3), textcoords="offset points")  # fmt: skip
            else:
                ax.annotate(text, (1.0 if side > 0 else 0.0, 0.5), xycoords="axes fraction", rotation=90,
                            ha="right" if side > 0 else "left", va="center", fontsize=7, color="#b00",
                            xytext=(-3 if side > 0 else 3, 0), textcoords="offset points")  # fmt: skip
            for index, value in zip(where, values, strict=True):
                cell = cells.iloc[index]
                edge = {(1, "y"): "top", (-1, "y"): "bottom", (1, "x"): "right", (-1, "x"): "left"}[(side, axis)]
                notes.append(
                    f"{cell['cell_label']}: {_short(value)} {units[axis]}, off scale, drawn at the {edge} edge"
                )
    return notes


def _short(value: float) -> str:
    return f"{value:.3g}"


def _overlaps(box: Any, others: list[Any]) -> bool:
    return any(box.overlaps(other) for other in others)


def drawn_texts(figure: Figure) -> list[matplotlib.text.Text]:
    """The texts a figure shows: every visible non-empty text, tick labels only of ticks inside the view."""
    ticks = set()
    shown = []
    for ax in figure.axes:
        for axis in (ax.xaxis, ax.yaxis):
            low, high = sorted(axis.get_view_interval())
            for tick in axis.get_major_ticks() + axis.get_minor_ticks():
                ticks.update({id(tick.label1), id(tick.label2)})
                if low <= tick.get_loc() <= high:
                    shown += [label for label in (tick.label1, tick.label2) if label.get_visible()]
    shown += [text for text in figure.findobj(matplotlib.text.Text) if id(text) not in ticks and text.get_visible()]
    return [text for text in shown if text.get_text().strip()]


def _text_boxes(figure: Figure, renderer: Any, skip: Any = None) -> list[Any]:
    return [text.get_window_extent(renderer) for text in drawn_texts(figure) if text is not skip]


def place_numbers(ax: Axes, points: list[tuple[float, float, str]], markers: np.ndarray) -> int:
    """Write each (x, y, text) beside its point where it overlaps no other text or marker (`markers`: every
    point's data coordinates) and stays inside the axes, trying eight positions; a number with no room is
    left out (its point still names its cell on hover). Returns how many were placed."""
    figure = ax.figure
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    inside = ax.get_window_extent(renderer)
    radius = 4.5 * figure.dpi / 72
    obstacles = [
        matplotlib.transforms.Bbox.from_extents(px - radius, py - radius, px + radius, py + radius)
        for px, py in ax.transData.transform(markers)
    ]
    offsets = ((4, 3), (4, -9), (-9, 3), (-9, -9), (0, 6), (0, -12), (7, -3), (-12, -3))
    placed = 0
    for x, y, text in points:
        for dx, dy in offsets:
            label = ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=7,
                                fontweight="bold", color="#444444")  # fmt: skip
            box = label.get_window_extent(renderer)
            if (
                inside.contains(box.x0, box.y0)
                and inside.contains(box.x1, box.y1)
                and not _overlaps(box, _text_boxes(figure, renderer, skip=label) + obstacles)
            ):
                placed += 1
                break
            label.remove()
    return placed


def scatter(cells: pd.DataFrame, x: pd.Series, y: pd.Series, labels: tuple[str, str], units: tuple[str, str],
            title: str) -> Plot:  # fmt: skip
    """Each cell one point (filled eager, open compiled, coloured by family), the Pareto front of lower x and
    lower y dashed and numbered as in the report's front tables, off-scale values at the edges."""
    cells = cells.reset_index(drop=True)
    xs, ys = x.reset_index(drop=True).to_numpy(float), y.reset_index(drop=True).to_numpy(float)
    keep = np.isfinite(xs) & np.isfinite(ys)
    cells, xs, ys = cells[keep].reset_index(drop=True), xs[keep], ys[keep]
    figure, ax = plt.subplots(figsize=(7.5, 4.6), dpi=100)
    fits = {"x": fit_axis(xs), "y": fit_axis(ys)}
    fits["x"].apply(ax, "x")
    fits["y"].apply(ax, "y")
    px, py = fits["x"].placed(xs), fits["y"].placed(ys)
    hover = {}
    for index, cell in cells.iterrows():
        compiled = cell["compile"] != "off"
        off = fits["x"].side[index] or fits["y"].side[index]
        gid = f"{POINT_ID}{index}"
        ax.plot(
            px[index], py[index], linestyle="", marker="D" if off else "o", markersize=6.5, zorder=3, clip_on=False,
            color=colour(cell["method_family"]), markerfacecolor="white" if compiled else colour(cell["method_family"]),
            markeredgewidth=1.4, gid=gid,
        )  # fmt: skip
        hover[gid] = hover_text(cell, f"{_short(xs[index])} {units[0]}", f"{_short(ys[index])} {units[1]}")
    front = pareto_front(xs, ys)
    ax.step(px[front], py[front], where="post", color="#999999", linestyle="--", zorder=2, linewidth=1)
    ax.set_xlabel(labels[0])
    ax.set_ylabel(_fitted(labels[1]))
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    families = list(dict.fromkeys(cells["method_family"]))
    handles = _family_handles(families, (cells["compile"] != "off").any())
    handles.append(Line2D([], [], color="#999999", linestyle="--", label="Pareto front (numbered)"))
    _legend_outside(ax, handles)
    figure.tight_layout()
    notes = _off_scale_notes(ax, cells, fits, {"x": xs, "y": ys}, {"x": units[0], "y": units[1]})
    place_numbers(
        ax, [(px[i], py[i], str(number)) for number, i in enumerate(front, start=1)], np.column_stack([px, py])
    )
    return Plot(title, figure, hover=hover, notes=notes)


def memory_vs_step(cells: pd.DataFrame) -> Plot:
    memory, memory_label, unit = memory_values(cells)
    return scatter(
        cells, memory, step_seconds(cells), (memory_label, "denoising step, median (s)"), (unit, "s/step"),
        "Step time vs memory",
    )  # fmt: skip


def memory_vs_drift(cells: pd.DataFrame) -> Plot:
    title = "Drift vs memory"
    viewed = drift_view(cells)
    drift = drift_axis(viewed) if not viewed.empty else None
    if drift is None:
        return Plot(title, reason="no drift metric was measured on real weights in this run")
    viewed = viewed[~((viewed["method"] == "baseline") & (viewed["compile"] == "off"))]  # the reference itself
    memory, memory_label, unit = memory_values(viewed)
    return scatter(viewed, memory, drift[0][viewed.index], (memory_label, drift[1]), (unit, ""), title)


def threshold_sweep(cells: pd.DataFrame) -> Plot:
    """bitsandbytes int8's drift against llm_int8_threshold, one line (and colour) per dtype and compile variant."""
    title = "llm_int8_threshold sweep"
    sweep = drift_view(cells)
    sweep = sweep[(sweep["method"] == "bnb_8bit") & sweep["threshold"].notna()]
    drift = drift_axis(sweep) if not sweep.empty else None
    if sweep["threshold"].nunique() < 2 or drift is None:
        return Plot(
            title, reason="needs bnb_8bit cells on real weights with at least two thresholds and a drift metric"
        )
    sweep = sweep.assign(drift=drift[0], series=sweep["dtype"] + " " + _variants(sweep))
    figure, ax = plt.subplots(figsize=(7.5, 4), dpi=100)
    hover = {}
    for number, (series, group) in enumerate(sweep.groupby("series", sort=True)):
        group = group.sort_values("threshold")
        series_colour = SERIES_COLOURS[number % len(SERIES_COLOURS)]
        marker = SERIES_MARKERS[number % len(SERIES_MARKERS)]  # series that coincide stay visible
        ax.plot(group["threshold"], group["drift"], color=series_colour, label=series, marker=marker,
                markerfacecolor="none", markersize=9 - 1.5 * (number % 3), linestyle="-" if len(group) > 1 else "")  # fmt: skip
        for index, cell in group.iterrows():
            gid = f"{POINT_ID}{index}"
            ax.plot(cell["threshold"], cell["drift"], marker=marker, markerfacecolor="none", linestyle="",
                    markersize=9 - 1.5 * (number % 3), color=series_colour, gid=gid)  # fmt: skip
            hover[gid] = hover_text(cell, f"threshold {cell['threshold']:g}", f"drift {_short(cell['drift'])}")
    fit = fit_axis(sweep["drift"].to_numpy(float))
    if fit.log:
        ax.set_yscale("log")
    ax.set_xlabel("llm_int8_threshold (outlier threshold, unitless)")
    ax.set_ylabel(_fitted(drift[1]))
    ax.set_title(title)
    ax.grid(alpha=0.3)
    _legend_outside(ax)
    figure.tight_layout()
    return Plot(title, figure, hover=hover)


def _variants(cells: pd.DataFrame) -> pd.Series:
    return pd.Series(
        [compile_variant(*v) for v in zip(cells["compile"], cells["fullgraph"], cells["inductor"], cells["regional"], strict=True)],
        index=cells.index,
    )  # fmt: skip


def compile_comparison(cells: pd.DataFrame) -> Plot:
    """The step time of each method eager and under each compile variant: one bar per cell, coloured by
    variant, grouped by method (the method named on its group's first bar)."""
    title = "torch.compile on/off"
    key = cells["method"] + " " + cells["method_options"] + " " + cells["dtype"] + " " + cells["threshold"].map(str)
    modes = cells.assign(key=key, variant=_variants(cells), step=step_seconds(cells))
    groups = modes[modes["step"].notna()].groupby("key", sort=False).filter(lambda g: g["variant"].nunique() > 1)
    if groups.empty:
        return Plot(title, reason="needs the same method with compile off and on")
    variants = sorted(set(groups["variant"]), key=lambda v: (v != "off", v))
    bars = groups.sort_values("variant", key=lambda c: c.map(variants.index), kind="stable")
    bars = bars.sort_values("key", key=lambda c: c.map(list(dict.fromkeys(groups["key"])).index), kind="stable")
    height = 0.2 * len(bars) + 0.12 * bars["key"].nunique() + 1.2 + 0.2 * len(variants) / 2
    figure, ax = plt.subplots(figsize=(7.5, height), dpi=100, layout="constrained")
    fit = fit_axis(bars["step"].to_numpy(float), start_at_zero=True)
    fit.apply(ax, "x")
    base = fit.low if fit.log else 0.0
    hover, notes, ticks, labels, y = {}, [], [], [], 0.0
    for _, group in bars.groupby("key", sort=False):
        for n, (index, cell) in enumerate(group.iterrows()):
            number = variants.index(cell["variant"])
            side = 1 if cell["step"] > fit.high else 0  # bars start at the low edge: only the long ones run off
            drawn = fit.high if side > 0 else cell["step"]
            bar = ax.barh(y, drawn - base, left=base, height=0.8, color=SERIES_COLOURS[number % len(SERIES_COLOURS)])
            gid = f"{POINT_ID}{index}"
            bar.patches[0].set_gid(gid)
            hover[gid] = hover_text(cell, cell["variant"], f"{_short(cell['step'])} s/step")
            ticks.append(y)
            labels.append(cell["cell_label"].split(" compile=")[0] if n == 0 else "")
            if side > 0:
                ax.annotate(f"{_short(cell['step'])} s →", (fit.high, y), xytext=(-3, 0), textcoords="offset points",
                            ha="right", va="center", fontsize=6.5, color="white", fontweight="bold")  # fmt: skip
                notes.append(f"{cell['cell_label']}: {_short(cell['step'])} s/step, off scale, drawn to the right edge")
            y += 1
        y += 0.6  # a gap between methods
    ax.set_yticks(ticks, labels, fontsize=7.5)
    ax.tick_params(axis="y", length=0)
    ax.set_ylim(y - 0.4, -0.8)
    ax.set_xlabel("denoising step, median (s)")
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3, which="both")
    handles = [
        matplotlib.patches.Patch(color=SERIES_COLOURS[n % len(SERIES_COLOURS)], label=v) for n, v in enumerate(variants)
    ]
    figure.legend(handles=handles, fontsize=7.5, loc="outside lower center", ncol=2, title="compile", title_fontsize=8)
    return Plot(title, figure, hover=hover, notes=notes)


def _fitted(label: str, width: int = 40) -> str:
    """An axis label broken into lines of at most `width` characters, so a long one fits beside a 4-inch axis."""
    return textwrap.fill(label, width)


def gguf_ladder(cells: pd.DataFrame) -> Plot:
    """Memory of each GGUF type, ordered by bits per weight; coloured by drift on real weights."""
    title = "GGUF type ladder"
    gguf = cells[cells["method"] == "gguf"].copy()
    gguf["quant_type"] = [json.loads(o).get("quant_type") for o in gguf["method_options"]]
    gguf = gguf[gguf["quant_type"].isin(GGUF_BITS)]
    if gguf.empty:
        return Plot(title, reason="no GGUF cells of a known type ran")
    gguf["bits"] = gguf["quant_type"].map(GGUF_BITS)
    types = sorted(set(gguf["quant_type"]), key=lambda t: (GGUF_BITS[t], t))
    memory, memory_label, unit = memory_values(gguf)
    viewed = drift_view(gguf)
    drift = drift_axis(viewed) if not viewed.empty else None
    figure, ax = plt.subplots(figsize=(7.5, 4), dpi=100)
    variants = _variants(gguf)
    series = sorted(set(variants), key=lambda v: (v != "off", v))
    hover = {}
    offsets = {variant: (n - (len(series) - 1) / 2) * 0.12 for n, variant in enumerate(series)}
    norm = None
    if drift is not None:
        values = drift[0].to_numpy(float)
        fit = fit_axis(values)
        norm = (
            matplotlib.colors.LogNorm(fit.low, fit.high) if fit.log else matplotlib.colors.Normalize(fit.low, fit.high)
        )
    for index, cell in gguf.iterrows():
        n = series.index(variants[index])
        x = types.index(cell["quant_type"]) + offsets[variants[index]]
        face = SERIES_COLOURS[n % len(SERIES_COLOURS)]
        if norm is not None and index in drift[0].index and pd.notna(drift[0][index]):
            face = matplotlib.cm.viridis(norm(drift[0][index]))
        gid = f"{POINT_ID}{index}"
        ax.plot(x, memory[index], marker="o", markersize=8, linestyle="", color=SERIES_COLOURS[n % len(SERIES_COLOURS)],
                markerfacecolor=face, markeredgewidth=1.5, gid=gid)  # fmt: skip
        hover[gid] = hover_text(cell, f"{cell['bits']:g} bits/weight", f"{_short(memory[index])} {unit}")
    handles = [Line2D([], [], marker="o", linestyle="", color=SERIES_COLOURS[n % len(SERIES_COLOURS)], label=v)
               for n, v in enumerate(series)]  # fmt: skip
    if norm is not None:
        figure.colorbar(matplotlib.cm.ScalarMappable(norm=norm, cmap="viridis"), ax=ax, label=drift[1], pad=0.02)
    ax.set_xticks(range(len(types)), [f"{t}\n{GGUF_BITS[t]:.3g} b/w" for t in types], fontsize=8)
    ax.set_xlim(-0.6, len(types) - 0.4)
    ax.set_ylabel(_fitted(memory_label))
    ax.set_xlabel("GGUF type (bits per weight)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(handles=handles, fontsize=8, title="compile", title_fontsize=8, loc="best")
    figure.tight_layout()
    return Plot(title, figure, hover=hover)


def all_plots(cells: pd.DataFrame) -> list[Plot]:
    """The report's plots over the cells that finished; drift plots only where some weights are real."""
    ran = cells[cells["status"] == Status.OK].reset_index(drop=True)
    if ran.empty:
        return [Plot("Plots", reason="no cell finished")]
    drawers: list[Callable[[pd.DataFrame], Plot]] = [memory_vs_step, compile_comparison, gguf_ladder]
    if (ran["weights"] != "synthetic").any():
        drawers[1:1] = [memory_vs_drift, threshold_sweep]
    return [draw(ran) for draw in drawers]


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


def figure_svg(plot: Plot, salt: str) -> str:
    """The figure as inline SVG that scales to its container, each point's group given a `<title>` (the
    browser's hover text). `salt` keeps the ids of several SVGs on one page apart."""
    buffer = io.StringIO()
    with matplotlib.rc_context({"svg.hashsalt": salt, "svg.fonttype": "path"}):
        plot.figure.savefig(buffer, format="svg")
    svg = buffer.getvalue()
    svg = svg[svg.index("<svg") :]
    svg = re.sub(r'<svg([^>]*?) width="[^"]*" height="[^"]*"', r'<svg\1 class="plot" role="img"', svg, count=1)
    for gid, text in plot.hover.items():
        svg = svg.replace(f'<g id="{gid}">', f'<g id="{salt}-{gid}"><title>{html.escape(text, quote=False)}</title>', 1)
    return svg


def figure_png(plot: Plot) -> bytes:
    buffer = io.BytesIO()
    plot.figure.savefig(buffer, format="png")
    return buffer.getvalue()
