"""Matrix files: expansion, collapse of axes that do not apply, include/exclude, ids, validation errors."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from bench.errors import MatrixError
from bench.matrix import load_matrix
from tests.conftest import matrix_data, write_matrix

ROOT = Path(__file__).resolve().parent.parent


def test_product_of_axes_and_method_options(make_matrix):
    path = make_matrix(
        axes={"method": ["baseline", "torchao"], "dtype": ["bf16", "fp16"], "compile": ["off", "default"]},
        method={"torchao": {"quant_type": ["int8wo", "int8dq"]}},
    )
    cells = load_matrix(path).cells
    # baseline: 2 dtypes x 2 compile; torchao: 2 quant types x 2 dtypes x 2 compile
    assert len(cells) == 4 + 8
    assert {c.options.get("quant_type") for c in cells if c.method == "torchao"} == {"int8wo", "int8dq"}
    assert len({c.id for c in cells}) == len(cells)


def test_threshold_axis_collapses_for_methods_that_do_not_use_it(make_matrix):
    path = make_matrix(axes={"method": ["baseline", "torchao"], "threshold": [4.0, 6.0, 10.0]})
    cells = load_matrix(path).cells
    assert len(cells) == 2
    assert all(c.threshold is None for c in cells)


def test_components_axis_collapses_for_the_unquantized_baseline(make_matrix):
    path = make_matrix(
        axes={"method": ["baseline", "torchao"], "components": [["transformer"], ["transformer", "text_encoder_2"]]}
    )
    cells = load_matrix(path).cells
    assert [c.components for c in cells if c.method == "baseline"] == [None]
    assert {c.components for c in cells if c.method == "torchao"} == {
        ("transformer",),
        ("transformer", "text_encoder_2"),
    }


def test_fullgraph_collapses_when_compile_is_off(make_matrix):
    path = make_matrix(axes={"method": ["baseline"], "compile": ["off", "default"], "fullgraph": [False, True]})
    cells = load_matrix(path).cells
    assert sorted((c.compile, c.fullgraph) for c in cells) == [("default", False), ("default", True), ("off", None)]


def test_exclude_removes_matching_cells_and_include_adds_one(make_matrix):
    path = make_matrix(
        axes={"method": ["baseline", "torchao"], "compile": ["off", "default"]},
        method={"torchao": {"quant_type": ["int8wo", "int8dq"]}},
        exclude=[{"method": "torchao", "quant_type": "int8dq", "compile": "default"}],
        include=[{"method": "torchao", "quant_type": "int8wo", "compile": "max-autotune"}],
    )
    cells = load_matrix(path).cells
    keys = {(c.method, c.options.get("quant_type"), c.compile) for c in cells}
    assert ("torchao", "int8dq", "default") not in keys
    assert ("torchao", "int8dq", "off") in keys
    assert ("torchao", "int8wo", "max-autotune") in keys
    assert len(cells) == 2 + 4 - 1 + 1


def test_include_may_name_a_method_outside_the_axes_with_its_own_options(tmp_path):
    data = matrix_data(
        axes={"method": ["baseline"]}, include=[{"method": "torchao", "quant_type": "float8wo", "serialize": True}]
    )
    del data["method"]  # no [method.torchao] table: the rule alone says what the cell is
    (added,) = [c for c in load_matrix(write_matrix(tmp_path, data)).cells if c.method == "torchao"]
    assert added.options == {"quant_type": "float8wo", "serialize": True}
    data["include"] = [{"method": "torchao"}]
    with pytest.raises(MatrixError, match="include.0.quant_type: Field required"):
        load_matrix(write_matrix(tmp_path, data, "bad.toml"))


def test_include_of_an_existing_cell_adds_no_duplicate(make_matrix):
    path = make_matrix(include=[{"method": "baseline", "dtype": "bf16"}])
    assert len(load_matrix(path).cells) == 2


def test_cell_ids_are_stable_and_depend_on_generation_settings(make_matrix):
    first = [c.id for c in load_matrix(make_matrix("a.toml")).cells]
    again = [c.id for c in load_matrix(make_matrix("b.toml")).cells]
    other_steps = [c.id for c in load_matrix(make_matrix("c.toml", generation={"num_inference_steps": 5})).cells]
    assert first == again
    assert set(first).isdisjoint(other_steps)
    assert all(len(i) == 12 and int(i, 16) >= 0 for i in first)
    extrapolated = [c.id for c in load_matrix(make_matrix("d.toml", generation={"extrapolate_to_steps": 50})).cells]
    assert extrapolated == first, "extrapolation changes what rows report, not what cells compute"


def test_cell_id_ignores_the_order_of_option_keys(tmp_path):
    data = matrix_data(method={"torchao": {"quant_type": "int8wo", "group_size": 64}})
    reordered = matrix_data(method={"torchao": {"group_size": 64, "quant_type": "int8wo"}})
    a = load_matrix(write_matrix(tmp_path, data, "a.toml")).cells
    b = load_matrix(write_matrix(tmp_path, reordered, "b.toml")).cells
    assert [c.id for c in a] == [c.id for c in b]


@pytest.mark.parametrize(
    ("sections", "key", "fragments"),
    [
        (
            {"axes": {"method": ["baseline", "torchoa"]}},
            "axes.method",
            [
                "unknown method 'torchoa'",
                "did you mean 'torchao'",
                "allowed: auto_round, baseline, bfl, bnb_4bit, bnb_8bit, gguf, layerwise_fp8, modelopt, nunchaku_lite, quanto, sdnq, torchao",
            ],
        ),
        (
            {"axes": {"method": ["baseline"], "dtype": ["bf32"]}},
            "axes.dtype.0",
            ["not an allowed value", "'bf32'", "allowed: bf16, fp16, fp32"],
        ),
        (
            {"axes": {"method": ["baseline"], "compile": ["fast"]}},
            "axes.compile.0",
            ["allowed: off, default, max-autotune"],
        ),
        ({"generation": {"steps": 4}}, "generation.steps", ["unknown key", "allowed:", "num_inference_steps"]),
        ({"generation": {"height": "tall"}}, "generation.height", ["'tall'"]),
        ({"generation": {"repeats": -1}}, "generation.repeats", ["greater than or equal to 1"]),
        ({"generation": {"seeds": []}}, "generation.seeds", ["at least 1"]),
        ({"axes": {"method": []}}, "axes.method", ["at least 1"]),
        (
            {"method": {"torchao": {"quant_type": "int3dq"}}},
            "method.torchao.quant_type",
            ["unknown torchao quant_type", "int8wo"],
        ),
        ({"method": {"torchao": {"quant_type": "fp6_e3m3"}}}, "method.torchao.quant_type", ["X must equal A + B + 1"]),
        (
            {"method": {"torchao": {"quant_type": "int8wo", "bits": 4}}},
            "method.torchao.bits",
            ["unknown option", "allowed: group_size, modules_to_not_convert, pipeline_config, quant_type, serialize"],
        ),
        (
            {"method": {"torchoa": {"quant_type": "int8wo"}}},
            "method.torchoa",
            ["unknown method", "did you mean 'torchao'"],
        ),
        ({"model": {"builtin": "tiny-flux", "hub": "a/b"}}, "model", ["exactly one of builtin, path, hub"]),
        ({"model": {"builtin": "huge-flux"}}, "model.builtin", ["allowed: tiny-flux"]),
        ({"name": "../escape"}, "name", ["no path separators"]),
        ({"exclude": [{"methd": "baseline"}]}, "exclude.0.methd", ["unknown rule key; did you mean 'method'?"]),
        (
            {"exclude": [{"method": "baseline"}, {"quant_type": "Q4_0"}]},
            "exclude.1.quant_type",
            ["no cell has this value (got 'Q4_0'); allowed: int8wo"],
        ),
        (
            {"method": {"torchao": {"quant_typ": "int8wo"}}},
            "method.torchao.quant_typ",
            ["unknown option; did you mean 'quant_type'?"],
        ),
        (
            {"method": {"gguf": {"quant_type": "Q8_0"}}},
            "method.gguf",
            ["options for a method no cell uses; axes.method has ['baseline', 'torchao']"],
        ),
        (
            {"method": {"gguf": {"quant_type": "Q8_0"}}, "include": [{"method": "torchao", "compile": "default"}]},
            "method.gguf",
            ["axes.method has ['baseline', 'torchao'] and [[include]] ['torchao']"],
        ),
        ({"axes": {"method": "baseline", "compile": "fast"}}, "axes.compile.0", ["(got 'fast'); allowed: off"]),
        ({"axes": {"method": "baseline", "components": 3}}, "axes.components.0", ["valid list"]),
        ({"include": [{"dtype": "fp16"}]}, "include.0.method", ["must name a method"]),
        ({"include": [{"method": "baseline", "dtype": "fp8"}]}, "include.0.dtype", ["allowed: bf16, fp16, fp32"]),
        ({"exclude": [{"method": ["baseline", "torchao"]}]}, "exclude", ["exclude every cell"]),
        (
            {"generation": {"num_inference_steps": 4, "extrapolate_to_steps": 4}},
            "generation",
            ["extrapolate_to_steps (4) must exceed num_inference_steps (4)"],
        ),
        (
            {"run": {"timeout_s": 600, "compile_timeout_s": 900}},
            "run",
            ["compile_timeout_s (900 s for default) must be less than timeout_s (600)"],
        ),
        (
            {"run": {"timeout_s": 600, "compile_timeout_s": {"default": 300, "max-autotune": 900}}},
            "run",
            ["compile_timeout_s (900 s for max-autotune) must be less than timeout_s (600)"],
        ),
        ({"run": {"compile_timeout_s": -5}}, "run.compile_timeout_s", ["more than 0", "(got -5)"]),
        (
            {"run": {"compile_timeout_s": {"autotune": 300}}},
            "run.compile_timeout_s.autotune",
            ["not an allowed value", "allowed: default, max-autotune, reduce-overhead, max-autotune-no-cudagraphs"],
        ),
    ],
)
def test_bad_matrix_gets_one_error_naming_file_key_value_and_allowed(tmp_path, sections, key, fragments):
    path = write_matrix(tmp_path, matrix_data(**sections))
    with pytest.raises(MatrixError) as caught:
        load_matrix(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: {key}:"), message
    for fragment in fragments:
        assert fragment in message, message
    assert "\n" not in message


def test_missing_model_path_is_reported_before_any_work(tmp_path):
    data = matrix_data()
    data["model"] = {"path": "no/such/folder"}
    path = write_matrix(tmp_path, data)
    with pytest.raises(MatrixError) as caught:
        load_matrix(path)
    resolved = (tmp_path / "no/such/folder").resolve()
    assert str(caught.value) == f"{path}: model.path: no such folder: {resolved} (got 'no/such/folder')"


@pytest.mark.parametrize(
    ("written", "meant", "fragment"),
    [
        ("generaton", "generation", "unknown key; did you mean 'generation'? [and 1 more problem]"),
        ("axis", "axes", "unknown key; did you mean 'axes'? [and 1 more problem]"),
    ],
)
def test_a_misspelled_table_is_reported_as_unknown_before_the_missing_one(tmp_path, written, meant, fragment):
    data = matrix_data()
    data[written] = data.pop(meant)
    path = write_matrix(tmp_path, data)
    with pytest.raises(MatrixError) as caught:
        load_matrix(path)
    assert str(caught.value).startswith(f"{path}: {written}: {fragment}"), caught.value
    assert "allowed: axes, drift, exclude, gates, generation, include, lora, method, model, name, run" in str(
        caught.value
    )


def test_an_empty_matrix_names_every_table_it_needs(tmp_path):
    path = tmp_path / "empty.toml"
    path.write_text("")
    with pytest.raises(MatrixError) as caught:
        load_matrix(path)
    assert str(caught.value) == f"{path}: model: missing required key (also missing: generation, axes)"


@pytest.mark.parametrize(
    ("content", "fragment"),
    [(b"[model\nbuiltin=1", "invalid TOML"), (b'name = "\xff\xfe"', "not UTF-8")],
)
def test_unreadable_matrix_file_is_a_clear_error(tmp_path, content, fragment):
    path = tmp_path / "bad.toml"
    path.write_bytes(content)
    with pytest.raises(MatrixError, match=fragment):
        load_matrix(path)


def test_the_inductor_axis_varies_compiled_cells_only_and_keeps_default_ids(make_matrix):
    plain = load_matrix(make_matrix(axes={"method": ["baseline"], "compile": ["off", "default"]})).cells
    path = make_matrix(
        axes={"method": ["baseline"], "compile": ["off", "default"], "inductor": ["default", "diffusers"]}
    )
    cells = load_matrix(path).cells
    assert sorted((c.compile, c.inductor or "-") for c in cells) == [
        ("default", "-"),
        ("default", "diffusers"),
        ("off", "-"),
    ]
    assert {c.id for c in plain} < {c.id for c in cells}, "cells on Inductor's defaults keep the ids they had"
    assert [c.label for c in cells if c.inductor] == ["baseline bf16 compile=default+inductor=diffusers"]
    with pytest.raises(
        MatrixError,
        match=r"axes\.inductor.*allowed: default, stock, torchao, diffusers, no-pattern-matcher, stock-no-pattern-matcher, "
        r"capture-dynamic-output-shapes",
    ):
        load_matrix(make_matrix(axes={"method": ["baseline"], "inductor": ["fast"]}))


def test_the_regional_axis_varies_compiled_cells_only_and_keeps_whole_model_ids(make_matrix):
    plain = load_matrix(make_matrix(axes={"method": ["baseline"], "compile": ["off", "default"]})).cells
    path = make_matrix(axes={"method": ["baseline"], "compile": ["off", "default"], "regional": [False, True]})
    cells = load_matrix(path).cells
    assert sorted((c.compile, c.regional) for c in cells if not c.regional) == [("default", None), ("off", None)]
    assert [c.label for c in cells if c.regional] == ["baseline bf16 compile=default+regional"]
    assert {c.id for c in plain} < {c.id for c in cells}, "whole-model compiled cells keep the ids they had"
    assert len(load_matrix(path, select=["regional=true"]).cells) == 1
    with pytest.raises(MatrixError, match=r"axes\.regional"):
        load_matrix(make_matrix(axes={"method": ["baseline"], "regional": ["blocks"]}))


def test_compile_limit_is_one_number_for_every_mode_or_one_per_mode():
    from bench.matrix import RunSettings

    every = RunSettings(timeout_s=1500, compile_timeout_s=420)
    assert [every.compile_limit_s(m) for m in ("off", "default", "max-autotune")] == [None, 420, 420]
    per_mode = RunSettings(timeout_s=1500, compile_timeout_s={"default": 600, "max-autotune": 1200})
    assert [per_mode.compile_limit_s(m) for m in ("default", "max-autotune", "reduce-overhead")] == [600, 1200, None]
    assert RunSettings().compile_limit_s("default") is None


def test_labels_show_option_values_flags_and_lists_by_name(make_matrix):
    path = make_matrix(
        axes={"method": ["bnb_8bit", "bnb_4bit"]},
        method={
            "bnb_8bit": {"llm_int8_skip_modules": [["proj_out", "norm_out"]]},
            "bnb_4bit": {"bnb_4bit_quant_type": "fp4", "bnb_4bit_use_double_quant": True},
        },
    )
    assert sorted(cell.label for cell in load_matrix(path).cells) == [
        "bnb_4bit[fp4,bnb_4bit_use_double_quant] bf16",
        "bnb_8bit[llm_int8_skip_modules=proj_out+norm_out] bf16 threshold=6",
    ]


def test_select_keeps_a_subset_with_the_full_matrix_ids(make_matrix):
    path = make_matrix(
        axes={"method": ["baseline", "torchao", "gguf"], "compile": ["off", "default"]},
        method={"torchao": {"quant_type": ["int8wo", "float8wo"]}, "gguf": {"quant_type": ["Q8_0", "Q4_0"]}},
    )
    full = {cell.label: cell.id for cell in load_matrix(path).cells}
    eager = load_matrix(path, select=["compile=off"]).cells
    assert len(eager) == len(full) / 2 and all(full[cell.label] == cell.id for cell in eager)
    across_methods = load_matrix(path, select=["compile=default", 'quant_type=["int8wo","Q8_0"]']).cells
    assert sorted(cell.label for cell in across_methods) == [
        "gguf[Q8_0] bf16 compile=default",
        "torchao[int8wo] bf16 compile=default",
    ]
    serialized = make_matrix(
        axes={"method": ["torchao"]}, method={"torchao": {"quant_type": "int8wo", "serialize": [False, True]}}
    )
    assert [c.options for c in load_matrix(serialized, select=["serialize=false"]).cells] == [
        {"quant_type": "int8wo"}
    ], "an option left at its default is selected by that default"
    with pytest.raises(MatrixError, match=r"--select\.quant: unknown rule key; did you mean 'quant_type'\?"):
        load_matrix(path, select=["quant=int8wo"])


@pytest.mark.parametrize(
    ("select", "message"),
    [
        (
            ["method=torchoa"],
            "--select.method: no cell has this value; did you mean 'torchao'? (got 'torchoa');"
            " allowed: baseline, torchao, gguf",
        ),
        (
            ['quant_type=["int8wo","Q2_K"]'],
            "--select.quant_type: no cell has this value (got 'Q2_K'); allowed: int8wo, float8wo, Q8_0, Q4_0",
        ),
        (
            ["compile=max-autotune"],
            "--select.compile: no cell has this value (got 'max-autotune'); allowed: off, default",
        ),
        (
            ['quant_type=["int8wo"'],
            "--select: VALUE is not valid TOML (a list needs its ], a string its quotes) (got 'quant_type=[\"int8wo\"')",
        ),
        (
            ["method=baseline", "quant_type=int8wo"],
            "--select: no cell has all of these values together (got {'method': 'baseline', 'quant_type': 'int8wo'})",
        ),
    ],
)
def test_a_select_no_cell_matches_names_the_key_and_the_values_cells_have(make_matrix, select, message):
    path = make_matrix(
        axes={"method": ["baseline", "torchao", "gguf"], "compile": ["off", "default"]},
        method={"torchao": {"quant_type": ["int8wo", "float8wo"]}, "gguf": {"quant_type": ["Q8_0", "Q4_0"]}},
    )
    with pytest.raises(MatrixError) as caught:
        load_matrix(path, select=select)
    assert str(caught.value) == f"{path}: {message}"


def _one_value_axes_as_scalars(axes: dict) -> dict:
    """The axes with every one-value axis, and every axis left at its default, written as a single value."""
    from bench.matrix import Axes

    defaults = {name: field.default for name, field in Axes.model_fields.items() if not field.is_required()}
    axes = {**defaults, **axes}
    scalars = {name: values[0] for name, values in axes.items() if len(values) == 1}
    if len(axes["components"]) == 1:  # one group: its one name, or its names as a flat list
        group = axes["components"][0]
        scalars["components"] = group[0] if len(group) == 1 else group
    return {**axes, **scalars}


@pytest.mark.parametrize("committed", sorted((ROOT / "matrices").glob("*.toml")), ids=lambda p: p.stem)
def test_single_values_in_axes_are_one_value_axes_with_the_same_cell_ids(tmp_path, committed):
    data = tomllib.loads(committed.read_text())
    axes = _one_value_axes_as_scalars(data["axes"])
    assert any(not isinstance(value, list) for value in axes.values())
    copy = write_matrix(tmp_path, {**data, "name": committed.stem, "axes": axes})  # no matrix has a relative path
    assert [c.id for c in load_matrix(copy).cells] == [c.id for c in load_matrix(committed).cells]


def test_single_values_in_axes_work_with_include_and_exclude_rules(make_matrix):
    as_lists = make_matrix(
        "lists.toml",
        axes={"method": ["torchao"], "compile": ["default"], "regional": [True], "components": [["transformer"]]},
        exclude=[{"quant_type": "int8dq"}],
        include=[{"method": "baseline", "compile": "off"}],
        method={"torchao": {"quant_type": ["int8wo", "int8dq"]}},
    )
    as_scalars = make_matrix(
        "scalars.toml",
        axes={"method": "torchao", "compile": "default", "regional": True, "components": "transformer"},
        exclude=[{"quant_type": "int8dq"}],
        include=[{"method": "baseline", "compile": "off"}],
        method={"torchao": {"quant_type": ["int8wo", "int8dq"]}},
    )
    cells = load_matrix(as_scalars).cells
    assert [c.label for c in cells] == ["torchao[int8wo] bf16 compile=default+regional", "baseline bf16"]
    assert [c.id for c in cells] == [c.id for c in load_matrix(as_lists).cells]
    grouped = make_matrix("group.toml", axes={"method": "torchao", "components": ["transformer", "text_encoder_2"]})
    assert [c.components for c in load_matrix(grouped).cells] == [("transformer", "text_encoder_2")]


def test_a_components_group_written_as_a_string_matches_in_exclude_and_select(make_matrix):
    path = make_matrix(
        "groups.toml",
        axes={"method": "torchao", "components": [["transformer"], ["transformer", "text_encoder_2"]]},
        exclude=[{"components": "transformer"}],
    )
    assert [c.components for c in load_matrix(path).cells] == [("transformer", "text_encoder_2")]
    both = make_matrix("both.toml", axes={"method": "torchao", "components": [["transformer"], ["transformer", "vae"]]})
    assert [c.components for c in load_matrix(both, ["components=transformer"]).cells] == [("transformer",)]


def test_an_include_rule_naming_several_methods_is_one_clear_error(make_matrix):
    path = make_matrix("several.toml", include=[{"method": ["baseline", "torchao"], "compile": "default"}])
    with pytest.raises(MatrixError, match=r"include\.0\.method: an include rule names one method"):
        load_matrix(path)
