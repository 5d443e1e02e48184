"""Loading a matrix file: read the TOML, validate it into the schema, read its prompts, expand its cells."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from bench.errors import MatrixError
from bench.matrix.pydantic_errors import matrix_error
from bench.matrix.rules import expand, select_cells
from bench.matrix.schema import SAFE_NAME, Generation, Matrix, MatrixFile
from bench.prompts import BUILTIN_PROMPTS, PromptFileError, read_prompt_file


def load_matrix(path: str | Path, select: list[str] | tuple[str, ...] = ()) -> Matrix:
    """Read, validate and expand a matrix file; MatrixError on any problem.

    `select` keeps only the cells matching every `KEY=VALUE` (as in an exclude rule; `compile=off`,
    `method=torchao`, `quant_type=int8wo`): a quick subset that shares ids, and so results, with the full run.
    """
    path = Path(path)
    raw = _read_toml(path)
    try:
        spec = MatrixFile.model_validate(raw)
    except ValidationError as error:
        raise matrix_error(path, error) from None
    spec = spec.model_copy(update={"generation": _with_prompts(path, spec.generation)})
    name = spec.name or path.stem
    if not SAFE_NAME.fullmatch(name) or ".." in name:
        raise MatrixError(path, "name", "the matrix name (default: the file name) must be a safe folder name", name)
    if spec.model.path:
        folder = (path.parent / spec.model.path).expanduser().resolve()
        if not folder.is_dir():
            raise MatrixError(path, "model.path", f"no such folder: {folder}", spec.model.path)
    cells = expand(spec, path)
    if select:
        cells = select_cells(path, spec, cells, dict(_select_item(path, item) for item in select))
    return Matrix(path=path, name=name, spec=spec, cells=cells)


def _select_item(path: Path, item: str) -> tuple[str, Any]:
    """`KEY=VALUE` with VALUE read as TOML when it parses (numbers, booleans, lists), else as a string."""
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise MatrixError(path, "--select", "expected KEY=VALUE", item)
    try:
        value = _parse_toml(path, f"v = {text}", "--select")["v"]
    except MatrixError:
        if text.lstrip().startswith(("[", "{", '"', "'")):  # meant as TOML (a list, a table, a quoted string)
            raise MatrixError(
                path, "--select", "VALUE is not valid TOML (a list needs its ], a string its quotes)", item
            ) from None
        value = text
    return key.strip(), value


def _with_prompts(path: Path, generation: Generation) -> Generation:
    """The generation settings with `prompt_file` read into `prompts`."""
    source = generation.prompt_file
    if not source:
        return generation
    if source.startswith("builtin:"):
        name = source.removeprefix("builtin:")
        if name not in BUILTIN_PROMPTS:
            raise MatrixError(
                path,
                "generation.prompt_file",
                "unknown built-in prompt set",
                source,
                [f"builtin:{n}" for n in BUILTIN_PROMPTS],
            )
        prompts = list(BUILTIN_PROMPTS[name])
    else:
        try:
            prompts = read_prompt_file((path.parent / source).expanduser())
        except PromptFileError as error:
            raise MatrixError(path, "generation.prompt_file", str(error), source) from None
    return generation.model_copy(update={"prompts": prompts})


def _read_toml(path: Path) -> dict[str, Any]:
    """The file's TOML; MatrixError (one line, exit 2) for anything the reader or the parser cannot take."""
    try:
        if not path.exists():
            raise MatrixError(path, "", "matrix file not found")
        if not path.is_file():
            raise MatrixError(path, "", "not a file")
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise MatrixError(path, "", f"not UTF-8 text (byte {error.start})") from None
    except OSError as error:  # unreadable, a name too long, a file gone meanwhile
        raise MatrixError(path, "", f"cannot read the file: {error.strerror or error}") from None
    return _parse_toml(path, text, "")


def _parse_toml(path: Path, text: str, key: str) -> dict[str, Any]:
    """tomllib.loads, with everything the parser itself may raise on pathological input (nesting deeper than
    the stack: RecursionError; an integer of more digits than Python converts: ValueError; MemoryError) as one
    MatrixError line."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise MatrixError(path, key, f"invalid TOML: {error}") from None
    except RecursionError:
        raise MatrixError(path, key, "invalid TOML: nested too deeply for the parser") from None
    except (ValueError, OverflowError, MemoryError) as error:
        raise MatrixError(path, key, f"invalid TOML: {type(error).__name__}: {str(error).splitlines()[0]}") from None
