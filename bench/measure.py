"""Measurement arithmetic: latency statistics and the real byte size of a model's tensors (the trackers in
bench/trackers/ take the measurements)."""

from __future__ import annotations

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
