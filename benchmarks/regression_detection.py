"""False alarms and detection of `quantbench compare`'s latency verdict (the rule: bench/compare.py's docstring).

    python benchmarks/regression_detection.py [--matrix matrices/verdicts-cpu.toml] [--clean-runs 3]
                                              [--thresholds 5,2.5] [--repeats 2,3,5,10] [--keep DIR]
                                              [--output results.json]

Runs the matrix `--clean-runs` times as it is, once with every denoising step slowed by 5 % and once by 10 %
(`QUANTBENCH_INJECT_FAULT=slow=5%`, bench/faults.py), interleaved (clean, slow 10 %, clean, slow 5 %, clean, ...)
so a machine getting busier or quieter does not line up with one kind of run. Then, for each threshold and for
the first 1, 2, ... of the matrix's repeats (the rows keep every sample, so fewer repeats are a prefix of them):
- A/A: every pair of clean runs compared; cells flagged (goal: 0) and the widths of the 95 % intervals;
- detection: each slowed run compared with each clean run; the share of cells flagged (goal: >= 95 % at 10 %);
- within runs, where the matrix has twice the repeats: each clean run's even repeats against its odd ones, as
  they are (A/A) and with the odd ones' samples scaled by 1.05 and 1.10: the rule's own false alarms and
  detection, free of the machine's drift between runs (which the line above the table measures).
Prints one table; `--output` writes the same numbers as JSON. On a GPU, pass a CUDA matrix (e.g. the nightly).
A matrix that does not ask for CUDA runs its cells with one CPU thread unless OMP_NUM_THREADS says otherwise: on a
shared CPU, threads that wait for each other turn other processes' load into stalls many times a step long.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from bench.compare import SAMPLE_COLUMNS, Thresholds, compare_frames
from bench.faults import FAULT_ENV
from bench.matrix import load_matrix
from bench.runner import run_matrix
from bench.store import read_results

SLOWDOWNS = (0.10, 0.05)


@dataclass(frozen=True)
class Outcome:
    """How the verdict did on one kind of pair at one threshold and number of repeats."""

    pairs: str  # "A/A", "slow 5 %", "slow 10 %"
    threshold: float
    repeats: int
    comparisons: int  # cells x pairs of runs
    flagged: int
    median_change: float
    median_width: float  # of the 95 % interval, in points of relative change
    max_width: float


def run_all(matrix_path: Path, clean_runs: int, root: Path) -> tuple[list[pd.DataFrame], dict[float, pd.DataFrame]]:
    """The clean runs and the slowed runs (by fraction), interleaved."""
    matrix = load_matrix(matrix_path)
    clean, slowed = [], {}
    order: list[float | None] = []  # clean, slow 10 %, clean, slow 5 %, clean, ...
    for index in range(clean_runs):
        order += [None, *SLOWDOWNS[index : index + 1]]
    for number, slowdown in enumerate(order):
        name = f"clean{number}" if slowdown is None else f"slow{slowdown:.0%}"
        if slowdown is None:
            os.environ.pop(FAULT_ENV, None)
        else:
            os.environ[FAULT_ENV] = f"slow={slowdown * 100:g}%"
        print(f"run {number + 1} of {len(order)}: {name}", flush=True)
        run_matrix(matrix, root / name)  # resumes a kept folder: --keep DIR again re-evaluates without running
        frame = read_results(root / name)
        if slowdown is None:
            clean.append(frame)
        else:
            slowed[slowdown] = frame
    os.environ.pop(FAULT_ENV, None)
    return clean, slowed


def select_repeats(frame: pd.DataFrame, repeats: list[int], factor: float = 1.0) -> pd.DataFrame:
    """The rows as if only the timed generations numbered `repeats` (0-based) had run, their samples times
    `factor` (a slowdown applied after the fact)."""
    frame = frame.copy()
    for column, _ in SAMPLE_COLUMNS:
        kept = []
        for values, steps in zip(frame[column], frame["num_inference_steps"], strict=True):
            per_generation = int(steps) - 1 if column == "step_times_s" else 1
            samples = np.asarray(values, dtype=float).reshape(-1, per_generation)
            kept.append((samples[repeats].ravel() * factor).tolist())
        frame[column] = kept
    return frame


def outcome(name: str, pairs: list[tuple[pd.DataFrame, pd.DataFrame]], threshold: float, repeats: int) -> Outcome:
    table = pd.concat(
        [compare_frames(old, new, Thresholds(latency_increase=threshold)) for old, new in pairs], ignore_index=True
    )
    widths = (table["latency_change_high"] - table["latency_change_low"]).to_numpy(dtype=float)
    return Outcome(
        pairs=name,
        threshold=threshold,
        repeats=repeats,
        comparisons=len(table),
        flagged=int((table["regressions"] != "").sum()),
        median_change=float(np.nanmedian(table["latency_change"].to_numpy(dtype=float))),
        median_width=float(np.nanmedian(widths)),
        max_width=float(np.nanmax(widths)),
    )


def pairs_by_kind(
    clean: list[pd.DataFrame], slowed: dict[float, pd.DataFrame], repeats: int
) -> dict[str, list[tuple[pd.DataFrame, pd.DataFrame]]]:
    """The pairs judged on `repeats` repeats a side: between runs (A/A, injected slowdowns) and, where the runs
    have twice as many, within each clean run (its even against its odd repeats, as they are and with the odd
    ones' samples scaled up): the rule's own false alarms and detection, without the machine's drift between
    runs."""
    first = list(range(repeats))
    kinds = {
        "A/A between runs": [
            (select_repeats(a, first), select_repeats(b, first)) for a, b in itertools.combinations(clean, 2)
        ]
    }
    for slowdown, frame in sorted(slowed.items()):
        kinds[f"slow={slowdown:.0%} between runs"] = [
            (select_repeats(a, first), select_repeats(frame, first)) for a in clean
        ]
    if 2 * repeats <= int(clean[0]["repeats"].iloc[0]):
        even, odd = list(range(0, 2 * repeats, 2)), list(range(1, 2 * repeats, 2))
        for factor in (1.0, *(1 + s for s in sorted(SLOWDOWNS))):
            name = "A/A within runs" if factor == 1 else f"x{factor:g} within runs"
            kinds[name] = [(select_repeats(run, even), select_repeats(run, odd, factor)) for run in clean]
    return kinds


def evaluate(
    clean: list[pd.DataFrame], slowed: dict[float, pd.DataFrame], thresholds: list[float], repeats: list[int]
) -> list[Outcome]:
    outcomes = []
    for count in repeats:
        kinds = pairs_by_kind(clean, slowed, count)
        outcomes += [outcome(name, pairs, t, count) for t in thresholds for name, pairs in kinds.items()]
    return sorted(outcomes, key=lambda o: (o.threshold, o.repeats))


def drift_between_runs(clean: list[pd.DataFrame]) -> str:
    """How far each cell's median step moved between the clean runs (largest over smallest - 1)."""
    medians = pd.DataFrame(
        {
            i: run.groupby("cell_label")["step_times_s"].agg(lambda s: np.median(np.concatenate(list(s))))
            for i, run in enumerate(clean)
        }
    )
    spread = medians.max(axis=1) / medians.min(axis=1) - 1
    return "between the clean runs each cell's median step moved by " + ", ".join(
        f"{label} {value:.0%}" for label, value in spread.items()
    )


def table(outcomes: list[Outcome]) -> str:
    header = "| pairs | threshold | repeats | flagged | median change | median 95 % width | max width |"
    lines = [header, "|---|---|---|---|---|---|---|"]
    for o in outcomes:
        lines.append(
            f"| {o.pairs} | +{o.threshold:.1%} | {o.repeats} | {o.flagged} of {o.comparisons}"
            f" ({o.flagged / o.comparisons:.0%}) | {o.median_change:+.1%} | {o.median_width:.1%} | {o.max_width:.1%} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--matrix", type=Path, default=Path("matrices/verdicts-cpu.toml"))
    parser.add_argument("--clean-runs", type=int, default=3, help="runs without a slowdown (at least 2)")
    parser.add_argument("--thresholds", default="5,2.5", help="latency thresholds in percent, comma-separated")
    parser.add_argument("--repeats", default="2,3,5,10", help="judge on the first N repeats, for each N listed")
    parser.add_argument("--keep", type=Path, help="keep the results folders here (default: a temporary folder)")
    parser.add_argument("--output", type=Path, help="write the outcomes as JSON")
    args = parser.parse_args()
    if args.clean_runs < 2:
        parser.error(f"--clean-runs {args.clean_runs}: an A/A comparison needs at least 2")
    thresholds = [float(t) / 100 for t in args.thresholds.split(",")]
    if load_matrix(args.matrix).spec.run.device != "cuda":
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory() as scratch:
        root = args.keep or Path(scratch)
        clean, slowed = run_all(args.matrix, args.clean_runs, root)
    max_repeats = int(clean[0]["repeats"].iloc[0])
    repeats = [n for n in sorted({int(n) for n in args.repeats.split(",")}) if n <= max_repeats] or [max_repeats]
    outcomes = evaluate(clean, slowed, thresholds, repeats)
    cells = clean[0]["cell_id"].nunique()
    steps = int(clean[0]["num_inference_steps"].iloc[0])
    print(f"{args.matrix}: {cells} cells, {steps} steps, up to {max_repeats} repeats; {args.clean_runs} clean runs")
    print(drift_between_runs(clean))
    print(table(outcomes))
    if args.output:
        args.output.write_text(json.dumps([asdict(o) for o in outcomes], indent=2) + "\n")


if __name__ == "__main__":
    main()
