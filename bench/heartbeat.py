"""A cell's heartbeat: during its phases (compiling, above all), a log line every minute with how long the
phase has run, where in the libraries it is, and what torch.compile has done so far, so a live log, or one a time limit cut short, shows
whether compilation was still moving and on what (new graphs, Triton kernels, Inductor's tuning)."""

from __future__ import annotations

import contextlib
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

HEARTBEAT_ENV = "QUANTBENCH_HEARTBEAT_S"  # seconds between two lines; a driver setting every worker's cells see
HEARTBEAT_S = float(os.environ.get(HEARTBEAT_ENV, 60))
COMPILE_PROGRESS = "; torch.compile so far: "  # what a compiling phase's beat adds after where the cell is
# where the cell's main thread is, named by the innermost frame from one of these packages
LIBRARIES = ("torch", "triton", "torchao", "bitsandbytes", "diffusers", "transformers", "accelerate", "gguf", "optimum")


@dataclass(frozen=True)
class CompileCounts:
    """What torch.compile has done in this process so far, from torch's own counters."""

    graphs: int  # graphs compiled, counted once done (a graph still compiling is not in it), recompiles included
    graphs_from_cache: int  # of those, found in Inductor's FX graph cache
    triton_kernels: int  # Triton kernels Inductor asked to compile (none on the CPU, which builds C++)
    coordinate_descent_benchmarks: int  # kernel configurations timed by coordinate-descent tuning
    autotuned_ops: int  # matmuls and convolutions whose implementation was picked by benchmarking
    # int8 weight-only linears (torchao int8wo's `F.linear(x, w.to(bf16)) * scale`) Inductor's pattern matcher
    # rewrote into aten._weight_int8pack_mm, a kernel far slower than a matmul at thousands of tokens on CUDA
    # (README, "Layer benchmarks"); 0 in rows written before it was counted
    int8_weight_only_rewrites: int = 0
    # places Dynamo split the code into separate graphs, each a return to Python between compiled parts (why:
    # `graph_break_reasons`); 0 in rows written before it was counted
    graph_breaks: int = 0

    @classmethod
    def now(cls) -> CompileCounts:
        from torch._dynamo.utils import counters

        inductor = counters["inductor"]
        return cls(
            graphs=counters["stats"]["unique_graphs"],
            graphs_from_cache=inductor["fxgraph_cache_hit"],
            triton_kernels=inductor["async_compile_cache_miss"],
            coordinate_descent_benchmarks=inductor["coordesc_tuning_bench"],
            autotuned_ops=inductor["select_algorithm_autotune"],
            int8_weight_only_rewrites=inductor["woq_matcher_count"],
            graph_breaks=sum(counters["graph_break"].values()),
        )

    def describe(self) -> str:
        return (
            f"{self.graphs} graphs compiled ({self.graphs_from_cache} from the FX graph cache), "
            f"{self.triton_kernels} Triton kernels, {self.coordinate_descent_benchmarks} coordinate-descent "
            f"benchmarks, {self.autotuned_ops} autotuned ops"
            + (f", {self.graph_breaks} graph breaks" if self.graph_breaks else "")
            + (
                f", {self.int8_weight_only_rewrites} int8 weight-only linears rewritten into aten._weight_int8pack_mm"
                if self.int8_weight_only_rewrites
                else ""
            )
        )


def graph_break_reasons(most: int = 3) -> list[tuple[str, int]]:
    """Dynamo's commonest reasons for the graph breaks in this process so far, each in one line (its title and
    explanation), with how often it broke for it."""
    from torch._dynamo.utils import counters

    reasons = []
    for reason, count in counters["graph_break"].most_common(most):
        lines = [line.strip() for line in reason.splitlines() if line.strip()]
        explanation = next(
            (line.removeprefix("Explanation: ") for line in lines if line.startswith("Explanation:")), ""
        )
        reasons.append((f"{lines[0]}: {explanation}" if explanation else lines[0], count))
    return reasons


@contextlib.contextmanager
def heartbeat(
    phase: str,
    say: Callable[[str], None],
    every_s: float = HEARTBEAT_S,
    compiling: bool = True,
    detail: Callable[[], str] | None = None,
) -> Iterator[None]:
    """While the block runs, `say` every `every_s` seconds that `phase` is still running and for how long,
    with `detail()` (e.g. the denoising steps done) and torch.compile's progress (CompileCounts) when
    `compiling`."""
    stop = threading.Event()
    start = time.monotonic()
    worker = threading.get_ident()

    def beat() -> None:
        while not stop.wait(every_s):
            line = f"{phase}: still running, {time.monotonic() - start:.0f} s in"
            if detail:
                line += f" ({detail()})"
            if where := library_frame(worker):
                line += f", now in {where}"
            say(f"{line}{COMPILE_PROGRESS}{CompileCounts.now().describe()}" if compiling else line)

    thread = threading.Thread(target=beat, name=f"heartbeat: {phase}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def library_frame(thread_id: int) -> str | None:
    """Where thread `thread_id` is now, as `package/module.py:function` of its innermost frame in one of
    LIBRARIES (e.g. `torch/_inductor/codecache.py:compile_file`); None outside them."""
    frame = sys._current_frames().get(thread_id)
    while frame is not None:
        path = frame.f_code.co_filename
        start = max(path.rfind(f"/{library}/") for library in LIBRARIES)
        if start != -1:
            return f"{path[start + 1 :]}:{frame.f_code.co_name}"
        frame = frame.f_back
    return None


_WARMUP_STEP_SPEED = " (its steps after the first: median {:.3f} s)"
_WARMUP_STEP_SPEED_IN_LOG = re.compile(
    r"warm-up: [\d.]+ s" + re.escape(_WARMUP_STEP_SPEED).replace(re.escape("{:.3f}"), r"([\d.]+)")
)


def warmup_step_speed(median_s: float | None) -> str:
    """` (its steps after the first: median 0.151 s)`: the warm-up's step time after the step that compiled,
    as a cell's log and its row's phases say it; "" where the warm-up had a single step."""
    if median_s is None or median_s != median_s:  # None or NaN
        return ""
    return _WARMUP_STEP_SPEED.format(median_s)


def warmup_step_speed_in_log(log: str) -> float | None:
    """The warm-up's step time (`warmup_step_speed`) that a cell's log gives, the last if several tries
    logged one; None if none did (stopped before its warm-up ended)."""
    found = _WARMUP_STEP_SPEED_IN_LOG.findall(log)
    return float(found[-1]) if found else None
