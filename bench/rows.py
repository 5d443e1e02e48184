"""Turn a cell's outcome into result rows: one per (prompt, seed), whatever the status."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.cells import Cell
from bench.contract import MEASUREMENT_NAMES, CellResult, Measurements, Status
from bench.drift import Drift, gate_failures, notes_json
from bench.measure import Stats
from bench.methods import method_class
from bench.store import SCHEMA_VERSION, ResultRow

_UNMAPPED = set(MEASUREMENT_NAMES) - set(ResultRow.__dataclass_fields__)
if _UNMAPPED:  # the contract and the row schema must agree: a measurement is never dropped on the way
    raise RuntimeError(f"measurements without a result column: {', '.join(sorted(_UNMAPPED))}")
NO_GPU_NOTE = "no CUDA device: the cell ran on the CPU, GPU memory was not measured"


def cell_rows(
    matrix: Any,
    model: Any,
    cell: Cell,
    result: CellResult,
    context: dict[str, Any],
    drift: dict[tuple[int, int], Drift] | None = None,
) -> list[ResultRow]:
    """Rows for `cell`. `context` holds the environment, device and driver facts shared by every row;
    `drift` the metrics of each (prompt index, seed) against the reference."""
    generation = matrix.generation
    base = {
        "schema_version": SCHEMA_VERSION,
        "matrix_name": matrix.name,
        "matrix_path": str(matrix.path),
        "cell_id": cell.id,
        "cell_label": cell.label,
        "timestamp_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "method": cell.method,
        "method_family": method_class(cell.method).family,
        "method_options": json.dumps(cell.options, sort_keys=True),
        "dtype": cell.dtype,
        "threshold": cell.threshold,
        "compile": cell.compile,
        "fullgraph": cell.fullgraph,
        "inductor": cell.inductor,
        "regional": cell.regional,
        "components": ",".join(cell.components) if cell.components is not None else None,
        "placement": cell.placement,
        "attention": cell.attention,
        "dynamic": cell.dynamic,
        "batch_size": cell.batch_size,
        "lora": cell.lora,
        "lora_rank": cell.lora_rank,
        "lora_adapter": timed_adapter_name(matrix.spec.lora, cell.lora),
        "model_source": model.source,
        "model_revision": model.revision,
        "pipeline_class": model.pipeline_class,
        "weights": model.weights_label,
        "height": generation.height,
        "width": generation.width,
        "num_inference_steps": generation.num_inference_steps,
        "guidance_scale": generation.guidance_scale,
        "max_sequence_length": generation.max_sequence_length,
        "repeats": generation.repeats,
        "value_dependent_latency": _method(cell).value_dependent_latency(cell),
        **context,
        **measurement_columns(result.measurements),
    }
    if context.get("device") == "cpu":
        base["gpu_memory_note"] = NO_GPU_NOTE
    samples = {(s.prompt_index, s.seed): s for s in result.samples}
    rows = []
    for prompt_index, prompt in enumerate(generation.prompts):
        for seed in generation.seeds:
            row = ResultRow(
                **base, prompt_index=prompt_index, prompt=prompt, seed=seed, status=result.status, error=result.error
            )
            sample = samples.get((prompt_index, seed))
            if sample is not None:
                _fill_sample(row, sample)
                _extrapolate(row, generation.extrapolate_to_steps)
            elif result.status == Status.OK:
                row.status, row.error = Status.FAILED, "the cell finished without measuring this prompt and seed"
            if drift and (prompt_index, seed) in drift:
                _fill_drift(row, drift[(prompt_index, seed)])
            rows.append(row)
    _apply_gates(rows, matrix.spec.gates)
    return rows


def timed_adapter_name(lora: Any, mode: str) -> str | None:
    """The adapter a cell's timed runs used, for people: the file's name, or `synthetic` with its seed and
    targets; None without one."""
    if mode == "none":
        return None
    if lora.synthetic:
        seed = lora.synthetic.hotswap_seed if mode == "hotswap" else lora.synthetic.seed
        return f"synthetic seed={seed} targets={'+'.join(lora.synthetic.targets)}"
    return Path(lora.hotswap_path if mode == "hotswap" else lora.path).name


def _method(cell: Cell) -> Any:
    cls = method_class(cell.method)
    return cls(cls.Options.model_validate(cell.options))


def measurement_columns(measurements: Measurements) -> dict[str, Any]:
    """The row columns a cell's measurements fill: each measurement goes to the column of its name."""
    return {name: getattr(measurements, name) for name in MEASUREMENT_NAMES}


def _extrapolate(row: ResultRow, steps: int | None) -> None:
    """The end-to-end time of `steps` steps from the timed run of fewer: the extra steps at the median step time."""
    if steps is None or row.e2e_latency_median_s is None or row.step_latency_median_s is None:
        return
    row.extrapolated_to_steps = steps
    row.e2e_latency_extrapolated_s = (
        row.e2e_latency_median_s + (steps - row.num_inference_steps) * row.step_latency_median_s
    )


def _fill_drift(row: ResultRow, drift: Drift) -> None:
    for metric, value in drift.values.items():
        setattr(row, metric, value)
    row.metric_notes = notes_json(drift.notes)
    row.reference_key = drift.reference_key


def _apply_gates(rows: list[ResultRow], gates: dict[str, float]) -> None:
    """Mark every row of the cell with the verdict of the matrix's quality gates on the cell's means."""
    if not gates:
        return
    scored = [row for row in rows if row.status == Status.OK]
    means = {}
    for metric in {gate.split("_", 1)[1] for gate in gates}:
        values = [getattr(row, metric) for row in scored if getattr(row, metric) is not None]
        means[metric] = sum(values) / len(values) if values else None
    failures = gate_failures(means, gates) if scored else None
    status = "missing" if failures is None else "fail" if failures else "pass"
    for row in rows:
        row.gate_status = status
        row.gate_failures = "; ".join(failures) if failures else None


def _fill_sample(row: ResultRow, sample: Any) -> None:
    e2e = Stats.of(sample.e2e_latency_s)
    row.e2e_latency_median_s, row.e2e_latency_iqr_s = e2e.median, e2e.iqr
    row.e2e_times_s, row.step_times_s = list(sample.e2e_latency_s), list(sample.step_latency_s)
    batch = row.batch_size or 1
    row.e2e_latency_per_image_s = e2e.median / batch
    row.images_per_s = batch / e2e.median if e2e.median > 0 else None
    if sample.step_latency_s:
        steps = Stats.of(sample.step_latency_s)
        row.step_latency_median_s, row.step_latency_iqr_s = steps.median, steps.iqr
    row.image_path = f"images/{row.cell_id}/{sample.image_file}" if sample.image_file else None
    row.image_finite = sample.image_finite
    if not sample.image_finite:
        row.status, row.error = Status.FAILED, "the generated image has NaN or inf values"
