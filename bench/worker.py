"""What runs inside a cell's fresh subprocess: load, quantize, place, compile, warm up, time.

Run as `python -m bench.worker SPEC.json` (bench.launch does), or as `python -m bench.worker --standby TEMPLATE.json`
to import what a cell like TEMPLATE needs and then read the spec's path from stdin (a process started ahead of
its cell, `bench.launch.Standby`). The result goes to the JSON file the spec names
(`bench.contract.CellResult`), written atomically; the driver turns it into Parquet rows. Only the driver writes
the results folder's tables.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.cache import InductorCacheContents
from bench.contract import CellResult, CellSpec, Sample, SizeRun, Status
from bench.errors import classify, describe
from bench.faults import StepSlowdown, inject, injected_fault, injected_slowdown
from bench.heartbeat import COMPILE_PROGRESS, CompileCounts, graph_break_reasons, heartbeat, warmup_step_speed
from bench.parent_death import die_with_parent
from bench.time_limit import time_limit

PROCESS_START = time.perf_counter()
STANDBY_FLAG = "--standby"
# A folder per executor slot: the driver locks a file there for each process it starts ahead, which holds the lock
# while it imports (the kernel drops it when the process ends, however it ends), and the slot's running cell waits
# for no file to be locked before its timed generations (they would share the CPU).
STANDBY_MARKS_ENV = "QUANTBENCH_STANDBY_MARKS"
IMPORTING_MARK_PREFIX = "importing-"
# A standby whose imports initialised CUDA (bitsandbytes and torchao query the GPU when imported) holds a context on
# the slot's GPU while it waits, doing no GPU work: it locks a file with this prefix there until its cell starts, so
# the slot's running cell does not count it among the other processes on its GPU.
IDLE_CONTEXT_MARK_PREFIX = "idle-cuda-context-"
NEXT_IMPORTS_WAIT_LIMIT_S = 120.0
Generate = Callable[..., tuple[Any, Any]]  # (prompt, seed, size) -> (images, latency)
PHASE_PREFIX = "[quantbench] "
ENERGY_WINDOWS_PREFIX = "energy windows (Unix seconds): "


def _say(text: str) -> None:
    """A line in the cell's log, for people reading it."""
    print(f"{PHASE_PREFIX}{text}", flush=True)


@dataclass(frozen=True)
class Progress:
    """Says where the cell is, in the log and in the progress file (`CellSpec.progress_path`, with what it has
    measured so far): a cell killed from outside (its time limit, a signal) still gives its row the phases it
    finished, and its error where it was."""

    spec: CellSpec
    result: CellResult

    def __call__(self, text: str) -> None:
        """A phase ended (or, from a heartbeat, is still running)."""
        _say(text)
        self.result.phase = text.split(COMPILE_PROGRESS)[0]
        self.result.save(self.spec.progress_path)


def import_libraries(spec: CellSpec) -> None:
    """Import what a cell of `spec`'s model and method needs: torch, diffusers' pipeline class and the model's
    component classes (their modules pull in transformers and the quantization libraries), the method's module."""
    import importlib

    import diffusers

    from bench.methods import method_class

    index = Path(spec.model_folder) / "model_index.json"
    if index.exists():
        getattr(diffusers, json.loads(index.read_text())["_class_name"], None)
    for library, class_name in spec.components.values():
        getattr(importlib.import_module(library), class_name, None)
    with contextlib.suppress(KeyError):  # an unknown method fails in the cell, where it becomes a row
        method_class(spec.cell["method"])


