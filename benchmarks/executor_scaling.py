"""Throughput of the Ray executor with 1 and N CPU workers on the smoke model: cells per hour and the ratio
to N x the single-worker rate (the target is >= 0.9).

    python benchmarks/executor_scaling.py --workers 2 [--output scaling.json]

Each worker is one Ray CPU slot; every cell is a fresh subprocess with one CPU thread (Ray's default per
slot), so N workers need N free cores. Drift is off: only cell throughput is measured.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import tomli_w

from bench.executors import make_executor
from bench.matrix import load_matrix
from bench.runner import run_matrix


def smoke_grid(folder: Path) -> Path:
    """The smoke model and generation settings on 8 cells: baseline and 3 torchao types, in bf16 and fp32."""
    data = {
        "name": "executor-scaling",
        "model": {"builtin": "tiny-flux"},
        "generation": {
            "prompts": ["a red apple on a wooden table"],
            "height": 64,
            "width": 64,
            "num_inference_steps": 4,
            "max_sequence_length": 32,
            "repeats": 3,
        },
        "drift": {"enabled": False},
        "axes": {"method": ["baseline", "torchao"], "dtype": ["bf16", "fp32"]},
        "method": {"torchao": {"quant_type": ["int8wo", "int8dq", "float8wo"]}},
    }
    path = folder / "matrix.toml"
    path.write_text(tomli_w.dumps(data))
    return path


def cells_per_hour(matrix_path: Path, workers: int, results: Path) -> tuple[float, float, int]:
    import ray

    ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
    try:
        matrix = load_matrix(matrix_path)
        start = time.perf_counter()
        summary = run_matrix(matrix, results, force=True, executor=make_executor("ray"))
        wall = time.perf_counter() - start
    finally:
        ray.shutdown()
    ok = summary.statuses.get("ok", 0)
    return ok / wall * 3600, wall, ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        matrix = smoke_grid(Path(scratch))
        run_matrix(load_matrix(matrix, ["method=baseline", "dtype=bf16"]), Path(scratch) / "warm")  # builds the model
        single, single_wall, single_ok = cells_per_hour(matrix, 1, Path(scratch) / "one")
        many, many_wall, many_ok = cells_per_hour(matrix, args.workers, Path(scratch) / "many")
    ratio = many / (args.workers * single)
    report = {
        "host_cpus": os.cpu_count(),
        "workers": args.workers,
        "single_worker": {"cells_ok": single_ok, "wall_s": round(single_wall, 2), "cells_per_hour": round(single)},
        "n_workers": {"cells_ok": many_ok, "wall_s": round(many_wall, 2), "cells_per_hour": round(many)},
        "ratio_to_n_times_single": round(ratio, 3),
        "target": 0.9,
    }
    print(json.dumps(report, indent=2))
    if args.output:
        args.output.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
