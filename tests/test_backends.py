"""The newer diffusers backends (SDNQ, BFL checkpoints, AutoRound, ModelOpt, Nunchaku Lite) and quanto's
deprecation: each that runs on a CPU really quantizes the tiny pipeline's transformer (checked by layer classes,
stored dtypes and bytes), and each that cannot gets its reason from a capability rule before any subprocess."""

from __future__ import annotations

import importlib.metadata
import json
from types import SimpleNamespace

import pytest
import torch
from packaging.version import Version
from pydantic import ValidationError
from safetensors import safe_open

from bench.capability import check_cell
from bench.cells import Cell
from bench.environment import Machine
from bench.measure import tensor_bytes
from bench.methods import method_class
from bench.methods import modelopt as modelopt_method
from bench.methods.base import Component
from bench.methods.modelopt import FIRST_SUBMODULE_COMPRESS
from bench.models.builtin import build_builtin

CPU = Machine(cuda_available=False)
H100 = Machine(cuda_available=True, cuda_capability=(9, 0), gpu_name="NVIDIA H100 80GB HBM3", gpu_count=1)
L40S = Machine(cuda_available=True, cuda_capability=(8, 9), gpu_name="NVIDIA L40S", gpu_count=1)
B200 = Machine(cuda_available=True, cuda_capability=(10, 0), gpu_name="NVIDIA B200", gpu_count=1)


@pytest.fixture(scope="module")
def tiny_flux(quantbench_cache):
    return build_builtin("tiny-flux")


def transformer(folder) -> Component:
    library, class_name = json.loads((folder / "model_index.json").read_text())["transformer"]
    return Component("transformer", library, class_name, folder)


def method_for(name: str, options: dict):
    cls = method_class(name)
    return cls(cls.Options.model_validate(options)), Cell(name, options, components=("transformer",), id="test")


def load(name: str, options: dict, folder):
    method, cell = method_for(name, options)
    return method.load_component(method.prepare_component(transformer(folder), cell), cell)


def notes(name: str, options: dict, model) -> dict:
    method, cell = method_for(name, options)
    return json.loads(method.after_load(SimpleNamespace(transformer=model), cell)["method_notes"])


def bf16_bytes(folder) -> int:
    return tensor_bytes(transformer(folder).load(Cell("baseline")))


# SDNQ


@pytest.mark.parametrize(
    ("weights_dtype", "stored", "max_ratio"),
    [("int8", torch.int8, 0.7), ("uint4", torch.uint8, 0.55), ("float8_e4m3fn", torch.float8_e4m3fn, 0.7)],
)
def test_sdnq_stores_the_transformer_linears_in_its_weight_dtype(tiny_flux, weights_dtype, stored, max_ratio):
    model = load("sdnq", {"weights_dtype": weights_dtype, "minimum_allowed_numel": 0}, tiny_flux)
    layer = model.transformer_blocks[0].attn.to_q
    assert type(layer).__name__ == "SDNQLinear"
    assert layer.weight.dtype == stored
    assert tensor_bytes(model) < max_ratio * bf16_bytes(tiny_flux)


def test_sdnq_leaves_layers_below_its_default_size_in_bf16(tiny_flux):
    model = load("sdnq", {"weights_dtype": "int8"}, tiny_flux)  # 64 x 64 layers, under 16,384 weights
    assert type(model.transformer_blocks[0].attn.to_q).__name__ == "Linear"


def test_sdnq_notes_say_whether_its_quantized_matmul_runs(tiny_flux):
    forwards = {}
    for matmul in (False, True):
        options = {"weights_dtype": "int8", "use_quantized_matmul": matmul, "minimum_allowed_numel": 0}
        forwards[matmul] = notes("sdnq", options, load("sdnq", options, tiny_flux))["sdnq_forward_functions"]
    assert sum(forwards[False].values()) == sum(forwards[True].values()) > 0
    assert forwards[False] != forwards[True]
    assert any("matmul" in name for name in forwards[True])


def test_sdnq_quantizes_on_the_device_it_is_given_and_needs_cuda_for_the_gpu(tiny_flux):
    options = {"weights_dtype": "int8", "minimum_allowed_numel": 0}
    on_cpu = load("sdnq", {**options, "quantization_device": "cpu"}, tiny_flux)
    default = load("sdnq", options, tiny_flux)
    layer = on_cpu.transformer_blocks[0].attn.to_q
    assert layer.weight.dtype == torch.int8 and layer.weight.device.type == "cpu"
    assert torch.equal(layer.weight, default.transformer_blocks[0].attn.to_q.weight)  # same quantization
    verdict = check_cell(Cell("sdnq", {**options, "quantization_device": "cuda"}, components=("transformer",)), CPU)
    assert verdict.status == "skipped" and "quantization_device = 'cuda' needs a CUDA GPU" in verdict.reason
    assert (
        check_cell(Cell("sdnq", {**options, "quantization_device": "cuda"}, components=("transformer",)), H100).status
        == "run"
    )


