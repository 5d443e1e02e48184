"""`quantbench report`: one self-contained HTML file (plots and images embedded), or GitHub-flavoured Markdown
with PNG plots beside it, from a results folder. Both open with what to pick for each GPU memory budget."""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path
from typing import Any

import pandas as pd
from jinja2 import Environment, PackageLoader, select_autoescape
from markupsafe import Markup, escape

from bench.atomic import write_text_atomic
from bench.cache import InductorCacheContents
from bench.contract import Status
from bench.errors import UserError
from bench.heartbeat import CompileCounts, warmup_step_speed_in_log
from bench.measure import measurement_flags
from bench.reference_cache import ReferenceCache
from bench.report.decision import DEFAULT_BUDGETS_GB, decide, none_text
from bench.report.lora import LORA_COLUMNS, LORA_INTRO, OVERVIEW_COLUMNS, OVERVIEW_INTRO, lora_overview_rows, lora_rows
from bench.report.numbers import number, rate
from bench.report.plots import SYNTHETIC_DRIFT_REASON, Plot, all_plots, colour, figure_svg, roofline
from bench.report.resolutions import RESOLUTION_COLUMNS, RESOLUTION_INTRO, resolution_rows
from bench.store import ResultsFolder, read_results, read_runs
from bench.summary import cell_summary, device_label, phases_run, run_times, time_breakdown

THUMBNAIL_PX = 256
ENVIRONMENT_COLUMNS = (
    "device", "gpu_name", "gpu_driver", "cuda_version", "cpu", "host", "python_version", "torch_version",
    "diffusers_version", "transformers_version", "accelerate_version", "bitsandbytes_version", "torchao_version",
    "gguf_version", "peft_version", "optimum_quanto_version", "sdnq_version", "nvidia_modelopt_version",
    "auto_round_version", "kernels_version", "triton_version",
)  # fmt: skip
DRIFT_COLUMNS = (
    ("psnr_db", "PSNR dB"),
    ("ssim", "SSIM"),
    ("lpips_alex", "LPIPS"),
    ("clip_score", "CLIP score"),
    ("latent_rel_l2", "latent rel L2"),
)


REPORT_FORMATS = ("html", "md")


def write_report(
    results: Path,
    output: Path,
    kernels: Path | None = None,
    report_format: str = "html",
    budgets_gb: tuple[int, ...] = DEFAULT_BUDGETS_GB,
) -> Path:
    """Render the report of `results` (a folder or a Parquet file) to `output` as HTML or Markdown (`md`: the
    plots as PNG files beside it), with the layer benchmarks of `kernels` (a `nox -s kernels` JSON) and their
    roofline when given; `budgets_gb` are the GPU memory budgets of the what-to-pick table."""
    if report_format not in REPORT_FORMATS:
        raise UserError(f"--format {report_format!r}: allowed {', '.join(REPORT_FORMATS)}")
    results = Path(results)
    if not results.exists():
        raise UserError(f"{results}: no such results folder or file")
    frame = read_results(results)
    if frame.empty:
        raise UserError(f"{results}: holds no result rows (run a matrix first)")
    root = results if results.is_dir() else results.parent
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    section = _kernel_section(kernels) if kernels else None
    if report_format == "md":
        from bench.report.markdown import render_markdown

        text = render_markdown(frame, root, output, section, budgets_gb)
    else:
        text = render(frame, root, section, budgets_gb)
    write_text_atomic(output, text)
    return output


