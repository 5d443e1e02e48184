"""How a cell's process starts: with the cell (`run.cell_start = "spawn"`) or ahead of it, while the cell before it
runs (`"prestarted"`). Either way every cell has a fresh process of its own, with the cell's environment, and a
cell that crashes is still a row."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

import psutil
import pytest

from bench.contract import CellSpec
from bench.errors import UserError
from bench.executors.local import LocalExecutor
from bench.launch import CellJob, Standby, job_environment
from bench.matrix import load_matrix
from bench.runner import run_matrix
from bench.store import read_results
from tests.conftest import matrix_data, write_matrix

PRESTARTED = matrix_data(
    name="prestarted",
    run={"timeout_s": 120, "cell_start": "prestarted"},
    generation={"prompts": ["a red apple"], "num_inference_steps": 2, "repeats": 1},
    axes={"method": ["baseline", "torchao"]},
    method={"torchao": {"quant_type": ["int8wo", "float8wo"]}},
)


def _children() -> list[psutil.Process]:
    return psutil.Process().children(recursive=True)


@pytest.fixture(scope="module")
def prestarted_run(tmp_path_factory, quantbench_cache):
    """Three cells on one slot (pinned to "GPU 7", one thread), each after the first started ahead; the second
    crashes and the third is SIGKILLed."""
    folder = tmp_path_factory.mktemp("prestarted")
    matrix = load_matrix(write_matrix(folder, PRESTARTED))
    by_label = {cell.label: cell for cell in matrix.cells}
    crash, kill = by_label["torchao[int8wo] bf16"].id, by_label["torchao[float8wo] bf16"].id
    mp = pytest.MonkeyPatch()
    mp.setenv("QUANTBENCH_INJECT_FAULT", f"crash@{crash},sigkill@{kill}")
    mp.setenv("OMP_NUM_THREADS", "1")  # the cells must see it: torch reads it when it starts
    standbys_before = _standby_scratch_folders()
    summary = run_matrix(matrix, folder / "results", executor=LocalExecutor(gpus=["7"]))
    mp.undo()
    return matrix, folder / "results", summary, standbys_before


def _standby_scratch_folders() -> set[Path]:
    """The scratch folders of standbys (they hold the template spec) in the temporary folder."""
    return {path.parent for path in Path(tempfile.gettempdir()).glob("quantbench-cell-*/template.json")}


@pytest.mark.slow
def test_every_prestarted_cell_is_a_row_from_a_fresh_process_with_the_cells_environment(prestarted_run):
    matrix, results, summary, _ = prestarted_run
    table = read_results(results).drop_duplicates("cell_id").set_index("cell_label")
    assert set(table.index) == {cell.label for cell in matrix.cells}, "every cell is a row, the crashed ones too"
    assert table.loc["baseline bf16", "status"] == "ok"
    assert table.loc["torchao[int8wo] bf16", "status"] == "failed"
    assert "injected crash" in table.loc["torchao[int8wo] bf16", "error"].lower()
    assert "SIGKILL" in table.loc["torchao[float8wo] bf16", "error"]
    assert (table["cuda_visible_devices"] == "7").all()
    assert (table["cpu_threads"] == 1).all(), "OMP_NUM_THREADS reached torch in every process, prestarted or not"

    logs = {cell.label: (results / "logs" / f"{cell.id}.log").read_text() for cell in matrix.cells}
    pids = {label: re.search(r"imports: torch [\d.]+ s \(process (\d+)\)", log).group(1) for label, log in logs.items()}
    assert len(set(pids.values())) == len(pids), f"each cell ran in a process of its own: {pids}"
    first = [label for label, log in logs.items() if "started ahead" not in log]
    assert len(first) == 1, "only the run's first cell, which has no cell before it, starts with its cell"
    ready = [label for label, log in logs.items() if re.search(r"started ahead: .* s waiting", log)]
    assert ready, "the cell after the first came to a standby whose imports were done"
    for label in ready:  # a cell handed to a standby still importing has the rest of the imports in its import_s
        assert table.loc[label, "import_s"] < table.loc[first[0], "import_s"] / 2


@pytest.mark.slow
def test_a_prestarted_run_leaves_no_process_and_no_scratch_folder(prestarted_run):
    _, _, _, standbys_before = prestarted_run
    workers = [p for p in _children() if "bench.worker" in " ".join(p.cmdline())]
    assert not workers, f"no cell or standby process outlives the run: {workers}"
    assert not _standby_scratch_folders() - standbys_before, "every standby's scratch folder is deleted"


def test_a_standby_has_exactly_the_environment_it_was_started_with_and_a_process_of_its_own(tmp_path):
    spec = CellSpec(cell={"method": "baseline"}, cell_id="x", model_folder=str(tmp_path), components={},
                    generation={}, device="cpu")  # fmt: skip
    job = CellJob(spec, 60, {"QUANTBENCH_TEST_MARK": "first"})
    first = Standby(spec, job_environment(job, {"CUDA_VISIBLE_DEVICES": "3"}))
    second = Standby(spec, job_environment(job, {"CUDA_VISIBLE_DEVICES": "4"}))
    try:
        assert first.process.pid != second.process.pid
        for standby, gpu in ((first, "3"), (second, "4")):
            seen = psutil.Process(standby.process.pid).environ()
            assert seen == standby.env, "the process got the cell's environment, nothing more or less"
            assert seen["CUDA_VISIBLE_DEVICES"] == gpu and seen["QUANTBENCH_TEST_MARK"] == "first"
            assert os.getpgid(standby.process.pid) == standby.process.pid, "a session of its own, killable whole"
    finally:
        first.discard()
        second.discard()
    assert first.process.returncode is not None and not first.scratch.exists()


def test_a_standby_started_for_another_environment_is_not_used(tmp_path, monkeypatch):
    """launch_cell discards a standby whose environment is not the cell's and starts the cell fresh."""
    from bench import launch

    spec = CellSpec(cell={"method": "baseline"}, cell_id="x", model_folder=str(tmp_path), components={},
                    generation={}, device="cpu")  # fmt: skip
    stale = Standby(spec, job_environment(CellJob(spec, 60), {"CUDA_VISIBLE_DEVICES": "0"}))
    started = []

    class Spawned(Exception):
        pass

    def refuse(*args, **kwargs):  # the fresh process the launcher would start instead
        started.append(kwargs["env"])
        raise Spawned

    monkeypatch.setattr(launch.subprocess, "Popen", refuse)
    with pytest.raises(Spawned):
        launch.launch_cell(CellJob(spec, 60), {"CUDA_VISIBLE_DEVICES": "1"}, standby=stale)
    assert started and started[0]["CUDA_VISIBLE_DEVICES"] == "1"
    assert stale.process.returncode is not None, "the standby with GPU 0's environment was killed, not used"
    assert not stale.scratch.exists()


