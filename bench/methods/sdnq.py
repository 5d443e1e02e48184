"""SDNQ (SD.Next's quantization engine) through diffusers' `SDNQConfig`: int, uint and float weight dtypes, with
or without its quantized matmul (int8 / fp8 GEMMs instead of dequantizing the weight in each forward).

transformers registers no SDNQ quantizer, so only the diffusers denoiser is quantized. SDNQ skips layers with
fewer than `minimum_allowed_numel` weights (16,384 by default), which is every layer of the tiny models: their
matrices set it to 0. Each row's `method_notes` name the forward functions SDNQ chose (its matmul or dequantize).
`quantization_device = "cuda"` quantizes each layer on the GPU as it loads (SDNQ's own option), instead of on the CPU.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
from typing import Any, ClassVar, Literal

from pydantic import field_validator

from bench.methods.base import Component, Method, MethodOptions, MethodUnavailable, method_notes, needs_cuda

# sdnq's naming: intN / uintN, floatN_eAmB with `fn` (finite) or `fnu` (unsigned finite), and the bare float8s.
_WEIGHT_DTYPE = re.compile(r"u?int([1-9]|1[0-6])|float\d+_e\d+m\d+(fn|fnu)?|float8_e5m2|float8_e4m3fn")
MATMUL_DTYPES = ("int8", "uint8", "fp8", "fp16", "float8_e4m3fn", "float16")


class SdnqOptions(MethodOptions):
    weights_dtype: str
    use_quantized_matmul: bool = False
    quantized_matmul_dtype: Literal[MATMUL_DTYPES] | None = None  # type: ignore[valid-type]
    group_size: int | None = None  # None: SDNQ's choice for the dtype; -1: per row
    minimum_allowed_numel: int | None = None  # None: SDNQ's default (16,384); 0 quantizes every linear layer
    modules_to_not_convert: list[str] | None = None
    quantization_device: Literal["cpu", "cuda"] | None = None

    @field_validator("weights_dtype")
    @classmethod
    def _sdnq_dtype_name(cls, value: str) -> str:
        if not _WEIGHT_DTYPE.fullmatch(value):
            raise ValueError(
                "an SDNQ weight dtype: int1..int16, uint1..uint16, or floatN_eAmB[fn|fnu], e.g. float8_e4m3fn"
            )
        return value


class Sdnq(Method):
    name: ClassVar[str] = "sdnq"
    family: ClassVar[str] = "sdnq"
    Options: ClassVar[type[MethodOptions]] = SdnqOptions
    only_components: ClassVar[tuple[str, ...] | None] = ("transformer",)
    options: SdnqOptions

    def check(self, cell, machine) -> None:
        if importlib.util.find_spec("sdnq") is None:
            raise MethodUnavailable("unsupported", "sdnq needs the `sdnq` package")
        from sdnq.common import accepted_weight_dtypes

        if self.options.weights_dtype not in accepted_weight_dtypes:
            raise MethodUnavailable(
                "unsupported", f"the installed sdnq does not accept weights_dtype {self.options.weights_dtype!r}"
            )
        if self.options.quantization_device == "cuda":
            needs_cuda(machine, "sdnq quantization_device = 'cuda'")

    def quantization_config(self, component: Component, cell) -> Any:
        from diffusers import SDNQConfig

        chosen = {
            key: getattr(self.options, key)
            for key in (
                "quantized_matmul_dtype",
                "group_size",
                "minimum_allowed_numel",
                "modules_to_not_convert",
                "quantization_device",
            )
            if getattr(self.options, key) is not None
        }
        return SDNQConfig(
            weights_dtype=self.options.weights_dtype, use_quantized_matmul=self.options.use_quantized_matmul, **chosen
        )

    def after_load(self, pipe: Any, cell) -> dict[str, Any]:
        from collections import Counter

        forwards = Counter(
            getattr(module.forward_func, "__name__", type(module.forward_func).__name__)
            for name in cell.components or ()
            for module in getattr(pipe, name).modules()
            if hasattr(module, "sdnq_dequantizer")
        )
        return method_notes(
            sdnq_forward_functions=dict(sorted(forwards.items())), sdnq_version=importlib.metadata.version("sdnq")
        )
