"""What every executor offers the driver."""

from __future__ import annotations

from abc import ABC, abstractmethod
from concurrent.futures import Future

from bench.environment import Machine
from bench.launch import CellJob, CellOutcome

THREADS_ENV = "OMP_NUM_THREADS"


def threads_per_cell(cpus: int, cells_at_once: int) -> int:
    """Each cell's share of `cpus` cores when `cells_at_once` cells run side by side. Left alone, every cell's
    torch starts one thread per core, and cells quantizing on the CPU at once (torchao does, while loading)
    slow each other down: on a 2-GPU H100 host, torchao's quantize phase took 2.0-2.9x its time alone."""
    return max(1, cpus // max(1, cells_at_once))


class WorkerLost(Exception):
    """The worker (or node) running a cell went away; the cell itself may be fine, so it is retried once."""


class Executor(ABC):
    """Runs cell jobs, `slots` at a time; a job's future raises WorkerLost if its worker went away."""

    name: str
    slots: int

    @abstractmethod
    def machine(self) -> Machine:
        """The accelerator the cells will see (capability checks read it)."""

    @abstractmethod
    def submit(self, job: CellJob) -> Future[CellOutcome]:
        """Start `job` when a slot is free."""

    @abstractmethod
    def shutdown(self) -> None:
        """Stop: kill cells still running (an interrupted run), release workers."""

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