def render(
    frame: pd.DataFrame,
    root: Path,
    kernels: dict[str, Any] | None = None,
    budgets_gb: tuple[int, ...] = DEFAULT_BUDGETS_GB,
) -> str:
    """The HTML report: plots as inline SVG (each point names its cell on hover), images as thumbnails."""
    context = report_context(frame, root, kernels, budgets_gb)
    for group_index, group in enumerate(context["gpu_groups"]):
        group["plots"] = [_plot_html(plot, f"g{group_index}p{index}") for index, plot in enumerate(group["plots"])]
    if kernels:
        kernels["roofline"] = _plot_html(kernels["roofline"], "roofline")
    environment = Environment(loader=PackageLoader("bench.report"), autoescape=select_autoescape(default=True))
    environment.filters["family_colour"] = colour
    environment.filters["code_spans"] = code_spans
    environment.filters["rate"] = rate
    environment.globals["none_text"] = none_text
    return environment.get_template("report.html.j2").render(**context)


def code_spans(text: str) -> Markup:
    """`text` escaped for HTML, its Markdown code spans (`like this`) as <code> elements: the section intros are
    written once for the Markdown and the HTML report."""
    return Markup(re.sub(r"`([^`]+)`", r"<code>\1</code>", str(escape(text))))


def _plot_html(plot: Plot, salt: str) -> dict[str, Any]:
    import matplotlib.pyplot as plt

    drawn = {"title": plot.title, "svg": figure_svg(plot, salt) if plot.figure else None, "reason": plot.reason,
             "notes": plot.notes}  # fmt: skip
    if plot.figure:
        plt.close(plot.figure)
    return drawn


def report_context(
    frame: pd.DataFrame, root: Path, kernels: dict[str, Any] | None, budgets_gb: tuple[int, ...]
) -> dict[str, Any]:
    """What the HTML and Markdown reports show, with each device's plots as `Plot`s still to be drawn out."""
    cells = cell_summary(frame)
    runs = read_runs(root)
    first = frame.iloc[0]
    image_grid = _image_grid(frame, cells, root)
    tiles = [tile for group in image_grid for tile in group["tiles"]]
    images_present = any(tile["image"] for tile in tiles)
    return dict(
        matrix_name=first["matrix_name"],
        matrix_path=first["matrix_path"],
        harness_commits=sorted(set(frame["harness_commit"].dropna())) or ["unknown"],
        timestamps=(frame["timestamp_utc"].min(), frame["timestamp_utc"].max()),
        weights=sorted(set(frame["weights"])),
        environment=_environment(frame),
        model=f"{first['model_source']} ({first['pipeline_class']})",
        generation=f"{first['width']}x{first['height']}, {first['num_inference_steps']} steps, guidance {first['guidance_scale']:g}, {first['repeats']} timed repeats",
        gpu_groups=_gpu_groups(frame, cells, budgets_gb),
        lora_columns=LORA_COLUMNS,
        lora_intro=LORA_INTRO,
        lora_overview_columns=OVERVIEW_COLUMNS,
        lora_overview_intro=OVERVIEW_INTRO,
        resolution_columns=RESOLUTION_COLUMNS,
        resolution_intro=RESOLUTION_INTRO,
        synthetic_drift=SYNTHETIC_DRIFT_REASON if (cells["weights"] == "synthetic").all() else None,
        image_grid=image_grid if images_present else [],
        images_absent=len(tiles) if tiles and not images_present else 0,
        not_run=[_not_run(cell) for _, cell in cells.iterrows() if cell["status"] != Status.OK],
        unfinished=_unfinished_cells(runs, set(frame["cell_id"]), root),
        metric_notes=_metric_notes(frame),
        gpu_memory_notes=sorted(set(frame["gpu_memory_note"].dropna())),
        kernels=kernels,
        time_spent=_time_spent(frame, runs),
    )


def _not_run(cell: pd.Series) -> dict[str, Any]:
    """A cell that did not finish: its reason in a line (a traceback's last line, the exception) and the whole
    text, when longer, to fold away."""
    lines = [
        line for line in (cell["error"] if isinstance(cell["error"], str) else "").strip().splitlines() if line.strip()
    ]
    whole = "\n".join(lines) if len(lines) > 1 else ""
    return {**cell.to_dict(), "ran": phases_run(cell), "reason": lines[-1] if lines else "", "reason_whole": whole}


