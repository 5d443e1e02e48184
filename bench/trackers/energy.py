"""Energy tracker: NVML's total-energy counter (nvidia-ml-py) around each timed generation, and the SM clock,
temperature, clock-event ("throttle") reasons and the other processes holding the GPU, sampled by a side thread
while they run.

Precision: the counter (millijoules since the driver loaded, the whole GPU: another process on the same GPU
counts too) advances in updates every 20-100 ms. Each window therefore starts and ends on an update (it waits,
at most `TICK_WAIT_S`, for the counter to change): what remains is the idle tail between the generation's end
and the next update, at most one update period at idle power (~80 W on an H200: < 10 J, under 1 % of a FLUX
generation's 1-2 kJ). Windows shorter than `MIN_WINDOW_S` hold only a few updates: then the figure is the
mean over all timed generations (said in `energy_note`), and null when even their sum is shorter.

Every NVML call is guarded: a call that fails (no NVML, an old driver, a GPU without the counter) leaves its
column null and says why in `energy_note`; it never fails the cell. On the CPU every column is null with a
note, never 0.
"""

from __future__ import annotations

import contextlib
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

MIN_WINDOW_S = 0.5  # at least 5 counter updates
TICK_WAIT_S = 0.25  # longest wait for the counter to advance at a window's edge
SAMPLE_INTERVAL_S = 0.1
CPU_NOTE = "no CUDA device: energy, power and clocks are measured on NVIDIA GPUs only"
# NVML's clock-event reasons (nvmlClocksEventReason*, formerly nvmlClocksThrottleReason*; same bits); GpuIdle
# (0x1) is left out: an idle GPU is not a throttled one.
CLOCK_EVENT_REASONS = {
    0x2: "applications_clocks_setting",
    0x4: "sw_power_cap",
    0x8: "hw_slowdown",
    0x10: "sync_boost",
    0x20: "sw_thermal_slowdown",
    0x40: "hw_thermal_slowdown",
    0x80: "hw_power_brake_slowdown",
    0x100: "display_clock_setting",
    0x200: "board_limit",
    0x400: "reliability",
}
NO_REASON = "none"


@dataclass
class Energy:
    """What the tracker measured over the timed generations (columns of the same names); None: not measured,
    and `energy_note` says why."""

    energy_j_per_image: float | None = None
    energy_j_per_step: float | None = None  # avg_power_w x the median denoising step time
    avg_power_w: float | None = None
    gpu_sm_clock_mhz: float | None = None  # median of the samples
    gpu_power_limit_w: float | None = None
    gpu_temperature_c: float | None = None  # max of the samples
    gpu_throttle_reasons: str | None = None  # clock-event reasons other than idle seen, comma-separated, or "none"
    gpu_other_processes: int | None = None  # most processes besides this one with a CUDA context on the GPU
    energy_note: str | None = None


