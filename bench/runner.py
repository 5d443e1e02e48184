"""The driver: resolve the model, check every cell, run each in a fresh subprocess, write its rows.

Only this process writes the results folder's tables, one part file per cell, so a crash (of a cell
or of the driver) never loses or corrupts rows already written; a rerun skips finished cells.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.baseline import Reference, ReferenceCache, reference_key
from bench.cache import cache_dir
from bench.capability import Verdict, check_cell
from bench.cell import CellResult, CellSpec
from bench.cells import Cell
from bench.drift import METRICS, Drift, DriftScorer, load_image
from bench.environment import Machine, collect_environment, detect_machine
from bench.errors import UserError
from bench.matrix import Matrix
from bench.models import ResolvedModel, resolve_model
from bench.rows import cell_rows
from bench.store import ResultsFolder, worst_status

LOG_TAIL_CHARS = 4000
PACKAGE_ROOT = Path(__file__).resolve().parent.parent


@dataclass
class RunSummary:
    """What a run did: counts by status, and cells left alone because they were already done."""

    results_dir: Path
    statuses: Counter = field(default_factory=Counter)
    already_done: int = 0
    reference_runs: int = 0


@dataclass(frozen=True)
class Plan:
    """A matrix made ready to run here: its model folder, device, and each cell's verdict."""

    matrix: Matrix
    model: ResolvedModel
    machine: Machine
    device: str
    verdicts: dict[str, Verdict]


def plan(matrix: Matrix) -> Plan:
    """Resolve the model and check every cell against this machine; UserError before any work starts."""
    model = resolve_model(matrix)
    machine = detect_machine()
    wanted = matrix.spec.run.device
    if wanted == "cuda" and not machine.cuda_available:
        raise UserError(f"{matrix.path}: run.device: 'cuda' asked for, but torch sees no CUDA device here")
    device = "cuda" if wanted == "cuda" or (wanted == "auto" and machine.cuda_available) else "cpu"
    verdicts = {cell.id: check_cell(cell, machine) for cell in matrix.cells}
    return Plan(matrix, model, machine, device, verdicts)


def run_matrix(
    matrix: Matrix,
    results_dir: Path,
    force: bool = False,
    on_cell_done: Callable[[Cell, str, int, int], None] | None = None,
) -> RunSummary:
    """Run every cell not already completed in `results_dir` (all of them with `force`)."""
    folder = ResultsFolder(results_dir)
    summary = RunSummary(results_dir)
    with folder.exclusive():
        ready = plan(matrix)
        done = set() if force else folder.completed_cell_ids()
        todo = [cell for cell in matrix.cells if cell.id not in done]
        summary.already_done = len(matrix.cells) - len(todo)
        comparison = _Comparison(ready, folder, summary) if matrix.drift.enabled and todo else None
        context = {**_row_context(ready), **(comparison.row_fields() if comparison else {})}
        for index, cell in enumerate(todo):
            verdict = ready.verdicts[cell.id]
            if verdict.status == "run":
                result = _run_in_subprocess(
                    ready,
                    cell,
                    folder.images_dir / cell.id,
                    folder.latents_dir / cell.id,
                    folder.logs_dir / f"{cell.id}.log",
                )
            else:
                result = CellResult(status=verdict.status, error=verdict.reason)
            drift = comparison.score(cell, result) if comparison else None
            rows = cell_rows(matrix, ready.model, cell, result, context, drift)
            folder.write_cell(cell.id, rows)
            status = worst_status({row.status for row in rows})
            summary.statuses[status] += 1
            if on_cell_done:
                on_cell_done(cell, status, index + 1, len(todo))
    return summary


