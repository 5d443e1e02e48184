"""The matrix's cells: the product of its axes and method options, with the include, exclude and --select rules."""

from __future__ import annotations

import itertools
import typing
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from bench.cache import folder_fingerprint
from bench.cells import AXES, Cell
from bench.errors import MatrixError, did_you_mean
from bench.lora import AdapterFileError, file_adapter
from bench.matrix.pydantic_errors import matrix_error
from bench.matrix.schema import Axes, MatrixFile
from bench.methods import method_class, method_names
from bench.methods.base import MethodOptions


def expand(spec: MatrixFile, path: Path) -> list[Cell]:
    """The cells of a matrix: the product of its axes, collapsed per method, with include/exclude applied."""
    axes = spec.axes
    included = {rule.get("method") for rule in spec.include if isinstance(rule.get("method"), str)}
    for name in spec.method:
        try:
            method_class(name)
        except KeyError as error:
            raise MatrixError(path, f"method.{name}", error.args[0], None, method_names()) from None
        if name not in axes.method and name not in included:
            raise MatrixError(
                path,
                f"method.{name}",
                f"options for a method no cell uses; axes.method has {axes.method}"
                + (f" and [[include]] {sorted(included)}" if included else ""),
            )
    ranks = lora_ranks(spec, path)
    cells: list[Cell] = []
    for name in axes.method:
        for options in expand_options(path, name, spec.method.get(name, {})):
            cells.extend(_product(axes, name, options, ranks))
    product = cells
    for i, rule in enumerate(spec.exclude):
        rule_keys(spec, rule, path, f"exclude.{i}")
        _check_values(path, product, rule, f"exclude.{i}")
        cells = [cell for cell in cells if not matches(path, rule, cell, f"exclude.{i}")]
    cells += [_included_cell(path, spec, rule, f"include.{i}", ranks) for i, rule in enumerate(spec.include)]
    for cell in cells:
        _check_combination(path, spec, cell)
    context = {"model": model_identity(spec, path), "generation": spec.generation.identity()}
    unique: dict[str, Cell] = {}
    for cell in cells:
        lora = {"lora": lora_identity(spec, path, cell.lora)} if cell.lora != "none" else {}
        cell = cell.with_id({**context, **lora})
        unique.setdefault(cell.id, cell)
    if not unique:
        raise MatrixError(path, "exclude", "the rules exclude every cell: nothing to run")
    return list(unique.values())


def model_identity(spec: MatrixFile, path: Path) -> dict[str, Any]:
    """The matrix's model as cell ids and reference keys see it: its source, and for a local folder its content
    fingerprint (bench.cache.folder_fingerprint), so replaced files are new cells, never resumed old ones."""
    key = spec.model.key()
    if spec.model.path:
        key["content"] = folder_fingerprint((path.parent / spec.model.path).expanduser())
    return key


def lora_ranks(spec: MatrixFile, path: Path) -> list[int]:
    """The `lora_rank` axis: the synthetic adapter's ranks, or the rank a LoRA file holds (read from its header);
    MatrixError for a lora axis without an adapter or a file quantbench will not load."""
    modes = {*spec.axes.lora, *(rule["lora"] for rule in spec.include if isinstance(rule.get("lora"), str))}
    lora = spec.lora
    if modes == {"none"} or not (lora.path or lora.synthetic):
        if modes != {"none"}:
            raise MatrixError(path, "axes.lora", "an adapter is needed: add a [lora] table with path or synthetic",
                              sorted(modes - {"none"}))  # fmt: skip
        return []
    if lora.synthetic:
        return lora.synthetic.ranks
    if "hotswap" in modes and not lora.hotswap_path:
        raise MatrixError(path, "lora.hotswap_path", "lora = 'hotswap' swaps in a second adapter: name its file")
    ranks = [_adapter_file(spec, path, "path").rank]
    if "hotswap" in modes:
        _adapter_file(spec, path, "hotswap_path")
    return ranks


