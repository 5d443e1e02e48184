"""On a CUDA GPU only: NVML energy windows, CUDA-event step marks, the timed-only peak, and bitsandbytes int8's
outlier-column count, on the real libraries."""

from __future__ import annotations

import time

import pytest
import torch

from bench.cells import Cell
from bench.matrix import load_matrix
from bench.methods import method_class
from bench.runner import run_matrix
from bench.store import read_results
from bench.trackers.energy import EnergyTracker
from bench.trackers.latency import Clock, Latency
from tests.conftest import matrix_data, write_matrix

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _busy(seconds: float) -> None:
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        for _ in range(20):
            a = (a @ a).clamp_(-1, 1)
        torch.cuda.synchronize()


def test_nvml_energy_windows_give_power_between_idle_and_the_limit():
    uuid = str(torch.cuda.get_device_properties(0).uuid)
    tracker = EnergyTracker(cuda=True, gpu_uuid=uuid)
    with tracker.sampling():
        for _ in range(2):
            with tracker.window():
                _busy(1.5)
    energy = tracker.result(step_median_s=0.1)
    assert energy.energy_note is None, energy.energy_note
    assert 30 < energy.avg_power_w <= 1.1 * energy.gpu_power_limit_w
    assert energy.energy_j_per_image == pytest.approx(energy.avg_power_w * 1.5, rel=0.25)
    assert energy.gpu_sm_clock_mhz > 100 and energy.gpu_temperature_c > 0
    assert energy.gpu_throttle_reasons is not None
    assert energy.gpu_other_processes in (0, None)  # alone on the GPU (None: NVML lists no processes here)


def test_another_process_holding_the_gpu_is_counted():
    import subprocess
    import sys

    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, torch; torch.zeros(1, device='cuda'); print('ready', flush=True); sys.stdin.read()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "ready"
        torch.zeros(1, device="cuda")  # this process's own context
        tracker = EnergyTracker(cuda=True, gpu_uuid=str(torch.cuda.get_device_properties(0).uuid))
        with tracker.sampling(), tracker.window():
            _busy(0.6)
        others = tracker.result(step_median_s=None).gpu_other_processes
    finally:
        holder.communicate("", timeout=30)
    if others is None:
        pytest.skip("NVML lists no compute processes on this machine (a container without the host's PID view)")
    assert others >= 1


def test_cuda_event_step_marks_match_synchronised_wall_time():
    clock = Clock(cuda=True)
    latency = Latency(clock, clock.now())
    walls = []
    for _ in range(4):
        start = time.perf_counter()
        _busy(0.2)
        walls.append(time.perf_counter() - start)
        latency.step_ended()
    torch.cuda.synchronize()
    for event_s, wall_s in zip(latency.step_s(), walls[1:]):
        assert event_s == pytest.approx(wall_s, rel=0.1)


def test_gpu_rows_carry_energy_and_a_timed_peak_apart_from_the_warm_ups(tmp_path, quantbench_cache):
    data = matrix_data(
        name="truth", run={"timeout_s": 600}, drift={"enabled": False},
        generation={"height": 512, "width": 512, "num_inference_steps": 8, "repeats": 2},
    )  # fmt: skip
    run_matrix(load_matrix(write_matrix(tmp_path, data)), tmp_path / "results")
    rows = read_results(tmp_path / "results")
    assert (rows["status"] == "ok").all(), rows["error"].tolist()
    assert rows["warmup_peak_reserved_bytes"].notna().all() and rows["peak_reserved_bytes"].notna().all()
    assert rows["gpu_power_limit_w"].notna().all() and rows["gpu_sm_clock_mhz"].notna().all()
    assert rows["energy_j_per_image"].notna().all() or rows["energy_note"].notna().all()


def test_the_next_cells_process_waiting_on_the_gpu_is_not_counted_as_sharing_it(tmp_path, quantbench_cache):
    """Prestarted cells: each cell's process starts (and initialises CUDA while importing bitsandbytes or torchao)
    while the cell before it runs, then waits idle; the running cell must not count it as another process."""
    data = matrix_data(
        name="prestarted", run={"timeout_s": 600, "cell_start": "prestarted"}, drift={"enabled": False},
        generation={"height": 512, "width": 512, "num_inference_steps": 4, "repeats": 1},
    )  # fmt: skip
    run_matrix(load_matrix(write_matrix(tmp_path, data)), tmp_path / "results")
    rows = read_results(tmp_path / "results")
    assert (rows["status"] == "ok").all(), rows["error"].tolist()
    if rows["gpu_other_processes"].isna().all():
        pytest.skip("NVML lists no compute processes on this machine (a container without the host's PID view)")
    assert (rows["gpu_other_processes"] == 0).all(), rows[["cell_id", "gpu_other_processes"]].to_string()


def test_bitsandbytes_int8_counts_the_columns_over_the_threshold():
    import bitsandbytes as bnb

    cls = method_class("bnb_8bit")
    method = cls(cls.Options.model_validate({}))
    linear = bnb.nn.Linear8bitLt(64, 64, bias=False, has_fp16_weights=False, threshold=6.0).cuda()

    class Pipe(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.transformer = torch.nn.Sequential(linear)

    pipe = Pipe()
    x = torch.zeros(8, 64, device="cuda", dtype=torch.float16)
    x[3, :16] = 10.0  # 16 of 64 columns have a value over the threshold

    def generate() -> None:
        with torch.no_grad():
            pipe.transformer(x)

    cell = Cell(method="bnb_8bit", threshold=6.0, components=("transformer",))
    assert method.value_dependence(pipe, cell, generate) == {"int8_outlier_column_fraction": 0.25}
