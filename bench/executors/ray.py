"""The `ray` executor: each cell a Ray task (one GPU, or one CPU on a cluster without GPUs) that runs the
same fresh-subprocess cell on whichever node Ray picks.

With `run.cell_start = "prestarted"`, the Ray worker running a cell starts the process of its own next cell
(`bench.launch.Standby`) and keeps it for that worker's next task; a standby whose environment (its GPU) is not
the next cell's is not used.

Every node needs quantbench installed and the model folder at the same path (shared storage); the
driver connects to an existing cluster (`--address auto` or `ray://host:10001`).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from bench.environment import Machine, detect_machine
from bench.errors import UserError
from bench.executors.base import Executor, WorkerLost, threads_per_cell
from bench.launch import STANDBY_MARKS_ENV, CellJob, CellOutcome, Standby, job_environment, launch_cell

log = logging.getLogger(__name__)
RAY_WORKER_PREFIX = "quantbench-ray-worker-"


class RayExecutor(Executor):
    """Cells as Ray tasks; a worker or node lost mid-cell fails the job's future with WorkerLost."""

    name = "ray"

    def __init__(self, address: str) -> None:
        try:
            import ray
        except ImportError:
            raise UserError("--executor ray needs Ray: pip install 'quantbench[ray]'") from None
        self._ray = ray
        self._owns_connection = not ray.is_initialized()
        if self._owns_connection:
            try:
                ray.init(address=address, log_to_driver=False, configure_logging=False)
            except (ConnectionError, RuntimeError, ValueError) as error:
                raise UserError(f"--address {address}: cannot connect to a Ray cluster: {error}") from None
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        # Ray sets a task's OMP_NUM_THREADS to its CPU count (1 if it asks for none); a GPU cell asks for its
        # node's share of the cores, as local-gpus gives it, so CPU-side quantizing is not single-threaded.
        self._options: dict[str, Any] = {"num_gpus": 1, "num_cpus": _cpus_per_gpu(ray)} if gpus else {"num_cpus": 1}
        self.slots = gpus or int(resources.get("CPU", 1))
        # Ray's own retries are off: the driver retries a lost worker once and records the attempts. A worker may
        # run many cells (Ray ends a GPU task's worker after one call unless told): the cells, not the worker,
        # touch the GPU, and the process a worker starts ahead is for its own next cell.
        self._launch = ray.remote(max_retries=0, max_calls=0, **self._options)(launch_in_ray_worker)
        self._refs: set[Any] = set()

    def machine(self) -> Machine:
        probe = self._ray.remote(max_retries=0, **self._options)(detect_machine)
        return self._ray.get(probe.remote())

    def submit(self, job: CellJob) -> Future[CellOutcome]:
        ref = self._launch.remote(job)
        self._refs.add(ref)
        outcome: Future[CellOutcome] = Future()

        def settle(done: Future) -> None:
            self._refs.discard(ref)
            error = done.exception()
            if error is None:
                outcome.set_result(done.result())
            elif self._is_lost_worker(error):
                outcome.set_exception(WorkerLost(f"{type(error).__name__}: {_first_line(error)}"))
            else:
                outcome.set_exception(error)

        ref.future().add_done_callback(settle)
        return outcome

    def _is_lost_worker(self, error: BaseException) -> bool:
        exceptions = self._ray.exceptions
        return isinstance(error, exceptions.RayError) and not isinstance(error, exceptions.RayTaskError)

    def shutdown(self) -> None:
        for ref in list(self._refs):
            self._ray.cancel(ref, force=True)
        if self._owns_connection:
            self._ray.shutdown()


def _cpus_per_gpu(ray: Any) -> int:
    """The cores a GPU cell may ask for and still fit on every GPU node: the smallest node's share."""
    shares = [
        threads_per_cell(int(node["Resources"].get("CPU", 0)), int(node["Resources"]["GPU"]))
        for node in ray.nodes()
        if node.get("Alive") and node["Resources"].get("GPU", 0) >= 1
    ]
    return min(shares, default=1)


def _first_line(error: BaseException) -> str:
    """The first line of an exception's message; Ray's cancellations have none."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else "(no message)"


class _WorkerSlot:
    """What one Ray worker process keeps between its tasks: the process it started ahead for its next cell, in a
    folder of this worker's (`quantbench-ray-worker-<pid>-*`, in the node's temporary folder) that also holds the
    marks of its imports (`STANDBY_MARKS_ENV`) for the running cell to wait on.

    Ray ends its workers with SIGKILL, taking their standbys along (parent-death signal) but leaving the folders;
    each worker deletes those of workers no longer running when it starts."""

    standby: Standby | None = None
    folder: Path | None = None

    @classmethod
    def start(cls) -> Path:
        if cls.folder is None:
            for stale in Path(tempfile.gettempdir()).glob(f"{RAY_WORKER_PREFIX}*"):
                pid = stale.name.removeprefix(RAY_WORKER_PREFIX).partition("-")[0]
                if pid.isdigit() and not _running(int(pid)):
                    shutil.rmtree(stale, ignore_errors=True)
            cls.folder = Path(tempfile.mkdtemp(prefix=f"{RAY_WORKER_PREFIX}{os.getpid()}-"))
            (cls.folder / "marks").mkdir()
        return cls.folder


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def launch_in_ray_worker(job: CellJob) -> CellOutcome:
    """`launch_cell` as a Ray task: the cell uses the process this worker started ahead, if its environment is the
    cell's, and starts the next one ahead when the job asks for it (`prestart_next`)."""
    folder = _WorkerSlot.start()
    env = {STANDBY_MARKS_ENV: str(folder / "marks")}
    standby, _WorkerSlot.standby = _WorkerSlot.standby, None

    def started(_process: Any) -> None:
        if job.prestart_next:
            try:
                _WorkerSlot.standby = Standby(job.spec, job_environment(job, env), scratch_parent=folder)
            except OSError as error:  # the next cell then starts with its cell
                log.warning("could not start the next cell's process ahead: %s", error)

    return launch_cell(job, env, started, standby)