def test_cell_start_is_spawn_by_default_and_a_bad_value_names_the_key(make_matrix):
    assert load_matrix(make_matrix()).spec.run.cell_start == "spawn"
    with pytest.raises(UserError, match=r"run\.cell_start.*'fork'"):
        load_matrix(make_matrix(run={"cell_start": "fork"}))


def test_a_standby_ends_by_itself_when_no_cell_comes(tmp_path):
    """The driver closing the pipe (it ended) ends a waiting standby with nothing written."""
    spec = CellSpec(cell={"method": "baseline"}, cell_id="x", model_folder=str(tmp_path), components={},
                    generation={}, device="cpu")  # fmt: skip
    standby = Standby(spec, job_environment(CellJob(spec, 60)))
    try:
        standby.process.stdin.close()
        assert standby.process.wait(timeout=120) == 0
        assert not (standby.scratch / "output").exists()
    finally:
        standby.discard()


def test_the_executor_ends_a_standby_no_cell_used_when_it_shuts_down(tmp_path, monkeypatch):
    """The standby started for a next cell that never comes (the run ended or was interrupted) is killed and its
    scratch folder deleted."""
    from bench.executors import local

    spec = CellSpec(cell={"method": "baseline"}, cell_id="x", model_folder=str(tmp_path), components={},
                    generation={}, device="cpu")  # fmt: skip

    def started_only(job, env, on_start, standby, scratch_parent):  # the cell itself is not needed here
        on_start(psutil.Popen(["true"]))
        return "outcome"

    monkeypatch.setattr(local, "launch_cell", started_only)
    executor = LocalExecutor()
    assert executor.submit(CellJob(spec, 60, prestart_next=True)).result() == "outcome"
    (standby,) = executor._standbys.values()
    assert standby.process.poll() is None, "the next cell's process waits"
    executor.shutdown()
    assert standby.process.returncode is not None and not standby.scratch.exists()


