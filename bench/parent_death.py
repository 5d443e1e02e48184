"""A process launched by the driver dies with it (even when the driver is SIGKILLed), so no orphan holds the
GPU: the child asks Linux for SIGKILL at its parent's death (prctl PR_SET_PDEATHSIG), from inside itself rather
than from a `preexec_fn`, which is unsafe in a threaded launcher."""

from __future__ import annotations

import os
import signal
import sys

PARENT_ENV = "QUANTBENCH_PARENT_PID"  # the launcher's pid, set by bench.launch
PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Get SIGKILL when the launcher dies; exit now if it already has (the race before the prctl call)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    expected = os.environ.get(PARENT_ENV)
    if expected and os.getppid() != int(expected):
        os._exit(1)
