import time

import torch

from bench.heartbeat import CompileCounts, graph_break_reasons, heartbeat


def test_heartbeat_reports_compile_progress_while_the_block_runs_and_stops_after(monkeypatch, tmp_path):
    # an empty Inductor cache: a compile found on disk (an earlier run's) can end before the first beat
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    lines: list[str] = []
    before = CompileCounts.now()  # the counters are per process: other tests may have compiled already
    compiled = torch.compile(lambda x: torch.sin(x) * 2 + 1)
    with heartbeat("warm-up", lines.append, every_s=0.05):
        compiled(torch.randn(8))
        time.sleep(0.3)  # a few beats after compilation finished
    assert CompileCounts.now().graphs == before.graphs + 1
    assert lines and all(line.startswith("warm-up: still running, ") for line in lines)
    assert f"torch.compile so far: {before.graphs + 1} graphs compiled (" in lines[-1]
    assert any(", now in torch/" in line for line in lines), "a beat while compiling says where in torch"
    assert ", now in" not in lines[-1], "the last beats came while this test (no library) slept"
    beats = len(lines)
    time.sleep(0.2)
    assert len(lines) == beats, "no beat after the block ended"


def test_heartbeat_of_an_eager_phase_only_says_how_long():
    lines: list[str] = []
    with heartbeat("timed prompt 0, seed 0", lines.append, every_s=0.05, compiling=False):
        time.sleep(0.2)
    assert lines and all(line.startswith("timed prompt 0, seed 0: still running, ") for line in lines)
    assert not any("torch.compile" in line for line in lines)


def test_heartbeat_adds_the_phase_detail_read_at_each_beat():
    lines: list[str] = []
    steps = []
    with heartbeat(
        "timed prompt 0, seed 0", lines.append, every_s=0.05, compiling=False, detail=lambda: f"{len(steps)} steps done"
    ):
        for _ in range(3):
            time.sleep(0.12)
            steps.append(1)
    assert all(" s in (" in line and line.endswith(" steps done)") for line in lines)
    assert lines[0].endswith("(0 steps done)") and lines[-1] != lines[0], "each beat reads the detail anew"


def test_a_killed_cells_progress_file_holds_its_last_beat_without_the_compile_counts(tmp_path, capsys):
    from bench.contract import CellResult, CellSpec
    from bench.worker import PHASE_PREFIX, Progress

    spec = CellSpec(cell={}, cell_id="c", model_folder="", components={}, generation={}, device="cpu")
    spec.output_dir = str(tmp_path)
    with heartbeat("warm-up", Progress(spec, CellResult()), every_s=0.05, detail=lambda: "1 of 4 denoising steps done"):
        time.sleep(0.12)
    last = CellResult.load(spec.progress_path).phase
    assert last.startswith("warm-up: still running, ") and "(1 of 4 denoising steps done)" in last
    assert "torch.compile" not in last and "graphs compiled" not in last
    log = capsys.readouterr().out
    assert log.startswith(PHASE_PREFIX + "warm-up: still running") and "torch.compile so far" in log, (
        "the log keeps it all"
    )


def test_graph_breaks_are_counted_with_their_reasons_in_one_line_each():
    def split_at_a_data_dependent_shape(x):
        return x.sin().nonzero().sum() + x.cos().sum()

    before = CompileCounts.now()  # per process: other tests may have broken graphs already
    torch._dynamo.reset()
    torch.compile(split_at_a_data_dependent_shape)(torch.randn(8))
    after = CompileCounts.now()
    assert after.graph_breaks == before.graph_breaks + 1
    assert after.graphs == before.graphs + 2, "one graph on each side of the break"
    assert f", {after.graph_breaks} graph breaks" in after.describe()
    reasons = dict(graph_break_reasons(most=10))
    nonzero = [reason for reason in reasons if "aten.nonzero" in reason]
    assert nonzero and all("\n" not in reason for reason in reasons)
    assert ": " in nonzero[0], "its title, then what it means"


def test_the_warm_up_step_time_a_log_gives_is_read_back_from_the_line_a_cell_writes():
    from bench.heartbeat import warmup_step_speed, warmup_step_speed_in_log

    log = "".join(
        f"[quantbench] warm-up: {total} s{warmup_step_speed(median)}\n"
        for total, median in ((300.0, 70.1234), (5.5, 0.1514))
    )
    assert warmup_step_speed_in_log(log) == 0.151, "the last try's, at the precision the log keeps"
    assert warmup_step_speed(float("nan")) == "" and warmup_step_speed_in_log("[quantbench] warm-up: 2.0 s\n") is None
