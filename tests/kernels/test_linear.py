"""One quantized `nn.Linear` per method at FLUX.1-dev's shapes: forward latency (pytest-benchmark), weight
bytes, achieved TFLOP/s and GB/s, share of the measured device peaks, and output error against bf16.

The checks are about correctness (the layer really is quantized to its width, its output stays close to
bf16); the speed figures are recorded in the benchmark JSON, never asserted."""

from __future__ import annotations

import functools

import pytest

from bench.compilation import inductor_changes, inductor_settings, restore_inductor_settings
from bench.heartbeat import CompileCounts
from bench.kernels.layers import LAYER_METHODS, SHRINK, build_layer, reference_linear, relative_l2, weight_bytes
from bench.kernels.peaks import best_seconds, measure_peaks
from bench.methods.base import MethodUnavailable
from tests.kernels.conftest import device, peaks, shapes, token_counts

pytestmark = pytest.mark.kernels
ROUNDS = {"cuda": 30, "cpu": 5}
FIRST_SHAPE, FIRST_TOKENS = next(iter(shapes())), next(iter(token_counts()))
# Inductor's weight-only-int8 pattern rewrites `F.linear(x, w.to(bf16)) * scale`, torchao int8wo's forward, into
# `aten._weight_int8pack_mm` on CPU and CUDA; with its pattern matcher off the layer compiles to a plain matmul.
# The pair shows what that rewrite costs at FLUX's token counts.
WITHOUT_PATTERN_MATCHER = ("torchao_int8wo",)
MODES = {"eager": None, "compiled": {}, "compiled-no-pattern-matcher": {"pattern_matcher": False}}
CASES = [
    (method, mode)
    for method, spec in LAYER_METHODS.items()
    for mode, patch in MODES.items()
    if patch is None or (spec.compiles and (patch == {} or method in WITHOUT_PATTERN_MATCHER))
]


STOCK_INDUCTOR = inductor_settings()  # before any torchao quantize_ changes them


@functools.cache
def layers(method: str, shape: str):
    """The bf16 reference, the method's layer for `shape` (built once for all token counts), and the
    Inductor settings building it changed (torchao's configs apply torchao's recommended ones), which only
    this method's compiled cases get, as its users do."""
    in_features, out_features = shapes()[shape]
    reference = reference_linear(in_features, out_features, device())
    try:
        layer = build_layer(method, reference, device())
    except MethodUnavailable as unavailable:
        return reference, unavailable, {}
    finally:
        changed = inductor_changes(STOCK_INDUCTOR)
        restore_inductor_settings(STOCK_INDUCTOR)
    return reference, layer, changed


@pytest.mark.parametrize("tokens", list(token_counts()))
@pytest.mark.parametrize("shape", list(shapes()))
@pytest.mark.parametrize(("method", "mode"), CASES, ids=[f"{m}-{mode}" for m, mode in CASES])
def test_quantized_linear(benchmark, method, mode, shape, tokens):
    import torch

    compiled = MODES[mode] is not None
    if compiled and device() == "cpu" and (shape, tokens) != (FIRST_SHAPE, FIRST_TOKENS):
        pytest.skip("CPU suite: compiled layers run at one shape only (Inductor takes seconds per case on a CPU)")
    reference, layer, inductor = layers(method, shape)
    assert not inductor_changes(STOCK_INDUCTOR), "no method's Inductor settings leak into another's case"
    if isinstance(layer, MethodUnavailable):
        pytest.skip(f"{layer.status}: {layer.reason}")
    spec, in_features, out_features = LAYER_METHODS[method], reference.in_features, reference.out_features
    n_tokens = token_counts()[tokens]
    torch.manual_seed(0)
    x = torch.randn(n_tokens, in_features, device=device(), dtype=torch.bfloat16)
    forward = layer
    if compiled:
        torch._dynamo.reset()  # one fresh graph per case: no recompile limit, no eager fallback
        forward = torch.compile(layer)
    sync = torch.cuda.synchronize if device() == "cuda" else (lambda: None)

    def run():
        with torch.inference_mode():
            out = forward(x)
        sync()
        return out

    with torch.inference_mode():
        expected = reference(x)
    rewrites_before = CompileCounts.now().int8_weight_only_rewrites
    with torch._inductor.config.patch({**inductor, **(MODES[mode] or {})}):  # compiled at this first call
        output = run()
    woq_rewrites = CompileCounts.now().int8_weight_only_rewrites - rewrites_before
    error = relative_l2(output, expected)
    stored = weight_bytes(layer)

    assert output.shape == (n_tokens, out_features) and torch.isfinite(output).all()
    assert error <= spec.max_rel_l2, f"{method}: output error {error:.4f} > {spec.max_rel_l2}"
    bits = stored * 8 / (in_features * out_features)
    assert spec.bits <= bits <= spec.bits * 1.15, f"{method}: {bits:.2f} bits per weight stored, expected ~{spec.bits}"

    benchmark.group = f"{shape} x {tokens}"
    benchmark.pedantic(run, rounds=ROUNDS[device()], warmup_rounds=3, iterations=1)
    if benchmark.stats is None:  # --benchmark-disable: correctness checked, nothing timed
        return
    seconds = benchmark.stats.stats.median
    flops = 2 * n_tokens * in_features * out_features
    moved = stored + reference.bias.numel() * 2 + n_tokens * (in_features + out_features) * 2
    peak = peaks()
    benchmark.extra_info.update(
        method=method,
        family=spec.family,
        compiled=compiled,
        mode=mode,
        woq_rewrites=woq_rewrites if compiled else None,
        shape=shape,
        in_features=in_features,
        out_features=out_features,
        tokens=n_tokens,
        shape_set="flux" if device() == "cuda" else f"shrunken 1/{SHRINK} (CPU)",
        device=peak.device_name,
        weight_bytes=stored,
        bytes_moved=moved,
        flops=flops,
        tflops=flops / seconds / 1e12,
        gbps=moved / seconds / 1e9,
        share_of_peak_tflops=flops / seconds / 1e12 / peak.matmul_tflops,
        share_of_peak_bandwidth=moved / seconds / 1e9 / peak.bandwidth_gbps,
        rel_l2_vs_bf16=error,
        inductor_changes={**inductor, **MODES[mode]} if compiled else None,
        gguf_path=_gguf_path() if method.startswith("gguf") else None,
    )


