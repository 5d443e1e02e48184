"""Measurement truth: energy and clocks (NVML, faked here), CUDA-event step marks, the quantization-effect
check, value-dependent speed, slow compiled warm-ups, caches keyed by versions and content, TOML the parser
cannot take, and older results folders still reading."""

from __future__ import annotations

import json
import struct
import sys
import types
from pathlib import Path

import pytest

from bench.cache import folder_fingerprint
from bench.cells import Cell
from bench.cli import main
from bench.environment import other_versions
from bench.measure import bf16_bytes, measurement_flags, quantization_effect
from bench.methods import method_class
from bench.runner import eager_step_times, next_to_start, same_method_key, warmup_step_limit
from bench.store import read_results
from bench.trackers import energy as energy_module
from bench.trackers.energy import CPU_NOTE, EnergyTracker, throttle_reasons
from bench.trackers.latency import SYNC_EACH_STEP_ENV, Clock, Latency


class FakeNvml(types.SimpleNamespace):
    """pynvml's functions used by the tracker: an energy counter that advances 700 J per second of fake time."""


def fake_pynvml(clock: list[float], broken: tuple[str, ...] = (), processes: int = 1, mig: bool = False) -> FakeNvml:
    def fails(name):
        def call(*args):
            raise RuntimeError(f"{name} not supported")

        return call

    functions = {
        "nvmlInit": lambda: None,
        "nvmlDeviceGetHandleByUUID": lambda uuid: "handle" if uuid == "GPU-abc" else (_ for _ in ()).throw(KeyError()),
        "nvmlDeviceGetCount": lambda: 1,
        "nvmlDeviceGetHandleByIndex": lambda i: "handle",
        "nvmlDeviceGetPowerManagementLimit": lambda h: 700_000,
        # a counter that updates every 0.1 s of fake time, in millijoules
        "nvmlDeviceGetTotalEnergyConsumption": lambda h: int(clock[0] * 10) * 70_000,
        "nvmlDeviceGetClockInfo": lambda h, kind: 1980,
        "nvmlDeviceGetTemperature": lambda h, sensor: 61,
        "nvmlDeviceGetCurrentClocksEventReasons": lambda h: 0x4 | 0x1,
        "nvmlDeviceGetComputeRunningProcesses": lambda h: [types.SimpleNamespace(pid=p) for p in range(processes)],
        "nvmlDeviceGetMigMode": lambda h: (int(mig), int(mig)),
    }
    for name in broken:
        functions[name] = fails(name)
    return FakeNvml(NVML_CLOCK_SM=1, NVML_TEMPERATURE_GPU=0, **functions)


@pytest.fixture
def fake_time(monkeypatch):
    now = [100.0]

    def sleep(seconds):
        now[0] += max(seconds, 0.002)

    monkeypatch.setattr(energy_module.time, "sleep", sleep)
    return now


def tracked(monkeypatch, now, generation_s, broken=(), processes=1, mig=False):
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(now, broken, processes, mig))
    tracker = EnergyTracker(cuda=True, gpu_uuid="abc", clock=lambda: now[0])
    with tracker.sampling():
        tracker._sample_once()  # the side thread's first sample, taken here so the test does not race it
        for _ in range(3):
            with tracker.window():
                now[0] += generation_s
    return tracker


def test_energy_per_image_is_the_counter_over_each_generation_aligned_to_its_updates(monkeypatch, fake_time):
    energy = tracked(monkeypatch, fake_time, generation_s=2.0).result(step_median_s=0.1)
    assert energy.energy_j_per_image == pytest.approx(1400, rel=0.06)  # 700 W x 2 s, within one update
    assert energy.avg_power_w == pytest.approx(700, rel=0.06)
    assert energy.energy_j_per_step == pytest.approx(energy.avg_power_w * 0.1)
    assert energy.gpu_power_limit_w == 700
    assert energy.gpu_sm_clock_mhz == 1980
    assert energy.gpu_temperature_c == 61
    assert energy.gpu_throttle_reasons == "sw_power_cap"
    assert energy.gpu_other_processes == 0  # NVML lists the cell's own process only
    assert energy.energy_note is None


