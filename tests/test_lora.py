"""LoRA on quantized models (bench/lora.py): the `[lora]` table and the `lora` axis, synthetic adapters built for
the model's own shapes, a drift reference per adapter, bad adapter files, and (slow) the modes run for real."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tomli_w
from PIL import Image

from bench.errors import MatrixError
from bench.lora import (
    DEFAULT_TARGETS,
    CellAdapters,
    attach_adapter,
    file_adapter,
    linear_shapes,
    safetensors_header,
    synthetic_adapter,
)
from bench.matrix import load_matrix
from bench.reference_cache import reference_key
from tests.conftest import matrix_data, write_matrix

ROOT = Path(__file__).resolve().parents[1]
SYNTHETIC = {"synthetic": {"rank": 4}}


@pytest.fixture(scope="module")
def tiny_flux() -> Path:
    from bench.models.builtin import build_builtin

    return build_builtin("tiny-flux")


def lora_matrix(folder: Path, lora: dict, axes: dict | None = None, **sections) -> Path:
    """The smoke matrix (baseline and torchao int8wo) with a `[lora]` table and LoRA axes."""
    data = matrix_data(axes={"method": ["baseline", "torchao"], **(axes or {})}, lora=lora, **sections)
    return write_matrix(folder, data)


def test_synthetic_adapter_has_the_models_shapes_and_is_cached_by_what_made_it(tiny_flux):
    adapter = synthetic_adapter(tiny_flux, 4, list(DEFAULT_TARGETS), seed=0)
    header = safetensors_header(Path(adapter.path))
    shapes = linear_shapes(tiny_flux / "transformer", list(DEFAULT_TARGETS))
    assert shapes and all(name.endswith(DEFAULT_TARGETS) for name in shapes)
    for module, (out_features, in_features) in shapes.items():
        assert header[f"transformer.{module}.lora_A.weight"]["shape"] == [4, in_features]
        assert header[f"transformer.{module}.lora_B.weight"]["shape"] == [out_features, 4]
    assert len(header) == 2 * len(shapes), "one A and one B per targeted layer, nothing else"
    again = synthetic_adapter(tiny_flux, 4, list(DEFAULT_TARGETS), seed=0)
    assert again == adapter, "the same inputs give the cached file"
    others = {
        synthetic_adapter(tiny_flux, 8, list(DEFAULT_TARGETS), seed=0).identity,
        synthetic_adapter(tiny_flux, 4, list(DEFAULT_TARGETS), seed=1).identity,
        synthetic_adapter(tiny_flux, 4, ["to_q"], seed=0).identity,
    }
    assert adapter.identity not in others and len(others) == 3
    assert file_adapter(Path(adapter.path)).rank == 4 and not file_adapter(Path(adapter.path)).peft_format


def test_synthetic_adapter_loads_through_load_lora_weights_and_changes_the_output(tiny_flux, tmp_path):
    import torch
    from diffusers import FluxPipeline

    from bench.contract import Measurements
    from bench.trackers.latency import Clock

    def generate(pipe):
        kwargs = dict(height=64, width=64, num_inference_steps=2, max_sequence_length=32, output_type="np")
        return pipe("a red apple", generator=torch.Generator().manual_seed(0), **kwargs).images[0]

    pipe = FluxPipeline.from_pretrained(tiny_flux, torch_dtype=torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    without = generate(pipe)
    adapter = synthetic_adapter(tiny_flux, 4, list(DEFAULT_TARGETS), seed=0)
    measured = Measurements()
    attach_adapter(pipe, CellAdapters("unfused", adapter.to_json()), Clock(False), measured)
    layers = [name for name, module in pipe.transformer.named_modules() if hasattr(module, "lora_A")]
    assert len(layers) == len(linear_shapes(tiny_flux / "transformer", list(DEFAULT_TARGETS)))
    assert measured.lora_load_s > 0 and measured.lora_fuse_s is None
    unfused = generate(pipe)
    assert np.abs(unfused - without).mean() > 1e-3, "the adapter changes the image"
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    fused = generate(pipe)
    assert not any(hasattr(module, "lora_A") for module in pipe.transformer.modules()), "fused, then unloaded"
    assert np.abs(fused - unfused).mean() < np.abs(unfused - without).mean(), "fused is about unfused"

    from safetensors.torch import load_file, save_file

    peft_file = tmp_path / "peft-layout.safetensors"  # the same adapter as PEFT's save_pretrained lays it out
    tensors = load_file(adapter.path)
    save_file({f"base_model.model.{k.removeprefix('transformer.')}": v for k, v in tensors.items()}, str(peft_file))
    peft_adapter = file_adapter(peft_file)
    assert peft_adapter.peft_format
    pipe = FluxPipeline.from_pretrained(tiny_flux, torch_dtype=torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    attach_adapter(pipe, CellAdapters("unfused", peft_adapter.to_json()), Clock(False), Measurements())
    assert np.array_equal(generate(pipe), unfused), "the PEFT layout loads as the same adapter"


def test_lora_axis_expands_modes_and_ranks_and_the_adapter_is_part_of_the_cell_id(tmp_path):
    lora = {"synthetic": {"rank": [4, 8]}}
    matrix = load_matrix(lora_matrix(tmp_path, lora, {"lora": ["none", "unfused", "fused"]}))
    cells = {(c.method, c.lora, c.lora_rank) for c in matrix.cells}
    assert cells == {
        (method, mode, rank)
        for method in ("baseline", "torchao")
        for mode, rank in [("none", None), ("unfused", 4), ("unfused", 8), ("fused", 4), ("fused", 8)]
    }
    plain = load_matrix(write_matrix(tmp_path, matrix_data(), "plain.toml"))
    none_ids = {c.id for c in matrix.cells if c.lora == "none"}
    assert none_ids == {c.id for c in plain.cells}, "cells without an adapter keep the ids they had"
    reseeded = load_matrix(lora_matrix(tmp_path, {"synthetic": {"rank": [4, 8], "seed": 5}}, {"lora": ["unfused"]}))
    assert not {c.id for c in reseeded.cells} & {c.id for c in matrix.cells}, "another adapter, other cells"
    assert "lora=fused r8" in next(c.label for c in matrix.cells if c.lora == "fused" and c.lora_rank == 8)


def test_include_and_select_rules_take_the_lora_axes(tmp_path):
    include = [{"method": "baseline", "compile": "default", "lora": "hotswap", "lora_rank": 8}]
    path = lora_matrix(tmp_path, {"synthetic": {"rank": [4, 8]}}, {"lora": ["none"]}, include=include)
    hotswap = [c for c in load_matrix(path).cells if c.lora == "hotswap"]
    assert [(c.method, c.compile, c.lora_rank) for c in hotswap] == [("baseline", "default", 8)]
    selected = load_matrix(path, select=["lora=hotswap"]).cells
    assert [c.id for c in selected] == [hotswap[0].id]


def test_reference_keys_differ_per_adapter_and_stay_the_same_without_one():
    args = ({"builtin": "tiny-flux"}, matrix_data()["generation"] | {"guidance_scale": 3.5}, "a prompt", 0, "bf16")
    plain = reference_key(*args, "cpu")
    assert reference_key(*args, "cpu", None) == plain
    keys = {plain, reference_key(*args, "cpu", "synthetic-aaaa"), reference_key(*args, "cpu", "synthetic-bbbb")}
    assert len(keys) == 3


@pytest.mark.parametrize(
    ("lora", "axes", "key", "words"),
    [
        ({"path": "adapter.bin"}, {"lora": ["unfused"]}, "lora.path", "only .safetensors"),
        ({"path": "missing.safetensors"}, {"lora": ["unfused"]}, "lora.path", "no such file"),
        ({"path": "broken.safetensors"}, {"lora": ["unfused"]}, "lora.path", "not a readable safetensors"),
        ({"path": "plain.safetensors"}, {"lora": ["unfused"]}, "lora.path", "no LoRA weights"),
        ({"path": "peft.safetensors"}, {"lora": ["hotswap"]}, "lora.hotswap_path", "second adapter"),
        (None, {"lora": ["fused"]}, "axes.lora", "add a [lora] table"),
        ({"synthetic": {"rank": 4, "seed": 1}}, {"lora": ["unfused"]}, "lora.synthetic", "hotswap_seed must differ"),
        ({"synthetic": {"rank": 4}, "path": "peft.safetensors"}, {"lora": ["unfused"]}, "lora", "exactly one of"),
    ],
)
def test_bad_lora_tables_are_one_line_naming_the_key(tmp_path, lora, axes, key, words):
    _adapter_files(tmp_path)
    data = matrix_data(axes={"method": ["baseline"], **axes}, **({"lora": lora} if lora else {}))
    path = write_matrix(tmp_path, data)
    with pytest.raises(MatrixError) as caught:
        load_matrix(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: {key}") and words in message and "\n" not in message
    if key == "lora.path":  # the file as resolved, and no "allowed" list (nothing to pick from)
        assert f": {(tmp_path / lora['path']).resolve()} (got " in message and "allowed" not in message, message


def test_a_lora_file_that_is_not_safetensors_exits_2_before_any_work(tmp_path):
    _adapter_files(tmp_path)
    write_matrix(
        tmp_path, matrix_data(axes={"method": ["baseline"], "lora": ["unfused"]}, lora={"path": "adapter.bin"})
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(
        [sys.executable, "-m", "bench", "run", "matrix.toml"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if "quantbench: error:" in line]
    assert len(errors) == 1 and "lora.path" in errors[0] and "only .safetensors" in errors[0]
    assert "Traceback" not in done.stderr and not (tmp_path / "results").exists()


def test_a_peft_format_file_is_read_with_its_rank_and_identified_by_its_content(tmp_path):
    import shutil

    _adapter_files(tmp_path)
    adapter = file_adapter(tmp_path / "peft.safetensors")
    assert adapter.peft_format and adapter.rank == 2 and adapter.identity.startswith("file-")
    (tmp_path / "elsewhere").mkdir()
    copy = shutil.copy(tmp_path / "peft.safetensors", tmp_path / "elsewhere" / "renamed.safetensors")
    os.utime(copy, (0, 0))
    assert file_adapter(Path(copy)).identity == adapter.identity, "a copy (another name, mtime) is the same adapter"
    from safetensors.torch import load_file, save_file

    changed = {name: tensor + 1 for name, tensor in load_file(copy).items()}  # same names, shapes and size
    save_file(changed, str(tmp_path / "changed.safetensors"))
    assert file_adapter(tmp_path / "changed.safetensors").identity != adapter.identity


def test_a_library_refusal_while_loading_is_unsupported_with_its_reason():
    from bench.contract import Measurements
    from bench.errors import MethodUnavailable
    from bench.trackers.latency import Clock

    class Refusing:
        def load_lora_weights(self, *args, **kwargs):
            raise NotImplementedError("this layer type cannot hold a LoRA")

    adapter = {"path": "a.safetensors", "identity": "x", "rank": 4, "peft_format": False}
    with pytest.raises(MethodUnavailable) as caught:
        attach_adapter(Refusing(), CellAdapters("unfused", adapter), Clock(False), Measurements())
    assert caught.value.status == "unsupported"
    assert "NotImplementedError: this layer type cannot hold a LoRA" in caught.value.reason
    assert "(raised in test_lora.py, load_lora_weights)" in caught.value.reason, "where the library refused"


def test_modes_the_installed_libraries_were_seen_to_refuse_are_unsupported_before_any_subprocess(monkeypatch):
    from bench import environment
    from bench.capability import check_cell
    from bench.cells import Cell
    from bench.environment import Machine
    from bench.lora import KNOWN_REFUSALS

    cpu = Machine(cuda_available=False)
    gguf_fused = Cell("gguf", {"quant_type": "Q8_0"}, lora="fused", lora_rank=4)
    seen = {name: version for refusal in KNOWN_REFUSALS for name, version in refusal.seen_with[0].items()}
    monkeypatch.setattr(environment, "_version", lambda name: seen.get(name))
    verdict = check_cell(gguf_fused, cpu)
    assert verdict.status == "unsupported" and "GGUF holds the packed quantized blocks" in verdict.reason
    assert "diffusers 0.42.1" in verdict.reason, "the reason names the versions that refused"
    assert check_cell(Cell("quanto", lora="hotswap", lora_rank=4), cpu).status == "unsupported"
    for runs in (Cell("gguf", {"quant_type": "Q8_0"}, lora="unfused", lora_rank=4), Cell("quanto")):
        assert check_cell(runs, cpu).status == "run"
    on_h200 = {**seen, "peft": "0.21.0"}  # another set of versions seen to refuse GGUF fusing
    monkeypatch.setattr(environment, "_version", lambda name: on_h200.get(name))
    assert check_cell(gguf_fused, cpu).status == "unsupported" and "peft 0.21.0" in check_cell(gguf_fused, cpu).reason
    monkeypatch.setattr(environment, "_version", lambda name: "99.0" if name == "diffusers" else seen.get(name))
    assert check_cell(gguf_fused, cpu).status == "run", "newer libraries: the cell finds out for itself"
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *args: None if name == "peft" else object())
    no_peft = check_cell(Cell("baseline", lora="unfused", lora_rank=4), cpu)
    assert no_peft.status == "unsupported" and "`peft`" in no_peft.reason


def _adapter_files(folder: Path) -> None:
    """adapter.bin (pickled: refused), broken.safetensors, plain.safetensors (no LoRA), peft.safetensors (rank 2)."""
    import torch
    from safetensors.torch import save_file

    (folder / "adapter.bin").write_bytes(b"not read")
    (folder / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    save_file({"weight": torch.zeros(2, 2)}, str(folder / "plain.safetensors"))
    peft = {
        "base_model.model.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(2, 64),
        "base_model.model.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(64, 2),
    }
    save_file(peft, str(folder / "peft.safetensors"))


# --- the modes run for real -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """baseline and torchao int8wo with no adapter, unfused and fused; baseline compiled without an adapter and
    hot-swapped; 1 prompt, 2 steps."""
    from bench.runner import run_matrix

    folder = tmp_path_factory.mktemp("lora")
    data = matrix_data(
        generation={"prompts": ["a red apple on a wooden table"], "num_inference_steps": 2},
        axes={"method": ["baseline", "torchao"], "lora": ["none", "unfused", "fused"]},
        lora={"synthetic": {"rank": 4}},
        run={"timeout_s": 600, "compile_timeout_s": 400, "cell_start": "prestarted"},  # imports overlap a cell
        include=[
            {"method": "baseline", "compile": "default", "lora": "none"},
            {"method": "baseline", "compile": "default", "lora": "hotswap"},
        ],
    )
    path = folder / "matrix.toml"
    path.write_text(tomli_w.dumps(data))
    matrix = load_matrix(path)
    results = folder / "results"
    run_matrix(matrix, results)
    return matrix, results


def _row(frame, method: str, lora: str, compile_mode: str = "off"):
    rows = frame[(frame["method"] == method) & (frame["lora"] == lora) & (frame["compile"] == compile_mode)]
    assert len(rows) == 1, (method, lora, compile_mode)
    return rows.iloc[0]


def _image(results: Path, row) -> np.ndarray:
    return np.asarray(Image.open(results / row["image_path"]), dtype=np.float64)


@pytest.mark.slow
def test_each_lora_mode_runs_and_changes_the_images(lora_run):
    from bench.store import read_results

    _, results = lora_run
    frame = read_results(results)
    assert set(frame["status"]) == {"ok"}, frame[["cell_label", "error"]].to_string()
    for method in ("baseline", "torchao"):
        without = _image(results, _row(frame, method, "none"))
        unfused, fused = (_image(results, _row(frame, method, mode)) for mode in ("unfused", "fused"))
        assert np.abs(unfused - without).mean() > 0.5, f"{method}: the adapter changes the image"
        assert np.abs(fused - without).mean() > 0.5
        assert np.abs(fused - unfused).mean() < np.abs(unfused - without).mean(), f"{method}: fused is about unfused"
        assert _row(frame, method, "unfused")["lora_load_s"] > 0 and pd_isna(
            _row(frame, method, "unfused")["lora_fuse_s"]
        )
        assert _row(frame, method, "fused")["lora_fuse_s"] > 0
    assert np.abs(_image(results, _row(frame, "baseline", "hotswap", "default")) - without).mean() > 0.5


@pytest.mark.slow
def test_drift_is_against_the_bf16_pipeline_with_the_same_adapter(lora_run):
    from bench.store import read_results

    _, results = lora_run
    frame = read_results(results)
    unfused = _row(frame, "baseline", "unfused")
    assert unfused["psnr_db"] == float("inf"), "bf16 with the adapter unfused is its own reference"
    assert unfused["lora_adapter"].startswith("synthetic seed=0")
    none_key = _row(frame, "baseline", "none")["reference_key"]
    hotswap = _row(frame, "baseline", "hotswap", "default")
    assert len({none_key, unfused["reference_key"], hotswap["reference_key"]}) == 3, "a reference per adapter"
    assert _row(frame, "torchao", "fused")["reference_key"] == unfused["reference_key"]
    assert hotswap["lora_adapter"].startswith("synthetic seed=1"), "the timed runs used the swapped-in adapter"


@pytest.mark.slow
def test_hotswap_on_a_compiled_model_does_not_recompile(lora_run):
    from bench.store import read_results

    _, results = lora_run
    hotswap = _row(read_results(results), "baseline", "hotswap", "default")
    assert hotswap["lora_swap_s"] > 0 and hotswap["lora_load_s"] > 0
    assert hotswap["timed_compiles"] == 0, "the swapped-in adapter ran through the graphs compiled in the warm-up"


@pytest.mark.slow
def test_the_summary_and_report_show_the_overhead_against_no_lora(lora_run, tmp_path):
    from bench.report import write_report
    from bench.store import read_results
    from bench.summary import cell_summary

    _, results = lora_run
    cells = cell_summary(read_results(results))
    with_lora = cells[cells["lora"] != "none"]
    assert (
        with_lora["lora_step_overhead"].notna().all()
        and cells.loc[cells["lora"] == "none", "lora_step_overhead"].isna().all()
    )
    step = {(c["method"], c["lora"], c["compile"]): c["step_latency_median_s"] for _, c in cells.iterrows()}
    fused = with_lora[(with_lora["method"] == "torchao") & (with_lora["lora"] == "fused")].iloc[0]
    assert fused["lora_step_overhead"] == pytest.approx(
        step["torchao", "fused", "off"] / step["torchao", "none", "off"] - 1
    )
    report = tmp_path / "report.md"
    write_report(results, report, report_format="md")
    text = report.read_text()
    assert "## LoRA cells" in text and "step vs no LoRA" in text and "| hotswap |" in text
    overview = text.split("## LoRA overhead by method and mode")[1].split("## LoRA cells")[0]
    assert "| torchao[int8wo] bf16 | 4 |" in overview, "one line per cell without an adapter, with the rank"


def pd_isna(value) -> bool:
    return value is None or value != value


def test_cell_adapters_round_trip_through_the_cell_spec():
    adapters = CellAdapters("hotswap", {"path": "a"}, {"path": "b"}, 16)
    assert CellAdapters(**json.loads(json.dumps(adapters.to_json()))) == adapters


def test_the_overview_gives_each_modes_step_overhead_by_cell_without_an_adapter():
    import pandas as pd

    from bench.report.lora import lora_overview_rows

    def cell(label, lora, status="ok", step=1.0, overhead=None, rank=None):
        return {"cell_label": label + (f" lora={lora} r{rank}" if rank else ""), "lora": lora, "status": status,
                "step_latency_median_s": step, "lora_step_overhead": overhead, "lora_rank": rank}  # fmt: skip

    cells = pd.DataFrame(
        [
            cell("gguf[Q8_0] bf16", "none", step=0.2389),
            cell("gguf[Q8_0] bf16", "unfused", step=0.2671, overhead=0.118, rank=16),
            cell("gguf[Q8_0] bf16", "fused", status="unsupported", step=None, rank=16),
            cell("baseline bf16", "none", step=0.17),
            cell("baseline bf16", "unfused", overhead=0.16, rank=16),
            cell("baseline bf16", "unfused", overhead=0.30, rank=64),
            cell("bnb_4bit bf16", "none", status="failed", step=None),
            cell("bnb_4bit bf16", "fused", overhead=None, rank=16),  # ok, but nothing to compare it with
        ]
    )
    rows = {(row["cell"], row["rank"]): row for row in lora_overview_rows(cells)}
    assert rows["gguf[Q8_0] bf16", "16"] == {"cell": "gguf[Q8_0] bf16", "rank": "16", "step": "0.2389",
                                             "unfused": "+11.8 %", "fused": "unsupported", "hotswap": "–"}  # fmt: skip
    assert rows["baseline bf16", "64"]["unfused"] == "+30.0 %" and rows["baseline bf16", "64"]["step"] == "0.1700"
    assert rows["bnb_4bit bf16", "16"]["fused"] == "n/a" and rows["bnb_4bit bf16", "16"]["unfused"] == "–"
    assert len(rows) == 4
    assert lora_overview_rows(cells[cells["lora"] == "none"]) == [], "no LoRA cell, no section"


def test_a_compile_that_found_its_graphs_in_the_cache_says_so():
    import pandas as pd

    from bench.report.lora import lora_rows

    def cell(compile_s, counts):
        return {"cell_label": "baseline bf16 compile=default+regional lora=fused r16", "lora": "fused", "status": "ok",
                "compile": "default", "lora_rank": 16, "step_latency_median_s": 0.13, "lora_step_overhead": 0.01,
                "e2e_latency_median_s": 0.7, "lora_e2e_overhead": 0.02, "lora_load_s": 0.6, "lora_fuse_s": 0.2,
                "lora_swap_s": None, "timed_compiles": 0, "peak_reserved_bytes": 2**30, "error": None,
                "compile_s": compile_s, "compile_counts": json.dumps(counts)}  # fmt: skip

    cached, cold = lora_rows(pd.DataFrame([cell(4.7, {"graphs_from_cache": 3}), cell(11.7, {"graphs": 3})]), 2**30)
    assert cached["compile"] == "4.7 (3 graphs from the cache)", "not what the adapter costs a cold compile"
    assert cold["compile"] == "11.7"
