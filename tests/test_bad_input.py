"""Property-based bad input: thousands of malformed matrix files, each a one-line MatrixError naming a key."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import tomli_w
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.errors import MatrixError
from bench.matrix import load_matrix
from tests.conftest import SMOKE_MATRIX

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = ("model", "generation", "run", "axes")
NUMERIC = ("height", "width", "num_inference_steps", "guidance_scale", "max_sequence_length", "repeats", "warmup")
ENUM_AXES = ("dtype", "compile", "inductor", "placement", "method")
junk_text = st.text(min_size=1, max_size=300).filter(lambda s: s.strip() and s not in ("bf16", "fp16", "fp32"))
wrong_typed = st.one_of(
    st.booleans(), st.dictionaries(st.text(min_size=1, max_size=5), st.integers(), min_size=1, max_size=2)
)


@st.composite
def malformed(draw) -> tuple[dict | bytes, str]:
    """A matrix with exactly one defect of a drawn kind, and the key path the error must name."""
    data = copy.deepcopy(SMOKE_MATRIX)
    kind = draw(
        st.sampled_from(
            [
                "unknown_key",
                "wrong_type",
                "empty_axis",
                "bad_number",
                "bad_enum",
                "bad_name",
                "bad_option",
                "non_utf8",
                "long_string",
            ]
        )
    )
    if kind == "unknown_key":
        section = draw(st.sampled_from(SECTIONS))
        key = draw(
            st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=40).filter(
                lambda k: k not in data[section] and k not in _fields(section)
            )
        )
        data[section][key] = draw(st.integers())
        return data, f"{section}.{key}"
    if kind == "wrong_type":
        key = draw(st.sampled_from(NUMERIC))
        data["generation"][key] = draw(
            st.one_of(st.text(max_size=20), wrong_typed, st.lists(st.integers(), min_size=1, max_size=3))
        )
        return data, f"generation.{key}"
    if kind == "empty_axis":
        axis = draw(st.sampled_from(("method", "dtype", "compile", "placement", "threshold", "components")))
        data["axes"][axis] = []
        return data, f"axes.{axis}"
    if kind == "bad_number":
        key = draw(st.sampled_from(("height", "width", "num_inference_steps", "max_sequence_length", "repeats")))
        data["generation"][key] = draw(
            st.one_of(st.integers(max_value=0), st.integers(min_value=10**6, max_value=2**62))
        )
        return data, f"generation.{key}"
    if kind == "bad_enum":
        axis = draw(st.sampled_from(ENUM_AXES))
        data["axes"][axis] = [draw(junk_text.filter(lambda s: s not in _allowed(axis)))]
        return data, f"axes.{axis}"
    if kind == "bad_name":
        data["name"] = draw(st.sampled_from(["../up", "a/b", "/abs", "..", "x/../../y"])) + draw(
            st.text(alphabet="ab", max_size=3)
        )
        return data, "name"
    if kind == "bad_option":
        data["method"]["torchao"]["quant_type"] = draw(
            junk_text.filter(lambda s: not s.startswith(("int", "uint", "fp", "float", "autoquant")))
        )
        return data, "method.torchao.quant_type"
    if kind == "long_string":
        data["model"] = {"builtin": "tiny-flux" + "x" * draw(st.integers(min_value=1, max_value=5000))}
        return data, "model.builtin"
    prefix = tomli_w.dumps(data).encode()
    return prefix + b'\nextra = "' + draw(st.binary(min_size=1, max_size=20).map(lambda b: b"\xff" + b)) + b'"\n', ""


def _allowed(axis: str) -> tuple[str, ...]:
    """The values an enum axis accepts (Hypothesis also tries strings it finds in our source, valid ones too)."""
    from bench.cells import DTYPES
    from bench.compilation import INDUCTOR_PRESETS
    from bench.matrix import COMPILE_MODES, PLACEMENTS
    from bench.methods import method_names

    allowed = {"dtype": tuple(DTYPES), "compile": COMPILE_MODES, "inductor": INDUCTOR_PRESETS, "placement": PLACEMENTS}
    return allowed.get(axis) or tuple(method_names())


def _fields(section: str) -> set[str]:
    from bench.matrix import MatrixFile

    return set(MatrixFile.model_fields[section].annotation.model_fields)


@settings(
    max_examples=1200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(case=malformed())
def test_every_malformed_matrix_is_a_one_line_error_naming_the_key(tmp_path, case):
    content, key = case
    path = tmp_path / "matrix.toml"
    path.write_bytes(content if isinstance(content, bytes) else tomli_w.dumps(content).encode())
    before = sorted(p.name for p in tmp_path.iterdir())
    try:
        load_matrix(path)
    except MatrixError as error:
        message = str(error)
        assert "\n" not in message
        assert message.startswith(f"{path}: {key}") if key else "not UTF-8" in message
    else:
        raise AssertionError(f"accepted a malformed matrix ({key})")
    assert sorted(p.name for p in tmp_path.iterdir()) == before, "nothing is written"


def test_cli_gives_exit_2_and_no_traceback_for_a_sample_of_malformed_files(tmp_path):
    cases = {"unknown.toml": {**SMOKE_MATRIX, "generaton": {}}, "empty.toml": {**SMOKE_MATRIX, "axes": {"method": []}}}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    for name, data in cases.items():
        (tmp_path / name).write_text(tomli_w.dumps(data))
        done = subprocess.run(
            [sys.executable, "-m", "bench", "run", name],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 2, done.stderr
        assert "Traceback" not in done.stderr and done.stderr.count("quantbench: error:") == 1
    assert not (tmp_path / "results").exists()
