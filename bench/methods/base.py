"""What every quantization method provides: options, a capability check, and how it loads a component."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict, model_validator

from bench.errors import MethodUnavailable

if TYPE_CHECKING:
    from bench.cells import Cell
    from bench.environment import Machine


class MethodOptions(BaseModel):
    """Per-method options from the matrix's `[method.<name>]` table. Subclasses add fields."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class QuantizedOptions(MethodOptions):
    """Options every quantizing method takes."""

    serialize: bool = False  # save_pretrained / from_pretrained round trip before generating (bench/serialization.py)


class ConfigOptions(QuantizedOptions):
    """Options of the methods that quantize through a library's quantization config (bitsandbytes, torchao,
    quanto)."""

    # Quantize every chosen component inside the pipeline's one `from_pretrained` call, through diffusers'
    # PipelineQuantizationConfig(quant_mapping=...) as current diffusers recommends; quantize_s is then part of
    # load_s (and null). Off: each component is loaded quantized on its own, so quantize_s is measured apart.
    pipeline_config: bool = False

    @model_validator(mode="after")
    def _pipeline_config_loads_in_one_call(self) -> ConfigOptions:
        if self.pipeline_config and self.serialize:
            raise ValueError(
                "pipeline_config and serialize exclude each other: the round trip saves components one by one"
            )
        return self


def needs_cuda(machine: Machine, what: str, min_capability: tuple[int, int] | None = None) -> None:
    """Raise `skipped` unless this machine has CUDA (of at least `min_capability`)."""
    if not machine.cuda_available:
        raise MethodUnavailable("skipped", f"{what} needs a CUDA GPU; this machine has none")
    if min_capability and machine.cuda_capability and tuple(machine.cuda_capability) < min_capability:
        wanted = ".".join(map(str, min_capability))
        have = ".".join(map(str, machine.cuda_capability))
        raise MethodUnavailable("skipped", f"{what} needs compute capability >= {wanted}; this GPU has {have}")


def method_notes(**facts: Any) -> dict[str, str]:
    """Method-specific facts for the row's `method_notes` column (JSON), as `Method.after_load` returns them."""
    return {"method_notes": json.dumps(facts, sort_keys=True, default=str)}


@dataclass(frozen=True)
class Component:
    """One pipeline component as saved in a diffusers folder (`model_index.json` entry)."""

    name: str
    library: str
    class_name: str
    folder: Path
    single_file: Path | None = None  # a single-file checkpoint (GGUF) to load instead of `folder`

    @property
    def has_weights(self) -> bool:
        """False for schedulers, tokenizers and processors, which nothing can quantize."""
        return not self.class_name.endswith(("Scheduler", "Tokenizer", "TokenizerFast", "Processor"))

    @property
    def is_transformers_model(self) -> bool:
        return self.library == "transformers"

    def model_class(self) -> Any:
        import importlib

        return getattr(importlib.import_module(self.library), self.class_name)

    def load(self, cell: Cell, **kwargs: Any) -> Any:
        """`from_pretrained` of this component in the cell's dtype, with extra arguments."""
        return self.model_class().from_pretrained(self.folder, subfolder=self.name, dtype=cell.torch_dtype, **kwargs)

    def config_class(self, config_name: str) -> Any:
        """The quantization config class `config_name` of the component's own library.

        diffusers models take diffusers' config class, transformers models (the T5 and CLIP text encoders)
        transformers' class of the same name, as the diffusers quantization guide does.
        """
        import importlib

        return getattr(
            importlib.import_module("transformers" if self.is_transformers_model else "diffusers"), config_name
        )


class Method:
    """A quantization method, registered by the name users write in the `method` axis."""

    name: ClassVar[str]
    family: ClassVar[str]
    Options: ClassVar[type[MethodOptions]] = MethodOptions
    quantizes: ClassVar[bool] = True
    uses_threshold: ClassVar[bool] = False
    only_components: ClassVar[tuple[str, ...] | None] = None
    safe_serialization: ClassVar[bool] = (
        True  # save_pretrained as safetensors in the serialization round trip  # e.g. GGUF files hold the transformer alone
    )

    def __init__(self, options: MethodOptions) -> None:
        self.options = options

    def check(self, cell: Cell, machine: Machine) -> None:
        """Raise MethodUnavailable if `cell` cannot run on `machine`; called before any subprocess starts."""

    def prepare_component(self, component: Component, cell: Cell) -> Component:
        """One-off, cached work outside the timings (produce a GGUF file, save a pre-quantized checkpoint)."""
        return component

    def quantization_config(self, component: Component, cell: Cell) -> Any:
        """The library quantization config that loads `component` quantized for `cell` (methods that have one)."""
        raise NotImplementedError

    def load_component(self, component: Component, cell: Cell) -> Any:
        """Load `component` quantized for `cell` (inside the cell subprocess, timed as `quantize_s`)."""
        return component.load(cell, quantization_config=self.quantization_config(component, cell))

    def after_load(self, pipe: Any, cell: Cell) -> dict[str, Any]:
        """Hook run after the pipeline is placed (e.g. dequantize); returns extra measurements."""
        return {}

    def value_dependent_latency(self, cell: Cell) -> bool:
        """True where the method's speed depends on the activations' values, not only on their shapes (then a
        synthetic model's latency says little about real weights). Of the libraries' code paths this harness
        runs, only bitsandbytes LLM.int8 at a threshold > 0 branches on values (`bench.methods.bitsandbytes`):
        torchao's weight-only and dynamic-activation types, quanto, diffusers' GGUF dequantization and layerwise
        casting do the same work whatever the values (no data-dependent op in their linears' forward)."""
        return False

    def value_dependence(self, pipe: Any, cell: Cell, generate: Callable[[], None]) -> dict[str, Any]:
        """Measurements of the value-dependent path from one untimed `generate()` (methods where
        `value_dependent_latency`)."""
        return {}
