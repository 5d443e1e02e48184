"""The layer benchmarks' device, shapes and measured peaks. On a CUDA machine: FLUX.1-dev's real shapes;
on a CPU: every width and token count divided by 16 (marked `shrunken`, named `cpu-shrunk-...`)."""

from __future__ import annotations

import functools

import pytest

from bench.kernels.layers import FLUX_SHAPES, FLUX_TOKENS, SHRINK
from bench.kernels.peaks import Peaks, measure_peaks


@functools.cache
def device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def shapes() -> dict[str, tuple[int, int]]:
    if device() == "cuda":
        return FLUX_SHAPES
    return {f"cpu-shrunk {name}": (i // SHRINK, o // SHRINK) for name, (i, o) in FLUX_SHAPES.items()}


def token_counts() -> dict[str, int]:
    if device() == "cuda":
        return FLUX_TOKENS
    return {f"cpu-shrunk {name}": tokens // SHRINK for name, tokens in FLUX_TOKENS.items()}


@functools.cache
def peaks() -> Peaks:
    return measure_peaks(device())


def pytest_collection_modifyitems(config, items):
    if device() == "cpu":
        for item in items:
            if "tests/kernels" in str(item.fspath):
                item.add_marker(pytest.mark.shrunken)


def pytest_benchmark_update_machine_info(config, machine_info):
    """The measured peaks go into the JSON beside pytest-benchmark's own machine facts."""
    machine_info["quantbench_peaks"] = peaks().as_dict()