def run_cell(spec: CellSpec, result: CellResult, started: float = PROCESS_START) -> None:
    """The story of a cell, filling `result.measurements` and `result.samples` as it goes; `started` is when
    the process got the cell (its start, or a standby's hand-over)."""
    import numpy as np
    import torch

    from bench.attention import set_attention
    from bench.cells import Cell
    from bench.compilation import compile_denoiser, inductor_settings
    from bench.measure import tensor_bytes
    from bench.placement import denoiser
    from bench.trackers.energy import EnergyTracker
    from bench.trackers.latency import Clock
    from bench.trackers.memory import gpu_max_reserved_bytes, reset_gpu_peak

    m = result.measurements
    progress = Progress(spec, result)
    progress(f"imports: torch {time.perf_counter() - started:.1f} s (process {os.getpid()})")
    import_libraries(spec)
    m.import_s = time.perf_counter() - started
    m.cpu_threads = torch.get_num_threads()  # CPU-side quantizing on load (torchao) scales with it
    progress(f"imports: {m.import_s:.1f} s with diffusers, the model's classes and the method's libraries")
    fault = injected_fault(spec.cell_id, spec.attempt)
    cell = Cell.from_axes(spec.cell, spec.cell_id)
    # before quantizing, which changes them (torchao's configs); only compiled cells need it
    inductor_at_start = inductor_settings() if cell.compile != "off" else {}
    cuda = spec.device == "cuda"
    clock = Clock(cuda)
    torch.manual_seed(0)
    if cuda:
        reset_gpu_peak()  # the load's resident memory is a peak
        _describe_gpu(spec, result)

    inject(fault, "load")
    pipe, method = _load(spec, result, cell, clock, progress)
    if cuda:
        m.resident_reserved_bytes = gpu_max_reserved_bytes()
    if method.quantizes and cell.components:  # before after_load, which may dequantize on purpose
        _check_quantization(pipe, cell, Path(spec.model_folder), result)
        if result.status is not Status.OK:
            return
    m.update(method.after_load(pipe, cell))
    model = denoiser(pipe)
    m.transformer_footprint_bytes = int(model.get_memory_footprint())
    m.transformer_tensor_bytes = tensor_bytes(model)
    m.attention_backend = set_attention(model, cell.attention)
    if spec.lora:  # before compiling: the compiled graphs hold the LoRA layers (or the fused weights)
        _attach_lora(pipe, spec, clock, progress)
    compiled = compile_denoiser(
        pipe, cell.compile, bool(cell.fullgraph), cell.inductor, bool(cell.regional), inductor_at_start, cell.dynamic
    )
    if compiled is not None:
        m.inductor_settings = json.dumps(compiled.inductor_changes, sort_keys=True, default=str)
        m.compiled_modules = compiled.modules

    energy = EnergyTracker(cuda, m.gpu_uuid)
    generate = _generate(pipe, spec, result, clock, fault, energy)
    if generate is None or not result.samples:  # ended after its warm-up (too slow to time): nothing was timed
        return
    steps = [s for sample in result.samples for s in sample.step_latency_s]
    m.update(asdict(energy.result(float(np.median(steps)) if steps else None, idle_contexts())))
    if m.energy_j_per_image is not None:
        m.energy_j_per_image /= cell.batch_size  # each timed generation made `batch_size` images
    if energy.wall_windows:  # for an independent reading of the same windows (benchmarks/energy_crosscheck.py)
        _say(f"{ENERGY_WINDOWS_PREFIX}{json.dumps([[round(a, 3), round(b, 3)] for a, b in energy.wall_windows])}")
    if method.value_dependent_latency(cell):
        try:  # after the timed runs, untimed: a failure here costs only this column
            m.update(method.value_dependence(pipe, cell, lambda: _untimed_generation(pipe, spec)))
        except Exception as error:
            _say(f"counting the value-dependent path failed: {type(error).__name__}: {error}")
    if spec.generation.get("resolutions"):
        _time_resolutions(generate, spec, result, cuda)


def _attach_lora(pipe: Any, spec: CellSpec, clock: Any, progress: Progress) -> None:
    """Load the cell's LoRA adapter (bench.lora): unfused, fused, or prepared for hot-swapping."""
    from bench.lora import CellAdapters, attach_adapter

    lora = CellAdapters(**spec.lora)
    m = progress.result.measurements
    attach_adapter(pipe, lora, clock, m)
    fused = f", fuse {m.lora_fuse_s:.2f} s" if m.lora_fuse_s is not None else ""
    progress(f"LoRA {lora.mode} (rank {lora.adapter['rank']}): load {m.lora_load_s:.2f} s{fused}")


