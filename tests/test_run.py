"""End to end on the built-in tiny FLUX: real cell subprocesses, Parquet read back, resume, failures."""

from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image

from bench.matrix import load_matrix
from bench.runner import run_matrix
from bench.store import SCHEMA_VERSION, ResultsFolder, read_results

pytestmark = pytest.mark.slow


def test_smoke_run_writes_one_ok_row_per_cell_prompt_and_seed(smoke_run):
    matrix, results, summary = smoke_run
    frame = read_results(results)
    assert summary.statuses == {"ok": 2}
    assert len(frame) == len(matrix.cells) * 2 * 1
    assert set(frame["status"]) == {"ok"}
    assert set(zip(frame["cell_id"], frame["prompt_index"])) == {(c.id, p) for c in matrix.cells for p in (0, 1)}
    for column in ("load_s", "warmup_s", "e2e_latency_median_s", "step_latency_median_s", "cpu_peak_rss_bytes"):
        assert (frame[column] > 0).all(), column
    assert (frame["e2e_latency_iqr_s"] >= 0).all()
    assert frame.loc[frame.method == "torchao", "quantize_s"].gt(0).all()
    assert frame.loc[frame.method == "baseline", "quantize_s"].isna().all()


def test_each_run_records_its_wall_time_and_the_drivers_own_work(smoke_run):
    from bench.store import read_runs

    _, results, _ = smoke_run
    first = read_runs(results)[0]
    assert first["ended"] == "done" and first["executor"] == "local" and first["cells_run"] == 2
    driver = first["plan_s"] + first["reference_s"] + first["scoring_s"]
    assert first["reference_s"] > 0 and first["scoring_s"] > 0, "the smoke run made its references and scored"
    assert first["cell_s"] > 0 and driver + first["cell_s"] <= first["wall_s"], "the parts fit in the whole"


def test_gpu_memory_columns_are_measured_on_gpu_and_null_with_a_reason_on_cpu(smoke_run):
    import torch

    _, results, _ = smoke_run
    frame = read_results(results)
    for column in ("resident_reserved_bytes", "peak_reserved_bytes", "peak_allocated_bytes"):
        if torch.cuda.is_available():
            assert (frame[column] > 0).all(), column
        else:
            assert frame[column].isna().all(), column
    if torch.cuda.is_available():
        assert frame["gpu_memory_note"].isna().all() and frame["gpu_name"].notna().all()
    else:
        assert frame["gpu_memory_note"].str.contains("no CUDA device").all()


def test_rows_record_axes_model_and_environment(smoke_run):
    _, results, _ = smoke_run
    frame = read_results(results)
    torchao = frame[frame.method == "torchao"].iloc[0]
    assert torchao["method_options"] == '{"quant_type": "int8wo"}'
    assert torchao["components"] == "transformer"
    assert torchao["weights"] == "synthetic"
    assert torchao["pipeline_class"] == "FluxPipeline"
    assert torchao["torch_version"].startswith("2.")
    assert torchao["torchao_version"] and torchao["diffusers_version"]
    assert torchao["schema_version"] == SCHEMA_VERSION == 2


def test_rows_keep_every_timed_step_and_generation(smoke_run):
    matrix, results, _ = smoke_run
    generation = matrix.generation
    for _, row in read_results(results).iterrows():
        assert len(row["e2e_times_s"]) == generation.repeats
        assert len(row["step_times_s"]) == (generation.num_inference_steps - 1) * generation.repeats
        assert row["step_latency_median_s"] == np.median(row["step_times_s"])


def test_torchao_int8_really_shrinks_the_transformer(smoke_run):
    _, results, _ = smoke_run
    frame = read_results(results).groupby("method").first()
    baseline, int8 = frame.loc["baseline"], frame.loc["torchao"]
    # torchao's subclasses report their bf16 size through get_memory_footprint; the stored bytes are smaller
    assert int8["transformer_tensor_bytes"] < 0.75 * baseline["transformer_tensor_bytes"]
    assert int8["transformer_footprint_bytes"] == baseline["transformer_footprint_bytes"]


