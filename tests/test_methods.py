"""Each method that runs on a CPU loads the tiny pipeline's components through the real diffusers and
transformers paths, and really quantizes them: checked by tensor types and stored bytes, not by "no error"."""

from __future__ import annotations

import json

import pytest
import torch

from bench.capability import check_cell
from bench.cells import Cell
from bench.environment import Machine
from bench.measure import tensor_bytes
from bench.methods import method_class
from bench.methods.base import Component
from bench.methods.torchao import NAMED_TYPES, TorchAoOptions, build_torchao_config
from bench.models.builtin import build_builtin

CPU = Machine(cuda_available=False)
H100 = Machine(cuda_available=True, cuda_capability=(9, 0), gpu_name="NVIDIA H100 80GB HBM3", gpu_count=1)
A100 = Machine(cuda_available=True, cuda_capability=(8, 0), gpu_name="NVIDIA A100", gpu_count=1)


@pytest.fixture(scope="module")
def tiny_flux(quantbench_cache):
    return build_builtin("tiny-flux")


def component(folder, name: str) -> Component:
    library, class_name = json.loads((folder / "model_index.json").read_text())[name]
    return Component(name, library, class_name, folder)


def load(method: str, options: dict, folder, name: str = "transformer"):
    cls = method_class(method)
    cell = Cell(method=method, options=options, components=(name,), id="test")
    instance = cls(cls.Options.model_validate(options))
    return instance.load_component(instance.prepare_component(component(folder, name), cell), cell)


def baseline_bytes(folder, name: str = "transformer") -> int:
    return tensor_bytes(component(folder, name).load(Cell(method="baseline")))


@pytest.mark.parametrize(
    ("quant_type", "weight_class", "max_ratio"),
    [
        ("int8wo", "Int8Tensor", 0.6),
        ("int8dq", "Int8Tensor", 0.6),
        ("float8wo", "Float8Tensor", 0.6),
        ("int4wo_intx", "IntxUnpackedToInt8Tensor", 0.75),  # int4 values stored unpacked in int8, plus scales
    ],
)
def test_torchao_quantizes_the_transformer_linears(tiny_flux, quant_type, weight_class, max_ratio):
    model = load("torchao", {"quant_type": quant_type}, tiny_flux)
    weight = model.transformer_blocks[0].attn.to_q.weight
    assert type(weight).__name__ == weight_class
    assert tensor_bytes(model) < max_ratio * baseline_bytes(tiny_flux)


def test_torchao_quantizes_the_t5_encoder_through_transformers_config(tiny_flux):
    model = load("torchao", {"quant_type": "int8wo"}, tiny_flux, "text_encoder_2")
    assert type(model).__name__ == "T5EncoderModel"
    assert type(model.encoder.block[0].layer[0].SelfAttention.q.weight).__name__ == "Int8Tensor"


def test_torchao_modules_to_not_convert_are_left_in_bf16(tiny_flux):
    model = load("torchao", {"quant_type": "int8wo", "modules_to_not_convert": ["proj_out"]}, tiny_flux)
    assert type(model.proj_out.weight) is torch.nn.Parameter and model.proj_out.weight.dtype == torch.bfloat16
    assert type(model.transformer_blocks[0].attn.to_q.weight).__name__ == "Int8Tensor"


@pytest.mark.parametrize(("quant_type", "max_ratio"), [("Q8_0", 0.6), ("Q4_0", 0.35), ("Q5_1", 0.45)])
def test_gguf_file_is_produced_locally_and_loaded_quantized(tiny_flux, quant_type, max_ratio):
    model = load("gguf", {"quant_type": quant_type}, tiny_flux)
    weight = model.transformer_blocks[0].attn.to_q.weight
    assert type(weight).__name__ == "GGUFParameter"
    assert weight.quant_type.name == quant_type
    assert tensor_bytes(model) < max_ratio * baseline_bytes(tiny_flux)


def test_gguf_files_are_cached_by_content(tiny_flux, quantbench_cache):
    load("gguf", {"quant_type": "Q8_0"}, tiny_flux)
    files = sorted((quantbench_cache / "gguf").glob("transformer-Q8_0-*/model.gguf"))
    before = [f.stat().st_mtime_ns for f in files]
    load("gguf", {"quant_type": "Q8_0"}, tiny_flux)
    assert len(files) == 1
    assert [f.stat().st_mtime_ns for f in files] == before


def test_gguf_synthetic_blocks_have_the_type_layout_with_random_values(tiny_flux):
    real = load("gguf", {"quant_type": "Q4_0"}, tiny_flux).transformer_blocks[0].attn.to_q.weight
    synthetic = (
        load("gguf", {"quant_type": "Q4_0", "synthetic_blocks": True}, tiny_flux).transformer_blocks[0].attn.to_q.weight
    )
    assert synthetic.quant_type == real.quant_type and synthetic.shape == real.shape
    assert not torch.equal(synthetic.as_tensor(), real.as_tensor())


