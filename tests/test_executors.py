"""Executors: local-gpus pins one cell per GPU; Ray runs the same cells with the same rows, retries a lost
worker once, and finishes a run another executor started."""

from __future__ import annotations

import os
import re
import tempfile
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from bench.contract import CellResult, CellSpec
from bench.errors import UserError
from bench.executors import make_executor
from bench.executors.base import THREADS_ENV
from bench.executors.local import LocalExecutor
from bench.executors.ray import ACTOR_FOLDER_PREFIX
from bench.launch import STANDBY_MARKS_ENV, CellJob, CellOutcome
from bench.matrix import load_matrix
from bench.runner import run_matrix
from bench.store import ResultsFolder, read_results
from tests.conftest import matrix_data, write_matrix
from tests.test_cli import quantbench
from tests.test_startup import PRESTARTED

# What must not depend on where a cell ran; timings, hosts and timestamps may.
SAME_EVERYWHERE = ["cell_id", "prompt_index", "seed", "status", "method", "transformer_tensor_bytes", "image_finite"]


def _job(index: int) -> CellJob:
    spec = CellSpec(cell={}, cell_id=f"cell{index}", model_folder="", components={}, generation={}, device="cpu")
    return CellJob(spec, timeout_s=60)


def test_a_job_carries_the_drivers_fault_and_heartbeat_settings_to_any_worker(monkeypatch):
    monkeypatch.setenv("QUANTBENCH_HEARTBEAT_S", "5")
    monkeypatch.delenv("QUANTBENCH_INJECT_FAULT", raising=False)
    job = CellJob.for_spec(_job(0).spec, timeout_s=60)
    assert job.env == {"QUANTBENCH_HEARTBEAT_S": "5"}


def test_local_gpus_runs_one_cell_per_device_at_a_time(monkeypatch):
    intervals: list[tuple[str, float, float]] = []
    threads: set[str | None] = set()
    lock = threading.Lock()

    def fake_launch(job, env, on_start, standby=None, scratch_parent=None):
        start = time.monotonic()
        time.sleep(0.15)
        with lock:
            intervals.append((env["CUDA_VISIBLE_DEVICES"], start, time.monotonic()))
            threads.add(env.get(THREADS_ENV))
        return CellOutcome(CellResult(), {}, "", "host", env["CUDA_VISIBLE_DEVICES"], job.spec.attempt)

    monkeypatch.setattr("bench.executors.local.launch_cell", fake_launch)
    monkeypatch.setattr("bench.executors.local.os.cpu_count", lambda: 32)
    monkeypatch.delenv(THREADS_ENV, raising=False)
    with LocalExecutor(["3", "5", "7"]) as executor:
        assert executor.slots == 3 and executor.name == "local-gpus"
        outcomes = [future.result() for future in [executor.submit(_job(i)) for i in range(9)]]
    assert {o.cuda_visible_devices for o in outcomes} == {"3", "5", "7"}
    assert threads == {"10"}, "each of 3 cells side by side gets a third of the 32 cores"
    for gpu in ("3", "5", "7"):
        on_gpu = sorted((start, end) for device, start, end in intervals if device == gpu)
        assert all(end <= next_start for (_, end), (next_start, _) in zip(on_gpu, on_gpu[1:])), f"GPU {gpu} shared"
    busiest = max(sum(start <= t < end for _, start, end in intervals) for _, t, _ in intervals)
    assert busiest == 3


def test_local_gpus_leaves_threads_alone_when_the_user_set_them(monkeypatch):
    seen = []

    def fake_launch(job, env, on_start, standby=None, scratch_parent=None):
        seen.append(env)
        return CellOutcome(CellResult(), {}, "", "host", env["CUDA_VISIBLE_DEVICES"], job.spec.attempt)

    monkeypatch.setattr("bench.executors.local.launch_cell", fake_launch)
    monkeypatch.setenv(THREADS_ENV, "5")  # inherited by the cell unchanged
    with LocalExecutor(["0", "1"]) as executor:
        executor.submit(_job(0)).result()
    assert [{k: v for k, v in env.items() if k != STANDBY_MARKS_ENV} for env in seen] == [{"CUDA_VISIBLE_DEVICES": "0"}]
    assert seen[0][STANDBY_MARKS_ENV].endswith("slot0"), "the slot's folder for processes started ahead"


