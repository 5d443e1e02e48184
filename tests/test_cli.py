"""The command line as a user meets it: help on every verb, exit codes, one-line errors, no stray files."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def quantbench(*args: str, cwd: Path, columns: int | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    if columns:
        env["COLUMNS"] = str(columns)  # rich's table width: wide enough that no column is cut
    return subprocess.run(
        [sys.executable, "-m", "bench", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


@pytest.mark.parametrize("verb", ["plan", "run", "report", "compare"])
def test_every_verb_has_help(verb, tmp_path):
    done = quantbench(verb, "--help", cwd=tmp_path)
    assert done.returncode == 0
    assert f"usage: quantbench {verb}" in done.stdout


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["run"], "the following arguments are required: matrix"),
        (["run", "missing.toml"], "missing.toml: <top level>: matrix file not found"),
        (["plan", "."], ".: <top level>: not a file"),
    ],
)
def test_cli_misuse_exits_2_with_one_line_and_no_traceback(args, fragment, tmp_path):
    done = quantbench(*args, cwd=tmp_path)
    assert done.returncode == 2
    assert fragment in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "results").exists()


def test_bad_matrix_exits_2_and_writes_no_result(make_matrix, tmp_path):
    path = make_matrix(axes={"method": ["baseline", "bnb_9bit"]})
    done = quantbench("run", str(path), cwd=tmp_path)
    assert done.returncode == 2
    error_lines = [line for line in done.stderr.splitlines() if line.startswith("quantbench: error:")]
    assert len(error_lines) == 1 and "axes.method" in error_lines[0] and "bnb_9bit" in error_lines[0]
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "results").exists()


def test_unknown_component_is_caught_before_any_cell_runs(make_matrix, tmp_path):
    path = make_matrix(axes={"method": ["torchao"], "components": [["transformer", "unet"]]})
    done = quantbench("run", str(path), cwd=tmp_path)
    assert done.returncode == 2
    assert "axes.components: FluxPipeline has no such component (got 'unet')" in done.stderr
    assert "allowed: text_encoder, text_encoder_2, transformer, vae" in done.stderr
    assert not list(tmp_path.glob("results/*/cells/*.parquet"))


def test_plan_lists_every_cell_with_what_happens_here(make_matrix, tmp_path):
    path = make_matrix(
        axes={"method": ["baseline", "torchao"], "placement": ["device", "model_cpu_offload"]},
        method={"torchao": {"quant_type": ["int8wo", "float8dq", "autoquant"]}},
    )
    done = quantbench("plan", str(path), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    from bench.matrix import load_matrix

    for cell in load_matrix(path).cells:
        assert cell.id in done.stdout
    import torch

    if not torch.cuda.is_available():
        assert "skipped: placement model_cpu_offload needs a CUDA GPU" in done.stdout
        assert "skipped: torchao float8dq needs a CUDA GPU" in done.stdout
    assert "unsupported: autoquant is not provided by the installed torchao" in done.stdout
    assert not (tmp_path / "results").exists(), "plan runs nothing and writes nothing"
    assert "torchao: " not in done.stderr and "register_constant" not in done.stderr, "no import notices"


def test_plan_lists_the_cells_of_a_matrix_this_machine_cannot_run(make_matrix, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA: the matrix asks for a CUDA device")
    path = make_matrix(axes={"method": ["baseline", "torchao"], "compile": ["off", "default"]}, run={"device": "cuda"})
    done = quantbench("plan", str(path), cwd=tmp_path)
    from bench.matrix import load_matrix

    assert all(cell.id in done.stdout for cell in load_matrix(path).cells), "a GPU run can be planned on a laptop"
    assert "none can run here" in done.stdout and "not run" not in done.stdout, "no results: no results column"
    assert done.returncode == 2 and "run.device: 'cuda' asked for, but torch sees no CUDA device" in done.stderr


def test_plan_gives_the_attention_and_batch_axes_a_column_only_when_a_cell_varies_them(make_matrix, tmp_path):
    path = make_matrix(axes={"method": ["baseline"], "attention": ["native", "_native_math"], "batch_size": [1, 2]})
    done = quantbench("plan", str(path), cwd=tmp_path, columns=200)
    assert done.returncode == 0, done.stderr
    header = next(line for line in done.stdout.splitlines() if "cell id" in line).split("┃")
    assert [name.strip() for name in header if name.strip()][-4:] == ["placement", "attention", "batch", "here"]
    rows = {
        tuple(field.strip() for field in line.split("│")[-4:-2]) for line in done.stdout.splitlines() if "│" in line
    }
    assert rows == {("native", "1"), ("native", "2"), ("_native_math", "1"), ("_native_math", "2")}
    plain = quantbench("plan", str(make_matrix("plain.toml")), cwd=tmp_path, columns=200)
    header = next(line for line in plain.stdout.splitlines() if "cell id" in line)
    assert "attention" not in header and "batch" not in header and "lora" not in header


def test_plan_shows_each_cells_status_in_a_results_folder(make_matrix, tmp_path):
    from bench.matrix import load_matrix
    from bench.store import ResultsFolder
    from tests.test_store import row

    path = make_matrix(
        axes={"method": ["baseline", "torchao"], "compile": ["off", "default"]}, include=[{"method": "bnb_4bit"}]
    )
    matrix = load_matrix(path)
    first, second, third, _, skipped = (cell.id for cell in matrix.cells)
    folder = ResultsFolder(tmp_path / "gpu-run")  # e.g. rows brought back from a GPU machine
    folder.create()
    folder.write_cell(first, [dataclasses.replace(row(first), matrix_name=matrix.name, cell_wall_s=34.5)])
    folder.write_cell(second, [dataclasses.replace(row(second, "timeout"), matrix_name=matrix.name, cell_wall_s=600.0)])
    folder.write_interrupted_log(third, "warm-up", ran_s=60)
    folder.write_cell(skipped, [dataclasses.replace(row(skipped, "skipped"), matrix_name=matrix.name)])
    done = quantbench("plan", str(path), "--results", "gpu-run", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    lines = {line.split()[1]: line for line in done.stdout.splitlines() if line.startswith("│ ")}
    assert [lines[cell].split("│")[-2].strip() for cell in (first, second, third)] == ["ok", "timeout", "stopped"]
    said = " ".join(done.stdout.split())
    import torch

    here = "3 that are not ok and can run here (1 cannot)" if not torch.cuda.is_available() else "4 that are not ok"
    assert f"in gpu-run: 1 ok, 1 timeout, 1 skipped, 1 stopped, 1 not run; a run there would run the {here}" in said
    assert "their rows there record 634 s (10.6 min) of cell-process time for 2 of these 5 cells, 600 s of it" in said
    compiled = quantbench("plan", str(path), "--results", "gpu-run", "--select", "compile=default", cwd=tmp_path)
    assert "for 1 of these 2 cells, 600 s of it in cells not ok" in " ".join(compiled.stdout.split())


def test_a_run_refused_its_results_folder_says_who_holds_it_and_shows_no_progress_bar(make_matrix, tmp_path):
    from bench.store import ResultsFolder

    path = make_matrix()
    with ResultsFolder(tmp_path / "out").exclusive():  # another run is writing the folder
        done = quantbench("run", str(path), "--results", "out", cwd=tmp_path)
    assert done.returncode == 2
    assert f"another quantbench run (pid {os.getpid()}) is writing this results folder" in done.stderr
    assert done.stdout == "", "no progress bar (not even its empty line) for a run that never started"
    assert not list((tmp_path / "out").glob("cells/*.parquet"))


def test_a_finished_run_says_how_to_see_its_report(make_matrix, tmp_path):
    path = make_matrix(axes={"method": ["bnb_4bit"]}, method={}, drift={"enabled": False})  # skipped here: no cell runs
    done = quantbench("run", str(path), "--results", "out", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "the plots and what to pick: quantbench report out -o out/report.html" in " ".join(done.stdout.split())


def test_plan_says_when_the_results_folder_also_holds_another_matrixs_rows(make_matrix, tmp_path):
    from bench.store import ResultsFolder
    from tests.test_store import row

    folder = ResultsFolder(tmp_path / "other")
    folder.create()
    folder.write_cell("aaa", [row("aaa")])  # matrix "m"
    done = quantbench("plan", str(make_matrix()), "--results", "other", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    said = " ".join(done.stderr.split())
    assert "quantbench: other also holds rows of matrix 'm' (1 cell); they show in its report, and a cell" in said


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--executor", "slurm"], "--executor: unknown executor 'slurm'; allowed: local, local-gpus, ray"),
        (["--address", "auto"], "--address is for --executor ray, not 'local'"),
        (["--executor", "local-gpus", "--gpus", ","], "argument --gpus: expected device ids such as 0,1"),
        (["--executor", "local-gpus", "--gpus", "0,1,0"], "argument --gpus: each device once, got 0 more than once"),
        (["--max-time", "soon"], "argument --max-time: expected seconds or a duration such as 25m or 1.5h"),
        (["--max-time", "0"], "argument --max-time: must be more than 0"),
        (["--times-from", "nowhere"], "--times-from nowhere: no such results folder"),
    ],
)
def test_bad_executor_options_exit_2_before_any_work(args, fragment, make_matrix, tmp_path):
    done = quantbench("run", str(make_matrix()), *args, cwd=tmp_path)
    assert done.returncode == 2
    assert fragment in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["run", "m.toml", "--max-time", "25x"], "quantbench run: error: argument --max-time: expected seconds"),
        (["report", "done", "--format", "pdf"], "quantbench report: error: argument --format: invalid choice: 'pdf'"),
        (["compare", "done"], "quantbench compare: error: the following arguments are required: new"),
        (["bench"], "quantbench: error: argument {plan,run,report,compare}: invalid choice: 'bench'"),
    ],
)
def test_a_bad_argument_is_one_line_naming_the_verb_and_where_help_is(argv, said, capsys):
    from bench.cli import main

    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(said) and line.endswith(f"(see {said.split(': ')[0]} --help)"), line


def test_a_run_stopped_by_max_time_exits_3_and_keeps_the_stopped_cells_log(make_matrix, tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTBENCH_INJECT_FAULT", "hang")  # the cell never ends: the time limit must stop it
    path = make_matrix(axes={"method": ["baseline"]}, drift={"enabled": False})
    done = quantbench("run", str(path), "--max-time", "45s", "--results", "out", cwd=tmp_path)
    assert done.returncode == 3, done.stderr
    assert "stopped at the time limit of 45 s with 1 cell not finished; rerun to resume" in done.stderr
    assert not list((tmp_path / "out").glob("cells/*.parquet"))
    (log,) = (tmp_path / "out").glob("logs/*.interrupted.log")
    assert "[quantbench] imports" in log.read_text(), "the log says how far the stopped cell got"
    cell_id = log.name.removesuffix(".interrupted.log")
    assert f"baseline bf16 ({cell_id}); its log so far: out/logs/{log.name}" in done.stdout


def _results_folder(root: Path) -> Path:
    from bench.store import ResultsFolder
    from tests.test_store import row

    folder = ResultsFolder(root)
    folder.create()
    folder.write_cell("aaa", [row("aaa")])
    return root


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["report", "m.toml", "-o", "x.html"], "m.toml: not a results folder or Parquet file of results"),
        (["compare", "m.toml", "done"], "m.toml: not a results folder or Parquet file of results"),
        (["compare", "done", "m.toml"], "m.toml: not a results folder or Parquet file of results"),
        (["report", "done", "-o", "a-folder"], "-o a-folder: is a folder; -o takes the file to write"),
        (["compare", "done", "done", "-o", "a-folder"], "-o a-folder: is a folder; -o takes the file to write"),
        (["report", "done", "-o", "m.toml/x.html"], "-o m.toml/x.html: m.toml is a file, not a folder"),
        (["report", "done", "-o", "x.md", "--format", "html"], "-o x.md: a .md file, but --format html"),
        (["report", "done", "-o", "x.htm", "--format", "md"], "-o x.htm: a .htm file, but --format md"),
        (["run", "m.toml", "--results", "m.toml"], "--results m.toml: it is a file, not a folder"),
        (["run", "m.toml", "--results", "m.toml/sub"], "--results m.toml/sub: m.toml is a file, not a folder"),
    ],
)
def test_a_wrong_kind_of_path_exits_2_with_one_line_before_any_work(args, fragment, make_matrix, tmp_path):
    make_matrix("m.toml")
    _results_folder(tmp_path / "done")
    (tmp_path / "a-folder").mkdir()
    done = quantbench(*args, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    (error,) = [line for line in done.stderr.splitlines() if line.startswith("quantbench: error:")]
    assert error.startswith(f"quantbench: error: {fragment}"), done.stderr
    assert "Traceback" not in done.stderr
    assert done.stdout == "", "nothing drawn (no progress bar, no table) before the error"
    assert not list(tmp_path.glob("x.*")) and list((tmp_path / "a-folder").iterdir()) == []
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize(
    ("output", "asked", "written"),
    [("r.md", None, "md"), ("r.html", None, "html"), ("r.HTM", None, "html"), ("r", None, "html"), ("r", "md", "md"),
     ("r.md", "md", "md")],
)  # fmt: skip
def test_the_report_format_follows_the_output_suffix_unless_given(output, asked, written, tmp_path, monkeypatch):
    import bench.report
    from bench.cli import main

    formats = []
    monkeypatch.setattr(bench.report, "write_report", lambda *args: formats.append(args[3]) or args[1])
    assert main(["report", str(tmp_path), "-o", str(tmp_path / output), *(["--format", asked] if asked else [])]) == 0
    assert formats == [written]


def test_other_libraries_log_records_carry_their_own_name_not_quantbenchs():
    import logging

    from bench.cli import _LibraryNamedFormatter

    def formatted(name: str) -> str:
        return _LibraryNamedFormatter().format(
            logging.LogRecord(name, logging.WARNING, "f.py", 1, "a %s", ("b",), None)
        )

    assert formatted("torchao.kernel.intmm") == "torchao.kernel.intmm: a b"
    assert formatted("bench.store") == "quantbench: a b"
    assert formatted("benchmarks") == "benchmarks: a b"
