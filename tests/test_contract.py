"""The driver-cell contract: every measurement a cell may send is named, typed and lands in its own column."""

import dataclasses
import json
from pathlib import Path

import pytest

from bench.contract import MEASUREMENT_NAMES, CellResult, Measurements, Sample, Status, UnknownMeasurement
from bench.store import STATUSES, ResultRow


def test_an_unknown_measurement_fails_loudly_however_it_is_sent(tmp_path):
    measurements = Measurements()
    with pytest.raises(UnknownMeasurement, match="load_sec"):
        measurements.update({"load_sec": 1.0})  # a method's after_load with a misspelled key
    with pytest.raises(AttributeError):
        measurements.load_sec = 1.0  # a misspelled assignment in the cell
    result = tmp_path / "result.json"
    result.write_text(json.dumps({"status": "ok", "error": None, "measurements": {"load_sec": 1.0}, "samples": []}))
    with pytest.raises(UnknownMeasurement, match="load_sec"):
        CellResult.load(result)  # a result written by a cell newer than the driver


def test_every_measurement_has_the_result_column_of_its_name():
    columns = {f.name: f.type for f in dataclasses.fields(ResultRow)}
    for field in dataclasses.fields(Measurements):
        assert field.name in columns, field.name
        assert field.type == columns[field.name], (
            f"{field.name}: {field.type} in the contract, {columns[field.name]} in the row"
        )


def test_a_result_round_trips_through_its_json_file(tmp_path):
    result = CellResult(Status.OOM, "CUDA out of memory", Measurements(load_s=1.5, checkpoint_bytes=3))
    result.samples.append(Sample(0, 7, [0.5], [0.1], "p0_s7.png", True))
    result.save(tmp_path / "result.json")
    back = CellResult.load(tmp_path / "result.json")
    assert back == result and back.status is Status.OOM
    assert json.loads((tmp_path / "result.json").read_text())["status"] == "oom", "plain names on disk"


def test_statuses_are_the_plain_names_the_parquet_holds():
    assert [str(s) for s in STATUSES] == ["ok", "failed", "oom", "timeout", "skipped", "unsupported"]
    assert Status.OK == "ok" and Status("timeout") is Status.TIMEOUT
    assert set(MEASUREMENT_NAMES) >= {"load_s", "peak_reserved_bytes", "compile_counts"}


def test_the_driver_starts_without_torch_diffusers_or_transformers():
    """The import-linter contract sees direct imports only; this follows every chain the driver loads at start-up."""
    import subprocess
    import sys

    code = (
        "import sys, bench.cli, bench.runner, bench.console, bench.compare, bench.executors.local, bench.rows\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'diffusers', 'transformers'}))"
    )
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root).stdout
    assert out.strip() == "[]"


def test_method_notes_are_a_measurement_the_contract_names():
    from bench.methods.base import method_notes

    measurements = Measurements()
    measurements.update(method_notes(kernel_path="dequantize"))
    assert json.loads(measurements.method_notes) == {"kernel_path": "dequantize"}