def test_other_processes_on_the_gpu_are_counted_and_noted(monkeypatch, fake_time):
    energy = tracked(monkeypatch, fake_time, generation_s=2.0, processes=3).result(step_median_s=0.1)
    assert energy.gpu_other_processes == 2
    assert "2 other process(es) held this GPU" in energy.energy_note
    flags = measurement_flags({"gpu_other_processes": 2.0, "gpu_throttle_reasons": "none"})
    assert [flag["text"] for flag in flags] == ["GPU shared with 2 process(es)"]
    assert measurement_flags({"gpu_other_processes": 0}) == []


def test_the_slots_next_cell_waiting_with_a_cuda_context_is_not_another_process(monkeypatch, fake_time):
    energy = tracked(monkeypatch, fake_time, generation_s=2.0, processes=2).result(step_median_s=0.1, idle_contexts=1)
    assert energy.gpu_other_processes == 0 and energy.energy_note is None


@pytest.mark.parametrize(
    "case",
    [
        {"processes": 0},  # NVML lists none here (e.g. a container)
        {"broken": ("nvmlDeviceGetComputeRunningProcesses",)},  # no permission, an old driver
        {"processes": 3, "mig": True},  # a MIG slice: the whole GPU's processes include other slices' tenants
    ],
)
def test_the_process_count_is_null_where_nvml_cannot_tell_and_the_energy_note_stays_clean(monkeypatch, fake_time, case):
    energy = tracked(monkeypatch, fake_time, generation_s=2.0, **case).result(step_median_s=0.1)
    assert energy.gpu_other_processes is None and energy.energy_note is None
    assert energy.energy_j_per_image is not None


def test_short_generations_give_the_mean_over_all_and_say_so(monkeypatch, fake_time):
    energy = tracked(monkeypatch, fake_time, generation_s=0.3).result(step_median_s=None)
    assert energy.energy_j_per_image is not None
    assert "mean over 3 generations" in energy.energy_note
    assert energy.energy_j_per_step is None


def test_a_failing_nvml_call_leaves_its_column_null_with_a_note_and_never_raises(monkeypatch, fake_time):
    broken = ("nvmlDeviceGetTotalEnergyConsumption", "nvmlDeviceGetCurrentClocksEventReasons")
    energy = tracked(monkeypatch, fake_time, generation_s=2.0, broken=broken).result(step_median_s=0.1)
    assert energy.energy_j_per_image is None and energy.avg_power_w is None
    assert energy.gpu_sm_clock_mhz == 1980  # the calls that work still fill their columns
    assert "nvmlDeviceGetTotalEnergyConsumption failed" in energy.energy_note


