"""Measurements: latency statistics, GPU and CPU memory, and the real byte size of a model's tensors."""

from __future__ import annotations

import resource
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Stats:
    """Summary of repeated timings, in seconds: median and interquartile range first."""

    median: float
    iqr: float
    mean: float
    min: float
    max: float
    rounds: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Stats:
        data = np.asarray(values, dtype=float)
        q1, median, q3 = np.percentile(data, [25, 50, 75])
        return cls(float(median), float(q3 - q1), float(data.mean()), float(data.min()), float(data.max()), len(data))


class Clock:
    """perf_counter that waits for queued CUDA work first, so GPU time is inside the interval."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda

    def now(self) -> float:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        return time.perf_counter()


@dataclass(frozen=True)
class GpuMemory:
    """torch's CUDA allocator counters, in bytes."""

    max_reserved_bytes: int
    max_allocated_bytes: int


def reset_gpu_peak() -> None:
    import torch

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()


def gpu_memory() -> GpuMemory:
    import torch

    torch.cuda.synchronize()
    return GpuMemory(torch.cuda.max_memory_reserved(), torch.cuda.max_memory_allocated())


def cpu_peak_rss_bytes() -> int:
    """Peak resident set size of this process (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def tensor_bytes(module: Any) -> int:
    """Bytes held by a module's parameters and buffers, counting the inner tensors of tensor subclasses.

    `get_memory_footprint()` reports torchao's quantized subclasses at their logical (bf16) size; this
    counts what is actually stored.
    """
    seen: set[int] = set()
    total = 0
    for tensor in (*module.parameters(), *module.buffers()):
        for leaf in _leaf_tensors(tensor):
            if leaf.numel() == 0:
                continue
            key = leaf.untyped_storage().data_ptr() if leaf.device.type != "meta" else id(leaf)
            if key in seen:
                continue
            seen.add(key)
            total += leaf.untyped_storage().nbytes()
    return total


def _leaf_tensors(tensor: Any) -> list[Any]:
    import torch

    data = tensor.data if isinstance(tensor, torch.nn.Parameter) else tensor
    if type(data) is not torch.Tensor and hasattr(data, "__tensor_flatten__"):
        names, _ = data.__tensor_flatten__()
        return [leaf for name in names for leaf in _leaf_tensors(getattr(data, name))]
    return [data]