def _gguf_path() -> str:
    """Which GGUF forward diffusers took: its fused CUDA kernels (from the `kernels` package) or dequantize
    + matmul."""
    from diffusers.quantizers.gguf import utils

    fused = utils.ops is not None and device() == "cuda"
    return "fused CUDA kernel" if fused else "dequantize + matmul (diffusers forward_native)"


def test_inductor_rewrites_torchao_int8wo_into_weight_int8pack_mm_unless_its_pattern_matcher_is_off():
    """Why the compiled int8wo layer has a case with the pattern matcher off: the rewrite is Inductor's, and
    that switch is what stops it (the same FX pattern matches CUDA tensors)."""
    import torch

    _, layer, inductor = layers("torchao_int8wo", FIRST_SHAPE)
    if isinstance(layer, MethodUnavailable):
        pytest.skip(f"{layer.status}: {layer.reason}")
    x = torch.randn(token_counts()[FIRST_TOKENS], layer.in_features, device=device(), dtype=torch.bfloat16)
    rewrites = {}
    for mode in ("compiled", "compiled-no-pattern-matcher"):
        torch._dynamo.reset()
        before = CompileCounts.now().int8_weight_only_rewrites
        with torch.inference_mode(), torch._inductor.config.patch({**inductor, **MODES[mode]}):
            torch.compile(layer)(x)
        rewrites[mode] = CompileCounts.now().int8_weight_only_rewrites - before
    assert rewrites == {"compiled": 1, "compiled-no-pattern-matcher": 0}


def test_measured_peaks_are_plausible():
    """The peaks the roofline uses are real peaks: a half-size matmul is not much faster than the peak rate."""
    import torch

    measured = peaks()
    assert measured.matmul_tflops > 0 and measured.bandwidth_gbps > 0
    n = measured.matmul_size // 2
    a = torch.randn(n, n, device=device(), dtype=torch.bfloat16)
    # Measured in turns, the best of each: another process's load (CI's other worker) then slows both alike,
    # where the session's cached peak may have been measured under another load (CI once saw x1.9).
    rounds = [(measure_peaks(device()).matmul_tflops, 2 * n**3 / best_seconds(lambda: torch.mm(a, a), device()) / 1e12)
              for _ in range(3)]  # fmt: skip
    peak, again = max(full for full, _ in rounds), max(half for _, half in rounds)
    # On a CPU the half-size matmul fits the core's own cache while the full one shares the last level with CI's
    # other worker: there it ran 1.5-2.1x the full size's rate (CI); a mismeasured peak is off by far more.
    headroom = 1.5 if device() == "cuda" else 2.5
    assert again <= peak * headroom, rounds
