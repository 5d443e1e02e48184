"""Latency tracker: wall time of a block, synchronised with CUDA so queued GPU work is inside it, and the ends
of the denoising steps inside it (from the pipeline's step callback).

On a GPU a step's end is a CUDA event recorded on the current stream (no host synchronisation inside the
timed window: the block synchronises once, when it ends, and the steps' durations are read from the events
then); on the CPU it is `perf_counter`. `QUANTBENCH_SYNC_EACH_STEP=1` instead synchronises at every step end
and reads `perf_counter` (how step times were taken before CUDA events: a diagnostic, to compare the two).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

SYNC_EACH_STEP_ENV = "QUANTBENCH_SYNC_EACH_STEP"


class Clock:
    """perf_counter that waits for queued CUDA work first, so GPU time is inside the interval; and step marks."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.events = cuda and os.environ.get(SYNC_EACH_STEP_ENV) != "1"

    def now(self) -> float:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        return time.perf_counter()

    def mark(self) -> Any:
        """A point in the stream of work: a recorded CUDA event (read once the block has synchronised), else
        `now()`."""
        if not self.events:
            return self.now()
        import torch

        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds_between(self, start: Any, end: Any) -> float:
        """Seconds between two marks; CUDA events must have completed (the block ended)."""
        if self.events:
            return start.elapsed_time(end) / 1000.0  # elapsed_time is in milliseconds
        return end - start


@dataclass
class Latency:
    """One tracked block: its wall time and the marks of its denoising steps' ends (`step_ended`)."""

    clock: Clock
    start: float
    s: float | None = None  # set when the block ends
    step_ends: list[Any] = field(default_factory=list)

    def step_ended(self) -> None:
        self.step_ends.append(self.clock.mark())

    def step_s(self) -> list[float]:
        """The durations of the steps after the first (the first step's start is not observed); call once the
        block has ended (CUDA events are complete then)."""
        return [self.clock.seconds_between(a, b) for a, b in zip(self.step_ends, self.step_ends[1:], strict=False)]


@contextlib.contextmanager
def track_latency(clock: Clock) -> Iterator[Latency]:
    """Time the block; the yielded Latency has `s` once it ends (one synchronisation at each end)."""
    latency = Latency(clock, clock.now())
    yield latency
    latency.s = clock.now() - latency.start
