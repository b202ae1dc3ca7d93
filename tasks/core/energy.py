"""Energy meters for every stage that computes: CodeCarbon's offline tracker, per process.

Each process that computes (a Horovod worker, the compress and evaluate stages) holds one
:class:`EnergyMeter`: a cumulative reading in joules, subtracted around the work it covers.
It reads CodeCarbon's ``OfflineEmissionsTracker`` in ``process`` mode:

- **CPU**: where RAPL counters are readable (``/sys/class/powercap/intel-rapl``), the
  package energy, measured (``rapl``; the whole package, other processes included, so on a
  host with several ranks only local rank 0 counts it). Elsewhere CodeCarbon *estimates*:
  the process's CPU time (all threads, and its children) x the CPU model's TDP from its
  table / the host's threads (``estimate (...)``, the method named in the label). The
  estimate therefore grows with the work the process does, not with the time it waits.
- **GPU**: the NVML energy counter of the worker's own GPU (``nvml``, measured), so summing
  the ranks counts every GPU once.
- Memory is not counted: RAPL's DRAM domain is not read, and CodeCarbon's memory estimate is
  a constant power per process (at least 10 W) over wall-clock time, not a measure of work.

Setting a tracker up takes a while (CodeCarbon loads its TDP table and, unless told, asks
py-cpuinfo for the CPU model: :func:`know_cpu_model`), so it starts on a background thread
when the meter is made, and ``codecarbon`` is imported only there: a process that never
measures pays nothing.
CO2e is joules x the grid intensity (``evaluate.grid_co2e_g_per_kwh``): :func:`co2e_g`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("slimflow.energy")

J_PER_KWH = 3.6e6
RAPL_ROOT = Path("/sys/class/powercap")


@dataclass(frozen=True)
class Joules:
    """Energy by where it was drawn; ``total`` is what slimflow reports."""

    cpu: float = 0.0
    gpu: float = 0.0

    @property
    def total(self) -> float:
        return self.cpu + self.gpu

    def __add__(self, other: Joules) -> Joules:
        return Joules(self.cpu + other.cpu, self.gpu + other.gpu)

    def __sub__(self, other: Joules) -> Joules:
        return Joules(self.cpu - other.cpu, self.gpu - other.gpu)

    def as_list(self) -> list[float]:
        return [self.cpu, self.gpu]


def co2e_g(joules: float, grid_co2e_g_per_kwh: float) -> float:
    """Grams of CO2-equivalent for ``joules`` at a grid intensity in g/kWh."""
    return joules / J_PER_KWH * grid_co2e_g_per_kwh


class EnergyMeter:
    """This process's energy since the meter started, in joules (:meth:`read`).

    ``gpu_index``: the GPU this process computes on (its NVML counter is read); None for
    a process that computes on the CPU. ``count_cpu=False`` leaves the CPU out (another
    process on the host counts the shared RAPL package). Intervals spent in
    :meth:`excluded` do not count: the stage processes leave out the Horovod workers and
    forked probes they start, which CodeCarbon's process mode would otherwise partly add
    (it sums the children's CPU time too).
    """

    def __init__(self, gpu_index: int | None = None, count_cpu: bool = True) -> None:
        self.gpu_index = gpu_index
        self.count_cpu = count_cpu
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._tracker = None
        self._error: BaseException | None = None
        self._reads = 0
        self._total = Joules()
        self._excluded = Joules()
        self._credited = Joules()
        self._credited_sources: set[str] = set()
        self._cpu_label = self._gpu_label = ""
        self._resolution_j = math.nan
        self._thread = threading.Thread(target=self._set_up, name="energy-meter-setup", daemon=True)
        self._thread.start()

    def _set_up(self) -> None:
        try:
            know_cpu_model()
            from codecarbon import OfflineEmissionsTracker

            # CodeCarbon logs its set-up at INFO/WARNING before it applies log_level.
            logging.getLogger("codecarbon").setLevel(logging.ERROR)

            tracker = OfflineEmissionsTracker(
                country_iso_code="USA",  # required offline; slimflow computes CO2e from its own parameter
                tracking_mode="process",
                gpu_ids=[self.gpu_index] if self.gpu_index is not None else None,
                output_methods=[],
                measure_power_secs=3600,  # readings come from read(), not from its scheduler
                allow_multiple_runs=True,  # every Horovod rank on a host has its own
                log_level="error",
            )
            tracker.start_task("r0")
            self._tracker = tracker
            self._cpu_label, self._gpu_label, self._resolution_j = _labels(tracker, self.gpu_index is not None)
        except Exception as err:  # noqa: BLE001 - energy is reported as unknown; the work goes on
            self._error = err
            log.warning("energy meter: CodeCarbon could not start (%s); energy is not measured", err)
        finally:
            self._ready.set()

    def _wait(self) -> bool:
        """Whether the tracker runs (after its set-up); a meter that could not start reads NaN."""
        self._ready.wait()
        return self._tracker is not None

    def _raw(self) -> Joules:
        """Everything since the start, exclusions included."""
        if not self._wait():
            return Joules(math.nan, math.nan)  # unknown, and labelled so: never a made-up 0
        with self._lock:
            data = self._tracker.stop_task()
            self._reads += 1
            self._tracker.start_task(f"r{self._reads}")
            if data is not None:  # None: CodeCarbon had no task running (it logged why)
                cpu = data.cpu_energy * J_PER_KWH if self.count_cpu else 0.0
                gpu = data.gpu_energy * J_PER_KWH if self.gpu_index is not None else 0.0
                self._total = self._total + Joules(max(cpu, 0.0), max(gpu, 0.0))
            return self._total

    def read(self) -> Joules:
        """Joules since the meter started, less the excluded intervals, plus what was credited."""
        return self._raw() - self._excluded + self._credited

    def credit(self, joules: Joules, source: str) -> None:
        """Add energy that processes this one started measured themselves (the Horovod workers)."""
        self._credited = self._credited + joules
        self._credited_sources.add(source)

    @property
    def credited(self) -> Joules:
        """Everything credited so far (subtract two values for an interval)."""
        return self._credited

    def sources(self) -> str:
        """This process's label and those of the energy credited to it, ``; ``-joined."""
        return "; ".join(sorted({self.source} | self._credited_sources))

    @contextlib.contextmanager
    def excluded(self) -> Iterator[None]:
        """Leave what happens inside (child processes that measure themselves) out of :meth:`read`."""
        before = self._raw()
        try:
            yield
        finally:
            self._excluded = self._excluded + (self._raw() - before)

    @property
    def source(self) -> str:
        """``rapl``, ``nvml``, ``estimate (<method>)``, or a GPU and a CPU part joined by ``+``."""
        if not self._wait():
            return f"unavailable (CodeCarbon could not start: {self._error})"
        cpu = self._cpu_label if self.count_cpu else "rapl (counted by local rank 0)"
        return f"{self._gpu_label} (GPU {self.gpu_index}) + {cpu} (CPU)" if self._gpu_label else cpu

    @property
    def resolution_j(self) -> float:
        """The least step a reading moves by, in joules: the CPU estimate counts CPU time in
        the kernel's clock ticks (10 ms: 0.04 J at 4 W per thread), so a 0.1 s window reads
        0.40 or 0.44 J; 0 for the hardware counters (micro- or millijoules); NaN when the
        meter could not start."""
        return self._resolution_j if self._wait() else math.nan

    @property
    def estimated(self) -> bool:
        return "estimate" in self.source

    def close(self) -> None:
        self._ready.wait()
        if self._tracker is not None:
            with self._lock, contextlib.suppress(Exception):
                self._tracker.stop_task()
                self._tracker.stop()


def _labels(tracker: object, want_gpu: bool) -> tuple[str, str, float]:
    """How CodeCarbon set itself up: the CPU's label, (where a GPU counter is read) ``nvml``,
    and the step its readings move by in joules (the estimate's: a busy thread's watts for
    one clock tick of CPU time; 0 for the counters).

    CodeCarbon has no public call for this; its hardware objects' attributes are read here
    only (``codecarbon`` is pinned), and an attribute it renames gives a vaguer label, not an error.
    """
    hardware = getattr(tracker, "_hardware", [])
    cpu = next((h for h in hardware if type(h).__name__ == "CPU"), None)
    mode = getattr(cpu, "_mode", None)
    resolution_j = 0.0
    if mode == "intel_rapl":
        cpu_label = "rapl"
    elif mode == "cpu_load":
        tdp, threads = float(getattr(cpu, "_tdp", 0) or 0), int(getattr(cpu, "_cpu_count", 0) or 0)
        resolution_j = tdp / threads / os.sysconf("SC_CLK_TCK") if tdp and threads else math.nan
        model = getattr(cpu, "_model", "unknown CPU")
        cpu_label = (
            f"estimate (CodeCarbon: process CPU time x {tdp / threads:g} W per busy thread = "
            f"TDP {tdp:g} W of '{model}' / {threads} threads)" if tdp and threads
            else f"estimate (CodeCarbon cpu_load, '{model}')"
        )
    else:
        cpu_label = f"estimate (CodeCarbon {mode or 'constant'} mode)"
    gpu = any(type(h).__name__ == "GPU" for h in hardware)
    return cpu_label, ("nvml" if want_gpu and gpu else ""), resolution_j


def rapl_readable(root: Path = RAPL_ROOT) -> bool:
    """Whether this host's RAPL package counters can be read (then CodeCarbon measures the CPU)."""
    for path in root.glob("intel-rapl:*/energy_uj"):
        try:
            int(path.read_text().strip())
        except (OSError, ValueError):
            continue
        return True
    return False


CPUINFO = Path("/proc/cpuinfo")


def cpu_model_from_kernel(cpuinfo: Path = CPUINFO) -> str | None:
    """The CPU's model as the kernel names it (``model name`` in ``/proc/cpuinfo``: on x86 the
    CPUID brand string, which py-cpuinfo reports as ``brand_raw``; elsewhere py-cpuinfo reads
    this same field); None where the kernel names none (many ARM kernels) or there is no file."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and value.strip():
            return value.strip()
    return None


_CPU_MODEL_LOCK = threading.Lock()  # meters set up on threads of their own


def remember_cpu_model(model: str) -> None:
    """Put ``model`` into CodeCarbon's CPU model cache (its ``detect_cpu_model``, which asks
    ``cpuinfo.get_cpu_info()`` once per process)."""
    import cpuinfo
    from codecarbon.core.util import detect_cpu_model

    with _CPU_MODEL_LOCK:
        asked = cpuinfo.get_cpu_info
        cpuinfo.get_cpu_info = lambda: {"brand_raw": model}
        try:
            detect_cpu_model()
        finally:
            cpuinfo.get_cpu_info = asked


def know_cpu_model() -> bool:
    """Give CodeCarbon the CPU model from the kernel, if it has none yet, so that it does not
    ask py-cpuinfo: py-cpuinfo measures the clock in a child process for 1 s and spins a core
    while it waits for it (``while p.is_alive(): p.join(0)``; 1.0 CPU-s measured). Returns
    whether CodeCarbon now knows the model without asking; where the kernel names none,
    CodeCarbon asks py-cpuinfo as it always did."""
    from codecarbon.core.util import detect_cpu_model

    if detect_cpu_model.cache_info().currsize:
        return True
    model = cpu_model_from_kernel()
    if model is None:
        return False
    remember_cpu_model(model)
    return True


_PROCESS_METER: EnergyMeter | None = None


def process_meter(gpu_index: int | None = None, count_cpu: bool = True) -> EnergyMeter:
    """This process's one meter, made (and its set-up started) on the first call."""
    global _PROCESS_METER
    if _PROCESS_METER is None:
        _PROCESS_METER = EnergyMeter(gpu_index, count_cpu)
    return _PROCESS_METER


def credit_children(joules: Joules, source: str) -> None:
    """Energy that child processes measured themselves, added to this process's meter (if any)."""
    if _PROCESS_METER is not None:
        _PROCESS_METER.credit(joules, source)


@contextlib.contextmanager
def children_excluded() -> Iterator[None]:
    """Around work done by child processes that measure themselves (or are not measured):
    left out of this process's meter, if it has one."""
    if _PROCESS_METER is None:
        yield
        return
    with _PROCESS_METER.excluded():
        yield
