"""The report answers "what should I run on my GPU?" and stays readable at real size: checked on the committed
H100 FLUX.1-dev and SD3 references (no cell runs here)."""

from __future__ import annotations

import itertools
import re
import shutil
import subprocess
from html import unescape
from pathlib import Path

import pandas as pd
import pytest

from bench.report import render, write_report
from bench.report.decision import GIB, decide
from bench.report.plots import SYNTHETIC_DRIFT_REASON, all_plots, drawn_texts, figure_svg, memory_values
from bench.store import read_results
from bench.summary import cell_summary

ROOT = Path(__file__).resolve().parent.parent
FLUX = ROOT / "results" / "reference" / "h100" / "flux-dev-h100"
SD3 = ROOT / "results" / "reference" / "h100" / "sd3-medium-h100"
REFERENCES = {"flux": FLUX, "sd3": SD3}


@pytest.fixture(scope="module")
def frames() -> dict[str, pd.DataFrame]:
    return {name: read_results(folder) for name, folder in REFERENCES.items()}


@pytest.fixture(scope="module")
def flux_html(frames) -> str:
    return render(frames["flux"], FLUX)


def _decision(frame: pd.DataFrame, budgets=(80, 48, 24, 16, 12)):
    cells = cell_summary(frame)
    return cells, decide(frame, cells, "H100", budgets)


def test_each_budget_gets_the_fastest_fitting_finished_cell_eager_and_compiled_apart(frames):
    cells, decision = _decision(frames["flux"])
    ok = cells[cells["status"] == "ok"]
    for row in decision.budgets:
        fits = ok[ok["peak_reserved_bytes"] + GIB <= row.budget_gb * GIB]
        for pick, subset in (
            (row.eager, fits[fits["compile"] == "off"]),
            (row.compiled, fits[fits["compile"] != "off"]),
        ):
            if subset.empty:
                assert pick is None
                continue
            assert pick.step_s == pytest.approx(subset["step_latency_median_s"].min())
            assert pick.needs_bytes <= row.budget_gb * GIB
    by_budget = {row.budget_gb: row for row in decision.budgets}
    assert by_budget[24].eager.label == "bnb_4bit bf16" and by_budget[24].compiled.compile_s > 0
    assert by_budget[80].eager.is_baseline
    assert by_budget[12].eager is None and by_budget[12].compiled is None
    assert decision.smallest.needs_bytes > 12 * GIB and not decision.context_measured


def test_a_run_without_compiled_cells_says_so_rather_than_nothing_fits(frames):
    frame = frames["flux"]
    _, decision = _decision(frame[frame["compile"] == "off"], (80,))
    assert decision.budgets[0].eager is not None and decision.budgets[0].compiled is None
    html = render(frame[frame["compile"] == "off"], FLUX, budgets_gb=(80,))
    section = html.split('<section id="what-to-pick">')[1].split("</section>")[0]
    assert "no compiled cell finished" in section and "nothing fits" not in section


def test_the_cuda_context_measured_by_a_run_replaces_the_default(frames):
    frame = frames["flux"].copy()
    frame["cuda_context_bytes"] = 3 * GIB  # a large context: bnb_4bit eager (20.3 GiB peak) no longer fits 23 GiB
    _, default = _decision(frames["flux"], (23,))
    cells, measured = _decision(frame, (23,))
    assert measured.context_measured and measured.context_gib == pytest.approx(3.0)
    assert default.budgets[0].eager.label == "bnb_4bit bf16" != measured.budgets[0].eager.label
    peak = cells.set_index("cell_id").loc[measured.budgets[0].eager.cell_id, "peak_reserved_bytes"]
    assert measured.budgets[0].eager.needs_bytes == pytest.approx(peak + 3 * GIB) and peak / GIB + 3 <= 23


def test_with_real_weights_and_gates_only_passing_cells_are_picked(frames):
    frame = frames["sd3"].copy()
    frame["weights"] = "real"
    cells = cell_summary(frame)
    fastest = cells[cells["status"] == "ok"].sort_values("step_latency_median_s").iloc[0]
    frame["gate_status"] = "pass"
    frame.loc[frame["cell_id"] == fastest["cell_id"], "gate_status"] = "fail"
    _, decision = _decision(frame, (80,))
    assert decision.gated
    assert fastest["cell_id"] not in {decision.budgets[0].eager.cell_id, decision.budgets[0].compiled.cell_id}


