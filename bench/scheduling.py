"""The order cells start in when several run at once: longest first (LPT), so the slots finish together.

A cell's length is its recorded wall time in the results folder (a row's `cell_wall_s`, or how long a run that
was stopped let it run), else in the folder `quantbench run --times-from` names (a reference run of the same
cells), else an estimate from its method family and compile settings. With one slot the
order changes nothing but the order of the rows, so the driver keeps the matrix's order there (apart from a
compiled cell's eager twin, which it starts first whatever the slots: bench.runner.next_to_start).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

from bench.cells import Cell
from bench.store import ResultsFolder, read_runs

# Cell wall seconds on one H200/H100 at FLUX.1-dev shapes with a cold Inductor cache (results/reference/h200 and
# h100/flux-dev-h100, imports at 8 s): an eager cell by method family, what compiling the whole denoiser adds by
# mode, what regional compilation (each repeated block once) adds, and the cells whose loading or steps add more.
EAGER_S = {
    "baseline": 21.0,
    "bitsandbytes": 25.0,
    "gguf": 50.0,
    "torchao": 45.0,
    "quanto": 45.0,
    "layerwise": 22.0,
    "sdnq": 75.0,
    "bfl": 30.0,
    "modelopt": 45.0,
    "auto_round": 95.0,
}  # the last four: h200/backends-h200
EAGER_UNKNOWN_S = 45.0
COMPILE_S = {"default": 75.0, "reduce-overhead": 90.0, "max-autotune": 300.0, "max-autotune-no-cudagraphs": 280.0}
# compiled torchao (its configs turn on coordinate-descent tuning) and GGUF build more kernels than bf16: whole
# default compiles of 115-300 s against 68-90 s; regionally, torchao float8dq 168 s against 11-12 s
COMPILE_FAMILY_FACTOR = {"torchao": 3.5, "gguf": 2.5}
REGIONAL_S = {"torchao": 165.0}
REGIONAL_OTHER_S = 12.0
PIPELINE_CONFIG_SAVING_S = 24.0  # torchao quantized on the GPU inside from_pretrained instead of on the CPU
# compiled int8wo with Inductor's int8pack rewrite (presets that keep the pattern matcher): 65 s a step, 12 steps
INT8PACK_STEPS_S = 780.0
NO_PATTERN_MATCHER = ("no-pattern-matcher", "stock-no-pattern-matcher")


def estimated_s(cell: Cell, family: str) -> float:
    """A cell's wall seconds estimated from its method `family` and compile settings (nothing recorded)."""
    seconds = EAGER_S.get(family, EAGER_UNKNOWN_S)
    if family == "torchao" and cell.options.get("pipeline_config"):
        seconds -= PIPELINE_CONFIG_SAVING_S
    if cell.compile == "off":
        return seconds
    if cell.regional:
        seconds += REGIONAL_S.get(family, REGIONAL_OTHER_S)
    else:
        seconds += COMPILE_S.get(cell.compile, COMPILE_S["default"]) * COMPILE_FAMILY_FACTOR.get(family, 1.0)
    if family == "torchao" and cell.options.get("quant_type") == "int8wo" and cell.inductor not in NO_PATTERN_MATCHER:
        seconds += INT8PACK_STEPS_S
    return seconds


def recorded_s(results_dir: Path) -> dict[str, float]:
    """Each cell's recorded wall seconds in `results_dir`: its rows' `cell_wall_s`, or, for a cell with no row
    that a stopped run cut short, the longest it was let run (a lower bound, still the best guess there is)."""
    return {**_stopped_s(results_dir), **_finished_s(results_dir)}


def _stopped_s(results_dir: Path) -> dict[str, float]:
    """The longest each cell a stopped run cut short was let run, from `runs.jsonl`."""
    seconds: dict[str, float] = {}
    for run in read_runs(results_dir):
        for unfinished in run.get("unfinished", []):
            cell_id, ran_s = unfinished.get("cell_id"), unfinished.get("ran_s")
            if isinstance(cell_id, str) and isinstance(ran_s, int | float):
                seconds[cell_id] = max(seconds.get(cell_id, 0.0), float(ran_s))
    return seconds


def _finished_s(results_dir: Path) -> dict[str, float]:
    """Each cell's longest `cell_wall_s` among its rows."""
    seconds = {}
    for cell_id, table in ResultsFolder(results_dir).read_parts().items():
        walls = [wall for wall in table.column("cell_wall_s").to_pylist() if wall is not None]
        if walls:
            seconds[cell_id] = max(walls)
    return seconds


def longest_first(cells: Iterable[Cell], recorded: Mapping[str, float], families: Mapping[str, str]) -> list[Cell]:
    """`cells` longest first: recorded seconds where known, else the estimate (`families`: method name to
    family). Ties keep the matrix's order."""
    cells = list(cells)

    def length(cell: Cell) -> float:
        return recorded.get(cell.id, estimated_s(cell, families.get(cell.method, cell.method)))

    return sorted(cells, key=length, reverse=True)


def start_order(cells: Iterable[Cell], results_dir: Path, slots: int, times_from: Path | None = None) -> list[Cell]:
    """The order the driver starts `cells` in: the matrix's with one slot, longest first with several, by the
    times recorded in `results_dir`, then in `times_from` (another run of the same cells), then the estimate."""
    cells = list(cells)
    if slots <= 1:
        return cells
    from bench.methods import method_class

    families = {cell.method: method_class(cell.method).family for cell in cells}
    return longest_first(cells, merged_times(results_dir, times_from), families)


def merged_times(results_dir: Path, times_from: Path | None) -> dict[str, float]:
    """The cells' recorded seconds: `results_dir`'s, with `times_from`'s for cells it has no row for (where a
    stopped run there let a cell run for a while, that lower bound counts only if longer)."""
    if times_from is None:
        return recorded_s(results_dir)
    other = recorded_s(times_from)
    stopped = {cell_id: max(seconds, other.get(cell_id, 0.0)) for cell_id, seconds in _stopped_s(results_dir).items()}
    return {**other, **stopped, **_finished_s(results_dir)}
