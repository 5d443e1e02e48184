"""The nightly GPU guard behind `nox -s gpu`: run matrices/nightly.toml on this runner's GPU, compare it with the
reference recorded on the same GPU model (results/reference/<gpu>/nightly), and write the report
(reports/out/nightly.html), the comparison as CSV (reports/out/nightly-compare.csv) and as a Markdown job summary
(`$GITHUB_STEP_SUMMARY`). `--matrix` runs another matrix the same way (the weekly workflow's flux-dev-h100).

    python -m bench.nightly [--quick] [--reference DIR] [--matrix FILE] [--results DIR] [--record-reference]
                            [quantbench run options, e.g. --executor local-gpus --max-time 50m]

Exit code: the run's when it did not finish (3: stopped by --max-time), else compare's (1: a regression);
2 before any work when there is no reference for this GPU (the message gives the command that makes one).
`--record-reference` runs the matrix into the reference folder instead (resumable) and writes its report there.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

import pandas as pd

from bench.errors import UserError

MATRIX = Path("matrices/nightly.toml")
RESULTS = Path("results/nightly")
REFERENCE_ROOT = Path("results/reference")
REPORTS = Path("reports/out")  # <matrix name>.html and <matrix name>-compare.csv
SUMMARY_ENV = "GITHUB_STEP_SUMMARY"

_VENDOR_WORDS = {"nvidia", "geforce", "tesla", "quadro"}
_VARIANT_WORD = re.compile(r"\d+gb|sxm\d*|pcie|hbm\w*|nvl|mig\S*", re.IGNORECASE)  # memory and form factor


def gpu_slug(gpu_name: str) -> str:
    """The folder name of a GPU model: "NVIDIA H200" -> "h200", "NVIDIA H100 80GB HBM3" -> "h100",
    "NVIDIA GeForce RTX 4090" -> "rtx4090" (vendor words and memory or form-factor suffixes dropped)."""
    words = [word for word in re.split(r"[\s_-]+", gpu_name.strip().lower()) if word]
    kept = []
    for word in words:
        if word in _VENDOR_WORDS:
            continue
        if kept and _VARIANT_WORD.fullmatch(word):
            break
        kept.append(word)
    slug = re.sub(r"[^a-z0-9.]", "", "".join(kept))
    if not slug:
        raise UserError(f"cannot name a reference folder after the GPU {gpu_name!r}; pass --reference DIR")
    return slug


def reference_folder(gpu_name: str, root: Path = REFERENCE_ROOT, matrix: Path = MATRIX) -> Path:
    """Where the reference for `gpu_name` lives: <root>/<gpu slug>/<matrix name>."""
    return root / gpu_slug(gpu_name) / matrix.stem


def make_reference_command(folder: Path, matrix: Path = MATRIX) -> str:
    """The command that records a reference in `folder` on this runner, in the GPU sessions' locked environment
    (its rows record the lock's hash)."""
    return f"nox -s gpu -- --record-reference --reference {folder}" + (
        f" --matrix {matrix}" if matrix != MATRIX else ""
    )


def check_reference(folder: Path, gpu_name: str, matrix: Path = MATRIX) -> str:
    """A line saying which reference the run is compared with; UserError, with the command that makes one,
    when `folder` has no rows or its rows ran on another GPU model (compare would refuse them)."""
    from bench.store import read_results

    rows = read_results(folder) if folder.is_dir() else None
    if rows is None or rows.empty:
        raise UserError(
            f"no reference for {gpu_name} in {folder}: record one on this runner with\n"
            f"    {make_reference_command(folder, matrix)}\n"
            "(add --max-time 50m and repeat it until it exits 0 where a job has a time limit; each run resumes),"
            f" then commit {folder} (cells/, logs/, runs.jsonl, report.html) and rerun"
        )
    recorded_on = sorted({name for name in rows["gpu_name"].dropna()})
    if gpu_name not in recorded_on:
        raise UserError(
            f"{folder} was recorded on {', '.join(recorded_on) or 'no GPU'}, this runner has {gpu_name}: compare"
            f" would refuse it. Record a reference for this GPU in another folder with\n"
            f"    {make_reference_command(Path('DIR'), matrix)}\n"
            "and pass --reference DIR"
        )
    commits = sorted({str(commit) for commit in rows["harness_commit"].dropna()})
    return f"comparing with {folder}: {rows['cell_id'].nunique()} cells recorded on {gpu_name}" + (
        f", harness {', '.join(commits)}" if commits else ""
    )


def markdown_summary(
    comparison: pd.DataFrame | None,
    reference: Path,
    results: Path,
    run_code: int,
    compare_code: int,
    versions: str = "",
) -> str:
    """The job summary: the verdict (with `versions`, what differs between the runs' environments, when a cell
    regressed), then the compare table (one line per cell both runs have)."""
    from bench.compare import latency_text

    lines = [f"## Nightly GPU guard: {results} against {reference}", ""]
    if run_code == 3:
        lines.append(
            "The run stopped at its time limit (`--max-time`): cells not run are not compared; a rerun resumes."
        )
    elif run_code:
        lines.append(f"The run ended with exit code {run_code}: see the job log.")
    if comparison is None:
        lines += ["", f"**No verdict**: compare could not run (exit code {compare_code}; the job log says why)."]
        return "\n".join(lines) + "\n"
    regressed = _regressed(comparison)
    verdict = (
        f"**{len(regressed)} of {len(comparison)} cells regressed**"
        if len(regressed)
        else f"**No regression** in {len(comparison)} cells"
    )
    lines += [verdict + (f": {versions}" if len(regressed) and versions else ""), "", "| cell | status | peak memory | transformer size | latency [95 % interval] | regression |",
              "|---|---|---|---|---|---|"]  # fmt: skip
    for _, row in comparison.iterrows():
        regression = row["regressions"] if isinstance(row["regressions"], str) and row["regressions"] else ""
        note = row["note"] if isinstance(row["note"], str) else ""
        lines.append(
            "| "
            + " | ".join(
                _cell_text(text)
                for text in (
                    row["cell"],
                    f"{row['old_status']} → {row['new_status']}",
                    _percent(row.get("peak_reserved_bytes_change")),
                    _percent(row.get("transformer_tensor_bytes_change")),
                    latency_text(row),
                    f"**{regression}**" if regression else note or "none",
                )
            )
            + " |"
        )
    return "\n".join(lines) + "\n"


def _regressed(comparison: pd.DataFrame) -> pd.DataFrame:
    """The cells of compare's table that regressed."""
    return comparison[comparison["regressions"].fillna("") != ""]


def _percent(value: object) -> str:
    return "n/a" if value is None or pd.isna(value) else f"{float(value):+.1%}"


def _cell_text(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _write_report(results: Path, output: Path) -> None:
    """The HTML report of `results`; a report that fails is said, and the comparison still runs."""
    from bench import cli

    output.parent.mkdir(parents=True, exist_ok=True)
    try:
        cli.main(["report", str(results), "-o", str(output)])
    except Exception as error:  # the verdict comes from compare; the report is an artifact
        print(f"quantbench nightly: the report failed: {type(error).__name__}: {error}", file=sys.stderr)


def _parse(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(prog="python -m bench.nightly", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="only the eager cells (--select compile=off)")
    parser.add_argument("--reference", type=Path, help="compare with this results folder instead of this GPU's")
    parser.add_argument("--matrix", type=Path, default=MATRIX, help=f"matrix file (default: {MATRIX})")
    parser.add_argument("--results", type=Path, default=RESULTS, help=f"results folder (default: {RESULTS})")
    parser.add_argument(
        "--record-reference",
        action="store_true",
        help="run into the reference folder (this GPU's, or --reference) and write its report; no comparison",
    )
    return parser.parse_known_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Check the reference, run, report, compare, summarize; see the module docstring for the exit code."""
    from bench import cli
    from bench.environment import detect_machine, lock_sha256

    args, run_args = _parse(argv)
    cli.build_parser().parse_args(["run", str(args.matrix), *run_args])  # bad run options: exit 2 before any work
    try:
        lock_sha256()  # a lock named but unreadable: said before any work, not when the first row is written
        machine = detect_machine()
        if not machine.cuda_available:
            raise UserError("the nightly runs on a CUDA GPU; torch sees none here")
        reference = args.reference or reference_folder(machine.gpu_name, matrix=args.matrix)
        if not args.record_reference:
            print(f"quantbench nightly: {check_reference(reference, machine.gpu_name, args.matrix)}", flush=True)
        elif any((reference / "cells").glob("*.parquet")):  # resuming a reference: the same GPU model's only
            check_reference(reference, machine.gpu_name, args.matrix)
    except UserError as error:
        print(f"quantbench nightly: error: {error}", file=sys.stderr)
        return error.exit_code
    options = ["--select", "compile=off"] if args.quick else []
    if not args.record_reference and "--times-from" not in run_args:
        options += ["--times-from", str(reference)]  # on several GPUs, the reference's cell times order the cells
    if args.record_reference:
        print(f"quantbench nightly: recording the reference for {machine.gpu_name} in {reference}", flush=True)
        try:
            return cli.main(["run", str(args.matrix), "--results", str(reference), *options, *run_args])
        finally:
            if any((reference / "cells").glob("*.parquet")):  # a run refused the folder wrote nothing to report
                _write_report(reference, reference / "report.html")
    try:
        run_code = cli.main(["run", str(args.matrix), "--results", str(args.results), *options, *run_args])
    finally:  # a run stopped by --max-time (exit 3) or by a crash still gets its report
        _write_report(args.results, REPORTS / f"{args.matrix.stem}.html")
    compare_csv = REPORTS / f"{args.matrix.stem}-compare.csv"
    compare_csv.unlink(missing_ok=True)
    compare_code = cli.main(["compare", str(reference), str(args.results), "-o", str(compare_csv)])
    comparison = pd.read_csv(compare_csv) if compare_csv.exists() else None
    summary_path = os.environ.get(SUMMARY_ENV)
    if summary_path:
        versions = ""
        if comparison is not None and len(_regressed(comparison)):  # what a maintainer asks first about a regression
            from bench.compare import environment_difference
            from bench.store import read_results

            versions = environment_difference(read_results(reference), read_results(args.results))
        with open(summary_path, "a") as summary:
            summary.write(markdown_summary(comparison, reference, args.results, run_code, compare_code, versions))
    return run_code or compare_code


if __name__ == "__main__":
    sys.exit(main())