def _check_quantization(pipe: Any, cell: Any, model_folder: Path, result: CellResult) -> None:
    """A quantized cell whose quantized components are not smaller than in bf16 (a config ignored, a filter that
    matched nothing) ends here as failed: its figures would be bf16's under the method's name."""
    from bench.measure import bf16_bytes, quantization_effect, tensor_bytes

    m = result.measurements
    measured = {name: tensor_bytes(getattr(pipe, name)) for name in cell.components}
    m.quantization_effective, m.quantization_note = quantization_effect(
        measured, {name: bf16_bytes(model_folder / name) for name in cell.components}
    )
    if m.quantization_effective is False:
        result.status = Status.FAILED
        result.error = f"the quantization took no effect: {m.quantization_note}"
        _say(result.error)


def _describe_gpu(spec: CellSpec, result: CellResult) -> None:
    import torch

    m = result.measurements
    m.gpu_name = torch.cuda.get_device_name()
    m.gpu_uuid = str(torch.cuda.get_device_properties(0).uuid)
    m.cuda_version = torch.version.cuda
    if spec.gpu_memory_limit_gib:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, spec.gpu_memory_limit_gib * 1024**3 / total))


def _load(spec: CellSpec, result: CellResult, cell: Any, clock: Any, progress: Progress) -> tuple[Any, Any]:
    """Quantize the cell's components (or have the pipeline do it), then load and place the pipeline."""
    from diffusers import DiffusionPipeline

    from bench.methods import method_class
    from bench.methods.base import Component
    from bench.placement import load_kwargs, place
    from bench.trackers.latency import track_latency

    m = result.measurements
    method_cls = method_class(cell.method)
    method = method_cls(method_cls.Options.model_validate(cell.options))
    components = {
        name: Component(name, lib, cls, Path(spec.model_folder)) for name, (lib, cls) in spec.components.items()
    }
    if cell.components and getattr(method.options, "pipeline_config", False):
        from diffusers import PipelineQuantizationConfig

        mapping = {name: method.quantization_config(components[name], cell) for name in cell.components}
        quantized = {"quantization_config": PipelineQuantizationConfig(quant_mapping=mapping)}
        progress("quantize: inside the pipeline's from_pretrained (PipelineQuantizationConfig)")
    elif cell.components:
        with track_latency(clock) as preparing, heartbeat("prepare", _say, compiling=False):
            prepared = {name: method.prepare_component(components[name], cell) for name in cell.components}
        m.prepare_s = preparing.s
        progress(f"prepare: {m.prepare_s:.1f} s")
        with track_latency(clock) as quantizing, heartbeat("quantize", _say, compiling=False):
            quantized = {name: method.load_component(component, cell) for name, component in prepared.items()}
        m.quantize_s = quantizing.s
        progress(f"quantize: {m.quantize_s:.1f} s")
        if getattr(method.options, "serialize", False):
            _round_trip(method, quantized, prepared, cell, spec, result)
    else:
        quantized = {}

    with track_latency(clock) as loading, heartbeat("load and place", _say, compiling=False):
        pipe = DiffusionPipeline.from_pretrained(
            spec.model_folder, dtype=cell.torch_dtype, **load_kwargs(cell.placement), **quantized
        )
        pipe.set_progress_bar_config(disable=True)
        place(pipe, cell.placement, spec.device)
    m.load_s = loading.s
    progress(f"load and place: {m.load_s:.1f} s")
    return pipe, method


def _round_trip(
    method: Any, quantized: dict[str, Any], prepared: dict[str, Any], cell: Any, spec: CellSpec, result: CellResult
) -> None:
    """Replace each quantized component by its save_pretrained/from_pretrained round trip; sum the costs."""
    from bench.serialization import round_trip

    statuses = []
    for name in quantized:
        quantized[name], measured = round_trip(
            quantized[name], prepared[name], cell, method.safe_serialization, spec.trust_pickled_checkpoints
        )
        for key in ("serialize_save_s", "serialize_reload_s", "checkpoint_bytes"):
            if key in measured:
                result.measurements.add(key, measured[key])
        statuses.append(f"{name}: {measured['serialization_status']}")
    result.measurements.serialization_status = "; ".join(statuses)


