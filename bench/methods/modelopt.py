"""NVIDIA Model Optimizer through diffusers' `NVIDIAModelOptConfig`, quantizing while loading.

`quant_type` is diffusers' `<weights>` (weight-only) or `<weights>_<activations>` (activations quantized too),
each of FP8, INT8, INT4, NF4, NVFP4. NVFP4 needs Blackwell's FP4 tensor cores: `skipped` below compute
capability 10.0. diffusers 0.42.1 matches nvidia-modelopt up to 0.37.0; newer releases are `unsupported`, with the
error they give: 0.44 turned `mtq.config._default_disabled_quantizer_cfg`, which diffusers spreads as a dict, into a
list (`TypeError: 'list' object is not a mapping` in `from_pretrained`), and 0.39 stopped `mtq.compress` from
compressing the module it is given, which diffusers calls on each linear layer (the weights stay unquantized and
the first forward fails in `F.linear` on an `FP8QTensor`). INT4, NF4 and NVFP4 weights are real-quantized only in
blocks, and diffusers 0.42.1's block configuration breaks modelopt 0.37: `unsupported` too, with both errors. Each
row's `method_notes` count the quantized linear classes and how their weights are stored.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from typing import Any, ClassVar

from packaging.version import Version
from pydantic import field_validator

from bench.methods.base import Component, Method, MethodOptions, MethodUnavailable, method_notes, needs_cuda

NUMERIC_TYPES = ("FP8", "INT8", "INT4", "NF4", "NVFP4")  # NVIDIAModelOptConfig.quanttype_to_numbits
FIRST_LIST_CONFIG = Version("0.44.0")  # the modelopt release whose _default_disabled_quantizer_cfg is a list
FIRST_SUBMODULE_COMPRESS = Version("0.39.0")  # the modelopt release whose compress skips the module it is given
LAST_CHECKED_DIFFUSERS = Version("0.42.1")  # the newest diffusers these rules were checked against
BLOCK_ONLY = ("INT4", "NF4", "NVFP4")  # weights modelopt real-quantizes only in blocks
IMPORTED_REQUIREMENTS = ("torchprofile", "pulp")  # modelopt.torch imports these (nas/utils.py, opt/searcher.py)


def missing_imports() -> list[str]:
    """The packages `import modelopt.torch.quantization` needs that are not installed."""
    return [name for name in IMPORTED_REQUIREMENTS if importlib.util.find_spec(name) is None]


class ModelOptOptions(MethodOptions):
    quant_type: str
    channel_quantize: int | None = None
    block_quantize: int | None = None
    scale_channel_quantize: int | None = None
    scale_block_quantize: int | None = None
    disable_conv_quantization: bool = False
    modules_to_not_convert: list[str] | None = None

    @field_validator("quant_type")
    @classmethod
    def _weights_and_activations(cls, value: str) -> str:
        parts = value.split("_")
        if len(parts) > 2 or any(part not in NUMERIC_TYPES for part in parts):
            raise ValueError(f"<weights> or <weights>_<activations>, each one of {', '.join(NUMERIC_TYPES)}")
        return value

    @property
    def weight_only(self) -> bool:
        return "_" not in self.quant_type


class ModelOpt(Method):
    name: ClassVar[str] = "modelopt"
    family: ClassVar[str] = "modelopt"
    Options: ClassVar[type[MethodOptions]] = ModelOptOptions
    only_components: ClassVar[tuple[str, ...] | None] = ("transformer",)
    options: ModelOptOptions

    def check(self, cell, machine) -> None:
        try:
            modelopt = Version(importlib.metadata.version("nvidia-modelopt"))
        except importlib.metadata.PackageNotFoundError:
            raise MethodUnavailable("unsupported", "modelopt needs the `nvidia-modelopt` package") from None
        diffusers = Version(importlib.metadata.version("diffusers"))
        if modelopt >= FIRST_LIST_CONFIG and diffusers <= LAST_CHECKED_DIFFUSERS:
            raise MethodUnavailable(
                "unsupported",
                f"diffusers {diffusers}'s NVIDIAModelOptConfig spreads modelopt's _default_disabled_quantizer_cfg as "
                f"a dict, a list since nvidia-modelopt {FIRST_LIST_CONFIG} (installed: {modelopt}): every type fails "
                "in from_pretrained with `TypeError: 'list' object is not a mapping`; nvidia-modelopt 0.37.0 matches",
            )
        if modelopt >= FIRST_SUBMODULE_COMPRESS and diffusers <= LAST_CHECKED_DIFFUSERS:
            raise MethodUnavailable(
                "unsupported",
                f"diffusers {diffusers} compresses each linear layer with mtq.compress(layer), which since "
                f"nvidia-modelopt {FIRST_SUBMODULE_COMPRESS} (installed: {modelopt}) compresses only a module's "
                "submodules: the weights stay unquantized and the first forward fails with `TypeError: linear(): "
                "argument 'weight' (position 2) must be Tensor, not FP8QTensor`; nvidia-modelopt 0.37.0 matches",
            )
        if missing := missing_imports():
            raise MethodUnavailable(
                "unsupported",
                f"nvidia-modelopt {modelopt} imports {', '.join(f'`{name}`' for name in missing)}, not installed "
                "(its own requirements; `pip install -e '.[backends]'` installs them)",
            )
        if "NVFP4" in self.options.quant_type:
            needs_cuda(machine, "modelopt NVFP4 (FP4 tensor cores, Blackwell)", min_capability=(10, 0))
        weights = self.options.quant_type.split("_")[0]
        if weights in BLOCK_ONLY and diffusers <= LAST_CHECKED_DIFFUSERS:
            if self.options.block_quantize is None:
                raise MethodUnavailable(
                    "unsupported",
                    f"modelopt real-quantizes {weights} weights only in blocks (block_quantize, channel_quantize); "
                    "without them: `AssertionError: Real quantization not supported for this format.`",
                )
            raise MethodUnavailable(
                "unsupported",
                f"diffusers {diffusers}'s NVIDIAModelOptConfig adds 'type': 'dynamic' to the block sizes, which "
                "modelopt compares as numbers: `TypeError: '<' not supported between instances of 'str' and 'int'`",
            )

    def quantization_config(self, component: Component, cell) -> Any:
        from diffusers import NVIDIAModelOptConfig

        options = self.options
        return NVIDIAModelOptConfig(
            quant_type=options.quant_type,
            weight_only=options.weight_only,
            channel_quantize=options.channel_quantize,
            block_quantize=options.block_quantize,
            scale_channel_quantize=options.scale_channel_quantize,
            scale_block_quantize=options.scale_block_quantize,
            disable_conv_quantization=options.disable_conv_quantization,
            modules_to_not_convert=list(options.modules_to_not_convert or []),  # diffusers extends it in place
        )

    def after_load(self, pipe: Any, cell) -> dict[str, Any]:
        from collections import Counter

        linears = Counter()
        for module in pipe.transformer.modules():
            if hasattr(module, "weight_quantizer"):
                linears[f"{type(module).__name__} ({type(module.weight).__name__} {module.weight.dtype})"] += 1
        return method_notes(
            modelopt_linears=dict(sorted(linears.items())),
            modelopt_version=importlib.metadata.version("nvidia-modelopt"),
        )
