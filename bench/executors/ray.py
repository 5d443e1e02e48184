"""The `ray` executor: each cell a Ray task (one GPU, or one CPU on a cluster without GPUs) that runs the
same fresh-subprocess cell on whichever node Ray picks.

Every node needs quantbench installed and the model folder at the same path (shared storage); the
driver connects to an existing cluster (`--address auto` or `ray://host:10001`).
"""

from __future__ import annotations

from concurrent.futures import Future
from typing import Any

from bench.environment import Machine, detect_machine
from bench.errors import UserError
from bench.executors.base import Executor, WorkerLost, threads_per_cell
from bench.launch import CellJob, CellOutcome, launch_cell


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
        # Ray's own retries are off: the driver retries a lost worker once and records the attempts.
        self._launch = ray.remote(max_retries=0, **self._options)(launch_cell)
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