def _pipe_call(gen: dict[str, Any], batch_size: int = 1) -> dict[str, Any]:
    """The pipeline's keyword arguments for one generation with the matrix's settings (`batch_size` images)."""
    batch = {"num_images_per_prompt": batch_size} if batch_size != 1 else {}
    return {
        **batch,
        "height": gen["height"],
        "width": gen["width"],
        "num_inference_steps": gen["num_inference_steps"],
        "guidance_scale": gen["guidance_scale"],
        "max_sequence_length": gen["max_sequence_length"],
        "output_type": "np",
    }


def _untimed_generation(pipe: Any, spec: CellSpec) -> None:
    """One generation of the first prompt and seed, eager even in a compiled cell (hooks would recompile it)."""
    import torch

    gen = spec.generation
    with torch.compiler.set_stance("force_eager"):
        pipe(gen["prompts"][0], generator=torch.Generator("cpu").manual_seed(gen["seeds"][0]), **_pipe_call(gen))


def _generate(
    pipe: Any, spec: CellSpec, result: CellResult, clock: Any, fault: str | None, energy: Any
) -> Generate | None:
    """Warm up (compilation happens here), then time every (prompt, seed) `repeats` times; return the function
    that generates (for `_time_resolutions`), or None when the warm-up was too slow to go on.

    Memory: the warm-up's peak is `warmup_peak_reserved_bytes`; the cache is emptied and the peaks reset after
    it, so `peak_reserved_bytes` is the timed generations' own peak (not what compiling and autotuning took).
    """
    import numpy as np
    import torch

    from bench.trackers.latency import Latency, track_latency
    from bench.trackers.memory import release_cached_memory, track_memory

    gen = spec.generation
    call = _pipe_call(gen, spec.cell.get("batch_size", 1))
    m = result.measurements
    cuda = spec.device == "cuda"
    progress = Progress(spec, result)
    running: list[Latency] = []  # the generation running now
    final_latents: list[Any] = []
    timing = False  # set once the warm-up is done

    def steps_done() -> str:  # read by the heartbeat's thread: where a slow generation is
        steps = len(running[0].step_ends) if running else 0
        return f"{steps} of {gen['num_inference_steps']} denoising steps done"

    slowdown = injected_slowdown(spec.cell_id)
    slow = StepSlowdown(slowdown) if slowdown else None

    def on_step_end(pipe: Any, step: int, timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        running[0].step_ended()
        if slow:
            slow.after_step(step)
        final_latents[:] = [kwargs["latents"]]
        if timing:
            inject(fault, "timed step")
        return kwargs

    def generate(prompt: str, seed: int, size: tuple[int, int] | None = None) -> tuple[Any, Latency]:
        """The images of one pipeline call (`batch_size` of them, the first drawn as a batch of one would be)
        at `size` (height, width; default the matrix's), and its latency."""
        generator = torch.Generator("cpu").manual_seed(seed)
        sized = {**call, "height": size[0], "width": size[1]} if size else call
        # the energy window holds the latency's block, so it reads NVML's counter after the final synchronisation
        measured = timing and size is None  # the timed runs at the matrix's size
        with energy.window() if measured else contextlib.nullcontext(), track_latency(clock) as latency:
            running[:] = [latency]
            # The pipeline's own torch.no_grad(), as users run it: inference_mode on top breaks quanto's int4
            # matmul on CUDA ("Cannot set version_counter for inference tensor"), which users never see.
            images = pipe(prompt, generator=generator, callback_on_step_end=on_step_end, **sized).images
        return images, latency

    compiled = spec.cell.get("compile", "off") != "off"
    if compiled:  # a recompile after the warm-up would be timed: the log says why it happened
        torch._logging.set_logs(recompiles=True)
        from torch._inductor.runtime.cache_dir_utils import cache_dir as inductor_cache_folder

        folder = inductor_cache_folder()
        cache = InductorCacheContents.of(Path(folder))
        m.inductor_cache_at_start = json.dumps(asdict(cache))
        progress(f"Inductor's cache at the start ({folder}): {cache.describe()}")
    progress("warm-up" + (f" (torch.compile mode={spec.cell['compile']} compiles here)" if compiled else ""))
    warmups: list[Latency] = []

    def compile_time_expired(elapsed_s: float) -> None:
        counts = CompileCounts.now()  # the row says what compiling had done by then
        result.status = Status.TIMEOUT
        result.error = (
            f"compilation (the warm-up of a compiled cell) ran past run.compile_timeout_s = {spec.compile_timeout_s:g}"
            f" s, having done {counts.describe()}; rerun to go on (Inductor's cache keeps the kernels already"
            " built) or raise the limit"
        )
        m.warmup_s = elapsed_s
        m.compile_counts = json.dumps(asdict(counts))
        _finish(spec, result)

    warm_up_beat = heartbeat("warm-up", progress, compiling=compiled, detail=steps_done)
    with time_limit(spec.compile_timeout_s, compile_time_expired), warm_up_beat, track_memory(cuda) as warm_memory:
        for _ in range(gen["warmup"]):
            warmups.append(generate(gen["prompts"][0], gen["seeds"][0])[1])
    m.warmup_peak_reserved_bytes = warm_memory.peak_reserved_bytes
    m.cpu_peak_rss_bytes = warm_memory.cpu_peak_rss_bytes
    m.warmup_s = sum(w.s for w in warmups)
    later_steps = warmups[-1].step_s() if warmups else []  # the last warm-up's steps after its first, which compiles
    m.warmup_step_median_s = float(np.median(later_steps)) if later_steps else None
    progress(f"warm-up: {m.warmup_s:.1f} s{warmup_step_speed(m.warmup_step_median_s)}")
    if compiled:
        counts = CompileCounts.now()
        m.compile_counts = json.dumps(asdict(counts))
        progress(f"torch.compile: {counts.describe()}")
        for reason, count in graph_break_reasons():
            _say(f"graph break ({count} ×): {reason}")
    limit = spec.warmup_step_limit_s
    if limit is not None and m.warmup_step_median_s is not None and m.warmup_step_median_s > limit:
        result.status = Status.TIMEOUT
        result.error = (
            f"warm-up steps took {m.warmup_step_median_s:.3f} s (median after the first), over the limit of"
            f" {limit:.3f} s ({spec.warmup_step_limit_reason}): not timed; the row keeps the warm-up's step time"
        )
        progress(result.error)
        return None
    waited = wait_for_next_cell_imports()
    if waited >= 0.1:
        progress(f"waited {waited:.1f} s for the next cell's process to finish importing before timing")
    if spec.lora and spec.lora["mode"] == "hotswap":  # the timed runs use the second adapter
        from bench.lora import CellAdapters, swap_adapter

        swap_adapter(pipe, CellAdapters(**spec.lora), clock, m)
        progress(f"LoRA hot-swap: {m.lora_swap_s:.2f} s")
    inject(fault, "generate")
    graphs_before_timing = CompileCounts.now().graphs
    timing = True
    if cuda:
        release_cached_memory()

    spec.images_dir.mkdir(parents=True, exist_ok=True)
    spec.latents_dir.mkdir(parents=True, exist_ok=True)
    with track_memory(cuda) as memory, energy.sampling():
        for prompt_index, prompt in enumerate(gen["prompts"]):
            for seed in gen["seeds"]:
                e2e: list[float] = []
                steps: list[float] = []

                def run_and_steps(e2e: list[float] = e2e) -> str:
                    return f"run {len(e2e) + 1} of {gen['repeats']}, {steps_done()}"

                beat = heartbeat(
                    f"timed prompt {prompt_index}, seed {seed}", progress, compiling=compiled, detail=run_and_steps
                )
                with beat:
                    for _ in range(gen["repeats"]):
                        images, latency = generate(prompt, seed)
                        e2e.append(latency.s)
                        steps.extend(latency.step_s())
                if fault == "nan":
                    images = np.full_like(images, np.nan)
                finite = bool(np.isfinite(images).all())  # every image of the batch
                stem = f"p{prompt_index}_s{seed}"
                # the first image of a batch and its latents: what the reference (a batch of one) is compared with
                path = _save_png(images[0], spec.images_dir / f"{stem}.png") if finite else None
                _save_latents(final_latents[0][:1], spec.latents_dir / f"{stem}.safetensors")
                result.samples.append(Sample(prompt_index, seed, e2e, steps, path, finite))
                progress(f"timed prompt {prompt_index}, seed {seed}: e2e median {np.median(e2e):.3f} s")
    m.peak_reserved_bytes = memory.peak_reserved_bytes
    m.peak_allocated_bytes = memory.peak_allocated_bytes
    m.cpu_peak_rss_bytes = memory.cpu_peak_rss_bytes
    if compiled:
        recompiled = m.timed_compiles = CompileCounts.now().graphs - graphs_before_timing
        if recompiled:
            progress(f"the timed runs compiled {recompiled} more graphs: their latency includes compiling")
    if compiled and warmups:  # compilation happens in the first call, which warmed up on the first prompt and seed
        m.compile_s = max(0.0, warmups[0].s - float(np.median(result.samples[0].e2e_latency_s)))
    return generate


def _time_resolutions(generate: Generate, spec: CellSpec, result: CellResult, cuda: bool) -> None:
    """Time `repeats` generations of the first prompt and seed at each of `[generation] resolutions`, in order,
    after the warm-up and the timed runs at the first: the latency, the graphs compiled (a compiled cell
    recompiles at a new size unless `dynamic`) and the peak memory of each size, in `per_resolution`."""
    import numpy as np

    from bench.trackers.memory import release_cached_memory, track_memory

    gen = spec.generation
    compiled = spec.cell.get("compile", "off") != "off"
    progress = Progress(spec, result)
    runs: list[SizeRun] = []
    for height, width in gen["resolutions"]:
        graphs_before = CompileCounts.now().graphs if compiled else 0
        if cuda:  # each size's own peak, not the cache a larger size left
            release_cached_memory()
        with track_memory(cuda) as memory, heartbeat(f"size {height}x{width}", progress, compiling=compiled):
            latencies = [
                generate(gen["prompts"][0], gen["seeds"][0], (height, width))[1] for _ in range(gen["repeats"])
            ]
        steps = [step for latency in latencies for step in latency.step_s()]
        run = SizeRun(
            height=height,
            width=width,
            e2e_latency_s=[latency.s for latency in latencies],
            step_latency_median_s=float(np.median(steps)) if steps else None,
            timed_compiles=CompileCounts.now().graphs - graphs_before if compiled else None,
            peak_reserved_bytes=memory.peak_reserved_bytes,
            peak_allocated_bytes=memory.peak_allocated_bytes,
        )
        runs.append(run)
        result.measurements.per_resolution = json.dumps([asdict(r) for r in runs])
        compiles = f", {run.timed_compiles} graphs compiled" if compiled else ""
        progress(f"size {height}x{width}: e2e median {np.median(run.e2e_latency_s):.3f} s{compiles}")


def _save_png(image: Any, path: Path) -> str:
    import numpy as np
    from PIL import Image

    from bench.atomic import atomic_path

    pixels = (np.clip(image, 0, 1) * 255).round().astype("uint8")
    with atomic_path(path) as temporary:
        Image.fromarray(pixels).save(temporary, format="PNG")
    return path.name


def _save_latents(latents: Any, path: Path) -> None:
    from safetensors.torch import save_file

    from bench.atomic import atomic_path

    with atomic_path(path) as temporary:
        save_file({"latents": latents.detach().float().cpu().contiguous()}, str(temporary))


def main(argv: list[str]) -> None:
    die_with_parent()
    started = PROCESS_START
    if argv[0] == STANDBY_FLAG:
        argv, started = _wait_for_cell(CellSpec.load(Path(argv[1])), int(argv[2]) if len(argv) > 2 else None)
    spec = CellSpec.load(Path(argv[0]))
    result = CellResult()
    try:
        run_cell(spec, result, started)
    except BaseException as error:  # every failure becomes a row; the driver sees it in the result file
        result.status = classify(error)
        result.error = describe(error)
        traceback.print_exc()
    _finish(spec, result)


def _wait_for_cell(template: CellSpec, importing_lock: int | None) -> tuple[list[str], float]:
    """As a standby: import what a cell like `template` needs, then wait for the cell's spec path (and when it was
    handed over) on stdin; the arguments of that cell and when it came, on this process's clock. Ends the process
    when stdin closes without one."""
    try:
        import_libraries(template)
    except Exception:  # the cell that comes imports again, and its row says what failed
        traceback.print_exc()
    finally:
        idle_context = _mark_idle_context()  # before the imports' lock goes: the running cell times after that
        if importing_lock is not None:
            os.close(importing_lock)  # the last descriptor of the locked file: the slot's running cell may time now
    imported = time.perf_counter()
    spec_path, _, handed_over = sys.stdin.readline().strip().partition("\t")
    if not spec_path:
        os._exit(0)
    if idle_context is not None:  # this process is the slot's running cell now
        idle_context.unlink(missing_ok=True)
    started = time.perf_counter() - max(0.0, time.time() - float(handed_over or time.time()))
    waited = started - imported
    when = f"then {waited:.1f} s waiting" if waited >= 0 else f"the cell came {-waited:.1f} s before their end"
    _say(f"started ahead: imports {imported - PROCESS_START:.1f} s, {when}")
    return [spec_path], started


def idle_context_mark(folder: str | Path, pid: int) -> Path:
    """The file process `pid` locks in the marks `folder` while it waits holding a CUDA context."""
    return Path(folder) / f"{IDLE_CONTEXT_MARK_PREFIX}{pid}"


def _mark_idle_context() -> Path | None:
    """As a standby that holds a CUDA context: its file, locked for as long as this process lives (the descriptor
    stays open; the kernel drops the lock when the process ends), see IDLE_CONTEXT_MARK_PREFIX; None without one."""
    folder = os.environ.get(STANDBY_MARKS_ENV)
    if not folder or not _holds_cuda_context():
        return None
    mark = idle_context_mark(folder, os.getpid())
    try:
        fcntl.flock(os.open(mark, os.O_CREAT | os.O_WRONLY, 0o644), fcntl.LOCK_EX)
    except OSError:  # the running cell then counts this process as another one on its GPU
        traceback.print_exc()
        return None
    return mark


def _holds_cuda_context() -> bool:
    """Whether this process has a CUDA context on a GPU (what NVML lists), without creating one."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_initialized():
        return False
    has_context = getattr(torch._C, "_cuda_hasPrimaryContext", None)  # torch's own check, before it makes one
    return has_context is None or any(has_context(index) for index in range(torch.cuda.device_count()))


def idle_contexts() -> int:
    """How many processes of this slot, started ahead and waiting for their cell, hold a CUDA context."""
    folder = os.environ.get(STANDBY_MARKS_ENV)
    return sum(_locked(mark) for mark in Path(folder).glob(f"{IDLE_CONTEXT_MARK_PREFIX}*")) if folder else 0


def _locked(mark: Path) -> bool:
    """Whether a process started ahead still holds `mark`'s lock (still imports, or waits holding a context)."""
    try:
        with open(mark, "rb") as handle:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:  # gone meanwhile
        return False
    return False


def wait_for_next_cell_imports(limit_s: float = NEXT_IMPORTS_WAIT_LIMIT_S) -> float:
    """Wait while another process of this slot, started ahead of its cell, is still importing (its imports would
    share the CPU with this cell's timed generations); the seconds waited, at most `limit_s`."""
    folder = os.environ.get(STANDBY_MARKS_ENV)
    start = time.perf_counter()
    while folder and time.perf_counter() - start < limit_s:
        if not any(_locked(mark) for mark in Path(folder).glob(f"{IMPORTING_MARK_PREFIX}*")):
            break
        time.sleep(0.05)
    return time.perf_counter() - start


def _finish(spec: CellSpec, result: CellResult) -> None:
    """Write the result for the driver and end this process."""
    result.save(spec.result_path)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skip interpreter teardown (~1 s per cell), and stop any thread still working: all is written


if __name__ == "__main__":
    main(sys.argv[1:])
