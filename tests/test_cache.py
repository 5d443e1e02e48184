"""The shared cache: entries built once, reuse marks them recent, and room is made by evicting the least
recently used entries when a large file would not fit the disk."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections import namedtuple

import pytest

from bench.cache import build_once, make_room

Usage = namedtuple("Usage", "total used free")


def entry(folder, name: str, size: int, mtime: int):
    path = folder / name
    path.mkdir()
    (path / "model.gguf").write_bytes(b"\0" * size)
    os.utime(path, (mtime, mtime))
    return path


@pytest.fixture
def disk(monkeypatch):
    """A disk with 100 bytes free plus whatever the cache entries deleted so far held."""
    deleted = []
    real_rmtree = shutil.rmtree

    def rmtree(path, ignore_errors=False):
        deleted.append(sum(f.stat().st_size for f in path.rglob("*") if f.is_file()))
        real_rmtree(path, ignore_errors=ignore_errors)

    monkeypatch.setattr(shutil, "rmtree", rmtree)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**6, 0, 100 + sum(deleted)))


def test_least_recently_used_entries_go_first_until_there_is_room(tmp_path, disk):
    oldest, older, newest = (entry(tmp_path, n, 100, t) for n, t in (("a", 1000), ("b", 2000), ("c", 3000)))
    keep = tmp_path / "target"
    assert make_room(tmp_path, 250, keep=keep) == [oldest, older]
    assert not oldest.exists() and not older.exists() and newest.exists()


def test_nothing_is_evicted_when_the_file_fits(tmp_path, disk):
    kept = entry(tmp_path, "a", 100, 1000)
    assert make_room(tmp_path, 100, keep=tmp_path / "target") == []
    assert kept.exists()


def test_the_entry_being_made_and_scratch_folders_are_never_evicted(tmp_path, disk):
    keep = entry(tmp_path, "target", 100, 1000)
    scratch = entry(tmp_path, ".target.tmp123", 100, 1000)
    with pytest.raises(OSError, match=r"free after evicting 0 least recently used cache entries"):
        make_room(tmp_path, 250, keep=keep)
    assert keep.exists() and scratch.exists()


def test_an_entry_another_process_is_building_is_skipped(tmp_path, disk):
    busy, idle = entry(tmp_path, "a", 100, 1000), entry(tmp_path, "b", 100, 2000)
    builder = subprocess.Popen(  # holds the entry's build lock, as build_once does while building
        [sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a'); fcntl.flock(f, fcntl.LOCK_EX);"
         " print('locked', flush=True); time.sleep(60)", str(tmp_path / "a.lock")],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert builder.stdout.readline().strip() == "locked"
        assert make_room(tmp_path, 200, keep=tmp_path / "target") == [idle]
        assert busy.exists()
    finally:
        builder.kill()
        builder.wait()


def test_an_entry_another_process_uses_is_skipped_and_an_evicted_one_is_never_seen_half_deleted(tmp_path, disk):
    in_use, idle = tmp_path / "a", entry(tmp_path, "b", 100, 2000)
    user = subprocess.Popen(  # got its entry from build_once and reads it: a cell on another GPU
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from bench.cache import build_once;"
         " build_once(Path(sys.argv[1]), lambda f: (f / 'model.gguf').write_bytes(bytes(100)));"
         " print('using', flush=True); time.sleep(60)", str(in_use)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert user.stdout.readline().strip() == "using"
        os.utime(in_use, (1000, 1000))  # the least recently used, yet in use
        assert make_room(tmp_path, 200, keep=tmp_path / "target") == [idle]
        assert (in_use / "model.gguf").exists()
    finally:
        user.kill()
        user.wait()
    assert make_room(tmp_path, 300, keep=tmp_path / "target") == [in_use], "no longer in use: evicted"
    assert not [path for path in tmp_path.iterdir() if path.is_dir()], "renamed away, then deleted"


def test_room_is_made_from_every_kind_of_produced_checkpoint_never_from_built_models(tmp_path, disk):
    gguf, auto_round, models = (tmp_path / kind for kind in ("gguf", "auto_round", "models"))
    for folder in (gguf, auto_round, models):
        folder.mkdir()
    model = entry(models, "flux-dev-shape", 100, 500)  # the model the produced files are made from
    written = entry(gguf, "transformer-Q8_0", 100, 1000)
    assert make_room(auto_round, 200, keep=auto_round / "target") == [written]
    assert model.exists()


def test_the_caller_that_builds_makes_room_first_and_one_that_finds_the_entry_never_estimates(tmp_path, disk):
    old = entry(tmp_path, "a", 100, 1000)
    target = build_once(tmp_path / "b", lambda folder: (folder / "model.gguf").write_bytes(bytes(10)), lambda: 200)
    assert not old.exists() and (target / "model.gguf").exists()
    assert build_once(target, lambda folder: pytest.fail("built twice"), lambda: pytest.fail("estimated")) == target


def test_reusing_an_entry_marks_it_recently_used(tmp_path):
    target = tmp_path / "entry"
    build_once(target, lambda folder: (folder / "f").write_text("x"))
    os.utime(target, (1000, 1000))
    build_once(target, lambda folder: pytest.fail("built twice"))
    assert target.stat().st_mtime > 1000


def test_cells_keep_inductor_caches_in_quantbench_cache_after_torch_filled_in_its_default(tmp_path, monkeypatch):
    from torch._inductor.runtime.cache_dir_utils import cache_dir as inductor_cache

    from bench.launch import cell_environment

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("QUANTBENCH_CACHE", str(tmp_path / "qb"))
    inductor_cache()  # what importing diffusers or torchao does: Inductor's temporary folder in the environment
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] != str(tmp_path / "qb" / "inductor")
    assert cell_environment()["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "qb" / "inductor")


def test_an_inductor_cache_folder_the_user_chose_is_kept(tmp_path, monkeypatch):
    from bench.launch import cell_environment

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert cell_environment()["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "mine")
    chosen_for_the_cell = {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cell")}
    assert cell_environment(chosen_for_the_cell)["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "cell")


def test_cells_keep_bytecode_in_quantbench_cache_where_the_environment_forbids_writing_it(tmp_path, monkeypatch):
    import subprocess
    import sys

    from bench.launch import cell_environment

    monkeypatch.setenv("QUANTBENCH_CACHE", str(tmp_path / "qb"))
    monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", "1")  # as container images often set
    monkeypatch.setattr("bench.launch.installed_without_bytecode", lambda: False)
    assert "PYTHONPYCACHEPREFIX" not in cell_environment(), "the packages' own bytecode serves"
    monkeypatch.setattr("bench.launch.installed_without_bytecode", lambda: True)  # pip install --no-compile
    env = cell_environment()
    assert "PYTHONDONTWRITEBYTECODE" not in env and env["PYTHONPYCACHEPREFIX"] == str(tmp_path / "qb" / "pycache")
    subprocess.run([sys.executable, "-c", "import bench.cells"], env=env, check=True, timeout=120)
    assert list((tmp_path / "qb" / "pycache").rglob("cells*.pyc")), "the cell's imports left their bytecode there"


def test_a_package_installed_without_bytecode_is_recognised(tmp_path, monkeypatch):
    import py_compile

    from bench.launch import installed_without_bytecode

    source = tmp_path / "freshly_unpacked" / "__init__.py"
    source.parent.mkdir()
    source.write_text("VALUE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert installed_without_bytecode("freshly_unpacked")
    py_compile.compile(str(source))  # what pip does on install
    assert not installed_without_bytecode("freshly_unpacked")


def test_inductor_cache_contents_count_what_a_compile_can_reuse(tmp_path, monkeypatch):
    import json

    from bench.cache import InductorCacheContents

    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    assert InductorCacheContents.of(tmp_path) == InductorCacheContents(0, 0, 0, 0), "an empty folder is a cold start"
    for graph in ("ab/fabc/entry", "ab/fabd/entry", "cd/fcde/entry"):  # fxgraph/<xx>/<key>/<entry>
        (tmp_path / "fxgraph" / graph).mkdir(parents=True)
    for kernel in ("0/HASH1", "0/HASH2", "1/HASH3"):  # triton/<device>/<hash>/
        (tmp_path / "triton" / kernel).mkdir(parents=True)
    (tmp_path / "xy").mkdir()
    (tmp_path / "xy" / "cxy1.py").write_text("kernel")
    (tmp_path / "xy" / "cxy1.best_config").write_text("{}")
    autotuned = {"mm": {"[512, 3072] x [3072, 3072]": {}, "[4096, 3072] x [3072, 3072]": {}}, "scaled_mm": {"s": {}}}
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "system-hash").write_text(json.dumps({"system": {}, "cache": autotuned}))
    (tmp_path / "cache" / "half-written").write_text('{"cache": ')
    contents = InductorCacheContents.of(tmp_path)
    assert contents == InductorCacheContents(fx_graphs=3, triton_kernels=3, tuned_kernels=1, autotuned_op_shapes=3)
    assert contents.describe().startswith("3 FX graphs, 3 Triton kernels, 1 tuned kernel configurations")
    elsewhere = tmp_path / "own-triton"
    (elsewhere / "HASH4").mkdir(parents=True)
    monkeypatch.setenv("TRITON_CACHE_DIR", str(elsewhere))  # Triton's folder chosen apart from Inductor's
    assert InductorCacheContents.of(tmp_path).triton_kernels == 1


def test_inductor_cache_contents_read_the_folder_inductor_really_writes():
    from pathlib import Path

    import torch
    import torch._inductor.config as inductor_config
    from torch._inductor.runtime.cache_dir_utils import cache_dir
    from torch._inductor.utils import fresh_cache

    from bench.cache import InductorCacheContents
    from bench.heartbeat import CompileCounts

    layers = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 64)).eval()
    inputs = torch.randn(16, 64)
    try:
        with fresh_cache(), torch.no_grad():
            torch.compile(layers)(inputs)
            assert InductorCacheContents.of(Path(cache_dir())).fx_graphs == 1
            before = CompileCounts.now().autotuned_ops
            # max-autotune's matmul selection, on the CPU (C++ GEMM templates need frozen weights)
            with inductor_config.patch(freezing=True):
                torch.compile(layers, mode="max-autotune-no-cudagraphs")(inputs + 1)
            autotuned = CompileCounts.now().autotuned_ops - before
            assert autotuned == 2, "both matmuls were benchmarked"
            assert InductorCacheContents.of(Path(cache_dir())).autotuned_op_shapes == autotuned
    finally:
        torch._dynamo.reset()
