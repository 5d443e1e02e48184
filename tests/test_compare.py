"""compare's latency verdict from per-sample times: a bootstrap interval of the ratio of medians that must lie
beyond the threshold; the old rule for folders written without samples; the versions that differ; the slow fault."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bench.compare import NO_SAMPLES, OLD_RULE, Thresholds, compare_frames, compare_runs, why_old_rule
from bench.errors import UserError
from bench.faults import StepSlowdown, injected_slowdown
from bench.store import SCHEMA, ResultsFolder, read_results
from tests.test_store import row

STEPS, REPEATS = 8, 4  # 7 timed steps per generation: 28 step samples per cell


def cell_rows(cell_id: str, rng: np.random.Generator, step_s: float, noise: float = 0.03) -> pd.DataFrame:
    """One ok row whose step and e2e samples scatter log-normally around `step_s` (a busy CPU's spread)."""
    result = row(cell_id)
    steps = step_s * rng.lognormal(0, noise, (STEPS - 1) * REPEATS)
    e2e = STEPS * step_s * rng.lognormal(0, noise, REPEATS)
    result.step_times_s, result.e2e_times_s = steps.tolist(), e2e.tolist()
    result.e2e_latency_median_s, result.e2e_latency_iqr_s = float(np.median(e2e)), 0.0
    result.step_latency_median_s = float(np.median(steps))
    return pa.Table.from_pylist([dataclasses.asdict(result)], schema=SCHEMA).to_pandas()


def test_a_15_percent_slowdown_is_flagged_with_its_interval():
    rng = np.random.default_rng(1)
    old, new = cell_rows("c", rng, 0.1), cell_rows("c", rng, 0.115)
    (verdict,) = compare_frames(old, new).to_dict("records")
    assert verdict["latency_samples"] == "28 -> 28 steps"
    assert 0.05 < verdict["latency_change_low"] < verdict["latency_change"] < verdict["latency_change_high"]
    assert verdict["latency_change"] == pytest.approx(0.15, abs=0.03)
    assert verdict["regressions"].startswith("latency +1")
    assert "interval lies above +5%" in verdict["regressions"]


def test_a_slowdown_below_the_threshold_is_not_flagged_however_sure():
    rng = np.random.default_rng(2)
    old, new = cell_rows("c", rng, 0.1, noise=0.002), cell_rows("c", rng, 0.103, noise=0.002)
    (verdict,) = compare_frames(old, new).to_dict("records")
    assert verdict["latency_change_low"] > 0, "the interval excludes no change..."
    assert verdict["regressions"] == "", "...but not the threshold"
    flagged = compare_frames(old, new, Thresholds(latency_increase=0.01))
    assert flagged["regressions"].iloc[0].startswith("latency +3"), "the threshold is data"


def test_a_a_pairs_with_noise_are_not_flagged():
    rng = np.random.default_rng(3)
    verdicts = pd.concat(
        [compare_frames(cell_rows(f"c{i}", rng, 0.1), cell_rows(f"c{i}", rng, 0.1)) for i in range(20)]
    )
    assert (verdicts["regressions"] == "").all()
    widths = verdicts["latency_change_high"] - verdicts["latency_change_low"]
    assert widths.between(0.01, 0.07).all(), "28 samples at 3 % noise: the change within about +-3 %"
    assert ((verdicts["latency_change_low"] < 0) & (verdicts["latency_change_high"] > 0)).mean() > 0.8


def test_memory_limits_are_2_percent_for_the_generation_peak_and_stored_size_10_for_the_resident_figure():
    rng = np.random.default_rng(4)
    old = cell_rows("c", rng, 0.1)
    old[["resident_reserved_bytes", "peak_reserved_bytes", "transformer_tensor_bytes"]] = [20e9, 24e9, 12e9]
    (verdict,) = compare_frames(old, old.assign(resident_reserved_bytes=21e9)).to_dict("records")
    assert verdict["resident_reserved_bytes_change"] == pytest.approx(0.05)
    assert verdict["regressions"] == "", "the allocator's caching while loading: within +10 %"
    (verdict,) = compare_frames(old, old.assign(resident_reserved_bytes=22.4e9)).to_dict("records")
    assert verdict["regressions"] == "resident_reserved_bytes +12.0% (limit +10%)"
    for column, grown in (("peak_reserved_bytes", 24.6e9), ("transformer_tensor_bytes", 12.3e9)):
        (verdict,) = compare_frames(old, old.assign(**{column: grown})).to_dict("records")
        assert verdict["regressions"] == f"{column} +2.5% (limit +2%)"


def test_the_verdict_is_reproducible():
    rng = np.random.default_rng(4)
    old, new = cell_rows("c", rng, 0.1), cell_rows("c", rng, 0.106)
    first, second = compare_frames(old, new), compare_frames(old, new)
    pd.testing.assert_frame_equal(first, second)


def test_cells_with_few_steps_are_judged_on_e2e_times():
    rng = np.random.default_rng(5)
    old, new = cell_rows("c", rng, 0.1), cell_rows("c", rng, 0.13)
    for frame in (old, new):
        frame["step_times_s"] = [[0.1, 0.1]]  # e.g. 2 steps, 2 repeats: 2 step samples
        frame["e2e_times_s"] = [list(frame["e2e_times_s"].iloc[0]) * 2]  # 8 e2e samples
    (verdict,) = compare_frames(old, new).to_dict("records")
    assert verdict["latency_samples"] == "8 -> 8 e2e times"
    assert verdict["latency_change"] == pytest.approx(0.3, abs=0.06)
    assert verdict["regressions"].startswith("latency +")


def test_too_few_samples_for_the_latency_rule_is_said_as_such_not_as_an_old_schema(tmp_path, capsys):
    rng = np.random.default_rng(8)
    old, new = cell_rows("c", rng, 0.1), cell_rows("c", rng, 0.1)
    for frame in (old, new):  # 2 steps x 2 repeats: each generation's first step is no sample
        frame["step_times_s"], frame["e2e_times_s"] = [[0.1, 0.1]], [[0.2, 0.2]]
    write_folder(tmp_path / "old", old)
    write_folder(tmp_path / "new", new)
    assert compare_runs(tmp_path / "old", tmp_path / "new", tmp_path / "table.csv") == 0
    out = " ".join(capsys.readouterr().out.split())
    few = "2 step samples and 2 end-to-end times, fewer than the 5 the latency rule needs: raise num_inference_steps or repeats"
    assert f"latency of 1 cell judged by the old rule, e2e median beyond max(5 %, 3 x IQR): {few}" in out
    assert "per-sample" not in out and "schema" not in out
    assert pd.read_csv(tmp_path / "table.csv").iloc[0]["latency_samples"] == f"{OLD_RULE}: {few}"


def test_a_new_run_whose_every_cell_failed_is_a_status_regression_not_a_crash(tmp_path, capsys):
    rng = np.random.default_rng(9)
    old, new = cell_rows("c", rng, 0.1), cell_rows("c", rng, 0.1)
    new["status"], new["error"] = "failed", "injected crash"
    new["step_times_s"], new["e2e_times_s"] = None, None
    new["e2e_latency_median_s"] = new["step_latency_median_s"] = float("nan")
    write_folder(tmp_path / "old", old)
    write_folder(tmp_path / "new", new)
    assert compare_runs(tmp_path / "old", tmp_path / "new", tmp_path / "table.csv") == 1
    assert "status ok -> failed" in pd.read_csv(tmp_path / "table.csv").iloc[0]["regressions"]


def test_an_old_median_of_zero_is_the_reason_given_when_samples_are_plenty():
    rng = np.random.default_rng(10)
    old, new = cell_rows("c", rng, 0.1), cell_rows("c", rng, 0.1)
    old["step_times_s"], old["e2e_times_s"] = [[0.0] * 28], [[0.0] * 4]
    assert why_old_rule(old, new, Thresholds()) == "the old run's median is 0 s"


def write_folder(folder, frame: pd.DataFrame, schema: pa.Schema = SCHEMA) -> None:
    results = ResultsFolder(folder)
    results.create()
    table = pa.Table.from_pandas(frame[schema.names], schema=schema, preserve_index=False)
    pq.write_table(table, results.part_path(frame["cell_id"].iloc[0]))


def test_a_folder_without_samples_still_compares_by_the_old_rule_and_says_so(tmp_path, capsys):
    rng = np.random.default_rng(6)
    old, new = cell_rows("c", rng, 0.1), cell_rows("c", rng, 0.2)
    schema_1 = pa.schema([f for f in SCHEMA if f.name not in ("step_times_s", "e2e_times_s")])
    write_folder(tmp_path / "old", old, schema_1)
    write_folder(tmp_path / "new", new)
    assert read_results(tmp_path / "old")["step_times_s"].isna().all()
    table = tmp_path / "out" / "table.csv"  # its folder is made, as report -o makes one
    assert compare_runs(tmp_path / "old", tmp_path / "new", table) == 1
    out = " ".join(capsys.readouterr().out.split())
    assert (
        "latency of 1 cell judged by the old rule, e2e median beyond max(5 %, 3 x IQR): rows without per-sample" in out
    )
    verdict = pd.read_csv(table).iloc[0]
    assert verdict["latency_samples"] == f"{OLD_RULE}: {NO_SAMPLES}" and pd.isna(verdict["latency_change_low"])
    assert verdict["regressions"].startswith("e2e latency +")


def test_a_regression_names_the_library_versions_that_differ(tmp_path, capsys):
    rng = np.random.default_rng(7)
    old, new = cell_rows("c", rng, 0.1), cell_rows("c", rng, 0.12)
    old["torch_version"], new["torch_version"] = "2.12.0", "2.13.0"
    old["diffusers_version"] = new["diffusers_version"] = "0.42.1"
    old["harness_commit"], new["harness_commit"] = "abc1234", "def5678"
    write_folder(tmp_path / "old", old)
    write_folder(tmp_path / "new", new)
    assert compare_runs(tmp_path / "old", tmp_path / "new") == 1
    out = " ".join(capsys.readouterr().out.split())
    assert "differing between the two runs: torch 2.12.0 -> 2.13.0, harness commit abc1234 -> def5678" in out
    assert "diffusers" not in out.split("differing")[1]


def test_the_version_difference_reads_every_row_of_each_run():
    from bench.compare import environment_difference

    rng = np.random.default_rng(7)
    old = pd.concat([cell_rows("c", rng, 0.1), cell_rows("d", rng, 0.1)], ignore_index=True)
    new = old.copy()
    old["harness_commit"], new["harness_commit"] = ["abc1234", "fff0000"], "def5678"
    new["optimum_quanto_version"] = ["0.2.7", None]  # only the quanto cell's row
    assert environment_difference(old, new) == (
        "differing between the two runs: harness commit abc1234, fff0000 -> def5678; "
        "recorded by one run only: optimum-quanto (new: 0.2.7)"
    )


@pytest.mark.parametrize(
    ("setting", "cell_id", "fraction"),
    [("slow=10%", "abc", 0.10), ("slow=5%@ab", "abc", 0.05), ("slow=5%@ff", "abc", None), ("oom", "abc", None)],
)
def test_the_slow_fault_reads_its_fraction_and_target(monkeypatch, setting, cell_id, fraction):
    monkeypatch.setenv("QUANTBENCH_INJECT_FAULT", setting)
    assert injected_slowdown(cell_id) == fraction


@pytest.mark.parametrize("setting", ["slow=10", "slow=x%", "slow=-5%"])
def test_a_bad_slow_fault_says_what_it_takes(monkeypatch, setting):
    monkeypatch.setenv("QUANTBENCH_INJECT_FAULT", setting)
    with pytest.raises(ValueError, match="slow takes a positive percentage, e.g. slow=10%"):
        injected_slowdown("abc")


def test_the_slow_fault_sleeps_its_fraction_of_each_step_after_the_step():
    slow, step_s = StepSlowdown(0.5), 0.04
    ends = []
    for step in range(4):
        time.sleep(step_s)  # the step's compute
        slow.after_step(step)
        ends.append(time.perf_counter())
    pauses = [b - a - step_s for a, b in zip(ends, ends[1:], strict=False)]
    assert all(0.5 * step_s * 0.8 < pause < 0.5 * step_s * 3 for pause in pauses[1:]), pauses
    assert slow.last_step_s == pytest.approx(step_s, rel=0.5), "the pause itself is not counted as compute"


@pytest.mark.parametrize(("old_status", "new_status"), [("skipped", "skipped"), ("failed", "ok")])
def test_two_runs_in_which_no_cell_ran_both_times_give_no_verdict_not_a_pass(tmp_path, old_status, new_status):
    rng = np.random.default_rng(10)
    old, new = cell_rows("c", rng, 0.1), cell_rows("c", rng, 0.1)
    old["status"], new["status"] = old_status, new_status
    write_folder(tmp_path / "old", old)
    write_folder(tmp_path / "new", new)
    with pytest.raises(
        UserError, match=rf"no cell ran \(status ok\) on the same device in both \(1 {old_status} -> {new_status}\)"
    ):
        compare_runs(tmp_path / "old", tmp_path / "new")
