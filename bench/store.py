"""The results folder: one Parquet part file per cell, written atomically, read back as one table.

Layout of `results/<matrix>/`:
    cells/<cell_id>.parquet   one row per (cell, prompt, seed)
    images/<cell_id>/p<prompt>_s<seed>.png
    latents/<cell_id>/p<prompt>_s<seed>.safetensors   final latents, for latent drift
    logs/<cell_id>.log        the cell subprocess's stdout/stderr
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import shutil
import typing
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from bench.atomic import atomic_path, write_bytes_atomic
from bench.contract import ROW_STATUSES, Measurements, Status, worst_status
from bench.errors import UserError

SCHEMA_VERSION = 2  # 2: step_times_s and e2e_times_s; steady-state peaks, energy and clocks, value-dependent speed, quantization effect; attention backend, batch size, per_resolution; LoRA
STATUSES = ROW_STATUSES  # (WORST_FIRST and worst_status: bench.contract)
INTERRUPTED_LOG_SUFFIX = ".interrupted.log"  # logs/<cell id>.interrupted.log: a cell stopped while running
INTERRUPTED_PROGRESS_SUFFIX = ".interrupted.json"  # what its last stopped try had measured (contract.Measurements)
RUNS_FILE = "runs.jsonl"  # one line per `quantbench run` invocation on the folder (runner.RunRecord)
RERUN = "its cell will run again"  # what becomes of an unreadable part: in a run of the folder...
LEFT_OUT = "its cell's rows are left out"  # ...and where the folder is only read (report, compare)


log = logging.getLogger(__name__)


@dataclasses.dataclass
class ResultRow:
    """One row of the results table. Bytes and seconds are stored raw; display converts."""

    schema_version: int
    matrix_name: str
    matrix_path: str
    cell_id: str
    cell_label: str
    timestamp_utc: str
    status: str
    error: str | None
    # axes
    method: str
    method_family: str
    method_options: str
    dtype: str
    threshold: float | None
    compile: str
    fullgraph: bool | None
    inductor: str | None  # the Inductor preset of a compiled cell; None: the `default` preset, or not compiled
    regional: bool | None  # True: only the repeated blocks were compiled; None: the whole denoiser, or not compiled
    components: str | None
    placement: str
    # model and generation
    model_source: str
    model_revision: str | None
    pipeline_class: str
    weights: str
    prompt_index: int | None
    prompt: str | None
    seed: int | None
    height: int
    width: int
    num_inference_steps: int
    guidance_scale: float
    max_sequence_length: int
    repeats: int
    # attention backend, batch size and resolution changes
    attention: str | None = None  # the `attention` axis: the backend asked for
    attention_backend: str | None = None  # the backends the denoiser's attention modules ran, comma-separated
    dynamic: bool | None = None  # torch.compile(dynamic=...) of a compiled cell; None: torch's default, or not compiled
    batch_size: int | None = None  # images per pipeline call (num_images_per_prompt); latency columns are per call
    e2e_latency_per_image_s: float | None = None  # e2e median / batch_size
    images_per_s: float | None = None  # batch_size / e2e median
    lora: str | None = None  # the `lora` axis: none, unfused, fused, hotswap
    lora_rank: int | None = None  # the adapter's rank (None without one)
    lora_adapter: str | None = None  # the adapter the timed runs used: a file's name, or `synthetic` with its seed
    lora_load_s: float | None = None  # load_lora_weights of the adapter
    lora_fuse_s: float | None = None  # fuse_lora, then unloading the LoRA layers (lora = fused)
    lora_swap_s: float | None = None  # load_lora_weights(hotswap=True) of the second adapter (lora = hotswap)
    per_resolution: str | None = None  # JSON list of contract.SizeRun: each `[generation] resolutions` size's
    # latencies, graphs compiled and peak memory
    log_tail: str | None = None
    # timings (seconds)
    import_s: float | None = None
    prepare_s: float | None = None
    quantize_s: float | None = None
    load_s: float | None = None
    warmup_s: float | None = None
    warmup_step_median_s: float | None = None  # the last warm-up's denoising steps after its first (which compiles):
    # the model's step time, known even for a cell whose timed runs never end
    inductor_settings: str | None = None  # compiled cells: JSON of the Inductor settings that differ from the
    # process start when compiling: what the libraries (torchao's quantize configs) and the preset changed (its
    # Dynamo settings as `dynamo.<name>`)
    compiled_modules: int | None = None  # compiled cells: modules handed to torch.compile (1, or each repeated block)
    compile_s: float | None = None  # compiled cells: the first warm-up generation minus the median timed one
    timed_compiles: int | None = None  # compiled cells: graphs compiled during the timed runs (0 unless a guard
    # failed and Dynamo recompiled, which the latency then includes; the cell's log says why)
    compile_counts: str | None = None  # compiled cells: JSON of what compiling did by the end of the warm-up
    # (heartbeat.CompileCounts: graphs, from the FX graph cache, Triton kernels, coordinate-descent benchmarks, autotuned
    # ops, int8 weight-only linears rewritten into aten._weight_int8pack_mm)
    inductor_cache_at_start: str | None = None  # compiled cells: JSON of what Inductor's cache held before the warm-up
    # (cache.InductorCacheContents: FX graphs, Triton kernels, tuned kernels, autotuned op shapes; all 0 = a cold compile)
    e2e_latency_median_s: float | None = None
    e2e_latency_iqr_s: float | None = None
    step_latency_median_s: float | None = None
    step_latency_iqr_s: float | None = None
    extrapolated_to_steps: int | None = None  # set only when the next column is extrapolated
    e2e_latency_extrapolated_s: float | None = None  # e2e median + (extrapolated_to_steps - steps) x step median
    # every timed sample, for compare's verdict (rows before schema 2 lack them; compare then uses median and IQR)
    step_times_s: list[float] | None = None  # each timed denoising step after the first of each generation
    e2e_times_s: list[float] | None = None  # each timed generation, end to end
    cell_wall_s: float | None = None
    serialize_save_s: float | None = None
    serialize_reload_s: float | None = None
    checkpoint_bytes: int | None = None
    serialization_status: str | None = None
    method_notes: str | None = None  # JSON of method-specific facts (which kernel path ran, deprecations)
    # memory (bytes)
    resident_reserved_bytes: int | None = None
    peak_reserved_bytes: int | None = None
    peak_allocated_bytes: int | None = None
    dequantized_reserved_bytes: int | None = None
    gpu_memory_note: str | None = None
    cpu_peak_rss_bytes: int | None = None
    transformer_footprint_bytes: int | None = None
    transformer_tensor_bytes: int | None = None
    # measurement truth (bench/trackers/energy.py, bench/worker.py)
    warmup_peak_reserved_bytes: int | None = None  # the warm-up's peak (compiling and autotuning included);
    # peak_reserved_bytes is the timed generations' own (the cache is emptied and the peaks reset between)
    energy_j_per_image: float | None = None  # NVML's energy counter: median over the timed generations, / batch_size
    energy_j_per_step: float | None = None  # avg_power_w x the median step time
    avg_power_w: float | None = None  # energy / time over the timed generations
    gpu_sm_clock_mhz: float | None = None  # median SM clock sampled during the timed generations
    gpu_power_limit_w: float | None = None
    gpu_temperature_c: float | None = None  # max during the timed generations
    gpu_throttle_reasons: str | None = None  # clock-event reasons other than idle seen then, or "none"
    gpu_other_processes: int | None = None  # most other processes holding the GPU's CUDA contexts then
    energy_note: str | None = None  # why an energy column is null, or how it was computed
    value_dependent_latency: bool | None = None  # the method's speed depends on the activations' values
    int8_outlier_column_fraction: float | None = None  # bnb int8 (threshold > 0): the activation columns that
    # took the outlier path, over all int8 linears' calls in one untimed generation
    quantization_effective: bool | None = None  # False: the quantized components are not smaller than in bf16
    quantization_note: str | None = None  # their measured and bf16 sizes
    # output and drift against the reference (see bench/drift.py)
    image_path: str | None = None
    image_finite: bool | None = None
    reference_dtype: str | None = None
    reference_key: str | None = None
    psnr_db: float | None = None
    ssim: float | None = None
    ms_ssim: float | None = None
    lpips_alex: float | None = None
    lpips_vgg: float | None = None
    clip_score: float | None = None
    baseline_clip_score: float | None = None
    clip_image_similarity: float | None = None
    latent_rel_l2: float | None = None
    latent_cosine: float | None = None
    metric_notes: str | None = None
    metric_models: str | None = None
    gate_status: str | None = None
    gate_failures: str | None = None
    # environment
    device: str | None = None
    executor: str | None = None
    attempts: int | None = None
    host: str | None = None
    cuda_visible_devices: str | None = None
    cpu_threads: int | None = None  # torch's intra-op threads in the cell (executors share the cores out)
    gpu_name: str | None = None
    gpu_uuid: str | None = None
    gpu_driver: str | None = None
    cuda_version: str | None = None
    cpu: str | None = None
    python_version: str | None = None
    torch_version: str | None = None
    diffusers_version: str | None = None
    transformers_version: str | None = None
    accelerate_version: str | None = None
    bitsandbytes_version: str | None = None
    torchao_version: str | None = None
    gguf_version: str | None = None
    peft_version: str | None = None
    optimum_quanto_version: str | None = None
    sdnq_version: str | None = None
    nvidia_modelopt_version: str | None = None
    auto_round_version: str | None = None
    kernels_version: str | None = None
    triton_version: str | None = None
    harness_commit: str | None = None
    lock_sha256: str | None = None  # the lock file the environment was installed from (environment.lock_sha256)


_ARROW_TYPES = {str: pa.string(), int: pa.int64(), float: pa.float64(), bool: pa.bool_()}


def _arrow_type(annotation: Any) -> pa.DataType:
    args = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    if typing.get_origin(args[0]) is list:
        return pa.list_(_arrow_type(typing.get_args(args[0])[0]))
    return _ARROW_TYPES[args[0]]


SCHEMA = pa.schema(
    [
        pa.field(f.name, _arrow_type(t))
        for f, t in zip(dataclasses.fields(ResultRow), typing.get_type_hints(ResultRow).values())
    ],
    metadata={"quantbench_schema_version": str(SCHEMA_VERSION)},
)
COLUMNS = SCHEMA.names


class ResultsFolder:
    """A results folder: atomic per-cell writes, validated reads."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.cells_dir = self.root / "cells"
        self.images_dir = self.root / "images"
        self.logs_dir = self.root / "logs"
        self.latents_dir = self.root / "latents"

    def create(self) -> None:
        try:
            for folder in (self.cells_dir, self.images_dir, self.latents_dir, self.logs_dir):
                folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise UserError(f"{self.root}: cannot create the results folder: {error.strerror or error}") from None

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold the folder's run lock; a second `quantbench run` on the same folder stops with a clear error."""
        self.create()
        with open(self.root / ".lock", "a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "unknown"
                raise UserError(
                    f"{self.root}: another quantbench run (pid {holder}) is writing this results folder; "
                    "wait for it or pass another --results folder"
                ) from None
            handle.seek(0)
            handle.truncate()
            handle.write(str(os.getpid()))
            handle.flush()
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def part_path(self, cell_id: str) -> Path:
        return self.cells_dir / f"{cell_id}.parquet"

    def write_cell(self, cell_id: str, rows: list[ResultRow]) -> Path:
        """Write a cell's rows atomically over any earlier part."""
        table = pa.Table.from_pylist([dataclasses.asdict(r) for r in rows], schema=SCHEMA)
        target = self.part_path(cell_id)
        try:
            with atomic_path(target) as temporary:
                pq.write_table(table, temporary)
        except OSError as error:  # full or read-only disk: stop with a clear message; earlier parts stay as they were
            raise UserError(
                f"{self.root}: cannot write the results of cell {cell_id}: {error.strerror or error}"
            ) from None
        return target

    def write_cell_files(self, cell_id: str, files: dict[str, bytes], log: str) -> None:
        """Store a cell's files ("images/p0_s0.png" goes to images/<cell_id>/p0_s0.png) and its log,
        replacing what an earlier run of the cell left."""
        try:
            for folder in (self.images_dir, self.latents_dir):
                shutil.rmtree(folder / cell_id, ignore_errors=True)
            for name, data in files.items():
                kind, _, rest = name.partition("/")
                target = self.root / kind / cell_id / rest
                target.parent.mkdir(parents=True, exist_ok=True)
                write_bytes_atomic(target, data)
            write_bytes_atomic(self.logs_dir / f"{cell_id}.log", log.encode())
            self.interrupted_log_path(cell_id).unlink(missing_ok=True)
            self.interrupted_progress_path(cell_id).unlink(missing_ok=True)
        except OSError as error:
            raise UserError(
                f"{self.root}: cannot write the files of cell {cell_id}: {error.strerror or error}"
            ) from None

    def interrupted_log_path(self, cell_id: str) -> Path:
        return self.logs_dir / f"{cell_id}{INTERRUPTED_LOG_SUFFIX}"

    def interrupted_progress_path(self, cell_id: str) -> Path:
        return self.logs_dir / f"{cell_id}{INTERRUPTED_PROGRESS_SUFFIX}"

    def interrupted_progress(self, cell_id: str) -> Measurements | None:
        """What the last stopped try of a cell had measured; None where none was kept (or an older folder)."""
        path = self.interrupted_progress_path(cell_id)
        return Measurements.from_json(json.loads(path.read_text())) if path.is_file() else None

    def write_interrupted_log(self, cell_id: str, log: str, ran_s: float, progress: Measurements | None = None) -> None:
        """Keep the log of a cell the run was interrupted in (no row: a rerun runs it again), so the time it
        spent is not a mystery: each stopped try is added after the earlier ones under a header with its length
        (a compile cut twice shows whether the second try got further), and what the try had measured
        (`progress`) next to it; the next finished run removes both."""
        if progress is not None:
            write_bytes_atomic(
                self.interrupted_progress_path(cell_id), json.dumps(dataclasses.asdict(progress)).encode()
            )
        path = self.interrupted_log_path(cell_id)
        earlier = path.read_bytes() if path.exists() else b""
        stopped = datetime.now(UTC).isoformat(timespec="seconds")
        header = f"===== stopped after {ran_s:.0f} s, at {stopped} =====\n"
        write_bytes_atomic(path, earlier + header.encode() + log.encode())

    def append_run(self, record: dict[str, Any]) -> None:
        """Add one invocation's record (see runner.RunRecord) to `runs.jsonl`."""
        line = json.dumps(record, sort_keys=True) + "\n"
        with open(self.root / RUNS_FILE, "a+b") as handle:
            if handle.tell():  # append mode opens at the end: the file has lines already
                handle.seek(-1, os.SEEK_END)
                if handle.read(1) != b"\n":
                    line = "\n" + line  # after a line a crash cut short (readers skip it), not glued onto it
            handle.write(line.encode())

    def read_parts(self, unreadable: str = RERUN) -> dict[str, pa.Table]:
        """Every readable part file by cell id; unreadable (truncated, foreign) parts are skipped with a warning
        that ends in `unreadable`, what becomes of their cells (`RERUN` or `LEFT_OUT`)."""
        parts = {}
        for path in sorted(self.cells_dir.glob("*.parquet")):
            try:
                table = pq.read_table(path, schema=SCHEMA)
            except (pa.ArrowException, OSError) as error:
                _warn_once(path, f"ignoring unreadable result part {path} ({error}); {unreadable}")
                continue
            parts[path.stem] = table
        return parts

    def cell_statuses(self) -> dict[str, str]:
        """Each cell this folder knows of: the worst status of its rows, or `stopped` for a cell a run stopped
        while it ran (an interrupted log) and that has no row."""
        statuses = {
            cell_id: worst_status(set(table.column("status").to_pylist()))
            for cell_id, table in self.read_parts().items()
            if table.num_rows
        }
        for cell_id in self.interrupted_cell_ids():
            statuses.setdefault(cell_id, Status.STOPPED)
        return statuses

    def interrupted_cell_ids(self) -> list[str]:
        """Cells with an interrupted log (stopped while running, and not finished since), sorted."""
        logs = self.logs_dir.glob(f"*{INTERRUPTED_LOG_SUFFIX}")
        return sorted(path.name.removesuffix(INTERRUPTED_LOG_SUFFIX) for path in logs)

    def cells_by_matrix(self) -> dict[str, set[str]]:
        """The cell ids of the folder's rows, by the name of the matrix that wrote them."""
        table = self.read_table()
        cells: dict[str, set[str]] = {}
        for matrix, cell_id in zip(table.column("matrix_name").to_pylist(), table.column("cell_id").to_pylist()):
            cells.setdefault(matrix, set()).add(cell_id)
        return cells

    def completed_cell_ids(self) -> set[str]:
        """Cells whose every row has status ok: a resumed run skips these."""
        return {cell_id for cell_id, status in self.cell_statuses().items() if status == Status.OK}

    def read_table(self, unreadable: str = RERUN) -> pa.Table:
        """All rows of the folder as one table (empty, with the schema, when there are none)."""
        parts = list(self.read_parts(unreadable).values())
        return pa.concat_tables(parts) if parts else SCHEMA.empty_table()


def read_runs(path: str | Path) -> list[dict[str, Any]]:
    """The invocation records of a results folder (`runs.jsonl`), oldest first; [] without any. A line cut
    short by a crash is skipped."""
    runs_file = Path(path) / RUNS_FILE
    if not runs_file.is_file():
        return []
    runs = []
    for line in runs_file.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            runs.append(json.loads(line))
    return runs


_WARNED: set[tuple[Path, int]] = set()


def _warn_once(path: Path, message: str) -> None:
    """Log `message` about `path` once per process for this version of the file (a command reads parts often)."""
    with contextlib.suppress(OSError):
        key = (path, path.stat().st_mtime_ns)
        if key in _WARNED:
            return
        _WARNED.add(key)
    log.warning("%s", message)


def read_results(path: str | Path, unreadable: str = LEFT_OUT) -> Any:
    """A results folder or a Parquet file of result rows as a pandas DataFrame; any other file is a UserError.
    `unreadable`: what the warning on a folder's unreadable part says becomes of its cell."""
    path = Path(path)
    if not path.is_file():
        return ResultsFolder(path).read_table(unreadable).to_pandas()
    try:
        missing = {"cell_id", "status"} - set(pq.read_schema(path).names)
        table = pq.read_table(path, schema=SCHEMA)
    except (pa.ArrowException, OSError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else "pyarrow reads no table from it"
        raise UserError(_not_results(path, reason)) from None
    if missing:
        raise UserError(_not_results(path, f"a Parquet file without the result columns {', '.join(sorted(missing))}"))
    return table.to_pandas()


def _not_results(path: Path, reason: str) -> str:
    return (
        f"{path}: not a results folder or Parquet file of results ({reason}); pass a results folder"
        " (results/<matrix name>/) or a Parquet file from one (its cells/*.parquet)"
    )
