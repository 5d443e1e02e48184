"""The matrix file's schema: pydantic models of every table and key, with their allowed values."""

from __future__ import annotations

import re
import typing
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from bench.attention import ATTENTION_BACKENDS
from bench.cells import DTYPES, Cell
from bench.compilation import INDUCTOR_PRESETS
from bench.drift import METRICS
from bench.lora import DEFAULT_TARGETS
from bench.lora import MODES as LORA_MODES
from bench.methods import method_class

SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
BUILTIN_MODELS = ("tiny-flux", "tiny-flux-deep", "tiny-sd3", "flux-dev-shape", "sd3-medium-shape")
COMPILE_MODES = ("off", "default", "max-autotune", "reduce-overhead", "max-autotune-no-cudagraphs")
PLACEMENTS = ("device", "device_map", "model_cpu_offload", "sequential_cpu_offload", "group_offload")
MAX_SECONDS = 7 * 24 * 3600
Seconds = typing.Annotated[float, Field(gt=0, le=MAX_SECONDS)]


Pixels = typing.Annotated[int, Field(ge=16, le=8192, multiple_of=16)]
ImageSize = typing.Annotated[list[Pixels], Field(min_length=2, max_length=2)]  # [height, width]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class ModelSource(_Strict):
    """Where the pipeline comes from: exactly one of a built-in tiny model, a local folder or a hub id."""

    builtin: Literal[BUILTIN_MODELS] | None = None  # type: ignore[valid-type]
    path: str | None = None
    hub: str | None = None
    revision: str | None = None
    weights: Literal["real", "synthetic"] | None = None

    @model_validator(mode="after")
    def _exactly_one_source(self) -> ModelSource:
        given = [k for k in ("builtin", "path", "hub") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError("give exactly one of builtin, path, hub")
        if self.hub and not re.fullmatch(r"[\w.-]+/[\w.-]+", self.hub):
            raise ValueError("hub must look like 'organization/name'")
        return self

    @property
    def weights_label(self) -> str:
        return self.weights or ("synthetic" if self.builtin else "real")

    def key(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


class Generation(_Strict):
    """What each cell generates: every prompt with every seed, timed `repeats` times after warm-up."""

    prompts: list[typing.Annotated[str, Field(min_length=1, max_length=2000)]] = Field(default=[], max_length=1000)
    prompt_file: str | None = None  # a .txt or .jsonl file (relative to the matrix), or "builtin:quantbench-v1"
    seeds: list[typing.Annotated[int, Field(ge=0, lt=2**63)]] = Field(default=[0], min_length=1, max_length=1000)
    height: Pixels = 1024
    width: Pixels = 1024
    num_inference_steps: int = Field(default=28, ge=1, le=1000)
    guidance_scale: float = Field(default=3.5, ge=0, le=100)
    max_sequence_length: int = Field(default=512, ge=1, le=4096)
    repeats: int = Field(default=3, ge=1, le=100)
    warmup: int = Field(default=1, ge=0, le=100)
    # Time few steps, report the end-to-end time of this many: e2e + (N - steps) x median step time, in columns
    # that say so. Changes no cell (not part of the cell id).
    extrapolate_to_steps: int | None = Field(default=None, ge=1, le=1000)
    # [height, width] sizes, each timed `repeats` times on the first prompt and seed after the timed runs (the
    # warm-up and the timed runs are at the first, which sets height and width): what a change of size costs a
    # compiled cell (recompiles, latency, peak memory), in the `per_resolution` column.
    resolutions: list[ImageSize] | None = Field(default=None, min_length=1, max_length=16)

    @model_validator(mode="before")
    @classmethod
    def _size_from_first_resolution(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("resolutions") and isinstance(data["resolutions"][0], list):
            first = data["resolutions"][0]
            if len(first) == 2:
                data = {"height": first[0], "width": first[1], **data}
        return data

    @model_validator(mode="after")
    def _first_resolution_is_the_size(self) -> Generation:
        if self.resolutions and self.resolutions[0] != [self.height, self.width]:
            raise ValueError(
                f"resolutions[0] ({self.resolutions[0]}) is the size of the warm-up and the timed runs: it must be"
                f" [height, width] ([{self.height}, {self.width}]); leave height and width out to take it from there"
            )
        return self

    @model_validator(mode="after")
    def _one_prompt_source(self) -> Generation:
        if bool(self.prompts) == bool(self.prompt_file):
            raise ValueError("give exactly one of prompts (a non-empty list) or prompt_file")
        return self

    @model_validator(mode="after")
    def _extrapolate_beyond_the_timed_steps(self) -> Generation:
        if self.extrapolate_to_steps is not None and self.extrapolate_to_steps <= self.num_inference_steps:
            raise ValueError(
                f"extrapolate_to_steps ({self.extrapolate_to_steps}) must exceed num_inference_steps"
                f" ({self.num_inference_steps}): fewer steps are timed, more are extrapolated"
            )
        return self

    def identity(self) -> dict[str, Any]:
        """The settings that change what a cell computes (its id depends on them)."""
        unset = {"resolutions"} if self.resolutions is None else set()  # ids from before the key stay
        return self.model_dump(exclude={"extrapolate_to_steps", *unset})


class DriftSettings(_Strict):
    """How images are compared with the reference run."""

    enabled: bool = True
    reference_dtype: Literal[tuple(DTYPES)] = "bf16"  # type: ignore[valid-type]
    clip_model: str | None = "openai/clip-vit-large-patch14"  # a local folder or a hub id already in the cache
    lpips: bool = True


class RunSettings(_Strict):
    """How cells are run: the device and the per-cell wall-clock limit."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    timeout_s: Seconds = 3600
    # Compilation's own limit: a compiled cell whose warm-up (where torch.compile compiles) runs past it ends as
    # a `timeout` row with its load and quantize times; Inductor's cache keeps the kernels already built.
    # One number for every compile mode, or one per mode ({ default = 600, max-autotune = 1200 }; a mode
    # not listed has only the cell's limit).
    compile_timeout_s: dict[Literal[COMPILE_MODES[1:]], Seconds] | None = None  # type: ignore[valid-type]
    # Cap each cell's CUDA memory (torch.cuda.set_per_process_memory_fraction) to see what fits a smaller GPU.
    gpu_memory_limit_gib: float | None = Field(default=None, gt=0, le=4096)
    # Opt-in: reload pickled checkpoints that quantbench itself wrote with torch.load(weights_only=False).
    trust_pickled_checkpoints: bool = False
    # A compiled cell whose warm-up steps run slower than `slow_warmup_factor` x the same method's eager step
    # (same options, dtype, threshold, components, placement; an ok row of the results folder; at least 5 s), or
    # than `max_warmup_step_s`, ends after its warm-up as a `timeout` row keeping the warm-up's step time, untimed.
    slow_warmup_factor: float = Field(default=20.0, gt=1, le=1e6)
    max_warmup_step_s: Seconds | None = None
    # When a cell's process starts: with the cell ("spawn"), or while the cell before it on the same slot runs
    # ("prestarted": its imports overlap that cell). Each cell has a fresh process either way.
    cell_start: Literal["spawn", "prestarted"] = "spawn"

    @field_validator("compile_timeout_s", mode="before")
    @classmethod
    def _one_limit_for_every_mode(cls, value: Any) -> Any:
        if isinstance(value, int | float) and not isinstance(value, bool):
            if not 0 < value <= MAX_SECONDS:
                raise ValueError("expected seconds, more than 0 and at most a week")
            return dict.fromkeys(COMPILE_MODES[1:], value)
        if value is not None and not isinstance(value, dict):
            raise ValueError("expected seconds, or a table of seconds by compile mode")
        return value

    @model_validator(mode="after")
    def _compile_limit_within_cell_limit(self) -> RunSettings:
        for mode, seconds in (self.compile_timeout_s or {}).items():
            if seconds >= self.timeout_s:
                raise ValueError(
                    f"compile_timeout_s ({seconds:g} s for {mode}) must be less than timeout_s ({self.timeout_s:g}),"
                    " the limit of the whole cell"
                )
        return self

    def compile_limit_s(self, mode: str) -> float | None:
        """Compilation's own limit for a cell compiled in `mode`; None when not compiled or not limited."""
        return (self.compile_timeout_s or {}).get(mode)


Rank = typing.Annotated[int, Field(ge=1, le=4096)]


class SyntheticLora(_Strict):
    """A LoRA quantbench builds for the model's own shapes: random values from `seed`, saved as safetensors."""

    rank: Rank | list[Rank] = 16  # a list is an axis of its own (`lora_rank`)
    targets: list[typing.Annotated[str, Field(pattern=r"^[A-Za-z0-9_.]+$")]] = Field(
        default=list(DEFAULT_TARGETS), min_length=1
    )  # the transformer's linear layers whose names end with one of these (PEFT's target_modules rule)
    seed: int = Field(default=0, ge=0, lt=2**63)
    hotswap_seed: int = Field(default=1, ge=0, lt=2**63)  # the second adapter, swapped in by `hotswap` cells

    @property
    def ranks(self) -> list[int]:
        return self.rank if isinstance(self.rank, list) else [self.rank]

    @model_validator(mode="after")
    def _two_adapters(self) -> SyntheticLora:
        if self.seed == self.hotswap_seed:
            raise ValueError("hotswap_seed must differ from seed: hot-swapping the same adapter changes nothing")
        if isinstance(self.rank, list) and not self.rank:
            raise ValueError("rank: give at least one rank")
        return self


class LoraSettings(_Strict):
    """The adapter of the cells whose `lora` axis is not `none`: a local file or a synthetic one (neither: no
    adapter, and the axis must stay `none`)."""

    path: str | None = None  # a LoRA .safetensors file (diffusers or PEFT format), relative to the matrix
    hotswap_path: str | None = None  # the second file, swapped in by `hotswap` cells (with `path`)
    synthetic: SyntheticLora | None = None

    @model_validator(mode="after")
    def _one_source(self) -> LoraSettings:
        if self.path and self.synthetic:
            raise ValueError("give exactly one of path or synthetic")
        if self.hotswap_path and not self.path:
            raise ValueError("hotswap_path goes with path (a synthetic adapter has hotswap_seed)")
        return self


class Axes(_Strict):
    """The grid. Each list is an axis (a single value: an axis of one); the matrix is their product, minus axes a
    method does not use."""

    method: list[str] = Field(min_length=1)
    dtype: list[Literal[tuple(DTYPES)]] = Field(default=["bf16"], min_length=1)  # type: ignore[valid-type]
    threshold: list[typing.Annotated[float, Field(gt=0, le=1e6)]] = Field(default=[6.0], min_length=1)
    compile: list[Literal[COMPILE_MODES]] = Field(default=["off"], min_length=1)  # type: ignore[valid-type]
    fullgraph: list[bool] = Field(default=[False], min_length=1)
    inductor: list[Literal[INDUCTOR_PRESETS]] = Field(default=["default"], min_length=1)  # type: ignore[valid-type]
    regional: list[bool] = Field(default=[False], min_length=1)
    components: list[list[typing.Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]]] = Field(
        default=[["transformer"]], min_length=1
    )
    placement: list[Literal[PLACEMENTS]] = Field(default=["device"], min_length=1)  # type: ignore[valid-type]
    # torch.compile(dynamic=...) of compiled cells: "auto" (torch's default: static first, dynamic after a shape
    # change), true, false
    dynamic: list[Literal["auto"] | bool] = Field(default=["auto"], min_length=1)
    attention: list[Literal[ATTENTION_BACKENDS]] = Field(default=["native"], min_length=1)  # type: ignore[valid-type]
    batch_size: list[typing.Annotated[int, Field(ge=1, le=256)]] = Field(default=[1], min_length=1)
    # LoRA adapter (the `[lora]` table): none, unfused (loaded), fused (fused, then unloaded), hotswap (a second
    # adapter swapped in after the warm-up; compiled cells are prepared for it before compiling)
    lora: list[Literal[LORA_MODES]] = Field(default=["none"], min_length=1)  # type: ignore[valid-type]

    @model_validator(mode="before")
    @classmethod
    def _single_values_are_one_value_axes(cls, data: Any) -> Any:
        """`compile = "off"` is `compile = ["off"]`, as method options take one value or a list; a components
        group (`"transformer"`, `["transformer", "vae"]`) is one group, as in include and exclude rules."""
        if not isinstance(data, dict):
            return data
        return {
            name: _one_value_axis(name, value) if name in cls.model_fields else value for name, value in data.items()
        }

    @field_validator("method")
    @classmethod
    def _known_methods(cls, names: list[str]) -> list[str]:
        for name in names:
            try:
                method_class(name)
            except KeyError as error:
                raise ValueError(error.args[0]) from None
        return names

    @field_validator("components")
    @classmethod
    def _non_empty_components(cls, value: list[list[str]]) -> list[list[str]]:
        if any(not group for group in value):
            raise ValueError("each components entry must name at least one component")
        return value


def _one_value_axis(name: str, value: Any) -> Any:
    """An axis as a list: a single value becomes a one-value list (a flat list of names, for `components`)."""
    if name == "components" and isinstance(value, str):
        return [[value]]
    if name == "components" and isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return [value]
    return value if isinstance(value, list) else [value]


class MatrixFile(_Strict):
    """The whole matrix file as written."""

    name: str | None = None
    model: ModelSource
    generation: Generation
    run: RunSettings = RunSettings()
    axes: Axes
    drift: DriftSettings = DriftSettings()
    lora: LoraSettings = LoraSettings()
    gates: dict[str, float] = {}
    method: dict[str, dict[str, Any]] = {}
    include: list[dict[str, Any]] = []
    exclude: list[dict[str, Any]] = []

    @property
    def lora_ranks(self) -> list[int] | None:
        """The synthetic adapter's ranks (the `lora_rank` axis); None for a file, whose rank the file says."""
        return self.lora.synthetic.ranks if self.lora.synthetic else None

    @field_validator("gates")
    @classmethod
    def _known_gates(cls, gates: dict[str, float]) -> dict[str, float]:
        allowed = [f"{kind}_{metric}" for metric in METRICS for kind in ("min", "max")]
        for gate in gates:
            if gate not in allowed:
                raise ValueError(f"unknown gate {gate!r}; allowed: {', '.join(allowed)}")
        return gates

    @field_validator("name")
    @classmethod
    def _safe_name(cls, value: str | None) -> str | None:
        if value is not None and (not SAFE_NAME.fullmatch(value) or ".." in value):
            raise ValueError("name must be letters, digits, '.', '_' or '-' (no path separators, no '..')")
        return value


class Matrix(BaseModel):
    """A validated matrix and its expanded cells."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    path: Path
    name: str
    spec: MatrixFile
    cells: list[Cell]

    @property
    def model(self) -> ModelSource:
        return self.spec.model

    @property
    def generation(self) -> Generation:
        return self.spec.generation

    @property
    def drift(self) -> DriftSettings:
        return self.spec.drift

    def clip_model(self) -> str | None:
        """The configured CLIP model: a folder relative to the matrix if one exists there, else a hub id."""
        configured = self.drift.clip_model or None
        if configured and (self.path.parent / configured).expanduser().is_dir():
            return str(self.resolve_path(configured))
        return configured

    def resolve_path(self, relative: str) -> Path:
        """A path written in the matrix, taken relative to the matrix file's folder."""
        return (self.path.parent / Path(relative).expanduser()).resolve()
