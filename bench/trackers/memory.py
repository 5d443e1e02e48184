"""Memory tracker: the peaks of torch's CUDA allocator and of this process's resident set over a block."""

from __future__ import annotations

import contextlib
import resource
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass
class Memory:
    """Peaks over the tracked block, in bytes; the GPU's are None without CUDA."""

    peak_reserved_bytes: int | None = None
    peak_allocated_bytes: int | None = None
    cpu_peak_rss_bytes: int | None = None  # the process's peak since it started (the kernel keeps no other)


def reset_gpu_peak() -> None:
    import torch

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()


def release_cached_memory() -> None:
    """Return the allocator's cached blocks to the GPU (after a warm-up: what compiling and autotuning left)."""
    import torch

    torch.cuda.synchronize()
    torch.cuda.empty_cache()


def gpu_max_reserved_bytes() -> int:
    import torch

    torch.cuda.synchronize()
    return torch.cuda.max_memory_reserved()


def cpu_peak_rss_bytes() -> int:
    """Peak resident set size of this process (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@contextlib.contextmanager
def track_memory(cuda: bool) -> Iterator[Memory]:
    """Reset the CUDA peaks, run the block, then fill the yielded Memory with the peaks it reached."""
    memory = Memory()
    if cuda:
        reset_gpu_peak()
    yield memory
    if cuda:
        import torch

        torch.cuda.synchronize()
        memory.peak_reserved_bytes = torch.cuda.max_memory_reserved()
        memory.peak_allocated_bytes = torch.cuda.max_memory_allocated()
    memory.cpu_peak_rss_bytes = cpu_peak_rss_bytes()