def test_without_nvml_every_column_is_null_with_a_note(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails
    tracker = EnergyTracker(cuda=True, gpu_uuid="abc")
    with tracker.sampling(), tracker.window():
        pass
    energy = tracker.result(0.1)
    assert energy.energy_j_per_image is None and energy.gpu_power_limit_w is None
    assert "NVML unavailable" in energy.energy_note


def test_on_the_cpu_energy_columns_are_null_with_a_note_never_zero():
    energy = EnergyTracker(cuda=False, gpu_uuid=None).result(0.1)
    assert energy.energy_note == CPU_NOTE
    assert energy.energy_j_per_image is None and energy.avg_power_w is None


def test_throttle_reasons_leave_idle_out():
    assert throttle_reasons([0x1, 0x1]) == "none"
    assert throttle_reasons([0x1, 0x20, 0x4]) == "sw_power_cap,sw_thermal_slowdown"


def test_cpu_step_marks_are_perf_counter_and_cuda_marks_are_events_unless_asked(monkeypatch):
    latency = Latency(Clock(cuda=False), 0.0)
    for _ in range(3):
        latency.step_ended()
    assert all(isinstance(mark, float) for mark in latency.step_ends)
    assert len(latency.step_s()) == 2 and all(s >= 0 for s in latency.step_s())
    assert Clock(cuda=True).events
    monkeypatch.setenv(SYNC_EACH_STEP_ENV, "1")
    assert not Clock(cuda=True).events


def _safetensors_header(path: Path, shapes: dict[str, list[int]]) -> None:
    header = json.dumps(
        {name: {"dtype": "F32", "shape": shape, "data_offsets": [0, 0]} for name, shape in shapes.items()}
    )
    path.write_bytes(struct.pack("<Q", len(header)) + header.encode())


def test_bf16_size_comes_from_the_parameter_counts_in_the_headers(tmp_path):
    _safetensors_header(tmp_path / "a.safetensors", {"w": [64, 32], "b": [64]})
    _safetensors_header(tmp_path / "b.safetensors", {"x": [10]})
    assert bf16_bytes(tmp_path) == 2 * (64 * 32 + 64 + 10)
    assert bf16_bytes(tmp_path / "missing") is None


def test_a_component_not_smaller_than_bf16_is_an_ineffective_quantization():
    assert quantization_effect({"transformer": 600}, {"transformer": 1000})[0] is True
    effective, note = quantization_effect({"transformer": 1010}, {"transformer": 1000})
    assert effective is False and "101%" in note
    assert (
        quantization_effect(
            {"transformer": 500, "text_encoder_2": 1000}, {"transformer": 1000, "text_encoder_2": 1000}
        )[0]
        is False
    )
    assert quantization_effect({"transformer": 500}, {"transformer": None})[0] is None


def _method(name, **options):
    cls = method_class(name)
    return cls(cls.Options.model_validate(options))


def test_only_bitsandbytes_int8_above_a_zero_threshold_has_value_dependent_speed():
    int8 = _method("bnb_8bit")
    assert int8.value_dependent_latency(Cell(method="bnb_8bit", threshold=6.0))
    assert not int8.value_dependent_latency(Cell(method="bnb_8bit", threshold=0.0))
    assert not _method("bnb_8bit", dequantize=True).value_dependent_latency(Cell(method="bnb_8bit", threshold=6.0))
    assert not _method("torchao", quant_type="int8dq").value_dependent_latency(Cell(method="torchao"))
    assert not _method("bnb_4bit").value_dependent_latency(Cell(method="bnb_4bit"))


class RunSettings(types.SimpleNamespace):
    pass


def test_a_compiled_cell_gets_a_warm_up_step_limit_from_the_same_methods_eager_rows():
    eager_row = {"status": "ok", "compile": "off", "method": "torchao", "method_options": '{"quant_type": "int8wo"}',
                 "dtype": "bf16", "threshold": None, "components": "transformer", "placement": "device",
                 "step_latency_median_s": 0.25}  # fmt: skip
    steps = eager_step_times([eager_row, {**eager_row, "status": "failed", "step_latency_median_s": 99.0}])
    cell = Cell(method="torchao", options={"quant_type": "int8wo"}, components=("transformer",), compile="default")
    run = RunSettings(slow_warmup_factor=20.0, max_warmup_step_s=None)
    limit, reason = warmup_step_limit(cell, run, steps)
    assert limit == pytest.approx(5.0) and "0.250 s" in reason
    assert warmup_step_limit(Cell(**{**cell.__dict__, "compile": "off"}), run, steps) == (None, "")
    assert warmup_step_limit(cell, RunSettings(slow_warmup_factor=20.0, max_warmup_step_s=2.0), steps)[0] == 2.0
    assert warmup_step_limit(cell, run, {}) == (None, "")
    tiny = {key: 0.009 for key in steps}  # a tiny model's eager step on a CPU: 20x is within a busy CPU's noise
    limit, reason = warmup_step_limit(cell, run, tiny)
    assert limit == 5.0 and reason.endswith("0.009 s, at least 5 s")
    # a batch of 4 is held to four images' eager step, whichever batch the eager rows ran
    batched = eager_step_times([{**eager_row, "batch_size": 4, "step_latency_median_s": 1.0}])
    assert batched == steps, "0.25 s per image either way"
    limit, reason = warmup_step_limit(Cell(**{**cell.__dict__, "batch_size": 4}), run, steps)
    assert limit == pytest.approx(20.0) and "1.000 s" in reason

    assert same_method_key(Cell(**{**cell.__dict__, "compile": "off"})) in steps, "the twin's rows hold its key"


def test_a_compiled_cell_starts_after_its_eager_twin_unless_nothing_else_can_start():
    from collections import deque

    int8wo = Cell(method="torchao", options={"quant_type": "int8wo"})
    compiled, eager = Cell(**{**int8wo.__dict__, "compile": "default"}), int8wo
    other = Cell(method="bnb_4bit", compile="default")
    batched = Cell(**{**int8wo.__dict__, "batch_size": 4})  # another eager cell of the same method settings
    waiting = deque([compiled, other, eager, batched])  # longest first: the compiled cell ahead of its twins
    assert next_to_start(waiting, running=[]) is eager, "one twin starts in its place"
    assert next_to_start(waiting, running=[eager]) is other, "a twin runs: the others go in order, no twin pulled"
    assert next_to_start(waiting, running=[eager]) is batched
    assert next_to_start(waiting, running=[eager, batched]) is compiled, "nothing else left: a slot never idles"
    key = same_method_key(eager)
    assert next_to_start(deque([compiled, other, eager]), [], known={key}) is compiled, "its eager step is known"
    assert next_to_start(deque([compiled, other]), running=[]) is compiled, "no twin pending: longest first"


def test_rows_from_other_library_versions_are_named_by_library():
    row = {"method_family": "torchao", "torch_version": "2.12.0", "diffusers_version": "0.42.1",
           "transformers_version": "5.0", "torchao_version": "0.17.0", "bitsandbytes_version": "0.1"}  # fmt: skip
    current = {**row, "torch_version": "2.13.0", "torchao_version": "0.18.0", "bitsandbytes_version": "0.2"}
    assert other_versions(row, current) == {
        "torch_version": ("2.12.0", "2.13.0"),
        "torchao_version": ("0.17.0", "0.18.0"),  # bitsandbytes is not torchao's library: left out
    }
    assert other_versions({**row, "torch_version": None}, current).keys() == {"torchao_version"}
    quanto = {**row, "method_family": "quanto", "optimum_quanto_version": "0.2.6"}
    assert other_versions(quanto, {**row, "optimum_quanto_version": "0.2.7"}) == {
        "optimum_quanto_version": ("0.2.6", "0.2.7")
    }, "every family's own library counts, under its distribution's name"
    same = {**row, "peft_version": "0.21.2"}
    with_peft = {**same, "peft_version": "0.22.0"}
    assert other_versions({**same, "lora": "fused"}, with_peft) == {"peft_version": ("0.21.2", "0.22.0")}
    assert other_versions({**same, "lora": "none"}, with_peft) == {}, "peft loads adapters only"
    assert other_versions({**same, "lora": float("nan")}, with_peft) == {}, "a row from before the LoRA axis"


def test_a_local_model_folders_fingerprint_changes_when_a_file_is_replaced(tmp_path):
    (tmp_path / "transformer").mkdir()
    weights = tmp_path / "transformer" / "model.safetensors"
    weights.write_bytes(b"a" * 10)
    before = folder_fingerprint(tmp_path)
    assert folder_fingerprint(tmp_path) == before
    weights.write_bytes(b"b" * 11)
    assert folder_fingerprint(tmp_path) != before


@pytest.mark.parametrize(
    "content",
    [
        b"a = " + b"[" * 5000 + b"]" * 5000,  # deeper than the parser's recursion
        b"a = " + b"9" * 5000,  # more digits than int() converts
        b'name = "\xff"',  # invalid UTF-8
        b"a = {" * 3000,
    ],
    ids=["deep-nesting", "huge-integer", "invalid-utf8", "unclosed-deep-tables"],
)
def test_input_that_breaks_the_toml_parser_is_one_line_and_exit_2(tmp_path, capsys, content):
    path = tmp_path / "m.toml"
    path.write_bytes(content)
    assert main(["plan", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(path) in err and "Traceback" not in err


def test_a_directory_for_a_matrix_is_one_line_and_exit_2(tmp_path, capsys):
    assert main(["plan", str(tmp_path)]) == 2
    assert "not a file" in capsys.readouterr().err


def test_older_results_folders_read_with_the_new_columns_null():
    folder = next(Path("results/reference/cpu").iterdir())
    frame = read_results(folder)
    assert len(frame) and (frame["schema_version"] == 1).all()
    assert frame["energy_j_per_image"].isna().all() and frame["value_dependent_latency"].isna().all()


def test_report_and_compare_flag_value_dependent_and_throttled_cells():
    import pandas as pd

    from bench.measure import measurement_footnotes

    flags = measurement_flags({"value_dependent_latency": True, "int8_outlier_column_fraction": 0.0123,
                               "gpu_throttle_reasons": "sw_power_cap"})  # fmt: skip
    assert [flag["text"] for flag in flags] == [
        "speed depends on values (1.23% of activation columns held back)",
        "clocks limited: sw_power_cap",
    ]
    assert measurement_flags({"value_dependent_latency": False, "gpu_throttle_reasons": "none"}) == []
    frame = pd.DataFrame({"cell_id": ["a", "a", "b"], "value_dependent_latency": [True, True, None],
                          "gpu_throttle_reasons": [None, None, "none"]})  # fmt: skip
    notes = measurement_footnotes(frame, ["a", "b"])
    assert len(notes) == 1 and notes[0].startswith("1 compared cell(s) have value-dependent speed")
    frame["gpu_other_processes"] = [0, 0, 1]
    notes = measurement_footnotes(frame, ["a", "b"])
    assert len(notes) == 2 and notes[1].startswith("1 compared cell(s) ran on a shared GPU")


def _crosscheck():
    import importlib.util

    spec = importlib.util.spec_from_file_location("energy_crosscheck", "benchmarks/energy_crosscheck.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_crosscheck_integrates_power_samples_over_a_window_and_reads_windows_from_a_log(tmp_path):
    crosscheck = _crosscheck()
    samples = [(float(t) / 10, 700.0) for t in range(0, 31)]  # 700 W for 3 s, a sample every 0.1 s
    assert crosscheck.energy_j(samples, 0.55, 2.55) == pytest.approx(1400.0)
    assert crosscheck.energy_j(samples, 2.0, 4.0) is None  # past the last sample
    log = tmp_path / "cell.log"
    log.write_text(f"{crosscheck.PHASE_PREFIX}{crosscheck.ENERGY_WINDOWS_PREFIX}[[1.0, 2.5], [3.0, 4.0]]\n")
    assert crosscheck.windows_in_log(log) == [(1.0, 2.5), (3.0, 4.0)]


def test_the_committed_references_still_report_and_compare(tmp_path):
    from bench.compare import compare_frames
    from bench.report import write_report

    folder = next(Path("results/reference/cpu").iterdir())
    assert write_report(folder, tmp_path / "report.html").is_file()
    frame = read_results(folder)
    assert len(compare_frames(frame, frame)) == frame["cell_id"].nunique()


def test_rows_from_other_library_versions_are_found_for_plan_and_run(tmp_path):
    from bench.environment import collect_environment
    from bench.runner import describe_versions, rows_from_other_versions
    from bench.store import ResultRow, ResultsFolder
    from tests.test_store import REQUIRED

    current = collect_environment().as_dict()
    folder = ResultsFolder(tmp_path)
    folder.create()
    same = {**REQUIRED, "method_family": "torchao", **current}
    folder.write_cell("aaa", [ResultRow(cell_id="aaa", status="ok", **same)])
    folder.write_cell("bbb", [ResultRow(cell_id="bbb", status="ok", **{**same, "torch_version": "1.0.0"})])
    stale = rows_from_other_versions(folder)
    assert list(stale) == ["bbb"]
    assert describe_versions(stale["bbb"]) == f"torch 1.0.0 -> {current['torch_version']}"


def test_a_local_model_folders_files_are_in_its_cell_ids(tmp_path):
    from bench.matrix import load_matrix
    from tests.conftest import matrix_data, write_matrix

    model = tmp_path / "model"
    (model / "transformer").mkdir(parents=True)
    weights = model / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(b"x" * 8)
    data = matrix_data(model={"path": "model"})
    data["model"].pop("builtin", None)
    path = write_matrix(tmp_path, data)
    before = {cell.id for cell in load_matrix(path).cells}
    assert before == {cell.id for cell in load_matrix(path).cells}
    weights.write_bytes(b"y" * 9)
    assert not before & {cell.id for cell in load_matrix(path).cells}


@pytest.mark.slow
def test_a_compiled_cell_slower_than_its_limit_ends_after_its_warm_up_keeping_its_step_time(tmp_path, quantbench_cache):
    from bench.matrix import load_matrix
    from bench.runner import run_matrix
    from tests.conftest import matrix_data, write_matrix

    data = matrix_data(
        name="slow-warm-up",
        generation={"prompts": ["a red apple"], "num_inference_steps": 3, "repeats": 1},
        axes={"method": ["baseline"], "compile": ["default"]},
        run={"max_warmup_step_s": 1e-6},
        drift={"enabled": False},
    )
    summary = run_matrix(load_matrix(write_matrix(tmp_path, data)), tmp_path / "results")
    row = read_results(tmp_path / "results").iloc[0]
    assert summary.statuses == {"timeout": 1}
    assert "warm-up steps took" in row["error"] and "run.max_warmup_step_s" in row["error"]
    assert row["warmup_step_median_s"] > 1e-6 and pd_isna(row["e2e_latency_median_s"])
    assert row["warmup_peak_reserved_bytes"] is None or pd_isna(row["warmup_peak_reserved_bytes"])  # CPU: no GPU peak


def pd_isna(value) -> bool:
    import pandas as pd

    return bool(pd.isna(value))
