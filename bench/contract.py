"""The contract between the driver and a cell subprocess: what the cell is told (`CellSpec`), what it measures
(`Measurements`, units in the names), what it reports back (`CellResult`), and the row statuses (`Status`).

Standard library only: the driver imports it at start-up, the cell writes it as JSON and the driver reads it
back. A measurement the contract does not name is an error, never a silently dropped value.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from bench.atomic import write_text_atomic


class Status(StrEnum):
    """A row's (and a cell's) status; str-valued, so the Parquet column holds the plain names."""

    OK = "ok"
    FAILED = "failed"
    OOM = "oom"
    TIMEOUT = "timeout"
    SKIPPED = "skipped"
    UNSUPPORTED = "unsupported"
    STOPPED = "stopped"  # a cell a run stopped while it was running: it has a log, no rows


ROW_STATUSES = tuple(s for s in Status if s is not Status.STOPPED)  # what a row's `status` column may hold
WORST_FIRST = (Status.FAILED, Status.OOM, Status.TIMEOUT, Status.UNSUPPORTED, Status.SKIPPED, Status.OK)


def worst_status(statuses: set[str]) -> Status:
    """A cell's status from its rows' statuses: the worst one."""
    return next(status for status in WORST_FIRST if status in statuses)


class UnknownMeasurement(ValueError):
    """A cell sent a measurement the contract does not name (a typo, or a field added on one side only)."""


@dataclass(slots=True)
class Measurements:
    """Every per-cell measurement a cell (or its launcher) may send; each maps to the result row's column of the
    same name (`bench.rows`). Slots: assigning a misspelled field raises AttributeError."""

    # timings (seconds)
    import_s: float | None = None
    prepare_s: float | None = None
    quantize_s: float | None = None
    load_s: float | None = None
    warmup_s: float | None = None
    warmup_step_median_s: float | None = None
    compile_s: float | None = None
    serialize_save_s: float | None = None
    serialize_reload_s: float | None = None
    lora_load_s: float | None = None  # load_lora_weights of the cell's adapter
    lora_fuse_s: float | None = None  # fuse_lora and unloading the LoRA layers (lora = fused)
    lora_swap_s: float | None = None  # load_lora_weights(hotswap=True) of the second adapter (lora = hotswap)
    cell_wall_s: float | None = None  # set by the launcher
    # compilation (compiled cells)
    inductor_settings: str | None = None  # JSON
    compiled_modules: int | None = None
    timed_compiles: int | None = None
    compile_counts: str | None = None  # JSON of bench.heartbeat.CompileCounts
    inductor_cache_at_start: str | None = None  # JSON of bench.cache.InductorCacheContents
    # serialization
    checkpoint_bytes: int | None = None
    serialization_status: str | None = None
    # memory (bytes)
    resident_reserved_bytes: int | None = None
    peak_reserved_bytes: int | None = None
    peak_allocated_bytes: int | None = None
    dequantized_reserved_bytes: int | None = None
    cpu_peak_rss_bytes: int | None = None
    transformer_footprint_bytes: int | None = None
    transformer_tensor_bytes: int | None = None
    # measurement truth: steady-state peak, energy and clocks, value-dependent speed, quantization effect
    warmup_peak_reserved_bytes: int | None = None
    energy_j_per_image: float | None = None
    energy_j_per_step: float | None = None
    avg_power_w: float | None = None
    gpu_sm_clock_mhz: float | None = None
    gpu_power_limit_w: float | None = None
    gpu_temperature_c: float | None = None
    gpu_throttle_reasons: str | None = None
    gpu_other_processes: int | None = None
    energy_note: str | None = None
    int8_outlier_column_fraction: float | None = None
    quantization_effective: bool | None = None
    quantization_note: str | None = None
    # method-specific facts (JSON from bench.methods.base.method_notes: which kernel path ran, deprecations)
    method_notes: str | None = None
    # where it ran
    cpu_threads: int | None = None
    gpu_name: str | None = None
    gpu_uuid: str | None = None
    cuda_version: str | None = None
    # set by the launcher and the driver
    log_tail: str | None = None
    host: str | None = None
    cuda_visible_devices: str | None = None
    attempts: int | None = None
    # attention backend and resolution changes
    attention_backend: str | None = None  # the backends the denoiser's attention modules ran (bench.attention)
    per_resolution: str | None = None  # JSON list of SizeRun, one per `[generation] resolutions` entry

    def update(self, values: dict[str, Any]) -> None:
        """Set several measurements by name (a method's `after_load`); an unknown name raises."""
        unknown = sorted(set(values) - set(MEASUREMENT_NAMES))
        if unknown:
            raise UnknownMeasurement(f"measurements the contract does not name: {', '.join(unknown)}")
        for name, value in values.items():
            setattr(self, name, value)

    def add(self, name: str, value: float) -> None:
        """Add to a summed measurement (the serialization costs of several components)."""
        self.update({name: (getattr(self, name) or 0) + value})

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Measurements:
        measurements = cls()
        measurements.update(data)
        return measurements


MEASUREMENT_NAMES = tuple(f.name for f in dataclasses.fields(Measurements))


@dataclass
class CellSpec:
    """Everything the subprocess needs, as plain data."""

    cell: dict[str, Any]
    cell_id: str
    model_folder: str
    components: dict[str, list[str]]
    generation: dict[str, Any]
    device: str
    gpu_memory_limit_gib: float | None = None
    compile_timeout_s: float | None = None
    warmup_step_limit_s: float | None = None  # a compiled cell whose warm-up steps are slower ends untimed
    warmup_step_limit_reason: str = ""
    trust_pickled_checkpoints: bool = False
    attempt: int = 1
    lora: dict[str, Any] | None = None  # bench.lora.CellAdapters as JSON; None without an adapter
    output_dir: str = ""  # set by the launcher: images/, latents/ and result.json are written here

    @property
    def images_dir(self) -> Path:
        return Path(self.output_dir) / "images"

    @property
    def latents_dir(self) -> Path:
        return Path(self.output_dir) / "latents"

    @property
    def result_path(self) -> Path:
        return Path(self.output_dir) / "result.json"

    @property
    def progress_path(self) -> Path:
        """What the cell has done so far (`CellResult` with `phase`), rewritten at each phase: a cell killed
        from outside leaves it."""
        return Path(self.output_dir) / "progress.json"

    def save(self, path: Path) -> None:
        write_text_atomic(path, json.dumps(asdict(self)))

    @classmethod
    def load(cls, path: Path) -> CellSpec:
        return cls(**json.loads(Path(path).read_text()))


@dataclass
class Sample:
    """Measurements of one (prompt, seed) pair."""

    prompt_index: int
    seed: int
    e2e_latency_s: list[float]
    step_latency_s: list[float]
    image_file: str | None
    image_finite: bool


@dataclass
class SizeRun:
    """The timed generations at one size of `[generation] resolutions` (the first prompt and seed)."""

    height: int
    width: int
    e2e_latency_s: list[float]  # each generation: the first includes any recompile the size caused
    step_latency_median_s: float | None
    timed_compiles: int | None  # graphs compiled during them (compiled cells)
    peak_reserved_bytes: int | None  # CUDA peaks over them; None without CUDA
    peak_allocated_bytes: int | None


@dataclass
class CellResult:
    """What a cell subprocess reports back (result.json), or has done so far (progress.json)."""

    status: Status = Status.OK
    error: str | None = None
    measurements: Measurements = field(default_factory=Measurements)
    samples: list[Sample] = field(default_factory=list)
    phase: str | None = None  # the last phase the cell reported, as its log says it

    def save(self, path: Path) -> None:
        write_text_atomic(path, json.dumps(asdict(self)))

    @classmethod
    def load(cls, path: Path) -> CellResult:
        data = json.loads(Path(path).read_text())
        return cls(
            status=Status(data["status"]),
            error=data["error"],
            measurements=Measurements.from_json(data["measurements"]),
            samples=[Sample(**s) for s in data["samples"]],
            phase=data.get("phase"),
        )
