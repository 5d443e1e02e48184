"""optimum-quanto through diffusers' `QuantoConfig` (transformers' for the text encoders): int8/int4/int2/float8 weights.

diffusers has deprecated `QuantoConfig` (huggingface/diffusers#13180) and plans to remove it in 1.0; each row's
`method_notes` say so.
"""

from __future__ import annotations

import importlib.util
from typing import Any, ClassVar, Literal

from bench.methods.base import Component, ConfigOptions, Method, MethodOptions, MethodUnavailable, method_notes

DEPRECATION = "diffusers deprecated QuantoConfig (huggingface/diffusers#13180); removal planned for diffusers 1.0"


class QuantoOptions(ConfigOptions):
    weights_dtype: Literal["int8", "int4", "int2", "float8"] = "int8"
    modules_to_not_convert: list[str] | None = None


class Quanto(Method):
    name: ClassVar[str] = "quanto"
    family: ClassVar[str] = "quanto"
    Options: ClassVar[type[MethodOptions]] = QuantoOptions
    options: QuantoOptions

    def check(self, cell, machine) -> None:
        if importlib.util.find_spec("optimum.quanto") is None:
            raise MethodUnavailable("unsupported", "quanto needs the `optimum-quanto` package")

    def quantization_config(self, component: Component, cell) -> Any:
        # the two libraries name the weight type differently
        dtype_key = "weights" if component.is_transformers_model else "weights_dtype"
        return component.config_class("QuantoConfig")(
            **{dtype_key: self.options.weights_dtype}, modules_to_not_convert=self.options.modules_to_not_convert
        )

    def after_load(self, pipe: Any, cell) -> dict[str, Any]:
        return method_notes(deprecated=DEPRECATION)
