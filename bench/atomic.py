"""Atomic file writes: a reader (or a crash) sees the old file or the new one, never half of one."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _process_umask() -> int:
    """The umask (read once, at import: reading it means setting it, which is not safe while threads create files)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


FILE_MODE = 0o666 & ~_process_umask()  # what open() gives a new file; mkstemp's temporaries are 0600 whatever the umask


@contextlib.contextmanager
def atomic_path(target: Path | str) -> Iterator[Path]:
    """A temporary path in `target`'s folder to write; on success it gets the mode open() would give a new file
    (`FILE_MODE`), is fsynced, renamed onto `target` and the folder fsynced; on failure it is removed and `target`
    left as it was."""
    target = Path(target)
    handle, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(handle)
    temporary = Path(name)
    try:
        yield temporary
        with contextlib.suppress(PermissionError, NotImplementedError):  # filesystems without modes (vfat, SMB)
            os.chmod(temporary, FILE_MODE)
        with open(temporary, "rb+") as written:
            os.fsync(written.fileno())
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _fsync_folder(target.parent)


def write_bytes_atomic(target: Path | str, data: bytes) -> None:
    with atomic_path(target) as temporary:
        temporary.write_bytes(data)


def write_text_atomic(target: Path | str, text: str) -> None:
    write_bytes_atomic(target, text.encode())


def replace_folder(scratch: Path, target: Path) -> None:
    """Move a fully written folder `scratch` (a sibling of `target`) into place, its files and folder synced."""
    for path in scratch.rglob("*"):
        if path.is_file():
            with open(path, "rb") as written:
                os.fsync(written.fileno())
    _fsync_folder(scratch)
    os.replace(scratch, target)
    _fsync_folder(target.parent)


def _fsync_folder(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
