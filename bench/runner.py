"""The driver: resolve the model, check every cell, run each in a fresh subprocess, write its rows.

Only this process writes the results folder, one part file per cell, whatever executor ran the cells,
so a crash (of a cell, a worker or the driver) never loses or corrupts rows already written; a rerun
skips finished cells, with any executor.
"""

from __future__ import annotations

import contextlib
import json
import logging
import subprocess
import time
from collections import Counter, deque
from collections.abc import Collection, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, CancelledError, Future, wait
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from bench.capability import Verdict, check_cell
from bench.cells import Cell
from bench.comparison import ReferenceComparison
from bench.contract import CellResult, CellSpec, Status, worst_status
from bench.environment import Machine, collect_environment, detect_machine, other_versions
from bench.errors import UserError
from bench.executors import Executor, WorkerLost
from bench.executors.local import LocalExecutor
from bench.launch import CellJob, CellOutcome
from bench.lora import CellAdapters, MatrixAdapters, matrix_adapters
from bench.matrix import Matrix
from bench.models import ResolvedModel, resolve_model
from bench.rows import cell_rows
from bench.scheduling import start_order
from bench.store import ResultRow, ResultsFolder

log = logging.getLogger(__name__)
MAX_ATTEMPTS = 2  # a cell whose worker is lost is retried once, then recorded as failed


@dataclass
class RunSummary:
    """What a run did: counts by status, and cells left alone because they were already done."""

    results_dir: Path
    statuses: Counter = field(default_factory=Counter)
    already_done: int = 0
    reference_runs: int = 0


@dataclass(frozen=True)
class Plan:
    """A matrix made ready to run here: its model folder, device, and each cell's verdict."""

    matrix: Matrix
    model: ResolvedModel
    machine: Machine
    device: str
    verdicts: dict[str, Verdict]
    adapters: MatrixAdapters = MatrixAdapters({}, {})  # the LoRA cells' adapter files (bench.lora)


class TimeLimitReached(Exception):
    """The run's time limit passed: the cells still running were stopped and the rest not started; the rows
    written so far are kept and a rerun resumes. Exit code 3."""

    exit_code = 3

    def __init__(self, limit_s: float, unfinished: int) -> None:
        self.limit_s, self.unfinished = limit_s, unfinished
        super().__init__(
            f"stopped at the time limit of {limit_s:g} s with {unfinished} cell{'s' * (unfinished != 1)} not finished;"
            " rerun to resume"
        )


class RunProgress(Protocol):
    """What a run reports as it goes (the terminal's progress bar listens)."""

    def preparing(self) -> None:
        """The run holds its results folder and prepares: the model, the cells' checks (a refused run never
        gets here)."""

    def planned(self, todo: int) -> None:
        """`todo` cells will run or be recorded (the others are already done)."""

    def cell_started(self, cell: Cell) -> None:
        """`cell` was handed to the executor."""

    def cell_done(self, cell: Cell, status: str) -> None:
        """`cell`'s rows are written, with `status` the worst of them."""


def plan(matrix: Matrix, machine: Machine | None = None) -> Plan:
    """Resolve the model and check every cell against `machine` (default: this one's accelerator);
    UserError before any work starts."""
    model = resolve_model(matrix)
    machine = machine or detect_machine()
    wanted = matrix.spec.run.device
    if wanted == "cuda" and not machine.cuda_available:
        raise UserError(f"{matrix.path}: run.device: 'cuda' asked for, but torch sees no CUDA device here")
    device = "cuda" if wanted == "cuda" or (wanted == "auto" and machine.cuda_available) else "cpu"
    verdicts = {cell.id: check_cell(cell, machine) for cell in matrix.cells}
    adapters = matrix_adapters(matrix.spec.lora, matrix.path.parent, model.folder, matrix.cells)
    return Plan(matrix, model, machine, device, verdicts, adapters)


