"""The serialization round trip: saved, reloaded, timed and sized; a refused pickle is recorded, and the
weights_only=False workaround runs only behind the trust flag."""

from __future__ import annotations

import json

import pytest
import torch

from bench.cells import Cell
from bench.methods import method_class
from bench.methods.base import Component
from bench.models.builtin import build_builtin
from bench.serialization import round_trip


class UnlistedTensor(torch.Tensor):
    """A tensor subclass torch.load(weights_only=True) does not know: it refuses to unpickle it."""


@pytest.fixture(scope="module")
def transformer(quantbench_cache):
    folder = build_builtin("tiny-flux")
    library, class_name = json.loads((folder / "model_index.json").read_text())["transformer"]
    return Component("transformer", library, class_name, folder)


def quantized(transformer, quant_type: str):
    cls = method_class("torchao")
    cell = Cell("torchao", {"quant_type": quant_type, "serialize": True}, components=("transformer",))
    return cls(cls.Options.model_validate(cell.options)).load_component(transformer, cell), cell


def test_torchao_round_trip_reloads_the_quantized_tensors(transformer):
    model, cell = quantized(transformer, "int8wo")
    reloaded, measured = round_trip(model, transformer, cell, safe_serialization=False, trust_pickles=False)
    assert measured["serialization_status"] == "ok"
    assert measured["checkpoint_bytes"] > 0 and measured["serialize_save_s"] > 0 and measured["serialize_reload_s"] > 0
    assert reloaded is not model
    assert type(reloaded.transformer_blocks[0].attn.to_q.weight).__name__ == "Int8Tensor"


def _with_unlisted_weight(model):
    bias = model.proj_out.bias
    model.proj_out.bias = torch.nn.Parameter(bias.detach().clone().as_subclass(UnlistedTensor), requires_grad=False)
    return model


def test_a_refused_pickle_is_recorded_and_the_original_is_kept_without_the_trust_flag(transformer):
    model, cell = quantized(transformer, "int8wo")
    model = _with_unlisted_weight(model)
    kept, measured = round_trip(model, transformer, cell, safe_serialization=False, trust_pickles=False)
    assert kept is model
    assert measured["serialization_status"].startswith("reload refused by torch.load(weights_only=True)")
    assert "UnlistedTensor" in measured["serialization_status"]
    assert "serialize_reload_s" not in measured


def test_the_trust_flag_runs_the_guides_workaround_and_says_so(transformer):
    model, cell = quantized(transformer, "int8wo")
    model = _with_unlisted_weight(model)
    reloaded, measured = round_trip(model, transformer, cell, safe_serialization=False, trust_pickles=True)
    assert measured["serialization_status"].startswith("ok: reloaded with torch.load(weights_only=False)")
    assert isinstance(reloaded.proj_out.bias, UnlistedTensor)
    assert type(reloaded.transformer_blocks[0].attn.to_q.weight).__name__ == "Int8Tensor"


@pytest.mark.slow
def test_serialize_option_runs_in_a_real_cell_and_lands_in_the_row(tmp_path, quantbench_cache):
    from bench.matrix import load_matrix
    from bench.runner import run_matrix
    from bench.store import read_results
    from tests.conftest import matrix_data, write_matrix

    data = matrix_data(
        name="serialize",
        generation={"prompts": ["a red apple"], "num_inference_steps": 2, "repeats": 1},
        axes={"method": ["torchao"]},
        method={"torchao": {"quant_type": "int8wo", "serialize": True}},
    )
    run_matrix(load_matrix(write_matrix(tmp_path, data)), tmp_path / "results")
    row = read_results(tmp_path / "results").iloc[0]
    assert row["status"] == "ok"
    assert row["serialization_status"] == "transformer: ok"
    assert row["checkpoint_bytes"] > 0 and row["serialize_reload_s"] > 0
    assert "serialize" in row["cell_label"]
