"""On a CUDA GPU only: a real out-of-memory becomes an `oom` row, and the compile heartbeat counts real kernels."""

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


def test_heartbeat_counts_triton_kernels_and_inductor_tuning_on_a_gpu():
    from pathlib import Path

    import torch._inductor.config as inductor_config
    from torch._inductor.runtime.cache_dir_utils import cache_dir
    from torch._inductor.utils import fresh_cache

    from bench.cache import InductorCacheContents
    from bench.heartbeat import CompileCounts

    before = CompileCounts.now()
    layers = torch.nn.Sequential(torch.nn.Linear(1024, 4096), torch.nn.GELU(), torch.nn.Linear(4096, 1024))
    layers = layers.cuda().bfloat16()
    inputs = torch.randn(64, 1024, device="cuda").bfloat16()
    # as run by hand on an H100 (2 Triton kernels, 8 coordinate-descent benchmarks, 2 autotuned matmuls):
    # coordinate-descent tuning as torchao's configs turn it on, then max-autotune's matmul selection
    with fresh_cache(), inductor_config.patch(coordinate_descent_tuning=True):  # an empty cache: all is compiled
        torch.compile(layers)(inputs)
        torch.compile(layers, mode="max-autotune-no-cudagraphs")(inputs + 1)
        torch.cuda.synchronize()
        stored = InductorCacheContents.of(Path(cache_dir()))  # what a later process could reuse
    after = CompileCounts.now()
    assert after.graphs == before.graphs + 2
    assert after.triton_kernels > before.triton_kernels
    assert after.coordinate_descent_benchmarks > before.coordinate_descent_benchmarks
    assert after.autotuned_ops > before.autotuned_ops
    assert stored.fx_graphs >= 2 and stored.triton_kernels > 0, stored
    assert stored.tuned_kernels > 0 and stored.autotuned_op_shapes >= 1, stored
