"""The HTML report, compare mode and the notebook, all from real smoke-run Parquet."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bench.compare import compare_frames
from bench.report import write_report
from bench.store import ResultRow, ResultsFolder, read_results

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


def _first_row(results: Path) -> ResultRow:
    """The first row of a results folder, as a ResultRow to change and write as another cell."""
    names = {f.name for f in dataclasses.fields(ResultRow)}
    row = read_results(results).iloc[0].to_dict()
    return ResultRow(**{k: _plain(v) for k, v in row.items() if k in names})


def _plain(value: object) -> object:
    """A value as a ResultRow holds it: lists for the sample columns, None for missing."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    return None if pd.isna(value) else value


@pytest.fixture(scope="module")
def results_with_a_failure(smoke_run, tmp_path_factory):
    """The smoke results plus one failed cell, as a crashed run would leave them."""
    _, results, _ = smoke_run
    folder = tmp_path_factory.mktemp("with-failure") / "results"
    shutil.copytree(results, folder)
    failed = _first_row(results)
    failed.cell_id, failed.cell_label, failed.status = "f" * 12, "torchao[int8dq] bf16", "failed"
    failed.error = "RuntimeError: boom in the cell"
    for column in ("e2e_latency_median_s", "psnr_db", "ssim", "latent_rel_l2", "image_path"):
        setattr(failed, column, None)
    ResultsFolder(folder).write_cell(failed.cell_id, [failed])
    return folder


@pytest.fixture(scope="module")
def report(results_with_a_failure, tmp_path_factory):
    return write_report(results_with_a_failure, tmp_path_factory.mktemp("report") / "index.html")


def test_report_is_one_self_contained_file(report):
    html = report.read_text()
    assert html.count("data:image/png;base64,") >= 5, "the images' thumbnails"
    assert html.count("<svg") >= 1, "the plots, inline"
    assert not re.search(r'(src|href)="(?!data:|#)', html), "everything is embedded (or points inside the page)"


def test_report_has_a_summary_row_per_cell_and_lists_the_failure(report):
    html = report.read_text()
    summary = html.split('id="summary"')[1].split("</table>")[0]
    assert summary.count("<tr>") == 1 + 3  # header + 3 cells
    not_run = html.split('id="not-run"')[1].split("</table>")[0]
    assert "RuntimeError: boom in the cell" in not_run and "status-failed" in not_run
    assert re.search(r"ran \d+ s: imports \d+\.\d s, .*load and place \d+\.\d s, warm-up \d+\.\d s", not_run)


def test_a_compiled_cell_is_flagged_for_graph_breaks_and_int8pack_rewrites(smoke_run, tmp_path):
    import json
    from html import unescape

    from bench.heartbeat import CompileCounts

    _, results, _ = smoke_run
    folder = tmp_path / "results"
    shutil.copytree(results, folder)
    compiled = _first_row(results)
    compiled.cell_id, compiled.cell_label, compiled.compile, compiled.compile_s = (
        "c" * 12,
        "x compile=default",
        "default",
        9.0,
    )
    compiled.step_latency_median_s = read_results(results)["step_latency_median_s"].min() / 2  # faster than eager
    counts = CompileCounts(35, 6, 67, 0, 0, int8_weight_only_rewrites=30, graph_breaks=17)
    compiled.compile_counts = json.dumps(dataclasses.asdict(counts))
    ResultsFolder(folder).write_cell(compiled.cell_id, [compiled])
    html = unescape(write_report(folder, tmp_path / "report.html").read_text())
    summary = html.split('id="summary"')[1].split("</table>")[0]
    assert ">17 graph breaks</span>" in summary and "the cell's log gives the commonest reasons" in summary
    assert ">30 linears rewritten into _weight_int8pack_mm</span>" in summary
    assert 'inductor = "stock-no-pattern-matcher"' in summary, "the flag names the preset that avoids it"
    assert summary.count('class="compile recompiled"') == 2, "the smoke run's own cells are eager: no flags"


