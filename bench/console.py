"""What the terminal shows: the plan table, a live progress bar, and the summary after a run."""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from bench.cells import Cell
from bench.contract import WORST_FIRST, Status
from bench.executors import Executor
from bench.matrix import Matrix
from bench.store import ResultsFolder, read_results, read_runs
from bench.summary import cells_that_ran

console = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
STATUS_STYLE = {
    Status.OK: "green",
    Status.FAILED: "red",
    Status.OOM: "red",
    Status.TIMEOUT: "red",
    Status.SKIPPED: "yellow",
    Status.UNSUPPORTED: "yellow",
}
GIB = 1024**3


def print_plan(ready, results_dir: Path) -> None:
    """The expanded cells with their axes, what will happen to each here, and their status in `results_dir`."""
    matrix = ready.matrix

    def here(cell: Cell) -> str:
        verdict = ready.verdicts[cell.id]
        return "run" if verdict.status == "run" else f"[{STATUS_STYLE[verdict.status]}]{verdict.status}"

    title = f"{matrix.name}: {len(matrix.cells)} cells, model {ready.model.source}, device {ready.device}"
    _print_cells(matrix, title, here, results_dir)
    for cell in matrix.cells:
        verdict = ready.verdicts[cell.id]
        if verdict.status != "run":
            console.print(f"{cell.id} {verdict.status}: {escape(verdict.reason)}", soft_wrap=True)
    from bench.runner import describe_versions, rows_from_other_versions

    for cell_id, differing in rows_from_other_versions(ResultsFolder(results_dir)).items():
        console.print(f"{cell_id} has rows from other library versions ({describe_versions(differing)}): `run`"
                      " runs it again", soft_wrap=True)  # fmt: skip


def print_cells(matrix: Matrix, results_dir: Path) -> None:
    """The expanded cells with their axes and their status in `results_dir`, for a matrix that cannot run on
    this machine (the caller says why)."""
    _print_cells(matrix, f"{matrix.name}: {len(matrix.cells)} cells, none can run here", lambda cell: "-", results_dir)


# Axes shown only when some cell of the matrix has them away from their default: column -> (the cell's value, default).
OPTIONAL_COLUMNS: dict[str, tuple[Callable[[Cell], str], str]] = {
    "attention": (lambda cell: cell.attention, "native"),
    "batch": (lambda cell: str(cell.batch_size), "1"),
    "lora": (lambda cell: cell.lora + (f" r{cell.lora_rank}" if cell.lora_rank else ""), "none"),
}


def _print_cells(matrix: Matrix, title: str, here: Callable[[Cell], str], results_dir: Path) -> None:
    """The cells table; with a "results" column and a count by status when `results_dir` holds any of them."""
    known = ResultsFolder(results_dir).cell_statuses()
    statuses = {cell.id: known.get(cell.id, "not run") for cell in matrix.cells}
    table = Table(title=title)
    columns = ["cell id", "method", "options", "dtype", "threshold", "compile", "components", "placement"]
    shown = set(statuses.values()) != {"not run"}
    varied = {
        name: text
        for name, (text, default) in OPTIONAL_COLUMNS.items()
        if any(text(c) != default for c in matrix.cells)
    }
    for column in columns + list(varied) + ["here"] + (["results"] if shown else []):
        table.add_column(column)
    for cell in matrix.cells:
        status = statuses[cell.id]
        table.add_row(
            cell.id,
            cell.method,
            escape(", ".join(f"{k}={v}" for k, v in cell.options.items())),
            cell.dtype,
            _or_dash(cell.threshold),
            cell.compile_variant,
            "+".join(cell.components) if cell.components else "-",
            cell.placement,
            *(text(cell) for text in varied.values()),
            here(cell),
            *([f"[{STATUS_STYLE.get(status, 'dim')}]{status}"] if shown else []),
        )
    console.print(table)
    if shown:
        counts = Counter(statuses.values())
        not_ok = [cell for cell in matrix.cells if statuses[cell.id] != Status.OK]
        not_here = sum(here(cell) != "run" for cell in not_ok)  # a rerun checks these again, without a process
        order = (Status.OK, *WORST_FIRST[:-1], Status.STOPPED, "not run")
        console.print(
            f"in {results_dir}: "
            + ", ".join(f"{counts[status]} {status}" for status in order if counts[status])
            + f"; a run there would run the {len(not_ok) - not_here} that are not ok"
            + (f" and can run here ({not_here} cannot)" if not_here else ""),
            soft_wrap=True,
        )
        walls = cells_that_ran(read_results(results_dir))["cell_wall_s"]
        timed = [cell.id for cell in matrix.cells if cell.id in walls.index]
        if timed:
            total = sum(walls[cell_id] for cell_id in timed)
            not_ok = sum(walls[cell_id] for cell_id in timed if statuses[cell_id] != Status.OK)
            console.print(
                f"their rows there record {total:.0f} s ({total / 60:.1f} min) of cell-process time for {len(timed)}"
                f" of these {len(matrix.cells)} cells, {not_ok:.0f} s of it in cells not ok",
                soft_wrap=True,
            )