def test_the_report_opens_with_what_to_pick_and_puts_the_environment_below(flux_html):
    body = flux_html.split("<body>")[1]
    assert (
        body.index('<section id="what-to-pick">') < body.index("<h2>Summary</h2>") < body.index("<h2>Environment</h2>")
    )
    section = body.split('<section id="what-to-pick">')[1].split("</section>")[0]
    assert section.count('<tr><td class="text card"><strong>') == 5, "one row per default budget"
    assert "a default of 1.0 GiB" in section and "Pareto front: memory vs step time" in section
    assert "Pareto front: memory vs drift" not in section, "synthetic weights: no drift front"


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    import matplotlib.pyplot as plt

    plt.close("all")


@pytest.mark.parametrize(
    ("name", "as_real", "on_cpu"),
    [("flux", False, False), ("sd3", False, False), ("flux", True, False), ("flux", False, True)],
)
def test_reference_plots_have_no_overlapping_text_and_every_point_names_its_cell(frames, name, as_real, on_cpu):
    """On the references as committed, as if their weights were real (with the drift plots drawn), and as if they
    ran on a CPU (no GPU memory: the memory axis's label is the long one)."""
    frame = frames[name].assign(weights="real") if as_real else frames[name]
    cells = cell_summary(frame.assign(peak_reserved_bytes=float("nan")) if on_cpu else frame)
    ok = cells[cells["status"] == "ok"]
    for number, plot in enumerate(all_plots(cells)):
        assert plot.figure is not None, plot.reason
        plot.figure.canvas.draw()
        renderer = plot.figure.canvas.get_renderer()
        frame_box = plot.figure.bbox
        boxes = [(text.get_text(), text.get_window_extent(renderer)) for text in drawn_texts(plot.figure)]
        for (a, box_a), (b, box_b) in itertools.combinations(boxes, 2):
            assert not box_a.overlaps(box_b), f"{plot.title}: {a!r} overlaps {b!r}"
        for text, box in boxes:
            assert box.x0 >= -1 and box.x1 <= frame_box.x1 + 1 and box.y0 >= -1 and box.y1 <= frame_box.y1 + 1, text
        svg = figure_svg(plot, f"t{number}")
        titles = re.findall(r"<title>([^<]*)</title>", svg)
        assert len(titles) == len(plot.hover) > 0
        assert {unescape(title).split(" (")[0] for title in titles} <= set(ok["cell_label"])


def test_a_pathological_compile_is_drawn_at_the_edge_with_its_value_not_stretching_the_axis(frames):
    plot = all_plots(cell_summary(frames["flux"]))[0]
    ax = plot.figure.axes[0]
    assert ax.get_yscale() == "log" and ax.get_ylim()[1] < 5, "65 s a step must not set the axis"
    written = " ".join(text.get_text() for text in drawn_texts(plot.figure))
    assert "65.1, 65.3 s/step" in written
    assert any("torchao[int8wo] bf16 compile=default: 65.3 s/step" in note for note in plot.notes)


def test_drift_plots_are_not_drawn_for_synthetic_weights_and_the_report_says_why_once(frames, flux_html):
    assert flux_html.count(SYNTHETIC_DRIFT_REASON) == 1
    titles = {plot.title for plot in all_plots(cell_summary(frames["flux"]))}
    assert not titles & {"Drift vs memory", "llm_int8_threshold sweep"}
    assert flux_html.split("<h2>Plots</h2>")[1].count("not drawn") == 1, "no per-plot reason repeats it"


def test_synthetic_block_gguf_never_appears_in_a_drift_view(frames):
    frame = frames["flux"].copy()
    frame["weights"] = "real"  # as if real: only synthetic_blocks keeps the GGUF cells out
    cells = cell_summary(frame)
    plots = {plot.title: plot for plot in all_plots(cells)}
    drift = plots["Drift vs memory"]
    assert drift.hover and not any("synthetic_blocks" in text for text in drift.hover.values())
    _, decision = _decision(frame)
    assert decision.drift_front and not any("synthetic_blocks" in p.label for p in decision.drift_front)


def test_each_series_has_its_own_colour(frames):
    frame = frames["flux"].copy()
    frame["weights"] = "real"
    plots = {plot.title: plot for plot in all_plots(cell_summary(frame))}
    sweep = plots["llm_int8_threshold sweep"].figure.axes[0]
    legend = sweep.get_legend()
    names = [text.get_text() for text in legend.get_texts()]
    assert any("capture-dynamic-output-shapes" in name for name in names), "its own series, not joined to default"
    colours = [
        tuple(line.get_color()) if not isinstance(line.get_color(), str) else line.get_color()
        for line in legend.get_lines()
    ]
    assert len(set(colours)) == len(colours)
    compiled = plots["torch.compile on/off"].figure.legends[0]
    patch_colours = [tuple(patch.get_facecolor()) for patch in compiled.get_patches()]
    assert len(set(patch_colours)) == len(patch_colours)


