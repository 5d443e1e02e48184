"""On a CUDA GPU only: real out-of-memory, and GPU memory measured for real."""

from __future__ import annotations

import pytest
import torch

from bench.matrix import load_matrix
from bench.runner import run_matrix
from bench.store import read_results
from tests.conftest import matrix_data, write_matrix

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_a_real_cuda_oom_becomes_an_oom_row_and_the_run_goes_on(tmp_path, quantbench_cache):
    data = matrix_data(
        name="oom",
        run={"timeout_s": 300, "gpu_memory_limit_gib": 0.02},  # 20 MiB: the tiny pipeline fits, a 1024² decode does not
        generation={"prompts": ["a red apple"], "height": 1024, "width": 1024, "num_inference_steps": 1, "repeats": 1},
        drift={"enabled": False},
    )
    summary = run_matrix(load_matrix(write_matrix(tmp_path, data)), tmp_path / "results")
    rows = read_results(tmp_path / "results")
    assert summary.statuses == {"oom": 2}
    assert rows["error"].str.contains("OutOfMemoryError").all()
    assert not rows["error"].str.contains("Injected").any(), "a real allocator OOM, not the fault switch"
