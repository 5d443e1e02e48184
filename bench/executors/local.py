"""The executors of one host: `local` (one cell at a time) and `local-gpus` (one cell per GPU at a time,
each pinned with CUDA_VISIBLE_DEVICES and given its share of the CPU cores, unless OMP_NUM_THREADS is set)."""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import signal
import subprocess
import tempfile
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from bench.environment import Machine, detect_machine
from bench.errors import UserError
from bench.executors.base import THREADS_ENV, Executor, threads_per_cell
from bench.launch import STANDBY_MARKS_ENV, CellJob, CellOutcome, Standby, job_environment, launch_cell

log = logging.getLogger(__name__)


def local_gpus(named: list[str] | None = None) -> list[str]:
    """The GPUs `local-gpus` runs on: those named with --gpus, else CUDA_VISIBLE_DEVICES's entries if set, else
    every device torch sees. Named ids must be among CUDA_VISIBLE_DEVICES's entries when it is set, else among
    torch's devices (numeric ids only: a MIG or UUID name is passed on as given)."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    entries = None if listed is None else [entry.strip() for entry in listed.split(",") if entry.strip()]
    if entries == []:
        raise UserError("--executor local-gpus: CUDA_VISIBLE_DEVICES is empty, which hides every GPU; unset it")
    import torch

    count = torch.cuda.device_count()
    if count == 0:
        raise UserError("--executor local-gpus: torch sees no CUDA GPU on this machine; use --executor local")
    if entries is not None:
        missing = [gpu for gpu in named or [] if gpu not in entries]
        if missing:
            raise UserError(f"--gpus: {', '.join(missing)} not among CUDA_VISIBLE_DEVICES={listed}")
        return named or entries
    missing = [gpu for gpu in named or [] if gpu.isdigit() and int(gpu) >= count]
    if missing:
        raise UserError(f"--gpus: no device {', '.join(missing)}; this machine's are 0 to {count - 1}")
    return named or [str(index) for index in range(count)]


class LocalExecutor(Executor):
    """Cells as subprocesses of this host. With `gpus`, one slot per GPU, each cell pinned to its GPU with
    its share of the cores; without, one slot and no pinning. A job that asks for it (`prestart_next`) has the
    next cell's process of its slot started while it runs (`bench.launch.Standby`). Scratch folders go in
    `scratch_parent` (default: the temporary folder)."""

    def __init__(self, gpus: list[str] | None = None, scratch_parent: Path | None = None) -> None:
        self.name = "local-gpus" if gpus else "local"
        self.slots = len(gpus) if gpus else 1
        self._free: queue.Queue[str | None] = queue.Queue()
        for gpu in gpus or [None]:
            self._free.put(gpu)
        self._pool = ThreadPoolExecutor(self.slots, thread_name_prefix="quantbench-cell")
        self._running: set[subprocess.Popen] = set()
        self._standbys: dict[str | None, Standby] = {}  # by slot (GPU)
        self._closed = False
        self._lock = threading.Lock()
        self._scratch_parent = scratch_parent
        # see STANDBY_MARKS_ENV
        self._marks = tempfile.TemporaryDirectory(prefix="quantbench-standbys-", dir=scratch_parent)
        self._slot_marks = {gpu: Path(self._marks.name) / f"slot{index}" for index, gpu in enumerate(gpus or [None])}
        for folder in self._slot_marks.values():
            folder.mkdir()
        share = threads_per_cell(os.cpu_count() or 1, self.slots)  # a thread count the user set wins
        self._threads = {THREADS_ENV: str(share)} if gpus and THREADS_ENV not in os.environ else {}

    def machine(self) -> Machine:
        return detect_machine()

    def submit(self, job: CellJob) -> Future[CellOutcome]:
        return self._pool.submit(self._run, job)

    def _run(self, job: CellJob) -> CellOutcome:
        gpu = self._free.get()
        try:
            env = {"CUDA_VISIBLE_DEVICES": gpu, **self._threads} if gpu is not None else {}
            env[STANDBY_MARKS_ENV] = str(self._slot_marks[gpu])  # by slot index: a GPU id may hold a "/" (MIG)
            with self._lock:
                standby = self._standbys.pop(gpu, None)

            def started(process: subprocess.Popen) -> None:
                self._track(process)
                with self._lock:
                    if self._closed:  # shut down while this cell's process started: it must not run on
                        _kill_group(process)
                    elif job.prestart_next:
                        try:
                            self._standbys[gpu] = Standby(job.spec, job_environment(job, env), self._scratch_parent)
                        except OSError as error:  # the next cell then starts with its cell
                            log.warning("could not start the next cell's process ahead: %s", error)

            return launch_cell(job, env, started, standby, self._scratch_parent)
        finally:
            with self._lock:
                self._running = {p for p in self._running if p.poll() is None}
            self._free.put(gpu)

    def _track(self, process: subprocess.Popen) -> None:
        with self._lock:
            self._running.add(process)

    def shutdown(self) -> None:
        with self._lock:
            self._closed = True
            for process in self._running:
                _kill_group(process)
            for standby in self._standbys.values():
                standby.discard()
            self._standbys.clear()
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._marks.cleanup()


def _kill_group(process: subprocess.Popen) -> None:
    """SIGKILL a cell's process group, if it still runs."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