def test_sdnq_weight_dtype_names_are_checked_at_the_edge_and_against_the_installed_sdnq():
    with pytest.raises(ValidationError, match="an SDNQ weight dtype"):
        method_class("sdnq").Options(weights_dtype="nf4")
    verdict = check_cell(Cell("sdnq", {"weights_dtype": "float8_e9m9fn"}, components=("transformer",)), CPU)
    assert verdict.status == "unsupported" and "does not accept weights_dtype 'float8_e9m9fn'" in verdict.reason


# BFL checkpoints


def test_bfl_fp8r_checkpoint_has_e4m3_weights_with_per_row_scales(tiny_flux):
    method, cell = method_for("bfl", {"quant_type": "fp8r"})
    checkpoint = method.prepare_component(transformer(tiny_flux), cell).single_file
    with safe_open(str(checkpoint), framework="pt") as handle:
        weight = handle.get_tensor("transformer_blocks.0.attn.to_q.weight")
        scale = handle.get_tensor("transformer_blocks.0.attn.to_q.weight_scale")
        bias = handle.get_tensor("transformer_blocks.0.attn.to_q.bias")
    assert weight.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32
    assert scale.shape == (weight.shape[0],)
    source = next((tiny_flux / "transformer").glob("*.safetensors"))
    with safe_open(str(source), framework="pt") as handle:
        assert bias.dtype == handle.get_tensor("transformer_blocks.0.attn.to_q.bias").dtype  # left as saved


def test_bfl_checkpoints_load_quantized_and_dequantize_on_a_cpu(tiny_flux):
    original = transformer(tiny_flux).load(Cell("baseline")).transformer_blocks[0].attn.to_q.weight.float()
    for quant_type, layer_class, max_ratio, max_error in (
        ("fp8r", "BFLFP8RLinear", 0.6, 0.05),
        ("nvfp4", "BFLNVFP4Linear", 0.35, 0.2),
    ):
        model = load("bfl", {"quant_type": quant_type}, tiny_flux)
        layer = model.transformer_blocks[0].attn.to_q
        assert type(layer).__name__ == layer_class
        assert tensor_bytes(model) < max_ratio * bf16_bytes(tiny_flux)
        dequantized = model.dequantize().transformer_blocks[0].attn.to_q.weight.float()
        assert ((dequantized - original).norm() / original.norm()).item() < max_error
        paths = notes("bfl", {"quant_type": quant_type}, load("bfl", {"quant_type": quant_type}, tiny_flux))
        assert paths["bfl_paths"] == {f"{quant_type} dequantize": 30}  # a CPU has no fused FP8 / FP4 kernels


def test_bfl_nvfp4_checkpoint_packs_two_e2m1_values_a_byte_with_block_scales(tiny_flux):
    method, cell = method_for("bfl", {"quant_type": "nvfp4"})
    checkpoint = method.prepare_component(transformer(tiny_flux), cell).single_file
    prefix = "transformer_blocks.0.attn.to_q"
    with safe_open(str(checkpoint), framework="pt") as handle:
        weight, block_scales = handle.get_tensor(f"{prefix}.weight"), handle.get_tensor(f"{prefix}.weight_scale")
        assert handle.get_tensor(f"{prefix}.weight_scale_2").shape == ()
    assert weight.dtype == torch.uint8 and weight.shape == (64, 32)
    assert block_scales.dtype == torch.float8_e4m3fn and block_scales.shape == (64, 4)


def test_bfl_checkpoints_are_cached_by_what_produced_them(tiny_flux, quantbench_cache):
    for quant_type in ("fp8r", "fp8r", "nvfp4"):
        method, cell = method_for("bfl", {"quant_type": quant_type})
        method.prepare_component(transformer(tiny_flux), cell)
    assert len(list((quantbench_cache / "bfl").glob("transformer-fp8r-*/model.safetensors"))) == 1
    assert len(list((quantbench_cache / "bfl").glob("transformer-nvfp4-*/model.safetensors"))) == 1


def test_bfl_user_checkpoint_is_loaded_as_given(tiny_flux):
    method, cell = method_for("bfl", {"quant_type": "nvfp4"})
    checkpoint = method.prepare_component(transformer(tiny_flux), cell).single_file
    model = load("bfl", {"file": str(checkpoint)}, tiny_flux)
    assert type(model.transformer_blocks[0].attn.to_q).__name__ == "BFLNVFP4Linear"


def test_bfl_takes_a_type_or_a_file():
    with pytest.raises(ValidationError, match="exactly one of quant_type"):
        method_class("bfl").Options()


