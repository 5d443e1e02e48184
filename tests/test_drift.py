"""Drift metrics on known image pairs, missing weights reported as missing, gates, prompt sets."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from bench.drift import DriftScorer, gate_failures
from bench.errors import MatrixError
from bench.matrix import load_matrix
from bench.prompts import BUILTIN_PROMPTS
from tests.conftest import matrix_data, write_matrix


def gray(size: int = 64) -> np.ndarray:
    rng = np.random.default_rng(0)
    return (0.25 + 0.5 * rng.random((size, size, 3))).astype(np.float32)


def no_models() -> DriftScorer:
    return DriftScorer(clip_model=None, lpips=False)


def test_identical_images_give_infinite_psnr_and_unit_ssim():
    image = gray()
    drift = no_models().score(image, image.copy(), torch.ones(8), torch.ones(8), "p")
    assert math.isinf(drift.values["psnr_db"])
    assert drift.values["ssim"] == pytest.approx(1.0, abs=1e-6)
    assert drift.values["latent_rel_l2"] == 0.0
    assert drift.values["latent_cosine"] == pytest.approx(1.0)


@pytest.mark.parametrize("sigma", [0.01, 0.03])
def test_gaussian_noise_psnr_matches_the_formula_within_a_tenth_of_a_db(sigma):
    image = np.full((256, 256, 3), 0.5, dtype=np.float32)
    noisy = image + np.random.default_rng(1).normal(0, sigma, image.shape).astype(np.float32)
    drift = no_models().score(noisy, image, None, None, "p")
    assert drift.values["psnr_db"] == pytest.approx(10 * math.log10(1 / sigma**2), abs=0.1)
    assert 0 < drift.values["ssim"] < 1


def test_ms_ssim_is_null_with_the_reason_below_161_px_and_computed_above():
    small, large = gray(64), gray(176)
    small_drift = no_models().score(small, small, None, None, "p")
    large_drift = no_models().score(large * 0.9, large, None, None, "p")
    assert small_drift.values["ms_ssim"] is None
    assert small_drift.notes["ms_ssim"] == "metric_unavailable: image is 64x64; MS-SSIM needs >= 161 px per side"
    assert 0 < large_drift.values["ms_ssim"] < 1


def test_missing_metric_weights_are_null_with_the_reason_never_a_number(tmp_path):
    drift = DriftScorer(clip_model=str(tmp_path / "no-clip-here"), lpips=True).score(gray(), gray(), None, None, "p")
    for metric in ("clip_score", "baseline_clip_score", "clip_image_similarity", "lpips_alex", "lpips_vgg"):
        assert drift.values[metric] is None, metric
        assert drift.notes[metric].startswith("metric_unavailable: "), metric
    assert "not found locally" in drift.notes["clip_score"]
    assert "latent" in drift.notes["latent_rel_l2"]


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A tiny random-init CLIP saved locally: exercises the real CLIP code path, says nothing about quality."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    from bench.models.builtin import byte_level_vocab

    folder = tmp_path_factory.mktemp("tiny-clip-random-init")
    torch.manual_seed(0)
    vocab = byte_level_vocab()
    config = CLIPConfig(
        text_config={"vocab_size": len(vocab), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 77,
                     "eos_token_id": vocab["<|endoftext|>"], "bos_token_id": vocab["<|startoftext|>"]},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )  # fmt: skip
    CLIPModel(config).save_pretrained(folder)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def test_clip_metrics_run_on_locally_configured_weights(tiny_clip):
    image = gray()
    drift = DriftScorer(clip_model=str(tiny_clip), lpips=False).score(image, image.copy(), None, None, "a red apple")
    assert drift.values["clip_image_similarity"] == pytest.approx(1.0, abs=1e-4)
    assert 0 <= drift.values["clip_score"] <= 100
    assert drift.values["clip_score"] == pytest.approx(drift.values["baseline_clip_score"], abs=1e-3)
    assert "clip_score" not in drift.notes


@pytest.mark.skipif(
    __import__("importlib").util.find_spec("torchvision") is None, reason="LPIPS needs torchvision (absent on CPU CI)"
)
def test_lpips_runs_on_locally_cached_backbones(tmp_path, monkeypatch):
    """Random-init AlexNet and VGG16 backbones written into a private torch hub cache: the real LPIPS code
    path with local weights. The numbers say nothing about quality."""
    import torchvision

    from bench.drift import LPIPS_BACKBONE_FILES

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    checkpoints = tmp_path / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(torchvision.models.alexnet().state_dict(), checkpoints / LPIPS_BACKBONE_FILES["alex"])
    torch.save(torchvision.models.vgg16().state_dict(), checkpoints / LPIPS_BACKBONE_FILES["vgg"])
    scorer = DriftScorer(clip_model=None, lpips=True)
    same = scorer.score(gray(), gray(), None, None, "p")
    noisy = scorer.score(
        np.clip(gray() + 0.2 * np.random.default_rng(2).standard_normal(gray().shape), 0, 1).astype(np.float32),
        gray(),
        None,
        None,
        "p",
    )
    for net in ("alex", "vgg"):
        assert same.values[f"lpips_{net}"] == pytest.approx(0.0, abs=1e-6)
        assert noisy.values[f"lpips_{net}"] > 0


def test_gates_pass_fail_and_missing():
    assert gate_failures({"psnr_db": 30.0, "lpips_alex": 0.05}, {"min_psnr_db": 25, "max_lpips_alex": 0.1}) == []
    assert gate_failures({"psnr_db": 20.0}, {"min_psnr_db": 25}) == ["psnr_db = 20 breaks min_psnr_db = 25"]
    assert gate_failures({"lpips_alex": None}, {"max_lpips_alex": 0.1}) is None


def test_unknown_gate_is_a_matrix_error(tmp_path):
    with pytest.raises(MatrixError, match="gates: unknown gate 'max_lpip'"):
        load_matrix(write_matrix(tmp_path, matrix_data(gates={"max_lpip": 0.1})))


def test_prompt_sets_builtin_txt_and_jsonl(tmp_path):
    generation = {k: v for k, v in matrix_data()["generation"].items() if k != "prompts"}
    builtin = load_matrix(
        write_matrix(
            tmp_path,
            matrix_data(generation={**generation, "prompt_file": "builtin:quantbench-v1"})
            | {"generation": {**generation, "prompt_file": "builtin:quantbench-v1"}},
            "a.toml",
        )
    )
    assert builtin.generation.prompts == list(BUILTIN_PROMPTS["quantbench-v1"])
    assert 8 <= len(builtin.generation.prompts) <= 16
    (tmp_path / "p.txt").write_text("# comment\nfirst prompt\n\nsecond prompt\n")
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "from json"}) + "\n" + json.dumps("plain string") + "\n")
    txt = load_matrix(
        write_matrix(tmp_path, matrix_data() | {"generation": {**generation, "prompt_file": "p.txt"}}, "b.toml")
    )
    jsonl = load_matrix(
        write_matrix(tmp_path, matrix_data() | {"generation": {**generation, "prompt_file": "p.jsonl"}}, "c.toml")
    )
    assert txt.generation.prompts == ["first prompt", "second prompt"]
    assert jsonl.generation.prompts == ["from json", "plain string"]
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(MatrixError, match=r"generation.prompt_file: .*bad.jsonl:1: not JSON"):
        load_matrix(
            write_matrix(tmp_path, matrix_data() | {"generation": {**generation, "prompt_file": "bad.jsonl"}}, "d.toml")
        )