def test_user_gguf_file_is_loaded_as_given(tiny_flux, quantbench_cache):
    load("gguf", {"quant_type": "Q4_1"}, tiny_flux)
    produced = next((quantbench_cache / "gguf").glob("transformer-Q4_1-*/model.gguf"))
    model = load("gguf", {"file": str(produced)}, tiny_flux)
    assert model.transformer_blocks[0].attn.to_q.weight.quant_type.name == "Q4_1"


def test_every_named_torchao_shorthand_maps_to_a_config_or_an_unsupported_reason():
    from bench.methods.base import MethodUnavailable

    built, unsupported = {}, {}
    for quant_type in (*NAMED_TYPES, "fp6_e3m2", "uint4wo", "int2wo_intx"):
        try:
            built[quant_type] = type(build_torchao_config(TorchAoOptions(quant_type=quant_type))).__name__
        except MethodUnavailable as error:
            unsupported[quant_type] = error.reason
    assert built["int8wo"] == "Int8WeightOnlyConfig"
    assert built["int8dq"] == "Int8DynamicActivationInt8WeightConfig"
    assert built["float8wo_e5m2"] == "Float8WeightOnlyConfig"
    assert built["float8_e4m3_row"] == "Float8DynamicActivationFloat8WeightConfig"
    assert built["int2wo_intx"] == "IntxWeightOnlyConfig"
    assert set(built) | set(unsupported) == {*NAMED_TYPES, "fp6_e3m2", "uint4wo", "int2wo_intx"}
    assert all(reason for reason in unsupported.values())


@pytest.mark.parametrize(
    ("cell", "machine", "status", "reason"),
    [
        (
            Cell("bnb_8bit", threshold=6.0, components=("transformer",)),
            CPU,
            "skipped",
            "bitsandbytes (bnb_8bit) needs a CUDA GPU",
        ),
        (Cell("bnb_8bit", threshold=6.0, components=("transformer",)), H100, "run", None),
        (
            Cell("torchao", {"quant_type": "float8dq"}, components=("transformer",)),
            A100,
            "skipped",
            "compute capability >= 8.9; this GPU has 8.0",
        ),
        (Cell("torchao", {"quant_type": "float8dq"}, components=("transformer",)), H100, "run", None),
        (
            Cell("torchao", {"quant_type": "autoquant"}, components=("transformer",)),
            H100,
            "unsupported",
            "autoquant is not provided",
        ),
        (
            Cell("torchao", {"quant_type": "int4dq"}, components=("transformer",)),
            H100,
            "unsupported",
            "int4dq (DA8W4) has only a CPU kernel",
        ),
        (
            Cell("gguf", {"quant_type": "Q4_K"}, components=("transformer",)),
            CPU,
            "unsupported",
            "cannot quantize to Q4_K",
        ),
        (
            Cell("baseline", placement="sequential_cpu_offload"),
            CPU,
            "skipped",
            "placement sequential_cpu_offload needs a CUDA GPU",
        ),
    ],
)
def test_capability_detection_before_any_subprocess(cell, machine, status, reason):
    verdict = check_cell(cell, machine)
    assert verdict.status == status
    if reason:
        assert reason in verdict.reason


def test_bitsandbytes_configs_follow_the_cell_axes():
    from bench.methods.bitsandbytes import EightBit, FourBit, FourBitOptions

    eight = EightBit(EightBit.Options(llm_int8_skip_modules=["proj_out"]))
    assert eight.config_kwargs(Cell("bnb_8bit", threshold=10.0)) == {
        "load_in_8bit": True, "llm_int8_threshold": 10.0, "llm_int8_skip_modules": ["proj_out"]
    }  # fmt: skip
    four = FourBit(FourBitOptions(bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=True))
    config = four.config_kwargs(Cell("bnb_4bit", dtype="fp16"))
    assert config["bnb_4bit_compute_dtype"] == torch.float16 and config["bnb_4bit_quant_type"] == "fp4"
    assert config["bnb_4bit_use_double_quant"] is True


@pytest.mark.parametrize(
    ("weights_dtype", "weight_class", "max_ratio"),
    [("int8", "WeightQBytesTensor", 0.6), ("int4", "WeightQBitsTensor", 0.35)],
)
def test_quanto_quantizes_the_transformer_linears(tiny_flux, weights_dtype, weight_class, max_ratio):
    model = load("quanto", {"weights_dtype": weights_dtype}, tiny_flux)
    assert type(model.transformer_blocks[0].attn.to_q).__name__ == "QLinear"
    assert type(model.transformer_blocks[0].attn.to_q.weight).__name__ == weight_class
    assert tensor_bytes(model) < max_ratio * baseline_bytes(tiny_flux)


