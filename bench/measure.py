"""Measurement arithmetic: latency statistics, the real byte size of a model's tensors, and whether quantizing
shrank it (the trackers in bench/trackers/ take the measurements)."""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
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


EFFECTIVE_RATIO = 0.98  # a quantized component must hold under 98 % of its bf16 bytes (buffers and rounding aside)


def bf16_bytes(folder: Path) -> int | None:
    """Bytes a component folder's weights take in bf16: the parameter counts in its safetensors headers x 2
    (read from the headers alone, whatever dtype the files hold); None without safetensors files."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    parameters = 0
    for path in files:
        with open(path, "rb") as handle:
            header = json.loads(handle.read(struct.unpack("<Q", handle.read(8))[0]))
        parameters += sum(math.prod(entry["shape"]) for key, entry in header.items() if key != "__metadata__")
    return 2 * parameters


def quantization_effect(measured: dict[str, int], bf16: dict[str, int | None]) -> tuple[bool | None, str]:
    """Did quantizing shrink every quantized component? (effective, note) from each one's measured tensor bytes
    and bf16 bytes; effective is None where a bf16 size is unknown."""
    parts, effective = [], True
    for name, measured_bytes in measured.items():
        reference = bf16.get(name)
        if not reference or measured_bytes <= 0:
            return None, f"{name}: its bf16 size is unknown (no safetensors headers) or nothing was measured"
        ratio = measured_bytes / reference
        parts.append(f"{name}: {measured_bytes} bytes, {ratio:.0%} of its {reference} bf16 bytes")
        effective = effective and ratio < EFFECTIVE_RATIO
    return effective, "; ".join(parts)