def _adapter_file(spec: MatrixFile, path: Path, key: str) -> Any:
    """The adapter file at `lora.<key>`, checked (safetensors, LoRA weights in it); MatrixError otherwise."""
    written = getattr(spec.lora, key)
    resolved = (path.parent / written).expanduser().resolve()
    try:
        return file_adapter(resolved)
    except AdapterFileError as error:
        raise MatrixError(path, f"lora.{key}", f"{error}: {resolved}", written) from None


def lora_identity(spec: MatrixFile, path: Path, mode: str) -> dict[str, Any]:
    """What identifies a LoRA cell's adapters beyond its rank (part of its id): the synthetic adapter's targets
    and seeds, or the files' identities."""
    lora = spec.lora
    if lora.synthetic:
        seeds = {"hotswap_seed": lora.synthetic.hotswap_seed} if mode == "hotswap" else {}
        return {"targets": lora.synthetic.targets, "seed": lora.synthetic.seed, **seeds}
    files = {"file": _adapter_file(spec, path, "path").identity}
    if mode == "hotswap":
        files["hotswap_file"] = _adapter_file(spec, path, "hotswap_path").identity
    return files


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


def _lora_axes(axes: Axes, ranks: list[int]) -> list[tuple[str, int | None]]:
    """(mode, rank) pairs: `none` has no rank; every other mode takes each rank."""
    return [(mode, None) if mode == "none" else (mode, rank) for mode in axes.lora for rank in (ranks or [None])]


def _product(axes: Axes, method: str, options: dict[str, Any], ranks: list[int]) -> list[Cell]:
    cls = method_class(method)
    cells = []
    for (
        dtype,
        threshold,
        compile_mode,
        fullgraph,
        inductor,
        regional,
        dynamic,
        components,
        placement,
        attention,
        batch_size,
        (lora, lora_rank),
    ) in itertools.product(
        axes.dtype,
        axes.threshold if cls.uses_threshold else [None],
        axes.compile,
        axes.fullgraph,
        axes.inductor,
        axes.regional,
        axes.dynamic,
        _components_axis(axes, cls),
        axes.placement,
        axes.attention,
        axes.batch_size,
        _lora_axes(axes, ranks),
    ):
        compiled = compile_mode != "off"
        cells.append(
            Cell(
                method=method,
                options=options,
                dtype=dtype,
                threshold=threshold,
                compile=compile_mode,
                fullgraph=fullgraph if compiled else None,
                inductor=inductor if compiled and inductor != "default" else None,
                regional=True if compiled and regional else None,
                dynamic=dynamic if compiled and dynamic != "auto" else None,
                components=tuple(components) if components is not None else None,
                placement=placement,
                attention=attention,
                batch_size=batch_size,
                lora=lora,
                lora_rank=lora_rank,
            )
        )
    return cells


def expand_options(path: Path, method: str, table: dict[str, Any]) -> list[dict[str, Any]]:
    """Every combination of a method's options: a list given for a scalar option is an axis of its own."""
    options_model = method_class(method).Options
    key = f"method.{method}"
    for option in table:
        if option not in options_model.model_fields:
            allowed = sorted(options_model.model_fields)
            raise MatrixError(path, f"{key}.{option}", "unknown option" + did_you_mean(option, allowed), None, allowed)
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


def rule_keys(spec: MatrixFile, rule: dict[str, Any], path: Path, key: str) -> None:
    named = rule.get("method", [])
    methods = {*spec.axes.method, *(named if isinstance(named, list) else [named])} & set(method_names())
    option_names = {o for name in methods for o in method_class(name).Options.model_fields}
    allowed = sorted(set(AXES) | option_names)
    for name in rule:
        if name not in allowed:
            raise MatrixError(path, f"{key}.{name}", "unknown rule key" + did_you_mean(name, allowed), None, allowed)


def select_cells(path: Path, spec: MatrixFile, cells: list[Cell], rule: dict[str, Any]) -> list[Cell]:
    """The cells matching a --select rule; MatrixError naming a value no cell has, with the values cells have."""
    rule_keys(spec, rule, path, "--select")
    _check_values(path, cells, rule, "--select")
    chosen = [cell for cell in cells if matches(path, rule, cell, "--select")]
    if not chosen:
        raise MatrixError(path, "--select", "no cell has all of these values together", rule)
    return chosen