def test_a_standby_holds_a_lock_while_it_imports_and_the_running_cell_waits_for_it(tmp_path):
    """The slot's running cell times nothing while a process started ahead still imports (they would share the
    CPU): the driver locks a file in the slot's marks folder before the standby exists, the standby holds the
    lock until its imports are done, and the kernel drops it however the standby ends."""
    import signal
    import time

    from bench.worker import STANDBY_MARKS_ENV, _locked, wait_for_next_cell_imports

    spec = CellSpec(cell={"method": "baseline"}, cell_id="x", model_folder=str(tmp_path), components={},
                    generation={}, device="cpu")  # fmt: skip
    marks = tmp_path / "marks"
    marks.mkdir()
    env = job_environment(CellJob(spec, 60), {STANDBY_MARKS_ENV: str(marks)})
    standby = Standby(spec, env)
    killed = Standby(spec, env)
    try:
        held = sorted(marks.iterdir())
        assert len(held) == 2 and all(_locked(mark) for mark in held), "locked from the start, before any import"
        os.kill(killed.process.pid, signal.SIGKILL)  # dies while importing, not reaped: a zombie keeps no lock
        deadline = time.monotonic() + 10
        while len([mark for mark in held if _locked(mark)]) > 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len([mark for mark in held if _locked(mark)]) == 1 and standby.process.poll() is None
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv(STANDBY_MARKS_ENV, str(marks))
            assert wait_for_next_cell_imports(limit_s=0.3) >= 0.3, "a standby still importing is waited for"
            waited = wait_for_next_cell_imports(limit_s=120)
        assert 0 < waited < 120 and not any(_locked(mark) for mark in held), "the wait ends when the imports do"
        assert standby.process.poll() is None, "the standby, imported, now waits for its cell"
    finally:
        standby.discard()
        killed.discard()
    assert not list(marks.iterdir()), "a discarded standby's file goes with it"


def test_a_waiting_process_holding_a_cuda_context_is_counted_as_idle_and_never_waited_for(tmp_path, monkeypatch):
    """A standby whose imports initialised CUDA locks its idle-context file until its cell starts (no CUDA here:
    a process stands in with the same lock); the running cell neither waits for it nor counts it as another
    process on its GPU, and killing the standby removes the file."""
    import subprocess
    import sys
    import time

    from bench.worker import STANDBY_MARKS_ENV, idle_context_mark, idle_contexts, wait_for_next_cell_imports

    monkeypatch.setenv(STANDBY_MARKS_ENV, str(tmp_path))
    holder = subprocess.Popen(  # holds its idle-context file's lock, as a waiting standby does
        [sys.executable, "-c", "import fcntl, os, sys, time; from bench.worker import idle_context_mark;"
         " fcntl.flock(os.open(idle_context_mark(sys.argv[1], os.getpid()), os.O_CREAT | os.O_WRONLY), fcntl.LOCK_EX);"
         " print('locked', flush=True); time.sleep(60)", str(tmp_path)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert idle_contexts() == 1
        assert wait_for_next_cell_imports(limit_s=5) < 1, "imports done: nothing to wait for"
    finally:
        holder.kill()
        holder.wait()
    deadline = time.monotonic() + 10
    while idle_contexts() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert idle_contexts() == 0, "a process that ended holds no context"
    assert idle_context_mark(tmp_path, holder.pid).exists()

    spec = CellSpec(cell={"method": "baseline"}, cell_id="x", model_folder=str(tmp_path), components={},
                    generation={}, device="cpu")  # fmt: skip
    standby = Standby(spec, job_environment(CellJob(spec, 60), {STANDBY_MARKS_ENV: str(tmp_path)}))
    mark = idle_context_mark(tmp_path, standby.process.pid)
    mark.touch()
    standby.discard()
    assert not mark.exists(), "a killed standby's idle-context file goes with it"


def test_cells_without_a_marks_folder_or_with_only_released_marks_never_wait(tmp_path, monkeypatch):
    from bench.worker import STANDBY_MARKS_ENV, wait_for_next_cell_imports

    (tmp_path / "importing-done").touch()  # a standby's file after its imports: no lock on it
    monkeypatch.setenv(STANDBY_MARKS_ENV, str(tmp_path))
    assert wait_for_next_cell_imports(limit_s=5) < 1
    monkeypatch.delenv(STANDBY_MARKS_ENV)
    assert wait_for_next_cell_imports(limit_s=5) < 1
