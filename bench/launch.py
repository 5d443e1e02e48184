"""Run one cell in a fresh Python process, wherever an executor put it, and bring back what it made.

This is the worker's side of every executor: the local ones call it in a thread of the driver, Ray in an actor
on any node. It writes nothing outside a scratch folder; the images, latents and log come back
as bytes in the `CellOutcome`, and only the driver writes the results folder.

A cell's process is started either when the cell starts (`[run] cell_start = "spawn"`) or ahead of it, while the
cell before it runs (`"prestarted"`): a `Standby` imports torch, diffusers and the model's
classes, then waits for its cell's spec. Either way each cell has a process of its own, started with exactly
the cell's environment, so its CUDA context and allocator are fresh. Forking cells from one pre-imported parent
would not keep that: importing diffusers imports bitsandbytes and torchao, which query the GPU
(`torch.cuda.get_device_capability`) at import time, and a CUDA driver initialised before `fork` is unusable in
the child.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from bench.cache import cache_dir, inductor_cache_dir
from bench.contract import CellResult, CellSpec, Measurements, Status
from bench.faults import FAULT_ENV
from bench.heartbeat import HEARTBEAT_ENV
from bench.parent_death import PARENT_ENV
from bench.worker import IMPORTING_MARK_PREFIX, STANDBY_FLAG, STANDBY_MARKS_ENV, idle_context_mark

LOG_TAIL_CHARS = 4000
PACKAGE_ROOT = Path(__file__).resolve().parent.parent
FORWARDED_ENV = (FAULT_ENV, HEARTBEAT_ENV)  # driver settings a cell must see on any worker
WORKER_COMMAND = (sys.executable, "-m", "bench.worker")


@dataclass(frozen=True)
class CellJob:
    """One attempt at one cell: the spec, its time limit, and the driver's settings the cell must see."""

    spec: CellSpec
    timeout_s: float
    env: dict[str, str] = field(default_factory=dict)
    prestart_next: bool = False  # start the next cell's process (a Standby) while this one runs

    @classmethod
    def for_spec(cls, spec: CellSpec, timeout_s: float, prestart_next: bool = False) -> CellJob:
        forwarded = {name: os.environ[name] for name in FORWARDED_ENV if name in os.environ}
        return cls(spec, timeout_s, forwarded, prestart_next)

    def retry(self) -> CellJob:
        return replace(self, spec=replace(self.spec, attempt=self.spec.attempt + 1))


@dataclass
class CellOutcome:
    """What came back from a cell: its result, its files (path relative to the cell's output -> bytes),
    its log, and where and at which attempt it ran."""

    result: CellResult
    files: dict[str, bytes]
    log: str
    host: str
    cuda_visible_devices: str | None
    attempt: int


