"""A time limit inside the cell process (SIGALRM), for compilation: torch.compile cannot be interrupted by an
exception (it may catch it and retry), so the limit ends the process from the signal handler."""

from __future__ import annotations

import contextlib
import signal
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any


@contextlib.contextmanager
def time_limit(seconds: float | None, on_expiry: Callable[[float], None]) -> Iterator[None]:
    """Call `on_expiry(seconds elapsed)` (which must end the process) once `seconds` have passed; no limit when
    None. The log gets the stack of where the work was."""
    if seconds is None:
        yield
        return
    start = time.perf_counter()

    def expire(signum: int, frame: Any) -> None:
        traceback.print_stack(frame)
        on_expiry(time.perf_counter() - start)

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