def test_memory_is_in_mib_for_tiny_models_and_gib_at_real_size(frames):
    cells = cell_summary(frames["flux"])
    assert memory_values(cells)[1].endswith("(GiB)")
    tiny = cells.assign(peak_reserved_bytes=cells["peak_reserved_bytes"] / 1000)
    assert memory_values(tiny)[1].endswith("(MiB)")
    _, decision = _decision(frames["flux"].assign(peak_reserved_bytes=frames["flux"]["peak_reserved_bytes"] / 1000))
    compiled = decision.budgets[-1].compiled  # 12 GB: every tiny cell fits with the 1 GiB context
    assert re.fullmatch(
        r"needs 1\.0 GiB · [\d.]+ s/step · compile \d+ s · saves \d+ MiB \(\d+%\), .*", compiled.facts()
    )


def test_a_folder_without_images_says_so_once_and_tracebacks_fold_away(flux_html):
    assert "image file missing" not in flux_html
    assert flux_html.count('id="no-images"') == 1
    not_run = flux_html.split('<table id="not-run">')[1].split("</table>")[0]
    assert "<details><summary>the whole message" in not_run
    assert not re.search(r"<td class=\"text\">File \"", not_run), "the one-line reason is the exception, not a frame"


def test_markdown_report_has_the_decision_table_summary_and_png_plots_beside_it(tmp_path):
    from bench.cli import main

    output = tmp_path / "docs" / "flux.md"
    assert main(["report", str(SD3), "--format", "md", "-o", str(output), "--budgets", "24,12"]) == 0
    text = output.read_text()
    assert text.index("## What to pick") < text.index("## Summary") < text.index("## Plots")
    assert "| **24 GB** |" in text and "| **12 GB** |" in text and "| **80 GB** |" not in text
    pictures = re.findall(r"!\[[^]]*\]\(([^)]+\.png)\)", text)
    assert len(pictures) >= 2
    for name in pictures:
        assert (output.parent / name).read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize("arguments", [["--format", "pdf"], ["--budgets", "24,zero"], ["--budgets", "0"]])
def test_bad_report_arguments_are_one_line_and_exit_2(tmp_path, capsys, arguments):
    from bench.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["report", str(SD3), "-o", str(tmp_path / "r.html"), *arguments])
    assert exit_info.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("quantbench report: error: argument")


@pytest.mark.browser
@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium (apt-get install chromium)")
@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_reference_report_fits_a_1280_px_window(tmp_path, name):
    report = write_report(REFERENCES[name], tmp_path / f"{name}.html")
    command = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000",
               "--window-size=1280,2000", "--dump-dom", report.as_uri()]  # fmt: skip
    dom = subprocess.run(command, capture_output=True, text=True, timeout=180).stdout
    width = int(re.search(r'data-scroll-width="(\d+)"', dom).group(1))
    assert width <= 1280
    assert dom.count("<svg") >= 3 and dom.count("<title>") > 10, "inline SVG plots with hover titles"


def test_hover_titles_survive_into_the_html(flux_html):
    cells = cell_summary(read_results(FLUX))
    ok_labels = set(cells.loc[cells["status"] == "ok", "cell_label"])
    step_plot = flux_html.split("<h2>Plots</h2>")[1].split("</svg>")[0]
    titles = {unescape(title).split(" (")[0] for title in re.findall(r"<title>([^<]*)</title>", step_plot)}
    assert titles == ok_labels


def test_cells_that_never_started_count_with_the_runs_only_gpu():
    nightly = ROOT / "results" / "reference" / "h200" / "nightly"
    frame = read_results(nightly)
    assert frame.loc[frame["status"] == "unsupported", "gpu_name"].isna().any()  # int4wo: no mslk there
    html = render(frame, nightly, None, (80, 24))
    assert "Measured on CPU" not in html and "NVIDIA H200" in html


def test_a_section_intro_shows_its_code_spans_as_code_and_escapes_the_rest():
    from bench.report import code_spans

    assert code_spans("each `lora = none` cell, a <b> tag") == "each <code>lora = none</code> cell, a &lt;b&gt; tag"
    assert code_spans("an `<x>` span") == "an <code>&lt;x&gt;</code> span"


def test_a_rate_keeps_two_decimals_and_a_slow_one_its_significant_digits():
    from bench.report.numbers import rate

    assert [rate(2.0573), rate(0.8), rate(0.00412)] == ["2.06", "0.80", "0.00412"], "an offloaded method is not 0.00"
