"""Cell start order: longest first on several slots, from recorded times or the estimate."""

from __future__ import annotations

import heapq
from concurrent.futures import Future

from bench.cells import Cell
from bench.contract import CellResult
from bench.environment import Machine
from bench.executors.base import Executor
from bench.launch import CellOutcome
from bench.matrix import load_matrix
from bench.runner import run_matrix
from bench.scheduling import estimated_s, longest_first, merged_times, recorded_s, start_order
from bench.store import ResultsFolder
from tests.test_store import row


def cell(method: str, **fields) -> Cell:
    return Cell(method=method, **fields).with_id({"test": True})


def makespan(lengths: list[float], slots: int) -> float:
    """When the last of `lengths` ends, each started in order on the first free slot (what the driver does)."""
    free_at = [0.0] * slots
    for length in lengths:
        heapq.heappush(free_at, heapq.heappop(free_at) + length)
    return max(free_at)


def test_the_estimate_ranks_compiled_above_eager_and_the_known_slow_cells_highest():
    family = {"baseline": "baseline", "torchao": "torchao", "gguf": "gguf", "bnb_4bit": "bitsandbytes"}
    eager = estimated_s(cell("baseline"), "baseline")
    whole = estimated_s(cell("baseline", compile="default"), "baseline")
    regional = estimated_s(cell("baseline", compile="default", regional=True), "baseline")
    autotune = estimated_s(cell("baseline", compile="max-autotune"), "baseline")
    assert eager < regional < whole < autotune
    assert estimated_s(cell("gguf", compile="default"), family["gguf"]) > whole
    on_gpu = cell("torchao", options={"quant_type": "int8wo", "pipeline_config": True})
    assert estimated_s(on_gpu, "torchao") < estimated_s(cell("torchao", options={"quant_type": "int8wo"}), "torchao")
    int8pack = cell("torchao", options={"quant_type": "int8wo"}, compile="default")
    no_rewrite = cell(
        "torchao", options={"quant_type": "int8wo"}, compile="default", inductor="stock-no-pattern-matcher"
    )
    assert estimated_s(int8pack, "torchao") > estimated_s(no_rewrite, "torchao") + 600
    assert estimated_s(cell("new_backend"), "new_backend") > 0  # a family the table does not know still gets a length


def test_every_method_family_measured_on_a_gpu_has_an_eager_estimate():
    from bench.methods import method_class, method_names
    from bench.scheduling import EAGER_S

    families = {method_class(name).family for name in method_names()}
    assert families - EAGER_S.keys() <= {"nunchaku"}, "Nunchaku Lite is skipped on the H200s: no time to go by"


def test_recorded_times_win_over_the_estimate_and_ties_keep_the_matrix_order():
    eager, compiled, other = cell("baseline"), cell("baseline", compile="default"), cell("layerwise_fp8")
    families = {"baseline": "baseline", "layerwise_fp8": "layerwise"}
    assert longest_first([eager, other, compiled], {}, families)[0] == compiled
    # this eager cell was recorded slower than the compiled one's estimate: the record decides
    assert longest_first([eager, other, compiled], {eager.id: 500.0}, families) == [eager, compiled, other]
    same = {eager.id: 10.0, other.id: 10.0, compiled.id: 10.0}
    assert longest_first([other, compiled, eager], same, families) == [other, compiled, eager]


def test_longest_first_finishes_two_gpus_sooner_than_the_matrix_order():
    # the H200's four-cell run: the longest cell last in the matrix decided the 2-GPU wall time
    lengths = {"bf16": 21.0, "int8wo": 46.0, "nf4": 20.0, "compiled": 90.0, "int8": 28.0, "regional": 25.0}
    cells = [cell("baseline", options={"label": name}) for name in lengths]
    seconds = {c.id: lengths[c.options["label"]] for c in cells}
    ordered = longest_first(cells, seconds, {})
    in_matrix_order = makespan([seconds[c.id] for c in cells], 2)
    longest_first_order = makespan([seconds[c.id] for c in ordered], 2)
    assert longest_first_order < in_matrix_order
    assert longest_first_order <= 4 / 3 * sum(lengths.values()) / 2  # LPT's bound against a perfect split


