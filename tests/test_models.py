"""The built-in model sources: full-size architectures match the published models, and are refused
before any work where they cannot be built; every shipped matrix file is valid."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bench.errors import UserError
from bench.matrix import load_matrix
from bench.models import builtin
from bench.runner import plan
from tests.conftest import matrix_data, write_matrix

ROOT = Path(__file__).resolve().parent.parent


def parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


PUBLISHED_PARAMETERS = {
    "flux-dev-transformer": 11_901_408_320,  # FLUX.1-dev, 11.9 B
    "sd3-medium-transformer": 2_028_328_000,  # Stable Diffusion 3 medium's MMDiT, 2.03 B
    "t5-xxl-encoder": 4_762_310_656,  # text_encoder_2 of FLUX, text_encoder_3 of SD3
    "clip-l": 123_650_304,  # CLIP ViT-L/14 text encoder with its projection
    "clip-g": 694_659_840,  # OpenCLIP ViT-bigG/14 text encoder with its projection
}


def build_full_size(name: str) -> torch.nn.Module:
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    builders = {
        "flux-dev-transformer": lambda: FluxTransformer2DModel(**builtin.FLUX_DEV_TRANSFORMER),
        "sd3-medium-transformer": lambda: SD3Transformer2DModel(**builtin.SD3_MEDIUM_TRANSFORMER),
        "t5-xxl-encoder": lambda: builtin._t5({"vocab_size": 32128, **builtin.T5_XXL}),
        "clip-l": lambda: builtin._clip({"vocab_size": 49408, **builtin.CLIP_L}, with_projection=True),
        "clip-g": lambda: builtin._clip({"vocab_size": 49408, **builtin.CLIP_G}, with_projection=True),
    }
    return builders[name]()


@pytest.mark.parametrize(("name", "published"), PUBLISHED_PARAMETERS.items())
def test_full_size_architectures_have_the_published_parameter_counts(name, published):
    with torch.device("meta"):  # shapes only: no memory, no time
        assert parameters(build_full_size(name)) == published


@pytest.fixture
def own_cache(tmp_path, monkeypatch):
    """A cache of this test's own: the run's shared one may hold another worker's build in progress."""
    monkeypatch.setenv("QUANTBENCH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize("name", ["flux-dev-shape", "sd3-medium-shape"])
def test_full_size_builtins_are_refused_before_any_work_without_a_gpu(name, tmp_path, own_cache):
    matrix = load_matrix(write_matrix(tmp_path, matrix_data(model={"builtin": name})))
    with pytest.raises(UserError, match=f"model builtin '{name}' is built on a CUDA GPU"):
        plan(matrix)
    left = [path for path in (own_cache / "models").iterdir() if path.is_dir() and name in path.name]
    assert not left, "no half-built model is left in the cache"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine where building on a GPU fails")
def test_full_size_builtins_are_built_in_a_child_process_not_in_the_driver(tmp_path, own_cache, monkeypatch):
    # The driver is told a GPU is there; the child process, which builds, finds none and fails: the error it
    # reports is the child's own, so the build (and the CUDA context it would create) never ran in the driver.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    matrix = load_matrix(write_matrix(tmp_path, matrix_data(model={"builtin": "flux-dev-shape"})))
    with pytest.raises(UserError, match="model builtin 'flux-dev-shape': building it failed: ") as error:
        plan(matrix)
    message = str(error.value)
    assert len(message.splitlines()) == 1 and "is built on a CUDA GPU" not in message, "the child's error, not ours"
    log = own_cache / "logs" / "build-flux-dev-shape.log"
    assert f"(its whole output: {log})" in message and "Traceback" in log.read_text()
    reason = message.partition("building it failed: ")[2].partition(" (its whole output")[0]
    assert reason.split(":")[0].endswith(("Error", "Exception")), f"names the child's exception: {reason!r}"
    left = [path for path in (own_cache / "models").iterdir() if path.is_dir() and "flux-dev" in path.name]
    assert not left, "no half-built model is left in the cache"


@pytest.mark.parametrize("path", sorted((ROOT / "matrices").glob("*.toml")), ids=lambda path: path.name)
def test_every_shipped_matrix_is_valid(path):
    matrix = load_matrix(path)
    assert matrix.cells and len({cell.id for cell in matrix.cells}) == len(matrix.cells)


def test_every_builtin_the_matrix_accepts_has_a_builder():
    from bench.matrix import BUILTIN_MODELS

    assert set(BUILTIN_MODELS) == set(builtin.BUILDERS)
