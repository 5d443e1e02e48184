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
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # cells run offline by default
    hub = check_cell(Cell(method="baseline", attention="flash_hub"), H200)
    assert hub.status == "unsupported" and "HF_HUB_OFFLINE=0" in hub.reason
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert check_cell(Cell(method="baseline", attention="flash_hub"), H200).status == "run", "the user allowed it"


def test_every_backend_needing_a_gpu_is_skipped_on_a_cpu_once_its_package_is_there(monkeypatch):
    monkeypatch.setattr(Requirement, "problem", lambda self: None)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # and the Hub reachable, for the `*_hub` backends
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

    toml = (REPO / "matrices/attention-cpu.toml").read_text()  # each cell's process started ahead, saving imports
    matrix = tmp_path / "attention-cpu.toml"
    matrix.write_text(toml.replace("[run]\n", '[run]\ncell_start = "prestarted"\n', 1))
    run_matrix(load_matrix(matrix), tmp_path / "results")
    rows = read_results(tmp_path / "results").set_index("cell_label")
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
    from bench.report import write_report

    markdown = write_report(tmp_path / "results", tmp_path / "report.md", report_format="md").read_text()
    lines = markdown.split("## Resolution changes", 1)[1].split("\n## ", 1)[0].splitlines()
    first = lines.index(next(line for line in lines if line.startswith("| baseline bf16 compile=default |")))
    cells = [line.split(" | ") for line in lines[first : first + 2]]
    assert [cell[1] for cell in cells] == ["64×64", "80×48"]  # width × height, in the order they ran
    assert cells[0][7] == "0" and cells[1][7] == str(default_second["timed_compiles"])  # the recompile's row
    assert sum(line.startswith("| ") and " | 80×48 | " in line for line in lines) == len(ran)  # every ok cell


def test_the_report_names_the_largest_batch_each_method_fits_on_each_card(tmp_path):
    from bench.report import render
    from bench.report.decision import GIB, decide
    from bench.store import ResultRow, ResultsFolder, read_results
    from bench.summary import cell_summary

    def row(cell_id: str, method: str, options: str, batch: int, peak_gib: float, e2e_s: float) -> ResultRow:
        label = f"{method} bf16" + (f" batch={batch}" if batch > 1 else "")
        return ResultRow(
            schema_version=1, matrix_name="m", matrix_path="m.toml", cell_id=cell_id, cell_label=label,
            timestamp_utc="t", status="ok", error=None, method=method, method_family=method,
            method_options=options, dtype="bf16", threshold=None, compile="off", fullgraph=None, inductor=None,
            regional=None, components=None, placement="device", model_source="builtin:flux-dev-shape",
            model_revision=None, pipeline_class="FluxPipeline", weights="synthetic", prompt_index=0, prompt="p",
            seed=0, height=1024, width=1024, num_inference_steps=4, guidance_scale=3.5, max_sequence_length=512,
            repeats=2, batch_size=batch, e2e_latency_median_s=e2e_s, step_latency_median_s=e2e_s / 4,
            images_per_s=batch / e2e_s, peak_reserved_bytes=int(peak_gib * GIB), transformer_tensor_bytes=GIB,
            device="cuda", image_path=f"images/{cell_id}/p0_s0.png", image_finite=True,
        )  # fmt: skip

    folder = ResultsFolder(tmp_path)
    folder.create()
    for cell in (
        row("a", "baseline", "{}", 1, 30, 2.0),
        row("b", "baseline", "{}", 4, 60, 7.0),
        row("c", "torchao", '{"quant_type": "float8dq"}', 1, 18, 1.5),
        row("d", "torchao", '{"quant_type": "float8dq"}', 4, 40, 5.0),
    ):
        folder.write_cell(cell.cell_id, [cell])
    frame = read_results(tmp_path)
    decision = decide(frame, cell_summary(frame), "H200", (80, 48, 24))
    picks = {(b.budget_gb, b.method): (b.batch_size, b.label) for b in decision.largest_batches}
    assert picks[(80, "baseline")] == (4, "baseline bf16 batch=4")
    assert picks[(48, "baseline")] == (1, "baseline bf16")  # 60 GiB + the context does not fit 48 GB
    assert picks[(48, "torchao[float8dq]")] == (4, "torchao bf16 batch=4")
    assert picks[(24, "torchao[float8dq]")] == (1, "torchao bf16")
    assert (24, "baseline") not in picks  # nothing of it fits
    one_batch = frame[frame["batch_size"] == 1]
    assert decide(one_batch, cell_summary(one_batch), "H200", (80,)).largest_batches == []
    html = render(frame, tmp_path, budgets_gb=(80, 48, 24))
    assert "The largest batch (<code>batch_size</code>) of each method" in html
    assert '<td>4</td><td>0.80</td><td class="text">torchao bf16 batch=4</td>' in html
    assert "batch 4: 0.80 images/s, 0.3125 s/step per image" in html, "the summary says what a batch's times mean"