class Nvml:
    """One GPU's NVML handle; `call` runs an NVML function and returns None (noting why) if it fails."""

    def __init__(self, gpu_uuid: str | None) -> None:
        self.notes: list[str] = []
        self.pynvml: Any = None
        self.handle: Any = None
        self.mig = False
        try:
            import pynvml

            pynvml.nvmlInit()
            self.pynvml = pynvml
        except Exception as error:  # not installed, no driver: the columns stay null
            self.note(f"NVML unavailable ({type(error).__name__}: {error})")
            return
        self.handle = self._handle(gpu_uuid)
        # With MIG on, the handle is the whole GPU's, whose processes include other slices' tenants
        mode = self.device("nvmlDeviceGetMigMode", noted=False)
        self.mig = bool(mode and mode[0])

    def _handle(self, gpu_uuid: str | None) -> Any:
        """The handle of the GPU torch uses: by UUID (NVML numbers GPUs in PCI order and ignores
        CUDA_VISIBLE_DEVICES, so an index could name another GPU)."""
        if gpu_uuid:
            uuid = gpu_uuid if gpu_uuid.startswith(("GPU-", "MIG-")) else f"GPU-{gpu_uuid}"
            handle = self.call("nvmlDeviceGetHandleByUUID", uuid)
            if handle is not None:
                return handle
        count = self.call("nvmlDeviceGetCount")
        if count == 1:
            return self.call("nvmlDeviceGetHandleByIndex", 0)
        self.note("cannot tell which GPU this process uses (no UUID match)")
        return None

    @property
    def ready(self) -> bool:
        return self.handle is not None

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def call(self, name: str, *args: Any, noted: bool = True) -> Any:
        """`pynvml.<name>(*args)`, or None when NVML or the function fails (saying why in the notes if `noted`)."""
        if self.pynvml is None:
            return None
        try:
            return getattr(self.pynvml, name)(*args)
        except Exception as error:  # NVMLError (not supported, driver too old) or AttributeError (old nvidia-ml-py)
            if noted:
                self.note(f"{name} failed ({type(error).__name__}: {error})")
            return None

    def device(self, name: str, *args: Any, noted: bool = True) -> Any:
        """An NVML device query on this GPU, or None."""
        return self.call(name, self.handle, *args, noted=noted) if self.ready else None

    def clock_event_reasons(self) -> int | None:
        """The current clock-event reasons bitmask (NVML >= 12.535 names it so; older: throttle reasons)."""
        if not self.ready:
            return None
        if hasattr(self.pynvml, "nvmlDeviceGetCurrentClocksEventReasons"):
            reasons = self.device("nvmlDeviceGetCurrentClocksEventReasons")
            if reasons is not None:
                return reasons
        return self.device("nvmlDeviceGetCurrentClocksThrottleReasons")


@dataclass
class Samples:
    """What the side thread read while the timed generations ran."""

    sm_clock_mhz: list[int] = field(default_factory=list)
    temperature_c: list[int] = field(default_factory=list)
    reasons: list[int] = field(default_factory=list)
    compute_processes: list[int] = field(default_factory=list)  # NVML's count, this process included


