"""What every executor offers the driver."""

from __future__ import annotations

from abc import ABC, abstractmethod
from concurrent.futures import Future

from bench.environment import Machine
from bench.launch import CellJob, CellOutcome


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
