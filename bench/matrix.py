"""Matrix files: parse the TOML, validate it into typed config, expand it into cells.

Everything a user can get wrong is caught here, before any work starts, as a MatrixError that names the
file, the key path, the bad value and the allowed values.
"""

from __future__ import annotations

import itertools
import re
import tomllib
import typing
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from bench.cells import AXES, DTYPES, Cell
from bench.drift import METRICS
from bench.errors import MatrixError
from bench.methods import method_class, method_names
from bench.methods.base import MethodOptions
from bench.placement import INDUCTOR_PRESETS
from bench.prompts import BUILTIN_PROMPTS, PromptFileError, read_prompt_file

SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
BUILTIN_MODELS = ("tiny-flux", "tiny-flux-deep", "tiny-sd3", "flux-dev-shape", "sd3-medium-shape")
COMPILE_MODES = ("off", "default", "max-autotune", "reduce-overhead", "max-autotune-no-cudagraphs")
PLACEMENTS = ("device", "device_map", "model_cpu_offload", "sequential_cpu_offload", "group_offload")
MAX_SECONDS = 7 * 24 * 3600
Seconds = typing.Annotated[float, Field(gt=0, le=MAX_SECONDS)]


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
    height: int = Field(default=1024, ge=16, le=8192, multiple_of=16)
    width: int = Field(default=1024, ge=16, le=8192, multiple_of=16)
    num_inference_steps: int = Field(default=28, ge=1, le=1000)
    guidance_scale: float = Field(default=3.5, ge=0, le=100)
    max_sequence_length: int = Field(default=512, ge=1, le=4096)
    repeats: int = Field(default=3, ge=1, le=100)
    warmup: int = Field(default=1, ge=0, le=100)
    # Time few steps, report the end-to-end time of this many: e2e + (N - steps) x median step time, in columns
    # that say so. Changes no cell (not part of the cell id).
    extrapolate_to_steps: int | None = Field(default=None, ge=1, le=1000)

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
        return self.model_dump(exclude={"extrapolate_to_steps"})


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


class Axes(_Strict):
    """The grid. Each list is an axis; the matrix is their product, minus axes a method does not use."""

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


class MatrixFile(_Strict):
    """The whole matrix file as written."""

    name: str | None = None
    model: ModelSource
    generation: Generation
    run: RunSettings = RunSettings()
    axes: Axes
    drift: DriftSettings = DriftSettings()
    gates: dict[str, float] = {}
    method: dict[str, dict[str, Any]] = {}
    include: list[dict[str, Any]] = []
    exclude: list[dict[str, Any]] = []

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


def load_matrix(path: str | Path, select: list[str] | tuple[str, ...] = ()) -> Matrix:
    """Read, validate and expand a matrix file; MatrixError on any problem.

    `select` keeps only the cells matching every `KEY=VALUE` (as in an exclude rule; `compile=off`,
    `method=torchao`, `quant_type=int8wo`): a quick subset that shares ids, and so results, with the full run.
    """
    path = Path(path)
    raw = _read_toml(path)
    try:
        spec = MatrixFile.model_validate(raw)
    except ValidationError as error:
        raise _matrix_error(path, error) from None
    spec = spec.model_copy(update={"generation": _with_prompts(path, spec.generation)})
    name = spec.name or path.stem
    if not SAFE_NAME.fullmatch(name) or ".." in name:
        raise MatrixError(path, "name", "the matrix name (default: the file name) must be a safe folder name", name)
    if spec.model.path and not (path.parent / spec.model.path).expanduser().is_dir():
        raise MatrixError(path, "model.path", "no such folder", spec.model.path)
    cells = expand(spec, path)
    if select:
        rule = dict(_select_item(path, item) for item in select)
        _rule_keys(spec, rule, path, "--select")
        cells = [cell for cell in cells if _matches(path, rule, cell, "--select")]
        if not cells:
            raise MatrixError(path, "--select", "no cell matches", " ".join(select))
    return Matrix(path=path, name=name, spec=spec, cells=cells)


def _select_item(path: Path, item: str) -> tuple[str, Any]:
    """`KEY=VALUE` with VALUE read as TOML when it parses (numbers, booleans, lists), else as a string."""
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise MatrixError(path, "--select", "expected KEY=VALUE", item)
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text
    return key.strip(), value


def _with_prompts(path: Path, generation: Generation) -> Generation:
    """The generation settings with `prompt_file` read into `prompts`."""
    source = generation.prompt_file
    if not source:
        return generation
    if source.startswith("builtin:"):
        name = source.removeprefix("builtin:")
        if name not in BUILTIN_PROMPTS:
            raise MatrixError(
                path,
                "generation.prompt_file",
                "unknown built-in prompt set",
                source,
                [f"builtin:{n}" for n in BUILTIN_PROMPTS],
            )
        prompts = list(BUILTIN_PROMPTS[name])
    else:
        try:
            prompts = read_prompt_file((path.parent / source).expanduser())
        except PromptFileError as error:
            raise MatrixError(path, "generation.prompt_file", str(error), source) from None
    return generation.model_copy(update={"prompts": prompts})


