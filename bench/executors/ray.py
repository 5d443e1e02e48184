"""The `ray` executor: one Ray actor per GPU of the cluster (per CPU on a cluster without GPUs), each holding its
GPU for the whole run and running cells there one after another, as a `local` executor does: every cell in a
fresh subprocess, and with `run.cell_start = "prestarted"` the next cell's process started while a cell runs, on
the same GPU and waited for before that cell times anything.

Every node needs quantbench installed and the model folder at the same path (shared storage); the driver
connects to an existing cluster (`--address auto` or `ray://host:10001`).
"""

from __future__ import annotations

import contextlib
import os
import queue
import shutil
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench.environment import Machine, detect_machine
from bench.errors import UserError, first_line
from bench.executors.base import Executor, WorkerLost, threads_per_cell
from bench.executors.local import LocalExecutor
from bench.launch import CellJob, CellOutcome

SHUTDOWN_WAIT_S = 60  # for the actors to kill their cells and delete their scratch folders
ACTOR_FOLDER_PREFIX = "quantbench-ray-actor-"  # then the actor's pid


class CellRunner:
    """A Ray actor: one GPU (Ray sets its CUDA_VISIBLE_DEVICES and OMP_NUM_THREADS) running one cell at a time
    through a one-slot `LocalExecutor`. Two calls may run at once, so `shutdown` can stop a running cell.

    Its cells' scratch folders are in a folder of its own, which `shutdown` deletes; an actor killed (its node's
    memory ran out, a cell killed it) leaves that folder, and the next actor started on the node deletes it."""

    def __init__(self) -> None:
        for folder in Path(tempfile.gettempdir()).glob(f"{ACTOR_FOLDER_PREFIX}*"):
            pid = folder.name.removeprefix(ACTOR_FOLDER_PREFIX).partition("-")[0]
            if pid.isdigit() and not _process_exists(int(pid)):
                shutil.rmtree(folder, ignore_errors=True)
        self._folder = Path(tempfile.mkdtemp(prefix=f"{ACTOR_FOLDER_PREFIX}{os.getpid()}-"))
        self._cells = LocalExecutor(scratch_parent=self._folder)

    def run(self, job: CellJob) -> CellOutcome:
        return self._cells.submit(job).result()

    def machine(self) -> Machine:
        return detect_machine()

    def shutdown(self) -> None:
        self._cells.shutdown()
        shutil.rmtree(self._folder, ignore_errors=True)


def _process_exists(pid: int) -> bool:
    """Whether a process `pid` exists (a zombie does; another user's does, though we may not signal it)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


class RayExecutor(Executor):
    """Cells on the cluster's actors, each cell on the first free one; an actor (or its node) lost mid-cell fails
    the job's future with WorkerLost, and Ray starts the actor again for the next cell."""

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
        # Ray sets an actor's OMP_NUM_THREADS to its CPU count (1 if it asks for none); a GPU actor asks for its
        # node's share of the cores, as local-gpus gives a cell, so CPU-side quantizing is not single-threaded.
        options: dict[str, Any] = {"num_gpus": 1, "num_cpus": _cpus_per_gpu(ray)} if gpus else {"num_cpus": 1}
        self.slots = gpus or int(resources.get("CPU", 1))
        # Ray's own retries are off (the driver retries a lost cell once and records the attempts); a lost actor
        # is started again.
        actor = ray.remote(max_restarts=-1, max_task_retries=0, max_concurrency=2, **options)(CellRunner)
        self._actors = [actor.remote() for _ in range(self.slots)]
        self._free: queue.Queue[Any] = queue.Queue()
        for runner in self._actors:
            self._free.put(runner)
        self._pool = ThreadPoolExecutor(self.slots, thread_name_prefix="quantbench-ray")

    def machine(self) -> Machine:
        runner = self._free.get()
        try:
            return self._ray.get(runner.machine.remote())
        finally:
            self._free.put(runner)

    def submit(self, job: CellJob) -> Future[CellOutcome]:
        return self._pool.submit(self._run, job)

    def _run(self, job: CellJob) -> CellOutcome:
        runner = self._free.get()
        try:
            return self._ray.get(runner.run.remote(job))
        except self._ray.exceptions.RayError as error:
            if isinstance(error, self._ray.exceptions.RayTaskError):
                raise  # the launcher itself failed: not a lost worker
            raise WorkerLost(f"{type(error).__name__}: {first_line(error) or '(no message)'}") from None
        finally:
            self._free.put(runner)

    def shutdown(self) -> None:
        """Each actor kills its running cell and the process it started ahead and deletes their folders; then the
        actors end."""
        with contextlib.suppress(Exception):  # an actor that is gone has nothing left to stop
            self._ray.get([runner.shutdown.remote() for runner in self._actors], timeout=SHUTDOWN_WAIT_S)
        for runner in self._actors:
            self._ray.kill(runner, no_restart=True)
        self._pool.shutdown(wait=True, cancel_futures=True)
        if self._owns_connection:
            self._ray.shutdown()


def _cpus_per_gpu(ray: Any) -> int:
    """The cores a GPU actor may ask for and still fit on every GPU node: the smallest node's share."""
    shares = [
        threads_per_cell(int(node["Resources"].get("CPU", 0)), int(node["Resources"]["GPU"]))
        for node in ray.nodes()
        if node.get("Alive") and node["Resources"].get("GPU", 0) >= 1
    ]
    return min(shares, default=1)
