"""On a CUDA GPU only: bitsandbytes loading (pre-quantized, dequantized), every placement, quantized memory below
bf16's, and LPIPS with real backbone weights, from one run of the tiny FLUX pipeline (4-bit layers need its
64-wide inputs) with drift scored against the bf16 reference."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from bench.drift import LPIPS_BACKBONE_FILES
from bench.matrix import load_matrix
from bench.runner import run_matrix
from bench.store import read_results
from tests.conftest import matrix_data, write_matrix

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

PLACEMENTS = ["device", "device_map", "model_cpu_offload", "sequential_cpu_offload", "group_offload"]
OFFLOADS = ["model_cpu_offload", "sequential_cpu_offload", "group_offload"]


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    """One run: the bf16 baseline in every placement, bitsandbytes 4-bit quantized on load and pre-quantized,
    8-bit dequantized after loading; one row per cell."""
    folder = tmp_path_factory.mktemp("gpu-methods")
    data = matrix_data(
        name="gpu-methods",
        generation={"prompts": ["a red apple on a wooden table"], "num_inference_steps": 4, "repeats": 2},
        run={"timeout_s": 600},
        drift={"clip_model": ""},  # no CLIP weights offline; LPIPS uses torchvision's cache when it has them
        axes={"method": ["baseline"], "placement": PLACEMENTS},
        include=[
            {"method": "bnb_4bit"},
            {"method": "bnb_4bit", "prequantized": True},
            {"method": "bnb_8bit", "dequantize": True},
        ],
    )
    run_matrix(load_matrix(write_matrix(folder, data)), folder / "results")
    return read_results(folder / "results")


def row_of(rows, method: str, placement: str = "device", **options):
    """The one row of the cell with this method, placement and non-default options."""
    matching = rows[
        (rows["method"] == method)
        & (rows["placement"] == placement)
        & (rows["method_options"].map(json.loads) == options)
    ]
    assert len(matching) == 1, (method, placement, options, rows["cell_label"].tolist())
    return matching.iloc[0]


def test_every_cell_ran_on_the_gpu(rows):
    assert (rows["status"] == "ok").all(), rows.loc[rows["status"] != "ok", ["cell_label", "error"]].to_string()
    assert rows["gpu_name"].notna().all() and (rows["device"] == "cuda").all()


def test_every_placement_generates_the_same_image_and_offloading_lowers_the_peak(rows):
    device = row_of(rows, "baseline")
    for placement in PLACEMENTS:
        placed = row_of(rows, "baseline", placement)
        assert placed["latent_rel_l2"] < 1e-3, f"{placement} changed the output: {placed['latent_rel_l2']}"
    for placement in OFFLOADS:  # the H100 run: 35.9-36.7 MB against 37.2 MB on the device
        assert row_of(rows, "baseline", placement)["peak_allocated_bytes"] < device["peak_allocated_bytes"], placement


def test_bitsandbytes_pre_quantized_checkpoint_loads_the_weights_quantizing_on_load_makes(rows):
    on_load, saved = row_of(rows, "bnb_4bit"), row_of(rows, "bnb_4bit", prequantized=True)
    assert saved["transformer_tensor_bytes"] == on_load["transformer_tensor_bytes"]
    assert saved["latent_rel_l2"] == pytest.approx(on_load["latent_rel_l2"], rel=1e-3)


def test_bitsandbytes_dequantize_brings_the_transformer_back_to_bf16_size(rows):
    baseline, dequantized = row_of(rows, "baseline"), row_of(rows, "bnb_8bit", dequantize=True)
    assert dequantized["transformer_tensor_bytes"] == baseline["transformer_tensor_bytes"]
    assert dequantized["dequantized_reserved_bytes"] > 0
    assert 0 < dequantized["latent_rel_l2"] < 0.05  # the int8 rounding stays in the dequantized weights


def test_a_quantized_cells_peak_memory_is_below_bf16s(rows):
    baseline, nf4 = row_of(rows, "baseline"), row_of(rows, "bnb_4bit")
    assert nf4["transformer_tensor_bytes"] < 0.35 * baseline["transformer_tensor_bytes"]
    assert nf4["peak_allocated_bytes"] < baseline["peak_allocated_bytes"]


def lpips_unavailable() -> str | None:
    """Why LPIPS cannot run here with real weights, or None when it can."""
    if importlib.util.find_spec("torchvision") is None:
        return "torchvision is not installed"
    weights = Path(torch.hub.get_dir()) / "checkpoints" / LPIPS_BACKBONE_FILES["alex"]
    return None if weights.exists() else f"the AlexNet backbone weights are not in the torch hub cache ({weights})"


def test_lpips_with_real_alexnet_weights_is_zero_for_the_reference_and_positive_for_4_bit(rows):
    reason = lpips_unavailable()
    if reason:
        assert rows["lpips_alex"].isna().all(), "no LPIPS value without its real weights"
        pytest.skip(f"LPIPS with real weights: {reason}")
    baseline, nf4 = row_of(rows, "baseline"), row_of(rows, "bnb_4bit")
    assert baseline["lpips_alex"] == pytest.approx(0.0, abs=1e-4)
    assert nf4["lpips_alex"] > baseline["lpips_alex"]
