"""What every quantization method provides: options, a capability check, and how it loads a component."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    from bench.cells import Cell
    from bench.environment import Machine


class MethodOptions(BaseModel):
    """Per-method options from the matrix's `[method.<name>]` table. Subclasses add fields."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class MethodUnavailable(Exception):
    """A cell cannot run here: `status` is `skipped` (this machine) or `unsupported` (installed libraries)."""

    def __init__(self, status: str, reason: str) -> None:
        assert status in ("skipped", "unsupported")
        self.status = status
        self.reason = reason
        super().__init__(f"{status}: {reason}")


def needs_cuda(machine: Machine, what: str, min_capability: tuple[int, int] | None = None) -> None:
    """Raise `skipped` unless this machine has CUDA (of at least `min_capability`)."""
    if not machine.cuda_available:
        raise MethodUnavailable("skipped", f"{what} needs a CUDA GPU; this machine has none")
    if min_capability and machine.cuda_capability and tuple(machine.cuda_capability) < min_capability:
        wanted = ".".join(map(str, min_capability))
        have = ".".join(map(str, machine.cuda_capability))
        raise MethodUnavailable("skipped", f"{what} needs compute capability >= {wanted}; this GPU has {have}")


@dataclass(frozen=True)
class Component:
    """One pipeline component as saved in a diffusers folder (`model_index.json` entry)."""

    name: str
    library: str
    class_name: str
    folder: Path

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


class Method:
    """A quantization method, registered by the name users write in the `method` axis."""

    name: ClassVar[str]
    family: ClassVar[str]
    Options: ClassVar[type[MethodOptions]] = MethodOptions
    quantizes: ClassVar[bool] = True
    uses_threshold: ClassVar[bool] = False

    def __init__(self, options: MethodOptions) -> None:
        self.options = options

    def check(self, cell: Cell, machine: Machine) -> None:
        """Raise MethodUnavailable if `cell` cannot run on `machine`; called before any subprocess starts."""

    def load_component(self, component: Component, cell: Cell) -> Any:
        """Load `component` quantized for `cell` (inside the cell subprocess)."""
        raise NotImplementedError

    def after_load(self, pipe: Any, cell: Cell) -> dict[str, Any]:
        """Hook run after the pipeline is placed (e.g. dequantize); returns extra measurements."""
        return {}