def test_images_are_saved_per_prompt_and_seed_named_by_cell_id(smoke_run):
    _, results, _ = smoke_run
    frame = read_results(results)
    for _, row in frame.iterrows():
        image = Image.open(results / row["image_path"])
        assert image.size == (64, 64)
        assert row["image_path"].startswith(f"images/{row['cell_id']}/")
    pixels = np.asarray(Image.open(results / frame.iloc[0]["image_path"]), dtype=float)
    assert pixels.std() > 0, "a real image, not a constant fill"


class RecordedProgress:
    """A `RunProgress` that keeps what it was told."""

    def __init__(self) -> None:
        self.events: list[tuple] = []

    def preparing(self) -> None:
        self.events.append(("preparing",))

    def planned(self, todo: int) -> None:
        self.events.append(("planned", todo))

    def cell_started(self, cell) -> None:
        self.events.append(("started", cell.label))

    def cell_done(self, cell, status: str) -> None:
        self.events.append(("done", cell.label, status))


def test_rerun_skips_completed_cells_without_touching_them(smoke_run):
    matrix, results, _ = smoke_run
    parts = ResultsFolder(results).cells_dir
    before = {p.name: p.stat().st_mtime_ns for p in parts.glob("*.parquet")}
    progress = RecordedProgress()
    summary = run_matrix(matrix, results, progress=progress)
    assert summary.already_done == 2
    assert sum(summary.statuses.values()) == 0
    assert progress.events == [("preparing",), ("planned", 0)]
    assert {p.name: p.stat().st_mtime_ns for p in parts.glob("*.parquet")} == before


@pytest.fixture(scope="module")
def baseline_run(smoke_run, tmp_path_factory):
    """The smoke matrix's baseline alone, run into a new results folder once smoke_run has cached its reference."""
    from tests.conftest import matrix_data, write_matrix

    folder = tmp_path_factory.mktemp("baseline")
    matrix = load_matrix(write_matrix(folder, matrix_data(axes={"method": ["baseline"]})))
    summary = run_matrix(matrix, folder / "results")
    return matrix, folder / "results", summary


def test_force_reruns_and_the_same_seed_gives_identical_images(baseline_run, tmp_path):
    import shutil

    matrix, finished, _ = baseline_run
    results = shutil.copytree(finished, tmp_path / "results")  # this test's own copy of the finished run
    first = read_results(results)
    pixels = [np.asarray(Image.open(results / p)) for p in first["image_path"]]
    progress = RecordedProgress()
    summary = run_matrix(matrix, results, force=True, progress=progress)
    second = read_results(results)
    assert summary.statuses == {"ok": 1} and summary.already_done == 0
    cell = matrix.cells[0]
    assert progress.events == [("preparing",), ("planned", 1), ("started", cell.label), ("done", cell.label, "ok")]
    assert (second["timestamp_utc"] >= first["timestamp_utc"]).all()
    for before, path in zip(pixels, second["image_path"]):
        np.testing.assert_array_equal(before, np.asarray(Image.open(results / path)))


def test_crashing_cell_becomes_a_failed_row_and_the_other_cells_complete(tmp_path, monkeypatch, quantbench_cache):
    from tests.conftest import matrix_data, write_matrix

    matrix = load_matrix(write_matrix(tmp_path, matrix_data()))
    torchao = next(c for c in matrix.cells if c.method == "torchao")
    monkeypatch.setenv("QUANTBENCH_INJECT_FAULT", f"crash@{torchao.id}")
    summary = run_matrix(matrix, tmp_path / "results")
    frame = read_results(tmp_path / "results")
    assert summary.statuses == {"ok": 1, "failed": 1}
    failed = frame[frame.cell_id == torchao.id]
    assert len(failed) == 2 and set(failed["status"]) == {"failed"}
    assert failed["error"].str.contains("injected crash").all()
    assert failed["log_tail"].str.contains("RuntimeError: injected crash").all()
    assert set(frame.loc[frame.cell_id != torchao.id, "status"]) == {"ok"}


