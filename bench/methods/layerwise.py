"""FP8 storage with on-the-fly upcasting: diffusers' `enable_layerwise_casting`, as in the diffusers
quantization blog's comparison. Weights are stored in float8 and computed in the cell's dtype."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from bench.methods.base import Component, Method, MethodOptions, MethodUnavailable, QuantizedOptions


class LayerwiseOptions(QuantizedOptions):
    storage_dtype: Literal["float8_e4m3fn", "float8_e5m2"] = "float8_e4m3fn"
    skip_modules_pattern: list[str] | None = None


class LayerwiseCasting(Method):
    name: ClassVar[str] = "layerwise_fp8"
    family: ClassVar[str] = "layerwise"
    Options: ClassVar[type[MethodOptions]] = LayerwiseOptions
    options: LayerwiseOptions

    def load_component(self, component: Component, cell) -> Any:
        import torch

        if component.is_transformers_model:
            raise MethodUnavailable(
                "unsupported",
                f"layerwise casting is a diffusers model feature; {component.name} is a transformers model",
            )
        model = component.load(cell)
        pattern = (
            {"skip_modules_pattern": tuple(self.options.skip_modules_pattern)}
            if self.options.skip_modules_pattern
            else {}
        )
        model.enable_layerwise_casting(
            storage_dtype=getattr(torch, self.options.storage_dtype), compute_dtype=cell.torch_dtype, **pattern
        )
        return model
