"""The attention, batch_size and dynamic axes and `[generation] resolutions`: matrix validation, capability
verdicts before any subprocess, ids of cells without them, and (slow) the CPU matrix run end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.attention import ATTENTION_BACKENDS, BACKENDS, Requirement
from bench.capability import check_cell
from bench.cells import Cell
from bench.environment import Machine
from bench.errors import MatrixError
from bench.matrix import load_matrix

REPO = Path(__file__).resolve().parent.parent
CPU = Machine(cuda_available=False)
H200 = Machine(cuda_available=True, cuda_capability=(9, 0), gpu_name="NVIDIA H200", gpu_count=1)
AMPERE = Machine(cuda_available=True, cuda_capability=(8, 0), gpu_name="NVIDIA A100", gpu_count=1)


def test_the_backends_are_exactly_the_names_diffusers_accepts():
    from diffusers.models.attention_dispatch import AttentionBackendName

    assert set(ATTENTION_BACKENDS) == {name.value for name in AttentionBackendName}


def test_backends_that_run_on_a_cpu_run_and_the_others_say_why_before_any_cell():
    verdicts = {c.attention: check_cell(c, CPU) for c in load_matrix(REPO / "matrices/attention-cpu.toml").cells}
    for name in ("native", "_native_math", "_native_flash", "flex"):
        assert verdicts[name].status == "run", name
    for name in ("_native_cudnn", "_native_efficient"):
        assert verdicts[name].status == "skipped"
        assert "needs a CUDA GPU" in verdicts[name].reason
    assert verdicts["sage"].status == "unsupported"
    assert "sageattention>=2.1.1" in verdicts["sage"].reason and "1.0.6" in verdicts["sage"].reason
    assert "flash-attn>=2.6.3" in verdicts["flash"].reason
    assert "Hub" in verdicts["flash_hub"].reason


def test_a_backend_with_its_package_still_needs_the_gpu_capability_and_dtype_it_was_built_for(monkeypatch):
    monkeypatch.setattr(Requirement, "problem", lambda self: None)  # as if sageattention 2 were installed
    sm90_fp8 = Cell(method="baseline", attention="_sage_qk_int8_pv_fp8_cuda_sm90")
    assert check_cell(sm90_fp8, H200).status == "run"
    on_ampere = check_cell(sm90_fp8, AMPERE)
    assert on_ampere.status == "skipped" and "compute capability >= 9.0" in on_ampere.reason
    fp32_flash = check_cell(Cell(method="baseline", dtype="fp32", attention="_native_flash"), H200)
    assert fp32_flash.status == "unsupported" and "bf16 or fp16" in fp32_flash.reason
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub = check_cell(Cell(method="baseline", attention="flash_hub"), H200)
    assert hub.status == "unsupported" and "HF_HUB_OFFLINE" in hub.reason


def test_every_backend_needing_a_gpu_is_skipped_on_a_cpu_once_its_package_is_there(monkeypatch):
    monkeypatch.setattr(Requirement, "problem", lambda self: None)
    for name, backend in BACKENDS.items():
        verdict = check_cell(Cell(method="baseline", attention=name), CPU)
        assert (verdict.status == "skipped") == (backend.cuda or backend.min_capability is not None), name


def test_new_axes_at_their_defaults_keep_cell_ids_and_vary_them_otherwise():
    context = {"model": {"builtin": "tiny-flux"}, "generation": {}}
    plain = Cell(method="baseline").with_id(context)
    assert set(plain.axes()).isdisjoint({"attention", "batch_size", "dynamic"})
    assert plain.id == Cell(method="baseline", attention="native", batch_size=1, dynamic=None).with_id(context).id
    others = {
        Cell(method="baseline", attention="flex").with_id(context).id,
        Cell(method="baseline", batch_size=4).with_id(context).id,
        Cell(method="baseline", compile="default", dynamic=True).with_id(context).id,
        Cell(method="baseline", compile="default").with_id(context).id,
    }
    assert plain.id not in others and len(others) == 4


def test_batch_and_attention_are_axes_and_dynamic_varies_compiled_cells_only(make_matrix):
    axes = {
        "method": ["baseline"],
        "attention": ["native", "_native_math"],
        "batch_size": [1, 2],
        "compile": ["off", "default"],
        "dynamic": ["auto", False],
    }
    cells = load_matrix(make_matrix(axes=axes)).cells
    assert len(cells) == 2 * 2 * (1 + 2)
    assert {c.dynamic for c in cells if c.compile == "off"} == {None}
    assert {c.dynamic for c in cells if c.compile != "off"} == {None, False}
    label = next(c.label for c in cells if c.attention == "_native_math" and c.batch_size == 2 and c.dynamic is False)
    assert label == "baseline bf16 compile=default+dynamic=false attention=_native_math batch=2"
    selected = load_matrix(make_matrix(axes=axes), select=["attention=_native_math", "batch_size=2"]).cells
    assert {(c.attention, c.batch_size) for c in selected} == {("_native_math", 2)}


def test_resolutions_set_the_size_and_enter_the_cell_id(make_matrix):
    plain = load_matrix(make_matrix(generation={"height": 64, "width": 64}))
    matrix = load_matrix(make_matrix(generation={"resolutions": [[64, 64], [48, 80]]}))
    assert (matrix.generation.height, matrix.generation.width) == (64, 64)
    assert "resolutions" not in plain.generation.identity()
    assert {c.id for c in matrix.cells}.isdisjoint({c.id for c in plain.cells})


@pytest.mark.parametrize(
    ("sections", "fragments"),
    [
        ({"axes": {"method": ["baseline"], "attention": ["sdpa"]}}, ["axes.attention.0", "'sdpa'", "_native_cudnn"]),
        ({"axes": {"method": ["baseline"], "batch_size": [0]}}, ["axes.batch_size.0", "greater than or equal to 1"]),
        ({"axes": {"method": ["baseline"], "dynamic": ["yes"]}}, ["axes.dynamic.0", "'yes'"]),
        ({"generation": {"resolutions": [[64, 64], [50, 64]]}}, ["generation.resolutions.1.0", "multiple of 16"]),
        ({"generation": {"resolutions": [[64]]}}, ["generation.resolutions.0", "at least 2"]),
        (
            {"generation": {"height": 64, "width": 64, "resolutions": [[48, 80]]}},
            ["generation", "resolutions[0] ([48, 80])", "[height, width] ([64, 64])"],
        ),
    ],
)
def test_bad_axis_or_resolution_is_one_error_naming_key_and_value(make_matrix, sections, fragments):
    with pytest.raises(MatrixError) as caught:
        load_matrix(make_matrix(**sections))
    for fragment in fragments:
        assert fragment in str(caught.value)


def test_the_h200_matrices_load_with_their_cells():
    attention = load_matrix(REPO / "matrices/attention-h200.toml")
    # methods x (3 backends eager and compiled + flex compiled) x batch sizes
    assert len(attention.cells) == 3 * (3 * 2 + 1) * 2
    assert not [c for c in attention.cells if c.attention == "flex" and c.compile == "off"]
    assert {check_cell(c, H200).status for c in attention.cells if c.method == "baseline"} == {"run"}
    resolutions = load_matrix(REPO / "matrices/resolutions-h200.toml")
    assert resolutions.generation.resolutions[0] == [1024, 1024]
    assert {c.dynamic for c in resolutions.cells if c.compile != "off"} == {None, True, False}


@pytest.mark.slow
def test_the_cpu_attention_matrix_runs_each_backend_batch_and_size(tmp_path):
    """Runs matrices/attention-cpu.toml: 7 cells in subprocesses (2 compiled), 7 without one; minutes on 2 cores."""
    from bench.runner import run_matrix
    from bench.store import read_results

    run_matrix(load_matrix(REPO / "matrices/attention-cpu.toml"), tmp_path)
    rows = read_results(tmp_path).set_index("cell_label")
    ran = rows[rows.status == "ok"]
    assert set(ran.attention) == {"native", "_native_math", "_native_flash", "flex"}
    assert (ran.attention_backend == ran.attention).all()  # every attention module dispatched to the one asked for
    assert set(rows[rows.status == "skipped"].attention) == {"_native_cudnn", "_native_efficient"}
    assert rows.loc["baseline bf16 attention=sage", "status"] == "unsupported"
    # another attention kernel moves the latents a little; native against the native reference does not
    assert rows.loc["baseline bf16", "latent_rel_l2"] == 0
    assert 0 < rows.loc["baseline bf16 attention=_native_math", "latent_rel_l2"] < 0.05
    batch = rows.loc["baseline bf16 batch=2"]
    assert batch.batch_size == 2
    assert batch.e2e_latency_per_image_s == pytest.approx(batch.e2e_latency_median_s / 2)
    assert batch.images_per_s == pytest.approx(2 / batch.e2e_latency_median_s)
    assert batch.latent_rel_l2 < 0.01  # its first image starts from the noise a batch of one starts from
    for label in ("baseline bf16 compile=default", "baseline bf16 compile=default+dynamic=true"):
        sizes = json.loads(rows.loc[label, "per_resolution"])
        assert [(s["height"], s["width"]) for s in sizes] == [(64, 64), (48, 80)]
        assert sizes[0]["timed_compiles"] == 0  # warm at the first size
        assert all(len(s["e2e_latency_s"]) == 2 and s["peak_reserved_bytes"] is None for s in sizes)
    default_second = json.loads(rows.loc["baseline bf16 compile=default", "per_resolution"])[1]
    assert default_second["timed_compiles"] > 0  # torch's default recompiles at a new size