def run_matrix(
    matrix: Matrix,
    results_dir: Path,
    force: bool = False,
    progress: RunProgress | None = None,
    executor: Executor | None = None,
    max_time_s: float | None = None,
    times_from: Path | None = None,
) -> RunSummary:
    """Run every cell not already completed in `results_dir` (all of them with `force`) on `executor`
    (default: local, one cell after another). Rows are written here, by the driver, as cells finish; each
    invocation adds a line to the folder's `runs.jsonl` (RunRecord).

    With `max_time_s`, no cell starts after that many seconds, and cells still running then are stopped
    (TimeLimitReached): a long matrix split over invocations of a fixed length.
    """
    started = time.monotonic()
    deadline = None if max_time_s is None else started + max_time_s
    folder = ResultsFolder(results_dir)
    summary = RunSummary(results_dir)
    with folder.exclusive(), executor or LocalExecutor() as pool:
        if progress:
            progress.preparing()
        ready = plan(matrix, pool.machine())
        run_settings = matrix.spec.run
        with _recorded_run(folder, pool, started) as run:
            run.plan_s = time.monotonic() - started
            done = set() if force else folder.completed_cell_ids()
            stale = rows_from_other_versions(folder)
            if stale.keys() & done:  # never mix versions silently: such cells run again and replace their rows
                log.warning(
                    "%d finished cells have rows from other library versions (%s): they run again",
                    len(stale.keys() & done),
                    describe_versions(next(iter(stale.values()))),
                )
                done -= stale.keys()
            todo = [cell for cell in matrix.cells if cell.id not in done]
            summary.already_done = len(matrix.cells) - len(todo)
            if progress:
                progress.planned(len(todo))
            with run.timing("reference_s"):
                comparison = (
                    ReferenceComparison(
                        ready,
                        folder,
                        lambda cell, gen, lora: submit_with_retry(pool, _job(ready, cell, gen, lora=lora)),
                        todo,
                    )
                    if matrix.drift.enabled and todo
                    else None
                )
                summary.reference_runs += bool(comparison and comparison.ran_reference)
            context = {**_row_context(ready), "executor": pool.name, **(comparison.row_fields() if comparison else {})}

            def write(cell: Cell, result: CellResult) -> list[ResultRow]:
                """Score the cell's images and write its rows: until then an interrupted run counts it unfinished."""
                with run.timing("scoring_s"):
                    drift = comparison.score(cell, result) if comparison else None
                rows = cell_rows(matrix, ready.model, cell, result, context, drift)
                folder.write_cell(cell.id, rows)
                return rows

            def count(cell: Cell, result: CellResult, rows: list[ResultRow]) -> None:
                eager_steps.update(eager_step_times([asdict(row) for row in rows]))
                status = worst_status({row.status for row in rows})
                summary.statuses[status] += 1
                run.count_cell(result)
                if progress:
                    progress.cell_done(cell, status)

            eager_steps = eager_step_times(folder.read_table().to_pylist())

            def job(cell: Cell, more_to_come: bool) -> CellJob:
                limit, reason = warmup_step_limit(cell, run_settings, eager_steps)
                prestart_next = more_to_come and run_settings.cell_start == "prestarted"
                return _job(ready, cell, warmup_step_limit=(limit, reason), prestart_next=prestart_next)

            waiting = deque()
            for cell in start_order(todo, results_dir, pool.slots, times_from):  # several slots: longest first
                verdict = ready.verdicts[cell.id]
                if verdict.status == "run":
                    waiting.append(cell)
                else:
                    result = CellResult(status=verdict.status, error=verdict.reason)
                    count(cell, result, write(cell, result))
            running: dict[Future, Cell] = {}
            started_at: dict[str, float] = {}
            try:
                while waiting or running:
                    while waiting and len(running) < pool.slots and (deadline is None or time.monotonic() < deadline):
                        cell = next_to_start(waiting, running.values(), eager_steps.keys())
                        running[submit_with_retry(pool, job(cell, bool(waiting)))] = cell
                        started_at[cell.id] = time.monotonic()
                        if progress:
                            progress.cell_started(cell)
                    finished = wait(running, _seconds_left(deadline), FIRST_COMPLETED).done if running else set()
                    if not finished:
                        raise TimeLimitReached(max_time_s, len(waiting) + len(running))
                    for future in finished:
                        cell = running[future]
                        result = _collect(future, folder, cell.id)
                        rows = write(cell, result)
                        del running[future]
                        count(cell, result, rows)
            except BaseException:  # interrupted: kill the running cells, keep how far they got
                pool.shutdown()
                for future, cell in running.items():
                    ran_s = time.monotonic() - started_at[cell.id]
                    run.unfinished.append({"cell_id": cell.id, "cell_label": cell.label, "ran_s": ran_s})
                    if future.done() and future.exception() is None:
                        outcome = future.result()
                        try:  # a full disk that stopped the run refuses this too: the stop's own error wins
                            folder.write_interrupted_log(cell.id, outcome.log, ran_s, outcome.result.measurements)
                        except OSError as error:
                            log.warning("could not keep the log of %s: %s", cell.label, error)
                run.not_started = len(waiting)
                raise
    return summary


