"""Where cells run: `local` (one after another), `local-gpus` (one per visible GPU), `ray` (a Ray cluster).

Every executor runs each cell in a fresh subprocess through `bench.launch` and hands the outcome back to
the driver, which alone writes the results folder.
"""

from __future__ import annotations

from bench.errors import UserError
from bench.executors.base import Executor, WorkerLost

EXECUTORS = ("local", "local-gpus", "ray")

__all__ = ["EXECUTORS", "Executor", "WorkerLost", "make_executor"]


def make_executor(name: str = "local", address: str | None = None, gpus: list[str] | None = None) -> Executor:
    """The executor called `name`; `address` is the Ray cluster's, `gpus` the device ids for local-gpus."""
    if name not in EXECUTORS:
        raise UserError(f"--executor: unknown executor {name!r}; allowed: {', '.join(EXECUTORS)}")
    if address is not None and name != "ray":
        raise UserError(f"--address is for --executor ray, not {name!r}")
    if gpus is not None and name != "local-gpus":
        raise UserError(f"--gpus is for --executor local-gpus, not {name!r}")
    if name == "ray":
        from bench.executors.ray import RayExecutor

        return RayExecutor(address or "auto")
    from bench.executors.local import LocalExecutor, local_gpus

    return LocalExecutor(local_gpus(gpus)) if name == "local-gpus" else LocalExecutor()