def test_a_compiled_cell_is_compared_with_the_same_cell_eager(smoke_run, tmp_path):
    from html import unescape

    from bench.summary import cell_summary

    _, results, _ = smoke_run
    folder = tmp_path / "results"
    shutil.copytree(results, folder)
    eager = _first_row(results)
    eager_step = cell_summary(read_results(results)).set_index("cell_id").loc[eager.cell_id, "step_latency_median_s"]
    for cell_id, step, dtype in (("f" * 12, eager_step / 2, eager.dtype), ("s" * 12, eager_step * 2, eager.dtype),
                                 ("o" * 12, eager_step / 2, "other")):  # fmt: skip
        compiled = dataclasses.replace(eager, cell_id=cell_id, cell_label=f"{cell_id} compile=default", dtype=dtype)
        compiled.compile, compiled.step_latency_median_s = "default", step
        ResultsFolder(folder).write_cell(cell_id, [compiled])
    summary = cell_summary(read_results(folder)).set_index("cell_id")
    assert summary.loc["f" * 12, "eager_step_latency_median_s"] == eager_step
    assert pd.isna(summary.loc["o" * 12, "eager_step_latency_median_s"]), "another dtype: no eager twin"
    assert summary["eager_step_latency_median_s"].notna().sum() == 2, "eager cells compare with nothing"
    html = unescape(write_report(folder, tmp_path / "report.html").read_text())
    rows = {
        cell_id: html.split(f"<code>{cell_id}</code>")[1].split("</tr>")[0]
        for cell_id in ("f" * 12, "s" * 12, "o" * 12)
    }
    assert ">2.00× faster</span>" in rows["f" * 12] and "recompiled" not in rows["f" * 12]
    assert (
        f'class="compile recompiled" title="the same cell uncompiled: {eager_step:.4f} s a step (median)">slower than eager'
        in rows["s" * 12]
    )
    assert "than eager" not in rows["o" * 12] and "× faster" not in rows["o" * 12]


def test_phases_run_says_how_long_a_cell_ran_and_what_it_finished():
    from bench.summary import phases_run

    killed = pd.Series({"cell_wall_s": 1500.25, "import_s": 7.06, "quantize_s": 23.8, "warmup_s": 1065.8})
    assert phases_run(killed) == "ran 1500 s: imports 7.1 s, quantize 23.8 s, warm-up 1065.8 s"
    stepped = pd.Series({**killed, "warmup_step_median_s": 55.2041, "load_s": 3.2})
    assert phases_run(stepped) == (
        "ran 1500 s: imports 7.1 s, quantize 23.8 s, load and place 3.2 s, "
        "warm-up 1065.8 s (its steps after the first: median 55.204 s)"
    ), "the warm-up's step time is in the phase it was measured in"
    assert phases_run(pd.Series({"cell_wall_s": 3.0, "import_s": None})) == "ran 3 s"
    assert phases_run(pd.Series({"cell_wall_s": None})) == "", "a cell that never ran (e.g. unsupported)"


def test_missing_metrics_show_as_missing_with_a_reason_never_zero(report):
    import torch

    html = report.read_text()
    if not torch.cuda.is_available():
        assert 'title="GPU memory was not measured (see notes)">missing' in html
    missing = html.split('id="missing-metrics"')[1].split("</table>")[0]
    assert "ms_ssim" in missing and "MS-SSIM needs &gt;= 161 px" in missing
    assert "clip_score" in missing and "lpips_alex" in missing


def test_report_warns_that_synthetic_drift_is_not_quality(report):
    assert "Synthetic weights." in report.read_text()