@dataclass
class RunRecord:
    """One invocation of `run_matrix` on a results folder, a line of its `runs.jsonl`: its wall time and where
    the driver's own time went, the harness's share outside the cells (the cells' phases are in their rows)."""

    started_utc: str
    executor: str
    slots: int
    wall_s: float = 0.0
    plan_s: float = 0.0  # resolving the model (building a built-in one the first time), checking every cell
    reference_s: float = 0.0  # reference images (cached after their first run), loading the drift metrics
    scoring_s: float = 0.0  # comparing each cell's images with the references
    cells_run: int = 0
    cell_s: float = 0.0  # the wall time of the cells' processes, summed
    ended: str = "done"  # or "time limit", "interrupted", "error: <exception>"
    unfinished: list[dict[str, Any]] = field(default_factory=list)  # cells stopped while running: id, label, ran_s
    not_started: int = 0  # cells left waiting when the run stopped

    @contextlib.contextmanager
    def timing(self, phase: str) -> Iterator[None]:
        """Add the time spent in the block to `phase`."""
        start = time.monotonic()
        try:
            yield
        finally:
            setattr(self, phase, getattr(self, phase) + time.monotonic() - start)

    def count_cell(self, result: CellResult) -> None:
        wall = result.measurements.cell_wall_s
        if wall is not None:  # skipped and unsupported cells never ran
            self.cells_run += 1
            self.cell_s += wall


@contextlib.contextmanager
def _recorded_run(folder: ResultsFolder, pool: Executor, started: float) -> Iterator[RunRecord]:
    """The RunRecord of this invocation, appended to the folder's `runs.jsonl` when it ends, however it ends."""
    run = RunRecord(datetime.now(UTC).isoformat(timespec="seconds"), pool.name, pool.slots)
    try:
        yield run
    except TimeLimitReached:
        run.ended = "time limit"
        raise
    except KeyboardInterrupt:
        run.ended = "interrupted"
        raise
    except BaseException as error:
        run.ended = f"error: {type(error).__name__}"
        raise
    finally:
        run.wall_s = time.monotonic() - started
        try:
            folder.append_run(asdict(run))
        except OSError as error:  # e.g. a full disk: the rows are what matters; do not mask how the run ended
            log.warning("could not record this run in %s: %s", folder.root, error)


def _seconds_left(deadline: float | None) -> float | None:
    """Seconds until `deadline` (0 once it passed; None, no limit, without one)."""
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def submit_with_retry(pool: Executor, job: CellJob) -> Future[CellOutcome]:
    """`job` on `pool`, submitted again (once, as attempt 2) if its worker is lost; after that the
    future raises WorkerLost."""
    final: Future[CellOutcome] = Future()

    def attempt(job: CellJob) -> None:
        def settle(future: Future[CellOutcome]) -> None:
            error = CancelledError() if future.cancelled() else future.exception()  # cancelled: the pool shut down
            if isinstance(error, WorkerLost) and job.spec.attempt < MAX_ATTEMPTS:
                attempt(job.retry())
            elif error is not None:
                final.set_exception(error)
            else:
                final.set_result(future.result())

        try:
            pool.submit(job).add_done_callback(settle)
        except RuntimeError as error:  # a retry after the pool shut down (an interrupted run)
            final.set_exception(error)

    attempt(job)
    return final


def _collect(future: Future[CellOutcome], folder: ResultsFolder, cell_id: str) -> CellResult:
    """The cell's result, its files stored in the results folder, where it ran recorded in its measurements."""
    try:
        outcome = future.result()
    except WorkerLost as error:
        return CellResult(
            status=Status.FAILED, error=f"the worker running the cell was lost on {MAX_ATTEMPTS} attempts: {error}"
        )
    except Exception as error:  # the executor itself failed on this cell; the run goes on
        return CellResult(
            status=Status.FAILED, error=f"the executor could not run the cell: {type(error).__name__}: {error}"
        )
    folder.write_cell_files(cell_id, outcome.files, outcome.log)
    outcome.result.measurements.update(
        {"host": outcome.host, "cuda_visible_devices": outcome.cuda_visible_devices, "attempts": outcome.attempt}
    )
    return outcome.result


def rows_from_other_versions(folder: ResultsFolder) -> dict[str, dict[str, tuple[Any, Any]]]:
    """The cells of `folder` whose rows came from other versions of the libraries their cells use (the
    pipeline's, the method's and, with an adapter, peft) than the ones installed here: {cell id: {column: (row's,
    installed)}}."""
    current = collect_environment().as_dict()
    stale: dict[str, dict[str, tuple[Any, Any]]] = {}
    for row in folder.read_table().to_pylist():
        differing = other_versions(row, current)
        if differing:
            stale.setdefault(row["cell_id"], differing)
    return stale


def describe_versions(differing: dict[str, tuple[Any, Any]]) -> str:
    """`torch 2.12.0 -> 2.13.0, diffusers ...`"""
    return ", ".join(f"{field.removesuffix('_version')} {old} -> {new}" for field, (old, new) in differing.items())


SAME_METHOD = ("method", "method_options", "dtype", "threshold", "components", "placement")


