"""Method registry: matrix names to method classes, imported only when a cell uses them."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from bench.errors import did_you_mean

if TYPE_CHECKING:
    from bench.methods.base import Method

_REGISTRY: dict[str, str] = {
    "auto_round": "bench.methods.auto_round:AutoRound",
    "baseline": "bench.methods.baseline:Baseline",
    "bfl": "bench.methods.bfl:Bfl",
    "bnb_8bit": "bench.methods.bitsandbytes:EightBit",
    "bnb_4bit": "bench.methods.bitsandbytes:FourBit",
    "gguf": "bench.methods.gguf:Gguf",
    "layerwise_fp8": "bench.methods.layerwise:LayerwiseCasting",
    "modelopt": "bench.methods.modelopt:ModelOpt",
    "nunchaku_lite": "bench.methods.nunchaku_lite:NunchakuLite",
    "quanto": "bench.methods.quanto:Quanto",
    "sdnq": "bench.methods.sdnq:Sdnq",
    "torchao": "bench.methods.torchao:TorchAo",
}


def method_names() -> list[str]:
    """The names a matrix's `method` axis accepts."""
    return sorted(_REGISTRY)


def method_class(name: str) -> type[Method]:
    """The method class registered as `name`; KeyError with a did-you-mean for unknown names."""
    try:
        target = _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r}{did_you_mean(name, _REGISTRY)}") from None
    module_name, class_name = target.split(":")
    return getattr(importlib.import_module(module_name), class_name)
