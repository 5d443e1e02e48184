"""The reference images and final latents every cell is compared with, cached by content key.

For each (model, prompt, seed, size, steps, guidance, sequence length, reference dtype, device, LoRA adapter)
the reference runs once; later runs and other matrices with the same key reuse it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.atomic import replace_folder
from bench.cache import cache_dir

REFERENCE_VERSION = "1"
IMAGE_FILE = "image.png"
LATENTS_FILE = "latents.safetensors"


@dataclass(frozen=True)
class Reference:
    key: str
    folder: Path

    @property
    def image_path(self) -> Path:
        return self.folder / IMAGE_FILE

    @property
    def latents_path(self) -> Path:
        return self.folder / LATENTS_FILE


def reference_key(
    model_key: dict[str, Any],
    generation: dict[str, Any],
    prompt: str,
    seed: int,
    dtype: str,
    device: str,
    lora: str | None = None,
) -> str:
    """The content key of one reference image; `lora` is the identity of the LoRA adapter loaded (unfused) into
    the reference pipeline (bench.lora.Adapter), None for none."""
    settings = {
        k: generation[k] for k in ("height", "width", "num_inference_steps", "guidance_scale", "max_sequence_length")
    }
    payload = [REFERENCE_VERSION, model_key, settings, prompt, seed, dtype, device]
    if lora is not None:  # keys without an adapter stay what they were
        payload.append({"lora": lora})
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


class ReferenceCache:
    """`$QUANTBENCH_CACHE/baselines/<key>/{image.png, latents.safetensors}`, each entry written atomically."""

    def __init__(self) -> None:
        self.root = cache_dir("baselines")

    def get(self, key: str) -> Reference | None:
        reference = Reference(key, self.root / key)
        return reference if reference.image_path.exists() else None

    def put(self, key: str, image: bytes, latents: bytes | None) -> Reference:
        """Store the PNG bytes and final-latents safetensors bytes of one reference image."""
        scratch = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=self.root))
        (scratch / IMAGE_FILE).write_bytes(image)
        if latents is not None:
            (scratch / LATENTS_FILE).write_bytes(latents)
        target = self.root / key
        if target.exists():  # written meanwhile by another run: keep the first
            shutil.rmtree(scratch)
        else:
            replace_folder(scratch, target)
        return Reference(key, target)