class _Comparison:
    """The reference images of a run (made once, then cached) and the scorer that compares cells with them."""

    def __init__(self, ready: Plan, folder: ResultsFolder, summary: RunSummary) -> None:
        matrix = ready.matrix
        self.ready = ready
        self.folder = folder
        self.dtype = matrix.drift.reference_dtype
        self.scorer = DriftScorer(matrix.clip_model(), matrix.drift.lpips)
        self.references, self.problem = self._references(summary)

    def _keys(self) -> dict[tuple[int, int], str]:
        matrix = self.ready.matrix
        device = self.ready.machine.gpu_name if self.ready.device == "cuda" else "cpu"
        generation = matrix.generation.model_dump()
        return {
            (index, seed): reference_key(matrix.model.key(), generation, prompt, seed, self.dtype, device)
            for index, prompt in enumerate(matrix.generation.prompts)
            for seed in matrix.generation.seeds
        }

    def _references(self, summary: RunSummary) -> tuple[dict[tuple[int, int], Reference], str | None]:
        cache = ReferenceCache()
        keys = self._keys()
        found = {pair: cache.get(key) for pair, key in keys.items()}
        if all(found.values()):
            return found, None
        summary.reference_runs += 1
        cell = Cell(method="baseline", dtype=self.dtype).with_id({"reference": list(keys.values())})
        with tempfile.TemporaryDirectory(prefix="quantbench-reference-") as scratch:
            generation = {**self.ready.matrix.generation.model_dump(), "repeats": 1, "warmup": 0}
            result = _run_in_subprocess(
                self.ready,
                cell,
                Path(scratch) / "images",
                Path(scratch) / "latents",
                self.folder.logs_dir / "reference.log",
                generation,
            )
            if result.status != "ok":
                last_line = (result.error or "").strip().splitlines()[-1:] or ["no error text"]
                return {}, f"the reference run ({self.dtype} baseline) ended {result.status}: {last_line[0]}"
            for pair, key in keys.items():
                stem = f"p{pair[0]}_s{pair[1]}"
                image = Path(scratch) / "images" / f"{stem}.png"
                if not image.exists():
                    return {}, f"the reference image for prompt {pair[0]}, seed {pair[1]} has NaN or inf values"
                found[pair] = cache.put(key, image, Path(scratch) / "latents" / f"{stem}.safetensors")
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


def _row_context(ready: Plan) -> dict[str, Any]:
    machine = ready.machine
    context: dict[str, Any] = {**collect_environment().as_dict(), "device": ready.device}
    if ready.device == "cuda":
        context.update(gpu_name=machine.gpu_name, gpu_driver=_nvidia_driver())
    return context


def _nvidia_driver() -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def cell_environment() -> dict[str, str]:
    """The environment of a cell subprocess: offline hub, shared compile cache, this package importable."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PACKAGE_ROOT), env.get("PYTHONPATH")]))
    env.setdefault("HF_HUB_OFFLINE", "1")  # cells load local folders only; the driver resolved the model
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir("inductor")))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _run_in_subprocess(
    ready: Plan,
    cell: Cell,
    images_dir: Path,
    latents_dir: Path,
    log_path: Path,
    generation: dict[str, Any] | None = None,
) -> CellResult:
    """Run `cell` in a fresh Python process under the matrix's timeout; any ending becomes a CellResult."""
    timeout_s = ready.matrix.spec.run.timeout_s
    with tempfile.TemporaryDirectory(prefix="quantbench-cell-") as scratch:
        spec = CellSpec(
            cell=cell.axes(),
            cell_id=cell.id,
            model_folder=str(ready.model.folder),
            components={name: [c.library, c.class_name] for name, c in ready.model.components.items()},
            generation=generation or ready.matrix.generation.model_dump(),
            device=ready.device,
            images_dir=str(images_dir),
            latents_dir=str(latents_dir),
            result_path=str(Path(scratch) / "result.json"),
            gpu_memory_limit_gib=ready.matrix.spec.run.gpu_memory_limit_gib,
            trust_pickled_checkpoints=ready.matrix.spec.run.trust_pickled_checkpoints,
        )
        spec_path = Path(scratch) / "spec.json"
        spec.save(spec_path)
        start = time.perf_counter()
        with open(log_path, "w") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "bench.cell", str(spec_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=cell_environment(),
                start_new_session=True,  # the whole process group can be killed on timeout
                preexec_fn=_die_with_parent,
            )
            try:
                returncode = process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                returncode = None
            except BaseException:  # the driver is interrupted: take the cell down with it
                os.killpg(process.pid, signal.SIGKILL)
                raise
        wall_s = time.perf_counter() - start
        result_file = Path(spec.result_path)
        if returncode is None:
            result = CellResult(
                status="timeout", error=f"the cell ran past run.timeout_s = {timeout_s:g} s and was killed"
            )
        elif result_file.exists():
            result = CellResult.load(result_file)
        else:
            how = f"signal {signal.Signals(-returncode).name}" if returncode < 0 else f"exit code {returncode}"
            result = CellResult(status="failed", error=f"the cell process died ({how}) before reporting a result")
    result.measurements["cell_wall_s"] = wall_s
    result.measurements["log_tail"] = _tail(log_path)
    return result


def _die_with_parent() -> None:
    """In the cell process: get SIGKILL when the driver dies, even by SIGKILL, so no orphan holds the GPU."""
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _tail(path: Path) -> str:
    text = path.read_text(errors="replace")
    return text[-LOG_TAIL_CHARS:]
