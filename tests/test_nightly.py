"""The nightly guard (`nox -s gpu`, bench/nightly.py) on CPU: fake GPU names, tiny results folders, a fake run."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import nightly
from bench.cli import main as quantbench
from bench.environment import Machine
from bench.errors import UserError
from bench.matrix import load_matrix
from bench.methods import method_class, method_names
from bench.store import ResultsFolder
from tests.test_store import row

H200 = "NVIDIA H200"


@pytest.mark.parametrize(
    ("name", "slug"),
    [
        (H200, "h200"),
        ("NVIDIA H100 80GB HBM3", "h100"),
        ("NVIDIA H100 NVL", "h100"),
        ("NVIDIA A100-SXM4-80GB", "a100"),
        ("Tesla V100-PCIE-16GB", "v100"),
        ("NVIDIA GeForce RTX 4090", "rtx4090"),
        ("NVIDIA L40S", "l40s"),
    ],
)
def test_the_reference_folder_is_named_after_the_gpu_model(name, slug):
    assert nightly.gpu_slug(name) == slug
    assert nightly.reference_folder(name) == Path(f"results/reference/{slug}/nightly")


def write_rows(folder: Path, gpu_name: str, latency_s: float = 1.0, cells: tuple[str, ...] = ("c1", "c2")) -> None:
    results = ResultsFolder(folder)
    results.create()
    for cell_id in cells:
        cell_row = row(cell_id)
        cell_row.gpu_name, cell_row.device, cell_row.harness_commit = gpu_name, "cuda", "abc1234"
        cell_row.timestamp_utc = "2026-11-30T02:00:00+00:00"
        cell_row.cell_label, cell_row.image_path = f"cell {cell_id}", f"images/{cell_id}/p0_s0.png"
        cell_row.e2e_latency_median_s, cell_row.e2e_latency_iqr_s = latency_s, 0.001
        cell_row.peak_reserved_bytes, cell_row.cell_wall_s = 10 * 2**30, 20.0
        results.write_cell(cell_id, [cell_row])


def test_no_reference_for_this_gpu_names_the_command_that_makes_one(tmp_path):
    folder = tmp_path / "h200" / "nightly"
    with pytest.raises(UserError) as error:
        nightly.check_reference(folder, H200)
    assert f"no reference for {H200} in {folder}" in str(error.value)
    assert f"nox -s gpu -- --record-reference --reference {folder}" in str(error.value), "the locked environment"


def test_a_reference_from_another_gpu_model_is_refused_and_a_matching_one_is_named(tmp_path):
    write_rows(tmp_path / "ref", "NVIDIA H100 80GB HBM3")
    with pytest.raises(
        UserError, match=r"(?s)recorded on NVIDIA H100 80GB HBM3, this runner has NVIDIA H200.*--reference"
    ):
        nightly.check_reference(tmp_path / "ref", H200)
    write_rows(tmp_path / "h200", H200)
    line = nightly.check_reference(tmp_path / "h200", H200)
    assert line == f"comparing with {tmp_path / 'h200'}: 2 cells recorded on {H200}, harness abc1234"


@pytest.fixture
def runner(tmp_path, monkeypatch):
    """A fake H200 runner in `tmp_path`: what `quantbench run` was asked, and the rows it writes (slower by
    `latency_s`, returning `exit_code`)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("bench.environment.detect_machine", lambda: Machine(True, (9, 0), H200, 1))
    summary = tmp_path / "summary.md"
    monkeypatch.setenv(nightly.SUMMARY_ENV, str(summary))
    state = {"runs": [], "latency_s": 1.0, "exit_code": 0, "summary": summary}
    from bench import cli

    real_main = cli.main

    def fake_main(argv):
        if argv[0] != "run":
            return real_main(argv)
        state["runs"].append(argv)
        write_rows(Path(argv[argv.index("--results") + 1]), H200, state["latency_s"], cells=("c1",))
        return state["exit_code"]

    monkeypatch.setattr(cli, "main", fake_main)
    return state


def test_without_a_reference_the_nightly_stops_before_running(runner, capsys):
    assert nightly.main([]) == 2
    assert runner["runs"] == []
    assert "--record-reference --reference results/reference/h200/nightly" in capsys.readouterr().err


def test_record_reference_runs_into_this_gpus_reference_folder_and_writes_its_report(runner, capsys):
    assert nightly.main(["--record-reference", "--max-time", "50m"]) == 0
    (run,) = runner["runs"]
    assert run == ["run", "matrices/nightly.toml", "--results", "results/reference/h200/nightly", "--max-time", "50m"]
    assert Path("results/reference/h200/nightly/report.html").is_file()
    assert not Path("reports/out/nightly-compare.csv").exists(), "recording compares nothing"
    assert "recording the reference for NVIDIA H200 in results/reference/h200/nightly" in capsys.readouterr().out
    assert nightly.main([]) == 0, "the next night compares with what was recorded"