def test_report_shows_the_layer_benchmarks_with_a_roofline(smoke_run, tmp_path):
    from bench.kernels.results import read_kernel_results

    _, results, _ = smoke_run
    kernels = tmp_path / "kernels.json"
    # a pytest of its own, not a pytest-xdist worker's (pytest-benchmark writes no JSON in a worker)
    env = {name: value for name, value in os.environ.items() if not name.startswith("PYTEST_XDIST")}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "tests/kernels", "-q", "-p", "no:cacheprovider", "-k", "bf16-eager or int8wo-eager",
         f"--benchmark-json={kernels}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:]
    cases, peaks = read_kernel_results(kernels)
    assert set(cases["method"]) == {"bf16", "torchao_int8wo"} and peaks.matmul_tflops > 0
    assert (
        cases["weight_bytes"][cases["method"] == "torchao_int8wo"]
        < cases["weight_bytes"][cases["method"] == "bf16"].max()
    ).all()
    html = write_report(results, tmp_path / "report.html", kernels).read_text()
    table = html.split('id="kernels"')[1].split("</table>")[0]
    assert table.count("<tr>") == 1 + len(cases)
    assert re.search(r'<figure id="roofline"[^>]*><svg', html) and "TFLOP/s bf16 matmul" in html


def test_report_command_on_an_empty_folder_is_a_clear_error(tmp_path):
    from bench.errors import UserError

    ResultsFolder(tmp_path).create()
    with pytest.raises(UserError, match="holds no result rows"):
        write_report(tmp_path, tmp_path / "out.html")


def test_compare_flags_memory_and_latency_regressions_only(smoke_run):
    _, results, _ = smoke_run

    def quiet(frame: pd.DataFrame, column: str) -> list[np.ndarray]:
        """Each row's samples spread ±1 % around its cell's median over all its rows (prompts)."""
        pooled = frame.groupby("cell_id")[column].transform(lambda rows: np.median(np.concatenate(list(rows))))
        return [
            median * (1 + 0.01 * np.linspace(-1, 1, len(samples))) for samples, median in zip(frame[column], pooled)
        ]

    # a quiet machine's spread: the smoke run's own depends on how busy this CPU was (a step can stall for seconds
    # next to another test's cells, and one prompt's row can run several times slower than the other's, so that
    # the pooled samples of the two rows are two clusters), and the verdict's interval with it
    old = read_results(results).pipe(
        lambda f: f.assign(
            e2e_latency_iqr_s=0.01 * f["e2e_latency_median_s"],
            step_times_s=quiet(f, "step_times_s"),
            e2e_times_s=quiet(f, "e2e_times_s"),
        )
    )
    same = compare_frames(old, old.copy())
    assert (same["regressions"] == "").all()
    new = old.copy()
    torchao = new["method"] == "torchao"
    new["transformer_tensor_bytes"] = (
        new["transformer_tensor_bytes"]
        .where(~torchao, (new["transformer_tensor_bytes"] * 1.05).round())
        .astype("int64")
    )
    new.loc[torchao, "e2e_latency_median_s"] = new.loc[torchao, "e2e_latency_median_s"] * 3
    for column in ("step_times_s", "e2e_times_s"):  # the samples the verdict uses
        new[column] = [values * 3 if slowed else values for values, slowed in zip(new[column], torchao, strict=True)]
    flagged = compare_frames(old, new).set_index("cell")
    assert "transformer_tensor_bytes +5.0%" in flagged.loc["torchao[int8wo] bf16", "regressions"]
    assert "latency +200.0% [" in flagged.loc["torchao[int8wo] bf16", "regressions"]
    assert flagged.loc["baseline bf16", "regressions"] == ""


def test_compare_flags_more_graph_breaks_only_where_both_rows_counted_them(smoke_run):
    import json

    _, results, _ = smoke_run
    old = read_results(results)
    counts = {"graphs": 1, "graphs_from_cache": 0, "triton_kernels": 0, "coordinate_descent_benchmarks": 0}
    counted = json.dumps({**counts, "autotuned_ops": 0, "graph_breaks": 0})
    uncounted = json.dumps({**counts, "autotuned_ops": 0})  # a row from before graph breaks were counted
    first, second = sorted(old["cell_id"].unique())[:2]
    old = old.assign(compile_counts=old["cell_id"].map({first: counted, second: uncounted}))
    new = old.assign(compile_counts=json.dumps({**json.loads(counted), "graph_breaks": 12}))
    regressions = compare_frames(old, new).set_index("cell_id")["regressions"]
    assert "graph breaks 0 -> 12 (the cell's log gives the reasons)" in regressions[first]
    assert "graph breaks" not in regressions[second], "no verdict without a count on both sides"


