"""Image drift against the reference (bf16 baseline by default): PSNR, SSIM, MS-SSIM, LPIPS, CLIP, latents.

Metrics come from torchmetrics. Metric weights (CLIP, LPIPS backbones) are read from a configured local
path or the usual caches and never downloaded; where they are missing the metric is null and
`metric_notes` says `metric_unavailable: <reason>`. A number from random weights is never reported as quality.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

MS_SSIM_MIN_SIDE = 161  # torchmetrics' default 5-scale MS-SSIM needs more than 160 px per side
METRICS = (
    "psnr_db",
    "ssim",
    "ms_ssim",
    "lpips_alex",
    "lpips_vgg",
    "clip_score",
    "baseline_clip_score",
    "clip_image_similarity",
    "latent_rel_l2",
    "latent_cosine",
)
HIGHER_IS_BETTER = {"psnr_db", "ssim", "ms_ssim", "clip_score", "clip_image_similarity", "latent_cosine"}
LPIPS_BACKBONE_FILES = {"alex": "alexnet-owt-7be5be79.pth", "vgg": "vgg16-397923af.pth"}


@dataclass
class Drift:
    """Metric values of one image against its reference, with the reason for each missing one."""

    values: dict[str, float | None] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)
    reference_key: str | None = None

    def missing(self, metric: str, reason: str) -> None:
        self.values[metric] = None
        self.notes[metric] = f"metric_unavailable: {reason}"


def load_image(path: Path) -> np.ndarray:
    """An RGB PNG as float32 HxWx3 in [0, 1]."""
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0


def _nchw(image: np.ndarray) -> Any:
    import torch

    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).unsqueeze(0).float()


class DriftScorer:
    """Scores images against references; metric models load once, on first use."""

    def __init__(self, clip_model: str | None, lpips: bool = True) -> None:
        self.clip_model = clip_model
        self.lpips = lpips
        self._clip: tuple[Any, Any] | str | None = None
        self._lpips: dict[str, Any | str] = {}

    def models(self) -> dict[str, str]:
        """Which weights each model-based metric used (recorded with every row)."""
        used = {"clip": self.clip_model or "none"}
        used.update({f"lpips_{net}": f"torchvision {LPIPS_BACKBONE_FILES[net]}" for net in LPIPS_BACKBONE_FILES})
        return used

    def score(
        self,
        image: np.ndarray,
        reference: np.ndarray,
        latents: Any | None,
        reference_latents: Any | None,
        prompt: str,
    ) -> Drift:
        drift = Drift()
        self._pixel_metrics(drift, image, reference)
        self._lpips_metrics(drift, image, reference)
        self._clip_metrics(drift, image, reference, prompt)
        self._latent_metrics(drift, latents, reference_latents)
        return drift

    def _pixel_metrics(self, drift: Drift, image: np.ndarray, reference: np.ndarray) -> None:
        from torchmetrics.functional.image import (
            multiscale_structural_similarity_index_measure,
            peak_signal_noise_ratio,
            structural_similarity_index_measure,
        )

        preds, target = _nchw(image), _nchw(reference)
        drift.values["psnr_db"] = float(peak_signal_noise_ratio(preds, target, data_range=1.0))
        drift.values["ssim"] = float(structural_similarity_index_measure(preds, target, data_range=1.0))
        if min(image.shape[:2]) < MS_SSIM_MIN_SIDE:
            drift.missing(
                "ms_ssim",
                f"image is {image.shape[1]}x{image.shape[0]}; MS-SSIM needs >= {MS_SSIM_MIN_SIDE} px per side",
            )
        else:
            drift.values["ms_ssim"] = float(
                multiscale_structural_similarity_index_measure(preds, target, data_range=1.0)
            )

    def _lpips_metrics(self, drift: Drift, image: np.ndarray, reference: np.ndarray) -> None:
        for net in LPIPS_BACKBONE_FILES:
            metric = self._lpips_metric(net)
            if isinstance(metric, str):
                drift.missing(f"lpips_{net}", metric)
                continue
            drift.values[f"lpips_{net}"] = float(metric(_nchw(image) * 2 - 1, _nchw(reference) * 2 - 1))

    def _lpips_metric(self, net: str) -> Any:
        if net not in self._lpips:
            self._lpips[net] = self._load_lpips(net)
        return self._lpips[net]

    def _load_lpips(self, net: str) -> Any:
        if not self.lpips:
            return "LPIPS disabled in the matrix ([drift] lpips = false)"
        if importlib.util.find_spec("torchvision") is None:
            return "LPIPS needs torchvision, which is not installed (pip install 'quantbench[lpips]')"
        import torch

        weights = Path(torch.hub.get_dir()) / "checkpoints" / LPIPS_BACKBONE_FILES[net]
        if not weights.exists():
            return f"the {net} backbone weights are not in the torch hub cache ({weights}); nothing is downloaded"
        from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

        return LearnedPerceptualImagePatchSimilarity(net_type=net).eval()

    def _clip_metrics(self, drift: Drift, image: np.ndarray, reference: np.ndarray, prompt: str) -> None:
        clip = self._load_clip()
        if isinstance(clip, str):
            for metric in ("clip_score", "baseline_clip_score", "clip_image_similarity"):
                drift.missing(metric, clip)
            return
        import torch
        from torchmetrics.functional.multimodal import clip_score

        def model() -> tuple[Any, Any]:
            return clip

        images = [(_nchw(i)[0] * 255).round().to(torch.uint8) for i in (image, reference)]
        drift.values["clip_score"] = float(clip_score(images[0], prompt, model_name_or_path=model))
        drift.values["baseline_clip_score"] = float(clip_score(images[1], prompt, model_name_or_path=model))
        # clip_score is 100 * max(cosine, 0); the similarity is reported as a cosine in [0, 1]
        drift.values["clip_image_similarity"] = float(clip_score(images[0], images[1], model_name_or_path=model)) / 100

    def _load_clip(self) -> tuple[Any, Any] | str:
        if self._clip is None:
            self._clip = self._read_clip()
        return self._clip

    def _read_clip(self) -> tuple[Any, Any] | str:
        if not self.clip_model:
            return "no CLIP model configured ([drift] clip_model)"
        from transformers import CLIPModel, CLIPProcessor

        try:
            model = CLIPModel.from_pretrained(self.clip_model, local_files_only=True).eval()
            processor = CLIPProcessor.from_pretrained(self.clip_model, local_files_only=True)
        except OSError as error:
            return f"CLIP weights {self.clip_model!r} not found locally ({str(error).splitlines()[0]}); nothing is downloaded"
        return _TensorFeatures(model), processor

    def _latent_metrics(self, drift: Drift, latents: Any | None, reference: Any | None) -> None:
        if latents is None or reference is None:
            drift.missing("latent_rel_l2", "final latents were not recorded")
            drift.missing("latent_cosine", "final latents were not recorded")
            return
        a, b = latents.double().flatten(), reference.double().flatten()
        drift.values["latent_rel_l2"] = float((a - b).norm() / b.norm())
        drift.values["latent_cosine"] = float((a @ b) / (a.norm() * b.norm()))


class _TensorFeatures:
    """transformers 5 returns model outputs from `get_*_features`; torchmetrics expects the feature tensor."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.config = model.config

    def to(self, device: Any) -> _TensorFeatures:
        self.model.to(device)
        return self

    def get_image_features(self, *args: Any, **kwargs: Any) -> Any:
        return _features(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args: Any, **kwargs: Any) -> Any:
        return _features(self.model.get_text_features(*args, **kwargs))


def _features(output: Any) -> Any:
    return output if hasattr(output, "norm") else output.pooler_output


def gate_failures(means: dict[str, float | None], gates: dict[str, float]) -> list[str] | None:
    """Which `max_<metric>` / `min_<metric>` gates the cell's mean metrics break; None if a gated metric is missing."""
    failures = []
    for gate, bound in gates.items():
        kind, metric = gate.split("_", 1)
        value = means.get(metric)
        if value is None or value != value:
            return None
        if (kind == "max" and value > bound) or (kind == "min" and value < bound):
            failures.append(f"{metric} = {value:.4g} breaks {gate} = {bound:g}")
    return failures


def notes_json(notes: dict[str, str]) -> str | None:
    return json.dumps(notes, sort_keys=True) if notes else None