def test_quanto_quantizes_the_t5_encoder_through_transformers_config(tiny_flux):
    model = load("quanto", {"weights_dtype": "int8"}, tiny_flux, "text_encoder_2")
    assert type(model.encoder.block[0].layer[0].SelfAttention.q).__name__ == "QLinear"


def test_layerwise_casting_stores_weights_in_float8(tiny_flux):
    model = load("layerwise_fp8", {}, tiny_flux)
    assert model.transformer_blocks[0].attn.to_q.weight.dtype == torch.float8_e4m3fn
    # diffusers keeps norms, embeddings and the input/output projections in bf16: a large share at tiny width
    assert tensor_bytes(model) < 0.7 * baseline_bytes(tiny_flux)


def test_layerwise_casting_of_a_transformers_model_is_unsupported_with_the_reason(tiny_flux):
    from bench.methods.base import MethodUnavailable

    with pytest.raises(MethodUnavailable, match="layerwise casting is a diffusers model feature"):
        load("layerwise_fp8", {}, tiny_flux, "text_encoder_2")


@pytest.fixture(scope="module")
def tiny_sd3(quantbench_cache):
    return build_builtin("tiny-sd3")


def test_gguf_quantizes_only_linear_weights_of_sd3(tiny_sd3):
    model = load("gguf", {"quant_type": "Q8_0"}, tiny_sd3)
    assert type(model.transformer_blocks[0].attn.to_q.weight).__name__ == "GGUFParameter"
    assert type(model.pos_embed.proj.weight).__name__ != "GGUFParameter", "convolutions stay unquantized"
    assert tensor_bytes(model) < baseline_bytes(tiny_sd3)


def test_torchao_quantizes_the_sd3_t5_encoder(tiny_sd3):
    model = load("torchao", {"quant_type": "int8wo"}, tiny_sd3, "text_encoder_3")
    assert type(model.encoder.block[0].layer[0].SelfAttention.q.weight).__name__ == "Int8Tensor"


def test_pipeline_quantization_config_quantizes_each_mapped_component_in_one_load(tiny_flux):
    from diffusers import DiffusionPipeline, PipelineQuantizationConfig

    method = method_class("torchao")(TorchAoOptions(quant_type="int8wo", pipeline_config=True))
    cell = Cell("torchao", {"quant_type": "int8wo"}, components=("transformer", "text_encoder_2"))
    mapping = {name: method.quantization_config(component(tiny_flux, name), cell) for name in cell.components}
    assert type(mapping["transformer"]).__module__.startswith("diffusers")  # each library's own config class
    assert type(mapping["text_encoder_2"]).__module__.startswith("transformers")
    pipe = DiffusionPipeline.from_pretrained(
        tiny_flux, dtype=torch.bfloat16, quantization_config=PipelineQuantizationConfig(quant_mapping=mapping)
    )
    assert type(pipe.transformer.transformer_blocks[0].attn.to_q.weight).__name__ == "Int8Tensor"
    assert type(pipe.text_encoder_2.encoder.block[0].layer[0].SelfAttention.q.weight).__name__ == "Int8Tensor"
    assert all(type(p).__name__ == "Parameter" for p in pipe.text_encoder.parameters()), "unmapped: unquantized"


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"quant_type": "int8wo", "pipeline_config": True, "serialize": True}, "pipeline_config and serialize"),
        ({"pipeline_config": True, "prequantized": True}, "pipeline_config and prequantized"),
    ],
)
def test_pipeline_config_refuses_options_that_need_components_loaded_one_by_one(options, fragment):
    from pydantic import ValidationError

    cls = method_class("torchao" if "quant_type" in options else "bnb_4bit")
    with pytest.raises(ValidationError, match=fragment):
        cls.Options.model_validate(options)


def test_gguf_file_that_would_not_fit_the_disk_is_a_clear_error_before_writing(tiny_flux, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    monkeypatch.setenv("QUANTBENCH_CACHE", str(tmp_path))  # an empty cache: the file must be written
    monkeypatch.setattr(shutil, "disk_usage", lambda path: namedtuple("Usage", "total used free")(10**9, 10**9, 0))
    with pytest.raises(OSError, match=r"GB needed, 0.0 GB free after evicting 0 least recently used cache entries"):
        load("gguf", {"quant_type": "Q8_0"}, tiny_flux)
    assert not list((tmp_path / "gguf").glob("transformer-*/model.gguf")), "nothing half-written"


def test_the_torchao_inductor_preset_needs_torchao(monkeypatch):
    import importlib.util

    cell = Cell("baseline", compile="default", inductor="torchao")
    assert check_cell(cell, CPU).status == "run"
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else real_find_spec(name, *a)
    )
    verdict = check_cell(cell, CPU)
    assert verdict.status == "unsupported" and "needs the `torchao` package" in verdict.reason