def _read_toml(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise MatrixError(path, "", "matrix file not found")
    if not path.is_file():
        raise MatrixError(path, "", "not a file")
    try:
        return tomllib.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as error:
        raise MatrixError(path, "", f"not UTF-8 text (byte {error.start})") from None
    except tomllib.TOMLDecodeError as error:
        raise MatrixError(path, "", f"invalid TOML: {error}") from None


def _matrix_error(path: Path, error: ValidationError, prefix: str | None = None) -> MatrixError:
    """The first validation problem as a MatrixError with the key path and the allowed values.

    With `prefix`, the error is about a rule's single-value axis: the key is `prefix.<axis>`.
    """
    first = error.errors()[0]
    loc = [str(part) for part in first["loc"] if part != "[key]"]  # pydantic's marker for a bad table key
    key = f"{prefix}.{loc[0]}" if prefix else ".".join(loc)
    message = first["msg"].removeprefix("Value error, ")
    allowed: list[str] | None = None
    if first["type"] == "extra_forbidden":
        message = "unknown key"
        allowed = _keys_at(MatrixFile, loc[:-1])
    elif first["type"] == "missing":
        message = "missing required key"
    elif first["type"] == "literal_error":
        allowed = [s.strip(" '") for s in re.split(r",| or ", first["ctx"]["expected"])]
        message = "not an allowed value"
    elif "unknown method" in message:
        allowed = method_names()
    value = first.get("input") if first["type"] != "missing" else None
    more = len(error.errors()) - 1
    if more:
        message += f" [and {more} more problem{'s' if more > 1 else ''}]"
    return MatrixError(path, key, message, value, allowed)


def _keys_at(model: type[BaseModel], loc: list[str]) -> list[str] | None:
    """The keys a model accepts at a location inside it, for 'unknown key' errors."""
    for part in loc:
        field = model.model_fields.get(part)
        annotation = field.annotation if field else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return sorted(model.model_fields)


def expand(spec: MatrixFile, path: Path) -> list[Cell]:
    """The cells of a matrix: the product of its axes, collapsed per method, with include/exclude applied."""
    axes = spec.axes
    for name in spec.method:  # options of a known method not on the axis are kept for later, not an error
        try:
            method_class(name)
        except KeyError as error:
            raise MatrixError(path, f"method.{name}", error.args[0], None, method_names()) from None
    cells: list[Cell] = []
    for name in axes.method:
        for options in expand_options(path, name, spec.method.get(name, {})):
            cells.extend(_product(axes, name, options))
    for i, rule in enumerate(spec.exclude):
        _rule_keys(spec, rule, path, f"exclude.{i}")
        cells = [cell for cell in cells if not _matches(path, rule, cell, f"exclude.{i}")]
    cells += [_included_cell(path, spec, rule, f"include.{i}") for i, rule in enumerate(spec.include)]
    for cell in cells:
        _check_combination(path, spec, cell)
    context = {"model": spec.model.key(), "generation": spec.generation.identity()}
    unique: dict[str, Cell] = {}
    for cell in cells:
        cell = cell.with_id(context)
        unique.setdefault(cell.id, cell)
    if not unique:
        raise MatrixError(path, "exclude", "the rules exclude every cell: nothing to run")
    return list(unique.values())


def _check_combination(path: Path, spec: MatrixFile, cell: Cell) -> None:
    """Reject cells no machine could run, naming the axis that makes them impossible."""
    cls = method_class(cell.method)
    if cls.only_components and cell.components and not set(cell.components) <= set(cls.only_components):
        raise MatrixError(
            path,
            "axes.components",
            f"method {cell.method} can only quantize {', '.join(cls.only_components)}",
            list(cell.components),
            cls.only_components,
        )
    if cell.options.get("synthetic_blocks") and spec.model.weights_label == "real":
        raise MatrixError(
            path,
            f"method.{cell.method}.synthetic_blocks",
            "random blocks are only for synthetic weights (model.weights = 'synthetic')",
            True,
        )


def _components_axis(axes: Axes, cls: type) -> list[list[str] | None]:
    """The components axis as it applies to a method: collapsed for the baseline and single-component methods."""
    if not cls.quantizes:
        return [None]
    if cls.only_components:
        return [list(cls.only_components)]
    return axes.components


def _product(axes: Axes, method: str, options: dict[str, Any]) -> list[Cell]:
    cls = method_class(method)
    cells = []
    for dtype, threshold, compile_mode, fullgraph, inductor, regional, components, placement in itertools.product(
        axes.dtype,
        axes.threshold if cls.uses_threshold else [None],
        axes.compile,
        axes.fullgraph,
        axes.inductor,
        axes.regional,
        _components_axis(axes, cls),
        axes.placement,
    ):
        cells.append(
            Cell(
                method=method,
                options=options,
                dtype=dtype,
                threshold=threshold,
                compile=compile_mode,
                fullgraph=fullgraph if compile_mode != "off" else None,
                inductor=inductor if compile_mode != "off" and inductor != "default" else None,
                regional=True if compile_mode != "off" and regional else None,
                components=tuple(components) if components is not None else None,
                placement=placement,
            )
        )
    return cells


def expand_options(path: Path, method: str, table: dict[str, Any]) -> list[dict[str, Any]]:
    """Every combination of a method's options: a list given for a scalar option is an axis of its own."""
    options_model = method_class(method).Options
    key = f"method.{method}"
    for option in table:
        if option not in options_model.model_fields:
            raise MatrixError(path, f"{key}.{option}", "unknown option", None, sorted(options_model.model_fields))
    choices = {option: _option_values(options_model, option, value) for option, value in table.items()}
    combos = [dict(zip(choices, values)) for values in itertools.product(*choices.values())]
    return [_validated_options(path, key, options_model, combo) for combo in combos]


def _option_values(model: type[MethodOptions], option: str, value: Any) -> list[Any]:
    annotation = model.model_fields[option].annotation
    takes_list = any(typing.get_origin(arg) is list for arg in (annotation, *typing.get_args(annotation)))
    if isinstance(value, list) and value and (not takes_list or all(isinstance(v, list) for v in value)):
        return value
    return [value]


def _validated_options(path: Path, key: str, model: type[MethodOptions], values: dict[str, Any]) -> dict[str, Any]:
    try:
        options = model.model_validate(values)
    except ValidationError as error:
        first = error.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        message = first["msg"].removeprefix("Value error, ")
        value = first.get("input") if first["type"] != "missing" else None
        raise MatrixError(path, f"{key}.{loc}" if loc else key, message, value) from None
    return options.model_dump(exclude_defaults=True)


def _rule_keys(spec: MatrixFile, rule: dict[str, Any], path: Path, key: str) -> None:
    named = rule.get("method", [])
    methods = {*spec.axes.method, *(named if isinstance(named, list) else [named])} & set(method_names())
    option_names = {o for name in methods for o in method_class(name).Options.model_fields}
    for name in rule:
        if name not in AXES and name not in option_names:
            raise MatrixError(path, f"{key}.{name}", "unknown rule key", None, sorted(set(AXES) | option_names))


def _matches(path: Path, rule: dict[str, Any], cell: Cell, key: str) -> bool:
    """Whether `cell` matches an include/exclude rule: every key equal to (or one of) the rule's values."""
    if not rule:
        raise MatrixError(path, key, "empty rule")
    values = {
        **_option_defaults(method_class(cell.method).Options),
        **cell.options,
        **cell.axes(),
        "inductor": cell.inductor or "default",
        "regional": bool(cell.regional),
    }
    return all(values.get(name) in _candidates(name, wanted) for name, wanted in rule.items())


def _option_defaults(model: type[MethodOptions]) -> dict[str, Any]:
    """The options a cell leaves at their defaults (its `options` hold only the others)."""
    return {name: field.default for name, field in model.model_fields.items() if not field.is_required()}


def _candidates(name: str, wanted: Any) -> list[Any]:
    """A rule value as the list of values it accepts (`components` values are themselves lists)."""
    if name == "components":
        return wanted if wanted and isinstance(wanted[0], list) else [wanted]
    return wanted if isinstance(wanted, list) else [wanted]


def _included_cell(path: Path, spec: MatrixFile, rule: dict[str, Any], key: str) -> Cell:
    """An extra cell from an include rule: its values, the first value of every other axis."""
    _rule_keys(spec, rule, path, key)
    if "method" not in rule:
        raise MatrixError(path, f"{key}.method", "an include rule must name a method", None, method_names())
    method = rule["method"]
    try:
        cls = method_class(method)
    except KeyError as error:
        raise MatrixError(path, f"{key}.method", error.args[0], method, method_names()) from None
    base_options = expand_options(path, method, spec.method[method])[0] if method in spec.method else {}
    option_values = {k: v for k, v in rule.items() if k in cls.Options.model_fields}
    options = _validated_options(path, key, cls.Options, {**base_options, **option_values})
    axis_values = {name: rule.get(name, getattr(spec.axes, name)[0]) for name in AXES if name != "method"}
    try:
        axes = Axes.model_validate({name: [value] for name, value in axis_values.items()} | {"method": [method]})
    except ValidationError as error:
        raise _matrix_error(path, error, prefix=key) from None
    return _product(axes, method, options)[0]
