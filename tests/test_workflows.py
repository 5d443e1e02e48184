"""The nightly GPU workflow and the noxfile it drives fit together (checked on CPU)."""

from __future__ import annotations

import itertools
import re
import shlex
import subprocess
import sys
from pathlib import Path

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


def test_nightly_workflow_parses_and_runs_on_schedule_and_by_hand():
    workflow = yaml.safe_load((ROOT / ".github/workflows/nightly-gpu.yml").read_text())
    triggers = workflow[True]  # YAML 1.1 reads the key `on` as True
    assert "schedule" in triggers and "workflow_dispatch" in triggers
    job = workflow["jobs"]["gpu"]
    assert "self-hosted" in job["runs-on"] and "gpu" in job["runs-on"]
    assert any(step.get("uses", "").startswith("actions/upload-artifact") for step in job["steps"])


def test_every_nox_session_the_workflow_calls_exists():
    workflow = yaml.safe_load((ROOT / ".github/workflows/nightly-gpu.yml").read_text())
    called = {
        match for step in workflow["jobs"]["gpu"]["steps"] for match in re.findall(r"nox -s (\w+)", step.get("run", ""))
    }
    assert called == {"gpu"}
    assert called <= nox_sessions()


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


def test_the_workflow_passes_quantbench_run_only_options_it_has():
    workflow = yaml.safe_load((ROOT / ".github/workflows/nightly-gpu.yml").read_text())
    (command,) = [step["run"] for step in workflow["jobs"]["gpu"]["steps"] if "nox -s gpu" in step.get("run", "")]
    executors = workflow[True]["workflow_dispatch"]["inputs"]["executor"]["options"]
    assert "max_time" in workflow[True]["workflow_dispatch"]["inputs"]
    for quick, executor, max_time in itertools.product(("'--quick'", "''"), executors, ("", "25m")):
        # the workflow's expressions as GitHub fills them in, then what the nox session hands to `run`
        filled = re.sub(r"\$\{\{[^}]*'--quick'[^}]*\}\}", quick.strip("'"), command)
        filled = re.sub(r"\$\{\{ inputs\.executor[^}]*\}\}", executor, filled)
        filled = re.sub(r"\$\{\{ inputs\.max_time.*?\}\}", f"--max-time {max_time}" if max_time else "", filled)
        assert "${{" not in filled, filled
        posargs = shlex.split(filled.split(" -- ", 1)[1])
        run_args = [arg for arg in posargs if arg != "--quick"]
        args = build_parser().parse_args(["run", "matrices/flux-dev-h100.toml", *run_args])
        assert args.executor == executor and args.max_time == (1500 if max_time else None)


def test_the_committed_reference_the_nightly_compares_against_has_a_row_for_every_cell_of_its_matrix():
    gpu_session = (ROOT / "noxfile.py").read_text().split("\ndef gpu(")[1].split("\ndef ")[0]
    matrix_path, reference = re.search(
        r'"run", "(matrices/[^"]+)".*?"compare",\s*"([^"]+)"', gpu_session, re.S
    ).groups()
    cells = {cell.id: cell.label for cell in load_matrix(ROOT / matrix_path).cells}
    rows = read_results(ROOT / reference)
    with_rows = set(rows["cell_id"])
    missing = sorted(label for cell_id, label in cells.items() if cell_id not in with_rows)
    assert not missing, f"{reference} has no row for: {missing} (rerun them, or the matrix changed their ids)"
    assert set(rows["weights"]) == {"synthetic"}  # real-size shapes, random weights: never presented as quality
