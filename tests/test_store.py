"""The results folder: atomic part files with open()'s mode, unreadable parts ignored (so their cell reruns), the run
lock; reading results from a file that is not a part file."""

from __future__ import annotations

import multiprocessing
import os
import re

import pytest

from bench.errors import UserError
from bench.store import SCHEMA, ResultRow, ResultsFolder

REQUIRED = {
    "schema_version": 1, "matrix_name": "m", "matrix_path": "m.toml", "cell_label": "x", "timestamp_utc": "t",
    "error": None, "method": "baseline", "method_family": "baseline", "method_options": "{}",
    "dtype": "bf16", "threshold": None, "compile": "off", "fullgraph": None, "inductor": None, "regional": None,
    "components": None,
    "placement": "device",
    "model_source": "builtin:tiny-flux", "model_revision": None, "pipeline_class": "FluxPipeline", "weights": "synthetic",
    "prompt_index": 0, "prompt": "p", "seed": 0, "height": 64, "width": 64, "num_inference_steps": 2,
    "guidance_scale": 3.5, "max_sequence_length": 32, "repeats": 1,
}  # fmt: skip


def row(cell_id: str, status: str = "ok") -> ResultRow:
    return ResultRow(cell_id=cell_id, status=status, **REQUIRED)


def test_part_files_round_trip_with_the_declared_schema(tmp_path):
    folder = ResultsFolder(tmp_path)
    folder.create()
    folder.write_cell("aaa", [row("aaa")])
    folder.write_cell("bbb", [row("bbb", "failed"), row("bbb")])
    table = folder.read_table()
    assert table.schema.names == SCHEMA.names
    assert sorted(table.column("cell_id").to_pylist()) == ["aaa", "bbb", "bbb"]
    assert folder.completed_cell_ids() == {"aaa"}
    assert not list(folder.cells_dir.glob(".*tmp")), "no temporary file is left behind"


def test_cell_statuses_give_each_cell_its_worst_row_and_stopped_cells_without_rows(tmp_path):
    folder = ResultsFolder(tmp_path)
    folder.create()
    folder.write_cell("aaa", [row("aaa")])
    folder.write_cell("bbb", [row("bbb"), row("bbb", "oom")])
    folder.write_interrupted_log("ccc", "warm-up", ran_s=60)
    folder.write_interrupted_log("aaa", "an earlier try", ran_s=60)  # stopped once, finished since: its row decides
    assert folder.cell_statuses() == {"aaa": "ok", "bbb": "oom", "ccc": "stopped"}
    assert folder.completed_cell_ids() == {"aaa"}


def test_a_cell_stopped_twice_keeps_both_tries_logs_until_it_finishes(tmp_path):
    folder = ResultsFolder(tmp_path)
    folder.create()
    folder.write_interrupted_log("aaa", "first try: 1562 Triton kernels\n", ran_s=541.2)
    folder.write_interrupted_log("aaa", "second try: 1136 Triton kernels\n", ran_s=463)
    log = folder.interrupted_log_path("aaa").read_text()
    assert log.index("stopped after 541 s") < log.index("first try") < log.index("stopped after 463 s")
    assert log.index("stopped after 463 s") < log.index("second try")
    folder.write_cell_files("aaa", {}, "finished")
    assert not folder.interrupted_log_path("aaa").exists()
    assert (folder.logs_dir / "aaa.log").read_text() == "finished"


def test_truncated_part_is_not_read_as_valid_and_its_cell_counts_as_not_done(tmp_path):
    folder = ResultsFolder(tmp_path)
    folder.create()
    path = folder.write_cell("aaa", [row("aaa")])
    folder.write_cell("bbb", [row("bbb")])
    path.write_bytes(path.read_bytes()[:-40])
    assert folder.completed_cell_ids() == {"bbb"}
    assert folder.read_table().column("cell_id").to_pylist() == ["bbb"]


def test_an_unreadable_part_is_left_out_where_the_folder_is_only_read_and_rerun_where_it_is_run(tmp_path, caplog):
    from bench.store import LEFT_OUT, RERUN, read_results

    folder = ResultsFolder(tmp_path)
    folder.create()
    folder.write_cell("aaa", [row("aaa")])
    folder.part_path("bbb").write_bytes(b"not parquet")
    assert list(read_results(tmp_path)["cell_id"]) == ["aaa"]  # as report and compare read it
    assert f"ignoring unreadable result part {folder.part_path('bbb')}" in caplog.text
    assert caplog.text.rstrip().endswith(LEFT_OUT) and RERUN not in caplog.text
    caplog.clear()
    assert list(read_results(tmp_path)["cell_id"]) == ["aaa"]
    assert not caplog.text, "one warning per file and command, however often it is read"
    broken = folder.part_path("bbb")
    broken.write_bytes(b"still not parquet")  # another version of the file is warned about again
    os.utime(broken, ns=(broken.stat().st_atime_ns, broken.stat().st_mtime_ns + 10**9))
    assert folder.completed_cell_ids() == {"aaa"}  # as a run reads it
    assert caplog.text.rstrip().endswith(RERUN) and LEFT_OUT not in caplog.text


