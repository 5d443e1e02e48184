"""The device's measured peaks, in the same run as the layer benchmarks: dense bf16 matmul rate and memory
bandwidth (a device-to-device copy). Rooflines and "share of peak" are against these, not datasheets."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Peaks:
    device_name: str
    matmul_tflops: float
    bandwidth_gbps: float
    matmul_size: int
    copy_bytes: int

    def as_dict(self) -> dict[str, float | int | str]:
        return asdict(self)


def best_seconds(function, device: str, repeats: int = 10) -> float:
    """The fastest of `repeats` timed calls of `function` after one warm-up, CUDA-synchronized."""
    import time

    import torch

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    function()
    sync()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def measure_peaks(device: str) -> Peaks:
    """Best-of-10 bf16 matmul TFLOP/s (8192^3 on a GPU, 512^3 on a CPU: a 1024^3 bf16 matmul takes seconds on a
    CPU without bf16 instructions) and copy GB/s (read + write of 1 GiB on a GPU, 128 MiB on a CPU)."""
    import torch

    from bench.environment import cpu_name

    cuda = device == "cuda"
    n = 8192 if cuda else 512
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    matmul_s = best_seconds(lambda: torch.mm(a, b), device)
    copy_bytes = (1 << 30) if cuda else (128 << 20)
    source = torch.empty(copy_bytes, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    copy_s = best_seconds(lambda: target.copy_(source), device)
    name = torch.cuda.get_device_name() if cuda else cpu_name()
    return Peaks(name, 2 * n**3 / matmul_s / 1e12, 2 * copy_bytes / copy_s / 1e9, n, copy_bytes)