# AutoRound


@pytest.mark.slow
def test_auto_round_writes_a_packed_checkpoint_that_diffusers_loads(tiny_flux, quantbench_cache):
    pytest.importorskip("auto_round", reason="auto-round is not installed (pip install 'quantbench[backends]')")
    options = {"bits": 4, "group_size": 32}
    model = load("auto_round", options, tiny_flux)
    assert model.hf_quantizer.quantization_config.quant_method == "auto-round"
    layer = model.transformer_blocks[0].attn.to_q
    assert hasattr(layer, "qweight") and layer.qweight.dtype == torch.int32
    assert tensor_bytes(model) < 0.8 * bf16_bytes(tiny_flux)
    assert sum(notes("auto_round", options, model)["auto_round_linears"].values()) > 0
    saved = list((quantbench_cache / "auto_round").glob("transformer-w4-*/transformer/*.safetensors"))
    assert [path.name for path in saved] == ["diffusion_pytorch_model.safetensors"]


def test_auto_rounds_disk_estimate_is_the_other_components_whole_and_the_quantized_one_at_its_bits(tmp_path):
    from bench.methods.auto_round import estimated_checkpoint_bytes

    for name, size in (("transformer", 1600), ("text_encoder", 1000), ("vae", 200)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "diffusion_pytorch_model.safetensors").write_bytes(b"\0" * size)
    (tmp_path / "flux1-dev.safetensors").write_bytes(b"\0" * 5000)  # a Hub snapshot's single-file copy: not saved
    component = Component("transformer", "diffusers", "FluxTransformer2DModel", tmp_path)
    assert estimated_checkpoint_bytes(component, bits=4) == 1000 + 200 + int(1600 * 4 / 16 * 1.1)


# ModelOpt


def modelopt_matching_diffusers() -> bool:
    """Whether the installed nvidia-modelopt predates the config format diffusers 0.42 cannot read."""
    try:
        return Version(importlib.metadata.version("nvidia-modelopt")) < FIRST_SUBMODULE_COMPRESS
    except importlib.metadata.PackageNotFoundError:
        return False


def with_modelopt(monkeypatch, version: str, missing: tuple[str, ...] = ()) -> None:
    """As if nvidia-modelopt `version` were installed, without the packages in `missing`."""
    real = importlib.metadata.version
    monkeypatch.setattr(
        importlib.metadata, "version", lambda name: version if name == "nvidia-modelopt" else real(name)
    )
    monkeypatch.setattr(modelopt_method, "missing_imports", lambda: list(missing))


def test_modelopt_without_the_packages_it_imports_is_unsupported_before_the_cell_runs(monkeypatch):
    with_modelopt(monkeypatch, "0.37.0", missing=("torchprofile", "pulp"))
    verdict = check_cell(Cell("modelopt", {"quant_type": "FP8"}, components=("transformer",)), H100)
    assert verdict.status == "unsupported"
    assert "imports `torchprofile`, `pulp`, not installed" in verdict.reason


def test_modelopt_after_its_config_format_change_is_unsupported_with_the_error_diffusers_hits(monkeypatch):
    with_modelopt(monkeypatch, "0.47.0")
    verdict = check_cell(Cell("modelopt", {"quant_type": "FP8"}, components=("transformer",)), H100)
    assert verdict.status == "unsupported"
    assert "TypeError: 'list' object is not a mapping" in verdict.reason and "0.37.0 matches" in verdict.reason
    with_modelopt(monkeypatch, "0.43.0")
    verdict = check_cell(Cell("modelopt", {"quant_type": "FP8"}, components=("transformer",)), H100)
    assert verdict.status == "unsupported"
    assert "must be Tensor, not FP8QTensor" in verdict.reason and "0.37.0 matches" in verdict.reason


@pytest.mark.parametrize(
    ("quant_type", "machine", "status", "reason"),
    [
        ("FP8", H100, "run", None),
        ("FP8_FP8", H100, "run", None),
        ("NVFP4", H100, "skipped", "compute capability >= 10.0; this GPU has 9.0"),
        ("INT8_NVFP4", H100, "skipped", "compute capability >= 10.0"),
        ("NVFP4", CPU, "skipped", "needs a CUDA GPU"),
        ("INT8", CPU, "run", None),
        ("NVFP4", B200, "unsupported", "only in blocks"),
        ("INT4", H100, "unsupported", "Real quantization not supported for this format."),
        ("NF4_FP8", CPU, "unsupported", "Real quantization not supported for this format."),
    ],
)
def test_modelopt_nvfp4_needs_blackwell_and_4_bit_weights_need_blocks(monkeypatch, quant_type, machine, status, reason):
    with_modelopt(monkeypatch, "0.37.0")
    verdict = check_cell(Cell("modelopt", {"quant_type": quant_type}, components=("transformer",)), machine)
    assert verdict.status == status
    if reason:
        assert reason in verdict.reason


