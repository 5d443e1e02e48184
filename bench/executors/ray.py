"""The `ray` executor: one Ray actor per GPU of the cluster (per CPU on a cluster without GPUs), each holding its
GPU for the whole run and running cells there one after another, as a `local` executor does: every cell in a
fresh subprocess, and with `run.cell_start = "prestarted"` the next cell's process started while a cell runs, on
the same GPU and waited for before that cell times anything.

Every node needs quantbench installed and the model folder at the same path (shared storage); the driver
connects to an existing cluster (`--address auto` or `ray://host:10001`).
"""

from __future__ import annotations

import contextlib
import fcntl
import queue
import shutil
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench.environment import Machine, detect_machine
from bench.errors import UserError, first_line
from bench.executors.base import Executor, WorkerLost, threads_per_cell
from bench.executors.local import LocalExecutor
from bench.launch import CellJob, CellOutcome

ACTOR_START_S = 120  # for an actor to start (or start again after its node was lost) before it is given up
RESULT_MARGIN_S = 120  # past a cell's time limit, for its files to come back before the actor is taken for lost
SHUTDOWN_WAIT_S = 60  # for the actors to kill their cells and delete their scratch folders
ACTOR_FOLDER_PREFIX = "quantbench-ray-actor-"
# Threads of an actor: its one running cell, `shutdown` beside it, and a cell the driver gave up on (Ray could
# not reach the actor) that may still hold a thread.
ACTOR_THREADS = 3


class CellRunner:
    """A Ray actor: one GPU (Ray sets its CUDA_VISIBLE_DEVICES and OMP_NUM_THREADS) running one cell at a time
    through a one-slot `LocalExecutor`; `shutdown` runs beside a running cell and stops it.

    Its cells' scratch folders are in a folder of its own, locked while the actor lives and deleted by `shutdown`;
    a killed actor's folder (its node's memory ran out, a cell killed it) is deleted by the next actor started on
    that node, which finds it unlocked."""

    def __init__(self) -> None:
        for folder in Path(tempfile.gettempdir()).glob(f"{ACTOR_FOLDER_PREFIX}*"):
            with contextlib.suppress(OSError), open(folder / ".lock") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # OSError: its actor still runs
                shutil.rmtree(folder, ignore_errors=True)
        self.folder = Path(tempfile.mkdtemp(prefix=ACTOR_FOLDER_PREFIX))
        self._lock = open(self.folder / ".lock", "w")  # noqa: SIM115 - held for the actor's life
        fcntl.flock(self._lock, fcntl.LOCK_EX)
        self._cells = LocalExecutor(scratch_parent=self.folder)

    def run(self, job: CellJob) -> CellOutcome:
        return self._cells.submit(job).result()

    def machine(self) -> Machine:
        return detect_machine()

    def shutdown(self) -> None:
        self._cells.shutdown()
        shutil.rmtree(self.folder, ignore_errors=True)
        self._lock.close()


