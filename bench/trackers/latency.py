"""Latency tracker: wall time of a block, synchronised with CUDA so queued GPU work is inside it, and the ends
of the denoising steps inside it (from the pipeline's step callback)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field


class Clock:
    """perf_counter that waits for queued CUDA work first, so GPU time is inside the interval."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda

    def now(self) -> float:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        return time.perf_counter()


@dataclass
class Latency:
    """One tracked block: its wall time and the times its denoising steps ended (`step_ended`)."""

    clock: Clock
    start: float
    s: float | None = None  # set when the block ends
    step_ends: list[float] = field(default_factory=list)

    def step_ended(self) -> None:
        self.step_ends.append(self.clock.now())

    def step_s(self) -> list[float]:
        """The durations of the steps after the first (the first step's start is not observed)."""
        return [b - a for a, b in zip(self.step_ends, self.step_ends[1:], strict=False)]


@contextlib.contextmanager
def track_latency(clock: Clock) -> Iterator[Latency]:
    """Time the block; the yielded Latency has `s` once it ends."""
    latency = Latency(clock, clock.now())
    yield latency
    latency.s = clock.now() - latency.start
