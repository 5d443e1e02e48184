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
    parameters = sum(math.prod(entry["shape"]) for path in files for entry in safetensors_tensors(path).values())
    return 2 * parameters


MAX_HEADER_BYTES = 100_000_000


def safetensors_tensors(path: Path) -> dict[str, Any]:
    """A safetensors file's tensor table (names to dtype, shape and offsets) from its header alone, without
    loading any tensor; raises OSError, ValueError or struct.error on a file that is not one."""
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        if length > MAX_HEADER_BYTES:
            raise ValueError("header too large")
        header = json.loads(handle.read(length))
    header.pop("__metadata__", None)
    return header


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


VALUE_DEPENDENT_NOTE = (
    "This method's speed depends on the activations' values, not only on shapes (bitsandbytes LLM.int8 at a"
    " threshold > 0 multiplies the columns over the threshold apart, in fp16): with synthetic weights its latency"
    " is one sample, not the method's."
)
THROTTLED_NOTE = "NVML reported these clock-limiting reasons during the timed generations: latency may be lower"
SHARED_NOTE = (
    "other processes held a CUDA context on this cell's GPU during its timed generations: they may have taken GPU"
    " time (latency) and their work is in the energy counter"
)


def _is_true(value: Any) -> bool:
    return isinstance(value, bool | np.bool_) and bool(value)


def measurement_flags(cell: Any) -> list[dict[str, str]]:
    """Flags a cell's row shows beside its latency (text and hover title): value-dependent speed, limited clocks."""
    flags = []
    if _is_true(cell.get("value_dependent_latency")):
        fraction = cell.get("int8_outlier_column_fraction")
        held_back = (
            f" ({fraction:.2%} of activation columns held back)"
            if isinstance(fraction, float) and fraction == fraction
            else ""
        )
        flags.append({"text": f"speed depends on values{held_back}", "title": VALUE_DEPENDENT_NOTE})
    reasons = cell.get("gpu_throttle_reasons")
    if isinstance(reasons, str) and reasons != "none":
        flags.append({"text": f"clocks limited: {reasons}", "title": THROTTLED_NOTE})
    if _shared(cell.get("gpu_other_processes")):
        flags.append({"text": f"GPU shared with {int(cell['gpu_other_processes'])} process(es)", "title": SHARED_NOTE})
    return flags


def _shared(others: Any) -> bool:
    return isinstance(others, int | float | np.integer | np.floating) and others == others and others > 0


def measurement_footnotes(frame: Any, cell_ids: Any) -> list[str]:
    """Lines under a comparison of `cell_ids` (rows of `frame`): which have value-dependent speed or limited clocks."""
    rows = frame[frame["cell_id"].isin(set(cell_ids))].drop_duplicates("cell_id")
    notes = []
    if "value_dependent_latency" in rows and rows["value_dependent_latency"].map(_is_true).any():
        count = int(rows["value_dependent_latency"].map(_is_true).sum())
        notes.append(f"{count} compared cell(s) have value-dependent speed: {VALUE_DEPENDENT_NOTE}")
    if "gpu_throttle_reasons" in rows:
        limited = rows["gpu_throttle_reasons"].map(lambda r: isinstance(r, str) and r != "none")
        if limited.any():
            notes.append(f"{int(limited.sum())} compared cell(s) ran with limited clocks ({THROTTLED_NOTE.lower()})")
    if "gpu_other_processes" in rows and rows["gpu_other_processes"].map(_shared).any():
        notes.append(
            f"{int(rows['gpu_other_processes'].map(_shared).sum())} compared cell(s) ran on a shared GPU: {SHARED_NOTE}"
        )
    return notes