def test_drift_of_the_torchao_cell_is_finite_and_non_zero(smoke_run):
    _, results, _ = smoke_run
    rows = read_results(results).query("method == 'torchao'")
    assert np.isfinite(rows["psnr_db"]).all() and (rows["psnr_db"] > 10).all()
    assert ((rows["ssim"] > 0) & (rows["ssim"] < 1)).all()
    assert (rows["latent_rel_l2"] > 0).all() and (rows["latent_cosine"] < 1).all()
    assert rows["reference_key"].notna().all() and (rows["reference_dtype"] == "bf16").all()


def test_baseline_cell_reproduces_the_reference_exactly_on_cpu(smoke_run):
    import torch

    if torch.cuda.is_available():
        pytest.skip(
            "on a GPU the baseline's run-to-run drift is recorded (its PSNR against the reference), not asserted"
        )
    _, results, _ = smoke_run
    rows = read_results(results).query("method == 'baseline'")
    assert np.isinf(rows["psnr_db"]).all()
    assert (rows["latent_rel_l2"] == 0).all()


def test_missing_metrics_are_null_with_reasons_in_every_row(smoke_run):
    import json

    _, results, _ = smoke_run
    frame = read_results(results)
    assert frame["ms_ssim"].isna().all() and frame["clip_score"].isna().all()
    for notes in frame["metric_notes"]:
        notes = json.loads(notes)
        assert notes["ms_ssim"].startswith("metric_unavailable: image is 64x64")
        assert notes["clip_score"].startswith("metric_unavailable: ")
    assert json.loads(frame["metric_models"].iloc[0])["clip"] == "openai/clip-vit-large-patch14"


def test_quality_gates_mark_each_cell(smoke_run):
    _, results, _ = smoke_run
    frame = read_results(results)
    verdicts = frame.groupby("method")["gate_status"].unique()
    assert list(verdicts["baseline"]) == ["pass"]
    assert list(verdicts["torchao"]) == ["fail"]
    assert frame.query("method == 'torchao'")["gate_failures"].str.contains("breaks max_latent_rel_l2 = 0.001").all()


def test_reference_is_computed_once_and_then_read_from_the_cache(baseline_run):
    _, _, summary = baseline_run  # a new results folder, after smoke_run computed the reference
    assert summary.reference_runs == 0
    assert summary.statuses == {"ok": 1}


def test_stable_diffusion_3_runs_end_to_end(tmp_path, quantbench_cache):
    from tests.conftest import matrix_data, write_matrix

    data = matrix_data(
        name="sd3",
        generation={"prompts": ["a red apple"], "guidance_scale": 5.0},
        axes={"method": ["baseline", "torchao"], "components": [["transformer", "text_encoder_3"]]},
    )
    data["model"] = {"builtin": "tiny-sd3"}
    summary = run_matrix(load_matrix(write_matrix(tmp_path, data)), tmp_path / "results")
    frame = read_results(tmp_path / "results")
    assert summary.statuses == {"ok": 2}
    assert set(frame["pipeline_class"]) == {"StableDiffusion3Pipeline"}
    torchao = frame[frame.method == "torchao"].iloc[0]
    assert torchao["components"] == "transformer,text_encoder_3"
    assert 10 < torchao["psnr_db"] < float("inf")


def test_pipeline_quantization_config_gives_the_same_cell_as_loading_components_one_by_one(tmp_path, quantbench_cache):
    from tests.conftest import matrix_data, write_matrix

    data = matrix_data(
        name="pipeline-config",
        generation={"prompts": ["a red apple"], "num_inference_steps": 2, "repeats": 1},
        axes={"method": ["torchao"], "components": [["transformer", "text_encoder_2"]]},
        method={"torchao": {"quant_type": "int8wo", "pipeline_config": [False, True]}},
    )
    summary = run_matrix(load_matrix(write_matrix(tmp_path, data)), tmp_path / "results")
    assert summary.statuses == {"ok": 2}
    frame = read_results(tmp_path / "results")
    one_by_one = frame[~frame["method_options"].str.contains('"pipeline_config": true')].iloc[0]
    in_one_call = frame[frame["method_options"].str.contains('"pipeline_config": true')].iloc[0]
    assert one_by_one["quantize_s"] > 0 and np.isnan(in_one_call["quantize_s"])  # quantizing is inside load_s
    assert in_one_call["transformer_tensor_bytes"] == one_by_one["transformer_tensor_bytes"]
    assert in_one_call["latent_rel_l2"] == one_by_one["latent_rel_l2"] > 0  # the same quantized model, same output
    log = (ResultsFolder(tmp_path / "results").logs_dir / f"{in_one_call['cell_id']}.log").read_text()
    assert "inside the pipeline's from_pretrained (PipelineQuantizationConfig)" in log