def test_local_gpus_devices_come_from_cuda_visible_devices(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert make_executor("local-gpus").slots == 2
    assert make_executor("local-gpus", gpus=["3"]).slots == 1, "named devices win"
    with pytest.raises(UserError, match="--gpus: 0 not among CUDA_VISIBLE_DEVICES=2,3"):
        make_executor("local-gpus", gpus=["0", "3"])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(UserError, match="CUDA_VISIBLE_DEVICES is empty, which hides every GPU; unset it"):
        make_executor("local-gpus")


def test_local_gpus_refuses_devices_the_machine_does_not_have(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    for visible in ("0", None):  # a CPU-only torch sees none, whatever the environment lists
        if visible is None:
            monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
        else:
            monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
        with pytest.raises(UserError, match="torch sees no CUDA GPU on this machine; use --executor local"):
            make_executor("local-gpus", gpus=["0"])
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(UserError, match="--gpus: no device 2, 5; this machine's are 0 to 1"):
        make_executor("local-gpus", gpus=["0", "2", "5"])
    assert make_executor("local-gpus", gpus=["1", "MIG-4f1e"]).slots == 2, "a MIG or UUID name is passed on"
    assert make_executor("local-gpus").slots == 2


def test_executor_options_are_checked():
    with pytest.raises(UserError, match="unknown executor 'slurm'; allowed: local, local-gpus, ray"):
        make_executor("slurm")
    with pytest.raises(UserError, match="--address is for --executor ray"):
        make_executor("local", address="auto")


@pytest.mark.slow
def test_local_gpus_smoke_rows_match_the_local_executor(smoke_run, tmp_path):
    matrix, local_results, _ = smoke_run
    results = tmp_path / "results"
    summary = run_matrix(matrix, results, executor=LocalExecutor(["0", "1"]))
    assert summary.statuses == {"ok": 2}
    rows = read_results(results)
    assert set(rows["cuda_visible_devices"]) == {"0", "1"}, "both devices were used"
    assert set(rows["executor"]) == {"local-gpus"}
    if THREADS_ENV not in os.environ:
        assert set(rows["cpu_threads"]) == {max(1, (os.cpu_count() or 1) // 2)}, "each cell gets half the cores"
    _assert_same_rows(read_results(local_results), rows)


def _assert_same_rows(expected: pd.DataFrame, actual: pd.DataFrame) -> None:
    key = ["cell_id", "prompt_index", "seed"]
    expected, actual = expected.sort_values(key).reset_index(drop=True), actual.sort_values(key).reset_index(drop=True)
    pd.testing.assert_frame_equal(expected[SAME_EVERYWHERE], actual[SAME_EVERYWHERE])
    # on CPU the arithmetic is the same wherever the cell ran; threads may reorder sums in the last bits
    for metric in ("psnr_db", "ssim", "latent_rel_l2"):
        assert actual[metric].to_numpy() == pytest.approx(expected[metric].to_numpy(), rel=1e-3, abs=1e-6), metric


def test_a_ray_actors_folder_is_locked_while_it_lives_and_a_killed_actors_is_deleted_by_the_next(tmp_path, monkeypatch):
    from bench.executors.ray import CellRunner  # the actor's class, here without Ray

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the node's temporary folder
    killed = tmp_path / f"{ACTOR_FOLDER_PREFIX}killed"  # what a killed actor leaves: its lock released by the kernel
    (killed / "quantbench-cell-x").mkdir(parents=True)
    (killed / ".lock").touch()
    first = CellRunner()
    assert not killed.exists(), "an ended actor's folder is deleted"
    second = CellRunner()
    assert first.folder.exists() and second.folder.exists(), "a running actor's folder is kept"
    first.shutdown()
    assert not first.folder.exists() and second.folder.exists()
    second.shutdown()
    assert not list(tmp_path.iterdir())


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray cluster of 4 CPUs and 2 fake GPUs (Ray pins each task's CUDA_VISIBLE_DEVICES)."""
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'quantbench[ray]')")
    ray.init(num_cpus=4, num_gpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.mark.slow
def test_ray_smoke_rows_match_the_local_executor(smoke_run, tmp_path, ray_cluster):
    matrix, local_results, _ = smoke_run
    results = tmp_path / "results"
    summary = run_matrix(matrix, results, executor=make_executor("ray"))
    assert summary.statuses == {"ok": 2}
    rows = read_results(results)
    assert set(rows["executor"]) == {"ray"} and set(rows["attempts"]) == {1}
    assert set(rows["cuda_visible_devices"]) <= {"0", "1"} and rows["host"].notna().all()
    if THREADS_ENV not in os.environ:
        assert set(rows["cpu_threads"]) == {2}, "a GPU cell gets its node's share of the CPUs, not Ray's default 1"
    assert all((results / row.image_path).exists() for row in rows.itertuples())
    _assert_same_rows(read_results(local_results), rows)


@pytest.mark.slow
def test_ray_retries_a_lost_worker_once_then_records_the_cell_failed(tmp_path, ray_cluster, monkeypatch):
    data = matrix_data(name="lost", generation={"prompts": ["a red apple"], "num_inference_steps": 2, "repeats": 1})
    data["drift"] = {"enabled": False}
    matrix = load_matrix(write_matrix(tmp_path, data))
    flaky, dead = matrix.cells
    monkeypatch.setenv("QUANTBENCH_INJECT_FAULT", f"kill-worker-once@{flaky.id},kill-worker@{dead.id}")
    results = tmp_path / "results"
    summary = run_matrix(matrix, results, executor=make_executor("ray"))
    rows = read_results(results).set_index("cell_id")
    assert rows.loc[flaky.id, "status"] == "ok" and rows.loc[flaky.id, "attempts"] == 2
    assert rows.loc[dead.id, "status"] == "failed"
    assert "worker running the cell was lost on 2 attempts" in rows.loc[dead.id, "error"]
    assert re.search(r"lost on 2 attempts: Actor\w*Error", rows.loc[dead.id, "error"]), "Ray's reason is kept"
    assert summary.statuses == {"ok": 1, "failed": 1}


@pytest.mark.slow
def test_each_ray_actor_starts_its_next_cells_process_ahead(tmp_path, ray_cluster):
    """Two actors (one per fake GPU), three cells: each actor's first cell starts with its cell, and the third cell
    comes to the process its actor started ahead, on that actor's GPU (a standby with another environment would
    not be used)."""
    data = {**PRESTARTED, "name": "ray-prestarted"}  # three cells, each after the first started ahead
    data["drift"] = {"enabled": False}
    matrix = load_matrix(write_matrix(tmp_path, data))
    results = tmp_path / "results"
    summary = run_matrix(matrix, results, executor=make_executor("ray"))
    assert summary.statuses == {"ok": 3}
    logs = [(results / "logs" / f"{cell.id}.log").read_text() for cell in matrix.cells]
    assert sum("started ahead" in log for log in logs) == 1, "only the third cell had a process waiting for it"
    pids = {re.search(r"imports: torch [\d.]+ s \(process (\d+)\)", log).group(1) for log in logs}
    assert len(pids) == 3, "each cell ran in a process of its own"
    assert set(read_results(results)["cuda_visible_devices"]) == {"0", "1"}
    left = list(Path(tempfile.gettempdir()).glob(f"{ACTOR_FOLDER_PREFIX}*"))
    assert not left, "the actors deleted their folders, and those of actors killed earlier (a lost worker) are gone"


@pytest.mark.slow
def test_a_run_started_locally_is_finished_on_ray(tmp_path, ray_cluster):
    data = matrix_data(name="resumed", generation={"prompts": ["a red apple"], "num_inference_steps": 2, "repeats": 1})
    path = write_matrix(tmp_path, data)
    results = tmp_path / "results"
    first = run_matrix(load_matrix(path, ["method=baseline"]), results)
    assert first.statuses == {"ok": 1}
    folder = ResultsFolder(results)
    (baseline_id,) = folder.completed_cell_ids()
    finished_part = folder.part_path(baseline_id).read_bytes()
    rest = run_matrix(load_matrix(path), results, executor=make_executor("ray"))
    assert rest.already_done == 1 and rest.statuses == {"ok": 1}
    assert folder.part_path(baseline_id).read_bytes() == finished_part
    rows = read_results(results)
    assert dict(zip(rows["method"], rows["executor"])) == {"baseline": "local", "torchao": "ray"}


@pytest.mark.slow
def test_a_ray_run_stopped_by_max_time_exits_3_and_ends_the_cluster_it_started(make_matrix, tmp_path, monkeypatch):
    """The driver starts its own Ray (`--address local`) and the run is stopped: the executor is shut down by the
    run and again on leaving, and the second time must not start Ray anew nor hide the time limit."""
    pytest.importorskip("ray", reason="Ray is not installed (pip install 'quantbench[ray]')")
    monkeypatch.setenv("QUANTBENCH_INJECT_FAULT", "hang")  # the cell never ends: the time limit must stop it
    path = make_matrix(axes={"method": ["baseline"]}, drift={"enabled": False})
    args = ("run", str(path), "--executor", "ray", "--address", "local", "--max-time", "45s", "--results", "out")
    done = quantbench(*args, cwd=tmp_path)
    assert done.returncode == 3 and "Traceback" not in done.stderr, done.stderr
    assert "stopped at the time limit of 45 s with 1 cell not finished; rerun to resume" in done.stderr
    assert list((tmp_path / "out").glob("logs/*.interrupted.log")), "the stopped cell's log is kept"