def test_time_breakdown_accounts_for_every_second_of_the_cells(smoke_run):
    from bench.report import render
    from bench.summary import time_breakdown

    _, results, _ = smoke_run
    frame = read_results(results)
    breakdown = time_breakdown(frame).set_index("phase")
    cells = frame.groupby("cell_id").first()
    assert breakdown["seconds"].sum() == pytest.approx(cells["cell_wall_s"].sum())
    assert breakdown["share"].sum() == pytest.approx(1.0)
    quantize = breakdown.loc["loading the quantized components (quantizing happens here)", "seconds"]
    assert quantize == pytest.approx(cells["quantize_s"].sum()) and quantize > 0
    imports = breakdown.loc["cell start to its libraries and model classes imported", "share"]
    assert 0 < imports < 1
    html = render(frame, results)
    assert '<table id="time-spent">' in html and f"{imports:.1%}" in html
    assert "serialization round trip" not in html, "phases no cell had are left out"
    assert "They ran one at a time" in html and '<span id="busy-wall">' in html
    from bench.store import read_runs

    runs = read_runs(results)
    assert '<p id="driver-time">' in html and f"{len(runs)} recorded" in html
    assert f"{sum(run['wall_s'] for run in runs):.1f} s of wall time" in html
    assert "driver-time" not in render(frame, results / "elsewhere"), "no runs recorded, no driver line"


def test_time_breakdown_puts_the_unfinished_phase_of_a_killed_cell_apart_from_the_harness_rest():
    from bench.summary import TIME_PHASES, time_breakdown

    phases = {column: float("nan") for column, _, _ in TIME_PHASES if column != "timed_s"}
    finished = {**phases, "cell_id": "a", "cell_wall_s": 30.0, "import_s": 5.0, "warmup_s": 10.0,
                "e2e_latency_median_s": 4.0, "repeats": 2}  # fmt: skip
    # killed at its time limit during the timed runs: its row keeps the phases it finished
    killed = {**phases, "cell_id": "b", "cell_wall_s": 1500.0, "import_s": 7.0, "warmup_s": 1066.0,
              "e2e_latency_median_s": float("nan"), "repeats": 2}  # fmt: skip
    breakdown = time_breakdown(pd.DataFrame([finished, killed])).set_index("phase")["seconds"]
    assert breakdown["warm-up generations (torch.compile compiles here)"] == 1076.0
    timed = "timed generations (median x repeats per prompt and seed, and the `resolutions` sweep)"
    assert breakdown[timed] == 8.0
    assert breakdown["rest of the cell process (interpreter start, saving outputs, exit)"] == 30.0 - 5 - 10 - 8
    unfinished = "rest of the cells that timed nothing (the phase each was in when it failed or was killed)"
    assert breakdown[unfinished] == 1500.0 - 7 - 1066
    assert breakdown.sum() == 1530.0


def test_time_breakdown_counts_the_resolution_sweep_as_timed_not_as_harness_rest():
    import json

    from bench.summary import TIME_PHASES, time_breakdown

    phases = {column: float("nan") for column, _, _ in TIME_PHASES if column != "timed_s"}
    sizes = [{"e2e_latency_s": [1.0, 1.0]}, {"e2e_latency_s": [300.0, 1.0]}, {"e2e_latency_s": [1.0, 1.0]}]
    cell = {**phases, "cell_id": "a", "cell_wall_s": 320.0, "warmup_s": 10.0, "e2e_latency_median_s": 1.0,
            "repeats": 2, "per_resolution": json.dumps(sizes)}  # fmt: skip
    breakdown = time_breakdown(pd.DataFrame([cell])).set_index("phase")["seconds"]
    # the cell's own timed runs, then the sweep: every size again, the recompile at the second included
    assert breakdown.filter(like="timed generations").item() == 2.0 + (2.0 + 301.0 + 2.0)
    assert breakdown["rest of the cell process (interpreter start, saving outputs, exit)"] == 320.0 - 10 - 307


