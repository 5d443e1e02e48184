"""bitsandbytes LLM.int8 (`bnb_8bit`) and 4-bit NF4/FP4 (`bnb_4bit`), as in the diffusers quantization guide.

The transformer gets diffusers' `BitsAndBytesConfig`, transformers models (the T5 encoder) transformers'
own. Options: `dequantize` (quantize, then `.dequantize()` before generating) and `prequantized` (save the
quantized component once with `save_pretrained`, then time loading it back without a quantization config).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Literal

from pydantic import model_validator

from bench.cache import build_once, cache_dir, versions_key
from bench.methods.base import Component, ConfigOptions, Method, MethodOptions, needs_cuda


class BitsAndBytesOptions(ConfigOptions):
    llm_int8_skip_modules: list[str] | None = None
    dequantize: bool = False
    prequantized: bool = False

    @model_validator(mode="after")
    def _prequantized_loads_without_a_config(self) -> BitsAndBytesOptions:
        if self.pipeline_config and self.prequantized:
            raise ValueError("pipeline_config and prequantized exclude each other: a saved checkpoint needs no config")
        return self


class FourBitOptions(BitsAndBytesOptions):
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = "nf4"
    bnb_4bit_use_double_quant: bool = False
    bnb_4bit_compute_dtype: Literal["bf16", "fp16", "fp32"] | None = None


class _BitsAndBytes(Method):
    family: ClassVar[str] = "bitsandbytes"
    options: BitsAndBytesOptions

    def check(self, cell, machine) -> None:
        # diffusers refuses without one: "No GPU found. A GPU is needed for quantization."
        needs_cuda(machine, f"bitsandbytes ({self.name})")

    def config(self, cell) -> dict[str, Any]:
        raise NotImplementedError

    def config_kwargs(self, cell) -> dict[str, Any]:
        """The `BitsAndBytesConfig` arguments for `cell` (the same for diffusers' and transformers' class)."""
        config = self.config(cell)
        if self.options.llm_int8_skip_modules:
            config["llm_int8_skip_modules"] = self.options.llm_int8_skip_modules
        return config

    def quantization_config(self, component: Component, cell) -> Any:
        return component.config_class("BitsAndBytesConfig")(**self.config_kwargs(cell))

    def prepare_component(self, component: Component, cell) -> Component:
        if not self.options.prequantized:
            return component

        def save_quantized(folder) -> None:
            quantized = component.load(cell, quantization_config=self.quantization_config(component, cell))
            quantized.save_pretrained(folder / component.name)

        from bench.environment import MODEL_LIBRARIES, library_versions

        # the cell id holds the model (a local folder's fingerprint included); the folder and the versions the rest
        key = versions_key({**library_versions(*MODEL_LIBRARIES, "bitsandbytes"), "folder": str(component.folder)})
        saved = build_once(cache_dir("prequantized") / f"{cell.id}-{component.name}-{key}", save_quantized)
        return dataclasses.replace(component, folder=saved)

    def load_component(self, component: Component, cell) -> Any:
        if self.options.prequantized:  # the saved checkpoint carries its quantization config, as the guide shows
            return component.load(cell)
        return super().load_component(component, cell)

    def after_load(self, pipe: Any, cell) -> dict[str, Any]:
        if not self.options.dequantize:
            return {}
        import torch

        for name in cell.components or ():
            getattr(pipe, name).dequantize()
        torch.cuda.empty_cache()
        return {"dequantized_reserved_bytes": torch.cuda.memory_reserved()}


class EightBit(_BitsAndBytes):
    name: ClassVar[str] = "bnb_8bit"
    Options: ClassVar[type[MethodOptions]] = BitsAndBytesOptions
    uses_threshold: ClassVar[bool] = True

    def config(self, cell) -> dict[str, Any]:
        return {"load_in_8bit": True, "llm_int8_threshold": cell.threshold}

    def value_dependent_latency(self, cell) -> bool:
        # LLM.int8 at a threshold > 0 (bitsandbytes 0.50, backends/cuda/ops.py `int8_vectorwise_quant`): the
        # activation columns where any |x| >= threshold (after the cast to fp16) are held back as `outlier_cols`
        # and multiplied apart in fp16 (autograd/_functions.py, MatMul8bitLt.forward: `int8_mixed_scaled_mm`),
        # so the work grows with how many columns the values push over the threshold.
        return bool(cell.threshold) and not self.options.dequantize

    def value_dependence(self, pipe: Any, cell, generate) -> dict[str, Any]:
        """The fraction of activation columns that took the outlier path, over every call of every int8 linear
        of the quantized components in one untimed generation (forward pre-hooks, counted on the device)."""
        import bitsandbytes as bnb
        import torch

        threshold = cell.threshold
        totals: dict[str, Any] = {"outliers": 0, "columns": 0}

        def count(module: Any, inputs: tuple[Any, ...]) -> None:
            x = inputs[0]
            columns = x.shape[-1]
            held_back = (x.reshape(-1, columns).to(torch.float16).abs() >= threshold).any(dim=0).sum()
            totals["outliers"] = totals["outliers"] + held_back  # a device tensor: no synchronisation per call
            totals["columns"] += columns

        linears = [
            module
            for name in cell.components or ()
            for module in getattr(pipe, name).modules()
            if isinstance(module, bnb.nn.Linear8bitLt)
        ]
        hooks = [linear.register_forward_pre_hook(count) for linear in linears]
        try:
            generate()
        finally:
            for hook in hooks:
                hook.remove()
        if not totals["columns"]:
            return {}
        return {"int8_outlier_column_fraction": float(totals["outliers"]) / totals["columns"]}


class FourBit(_BitsAndBytes):
    name: ClassVar[str] = "bnb_4bit"
    Options: ClassVar[type[MethodOptions]] = FourBitOptions
    options: FourBitOptions

    def config(self, cell) -> dict[str, Any]:
        from bench.cells import torch_dtype

        compute = self.options.bnb_4bit_compute_dtype or cell.dtype
        return {
            "load_in_4bit": True,
            "bnb_4bit_quant_type": self.options.bnb_4bit_quant_type,
            "bnb_4bit_use_double_quant": self.options.bnb_4bit_use_double_quant,
            "bnb_4bit_compute_dtype": torch_dtype(compute),
        }