def cell_environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a cell subprocess: offline hub, shared compile cache, bytecode kept, this package
    importable."""
    env = {**os.environ, **(extra or {})}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PACKAGE_ROOT), env.get("PYTHONPATH")]))
    env.setdefault("HF_HUB_OFFLINE", "1")  # cells load local folders only; the driver resolved the model
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["TORCHINDUCTOR_CACHE_DIR"] = (extra or {}).get("TORCHINDUCTOR_CACHE_DIR") or inductor_cache_dir()
    if env.get("PYTHONDONTWRITEBYTECODE") and installed_without_bytecode():
        # Container images often set it; each cell, a fresh process, would then compile every module of torch,
        # diffusers and transformers from source (imports took 23 s instead of 11 s on an H100 host).
        # Their bytecode goes to quantbench's cache instead, leaving the installed packages untouched.
        del env["PYTHONDONTWRITEBYTECODE"]
        env.setdefault("PYTHONPYCACHEPREFIX", str(cache_dir("pycache")))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def installed_without_bytecode(package: str = "diffusers") -> bool:
    """Whether `package` (every cell imports diffusers) was installed without its bytecode (`pip --no-compile`)."""
    spec = importlib.util.find_spec(package)
    return bool(spec and spec.origin) and not os.path.exists(importlib.util.cache_from_source(spec.origin))


def job_environment(job: CellJob, env: dict[str, str] | None = None) -> dict[str, str]:
    """The whole environment of `job`'s process; `env` adds the executor's settings (e.g. CUDA_VISIBLE_DEVICES)."""
    return cell_environment({**job.env, **(env or {}), PARENT_ENV: str(os.getpid())})


class Standby:
    """A cell's process started before its cell is known: `python -m bench.worker --standby` imports what a cell
    like `template` needs (torch, diffusers, the model's classes), then waits for a spec path on its stdin. Its
    scratch folder and log become the cell's; a standby whose environment is not the cell's is never used."""

    def __init__(self, template: CellSpec, env: dict[str, str], scratch_parent: Path | None = None) -> None:
        self.env = env
        self._scratch = tempfile.TemporaryDirectory(prefix="quantbench-cell-", dir=scratch_parent)
        self.scratch = Path(self._scratch.name)
        template_path = self.scratch / "template.json"
        template.save(template_path)
        self._mark: Path | None = None
        lock = self._importing_lock(env.get(STANDBY_MARKS_ENV))
        try:
            with open(self.scratch / "cell.log", "w") as log:
                self.process = subprocess.Popen(
                    [*WORKER_COMMAND, STANDBY_FLAG, str(template_path), *([str(lock)] if lock is not None else [])],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.PIPE,
                    env=env,
                    text=True,
                    start_new_session=True,
                    pass_fds=(lock,) if lock is not None else (),
                )
        except OSError:
            self._scratch.cleanup()
            raise
        finally:
            if lock is not None:
                os.close(lock)  # the process's copy holds the lock now

    def _importing_lock(self, marks: str | None) -> int | None:
        """A new file in the slot's marks folder, locked, for the process to hold while it imports
        (`STANDBY_MARKS_ENV`): locked before the process exists, so no cell can time before the imports start."""
        if not marks:
            return None
        lock, name = tempfile.mkstemp(prefix=IMPORTING_MARK_PREFIX, dir=marks)
        fcntl.flock(lock, fcntl.LOCK_EX)
        self._mark = Path(name)
        return lock

    def hand_over(self, spec_path: Path) -> bool:
        """Give the process its cell (with the time of the hand-over: a standby still importing has the rest of
        its imports in the cell's `import_s`); False (the process killed) when it no longer runs."""
        self._drop_mark()  # the slot's cell before this one, the only one that waits on it, has ended
        try:
            if self.process.poll() is not None:
                raise BrokenPipeError
            self.process.stdin.write(f"{spec_path}\t{time.time()}\n")  # the cell starts now, whatever the standby does
            self.process.stdin.close()
        except OSError:
            self.kill()
            return False
        return True

    def kill(self) -> None:
        """Kill the process and its process group, if it still runs."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        with contextlib.suppress(OSError):
            self.process.stdin.close()
        self._drop_mark()
        if self.env.get(STANDBY_MARKS_ENV):  # the file of its idle CUDA context, if it made one
            idle_context_mark(self.env[STANDBY_MARKS_ENV], self.process.pid).unlink(missing_ok=True)

    def _drop_mark(self) -> None:
        """Delete the file of the import lock: a cell that waited on it has ended by the time this is called."""
        if self._mark is not None:
            self._mark.unlink(missing_ok=True)

    def discard(self) -> None:
        """Kill the process and delete its scratch folder."""
        self.kill()
        self._scratch.cleanup()


def launch_cell(
    job: CellJob,
    env: dict[str, str] | None = None,
    on_start: Callable[[subprocess.Popen], None] | None = None,
    standby: Standby | None = None,
    scratch_parent: Path | None = None,
) -> CellOutcome:
    """Run `job` in a fresh `python -m bench.worker` under its time limit; any ending becomes a CellOutcome.

    `env` adds to the cell's environment (e.g. CUDA_VISIBLE_DEVICES); `on_start` receives the process so an
    executor can kill it when the run is interrupted. `standby`, a process started ahead with the same
    environment, runs the cell instead of a new one (it is discarded if its environment differs). The cell's
    scratch folder goes in `scratch_parent` (default: the temporary folder).
    """
    cell_env = job_environment(job, env)
    if standby is not None and standby.env != cell_env:
        standby.discard()
        standby = None
    with contextlib.ExitStack() as cleanup:
        if standby is not None:
            cleanup.callback(standby.discard)
            scratch = standby.scratch
        else:
            scratch = Path(
                cleanup.enter_context(tempfile.TemporaryDirectory(prefix="quantbench-cell-", dir=scratch_parent))
            )
        output = scratch / "output"
        output.mkdir()
        spec = replace(job.spec, output_dir=str(output))
        spec_path = scratch / "spec.json"
        spec.save(spec_path)
        log_path = scratch / "cell.log"
        start = time.perf_counter()
        if standby is not None and standby.hand_over(spec_path):
            process = standby.process
        else:
            with open(log_path, "w") as log:
                process = subprocess.Popen(
                    [*WORKER_COMMAND, str(spec_path)],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env=cell_env,
                    start_new_session=True,  # the whole process group can be killed on timeout; the cell itself
                    # asks to die with this process (bench.parent_death)
                )
        if on_start:
            on_start(process)
        try:
            returncode = process.wait(timeout=job.timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            returncode = None
        except BaseException:  # the launcher is interrupted: take the cell down with it
            os.killpg(process.pid, signal.SIGKILL)
            raise
        wall_s = time.perf_counter() - start
        log_text = log_path.read_text(errors="replace")
        if returncode is not None and spec.result_path.exists():
            result = CellResult.load(spec.result_path)
        else:  # killed from outside: the row keeps the phases the cell finished, the error says where it was
            if returncode is None:
                status, error = Status.TIMEOUT, f"the cell ran past run.timeout_s = {job.timeout_s:g} s and was killed"
            else:
                how = f"signal {signal.Signals(-returncode).name}" if returncode < 0 else f"exit code {returncode}"
                status, error = Status.FAILED, f"the cell process died ({how}) before reporting a result"
            progress = CellResult.load(spec.progress_path) if spec.progress_path.exists() else None
            if progress is not None and progress.phase:
                error += f"; the last line of its log: {progress.phase}"
            measurements = progress.measurements if progress is not None else Measurements()
            result = CellResult(status=status, error=error, measurements=measurements)
        result.measurements.cell_wall_s = wall_s
        result.measurements.log_tail = log_text[-LOG_TAIL_CHARS:]
        files = {
            str(path.relative_to(output)): path.read_bytes()
            for path in sorted(output.rglob("*"))
            if path.is_file() and path not in (spec.result_path, spec.progress_path) and not path.name.endswith(".tmp")
        }
    return CellOutcome(
        result, files, log_text, socket.gethostname(), cell_env.get("CUDA_VISIBLE_DEVICES"), spec.attempt
    )