def test_unfinished_cells_add_up_their_tries_and_leave_out_cells_finished_since(tmp_path):
    from bench.report import _unfinished_cells

    runs = [
        {"ended": "time limit", "unfinished": [{"cell_id": "a", "cell_label": "A compile=default", "ran_s": 100.4}]},
        {"ended": "done"},  # recorded before runs listed their unfinished cells
        {"ended": "interrupted", "unfinished": [
            {"cell_id": "a", "cell_label": "A compile=default", "ran_s": 50.0},
            {"cell_id": "b", "cell_label": "B", "ran_s": 5.0},
        ]},
    ]  # fmt: skip
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "a.interrupted.log").write_text(
        "[quantbench] warm-up: 386.6 s (its steps after the first: median 65.286 s)\n"
        "[quantbench] timed prompt 0, seed 0: still running, 60 s in (run 1 of 2, 0 of 4 denoising steps done)\n"
    )
    [cell] = _unfinished_cells(runs, {"b"}, tmp_path)
    assert cell == {"id": "a", "label": "A compile=default", "ran_s": "150", "tries": 2, "ended": "interrupted",
                    "log": "logs/a.interrupted.log", "warmup_step_s": "65.286"}  # fmt: skip
    assert _unfinished_cells(runs, {"a", "b"}, tmp_path) == []
    (tmp_path / "logs" / "c.interrupted.log").write_text("warm-up")  # left by a run that did not record it
    assert _unfinished_cells(runs, {"a", "b"}, tmp_path) == [
        {
            "id": "c",
            "label": "",
            "ran_s": "?",
            "tries": 0,
            "ended": "not recorded",
            "log": "logs/c.interrupted.log",
            "warmup_step_s": "–",
        }  # stopped in its warm-up
    ]


def _timed_cells(intervals: dict[str, tuple[float, float]]) -> pd.DataFrame:
    """Rows of cells that ran from start to end (seconds after 12:00:00), finish times rounded to the second
    as the driver writes them."""
    noon = pd.Timestamp("2026-01-01 12:00:00", tz="UTC")
    return pd.DataFrame(
        [
            {"cell_id": cell, "cell_wall_s": end - start,
             "timestamp_utc": (noon + pd.Timedelta(seconds=end)).floor("s").isoformat()}
            for cell, (start, end) in intervals.items()
        ]
    )  # fmt: skip


def test_run_times_measure_wall_time_and_cells_side_by_side():
    from bench.summary import run_times

    one_after_another = run_times(_timed_cells({"a": (0, 10.4), "b": (10.6, 20.2), "c": (20.5, 30.7)}))
    assert one_after_another.most_at_once == 1, "a second of rounding is not two cells at once"
    assert one_after_another.cell_s == pytest.approx(30.2)
    two_gpus = _timed_cells({"a": (0, 10), "b": (0, 12), "c": (10, 20), "d": (100, 105)})  # d: resumed later
    together = run_times(two_gpus)
    assert together.most_at_once == 2 and together.cells == 4
    assert together.busy_s == pytest.approx(25) and together.cell_s == pytest.approx(37)
    assert run_times(two_gpus, {"a", "c"}).busy_s == pytest.approx(20)


def test_compare_gives_the_wall_time_scaling_of_a_run_on_several_gpus():
    from bench.compare import wall_time_comparison

    old = _timed_cells({"a": (0, 10), "b": (10, 20), "c": (20, 30), "d": (30, 40)})
    new = _timed_cells({"a": (0, 12), "b": (0, 12), "c": (12, 24), "d": (12, 24), "e": (24, 34)})
    line = wall_time_comparison(old, new)
    assert "wall time of the 4 cells both runs ran: 40 s (1 at a time) -> 24 s (2 at a time)" in line
    assert line.endswith("new = 1.20 x (old / 2)")
    assert "x (old" not in wall_time_comparison(old, old)


