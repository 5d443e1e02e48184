"""One attention call per diffusers attention backend at FLUX.1-dev's head shapes (24 heads of 128, 4,096 image
+ 512 text tokens; on a CPU the tokens divided by 16): forward latency (pytest-benchmark), achieved TFLOP/s, and
output error against torch's math kernel in float32. A backend this machine cannot run is skipped with the
reason the matrix's capability check gives."""

from __future__ import annotations

import pytest

from bench.attention import check_attention
from bench.environment import detect_machine
from bench.errors import MethodUnavailable
from bench.kernels.layers import FLUX_TOKENS, SHRINK
from tests.kernels.conftest import device

pytestmark = pytest.mark.kernels
HEADS, HEAD_DIM = 24, 128
ROUNDS = {"cuda": 30, "cpu": 5}
# backend, compiled; flex is timed compiled (uncompiled it is PyTorch's unfused reference path)
CASES = [
    ("native", False),
    ("_native_cudnn", False),
    ("_native_flash", False),
    ("_native_efficient", False),
    ("_native_math", False),
    ("flex", True),
    ("flash", False),
    ("_flash_3", False),
    ("sage", False),
    ("_sage_qk_int8_pv_fp8_cuda_sm90", False),
    ("xformers", False),
]
MAX_REL_L2 = {"sage": 0.05, "_sage_qk_int8_pv_fp8_cuda_sm90": 0.08}  # INT8 Q·K (and FP8 P·V); else bf16's rounding


def tokens() -> int:
    total = FLUX_TOKENS["1024px"]
    return total if device() == "cuda" else total // SHRINK


@pytest.mark.parametrize(("backend", "compiled"), CASES, ids=[f"{b}{'-compiled' if c else ''}" for b, c in CASES])
def test_attention_backend(benchmark, backend, compiled):
    import torch
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    try:
        check_attention(backend, "bf16", detect_machine())
    except MethodUnavailable as unavailable:
        pytest.skip(f"{unavailable.status}: {unavailable.reason}")
    if compiled and device() == "cpu":
        pytest.skip("CPU suite: compiled attention runs on CUDA only (Inductor takes minutes for flex on a CPU)")
    n = tokens()
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, n, HEADS, HEAD_DIM, device=device(), dtype=torch.bfloat16) for _ in range(3))

    def attention(q, k, v):
        return dispatch_attention_fn(q, k, v, backend=backend)

    forward = torch.compile(attention) if compiled else attention
    sync = torch.cuda.synchronize if device() == "cuda" else (lambda: None)

    def run():
        with torch.inference_mode():
            out = forward(q, k, v)
        sync()
        return out

    output = run()
    with torch.inference_mode():
        expected = dispatch_attention_fn(q.float(), k.float(), v.float(), backend="_native_math")
    error = float((output.float() - expected).norm() / expected.norm())
    assert output.shape == (1, n, HEADS, HEAD_DIM) and torch.isfinite(output).all()
    assert error <= MAX_REL_L2.get(backend, 0.02), f"{backend}: output error {error:.4f}"

    benchmark.group = f"attention {HEADS}x{HEAD_DIM} x {n} tokens"
    benchmark.pedantic(run, rounds=ROUNDS[device()], warmup_rounds=3, iterations=1)
    if benchmark.stats is None:  # --benchmark-disable: correctness checked, nothing timed
        return
    seconds = benchmark.stats.stats.median
    flops = 4 * n * n * HEADS * HEAD_DIM  # Q·Kᵀ and P·V
    benchmark.extra_info.update(
        backend=backend,
        compiled=compiled,
        tokens=n,
        heads=HEADS,
        head_dim=HEAD_DIM,
        shape_set="flux" if device() == "cuda" else f"shrunken 1/{SHRINK} tokens (CPU)",
        flops=flops,
        tflops=flops / seconds / 1e12,
        rel_l2_vs_fp32_math=error,
    )
