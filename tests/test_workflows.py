"""The GPU workflows (nightly, weekly), the noxfile and the lock they use fit together (checked on CPU)."""

from __future__ import annotations

import itertools
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from bench.cli import build_parser
from bench.matrix import load_matrix
from bench.store import read_results

ROOT = Path(__file__).resolve().parent.parent


def nox_sessions() -> set[str]:
    listing = subprocess.run(
        [sys.executable, "-m", "nox", "--list", "--noxfile", str(ROOT / "noxfile.py")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert listing.returncode == 0, listing.stderr
    names = {line.split()[1] for line in listing.stdout.splitlines() if line.startswith(("* ", "- "))}
    return names | {name.split("-")[0] for name in names}  # `tests` runs every `tests-<python>`


NIGHTLY = ROOT / ".github/workflows/nightly-gpu.yml"
WEEKLY = ROOT / ".github/workflows/weekly-gpu.yml"
LOCK = ROOT / "locks/gpu.txt"


def workflow(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def steps_running(path: Path, text: str) -> list[str]:
    return [
        step["run"] for job in workflow(path)["jobs"].values() for step in job["steps"] if text in step.get("run", "")
    ]


def test_the_gpu_workflows_parse_run_on_schedule_and_upload_the_comparison():
    for path, compare_csv in (
        (NIGHTLY, "reports/out/nightly-compare.csv"),
        (WEEKLY, "reports/out/flux-dev-h100-compare.csv"),
    ):
        triggers = workflow(path)[True]  # YAML 1.1 reads the key `on` as True
        assert "schedule" in triggers and "workflow_dispatch" in triggers, path
        (job,) = workflow(path)["jobs"].values()
        assert "self-hosted" in job["runs-on"] and "gpu" in job["runs-on"]
        uploads = [step for step in job["steps"] if step.get("uses", "").startswith("actions/upload-artifact")]
        assert uploads and compare_csv in uploads[0]["with"]["path"], path


def test_every_nox_session_the_workflow_calls_exists_and_fails_without_python_3_12():
    commands = [command for command in steps_running(NIGHTLY, "nox") if " -s " in command]
    called = {match for command in commands for match in re.findall(r"nox .*?-s ([\w-]+)", command)}
    assert called == {"gpu", "gpu-tests"}
    assert called <= nox_sessions()
    # the GPU sessions need the lock's Python; without the flag a missing 3.12 would skip them and pass the night
    assert all("--error-on-missing-interpreters" in command for command in commands)


def test_every_quantbench_command_in_the_noxfile_is_a_real_verb_with_real_files():
    verbs = set(build_parser()._subparsers._group_actions[0].choices)
    source = (ROOT / "noxfile.py").read_text()
    calls = re.findall(r'session\.run\("quantbench", ([^)]*)\)', source)
    assert calls
    for call in calls:
        words = [w.strip('"') for w in re.findall(r'"[^"]*"', call)]
        assert words[0] in verbs, words
        for word in words[1:]:
            if word.startswith(("matrices/", "results/reference/")):
                assert (ROOT / word).exists(), word
    ci_command = "python3 -m nox -s tests"
    assert ci_command in (ROOT / ".ci" / "run").read_text() and ci_command in (ROOT / "README.md").read_text()
    assert shlex.split(ci_command)[-1] in nox_sessions()


def _filled(command: str, quick: str, executor: str, max_time: str) -> str:
    """The nightly step's command as GitHub fills in its expressions (a scheduled run has no inputs)."""
    filled = re.sub(r"\$\{\{ inputs\.quick[^}]*\}\}", quick, command)
    filled = re.sub(r"\$\{\{ inputs\.executor[^}]*\}\}", executor or "local", filled)
    filled = re.sub(r"\$\{\{ inputs\.max_time.*?\}\}", f"--max-time {max_time}" if max_time else "", filled)
    assert "${{" not in filled, filled
    return filled


def test_the_workflow_passes_quantbench_run_only_options_it_has_and_schedules_compiled_cells():
    from bench.nightly import _parse

    (command,) = steps_running(NIGHTLY, "-s gpu --")
    inputs = workflow(NIGHTLY)[True]["workflow_dispatch"]["inputs"]
    assert inputs["quick"]["default"] is False
    for quick, executor, max_time in itertools.product(("--quick", ""), inputs["executor"]["options"], ("", "25m")):
        posargs = shlex.split(_filled(command, quick, executor, max_time).split(" -- ", 1)[1])
        options, run_args = _parse(posargs)
        assert options.quick == bool(quick)
        args = build_parser().parse_args(["run", "matrices/nightly.toml", *run_args])
        assert args.executor == executor and args.max_time == (1500 if max_time else None)
    scheduled = shlex.split(_filled(command, "", "", "").split(" -- ", 1)[1])
    assert not _parse(scheduled)[0].quick, "scheduled runs include the compiled cells"


def test_the_weekly_workflow_runs_the_full_reference_matrix_in_resumable_chunks():
    (loop,) = steps_running(WEEKLY, "--max-time")
    assert "matrices/flux-dev-h100.toml" in loop and "--max-time 50m" in loop
    assert re.search(r'if \[ "\$status" -ne 3 \]; then break; fi', loop), (
        "chunks go on while the run stops at its limit"
    )
    assert re.search(r'exit "\$status"', loop)
    assert 'cat "$RUNNER_TEMP/chunk-summary.md" >> "$job_summary"' in loop, "one compare table in the summary"
    (install,) = steps_running(WEEKLY, "--require-hashes")
    assert "-r locks/gpu.txt" in install and "--no-deps -e ." in install
    assert "QUANTBENCH_LOCK" in workflow(WEEKLY)["jobs"]["reference-matrix"]["steps"][2]["env"]


def test_the_gpu_lock_pins_the_cuda_stack_with_hashes_and_says_how_to_regenerate_it():
    text = LOCK.read_text()
    assert "uv pip compile pyproject.toml locks/gpu.in --extra test --generate-hashes --python-version 3.12" in text
    pins = dict(re.findall(r"^([a-z0-9][a-z0-9._-]*)==(\S+)", text, re.M))
    for name, version in {"torch": "2.11.", "diffusers": "0.42.1", "bitsandbytes": "0.50.2", "torchao": "0.18.0",
                          "gguf": "0.19.0"}.items():  # fmt: skip
        assert pins.get(name, "").startswith(version), (name, pins.get(name))
    entries = re.split(r"\n(?=[a-z0-9])", text.split("\n", 2)[2])
    assert all("--hash=sha256:" in entry for entry in entries if "==" in entry), "pip --require-hashes needs every hash"
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = pyproject["dependencies"] + pyproject["optional-dependencies"]["test"]
    names = {re.split(r"[<>=\[ ]", requirement)[0].lower().replace("_", "-") for requirement in wanted}
    assert names <= set(pins), f"not in the lock: {sorted(names - set(pins))}"


def test_the_nightly_reference_of_each_gpu_has_a_row_for_every_cell_of_the_nightly_matrix():
    cells = {cell.id: cell.label for cell in load_matrix(ROOT / "matrices/nightly.toml").cells}
    references = sorted((ROOT / "results/reference").glob("*/nightly"))
    if not references:
        pytest.skip(
            "no nightly reference committed yet: `nox -s gpu` on a GPU runner prints the command that makes one"
        )
    for reference in references:
        rows = read_results(reference)
        missing = sorted(label for cell_id, label in cells.items() if cell_id not in set(rows["cell_id"]))
        assert not missing, f"{reference} has no row for: {missing} (rerun them, or the matrix changed their ids)"
        assert set(rows["weights"]) == {"synthetic"}  # real-size shapes, random weights: never presented as quality


def test_the_h100_reference_the_weekly_compares_against_has_a_row_for_every_cell_of_its_matrix():
    cells = {cell.id: cell.label for cell in load_matrix(ROOT / "matrices/flux-dev-h100.toml").cells}
    rows = read_results(ROOT / "results/reference/h100/flux-dev-h100")
    missing = sorted(label for cell_id, label in cells.items() if cell_id not in set(rows["cell_id"]))
    assert not missing, f"the H100 reference has no row for: {missing} (rerun them, or the matrix changed their ids)"
    assert set(rows["weights"]) == {"synthetic"}
