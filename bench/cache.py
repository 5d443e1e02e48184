"""The local cache folder (built models, produced GGUF files, baselines, Inductor's compile caches), shared by every run."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from bench.atomic import replace_folder, write_text_atomic


def cache_dir(kind: str) -> Path:
    """`$QUANTBENCH_CACHE/<kind>` (default `~/.cache/quantbench/<kind>`), created if missing."""
    root = Path(os.environ.get("QUANTBENCH_CACHE") or Path.home() / ".cache" / "quantbench")
    folder = root / kind
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def inductor_cache_dir() -> str:
    """Where cells keep Inductor's caches: `TORCHINDUCTOR_CACHE_DIR` if the user chose one, else
    `$QUANTBENCH_CACHE/inductor`.

    Importing `torch._inductor` (diffusers and torchao do) fills a missing `TORCHINDUCTOR_CACHE_DIR` in with
    Inductor's default temporary folder; that value counts as not chosen.
    """
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    chosen = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if chosen and os.path.abspath(chosen) != os.path.abspath(default_cache_dir()):
        return chosen
    return str(cache_dir("inductor"))


def content_digest(path: Path) -> str:
    """sha256 of a file's bytes, remembered in the cache by (path, size, mtime) so big files hash once."""
    stat = path.stat()
    memo_file = cache_dir("digests") / "sha256.json"
    memo = json.loads(memo_file.read_text()) if memo_file.exists() else {}
    memo_key = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    if memo_key not in memo:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 24), b""):
                digest.update(chunk)
        memo[memo_key] = digest.hexdigest()
        write_text_atomic(memo_file, json.dumps(memo))
    return memo[memo_key]


@dataclass(frozen=True)
class InductorCacheContents:
    """What an Inductor cache folder holds, i.e. what a compile starting now can reuse instead of redoing: a
    compile time means "cold" only when all of it is zero."""

    fx_graphs: int  # whole compiled graphs (a hit skips the graph's compile entirely)
    triton_kernels: int  # compiled Triton kernels (Triton's own cache; no compile, but Inductor still lowers)
    tuned_kernels: int  # kernels whose tuned launch configuration is stored (`.best_config`: coordinate descent)
    autotuned_op_shapes: int  # matmul/convolution shapes whose benchmarked choice is stored (max-autotune)

    @classmethod
    def of(cls, folder: Path) -> InductorCacheContents:
        """Count `folder`'s entries (Inductor's layout: fxgraph/<xx>/<key>/, triton/<device>/<hash>/ unless
        TRITON_CACHE_DIR points elsewhere, <xx>/<hash>.best_config, cache/<system> as JSON)."""
        chosen_triton = os.environ.get("TRITON_CACHE_DIR")
        triton_kernels = Path(chosen_triton).glob("*/") if chosen_triton else folder.glob("triton/*/*/")
        return cls(
            fx_graphs=sum(1 for _ in folder.glob("fxgraph/*/*/")),
            triton_kernels=sum(1 for _ in triton_kernels),
            tuned_kernels=sum(1 for _ in folder.glob("*/*.best_config")),
            autotuned_op_shapes=sum(_autotuned_shapes(path) for path in folder.glob("cache/*")),
        )

    def describe(self) -> str:
        return (
            f"{self.fx_graphs} FX graphs, {self.triton_kernels} Triton kernels, {self.tuned_kernels} tuned kernel "
            f"configurations, {self.autotuned_op_shapes} autotuned op shapes"
        )