def run_with_progress(
    matrix: Matrix,
    results_dir: Path,
    force: bool,
    executor: Executor,
    max_time_s: float | None = None,
    times_from: Path | None = None,
) -> int:
    """Run the matrix on `executor` with a live progress bar, then print the summary table. Exit code 0, or 3
    when `max_time_s` stopped the run first."""
    from bench.runner import TimeLimitReached, run_matrix

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[running]}"),
    )
    earlier_runs = len(read_runs(results_dir))
    bar = _ProgressBar(
        Progress(*columns, console=console), f"{matrix.name} ({executor.name}, {executor.slots} at a time)"
    )
    try:
        summary = run_matrix(matrix, results_dir, force, bar, executor, max_time_s, times_from)
    except (TimeLimitReached, KeyboardInterrupt) as stop:  # Ctrl-C: the CLI then says how to resume
        bar.close()
        print_summary(results_dir)
        folder = ResultsFolder(results_dir)
        for run in read_runs(results_dir)[earlier_runs:]:  # none when stopped before the run was recorded
            for cell in run.get("unfinished", []):
                kept = folder.interrupted_log_path(cell["cell_id"])  # none when its worker was lost
                console.print(
                    f"stopped after {cell['ran_s']:.0f} s: {escape(cell['cell_label'])} ({cell['cell_id']})"
                    + (f"; its log so far: {escape(str(kept))}" if kept.exists() else ""),
                    soft_wrap=True,
                )
        if isinstance(stop, KeyboardInterrupt):
            raise
        print(f"quantbench: {stop}", file=sys.stderr)
        return stop.exit_code
    finally:
        bar.close()
    if summary.already_done:
        console.print(f"{summary.already_done} cells already completed in {results_dir} (use --force to rerun them)")
    print_summary(results_dir)
    console.print(
        escape(f"the plots and what to pick: quantbench report {results_dir} -o {results_dir / 'report.html'}"),
        soft_wrap=True,
    )
    return 0


class _ProgressBar:
    """The run's progress on the terminal: cells done of those to do, the cells running now, a line per result.
    The bar shows once the run holds its results folder (a run refused the folder shows none)."""

    def __init__(self, progress: Progress, description: str) -> None:
        self.progress, self.description = progress, description
        self.task: TaskID | None = None  # added by `preparing`, which the runner calls before anything else
        self.running: list[str] = []

    def preparing(self) -> None:
        self.progress.start()
        self.task = self.progress.add_task(self.description, total=None, running="")

    def close(self) -> None:
        """Stop the bar if it showed (rich's `stop` prints a line on a non-terminal even for a bar never shown)."""
        if self.progress.live.is_started:
            self.progress.stop()

    def planned(self, todo: int) -> None:
        self.progress.update(self.task, total=todo)

    def cell_started(self, cell: Cell) -> None:
        self.running.append(cell.label)
        self._show_running()

    def cell_done(self, cell: Cell, status: str) -> None:
        if cell.label in self.running:  # cells recorded without running (skipped, unsupported) never started
            self.running.remove(cell.label)
        self.progress.advance(self.task)
        self._show_running()
        self.progress.console.print(f"[{STATUS_STYLE[status]}]{status:>11}[/] {cell.id} {escape(cell.label)}")

    def _show_running(self) -> None:
        self.progress.update(self.task, running=escape("running: " + ", ".join(self.running) if self.running else ""))


def print_summary(results_dir: Path) -> None:
    """One line per cell: status, latency and memory (GPU columns show n/a on CPU, never 0)."""
    frame = read_results(results_dir)
    if frame.empty:
        console.print("no results")
        return
    table = Table(title=f"results in {results_dir}")
    for column in (
        "cell id",
        "cell",
        "status",
        "e2e median s",
        "step median s",
        "resident GiB",
        "peak GiB",
        "transformer MiB",
    ):
        table.add_column(column)
    for cell_id, rows in frame.groupby("cell_id", sort=False):
        first = rows.iloc[0]
        statuses = sorted(set(rows["status"]))
        table.add_row(
            cell_id,
            escape(first["cell_label"]),
            "/".join(f"[{STATUS_STYLE[s]}]{s}[/]" for s in statuses),
            _or_dash(rows["e2e_latency_median_s"].median(), "{:.3f}"),
            _or_dash(rows["step_latency_median_s"].median(), "{:.4f}"),
            _gib(first["resident_reserved_bytes"]),
            _gib(first["peak_reserved_bytes"]),
            _or_dash(first["transformer_tensor_bytes"] / 1024**2, "{:.2f}"),
        )
    console.print(table)
    notes = {n for n in frame["gpu_memory_note"].dropna()}
    for note in notes:
        console.print(f"GPU memory n/a: {note}")


def _gib(value) -> str:
    return _or_dash(value / GIB, "{:.2f}", missing="n/a")


def _or_dash(value, fmt: str = "{}", missing: str = "-") -> str:
    """`value` formatted, or `missing` for None and NaN (a missing measurement is never shown as 0)."""
    if value is None or value != value:
        return missing
    return fmt.format(value)