class EnergyTracker:
    """Energy windows around timed generations (`window`) and side-thread samples over all of them
    (`sampling`); `result` turns them into an `Energy`."""

    def __init__(self, cuda: bool, gpu_uuid: str | None, clock: Callable[[], float] = time.perf_counter) -> None:
        self.cuda = cuda
        self.nvml = Nvml(gpu_uuid) if cuda else None
        self.clock = clock
        self.windows: list[tuple[float, float]] = []  # (seconds, joules)
        self.wall_windows: list[tuple[float, float]] = []  # each window's (start, end) in Unix seconds
        self.samples = Samples()
        self.power_limit_w: float | None = None
        if self.nvml and self.nvml.ready:
            limit_mw = self.nvml.device("nvmlDeviceGetPowerManagementLimit")
            self.power_limit_w = limit_mw / 1000.0 if limit_mw is not None else None

    def _counter_on_update(self) -> tuple[int, float, float] | None:
        """(millijoules, tracker time, Unix time) just after the energy counter advanced (or after TICK_WAIT_S);
        None if NVML fails."""
        first = self.nvml.device("nvmlDeviceGetTotalEnergyConsumption") if self.nvml else None
        if first is None:
            return None
        waited_until = self.clock() + TICK_WAIT_S
        while True:
            value = self.nvml.device("nvmlDeviceGetTotalEnergyConsumption")
            now = self.clock()
            if value is None:
                return None
            if value != first or now >= waited_until:
                return value, now, time.time()
            time.sleep(0.002)

    @contextlib.contextmanager
    def window(self) -> Iterator[None]:
        """One timed generation: put the block's own CUDA synchronisation inside this one (the counter is read
        after the GPU finished)."""
        start = self._counter_on_update() if self.cuda else None
        yield
        end = self._counter_on_update() if start is not None else None
        if start is not None and end is not None and end[1] > start[1] and end[0] >= start[0]:  # no counter reset
            self.windows.append((end[1] - start[1], (end[0] - start[0]) / 1000.0))
            self.wall_windows.append((start[2], end[2]))

    @contextlib.contextmanager
    def sampling(self) -> Iterator[None]:
        """Sample SM clock, temperature, clock-event reasons and the GPU's processes every SAMPLE_INTERVAL_S while
        the block runs."""
        if not (self.nvml and self.nvml.ready):
            yield
            return
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                self._sample_once()
                stop.wait(SAMPLE_INTERVAL_S)

        thread = threading.Thread(target=sample, name="quantbench-energy-sampler", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(timeout=5)

    def _sample_once(self) -> None:
        nvml = self.nvml
        clock = nvml.device("nvmlDeviceGetClockInfo", nvml.pynvml.NVML_CLOCK_SM)
        if clock is not None:
            self.samples.sm_clock_mhz.append(clock)
        temperature = nvml.device("nvmlDeviceGetTemperature", nvml.pynvml.NVML_TEMPERATURE_GPU)
        if temperature is not None:
            self.samples.temperature_c.append(temperature)
        reasons = nvml.clock_event_reasons()
        if reasons is not None:
            self.samples.reasons.append(reasons)
        # not counted on a MIG slice; a failed listing (no permission, old driver) leaves the column null quietly
        processes = None if nvml.mig else nvml.device("nvmlDeviceGetComputeRunningProcesses", noted=False)
        if processes is not None:
            self.samples.compute_processes.append(len(processes))

    def result(self, step_median_s: float | None, idle_contexts: int = 0) -> Energy:
        """The cell's energy columns; `step_median_s` (the timed steps' median) gives energy_j_per_step.
        `idle_contexts` processes on the GPU are known to hold a CUDA context and do no GPU work (the slot's next
        cell's process, waiting): not counted as other processes."""
        if not self.cuda:
            return Energy(energy_note=CPU_NOTE)
        energy = Energy(gpu_power_limit_w=self.power_limit_w)
        notes = list(self.nvml.notes)
        if self.windows:
            seconds = [s for s, _ in self.windows]
            joules = [j for _, j in self.windows]
            total_s = sum(seconds)
            if total_s >= MIN_WINDOW_S:
                energy.avg_power_w = sum(joules) / total_s
                if statistics.median(seconds) >= MIN_WINDOW_S:
                    energy.energy_j_per_image = statistics.median(joules)
                else:
                    energy.energy_j_per_image = sum(joules) / len(joules)
                    notes.append(
                        f"generations shorter than {MIN_WINDOW_S:g} s: energy_j_per_image is the mean over"
                        f" {len(joules)} generations ({total_s:.2f} s in all)"
                    )
                if step_median_s is not None:
                    energy.energy_j_per_step = energy.avg_power_w * step_median_s
            else:
                notes.append(f"the timed generations lasted {total_s:.3f} s in all, too short for NVML's counter")
        elif self.nvml.ready:
            notes.append("no energy window was measured")
        samples = self.samples
        if samples.sm_clock_mhz:
            energy.gpu_sm_clock_mhz = float(statistics.median(samples.sm_clock_mhz))
        if samples.temperature_c:
            energy.gpu_temperature_c = float(max(samples.temperature_c))
        if samples.reasons:
            energy.gpu_throttle_reasons = throttle_reasons(samples.reasons)
        # NVML lists this process too (under the host's PID inside a container, so it is counted, not matched);
        # an empty list means NVML shows no processes here, not that none ran. An MPS server counts as one.
        if samples.compute_processes and max(samples.compute_processes) > 0:
            energy.gpu_other_processes = max(0, max(samples.compute_processes) - 1 - idle_contexts)
            if energy.gpu_other_processes:
                notes.append(
                    f"{energy.gpu_other_processes} other process(es) held this GPU during the timed generations:"
                    " the energy counter counts their work too"
                )
        energy.energy_note = "; ".join(notes) or None
        return energy


def throttle_reasons(bitmasks: list[int]) -> str:
    """The clock-event reasons other than idle seen in any sample, comma-separated; "none" without any."""
    seen = 0
    for bits in bitmasks:
        seen |= bits
    names = [name for bit, name in CLOCK_EVENT_REASONS.items() if seen & bit]
    unknown = seen & ~(sum(CLOCK_EVENT_REASONS) | 0x1)
    if unknown:
        names.append(f"0x{unknown:x}")
    return ",".join(names) or NO_REASON
