"""Drift scoring of a run: the reference images (made once by a reference cell, then cached in
bench.reference_cache) and the scorer (bench.drift) that compares each cell's images and latents with them."""

from __future__ import annotations

import json
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from bench.atomic import write_text_atomic
from bench.cells import Cell
from bench.contract import CellResult, Status
from bench.drift import METRICS, Drift, DriftScorer, load_image
from bench.environment import MODEL_LIBRARIES, library_versions
from bench.matrix.rules import model_identity
from bench.reference_cache import Reference, ReferenceCache, reference_key
from bench.store import ResultsFolder


class ReferenceComparison:
    """The reference images of a run (made once, then cached) and the scorer that compares cells with them."""

    def __init__(self, ready: Any, folder: ResultsFolder, submit: Callable[[Cell, dict[str, Any]], Future]) -> None:
        """`ready` is the run's plan (bench.runner.Plan); `submit` runs a cell with a generation config."""
        matrix = ready.matrix
        self.ready = ready
        self.submit = submit
        self.ran_reference = False
        self.folder = folder
        self.dtype = matrix.drift.reference_dtype
        self.scorer = DriftScorer(matrix.clip_model(), matrix.drift.lpips)
        self.references, self.problem = self._references()

    def _keys(self) -> dict[tuple[int, int], str]:
        matrix = self.ready.matrix
        device = self.ready.machine.gpu_name if self.ready.device == "cuda" else "cpu"
        generation = matrix.generation.identity()
        # the model (a local folder's content fingerprint included) and the libraries that make the images
        model = {**model_identity(matrix.spec, matrix.path), "libraries": library_versions(*MODEL_LIBRARIES)}
        return {
            (index, seed): reference_key(model, generation, prompt, seed, self.dtype, device)
            for index, prompt in enumerate(matrix.generation.prompts)
            for seed in matrix.generation.seeds
        }

    def _references(self) -> tuple[dict[tuple[int, int], Reference], str | None]:
        cache = ReferenceCache()
        keys = self._keys()
        found = {pair: cache.get(key) for pair, key in keys.items()}
        if all(found.values()):
            return found, None
        self.ran_reference = True
        cell = Cell(method="baseline", dtype=self.dtype).with_id({"reference": list(keys.values())})
        generation = {**self.ready.matrix.generation.model_dump(), "repeats": 1, "warmup": 0, "resolutions": None}
        try:
            outcome = self.submit(cell, generation).result()
        except Exception as error:
            return {}, f"the reference run ({self.dtype} baseline) could not run: {type(error).__name__}: {error}"
        write_text_atomic(self.folder.logs_dir / "reference.log", outcome.log)
        result = outcome.result
        if result.status != Status.OK:
            last_line = (result.error or "").strip().splitlines()[-1:] or ["no error text"]
            return {}, f"the reference run ({self.dtype} baseline) ended {result.status}: {last_line[0]}"
        for pair, key in keys.items():
            stem = f"p{pair[0]}_s{pair[1]}"
            image = outcome.files.get(f"images/{stem}.png")
            if image is None:
                return {}, f"the reference image for prompt {pair[0]}, seed {pair[1]} has NaN or inf values"
            found[pair] = cache.put(key, image, outcome.files.get(f"latents/{stem}.safetensors"))
        return found, None

    def row_fields(self) -> dict[str, Any]:
        return {"reference_dtype": self.dtype, "metric_models": json.dumps(self.scorer.models(), sort_keys=True)}

    def score(self, cell: Cell, result: CellResult) -> dict[tuple[int, int], Drift]:
        """Drift of each of the cell's images; metrics are missing, with the reason, where they cannot be computed."""
        scores = {}
        prompts = self.ready.matrix.generation.prompts
        for sample in result.samples:
            pair = (sample.prompt_index, sample.seed)
            reference = self.references.get(pair)
            if reference is None or not sample.image_file:
                reason = self.problem or "the image has NaN or inf values"
                scores[pair] = Drift()
                for metric in METRICS:
                    scores[pair].missing(metric, reason)
                continue
            stem = f"p{pair[0]}_s{pair[1]}"
            scores[pair] = self.scorer.score(
                load_image(self.folder.images_dir / cell.id / sample.image_file),
                load_image(reference.image_path),
                _latents(self.folder.latents_dir / cell.id / f"{stem}.safetensors"),
                _latents(reference.latents_path),
                prompts[pair[0]],
            )
            scores[pair].reference_key = reference.key
        return scores


def _latents(path: Path) -> Any | None:
    if not path.exists():
        return None
    from safetensors.torch import load_file

    return load_file(str(path))["latents"]
