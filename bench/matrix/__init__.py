"""Matrix files: parse the TOML, validate it into typed config, expand it into cells.

Everything a user can get wrong is caught here, before any work starts, as a MatrixError that names the
file, the key path, the bad value and the allowed values. schema.py: the models; loading.py: `load_matrix`;
pydantic_errors.py: the error translation; rules.py: the cells (axes product, include/exclude/select).
"""

from bench.matrix.loading import load_matrix
from bench.matrix.rules import expand, expand_options
from bench.matrix.schema import (
    BUILTIN_MODELS,
    COMPILE_MODES,
    MAX_SECONDS,
    PLACEMENTS,
    SAFE_NAME,
    Axes,
    DriftSettings,
    Generation,
    Matrix,
    MatrixFile,
    ModelSource,
    RunSettings,
)

__all__ = [
    "BUILTIN_MODELS",
    "COMPILE_MODES",
    "MAX_SECONDS",
    "PLACEMENTS",
    "SAFE_NAME",
    "Axes",
    "DriftSettings",
    "Generation",
    "Matrix",
    "MatrixFile",
    "ModelSource",
    "RunSettings",
    "expand",
    "expand_options",
    "load_matrix",
]
