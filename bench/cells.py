"""A cell: one point of the matrix grid, with a deterministic id."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def torch_dtype(name: str) -> Any:
    """The torch dtype of a matrix dtype name (`bf16`, `fp16`, `fp32`)."""
    import torch

    return getattr(torch, DTYPES[name])


AXES = (
    "method",
    "dtype",
    "threshold",
    "compile",
    "fullgraph",
    "inductor",
    "regional",
    "dynamic",
    "components",
    "placement",
    "attention",
    "batch_size",
    "lora",
    "lora_rank",
)
# Axes added after cells had ids: at these values they are left out of the id, so those cells keep theirs.
ID_DEFAULTS = {
    "inductor": None,
    "regional": None,
    "dynamic": None,
    "attention": "native",
    "batch_size": 1,
    "lora": "none",
    "lora_rank": None,
}


@dataclass(frozen=True)
class Cell:
    """The axes of one cell. Axes that do not apply to its method are None (collapsed)."""

    method: str
    options: dict[str, Any] = field(default_factory=dict)
    dtype: str = "bf16"
    threshold: float | None = None
    compile: str = "off"
    fullgraph: bool | None = None
    inductor: str | None = None  # None: not compiled, or the `default` preset (settings as loading left them)
    regional: bool | None = None  # True: only the denoiser's repeated blocks are compiled; None: all of it, or none
    dynamic: bool | None = None  # torch.compile(dynamic=...) of a compiled cell; None: torch's default, or not compiled
    components: tuple[str, ...] | None = None
    placement: str = "device"
    attention: str = "native"  # the attention backend (bench.attention)
    batch_size: int = 1  # images per prompt in one pipeline call (num_images_per_prompt)
    lora: str = "none"  # the LoRA mode (bench.lora): none, unfused, fused, hotswap
    lora_rank: int | None = None  # the adapter's rank; None without an adapter
    id: str = ""

    def axes(self) -> dict[str, Any]:
        """The cell's axes and method options as plain data (what its id hashes, with model and generation)."""
        data = asdict(self)
        data.pop("id")
        for axis, default in ID_DEFAULTS.items():
            if data[axis] == default:
                data.pop(axis)  # cells from before the axis existed keep their ids
        data["components"] = list(self.components) if self.components is not None else None
        return data

    def with_id(self, context: dict[str, Any]) -> Cell:
        """This cell with its id: a short hash of its normalized axes plus the model and generation `context`."""
        payload = json.dumps({"axes": self.axes(), **context}, sort_keys=True, default=str)
        digest = hashlib.sha256(payload.encode()).hexdigest()[:12]
        return Cell(**{**self.__dict__, "id": digest})

    @property
    def compile_variant(self) -> str:
        """The compile axes in one word, e.g. `off` or `default+inductor=torchao+regional`."""
        return compile_variant(self.compile, self.fullgraph, self.inductor, self.regional, self.dynamic)

    @property
    def label(self) -> str:
        """A short human-readable name, e.g. `torchao[int8wo] bf16 compile=default`."""
        options = ",".join(_option_text(k, v) for k, v in self.options.items())
        parts = [f"{self.method}[{options}]" if options else self.method, self.dtype]
        if self.threshold is not None:
            parts.append(f"threshold={self.threshold:g}")
        if self.compile != "off":
            parts.append(f"compile={self.compile_variant}")
        if self.components is not None and self.components != ("transformer",):
            parts.append("+".join(self.components))
        if self.placement != "device":
            parts.append(self.placement)
        if self.attention != "native":
            parts.append(f"attention={self.attention}")
        if self.batch_size != 1:
            parts.append(f"batch={self.batch_size}")
        if self.lora != "none":
            parts.append(f"lora={self.lora}" + (f" r{self.lora_rank}" if self.lora_rank else ""))
        return " ".join(parts)

    @property
    def torch_dtype(self) -> Any:
        return torch_dtype(self.dtype)

    @classmethod
    def from_axes(cls, data: dict[str, Any], cell_id: str) -> Cell:
        components = data.get("components")
        return cls(**{**data, "components": tuple(components) if components is not None else None, "id": cell_id})


def compile_variant(mode: str, fullgraph: Any, inductor: Any, regional: Any, dynamic: Any = None) -> str:
    """`mode` with the settings that vary a compiled cell appended (missing values, as in older rows, add nothing)."""
    if mode == "off":
        return mode
    return (
        mode
        + ("+fullgraph" if _flag(fullgraph) else "")
        + (f"+inductor={inductor}" if isinstance(inductor, str) else "")
        + ("+regional" if _flag(regional) else "")
        + (f"+dynamic={str(bool(dynamic)).lower()}" if isinstance(dynamic, bool) else "")
    )


def _flag(value: Any) -> bool:
    """A boolean axis value, also from a results table: missing (None, NaN) is false."""
    return bool(value) and bool(value == value)


def _option_text(name: str, value: Any) -> str:
    """An option as shown in labels: its value, its name for a flag that is on (`dequantize`), or its name and
    items for a list (`llm_int8_skip_modules=proj_out+norm_out`)."""
    if isinstance(value, bool):
        return name if value else f"no {name}"
    if isinstance(value, list | tuple):
        return f"{name}={'+'.join(map(str, value))}"
    return str(value)
