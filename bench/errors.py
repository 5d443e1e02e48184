"""Errors the user can fix: each names where the problem is and what is allowed."""

from __future__ import annotations

import difflib
import traceback
from collections.abc import Iterable
from pathlib import Path

from bench.contract import Status


class UserError(Exception):
    """Bad input (matrix, CLI, results folder). Reported in one line, exit code 2."""

    exit_code = 2


class MatrixError(UserError):
    """A matrix file that cannot be run, with the file, the key path, the bad value and what is allowed."""

    def __init__(
        self,
        file: Path | str,
        key: str,
        message: str,
        value: object = None,
        allowed: Iterable[object] | None = None,
    ) -> None:
        self.file = str(file)
        self.key = key
        self.value = value
        self.allowed = list(allowed) if allowed is not None else None
        text = f"{self.file}: {key or '<top level>'}: {message}"
        if value is not None:
            text += f" (got {_short_repr(value)})"
        if self.allowed:
            text += "; allowed: " + ", ".join(str(a) for a in self.allowed)
        super().__init__(text)


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """ "; did you mean 'X'?" naming the choice closest to a misspelled `name`, or "" when none is close."""
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _short_repr(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def first_line(error: BaseException) -> str:
    """An exception's message, first line only (for one-line statuses)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else ""


def root_cause(error: BaseException) -> BaseException:
    """The innermost exception of a chain (libraries often wrap the reason in a generic error)."""
    while error.__cause__ or error.__context__:
        error = error.__cause__ or error.__context__
    return error


class MethodUnavailable(Exception):
    """A cell cannot run here: `status` is `skipped` (this machine) or `unsupported` (installed libraries)."""

    def __init__(self, status: str, reason: str) -> None:
        self.status = Status(status)
        assert self.status in (Status.SKIPPED, Status.UNSUPPORTED)
        self.reason = reason
        super().__init__(f"{status}: {reason}")


def classify(error: BaseException) -> Status:
    """The row status for an exception raised inside a cell."""
    if isinstance(error, MethodUnavailable):
        return error.status
    if type(error).__name__ == "OutOfMemoryError" or "out of memory" in str(error).lower():
        return Status.OOM
    return Status.FAILED


def describe(error: BaseException) -> str:
    """A failed cell's error text: the reason of a MethodUnavailable, else the end of the traceback plus the root
    cause when libraries wrap it (diffusers hides why a pickled checkpoint was refused behind a generic OSError)."""
    if isinstance(error, MethodUnavailable):
        return error.reason
    text = "".join(traceback.format_exception(error)[-6:]).strip()
    root = root_cause(error)
    if root is not error:
        text += f"\ncaused by {type(root).__name__}: {first_line(root)}"
    if type(root).__name__ == "UnpicklingError":
        text += (
            "\nquantbench loads pickled checkpoints only with torch.load(weights_only=True); convert it to safetensors"
        )
    return text