def _check_values(path: Path, cells: list[Cell], rule: dict[str, Any], key: str) -> None:
    """MatrixError naming a value of the rule that no cell has (a typo matches nothing), with the values they have."""
    for name, wanted in rule.items():
        present = [value for value in _values_of(cells, name) if value is not None]
        for value in _candidates(name, wanted):
            if value not in present:
                hint = did_you_mean(value, [str(p) for p in present]) if isinstance(value, str) else ""
                raise MatrixError(path, f"{key}.{name}", "no cell has this value" + hint, value, present)


def _values_of(cells: list[Cell], name: str) -> list[Any]:
    """The values the cells have for an axis or option, in first-seen order."""
    values: list[Any] = []
    for cell in cells:
        value = _rule_values(cell).get(name)
        if value not in values:
            values.append(value)
    return values


def matches(path: Path, rule: dict[str, Any], cell: Cell, key: str) -> bool:
    """Whether `cell` matches an include/exclude rule: every key equal to (or one of) the rule's values."""
    if not rule:
        raise MatrixError(path, key, "empty rule")
    values = _rule_values(cell)
    return all(values.get(name) in _candidates(name, wanted) for name, wanted in rule.items())


def _rule_values(cell: Cell) -> dict[str, Any]:
    """A cell's value of every key a rule may name: its axes, and its method's options (defaults included)."""
    return {
        **_option_defaults(method_class(cell.method).Options),
        **cell.options,
        **cell.axes(),
        "inductor": cell.inductor or "default",
        "regional": bool(cell.regional),
        "dynamic": "auto" if cell.dynamic is None else cell.dynamic,
        "attention": cell.attention,
        "batch_size": cell.batch_size,
        "lora": cell.lora,
        "lora_rank": cell.lora_rank,
    }


def _option_defaults(model: type[MethodOptions]) -> dict[str, Any]:
    """The options a cell leaves at their defaults (its `options` hold only the others)."""
    return {name: field.default for name, field in model.model_fields.items() if not field.is_required()}


def _candidates(name: str, wanted: Any) -> list[Any]:
    """A rule value as the list of values it accepts (`components` values are themselves lists)."""
    if name == "components":  # "transformer" and ["transformer", "vae"] are one group each, as in [axes]
        return [[wanted]] if isinstance(wanted, str) else wanted if wanted and isinstance(wanted[0], list) else [wanted]
    return wanted if isinstance(wanted, list) else [wanted]


def _included_cell(path: Path, spec: MatrixFile, rule: dict[str, Any], key: str, ranks: list[int]) -> Cell:
    """An extra cell from an include rule: its values, the first value of every other axis."""
    rule_keys(spec, rule, path, key)
    if "method" not in rule:
        raise MatrixError(path, f"{key}.method", "an include rule must name a method", None, method_names())
    method = rule["method"]
    if not isinstance(method, str):
        raise MatrixError(path, f"{key}.method", "an include rule names one method", method, method_names())
    try:
        cls = method_class(method)
    except KeyError as error:
        raise MatrixError(path, f"{key}.method", error.args[0], method, method_names()) from None
    base_options = expand_options(path, method, spec.method[method])[0] if method in spec.method else {}
    option_values = {k: v for k, v in rule.items() if k in cls.Options.model_fields}
    options = _validated_options(path, key, cls.Options, {**base_options, **option_values})
    axis_values = {
        name: rule.get(name, getattr(spec.axes, name)[0]) for name in AXES if name not in ("method", "lora_rank")
    }
    try:
        axes = Axes.model_validate({name: [value] for name, value in axis_values.items()} | {"method": [method]})
    except ValidationError as error:
        raise matrix_error(path, error, prefix=key) from None
    rank = rule.get("lora_rank")
    if rank is not None and rank not in ranks:
        raise MatrixError(path, f"{key}.lora_rank", "not a rank of the [lora] adapter", rank, ranks)
    return _product(axes, method, options, [rank] if rank is not None else ranks)[0]
