"""An independent reading of the harness's energy per image: `nvidia-smi` samples the GPU's power in a side
process while `quantbench run` runs, and each timed generation's energy is integrated from those samples over
the same windows the harness measured (its cells' logs give them, in Unix seconds).

    python benchmarks/energy_crosscheck.py matrices/truth-h200.toml --results /tmp/energy-check
        [--gpu 0] [--field power.draw.instant] [--tolerance 0.05] [any `quantbench run` flags: --select, --max-time]

Cells a resumed run did not rerun have no samples for their windows (n/a). Prints, per cell, the harness's `energy_j_per_image` (NVML's energy counter) next to the median over the same
windows of nvidia-smi's power integrated in time (trapezoids at `-lms 100`), and their ratio; exit 1 when a
cell differs by more than the tolerance. `power.draw.instant` (default) is the instantaneous reading; plain
`power.draw` is averaged over about a second on recent drivers, which smooths the edges of short windows.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

from bench.store import read_results
from bench.worker import ENERGY_WINDOWS_PREFIX, PHASE_PREFIX


def sample_power(gpu: str, field: str, samples: list[tuple[float, float]], stop: threading.Event) -> None:
    """Append (Unix time, watts) from `nvidia-smi -lms 100` until `stop` is set."""
    command = [
        "nvidia-smi",
        "-i",
        gpu,
        f"--query-gpu=timestamp,{field}",
        "--format=csv,noheader,nounits",
        "-lms",
        "100",
    ]
    if shutil.which("stdbuf"):  # a line at a time through the pipe, so the last windows' samples are not lost
        command = ["stdbuf", "-oL", *command]
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True, bufsize=1) as smi:
        threading.Thread(target=lambda: (stop.wait(), smi.send_signal(signal.SIGINT)), daemon=True).start()
        for line in smi.stdout:
            stamp, _, watts = line.strip().partition(", ")
            try:
                when = datetime.strptime(stamp, "%Y/%m/%d %H:%M:%S.%f").timestamp()  # nvidia-smi's local time
                samples.append((when, float(watts)))
            except ValueError:  # "[N/A]" or a header: skip
                continue


def energy_j(samples: list[tuple[float, float]], start: float, end: float) -> float | None:
    """Trapezoidal integral of the power samples over [start, end], interpolated at the edges."""

    def power_at(t: float) -> float:
        for (t0, p0), (t1, p1) in zip(samples, samples[1:]):
            if t0 <= t <= t1:
                return p0 + (p1 - p0) * (t - t0) / (t1 - t0) if t1 > t0 else p0
        raise ValueError(t)

    if not samples or samples[0][0] > start or samples[-1][0] < end:
        return None
    points = [(start, power_at(start)), *[(t, p) for t, p in samples if start < t < end], (end, power_at(end))]
    return sum((t1 - t0) * (p0 + p1) / 2 for (t0, p0), (t1, p1) in zip(points, points[1:]))


def windows_in_log(log: Path) -> list[tuple[float, float]]:
    """The timed generations' windows a cell's log gives (the last run of the cell)."""
    marker = PHASE_PREFIX + ENERGY_WINDOWS_PREFIX
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.startswith(marker)]
    return [tuple(pair) for pair in json.loads(lines[-1].removeprefix(marker))] if lines else []


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("matrix")
    parser.add_argument("--results", required=True, type=Path)
    parser.add_argument("--gpu", default="0", help="nvidia-smi's index of the GPU the cells use")
    parser.add_argument("--field", default="power.draw.instant")
    parser.add_argument("--tolerance", type=float, default=0.05)
    args, run_flags = parser.parse_known_args()

    samples: list[tuple[float, float]] = []
    stop = threading.Event()
    sampler = threading.Thread(target=sample_power, args=(args.gpu, args.field, samples, stop), daemon=True)
    sampler.start()
    time.sleep(1.0)  # the first samples before the first window
    run = subprocess.run(
        [sys.executable, "-m", "bench", "run", args.matrix, "--results", str(args.results), *run_flags]
    )
    time.sleep(2.0)  # samples past the last window's end
    stop.set()
    sampler.join(timeout=10)
    if not samples:
        print(f"nvidia-smi gave no {args.field} samples", file=sys.stderr)
        return 2

    rows = read_results(args.results).drop_duplicates("cell_id")
    worst = 0.0
    print(f"{'cell':<48} {'harness J/image':>16} {'nvidia-smi J/image':>19} {'ratio':>7}  windows")
    for row in rows.itertuples():
        log = args.results / "logs" / f"{row.cell_id}.log"
        windows = windows_in_log(log) if log.is_file() else []
        readings = sorted(e for e in (energy_j(samples, a, b) for a, b in windows) if e is not None)
        independent = readings[len(readings) // 2] if readings else None
        harness = row.energy_j_per_image if row.energy_j_per_image == row.energy_j_per_image else None
        ratio = harness / independent if harness and independent else None
        if ratio is not None:
            worst = max(worst, abs(ratio - 1))
        show = lambda v, f: "n/a" if v is None else format(v, f)  # noqa: E731
        print(f"{row.cell_label[:48]:<48} {show(harness, '16.1f')} {show(independent, '19.1f')} {show(ratio, '7.3f')}"
              f"  {len(readings)}/{len(windows)}")  # fmt: skip
    print(f"largest difference: {worst:.1%} (tolerance {args.tolerance:.0%}); quantbench run exit {run.returncode}")
    return 1 if worst > args.tolerance else 0


if __name__ == "__main__":
    sys.exit(main())
