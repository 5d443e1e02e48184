"""Read the layer benchmarks' pytest-benchmark JSON into one row per case, with the measured peaks."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from bench.errors import UserError
from bench.kernels.peaks import Peaks


def read_kernel_results(path: str | Path) -> tuple[pd.DataFrame, Peaks]:
    """The cases of a `pytest tests/kernels --benchmark-json=PATH` run and the peaks measured in it."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
        peaks = Peaks(**data["machine_info"]["quantbench_peaks"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise UserError(f"{path}: not a quantbench kernel benchmark JSON ({type(error).__name__}: {error})") from None
    rows = [
        {**bench["extra_info"], "median_s": bench["stats"]["median"], "iqr_s": bench["stats"]["iqr"]}
        for bench in data["benchmarks"]
        if bench.get("extra_info", {}).get("method")
    ]
    if not rows:
        raise UserError(f"{path}: holds no layer benchmark (run `nox -s kernels`)")
    return pd.DataFrame.from_records(rows), peaks