def test_modelopt_4_bit_blocks_are_unsupported_with_the_error_diffusers_config_gives(monkeypatch):
    with_modelopt(monkeypatch, "0.37.0")
    options = {"quant_type": "INT4", "channel_quantize": -1, "block_quantize": 64}
    verdict = check_cell(Cell("modelopt", options, components=("transformer",)), H100)
    assert (
        verdict.status == "unsupported" and "'<' not supported between instances of 'str' and 'int'" in verdict.reason
    )


def test_modelopt_quant_types_are_weights_or_weights_and_activations():
    options = method_class("modelopt").Options
    assert options(quant_type="FP8").weight_only and not options(quant_type="FP8_FP8").weight_only
    for bad in ("FP16", "FP8_FP8_FP8", "fp8"):
        with pytest.raises(ValidationError, match="<weights> or <weights>_<activations>"):
            options(quant_type=bad)


@pytest.mark.skipif(not modelopt_matching_diffusers(), reason="diffusers 0.42 needs nvidia-modelopt < 0.39")
@pytest.mark.parametrize("quant_type", ["FP8", "INT8", "FP8_FP8", "INT8_INT8"])
def test_modelopt_compresses_the_transformer_linears(tiny_flux, quant_type):
    model = load("modelopt", {"quant_type": quant_type}, tiny_flux)
    layer = model.transformer_blocks[0].attn.to_q
    assert type(layer.weight).__name__ == "QTensorWrapper"
    assert layer.input_quantizer.is_enabled == ("_" in quant_type)
    assert tensor_bytes(model) < 0.6 * bf16_bytes(tiny_flux)
    assert layer(torch.randn(2, layer.in_features, dtype=torch.bfloat16)).shape == (2, layer.out_features)
    assert sum(notes("modelopt", {"quant_type": quant_type}, model)["modelopt_linears"].values()) > 0


# Nunchaku Lite


def nunchaku_checkpoint(folder, precision: str):
    section = {"precision": precision, "group_size": 16 if precision == "nvfp4" else 64, "rank": 32, "targets": ["x"]}
    (folder / "config.json").write_text(json.dumps({"quantization_config": {"svdq_w4a4": section}}))
    return str(folder)


@pytest.mark.parametrize(
    ("machine", "file_precision", "status", "reason"),
    [
        (CPU, None, "skipped", "nunchaku_lite needs a CUDA GPU"),
        (H100, "int4", "skipped", "does not load Nunchaku Lite checkpoints on Hopper"),
        (L40S, None, "unsupported", "needs a pre-quantized checkpoint (`file`)"),
        (L40S, "nvfp4", "skipped", "nunchaku_lite nvfp4 needs compute capability >= 10.0; this GPU has 8.9"),
    ],
)
def test_nunchaku_lite_reasons(tmp_path, machine, file_precision, status, reason):
    options = {"file": nunchaku_checkpoint(tmp_path, file_precision)} if file_precision else {}
    verdict = check_cell(Cell("nunchaku_lite", options, components=("transformer",)), machine)
    assert verdict.status == status
    assert reason in verdict.reason


def test_nunchaku_lite_on_blackwell_needs_the_kernels_package_and_trust_in_remote_code(tmp_path, monkeypatch):
    import importlib.util

    cell = Cell("nunchaku_lite", {"file": nunchaku_checkpoint(tmp_path, "nvfp4")}, components=("transformer",))
    monkeypatch.delenv("DIFFUSERS_TRUST_REMOTE_KERNELS", raising=False)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "kernels" else real_find_spec(name))
    assert "needs the `kernels` package" in check_cell(cell, B200).reason
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())
    assert "only with DIFFUSERS_TRUST_REMOTE_KERNELS=true" in check_cell(cell, B200).reason
    monkeypatch.setenv("DIFFUSERS_TRUST_REMOTE_KERNELS", "true")
    assert check_cell(cell, B200).status == "run"


# quanto


def test_quanto_rows_say_diffusers_deprecated_it():
    method, cell = method_for("quanto", {"weights_dtype": "int8"})
    note = json.loads(method.after_load(SimpleNamespace(), cell)["method_notes"])["deprecated"]
    assert "huggingface/diffusers#13180" in note and "1.0" in note


def test_method_notes_reach_the_rows_through_the_contract():
    from bench.contract import Measurements
    from bench.store import COLUMNS

    method, cell = method_for("quanto", {"weights_dtype": "int8"})
    measurements = Measurements()
    measurements.update(method.after_load(SimpleNamespace(), cell))  # an unknown name would raise
    assert "method_notes" in COLUMNS and "13180" in measurements.method_notes
