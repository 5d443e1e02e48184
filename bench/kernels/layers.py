"""One `nn.Linear` of FLUX.1-dev, quantized by each method the way diffusers quantizes it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bench.methods.base import MethodUnavailable

# (in_features, out_features) of FLUX.1-dev's linear layers, and the token counts of its images:
# image tokens + 512 text tokens for 1024x1024 (4096) and 512x512 (1024).
FLUX_SHAPES = {
    "attn 3072->3072": (3072, 3072),
    "fused qkv 3072->9216": (3072, 9216),
    "mlp up 3072->12288": (3072, 12288),
    "mlp down 12288->3072": (12288, 3072),
    "single proj_out 15360->3072": (15360, 3072),
    "context_embedder 4096->3072": (4096, 3072),
}
FLUX_TOKENS = {"1024px": 4096 + 512, "512px": 1024 + 512}
SHRINK = 16  # the CPU suite divides every width and token count by this


@dataclass(frozen=True)
class LayerMethod:
    """How to turn a bf16 `nn.Linear` into a method's layer; `bits` is the stored width of a weight."""

    family: str
    bits: float
    compiles: bool
    build: Callable[[Any, str], Any]
    max_rel_l2: float  # a layer with more output error than this is broken, not just lossy


def _bnb_int8(linear: Any, device: str) -> Any:
    import bitsandbytes as bnb

    layer = bnb.nn.Linear8bitLt(
        linear.in_features, linear.out_features, bias=True, has_fp16_weights=False, threshold=6.0
    )
    layer.weight = bnb.nn.Int8Params(linear.weight.data.cpu().clone(), requires_grad=False, has_fp16_weights=False)
    layer.bias = linear.bias
    return layer.to(device)


def _bnb_4bit(quant_type: str) -> Callable[[Any, str], Any]:
    def build(linear: Any, device: str) -> Any:
        import bitsandbytes as bnb
        import torch

        layer = bnb.nn.Linear4bit(
            linear.in_features, linear.out_features, bias=True, compute_dtype=torch.bfloat16, quant_type=quant_type
        )
        layer.weight = bnb.nn.Params4bit(linear.weight.data.cpu().clone(), requires_grad=False, quant_type=quant_type)
        layer.bias = linear.bias
        return layer.to(device)

    return build


def _gguf(quant_type: str) -> Callable[[Any, str], Any]:
    def build(linear: Any, device: str) -> Any:
        import gguf
        import torch
        from diffusers.quantizers.gguf.utils import GGUFLinear, GGUFParameter

        qtype = gguf.GGMLQuantizationType[quant_type]
        blocks = gguf.quants.quantize(linear.weight.detach().float().cpu().numpy(), qtype)
        layer = GGUFLinear(linear.in_features, linear.out_features, bias=True, compute_dtype=torch.bfloat16)
        layer.weight = GGUFParameter(torch.from_numpy(blocks), quant_type=qtype)
        layer.bias = linear.bias
        return layer.to(device)

    return build


def _torchao(quant_type: str) -> Callable[[Any, str], Any]:
    def build(linear: Any, device: str) -> Any:
        import copy

        from torchao.quantization import quantize_

        from bench.methods.torchao import TorchAoOptions, build_torchao_config

        layer = copy.deepcopy(linear)
        quantize_(layer, build_torchao_config(TorchAoOptions(quant_type=quant_type)))
        return layer

    return build


def _bf16(linear: Any, device: str) -> Any:
    return linear


LAYER_METHODS: dict[str, LayerMethod] = {
    "bf16": LayerMethod("baseline", 16, True, _bf16, 0.0),
    "bnb_int8": LayerMethod("bitsandbytes", 8, False, _bnb_int8, 0.05),
    "bnb_nf4": LayerMethod("bitsandbytes", 4, False, _bnb_4bit("nf4"), 0.2),
    "bnb_fp4": LayerMethod("bitsandbytes", 4, False, _bnb_4bit("fp4"), 0.25),
    "gguf_Q8_0": LayerMethod("gguf", 8.5, False, _gguf("Q8_0"), 0.02),
    "gguf_Q4_0": LayerMethod("gguf", 4.5, False, _gguf("Q4_0"), 0.2),
    "torchao_int8wo": LayerMethod("torchao", 8, True, _torchao("int8wo"), 0.02),
    "torchao_int8dq": LayerMethod("torchao", 8, True, _torchao("int8dq"), 0.05),
    "torchao_int4wo": LayerMethod("torchao", 4, True, _torchao("int4wo"), 0.2),
    "torchao_float8wo": LayerMethod("torchao", 8, True, _torchao("float8wo"), 0.1),
    "torchao_float8dq": LayerMethod("torchao", 8, True, _torchao("float8dq"), 0.1),
}


def reference_linear(in_features: int, out_features: int, device: str, seed: int = 0) -> Any:
    """A bf16 `nn.Linear` with weights of the scale a trained layer has (std 1/sqrt(in)), from `seed`."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    linear = torch.nn.Linear(in_features, out_features, bias=True)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(out_features, in_features, generator=generator) / in_features**0.5)
        linear.bias.copy_(torch.randn(out_features, generator=generator) * 0.01)
    return linear.to(device=device, dtype=torch.bfloat16).eval()


def build_layer(method: str, linear: Any, device: str) -> Any:
    """`linear` quantized by `method`; MethodUnavailable (with the reason) where this machine cannot."""
    try:
        return LAYER_METHODS[method].build(linear, device)
    except MethodUnavailable:
        raise
    except (ImportError, NotImplementedError, RuntimeError, AssertionError, ValueError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise MethodUnavailable("unsupported", f"{method} on {device}: {type(error).__name__}: {first}") from error


def weight_bytes(layer: Any) -> int:
    """Bytes the layer stores for its weight, with the quantization state (scales, absmax) bitsandbytes keeps
    outside its parameters; the bias is not counted."""
    from bench.measure import tensor_bytes

    total = tensor_bytes(layer) - layer.bias.numel() * layer.bias.element_size()
    weight = layer.weight
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is not None:
        total += sum(
            t.numel() * t.element_size() for t in quant_state.as_dict(packed=True).values() if hasattr(t, "numel")
        )
    scb = getattr(weight, "SCB", None)
    if scb is not None:
        total += scb.numel() * scb.element_size()
    return total


def relative_l2(output: Any, reference: Any) -> float:
    """||output - reference|| / ||reference||, in float32."""
    output, reference = output.float(), reference.float()
    return float((output - reference).norm() / reference.norm())