def _autotuned_shapes(path: Path) -> int:
    """Entries of Inductor's local autotune cache file ({"cache": {op: {input shapes: ...}}}); 0 if unreadable."""
    try:
        ops = json.loads(path.read_text())["cache"]
        return sum(len(shapes) for shapes in ops.values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return 0


# This process's shared locks on the cache entries it uses, held until it ends: `make_room` in another process
# (a cell on another GPU) never deletes an entry a cell is reading.
_ENTRIES_IN_USE: list[IO[str]] = []


def build_once(target: Path, build: Callable[[Path], None], needed_bytes: Callable[[], int] | None = None) -> Path:
    """Create `target` with `build(tmp_folder)` unless it exists; concurrent callers build it once. The folder
    appears only complete (built in a temporary sibling, then renamed), and this process holds a shared lock on
    it from then on (`_ENTRIES_IN_USE`). `needed_bytes`: the disk the build needs, made room for first
    (`make_room`) by the one caller that builds."""
    handle = open(target.with_name(target.name + ".lock"), "a")  # noqa: SIM115 (kept open: the lock lasts)
    try:
        while True:
            fcntl.flock(handle, fcntl.LOCK_SH)
            if target.exists():
                os.utime(target)  # recently used: `make_room` evicts the least recently used entries first
                _ENTRIES_IN_USE.append(handle)
                return target
            fcntl.flock(handle, fcntl.LOCK_EX)  # (Linux drops the shared lock first: two callers never deadlock)
            if not target.exists():
                if needed_bytes is not None:
                    make_room(target.parent, needed_bytes(), keep=target)
                scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
                try:
                    build(scratch)
                    replace_folder(scratch, target)
                finally:
                    shutil.rmtree(scratch, ignore_errors=True)
    except BaseException:
        handle.close()
        raise


# The checkpoints methods write from a model (GGUF files, BFL and AutoRound checkpoints, bitsandbytes pre-quantized
# saves): any of them can be written again, so any may be evicted to make room for another.
PRODUCED_KINDS = ("gguf", "bfl", "auto_round", "prequantized")


def make_room(folder: Path, needed_bytes: int, keep: Path) -> list[Path]:
    """Free `needed_bytes` on the disk holding cache `folder` by deleting the least recently used entries of
    `folder` and of the produced-checkpoint folders beside it (`PRODUCED_KINDS`), never `keep` nor one a process
    is building or using (`build_once`); returns the deleted entries. OSError when that is not enough.

    Large produced files (a FLUX-sized GGUF is 4-13 GB, AutoRound saves a whole pipeline) would otherwise fill a
    small disk in one reference run: on a 64 GiB disk the nightly's GGUF files left AutoRound's save no room.
    """
    deleted: list[Path] = []
    for entry in _least_recently_used({folder, *(folder.parent / kind for kind in PRODUCED_KINDS)}, keep):
        if shutil.disk_usage(folder).free >= needed_bytes:
            break
        with open(entry.with_name(entry.name + ".lock"), "a") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # a process is building it or using it (`build_once`)
                continue
            try:  # out of sight first: `build_once` never finds a half-deleted entry
                hidden = entry.rename(entry.with_name(f".evicted-{entry.name}-{os.getpid()}"))
            except FileNotFoundError:  # another process evicted it meanwhile
                continue
            shutil.rmtree(hidden, ignore_errors=True)
            fcntl.flock(handle, fcntl.LOCK_UN)
        deleted.append(entry)
    free = shutil.disk_usage(folder).free
    if free < needed_bytes:
        raise OSError(
            f"{folder}: {needed_bytes / 1e9:.1f} GB needed, {free / 1e9:.1f} GB free after evicting"
            f" {len(deleted)} least recently used cache entries"
        )
    return deleted


def _least_recently_used(folders: set[Path], keep: Path) -> list[Path]:
    """The cache entries in `folders` (not `keep`, not scratch or hidden folders), least recently used first; one
    another process deletes meanwhile is left out."""
    used = []
    for folder in folders:
        for entry in folder.iterdir() if folder.is_dir() else ():
            if entry.name.startswith(".") or entry == keep:
                continue
            try:
                if entry.is_dir():
                    used.append((entry.stat().st_mtime, entry))
            except OSError:
                continue
    return [entry for _, entry in sorted(used)]


def folder_fingerprint(folder: Path) -> str:
    """A cheap content fingerprint of a model folder: every file's relative name, size and modification time
    (no file is read), hashed; replacing or editing a file changes it."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        stat = path.stat()
        digest.update(f"{path.relative_to(folder)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def versions_key(versions: dict[str, str | None]) -> str:
    """A short hash of library versions, for cache entry names."""
    return hashlib.sha256(json.dumps(versions, sort_keys=True).encode()).hexdigest()[:12]