def test_reading_results_from_a_file_that_is_not_a_part_is_a_user_error(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from bench.store import read_results

    folder = ResultsFolder(tmp_path / "run")
    folder.create()
    part = folder.write_cell("aaa", [row("aaa")])
    assert list(read_results(part)["cell_id"]) == ["aaa"], "one part file is a valid input"
    (tmp_path / "m.toml").write_text('name = "m"\n')
    pq.write_table(pa.table({"x": [1]}), tmp_path / "other.parquet")
    truncated = tmp_path / "truncated.parquet"
    truncated.write_bytes(part.read_bytes()[:-40])
    for path, reason in [
        ("m.toml", "pyarrow reads no table from it"),
        ("truncated.parquet", "pyarrow reads no table from it"),
        ("other.parquet", "a Parquet file without the result columns cell_id, status"),
    ]:
        said = f"{tmp_path / path}: not a results folder or Parquet file of results ({reason})"
        with pytest.raises(UserError, match=f"^{re.escape(said)}"):
            read_results(tmp_path / path)


def test_written_files_get_the_mode_open_gives_not_mkstemps_0600(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    write = (
        "import os, sys; os.umask(int(sys.argv[2], 8)); from bench.atomic import write_text_atomic; "
        "write_text_atomic(sys.argv[1], 'x')"
    )
    root = str(Path(__file__).resolve().parent.parent)
    for umask, mode in (("022", 0o644), ("027", 0o640)):
        target = tmp_path / f"umask-{umask}.txt"
        subprocess.run([sys.executable, "-c", write, str(target), umask], check=True, cwd=root)
        assert target.stat().st_mode & 0o777 == mode, oct(target.stat().st_mode)


def test_rewriting_a_cell_replaces_its_rows(tmp_path):
    folder = ResultsFolder(tmp_path)
    folder.create()
    folder.write_cell("aaa", [row("aaa", "failed")])
    folder.write_cell("aaa", [row("aaa")])
    assert folder.read_table().column("status").to_pylist() == ["ok"]


def _hold_lock(root, ready, release):
    with ResultsFolder(root).exclusive():
        ready.set()
        release.wait(30)


def test_second_run_on_the_same_folder_stops_with_a_clear_message(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(tmp_path, ready, release))
    holder.start()
    try:
        assert ready.wait(30)
        with (
            pytest.raises(
                UserError, match=rf"another quantbench run \(pid {holder.pid}\) is writing this results folder"
            ),
            ResultsFolder(tmp_path).exclusive(),
        ):
            pass
    finally:
        release.set()
        holder.join(30)
    with ResultsFolder(tmp_path).exclusive():  # free again once the first run ends
        assert (tmp_path / ".lock").read_text() == str(os.getpid())


def test_run_records_append_and_a_line_cut_short_by_a_crash_is_skipped(tmp_path):
    from bench.store import RUNS_FILE, read_runs

    folder = ResultsFolder(tmp_path)
    assert read_runs(tmp_path) == []
    folder.append_run({"wall_s": 1.5, "ended": "done"})
    folder.append_run({"wall_s": 2.5, "ended": "time limit"})
    with open(tmp_path / RUNS_FILE, "a") as handle:
        handle.write('{"wall_s": 3')  # the driver died mid-write
    assert [run["ended"] for run in read_runs(tmp_path)] == ["done", "time limit"]
    folder.append_run({"wall_s": 4.5, "ended": "interrupted"})  # the next run's record starts a line of its own
    assert [run["ended"] for run in read_runs(tmp_path)] == ["done", "time limit", "interrupted"]


def test_a_run_record_that_cannot_be_written_does_not_fail_the_run(tmp_path, monkeypatch, caplog):
    import torch

    from bench.matrix import load_matrix
    from bench.runner import run_matrix
    from tests.conftest import matrix_data, write_matrix

    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA, where the bitsandbytes cell is skipped without running")

    def disk_full(self, record):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ResultsFolder, "append_run", disk_full)
    matrix = load_matrix(write_matrix(tmp_path, matrix_data(axes={"method": ["bnb_8bit"]}, drift={"enabled": False})))
    summary = run_matrix(matrix, tmp_path / "results")
    assert summary.statuses == {"skipped": 1}, "the rows were written"
    assert "could not record this run" in caplog.text and "No space left on device" in caplog.text
