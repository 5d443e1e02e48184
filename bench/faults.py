"""Test-only fault injection, so the failure paths are exercised for real.

`QUANTBENCH_INJECT_FAULT` holds comma-separated "<kind>" or "<kind>@<cell id prefix>" items, e.g.
"oom@3c5a,sigkill@83b8". `kill-worker` kills the process that launched the cell (an executor's worker) on
every attempt, `kill-worker-once` on the first attempt only; `recompile` drops the compiled code after the
warm-up, so the timed runs compile again.
"""

from __future__ import annotations

import os
import signal
import time

FAULT_ENV = "QUANTBENCH_INJECT_FAULT"
FAULT_KINDS = ("crash", "oom", "sigkill", "hang", "nan", "kill-worker", "kill-worker-once", "recompile")


def injected_fault(cell_id: str, attempt: int) -> str | None:
    """The fault kind the environment asks for in this cell's attempt, if any."""
    for item in os.environ.get(FAULT_ENV, "").split(","):
        kind, _, target = item.strip().partition("@")
        if kind in FAULT_KINDS and (not target or cell_id.startswith(target)):
            return None if kind == "kill-worker-once" and attempt > 1 else kind
    return None


def inject(kind: str | None, phase: str) -> None:
    """Make the injected fault happen for real at `phase` ("load", "generate", or the end of a "timed step")."""
    if kind is None:
        return
    import torch

    if kind in ("kill-worker", "kill-worker-once") and phase == "load":
        os.kill(os.getppid(), signal.SIGKILL)  # this cell then dies with its parent (the parent-death signal)
        time.sleep(60)
    if kind == "crash" and phase == "load":
        raise RuntimeError("injected crash (QUANTBENCH_INJECT_FAULT=crash)")
    if kind == "oom" and phase == "generate":
        raise torch.OutOfMemoryError("CUDA out of memory. Injected by QUANTBENCH_INJECT_FAULT=oom")
    if kind == "sigkill" and phase == "generate":
        os.kill(os.getpid(), signal.SIGKILL)
    if kind == "hang" and phase == "timed step":
        time.sleep(10**6)
    if kind == "recompile" and phase == "generate":
        torch._dynamo.reset()