class RayExecutor(Executor):
    """Cells on the cluster's actors, each cell on the first free one. An actor (or its node) lost mid-cell fails
    the job's future with WorkerLost; Ray starts the actor again, and one that does not start is given up."""

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
        self._closed = threading.Event()
        self._actors: list[Any] = []
        self._in_flight: set[Any] = set()  # the `run` calls not answered yet
        self._pool: ThreadPoolExecutor | None = None
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        # Ray sets an actor's OMP_NUM_THREADS to its CPU count (1 if it asks for none); a GPU actor asks for its
        # node's share of the cores, as local-gpus gives a cell, so CPU-side quantizing is not single-threaded.
        options: dict[str, Any] = {"num_gpus": 1, "num_cpus": _cpus_per_gpu(ray)} if gpus else {"num_cpus": 1}
        # Ray's own retries are off (the driver retries a lost cell once and records the attempts); a lost actor
        # is started again.
        actor = ray.remote(max_restarts=-1, max_task_retries=0, max_concurrency=ACTOR_THREADS, **options)(CellRunner)
        wanted = [actor.remote() for _ in range(gpus or int(resources.get("CPU", 1)))]
        probes = [runner.__ray_ready__.remote() for runner in wanted]  # all at once: one wait, not one per actor
        ready, _ = ray.wait(probes, num_returns=len(probes), timeout=ACTOR_START_S)
        # none on GPUs other jobs hold; `_started` answers at once for an actor whose probe came back
        self._actors = [runner for runner, probe in zip(wanted, probes) if probe in ready and self._started(runner)]
        for runner in wanted:
            if runner not in self._actors:
                ray.kill(runner, no_restart=True)
        if not self._actors:
            self.shutdown()
            raise UserError(f"--executor ray: no actor ({options}) started within {ACTOR_START_S} s on the cluster")
        self.slots = len(self._actors)
        self._free: queue.Queue[Any] = queue.Queue()
        for runner in self._actors:
            self._free.put(runner)
        self._pool = ThreadPoolExecutor(self.slots, thread_name_prefix="quantbench-ray")

    def _started(self, runner: Any) -> bool:
        """Whether `runner` runs (or runs again) within ACTOR_START_S; while Ray restarts it, calls to it fail at
        once as unavailable, so it is asked again until then."""
        deadline = time.monotonic() + ACTOR_START_S
        while (left := deadline - time.monotonic()) > 0:
            try:
                self._ray.get(runner.__ray_ready__.remote(), timeout=left)
                return True
            except self._ray.exceptions.ActorUnavailableError:
                time.sleep(1)
            except self._ray.exceptions.RayError:  # died for good, or not started in time
                return False
        return False

    def machine(self) -> Machine:
        runner = self._take()
        try:
            return self._ray.get(runner.machine.remote())
        finally:
            self._free.put(runner)

    def submit(self, job: CellJob) -> Future[CellOutcome]:
        return self._pool.submit(self._run, job)

    def _take(self) -> Any:
        """A free actor; WorkerLost when none is left."""
        while self._actors:
            with contextlib.suppress(queue.Empty):
                return self._free.get(timeout=1)
        raise WorkerLost("no Ray actor is left: each was lost and did not start again")

    def _run(self, job: CellJob) -> CellOutcome:
        runner = self._take()
        call = runner.run.remote(job)
        self._in_flight.add(call)
        try:
            outcome = self._ray.get(call, timeout=job.timeout_s + RESULT_MARGIN_S)
        except self._ray.exceptions.RayError as error:
            if isinstance(error, self._ray.exceptions.RayTaskError):
                self._free.put(runner)
                raise  # the launcher itself failed: not a lost worker
            if self._closed.is_set() or not self._started(runner):
                self._actors.remove(runner)
            else:
                self._free.put(runner)
            raise WorkerLost(f"{type(error).__name__}: {first_line(error) or '(no message)'}") from None
        finally:
            self._in_flight.discard(call)
        self._free.put(runner)
        return outcome

    def shutdown(self) -> None:
        """Each actor kills its running cell and the process it started ahead and deletes their folders; the
        killed cells' outcomes (their logs so far) come back; then the actors end. A second call does nothing."""
        if self._closed.is_set():
            return
        self._closed.set()
        with contextlib.suppress(Exception):  # an actor that is gone has nothing left to stop
            refs = [runner.shutdown.remote() for runner in self._actors]
            self._ray.wait(refs, num_returns=len(refs), timeout=SHUTDOWN_WAIT_S)
            calls = list(self._in_flight)  # answered before the actors are killed, or their logs are lost
            if calls:
                self._ray.wait(calls, num_returns=len(calls), timeout=SHUTDOWN_WAIT_S)
        for runner in list(self._actors):
            with contextlib.suppress(Exception):
                self._ray.kill(runner, no_restart=True)
        if self._pool is not None:
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
