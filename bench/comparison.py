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
from bench.lora import Adapter, CellAdapters
from bench.matrix.rules import model_identity
from bench.reference_cache import Reference, ReferenceCache, reference_key
from bench.store import ResultsFolder

Pair = tuple[int, int]  # (prompt index, seed)


class ReferenceComparison:
    """The reference images of a run (made once, then cached) and the scorer that compares cells with them.

    A LoRA cell's reference is the reference pipeline with the adapter its timed runs used, loaded unfused: one
    set of references per adapter."""

    def __init__(
        self,
        ready: Any,
        folder: ResultsFolder,
        submit: Callable[[Cell, dict[str, Any], CellAdapters | None], Future],
        cells: list[Cell] | None = None,
    ) -> None:
        """`ready` is the run's plan (bench.runner.Plan); `submit` runs a cell with a generation config and an
        adapter; `cells` are the cells to score (default: the matrix's), whose adapters need references."""
        matrix = ready.matrix
        self.ready = ready
        self.submit = submit
        self.ran_reference = False
        self.folder = folder
        self.dtype = matrix.drift.reference_dtype
        self.scorer = DriftScorer(matrix.clip_model(), matrix.drift.lpips)
        adapters = {self._adapter(cell) for cell in (matrix.cells if cells is None else cells)}
        self.references: dict[Adapter | None, dict[Pair, Reference]] = {}
        self.problems: dict[Adapter | None, str | None] = {}
        for adapter in sorted(adapters, key=lambda a: a.identity if a else ""):
            self.references[adapter], self.problems[adapter] = self._references(adapter)

    def _adapter(self, cell: Cell) -> Adapter | None:
        return self.ready.adapters.timed(cell.lora, cell.lora_rank)

    def _keys(self, adapter: Adapter | None) -> dict[Pair, str]:
        matrix = self.ready.matrix
        device = self.ready.machine.gpu_name if self.ready.device == "cuda" else "cpu"
        generation = matrix.generation.identity()
        # the model (a local folder's content fingerprint included) and the libraries that make the images
        model = {**model_identity(matrix.spec, matrix.path), "libraries": library_versions(*MODEL_LIBRARIES)}
        lora = adapter.identity if adapter else None
        return {
            (index, seed): reference_key(model, generation, prompt, seed, self.dtype, device, lora)
            for index, prompt in enumerate(matrix.generation.prompts)
            for seed in matrix.generation.seeds
        }

    def _references(self, adapter: Adapter | None) -> tuple[dict[Pair, Reference], str | None]:
        cache = ReferenceCache()
        keys = self._keys(adapter)
        found = {pair: cache.get(key) for pair, key in keys.items()}
        if all(found.values()):
            return found, None
        self.ran_reference = True
        what = f"{self.dtype} baseline" + (f" with the LoRA {adapter.identity}" if adapter else "")
        lora = "unfused" if adapter else "none"
        cell = Cell(method="baseline", dtype=self.dtype, lora=lora, lora_rank=adapter.rank if adapter else None)
        cell = cell.with_id({"reference": list(keys.values())})
        adapters = CellAdapters("unfused", adapter.to_json(), None, adapter.rank) if adapter else None
        generation = {**self.ready.matrix.generation.model_dump(), "repeats": 1, "warmup": 0, "resolutions": None}
        try:
            outcome = self.submit(cell, generation, adapters).result()
        except Exception as error:
            return {}, f"the reference run ({what}) could not run: {type(error).__name__}: {error}"
        log_name = f"reference-{adapter.identity}.log" if adapter else "reference.log"
        write_text_atomic(self.folder.logs_dir / log_name, outcome.log)
        result = outcome.result
        if result.status != Status.OK:
            last_line = (result.error or "").strip().splitlines()[-1:] or ["no error text"]
            return {}, f"the reference run ({what}) ended {result.status}: {last_line[0]}"
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
        adapter = self._adapter(cell)
        references = self.references.get(adapter, {})
        for sample in result.samples:
            pair = (sample.prompt_index, sample.seed)
            reference = references.get(pair)
            if reference is None or not sample.image_file:
                reason = self.problems.get(adapter) or "the image has NaN or inf values"
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