def _on_two_gpus(frame: pd.DataFrame) -> pd.DataFrame:
    """The smoke rows as if run twice: once on an H100, once (other cell ids) on an A100 at half the speed."""
    h100 = frame.assign(gpu_name="NVIDIA H100 80GB HBM3", peak_reserved_bytes=10 * 1024**3)
    a100 = frame.assign(
        gpu_name="NVIDIA A100-SXM4-80GB",
        cell_id=frame["cell_id"] + "-a100",
        e2e_latency_median_s=frame["e2e_latency_median_s"] * 2,
        peak_reserved_bytes=12 * 1024**3,
    )
    return pd.concat([h100, a100], ignore_index=True)


def test_cells_from_different_gpus_are_summarised_apart(smoke_run, tmp_path):
    from bench.report import render
    from bench.summary import cell_summary

    _, results, _ = smoke_run
    frame = _on_two_gpus(read_results(results))
    cells = cell_summary(frame).set_index("cell_id")
    torchao = frame.loc[frame["method"] == "torchao", "cell_id"].unique()
    for cell_id in torchao:  # each against the baseline of its own GPU
        gpu = cells.loc[cell_id, "gpu_name"]
        base = cells[(cells["method"] == "baseline") & (cells["gpu_name"] == gpu)].iloc[0]
        assert cells.loc[cell_id, "speedup"] == pytest.approx(
            base["e2e_latency_median_s"] / cells.loc[cell_id, "e2e_latency_median_s"]
        )
        assert cells.loc[cell_id, "memory_saving"] == 0
    html = render(frame, results)
    assert "holds cells from 2 different devices" in html
    tables = re.findall(r'<table id="summary[^"]*" class="summary" data-device="([^"]+)">(.*?)</table>', html, re.S)
    assert [device for device, _ in tables] == ["NVIDIA A100-SXM4-80GB", "NVIDIA H100 80GB HBM3"]
    assert all(body.count("<tr>") == 1 + 2 for _, body in tables)  # header + baseline + torchao on each GPU


