"""What every row records about its environment: library versions and the lock the environment came from."""

from __future__ import annotations

import dataclasses
import hashlib

import pytest

from bench.environment import LOCK_ENV, Environment, collect_environment, differing_versions, lock_sha256
from bench.errors import UserError
from bench.store import ResultRow


def test_the_lock_hash_is_the_sha256_of_the_lock_file_the_environment_names(tmp_path, monkeypatch):
    lock = tmp_path / "gpu.txt"
    lock.write_text("torch==2.11.0 --hash=sha256:00\n")
    monkeypatch.setenv(LOCK_ENV, str(lock))
    assert collect_environment().lock_sha256 == hashlib.sha256(lock.read_bytes()).hexdigest()
    lock.write_text("torch==2.12.0 --hash=sha256:00\n")
    assert lock_sha256() == hashlib.sha256(b"torch==2.12.0 --hash=sha256:00\n").hexdigest()


def test_no_lock_named_records_none_and_an_unreadable_one_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv(LOCK_ENV, raising=False)
    assert lock_sha256() is None
    monkeypatch.setenv(LOCK_ENV, str(tmp_path / "missing.txt"))
    with pytest.raises(UserError, match=r"QUANTBENCH_LOCK=.*missing\.txt: cannot read the lock file"):
        lock_sha256()


def test_every_environment_field_is_a_row_column():
    # the driver spreads the environment into each row: a field without a column would fail every run
    columns = {field.name for field in dataclasses.fields(ResultRow)}
    assert {field.name for field in dataclasses.fields(Environment)} <= columns


def test_differing_versions_names_only_what_changed_between_two_runs():
    old = {"torch_version": "2.11.0", "diffusers_version": "0.42.1", "lock_sha256": "aa", "host": "gpu-1"}
    new = {"torch_version": "2.11.0", "diffusers_version": "0.43.0", "lock_sha256": "bb", "host": "gpu-2"}
    assert differing_versions(old, new) == {"diffusers_version": ("0.42.1", "0.43.0"), "lock_sha256": ("aa", "bb")}
    assert differing_versions(old, old) == {}
    # rows written before a field existed read back as NaN: that and None are the same (unknown)
    assert differing_versions({"lock_sha256": float("nan")}, {}) == {}
    assert differing_versions({}, {"torchao_version": "0.18.0"}) == {"torchao_version": (None, "0.18.0")}


def test_the_machine_is_asked_of_torch_in_a_child_process_never_in_this_one(monkeypatch):
    """Querying a GPU creates a CUDA context; in the driver it would sit on the first GPU for the whole run."""
    import torch

    from bench import environment

    def touched(*args, **kwargs):
        raise AssertionError("detect_machine asked torch.cuda in the driver's process")

    for name in ("is_available", "get_device_capability", "get_device_name", "device_count"):
        monkeypatch.setattr(torch.cuda, name, touched)
    environment._machine_seen_with.cache_clear()
    machine = environment.detect_machine()
    assert machine.cuda_available == (machine.gpu_count > 0) and environment.detect_machine() is machine
    monkeypatch.setattr(environment.sys, "executable", "/bin/false")
    with pytest.raises(UserError, match="^cannot tell which GPU torch sees: exit status 1$"):
        environment._machine_seen_with("another GPU")
    environment._machine_seen_with.cache_clear()