def test_a_compiled_cell_reports_compile_time_apart_and_extrapolated_latency_says_so(tmp_path, quantbench_cache):
    from tests.conftest import matrix_data, write_matrix

    data = matrix_data(
        name="compiled",
        generation={"prompts": ["a red apple"], "num_inference_steps": 3, "repeats": 2, "extrapolate_to_steps": 50},
        axes={"method": ["baseline"], "compile": ["default"]},
        drift={"enabled": False},
    )
    summary = run_matrix(load_matrix(write_matrix(tmp_path, data)), tmp_path / "results")
    assert summary.statuses == {"ok": 1}
    row = read_results(tmp_path / "results").iloc[0]
    assert 0 < row["compile_s"] < row["warmup_s"]
    assert row["compile_s"] > 10 * row["step_latency_median_s"], "compiling costs far more than one tiny step"
    assert row["extrapolated_to_steps"] == 50
    expected = row["e2e_latency_median_s"] + 47 * row["step_latency_median_s"]
    assert row["e2e_latency_extrapolated_s"] == pytest.approx(expected)
    assert row["e2e_latency_extrapolated_s"] > row["e2e_latency_median_s"]
    from bench.report import render

    html = render(read_results(tmp_path / "results"), tmp_path / "results")
    assert f"{row['e2e_latency_extrapolated_s']:.2f} at 50 steps (extrapolated)" in html
    assert f"compile {row['compile_s']:.1f} s" in html


def _compiled_run(tmp_path, name: str, axes: dict):
    """Run compiled tiny-flux cells (one prompt, two steps, no drift; each cell's process started while the one
    before compiles); the run's summary and rows."""
    from tests.conftest import matrix_data, write_matrix

    data = matrix_data(
        name=name,
        run={"cell_start": "prestarted"},
        generation={"prompts": ["a red apple"], "num_inference_steps": 2, "repeats": 1},
        axes={"compile": ["default"], **axes},
        drift={"enabled": False},
    )
    summary = run_matrix(load_matrix(write_matrix(tmp_path, data)), tmp_path / "results")
    return summary, read_results(tmp_path / "results")


def test_an_inductor_preset_is_applied_in_the_compiled_cell_and_recorded(tmp_path, quantbench_cache):
    import json

    presets = ["torchao", "capture-dynamic-output-shapes"]
    summary, rows = _compiled_run(tmp_path, "inductor", {"method": ["baseline"], "inductor": presets})
    assert summary.statuses == {"ok": 2}
    rows = rows.set_index("inductor")
    row = rows.loc["torchao"]
    assert row["cell_label"].endswith("compile=default+inductor=torchao")
    changed = json.loads(row["inductor_settings"])  # read back from torch._inductor.config inside the cell
    assert changed["coordinate_descent_tuning"] is True and changed["force_fuse_int_mm_with_mul"] is True
    dynamo = json.loads(rows.loc["capture-dynamic-output-shapes", "inductor_settings"])
    assert dynamo == {"dynamo.capture_dynamic_output_shape_ops": True}, "a Dynamo setting, read back in the cell"
    assert any((quantbench_cache / "inductor").rglob("*.py")), "the compiled code is in quantbench's cache"


