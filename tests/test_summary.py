"""The summary's comparisons: each cell against the bf16 cell it should be measured against."""

from dataclasses import asdict

import pandas as pd
import pytest

from bench.store import ResultRow
from bench.summary import cell_summary
from tests.test_store import REQUIRED

GIB = 2**30


def _row(cell_id: str, method: str, batch: int | None, attention: str | None, e2e_s: float, peak_gib: float) -> dict:
    fields = {**REQUIRED, "cell_label": f"{method} {cell_id}", "method": method, "method_family": method}
    return asdict(
        ResultRow(
            cell_id=cell_id, status="ok", gpu_name="NVIDIA H200", batch_size=batch, attention=attention,
            e2e_latency_median_s=e2e_s, step_latency_median_s=e2e_s / 4, peak_reserved_bytes=int(peak_gib * GIB),
            transformer_tensor_bytes=GIB, **fields,
        )
    )  # fmt: skip


def test_a_batch_and_an_attention_backend_are_compared_with_bf16_at_the_same_batch_with_native_attention():
    frame = pd.DataFrame(
        [
            _row("flash1", "baseline", 1, "_native_flash", 1.2, 36),  # listed first: must not become the reference
            _row("bf16", "baseline", 1, "native", 1.0, 36),
            _row("bf16x4", "baseline", 4, "native", 3.6, 50),
            _row("ao1", "torchao", 1, "native", 0.5, 25),
            _row("ao4", "torchao", 4, "native", 1.8, 40),
            _row("old", "torchao", None, None, 0.8, 27),  # a row from before both axes: batch 1, native
        ]
    )
    cells = cell_summary(frame).set_index("cell_id")
    assert cells.loc["ao4", "speedup"] == pytest.approx(3.6 / 1.8)  # against bf16 at batch 4, not batch 1
    assert cells.loc["ao4", "memory_saving"] == pytest.approx(1 - 40 / 50)
    assert cells.loc["ao1", "speedup"] == pytest.approx(1.0 / 0.5)  # against native, not _native_flash
    assert cells.loc["flash1", "speedup"] == pytest.approx(1.0 / 1.2)
    assert cells.loc["bf16x4", "speedup"] == pytest.approx(1.0)
    assert cells.loc["old", "speedup"] == pytest.approx(1.0 / 0.8)


def test_what_to_pick_measures_savings_against_bf16_with_one_image_and_native_attention():
    from bench.report.decision import decide

    frame = pd.DataFrame(
        [
            _row("a_x4", "baseline", 4, "native", 3.6, 50),  # labels sort first: neither may become the reference
            _row("b_flash", "baseline", 1, "_native_flash", 1.2, 36),
            _row("c_native", "baseline", 1, "native", 1.0, 36),
            _row("ao1", "torchao", 1, "native", 0.5, 25),
        ]
    )
    decision = decide(frame, cell_summary(frame), "NVIDIA H200", (80, 24))
    fastest = decision.budgets[0].eager
    assert fastest.label == "torchao ao1"
    assert fastest.speedup == pytest.approx(1.0 / 0.5)  # step against bf16 native at batch 1
    assert fastest.memory_saved_bytes == pytest.approx((36 - 25) * GIB)


def test_a_hotswap_cell_is_compared_with_bf16_eager_and_its_own_eager_twin_with_the_adapter_unfused():
    def lora_row(cell_id: str, method: str, compile_mode: str, lora: str, e2e_s: float, peak_gib: float) -> dict:
        return {**_row(cell_id, method, 1, "native", e2e_s, peak_gib), "compile": compile_mode, "lora": lora,
                "lora_rank": None if lora == "none" else 16}  # fmt: skip

    frame = pd.DataFrame(
        [
            lora_row("bf16", "baseline", "off", "none", 1.0, 36),
            lora_row("bf16_fused", "baseline", "off", "fused", 1.1, 36),
            lora_row("bf16_unfused", "baseline", "off", "unfused", 1.2, 37),
            lora_row("nf4_unfused", "bnb_4bit", "off", "unfused", 1.4, 20),
            lora_row("nf4_hotswap", "bnb_4bit", "default", "hotswap", 0.7, 21),
        ]
    )
    cells = cell_summary(frame).set_index("cell_id")
    assert cells.loc["nf4_hotswap", "speedup"] == pytest.approx(1.2 / 0.7)  # bf16 eager, adapter unfused
    assert cells.loc["nf4_hotswap", "memory_saving"] == pytest.approx(1 - 21 / 37)
    assert cells.loc["nf4_hotswap", "eager_step_latency_median_s"] == pytest.approx(1.4 / 4)
    assert cells.loc["bf16_fused", "speedup"] == pytest.approx(1.1 / 1.1)  # fused against fused


def test_a_compiled_cell_is_compared_with_its_eager_twin_at_the_same_batch_and_attention_backend():
    def compiled(row: dict) -> dict:
        return {**row, "cell_id": row["cell_id"] + "_c", "compile": "default", "e2e_latency_median_s": 1.0,
                "step_latency_median_s": row["step_latency_median_s"] * 0.8}  # fmt: skip

    eager = [
        _row("bf16", "baseline", 1, "native", 1.0, 36),
        _row("bf16x4", "baseline", 4, "native", 3.6, 50),
        _row("old", "torchao", None, None, 0.8, 27),  # a row from before both axes: batch 1, native
    ]
    flex = {**_row("flex", "baseline", 1, "flex", 1.0, 36), "compile": "default"}  # flex runs compiled only
    cells = cell_summary(pd.DataFrame([*eager, *map(compiled, eager), flex])).set_index("cell_id")
    assert cells.loc["bf16x4_c", "eager_step_latency_median_s"] == pytest.approx(3.6 / 4)  # batch 4's, not 1's
    assert cells.loc["bf16_c", "eager_step_latency_median_s"] == pytest.approx(1.0 / 4)
    assert cells.loc["old_c", "eager_step_latency_median_s"] == pytest.approx(0.8 / 4)
    assert pd.isna(cells.loc["flex", "eager_step_latency_median_s"]), "no eager flex cell: no eager step"