def eager_step_times(rows: list[dict[str, Any]]) -> dict[tuple, float]:
    """The median step time per image of each method setting's eager ok rows (keyed by SAME_METHOD's columns)."""
    steps: dict[tuple, list[float]] = {}
    for row in rows:
        if row["status"] == Status.OK and row["compile"] == "off" and row.get("step_latency_median_s") is not None:
            per_image = row["step_latency_median_s"] / (row.get("batch_size") or 1)
            steps.setdefault(tuple(row[key] for key in SAME_METHOD), []).append(per_image)
    return {key: sorted(values)[len(values) // 2] for key, values in steps.items()}


# The relative limit's least value: timing steps faster than this costs little, and a tiny model's eager step
# (milliseconds on a CPU) is too small a yardstick: on a busy CPU a compiled tiny cell's warm-up steps waited
# 1.1 s on Inductor's kernel builds (CI), against 0.01 s idle. The slow warm-ups this rule is for take a minute.
SLOW_WARMUP_FLOOR_S = 5.0


def same_method_key(cell: Cell) -> tuple:
    """The values of SAME_METHOD's columns for `cell`, as its rows hold them: its eager twin has the same."""
    return (cell.method, json.dumps(cell.options, sort_keys=True), cell.dtype, cell.threshold,
            ",".join(cell.components) if cell.components is not None else None, cell.placement)  # fmt: skip


def next_to_start(waiting: deque[Cell], running: Iterable[Cell], known: Collection[tuple] = ()) -> Cell:
    """Take the cell to start next from `waiting`: the first, except that a compiled cell whose method's eager
    step is not `known` yet (keys of `eager_steps`) waits for it, as that step gives it its slow warm-up limit
    (`warmup_step_limit`): one waiting eager twin starts in its place (eager cells are short), and while a twin
    runs other cells go first. When every waiting cell waits so, the first (a slot never idles)."""
    running_eager = {same_method_key(cell) for cell in running if cell.compile == "off"}
    for cell in waiting:
        key = same_method_key(cell)
        if cell.compile != "off" and key not in known:
            if key in running_eager:
                continue
            cell = next((twin for twin in waiting if twin.compile == "off" and same_method_key(twin) == key), cell)
        waiting.remove(cell)
        return cell
    return waiting.popleft()


def warmup_step_limit(cell: Cell, run: Any, eager_steps: dict[tuple, float]) -> tuple[float | None, str]:
    """The warm-up step time past which a compiled `cell` ends untimed (run.slow_warmup_factor x the same
    method's eager step for the cell's batch but at least SLOW_WARMUP_FLOOR_S, or run.max_warmup_step_s), and why;
    (None, "") for eager cells or without either."""
    if cell.compile == "off":
        return None, ""
    key = same_method_key(cell)
    limits = []
    if key in eager_steps:
        eager = eager_steps[key] * cell.batch_size
        reason = f"run.slow_warmup_factor = {run.slow_warmup_factor:g} x the eager step of {eager:.3f} s"
        if run.slow_warmup_factor * eager < SLOW_WARMUP_FLOOR_S:
            reason += f", at least {SLOW_WARMUP_FLOOR_S:g} s"
        limits.append((max(run.slow_warmup_factor * eager, SLOW_WARMUP_FLOOR_S), reason))
    if run.max_warmup_step_s is not None:
        limits.append((run.max_warmup_step_s, "run.max_warmup_step_s"))
    return min(limits) if limits else (None, "")


def _job(
    ready: Plan,
    cell: Cell,
    generation: dict[str, Any] | None = None,
    warmup_step_limit: tuple[float | None, str] = (None, ""),
    lora: CellAdapters | None = None,
    prestart_next: bool = False,
) -> CellJob:
    """The job of `cell`; a reference cell passes its `generation` and `lora` (else the matrix's and the cell's)."""
    run = ready.matrix.spec.run
    lora = lora or ready.adapters.for_cell(cell.lora, cell.lora_rank)
    spec = CellSpec(
        cell=cell.axes(),
        cell_id=cell.id,
        model_folder=str(ready.model.folder),
        components={name: [c.library, c.class_name] for name, c in ready.model.components.items()},
        generation=generation or ready.matrix.generation.model_dump(),
        device=ready.device,
        gpu_memory_limit_gib=run.gpu_memory_limit_gib,
        compile_timeout_s=run.compile_limit_s(cell.compile),
        trust_pickled_checkpoints=run.trust_pickled_checkpoints,
        warmup_step_limit_s=warmup_step_limit[0],
        warmup_step_limit_reason=warmup_step_limit[1],
        lora=lora.to_json() if lora else None,
    )
    return CellJob.for_spec(spec, run.timeout_s, prestart_next)


def _row_context(ready: Plan) -> dict[str, Any]:
    machine = ready.machine
    context: dict[str, Any] = {**collect_environment().as_dict(), "device": ready.device}
    if ready.device == "cuda":
        context.update(gpu_name=machine.gpu_name, gpu_driver=_nvidia_driver())
    return context


def _nvidia_driver() -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
