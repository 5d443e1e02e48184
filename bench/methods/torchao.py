"""torchao through diffusers' `TorchAoConfig`, keyed by the shorthands of the diffusers quantization guide.

Current diffusers only takes torchao config objects, so each shorthand maps to the config class of the
installed torchao. A shorthand the installed torchao no longer provides is `unsupported`, with the reason.
"""

from __future__ import annotations

import importlib.util
import re
from typing import Any, ClassVar

from pydantic import Field, field_validator

from bench.methods.base import Component, ConfigOptions, Method, MethodOptions, MethodUnavailable, needs_cuda

_FPX = re.compile(r"fp(\d+)_e(\d+)m(\d+)")
_UINTX = re.compile(r"uint([1-7])wo")
_INTX = re.compile(r"int([1-8])wo_intx")

# The guide's table, plus `intNwo_intx` (torchao's IntxWeightOnlyConfig, which has CPU kernels).
NAMED_TYPES = (
    "int4wo", "int4dq", "int8wo", "int8dq",
    "float8wo", "float8wo_e5m2", "float8wo_e4m3",
    "float8dq", "float8dq_e4m3", "float8_e4m3_tensor", "float8_e4m3_row",
    "autoquant",
)  # fmt: skip
PATTERN_TYPES = ("fpX_eAwB (X == A + B + 1)", "uint1wo ... uint7wo", "int1wo_intx ... int8wo_intx")
FLOAT8_DYNAMIC = ("float8dq", "float8dq_e4m3", "float8_e4m3_tensor", "float8_e4m3_row")


class TorchAoOptions(ConfigOptions):
    quant_type: str = Field(
        description="The quantization type (see the method's page for what each maps to): "
        + ", ".join(f"`{name}`" for name in NAMED_TYPES + PATTERN_TYPES)
        + "; one the installed torchao lacks is `unsupported`."
    )
    group_size: int | None = None
    modules_to_not_convert: list[str] | None = None

    @field_validator("quant_type")
    @classmethod
    def _known_quant_type(cls, value: str) -> str:
        if value in NAMED_TYPES or _UINTX.fullmatch(value) or _INTX.fullmatch(value):
            return value
        if match := _FPX.fullmatch(value):
            bits, exponent, mantissa = map(int, match.groups())
            if bits != exponent + mantissa + 1:
                raise ValueError(f"{value}: X must equal A + B + 1 (sign + exponent + mantissa bits)")
            return value
        raise ValueError(f"unknown torchao quant_type; allowed: {', '.join(NAMED_TYPES + PATTERN_TYPES)}")

    @field_validator("group_size")
    @classmethod
    def _positive_group(cls, value: int | None) -> int | None:
        if value is not None and value <= 0:
            raise ValueError("group_size must be a positive integer")
        return value


def _missing(what: str) -> MethodUnavailable:
    import torchao

    return MethodUnavailable("unsupported", f"{what} is not provided by the installed torchao {torchao.__version__}")


def _float8_dtype(name: str) -> Any:
    import torch

    return torch.float8_e5m2 if name.endswith("e5m2") else torch.float8_e4m3fn


def build_torchao_config(options: TorchAoOptions) -> Any:
    """The torchao config object for `options.quant_type`; MethodUnavailable if this torchao lacks it."""
    import torch
    import torchao.quantization as tq

    quant_type = options.quant_type
    group = {"group_size": options.group_size} if options.group_size else {}
    if quant_type == "int8wo":
        return tq.Int8WeightOnlyConfig(**group)
    if quant_type == "int8dq":
        return tq.Int8DynamicActivationInt8WeightConfig()
    if quant_type == "int4wo":
        if importlib.util.find_spec("mslk") is None:
            raise MethodUnavailable("unsupported", "torchao Int4WeightOnlyConfig needs the `mslk` package")
        return tq.Int4WeightOnlyConfig(**group)
    if quant_type == "int4dq":
        return _int4dq_config()
    if quant_type.startswith("float8wo"):
        return tq.Float8WeightOnlyConfig(weight_dtype=_float8_dtype(quant_type))
    if quant_type in FLOAT8_DYNAMIC:
        from torchao.quantization import PerRow, PerTensor

        granularity = PerRow() if quant_type == "float8_e4m3_row" else PerTensor()
        return tq.Float8DynamicActivationFloat8WeightConfig(granularity=granularity)
    if quant_type == "autoquant":
        raise _missing("autoquant")
    if match := _INTX.fullmatch(quant_type):
        return tq.IntxWeightOnlyConfig(weight_dtype=getattr(torch, f"int{match.group(1)}"))
    if match := _UINTX.fullmatch(quant_type):
        return _uintx_config(int(match.group(1)))
    if _FPX.fullmatch(quant_type):
        if not hasattr(tq, "FPXWeightOnlyConfig"):
            raise _missing("fpX weight-only (FPXWeightOnlyConfig)")
        bits_e, bits_m = map(int, _FPX.fullmatch(quant_type).groups()[1:])
        return tq.FPXWeightOnlyConfig(ebits=bits_e, mbits=bits_m)
    raise AssertionError(f"unhandled quant_type {quant_type}")  # the validator admits only the above


def _int4dq_config() -> Any:
    try:
        from torchao.prototype.quantization.int4.inference_workflow import Int8DynamicActivationInt4WeightConfig
    except ImportError:
        raise _missing("int8-activation int4-weight (Int8DynamicActivationInt4WeightConfig)") from None
    return Int8DynamicActivationInt4WeightConfig()


def _uintx_config(bits: int) -> Any:
    try:
        from torchao.prototype.quantization.quant_api import UIntxWeightOnlyConfig
    except ImportError:
        raise _missing("uintx weight-only (UIntxWeightOnlyConfig)") from None
    if importlib.util.find_spec("gemlite") is None:
        raise MethodUnavailable("unsupported", "torchao UIntxWeightOnlyConfig needs the `gemlite` package")
    return UIntxWeightOnlyConfig(bit_width=bits)


class TorchAo(Method):
    name: ClassVar[str] = "torchao"
    family: ClassVar[str] = "torchao"
    Options: ClassVar[type[MethodOptions]] = TorchAoOptions
    safe_serialization: ClassVar[bool] = False  # torchao tensor subclasses save only as pickles (the guide says so)
    options: TorchAoOptions

    def check(self, cell, machine) -> None:
        if self.options.quant_type in FLOAT8_DYNAMIC:
            needs_cuda(machine, f"torchao {self.options.quant_type}", min_capability=(8, 9))
        if self.options.quant_type == "int4dq" and machine.cuda_available:
            raise MethodUnavailable("unsupported", "torchao int4dq (DA8W4) has only a CPU kernel")
        build_torchao_config(self.options)

    def quantization_config(self, component: Component, cell) -> Any:
        return component.config_class("TorchAoConfig")(
            quant_type=build_torchao_config(self.options), modules_to_not_convert=self.options.modules_to_not_convert
        )