def test_regional_compilation_compiles_each_repeated_block_of_the_denoiser(tmp_path, quantbench_cache):
    import json

    from bench.models.builtin import build_builtin

    summary, rows = _compiled_run(tmp_path, "regional", {"method": ["baseline"], "regional": [True]})
    assert summary.statuses == {"ok": 1}
    row = rows.iloc[0]

    config = json.loads((build_builtin("tiny-flux") / "transformer" / "config.json").read_text())
    assert row["regional"] and row["cell_label"].endswith("compile=default+regional")
    assert row["compiled_modules"] == config["num_layers"] + config["num_single_layers"]
    assert row["compile_s"] > 0
    assert row["timed_compiles"] == 0, "every block compiled in the warm-up; the timed runs reuse the code"
    counts = json.loads(row["compile_counts"])
    assert counts["graphs"] == 2, "one graph per block class (FLUX's double- and single-stream blocks)"
    log = (tmp_path / "results" / "logs" / f"{row['cell_id']}.log").read_text()
    assert f"[quantbench] torch.compile: {counts['graphs']} graphs compiled" in log
    from html import unescape

    from bench.cache import InductorCacheContents
    from bench.report import write_report

    at_start = InductorCacheContents(**json.loads(row["inductor_cache_at_start"]))
    assert f"[quantbench] Inductor's cache at the start ({quantbench_cache / 'inductor'}): {at_start.describe()}" in log
    after = InductorCacheContents.of(quantbench_cache / "inductor")
    assert after.fx_graphs >= at_start.fx_graphs + counts["graphs"] - counts["graphs_from_cache"], "new graphs are kept"
    html = write_report(tmp_path / "results", tmp_path / "report.html").read_text()
    assert f'title="by the end of the warm-up: {counts["graphs"]} graphs compiled (' in html
    assert f"Inductor's cache at the start: {at_start.describe()}" in unescape(html)


def test_a_recompile_during_the_timed_runs_is_counted_and_logged(tmp_path, monkeypatch, quantbench_cache):
    monkeypatch.setenv("QUANTBENCH_INJECT_FAULT", "recompile")  # the compiled code is dropped after the warm-up
    summary, rows = _compiled_run(tmp_path, "recompile", {"method": ["baseline"]})
    assert summary.statuses == {"ok": 1}
    row = rows.iloc[0]
    assert row["timed_compiles"] >= 1
    log = (tmp_path / "results" / "logs" / f"{row['cell_id']}.log").read_text()
    assert f"the timed runs compiled {row['timed_compiles']} more graphs" in log
    from bench.report import write_report

    html = write_report(tmp_path / "results", tmp_path / "report.html").read_text()
    assert f"timed runs include {row['timed_compiles']} recompiles" in html


def test_graph_breaks_are_counted_and_their_reasons_logged(tmp_path, quantbench_cache):
    import json

    # diffusers' layerwise casting hooks build an nn.Parameter in forward, which Dynamo cannot trace
    summary, rows = _compiled_run(tmp_path, "breaks", {"method": ["baseline", "layerwise_fp8"]})
    assert summary.statuses == {"ok": 2}
    counts = {row["method"]: json.loads(row["compile_counts"]) for _, row in rows.iterrows()}
    assert counts["baseline"]["graph_breaks"] == 0 and counts["baseline"]["graphs"] == 1
    assert counts["layerwise_fp8"]["graph_breaks"] > 0 and counts["layerwise_fp8"]["graphs"] > 1
    layerwise = rows.set_index("method").loc["layerwise_fp8"]
    log = (tmp_path / "results" / "logs" / f"{layerwise['cell_id']}.log").read_text()
    assert f", {counts['layerwise_fp8']['graph_breaks']} graph breaks" in log
    assert re.search(r"\[quantbench\] graph break \(\d+ ×\): \S", log), "the commonest reasons, one line each"


def test_regional_compilation_of_a_denoiser_without_repeated_blocks_is_refused_before_any_cell(tmp_path):
    from bench.errors import MatrixError
    from bench.runner import plan
    from tests.conftest import matrix_data, write_matrix

    data = matrix_data(name="regional-sd3", axes={"method": ["baseline"], "compile": ["default"], "regional": [True]})
    data["model"] = {"builtin": "tiny-sd3"}
    with pytest.raises(MatrixError, match=r"axes\.regional: SD3Transformer2DModel lists no repeated blocks"):
        plan(load_matrix(write_matrix(tmp_path, data)))
    assert not (tmp_path / "results").exists()