def test_compare_does_not_call_another_gpu_a_regression(smoke_run, tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from bench.cli import main
    from bench.store import SCHEMA

    _, results, _ = smoke_run
    old = read_results(results).assign(gpu_name="NVIDIA H100 80GB HBM3")
    new = old.assign(gpu_name="NVIDIA A100-SXM4-80GB", e2e_latency_median_s=old["e2e_latency_median_s"] * 3)
    table = compare_frames(old, new)
    assert (table["regressions"] == "").all()
    assert table["note"].str.contains("not compared: ran on NVIDIA H100 80GB HBM3, now on NVIDIA A100").all()
    paths = {}
    moved = old.assign(gpu_name=new["gpu_name"].where(old["method"] != "baseline", old["gpu_name"]))
    for name, frame in {"h100": old, "a100": new, "moved": moved}.items():
        paths[name] = str(tmp_path / f"{name}.parquet")
        pq.write_table(pa.Table.from_pandas(frame, schema=SCHEMA, preserve_index=False), paths[name])
    assert main(["compare", paths["h100"], paths["a100"]]) == 2, "no cell compared: no verdict, not a pass"
    assert "ran on different devices (not compared: ran on NVIDIA H100" in capsys.readouterr().err
    assert main(["compare", paths["h100"], paths["moved"]]) == 0, "the baseline, on the same GPU, is compared"
    said = capsys.readouterr().out
    assert "not compared: ran on" in said and "ran on a CPU" not in said


def test_compare_cli_exits_1_on_a_regression_and_0_otherwise(smoke_run, tmp_path, capsys):
    _, results, _ = smoke_run
    slower = read_results(results)
    # every sample at least twice the run's slowest: beyond any interval's reach, even when a busy machine stalled
    # one prompt's row (its samples then form two clusters, and a resampled median may land in either)
    for column in ("step_times_s", "e2e_times_s"):
        slowest = max(values.max() for values in slower[column])
        slower[column] = [values + 2 * slowest for values in slower[column]]
    slower_path = tmp_path / "slower.parquet"
    import pyarrow as pa
    import pyarrow.parquet as pq

    from bench.store import SCHEMA

    pq.write_table(pa.Table.from_pandas(slower, schema=SCHEMA, preserve_index=False), slower_path)
    from bench.cli import main

    assert main(["compare", str(results), str(results)]) == 0
    said = " ".join(capsys.readouterr().out.split())
    assert "not compared" not in said
    assert "cells that ran on a CPU: their latency moves with whatever else the machine runs" in said
    one_cell = slower[slower["cell_id"] == slower["cell_id"].iloc[0]]
    pq.write_table(pa.Table.from_pandas(one_cell, schema=SCHEMA, preserve_index=False), tmp_path / "one.parquet")
    assert main(["compare", str(results), str(tmp_path / "one.parquet")]) == 1
    assert f"1 cell of {results} is not in {tmp_path / 'one.parquet'}: not compared" in capsys.readouterr().out
    assert main(["compare", str(results), str(slower_path), "-o", str(tmp_path / "delta.csv")]) == 1
    assert pd.read_csv(tmp_path / "delta.csv")["regressions"].str.contains("interval lies above").all()


def test_notebook_runs_on_smoke_results(smoke_run, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    NotebookClient = pytest.importorskip("nbclient").NotebookClient

    _, results, _ = smoke_run
    monkeypatch.setenv("QUANTBENCH_RESULTS", str(results))
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    notebook = nbformat.read(ROOT / "reports" / "quantbench.ipynb", as_version=4)
    NotebookClient(notebook, timeout=300, resources={"metadata": {"path": str(ROOT / "reports")}}).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    printed = [o for o in outputs if o.output_type == "stream"]
    assert "4 rows, 2 cells" in printed[0]["text"]
    first_table = next(o for o in outputs if "text/html" in o.get("data", {}))["data"]["text/html"]
    if "which card a cell fits cannot be told" in "".join(o["text"] for o in printed):  # a CPU run: no GPU memory
        assert "s/step" in first_table and "fastest eager" not in first_table, "the Pareto front comes first"
    else:
        assert "fastest eager" in first_table, "the decision table comes first"
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 1


@pytest.mark.browser
@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium (apt-get install chromium)")
def test_report_renders_in_a_real_browser_with_no_broken_image(report, tmp_path):
    command = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000"]
    dom = subprocess.run(
        [*command, "--window-size=1280,2400", "--dump-dom", report.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    shot = tmp_path / "report.png"
    subprocess.run(
        [*command, "--window-size=1280,2400", f"--screenshot={shot}", report.as_uri()], capture_output=True, timeout=120
    )
    images = int(re.search(r'data-images="(\d+)"', dom).group(1))
    assert images == dom.count("<img")
    assert images >= 5
    assert 'data-broken-images="0"' in dom
    assert int(re.search(r'data-scroll-width="(\d+)"', dom).group(1)) <= 1280, "no horizontal scroll at 1280 px"
    assert dom.split('id="summary"')[1].split("</table>")[0].count("<tr>") == 4
    assert shot.stat().st_size > 10_000


def test_compile_plot_has_a_bar_per_compile_variant_of_the_same_method():
    from bench.report.plots import compile_comparison

    cells = pd.DataFrame(
        {
            "cell_id": list("abcd"), "method": "baseline", "method_options": "{}", "dtype": "bf16", "threshold": None,
            "compile": ["off", "default", "default", "default"],
            "fullgraph": [None, False, False, False],
            "inductor": [None, None, None, "torchao"],
            "regional": [None, None, True, None],
            "step_latency_median_s": [1.0, 0.8, 0.85, 0.7],
            "e2e_latency_median_s": [4.0, 3.2, 3.4, 2.8],
            "cell_label": ["baseline bf16", "baseline bf16 compile=default", "baseline bf16 compile=default+regional",
                           "baseline bf16 compile=default+inductor=torchao"],
        }
    )  # fmt: skip
    plot = compile_comparison(cells)
    legend = [text.get_text() for text in plot.figure.legends[0].get_texts()]
    assert legend == ["off", "default", "default+inductor=torchao", "default+regional"]
    bars = sorted(round(patch.get_width(), 2) for patch in plot.figure.axes[0].patches)
    assert bars == [0.7, 0.8, 0.85, 1.0]
    assert len({tuple(patch.get_facecolor()) for patch in plot.figure.axes[0].patches}) == 4, "a colour per variant"
