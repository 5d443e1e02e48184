"""The local cache folder (built models, produced GGUF files, baselines), shared by every run."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path


def cache_dir(kind: str) -> Path:
    """`$QUANTBENCH_CACHE/<kind>` (default `~/.cache/quantbench/<kind>`), created if missing."""
    root = Path(os.environ.get("QUANTBENCH_CACHE") or Path.home() / ".cache" / "quantbench")
    folder = root / kind
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on `path` (blocking), released on exit or process death."""
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def build_once(target: Path, build: Callable[[Path], None]) -> Path:
    """Create `target` with `build(tmp_folder)` unless it exists; concurrent callers build it once.

    The folder appears only complete (built in a temporary sibling, then renamed).
    """
    if target.exists():
        return target
    with file_lock(target.with_name(target.name + ".lock")):
        if not target.exists():
            scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
            try:
                build(scratch)
                os.replace(scratch, target)
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
    return target