def test_record_reference_does_not_resume_a_folder_recorded_on_another_gpu_model(runner, capsys):
    write_rows(Path("results/reference/h200/nightly"), "NVIDIA H100 80GB HBM3")
    assert nightly.main(["--record-reference"]) == 2
    assert runner["runs"] == [] and "recorded on NVIDIA H100 80GB HBM3" in capsys.readouterr().err


def test_a_regression_fails_the_nightly_and_the_summary_and_csv_say_which_cell(runner, capsys):
    write_rows(Path("results/reference/h200/nightly"), H200)
    runner["latency_s"] = 1.5
    assert nightly.main(["--executor", "local-gpus"]) == 1
    (run,) = runner["runs"]
    assert run[:2] == ["run", "matrices/nightly.toml"] and run[-2:] == ["--executor", "local-gpus"]
    assert "--select" not in run, "compiled cells run unless --quick"
    assert run[run.index("--times-from") + 1] == "results/reference/h200/nightly", "the reference's times order cells"
    assert "comparing with results/reference/h200/nightly: 2 cells recorded on NVIDIA H200" in capsys.readouterr().out
    assert "c1" in Path("reports/out/nightly-compare.csv").read_text()
    assert Path("reports/out/nightly.html").is_file()
    summary = runner["summary"].read_text()
    assert "**1 of 1 cells regressed**: the two runs have the same library versions, lock and harness commit" in summary
    assert "| cell c1 | ok → ok | +0.0% | n/a | +50.0% (medians) | **e2e latency +50.0%" in summary


def test_a_run_stopped_by_its_time_limit_is_still_compared_and_fails_with_exit_code_3(runner):
    write_rows(Path("results/reference/h200/nightly"), H200)
    runner["exit_code"] = 3
    assert nightly.main(["--quick", "--max-time", "50m"]) == 3
    assert runner["runs"][0][-6:] == [
        "--select", "compile=off", "--times-from", "results/reference/h200/nightly", "--max-time", "50m"
    ]  # fmt: skip
    summary = runner["summary"].read_text()
    assert "stopped at its time limit" in summary and "**No regression** in 1 cells" in summary


def test_bad_run_options_stop_before_any_work(runner, capsys):
    write_rows(Path("results/reference/h200/nightly"), H200)
    with pytest.raises(SystemExit) as stopped:
        nightly.main(["--max-time", "soon"])
    assert stopped.value.code == 2
    assert "--max-time: expected seconds or a duration" in capsys.readouterr().err
    assert runner["runs"] == []


ROOT = Path(__file__).resolve().parent.parent
NIGHTLY_MATRIX = ROOT / "matrices/nightly.toml"


def test_the_nightly_matrix_guards_every_method_family_eager_and_compiles_cheaply():
    cells = load_matrix(NIGHTLY_MATRIX).cells
    eager = [cell for cell in cells if cell.compile == "off"]
    families = {method_class(n).family for n in method_names()}
    assert {method_class(cell.method).family for cell in eager} == families
    assert {"bnb_8bit", "bnb_4bit"} <= {cell.method for cell in eager}
    assert {cell.options["quant_type"] for cell in eager if cell.method == "torchao"} == {
        "int8wo", "int8dq", "float8wo", "float8dq", "int4wo"
    }  # fmt: skip
    compiled = [cell for cell in cells if cell.compile != "off"]
    whole_default = {cell.method for cell in compiled if cell.compile == "default" and not cell.regional}
    assert "baseline" in whole_default and whole_default - {"baseline"}, "bf16 and a quantized type, whole-model"
    assert {cell.method for cell in compiled if cell.regional} >= {"baseline", "gguf", "torchao"}
    assert all(cell.compile == "default" for cell in compiled), "max-autotune compiles take 5-20 minutes"
    int8pack = [c for c in compiled if c.options.get("quant_type") == "int8wo" and c.inductor is None]
    assert not int8pack, "compiled int8wo with Inductor's int8pack rewrite runs 65 s a step"


def test_quantbench_plan_validates_the_nightly_matrix_and_needs_only_a_gpu(capsys):
    # on this CPU machine the FLUX.1-dev-shaped model cannot be built: the cells are listed, then that one error
    assert (
        quantbench(["plan", str(NIGHTLY_MATRIX), "--results", str(ROOT / "results/reference/h200/flux-dev-h100")]) == 2
    )
    out, err = capsys.readouterr()
    assert "nightly: 22 cells, none can run here" in out
    assert err.strip() == (
        "quantbench: error: model builtin 'flux-dev-shape' is built on a CUDA GPU (billions of parameters); none is here"
    )


def test_a_lock_named_but_missing_stops_the_nightly_before_running(runner, monkeypatch, capsys):
    write_rows(Path("results/reference/h200/nightly"), H200)
    monkeypatch.setenv("QUANTBENCH_LOCK", "locks/missing.txt")
    assert nightly.main([]) == 2
    assert runner["runs"] == []
    assert "QUANTBENCH_LOCK=locks/missing.txt: cannot read the lock file" in capsys.readouterr().err