def test_torchao_changes_inductor_settings_itself_stock_undoes_it_and_no_pattern_matcher_turns_only_patterns_off(
    tmp_path, quantbench_cache
):
    import json

    presets = ["default", "stock", "no-pattern-matcher", "stock-no-pattern-matcher"]
    summary, rows = _compiled_run(tmp_path, "stock", {"method": ["torchao"], "inductor": presets})
    assert summary.statuses == {"ok": 4}
    rows = rows.assign(inductor=rows["inductor"].fillna("default")).set_index("inductor")  # default: no value
    settings = {preset: json.loads(rows.loc[preset, "inductor_settings"]) for preset in presets}
    as_loaded = settings["default"]
    assert as_loaded["coordinate_descent_tuning"] is True, "torchao's quantize config turned it on while loading"
    assert settings["stock"] == {}
    assert settings["no-pattern-matcher"] == {**as_loaded, "pattern_matcher": False}
    assert settings["stock-no-pattern-matcher"] == {"pattern_matcher": False}
    rewrites = {
        preset: json.loads(rows.loc[preset, "compile_counts"])["int8_weight_only_rewrites"] for preset in presets
    }
    assert rewrites["default"] > 0 and rewrites["stock"] > 0, "Inductor rewrote int8wo's linears, patterns on"
    assert rewrites["no-pattern-matcher"] == rewrites["stock-no-pattern-matcher"] == 0
    from bench.report import write_report

    html = write_report(tmp_path / "results", tmp_path / "report.html").read_text()
    flagged = {count for count in rewrites.values() if count}
    assert {f"{count} linears rewritten into _weight_int8pack_mm" in html for count in flagged} == {True}
    assert html.count("linears rewritten into _weight_int8pack_mm</span>") == 2, "the two cells with the rewrite"


def test_max_time_stops_running_cells_and_keeps_finished_rows(tmp_path, monkeypatch, quantbench_cache):
    from bench.runner import TimeLimitReached
    from tests.conftest import matrix_data, write_matrix

    data = matrix_data(axes={"method": ["baseline", "torchao"]}, drift={"enabled": False})
    matrix = load_matrix(write_matrix(tmp_path, data))
    results = tmp_path / "results"
    run_matrix(load_matrix(write_matrix(tmp_path, data), ["method=baseline"]), results)
    progress = RecordedProgress()
    torchao = next(cell for cell in matrix.cells if cell.method == "torchao")
    monkeypatch.setenv("QUANTBENCH_INJECT_FAULT", f"hang@{torchao.id}")  # it never ends: the limit must stop it
    with pytest.raises(TimeLimitReached) as stopped:
        run_matrix(matrix, results, progress=progress, max_time_s=20.0)
    assert stopped.value.unfinished == 1 and stopped.value.exit_code == 3
    assert progress.events == [("preparing",), ("planned", 1), ("started", torchao.label)]
    assert set(read_results(results)["method"]) == {"baseline"}, "the finished cell's rows are kept"
    stopped_log = (results / "logs" / f"{torchao.id}.interrupted.log").read_text()
    assert stopped_log.startswith("===== stopped after ") and "[quantbench]" in stopped_log
    measured = ResultsFolder(results).interrupted_progress(torchao.id)
    assert measured is not None and measured.import_s > 0, "what the stopped try measured is kept as data"
    from bench.report import render
    from bench.store import read_runs

    record = read_runs(results)[-1]
    assert record["ended"] == "time limit" and record["not_started"] == 0
    [stopped] = record["unfinished"]
    assert (stopped["cell_id"], stopped["cell_label"]) == (torchao.id, torchao.label)
    assert 0 < stopped["ran_s"] <= record["wall_s"]
    html = render(read_results(results), results)
    assert '<table id="unfinished">' in html and "Every cell finished" not in html
    assert torchao.label in html and f"logs/{torchao.id}.interrupted.log" in html