def test_recorded_times_come_from_rows_and_from_cells_a_stopped_run_cut_short(tmp_path):
    folder = ResultsFolder(tmp_path)
    folder.create()
    finished = row("a")
    finished.cell_wall_s = 42.0
    folder.write_cell("a", [finished, row("a")])  # a row without a wall time (another prompt) changes nothing
    folder.write_cell("never-ran", [row("never-ran", status="skipped")])
    folder.append_run({"unfinished": [{"cell_id": "b", "ran_s": 300.0}]})
    folder.append_run({"unfinished": [{"cell_id": "b", "ran_s": 120.0}, {"cell_id": "a", "ran_s": 5.0}]})
    assert recorded_s(tmp_path) == {"a": 42.0, "b": 300.0}


def test_one_slot_keeps_the_matrix_order(tmp_path):
    cells = [cell("baseline"), cell("baseline", compile="max-autotune")]
    assert start_order(cells, tmp_path, 1) == cells
    assert start_order(cells, tmp_path, 2) == cells[::-1]


def test_another_folders_times_order_cells_this_folder_has_not_timed(tmp_path):
    eager, autotune, other = cell("baseline"), cell("baseline", compile="max-autotune"), cell("gguf")
    reference = ResultsFolder(tmp_path / "reference")
    reference.create()
    for c, wall in ((eager, 900.0), (other, 5.0)):  # the eager cell was the longest in the reference run
        timed = row(c.id)
        timed.cell_wall_s = wall
        reference.write_cell(c.id, [timed])
    fresh = tmp_path / "tonight"
    assert start_order([eager, autotune, other], fresh, 2)[0] == autotune, "the estimate alone"
    assert start_order([eager, autotune, other], fresh, 2, times_from=reference.root) == [eager, autotune, other]
    here = ResultsFolder(fresh)
    here.create()
    timed = row(eager.id)
    timed.cell_wall_s = 1.0
    here.write_cell(eager.id, [timed])
    assert start_order([eager, autotune, other], fresh, 2, times_from=reference.root)[-1] == eager, "own times win"
    # a stopped run's lower bound here counts where it is longer than the reference's time, not where shorter
    here.append_run({"unfinished": [{"cell_id": other.id, "ran_s": 1000.0}, {"cell_id": autotune.id, "ran_s": 1.0}]})
    timed = row(autotune.id)
    timed.cell_wall_s = 400.0
    reference.write_cell(autotune.id, [timed])
    assert merged_times(fresh, reference.root) == {eager.id: 1.0, other.id: 1000.0, autotune.id: 400.0}


class _RecordingExecutor(Executor):
    """Two slots on the CPU; each job finishes at once, and the order they came in is kept."""

    name, slots = "recording", 2

    def __init__(self) -> None:
        self.started: list[str] = []

    def machine(self) -> Machine:
        return Machine(cuda_available=False)

    def submit(self, job) -> Future:
        self.started.append(job.spec.cell_id)
        future: Future = Future()
        future.set_result(CellOutcome(CellResult(status="failed", error="not run"), {}, "", "host", None, 1))
        return future

    def shutdown(self) -> None:
        pass


def test_the_driver_starts_the_longest_cells_first_on_several_slots(make_matrix, tmp_path):
    path = make_matrix(
        axes={"method": ["baseline"], "compile": ["off", "default", "max-autotune"]}, drift={"enabled": False}
    )
    matrix = load_matrix(path)
    executor = _RecordingExecutor()
    run_matrix(matrix, tmp_path / "results", executor=executor)
    by_compile = {c.id: c.compile for c in matrix.cells}
    # longest first, except that the compiled cells' eager twin starts before them (its step time gives them their
    # slow warm-up limit); with the twin running and nothing else to start, the longest goes
    assert [by_compile[cell_id] for cell_id in executor.started] == ["off", "max-autotune", "default"]
