"""The report as GitHub-flavoured Markdown (docs pages, CI job summaries): the what-to-pick table, the Pareto
fronts, a summary table and the plots as PNG files written beside the Markdown file."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pandas as pd

from bench.report.decision import Decision, Pick, none_text
from bench.report.lora import LORA_INTRO, OVERVIEW_INTRO
from bench.report.numbers import rate
from bench.report.resolutions import RESOLUTION_INTRO


def render_markdown(
    frame: pd.DataFrame, root: Path, output: Path, kernels: dict[str, Any] | None, budgets_gb: tuple[int, ...]
) -> str:
    """The Markdown text of the report; its PNG plots are written next to `output` as `<stem>-<plot>.png`."""
    import matplotlib.pyplot as plt

    from bench.report import report_context
    from bench.report.plots import figure_png

    context = report_context(frame, root, kernels, budgets_gb)
    lines = [f"# quantbench: {context['matrix_name']}", ""]
    lines.append(
        f"Matrix `{context['matrix_path']}` · model {context['model']} · {context['generation']} · harness commit "
        + ", ".join(f"`{c}`" for c in context["harness_commits"])
    )
    lines.append("")
    if "synthetic" in context["weights"]:
        lines += [
            "> **Synthetic weights.** Memory and latency depend on shapes and are meaningful; drift numbers only show"
            " that the pipeline ran and are **not** image quality.",
            "",
        ]
    lines += ["## What to pick", ""]
    for group in context["gpu_groups"]:
        lines += _decision(group["decision"], len(context["gpu_groups"]) > 1)
    lines += ["## Summary", ""]
    for group in context["gpu_groups"]:
        if len(context["gpu_groups"]) > 1:
            lines += [f"### {group['device']}", ""]
        lines += _summary(group["rows"], group["memory_unit"])
    lines += _group_section(
        context, "lora_overview", "LoRA overhead by method and mode", OVERVIEW_INTRO, context["lora_overview_columns"]
    )
    lines += _group_section(context, "lora", "LoRA cells", LORA_INTRO, context["lora_columns"])
    lines += _group_section(
        context, "resolutions", "Resolution changes", RESOLUTION_INTRO, context["resolution_columns"]
    )
    lines += ["## Plots", ""]
    if context["synthetic_drift"]:
        lines += [f"The {context['synthetic_drift']}.", ""]
    for number, group in enumerate(context["gpu_groups"]):
        for plot in group["plots"]:
            if plot.figure is None:
                lines += [f"**{plot.title}**: not drawn, {plot.reason}.", ""]
                continue
            name = f"{output.stem}-{number}-{_slug(plot.title)}.png"
            (output.parent / name).write_bytes(figure_png(plot))
            plt.close(plot.figure)
            lines += [f"![{plot.title} ({group['device']})]({name})", ""]
            lines += [f"- off scale: {note}" for note in plot.notes] + ([""] if plot.notes else [])
    if kernels:
        name = f"{output.stem}-roofline.png"
        (output.parent / name).write_bytes(figure_png(kernels["roofline"]))
        plt.close(kernels["roofline"].figure)
        lines += ["## Layer benchmarks", "", f"![roofline]({name})", ""]
    if context["not_run"]:
        lines += ["## Cells that did not run or failed", "", "| cell | status | reason |", "|---|---|---|"]
        lines += [f"| {_cell(c['cell_label'])} | {c['status']} | {_cell(c['reason'])} |" for c in context["not_run"]]
        lines.append("")
    return "\n".join(lines)


def _decision(decision: Decision, several_devices: bool) -> list[str]:
    lines = [f"### Measured on {decision.device}", ""] if several_devices else []
    if not decision.gpu_memory:
        lines += [f"This run measured no GPU memory (it ran on {decision.device}): which card a cell fits cannot be told.", ""]  # fmt: skip
    else:
        context = (
            f"{decision.context_gib:.2f} GiB, measured with NVML in this run"
            if decision.context_measured
            else f"a default {decision.context_gib:.1f} GiB: this run recorded no NVML reading of it"
        )
        lines += [
            f"Fastest finished cell that fits each card on {decision.device} (median denoising step). A cell fits when"
            f" its peak reserved memory plus the CUDA context ({context}) fits the card (N GB taken as N GiB);"
            " savings against bf16 run eagerly."
            + (" Only cells that pass the drift gates." if decision.gated else "")
            + (" Synthetic weights: no drift gate applies." if not decision.real_weights else ""),
            "",
            "| card | fastest eager | fastest compiled (compile time) |",
            "|---|---|---|",
        ]
        lines += [
            f"| **{r.budget_gb} GB** | {_pick(r.eager, decision.eager_ran, 'eager')} | "
            f"{_pick(r.compiled, decision.compiled_ran, 'compiled')} |"
            for r in decision.budgets
        ]
        lines.append("")
        if decision.smallest and any(r.eager is None and r.compiled is None for r in decision.budgets):
            lines += [f"Where nothing fits, the cell needing least memory is {_cell(decision.smallest.label)} "
                      f"({decision.smallest.facts()}); a placement that offloads to the CPU may still run it.", ""]  # fmt: skip
    if decision.largest_batches:
        lines += ["Largest batch (`batch_size`) of each method that fits each card, with its images per second:", "",
                  "| card | method | batch | images/s | cell |", "|---|---|--:|--:|---|"]  # fmt: skip
        lines += [
            f"| {b.budget_gb} GB | {_cell(b.method)} | {b.batch_size} | "
            f"{'' if b.images_per_s is None else rate(b.images_per_s)} | {_cell(b.label)} |"
            for b in decision.largest_batches
        ]
        lines.append("")
    for title, front, value in (
        ("memory vs step time", decision.speed_front, "s/step"),
        ("memory vs drift", decision.drift_front, decision.drift_label),
    ):
        if front:
            lines += [
                f"Pareto front, {title}:",
                "",
                f"| # | cell | {decision.memory_label} | {value} |",
                "|--:|---|--:|--:|",
            ]
            lines += [f"| {p.number} | {_cell(p.label)} | {p.memory:.2f} | {p.value:.3g} |" for p in front]
            lines.append("")
    return lines


def _pick(pick: Pick | None, ran: bool, mode: str) -> str:
    return f"*{none_text(ran, mode)}*" if pick is None else f"{_cell(pick.label)}<br>{pick.facts()}"


def _group_section(context: dict[str, Any], key: str, title: str, intro: str, columns: tuple) -> list[str]:
    """A section of one table per device from each GPU group's `key` rows (LoRA, resolutions); [] without any."""
    groups = [group for group in context["gpu_groups"] if group[key]]
    if not groups:
        return []
    lines = [f"## {title}", "", intro, ""]
    for group in groups:
        if len(context["gpu_groups"]) > 1:
            lines += [f"### {group['device']}", ""]
        headers = [header + (f" {group['memory_unit']}" if column == "peak" else "") for column, header in columns]
        lines += ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        lines += ["| " + " | ".join(_cell(row[column]) for column, _ in columns) + " |" for row in group[key]]
        lines.append("")
    return lines


def _summary(rows: list[dict[str, Any]], memory_unit: str) -> list[str]:
    lines = [
        f"| cell | status | peak reserved {memory_unit} | s/step | end-to-end s | compile s | speedup | memory saving | gate |",
        "|---|---|--:|--:|--:|--:|--:|--:|---|",
    ]
    for row in rows:
        values = [row[k] or "–" for k in ("peak", "step", "e2e", "compile", "speedup", "memory_saving")]
        if row["batch"]:
            values[2] += f" ({row['batch']})"
        lines.append(f"| {_cell(row['label'])} | {row['status']} | {' | '.join(values)} | {row['gate']} |")
    return [*lines, ""]


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def _slug(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")