def _time_spent(frame: pd.DataFrame, runs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The phases of the cells' wall time, for the "Where the time went" table, and the driver's own work
    from the `runs` recorded; None when no cell ran."""
    together = run_times(frame)
    if together is None:
        return None
    breakdown = time_breakdown(frame)
    rows = [
        {"phase": row["phase"], "seconds": f"{row['seconds']:.1f}", "share": f"{row['share']:.1%}"}
        for _, row in breakdown.iterrows()
        if row["seconds"] != 0  # phases no cell had (e.g. no serialization round trip)
    ]
    return {
        "rows": rows,
        "cells": together.cells,
        "cell_seconds": f"{together.cell_s:.1f}",
        "busy": f"{together.busy_s:.1f}",
        "most_at_once": together.most_at_once,
        "driver": _driver_time(runs) if runs else None,
    }


def _driver_time(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The driver's work over the recorded invocations: the harness's share outside the cell processes."""
    total = {key: sum(run.get(key, 0.0) for run in runs) for key in ("wall_s", "plan_s", "reference_s", "scoring_s")}
    own = total["plan_s"] + total["reference_s"] + total["scoring_s"]
    return {
        "invocations": len(runs),
        **{key: f"{seconds:.1f}" for key, seconds in total.items()},
        "share": f"{own / total['wall_s']:.1%}" if total["wall_s"] > 0 else "n/a",
        "stopped": sum(run.get("ended") != "done" for run in runs),
    }


def _unfinished_cells(runs: list[dict[str, Any]], with_rows: set[str], root: Path) -> list[dict[str, Any]]:
    """Cells that recorded runs stopped while they ran (a time limit, Ctrl-C) and that have no row yet: how
    long they ran over how many tries, how the last try ended, the log it left and the warm-up's step time
    it gives (how fast the model ran, for a cell stopped in its timed runs). A log so stopped that
    no recorded run names (runs recorded before they listed their unfinished cells) is listed by its id."""
    folder = ResultsFolder(root)
    with_logs = folder.interrupted_cell_ids()
    cells = {
        cell_id: {"id": cell_id, "label": "", "ran_s": 0.0, "tries": 0, "ended": "not recorded"}
        for cell_id in with_logs
    }
    for run in runs:
        for stopped in run.get("unfinished", []):
            cell = cells.setdefault(stopped["cell_id"], {"id": stopped["cell_id"], "ran_s": 0.0, "tries": 0})
            cell.update(label=stopped["cell_label"], ended=run.get("ended", "?"))
            cell["ran_s"] += stopped["ran_s"]
            cell["tries"] += 1
    for cell in cells.values():
        log_path = folder.interrupted_log_path(cell["id"])
        cell["log"] = log_path.relative_to(root).as_posix() if cell["id"] in with_logs else None
        step_s = _warmup_step_s(folder, cell["id"]) if cell["log"] else None
        cell["warmup_step_s"] = "–" if step_s is None else f"{step_s:.3f}"
        cell["ran_s"] = f"{cell['ran_s']:.0f}" if cell["tries"] else "?"
    return [cell for cell_id, cell in cells.items() if cell_id not in with_rows]


def _warmup_step_s(folder: ResultsFolder, cell_id: str) -> float | None:
    """The warm-up's step time a stopped cell measured (its progress file; its log in folders written before
    progress files were kept)."""
    progress = folder.interrupted_progress(cell_id)
    if progress is not None:
        return progress.warmup_step_median_s
    return warmup_step_speed_in_log(folder.interrupted_log_path(cell_id).read_text(errors="replace"))


def _kernel_mode(case: pd.Series) -> str:
    """How a layer case ran: eager, compiled, or a compiled variant (`mode`; runs before it had none)."""
    mode = case.get("mode")
    return mode if isinstance(mode, str) else ("compiled" if case["compiled"] else "eager")


def _kernel_section(path: Path) -> dict[str, Any]:
    """The roofline and one table row per layer case of a kernel benchmark JSON."""
    from bench.kernels.results import read_kernel_results

    cases, peaks = read_kernel_results(path)
    cases = cases.sort_values(["shape", "tokens", "family", "method", "compiled"])
    rows = [
        {
            "method": case["method"],
            "family": case["family"],
            "compiled": _kernel_mode(case),
            "shape": case["shape"],
            "tokens": int(case["tokens"]),
            "median_us": f"{case['median_s'] * 1e6:.1f}",
            "tflops": f"{case['tflops']:.1f}",
            "gbps": f"{case['gbps']:.0f}",
            "peak_flops": f"{case['share_of_peak_tflops']:.0%}",
            "peak_bandwidth": f"{case['share_of_peak_bandwidth']:.0%}",
            "weight_mib": f"{case['weight_bytes'] / 1024**2:.1f}",
            "rel_l2": f"{case['rel_l2_vs_bf16']:.2e}",
        }
        for _, case in cases.iterrows()
    ]
    return {
        "source": str(path),
        "device": peaks.device_name,
        "shape_sets": sorted(set(cases["shape_set"])),
        "roofline": roofline(cases, peaks),
        "peaks": peaks,
        "rows": rows,
    }


def _gpu_groups(frame: pd.DataFrame, cells: pd.DataFrame, budgets_gb: tuple[int, ...]) -> list[dict[str, Any]]:
    """The decision, summary rows and plots of each GPU (or the CPU) on its own: cells from different devices
    are never put side by side in one table or plot."""
    groups = []
    for device, group in cells.groupby(_devices(cells), sort=True):
        rows = frame[frame["cell_id"].isin(group["cell_id"])]
        shown = {metric for metric, _ in DRIFT_COLUMNS if group[metric].notna().any()}  # the others: missing metrics
        scale, unit = (1024**3, "GiB") if group["peak_reserved_bytes"].max() >= 1024**3 else (1024**2, "MiB")
        groups.append(
            {
                "device": device,
                "decision": decide(rows, group, device, budgets_gb),
                "memory_unit": unit,
                "rows": [_summary_row(cell, shown, scale) for _, cell in group.iterrows()],
                "drift_headers": [label for metric, label in DRIFT_COLUMNS if metric in shown],
                "plots": all_plots(group),
                "lora_overview": lora_overview_rows(group),
                "lora": lora_rows(group, scale),
                "resolutions": resolution_rows(group, scale),
            }
        )
    return groups


def _devices(cells: pd.DataFrame) -> pd.Series:
    """Each cell's device label; a cell that never started (skipped, unsupported) has no GPU name, and counts
    with the run's GPU when the run used exactly one GPU model, so it does not make a "CPU" group of its own."""
    labels = cells["gpu_name"].map(device_label)
    gpus = set(cells["gpu_name"].dropna())
    if len(gpus) == 1:
        never_started = cells["status"].isin([Status.SKIPPED, Status.UNSUPPORTED]) & cells["gpu_name"].isna()
        labels[never_started] = gpus.pop()
    return labels


def _environment(frame: pd.DataFrame) -> list[tuple[str, str]]:
    rows = []
    for column in ENVIRONMENT_COLUMNS:
        values = sorted({str(v) for v in frame[column].dropna()})
        rows.append((column.removesuffix("_version"), ", ".join(values) if values else "n/a"))
    return rows


def _summary_row(cell: pd.Series, drift_shown: set[str], memory_scale: float) -> dict[str, Any]:
    """One summary table row; GPU memory in bytes / `memory_scale` (GiB at real size, MiB for tiny models)."""

    def memory(column: str) -> str | None:
        return number(cell[column] / memory_scale if cell[column] is not None else None, "{:.2f}")

    drift = []
    for metric, _ in DRIFT_COLUMNS:
        value = number(cell[metric], "{:.4g}")
        low, high = number(cell[f"{metric}_ci_low"], "{:.3g}"), number(cell[f"{metric}_ci_high"], "{:.3g}")
        ci = f"95% CI [{low}, {high}]" if low and high else None
        drift.append({"value": value, "ci": ci, "shown": metric in drift_shown})
    counts_json = cell["compile_counts"]  # compiled cells only
    counts = CompileCounts(**json.loads(counts_json)) if isinstance(counts_json, str) else None
    return {
        "id": cell["cell_id"],
        "label": cell["cell_label"],
        "family": cell["method_family"],
        "status": cell["status"],
        "resident": memory("resident_reserved_bytes"),
        "peak": memory("peak_reserved_bytes"),
        "tensor_mib": number(cell["transformer_tensor_bytes"] / 1024**2, "{:.2f}"),
        "footprint_mib": number(cell["transformer_footprint_bytes"] / 1024**2, "{:.2f}"),
        "step": number(cell["step_latency_median_s"], "{:.4f}"),
        "step_iqr": number(cell["step_latency_iqr_s"], "{:.4f}"),
        "e2e": number(cell["e2e_latency_median_s"], "{:.3f}"),
        "e2e_iqr": number(cell["e2e_latency_iqr_s"], "{:.3f}"),
        "e2e_extrapolated": number(cell["e2e_latency_extrapolated_s"], "{:.2f}"),
        "extrapolated_to_steps": number(cell["extrapolated_to_steps"], "{:.0f}"),
        "batch": _batch_text(cell),
        "compile": number(cell["compile_s"], "{:.1f}"),
        "compile_work": _compile_work(counts, cell["inductor_cache_at_start"]),
        "timed_compiles": number(cell["timed_compiles"] or None, "{:.0f}"),  # 0 recompiles: nothing to flag
        "compile_flags": (_compile_flags(counts) if counts else []) + measurement_flags(cell),
        "against_eager": _step_against_eager(cell["step_latency_median_s"], cell["eager_step_latency_median_s"]),
        "speedup": number(cell["speedup"], "{:.2f}×"),
        "memory_saving": number(cell["memory_saving"] * 100, "{:.1f} %"),
        "drift": drift,
        "gate": cell["gate_status"] if isinstance(cell["gate_status"], str) else "–",
        "gate_failures": cell["gate_failures"] if isinstance(cell["gate_failures"], str) else None,
    }


def _batch_text(cell: pd.Series) -> str | None:
    """For a cell of several images per call, its rate and step time per image: "batch 4: 1.72 images/s,
    0.1230 s/step per image"; None for one image."""
    batch = cell.get("batch_size")
    if batch is None or pd.isna(batch) or batch <= 1 or cell["status"] != Status.OK:
        return None
    step = number(cell["step_latency_median_s"] / batch, "{:.4f}", "–")
    return f"batch {batch:.0f}: {rate(cell['images_per_s'])} images/s, {step} s/step per image"


def _step_against_eager(step_s: float, eager_step_s: float) -> dict[str, Any] | None:
    """A compiled cell's median step against its eager twin's: a text, whether compiling lost, and its hover
    title; None without both."""
    if pd.isna(step_s) or pd.isna(eager_step_s):
        return None
    title = f"the same cell uncompiled: {eager_step_s:.4f} s a step (median)"
    if step_s > eager_step_s:
        return {"text": f"slower than eager ({eager_step_s:.4f} s)", "slower": True, "title": title}
    return {"text": f"{eager_step_s / step_s:.2f}× faster", "slower": False, "title": title + ", slower than this"}


def _compile_flags(counts: CompileCounts) -> list[dict[str, str]]:
    """What in a compiled cell's `compile_counts` can explain a slow compiled step: graph breaks and int8
    weight-only linears rewritten into aten._weight_int8pack_mm, each as a short text and its hover title."""
    flags = []
    if counts.graph_breaks:
        flags.append(
            {
                "text": f"{counts.graph_breaks} graph breaks",
                "title": "Dynamo split the compiled code at these places, each a return to Python between"
                " compiled graphs; the cell's log gives the commonest reasons. Ops whose output size depends on"
                " the data (bitsandbytes int8's outlier columns at a threshold > 0: a break at every linear) are"
                ' traced instead with inductor = "capture-dynamic-output-shapes"',
            }
        )
    if counts.int8_weight_only_rewrites:
        flags.append(
            {
                "text": f"{counts.int8_weight_only_rewrites} linears rewritten into _weight_int8pack_mm",
                "title": "Inductor's pattern matcher rewrote these int8 weight-only linears (torchao int8wo's"
                " forward) into aten._weight_int8pack_mm, which on CUDA is far slower than a matmul at thousands"
                ' of tokens (README, Layer benchmarks); inductor = "stock-no-pattern-matcher" compiles without'
                " the rewrite",
            }
        )
    return flags


def _compile_work(counts: CompileCounts | None, cache_json: Any) -> str | None:
    """What compiling did (`compile_counts`) and what Inductor's cache held before it (`inductor_cache_at_start`,
    so a short compile time is seen to be a warm one), in words; None for rows without either."""
    parts = []
    if counts:
        parts.append(f"by the end of the warm-up: {counts.describe()}")
    if isinstance(cache_json, str):
        parts.append(f"Inductor's cache at the start: {InductorCacheContents(**json.loads(cache_json)).describe()}")
    return "; ".join(parts) or None


def _thumbnail(path: Path) -> str | None:
    from PIL import Image

    if not path.is_file():
        return None
    with Image.open(path) as image:
        image = image.convert("RGB")
        image.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _image_grid(frame: pd.DataFrame, cells: pd.DataFrame, root: Path) -> list[dict[str, Any]]:
    """Per (prompt, seed): the reference image, then each cell's image with its drift in the caption."""
    cache = ReferenceCache()
    baseline_first = cells.sort_values("method", key=lambda m: m != "baseline", kind="stable")
    order = {cell_id: i for i, cell_id in enumerate(baseline_first["cell_id"])}
    grid = []
    ok = frame[frame["status"] == Status.OK]
    for (_, seed), rows in ok.groupby(["prompt_index", "seed"], sort=True):
        rows = rows.sort_values("cell_id", key=lambda ids: ids.map(order))
        tiles = []
        keys = rows["reference_key"].dropna()
        reference = cache.get(keys.iloc[0]) if len(keys) else None
        if reference is not None:
            tiles.append(
                {
                    "title": f"reference ({rows['reference_dtype'].iloc[0]} baseline)",
                    "image": _thumbnail(reference.image_path),
                    "caption": "",
                    "path": str(reference.image_path),
                }
            )
        for _, row in rows.iterrows():
            caption = ", ".join(
                f"{label} {text}"
                for metric, label in DRIFT_COLUMNS
                if (text := number(row[metric], "{:.3g}")) is not None
            )
            path = root / row["image_path"] if isinstance(row["image_path"], str) else root / "missing"
            tiles.append(
                {
                    "title": row["cell_label"],
                    "image": _thumbnail(path),
                    "caption": caption or "drift: missing",
                    "path": row["image_path"],
                }
            )
        grid.append({"prompt": rows["prompt"].iloc[0], "seed": seed, "tiles": tiles})
    return grid


def _metric_notes(frame: pd.DataFrame) -> list[tuple[str, str]]:
    """Each missing metric with its reason(s), once."""
    notes: dict[str, set[str]] = {}
    for text in frame["metric_notes"].dropna():
        for metric, reason in json.loads(text).items():
            notes.setdefault(metric, set()).add(reason)
    return [(metric, "; ".join(sorted(reasons))) for metric, reasons in sorted(notes.items())]
