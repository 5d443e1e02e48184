"""Test-only fault injection, so the failure paths are exercised for real.

`QUANTBENCH_INJECT_FAULT` holds comma-separated "<kind>" or "<kind>@<cell id prefix>" items, e.g.
"oom@3c5a,sigkill@83b8". `kill-worker` kills the process that launched the cell (an executor's worker) on
every attempt, `kill-worker-once` on the first attempt only; `recompile` drops the compiled code after the
warm-up, so the timed runs compile again.

`slow=<percent>%` (e.g. "slow=10%", "slow=5%@3c5a") slows every denoising step of the cell, warm-up and timed, by
that fraction of the step's own compute time: a stand-in for a real latency regression, to check that
`quantbench compare` detects one. In the step callback, after the latency tracker has taken the step's end, it
waits for the device (torch.cuda.synchronize, so queued GPU work cannot hide the pause and CUDA-event timings see
the GPU idle through it), takes the step's compute time (from the end of the previous pause to now), and sleeps on
the host for the fraction of it. The pause therefore lands in the next step's measured duration and, after the
last step, in the end-to-end time only; a generation's first step, whose start is not observed, pauses by the
fraction of the previous step measured in the cell (none in the cell's first generation).
"""

from __future__ import annotations

import os
import signal
import time

FAULT_ENV = "QUANTBENCH_INJECT_FAULT"
FAULT_KINDS = ("crash", "oom", "sigkill", "hang", "nan", "kill-worker", "kill-worker-once", "recompile")
SLOW = "slow"  # slow=<percent>%: the one fault with a value


def injected_fault(cell_id: str, attempt: int) -> str | None:
    """The fault kind the environment asks for in this cell's attempt, if any."""
    for item in os.environ.get(FAULT_ENV, "").split(","):
        kind, _, target = item.strip().partition("@")
        if kind in FAULT_KINDS and (not target or cell_id.startswith(target)):
            return None if kind == "kill-worker-once" and attempt > 1 else kind
    return None


def injected_slowdown(cell_id: str) -> float | None:
    """The fraction by which the environment asks to slow this cell's denoising steps (`slow=10%` -> 0.10)."""
    for item in os.environ.get(FAULT_ENV, "").split(","):
        fault, _, target = item.strip().partition("@")
        kind, _, value = fault.partition("=")
        if kind == SLOW and (not target or cell_id.startswith(target)):
            try:
                fraction = float(value.removesuffix("%")) / 100
            except ValueError:
                fraction = -1.0
            if not value.endswith("%") or fraction <= 0:
                raise ValueError(f"{FAULT_ENV}: {item.strip()!r}: slow takes a positive percentage, e.g. slow=10%")
            return fraction
    return None


class StepSlowdown:
    """The `slow=<percent>%` fault: call `after_step(step)` at the end of every denoising step."""

    def __init__(self, fraction: float) -> None:
        self.fraction = fraction
        self.resumed: float | None = None  # when the last pause ended: the next step's compute starts there
        self.last_step_s: float | None = None

    def after_step(self, step: int) -> None:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        now = time.perf_counter()
        if step > 0 and self.resumed is not None:
            self.last_step_s = now - self.resumed
        if self.last_step_s is not None:
            time.sleep(self.fraction * self.last_step_s)
        self.resumed = time.perf_counter()


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
