"""Shared fixtures: one cache (tiny models, compile cache) per test run, and matrix-file helpers. `nox -s tests`
runs pytest on two pytest-xdist workers, a module on one worker (`--dist loadfile`: a module's shared runs
happen once)."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import pytest
import tomli_w

SMOKE_MATRIX: dict[str, Any] = {
    "model": {"builtin": "tiny-flux"},
    "generation": {
        "prompts": ["a red apple on a wooden table", "a street sign that says OPEN"],
        "seeds": [0],
        "height": 64,
        "width": 64,
        "num_inference_steps": 3,
        "max_sequence_length": 32,
        "repeats": 2,
    },
    "run": {"timeout_s": 300},
    "axes": {"method": ["baseline", "torchao"]},
    "method": {"torchao": {"quant_type": "int8wo"}},
}


# The modules that run the most cell subprocesses (the CI log's durations), heaviest first: pytest-xdist's
# `--dist loadfile` hands out modules in collection order, so starting these first keeps both workers busy
# to the end instead of leaving one module running alone.
HEAVIEST_FIRST = ["test_run", "test_faults", "test_attention", "test_executors", "test_lora", "test_cli"]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Under pytest-xdist, collect the heaviest modules first (a stable sort: the order within a module stays)."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    rank = {name: index for index, name in enumerate(HEAVIEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))


@pytest.fixture(scope="session", autouse=True)
def quantbench_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every test shares one cache folder, so the tiny model, the references and the Inductor cache are built
    once; pytest-xdist's workers (each with a `popen-gw<N>` folder in the run's) share the run's one (the cache is
    safe for concurrent processes: `bench.cache.build_once`, Inductor's own atomic writes)."""
    run_folder = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        run_folder = run_folder.parent
    cache = run_folder / "quantbench-cache"
    mp = pytest.MonkeyPatch()
    mp.setenv("QUANTBENCH_CACHE", str(cache))
    yield cache
    mp.undo()


def matrix_data(**sections: Any) -> dict[str, Any]:
    """The smoke matrix as data, with top-level sections replaced or (for dicts) updated."""
    data = copy.deepcopy(SMOKE_MATRIX)
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key].update(value)
        else:
            data[key] = value
    # The smoke's [method.torchao] goes with torchao: options for a method no cell uses are an error.
    axes_methods = data.get("axes", {}).get("method", [])
    used = {*(axes_methods if isinstance(axes_methods, list) else [axes_methods])}
    used |= {
        rule.get("method")
        for rule in data.get("include", [])
        if isinstance(rule, dict) and isinstance(rule.get("method"), str)
    }
    if isinstance(data.get("method"), dict):
        given = sections.get("method") if isinstance(sections.get("method"), dict) else {}
        data["method"] = {name: table for name, table in data["method"].items() if name in used or name in given}
    return data


def write_matrix(folder: Path, data: dict[str, Any], name: str = "matrix.toml") -> Path:
    path = folder / name
    path.write_text(tomli_w.dumps(data))
    return path


@pytest.fixture
def make_matrix(tmp_path: Path):
    """Write a matrix file (the smoke matrix with overrides) into the test's folder and return its path."""

    def make(name: str = "matrix.toml", **sections: Any) -> Path:
        return write_matrix(tmp_path, matrix_data(**sections), name)

    return make


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory, quantbench_cache):
    """The smoke matrix (baseline and torchao int8wo, 2 prompts x 1 seed, two gates) run once per test run, next to
    the shared cache (the first pytest-xdist worker to need it runs it, under a lock); each worker gets its own copy
    of the results folder, so a test that adds to it changes no other worker's."""
    import fcntl
    import json
    import shutil
    from collections import Counter

    from bench.matrix import load_matrix
    from bench.runner import RunSummary, run_matrix

    shared = quantbench_cache.parent / "smoke"
    shared.mkdir(exist_ok=True)
    finished = shared / "summary.json"
    with open(shared / "run.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not finished.exists():
            data = matrix_data(name="smoke", gates={"min_psnr_db": 30, "max_latent_rel_l2": 0.001})
            summary = run_matrix(load_matrix(write_matrix(shared, data)), shared / "results")
            counts = {"statuses": dict(summary.statuses), "already_done": summary.already_done}
            finished.write_text(json.dumps({**counts, "reference_runs": summary.reference_runs}))
    results = Path(shutil.copytree(shared / "results", tmp_path_factory.mktemp("smoke") / "results"))
    counts = json.loads(finished.read_text())
    summary = RunSummary(results, Counter(counts.pop("statuses")), **counts)
    return load_matrix(shared / "matrix.toml"), results, summary
