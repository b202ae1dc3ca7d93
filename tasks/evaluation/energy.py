"""Energy meters: a cumulative reading in joules, subtracted around the calls it covers.

Energy per 1,000 predictions is read over the large-batch calls from RAPL
(``/sys/class/powercap/intel-rapl*/energy_uj``, the whole CPU package) where it is
readable, from NVML where the model runs on a GPU, and otherwise estimated as process
CPU time x a stated watts-per-core figure (``energy_source: estimate``). The default
figure, 10 W per busy core (``evaluate.estimate_cpu_watts_per_core``), is a server
CPU's package power over its cores rounded up (e.g. 280 W / 32 cores = 8.75 W): an
upper-end estimate that ranks models fairly (same figure for all), not a measurement.
RAPL counts the whole package, other processes included: compare models, not runs.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

log = logging.getLogger("slimflow.measure")

RAPL_ROOT = Path("/sys/class/powercap")


class EnergyMeter:
    """A cumulative energy reading in joules; subtract two readings for a measurement."""

    source = "none"

    def read(self) -> float:
        raise NotImplementedError

    def describe(self) -> str:
        return self.source


class RaplMeter(EnergyMeter):
    """Intel/AMD RAPL package counters (the whole package: other processes count too)."""

    source = "rapl"

    def __init__(self, files: list[Path]) -> None:
        self.files = files
        self.ranges = [self._max_range(f) for f in files]
        self.last = [self._raw(f) for f in files]
        self.total_uj = 0

    @staticmethod
    def _raw(path: Path) -> int:
        return int(path.read_text().strip())

    @staticmethod
    def _max_range(path: Path) -> int:
        try:
            return int((path.parent / "max_energy_range_uj").read_text().strip())
        except (OSError, ValueError):
            return 2**32

    def read(self) -> float:
        for index, path in enumerate(self.files):
            now = self._raw(path)
            delta = now - self.last[index]
            if delta < 0:  # the counter wrapped around
                delta += self.ranges[index]
            self.total_uj += delta
            self.last[index] = now
        return self.total_uj / 1e6

    def describe(self) -> str:
        return f"rapl ({len(self.files)} package domain(s), whole package)"


class NvmlMeter(EnergyMeter):
    """NVIDIA GPU energy counters (millijoules since driver load), all visible GPUs."""

    source = "nvml"

    def __init__(self) -> None:
        import pynvml  # nvidia-ml-py

        pynvml.nvmlInit()
        self._nvml = pynvml
        self.handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        self.read()

    def read(self) -> float:
        return sum(self._nvml.nvmlDeviceGetTotalEnergyConsumption(h) for h in self.handles) / 1e3


class CpuTimeEstimate(EnergyMeter):
    """Process CPU time (all threads) x a stated power per busy core: an estimate."""

    source = "estimate"

    def __init__(self, watts_per_core: float) -> None:
        self.watts_per_core = watts_per_core

    def read(self) -> float:
        return time.process_time() * self.watts_per_core

    def describe(self) -> str:
        return f"estimate (process CPU time x {self.watts_per_core:g} W per busy core)"


def rapl_files(root: Path = RAPL_ROOT) -> list[Path]:
    """Readable package-level RAPL counters (``intel-rapl:N``, not their sub-domains)."""
    files = []
    for folder in sorted(root.glob("intel-rapl:*")):
        if folder.name.count(":") != 1:
            continue
        path = folder / "energy_uj"
        try:
            int(path.read_text().strip())
        except (OSError, ValueError):
            continue
        files.append(path)
    return files


def select_energy_meter(watts_per_core: float, device: str = "cpu", rapl_root: Path = RAPL_ROOT) -> EnergyMeter:
    """RAPL for CPU inference where readable, NVML for GPU inference, otherwise the estimate."""
    if device == "cpu" and (files := rapl_files(rapl_root)):
        return RaplMeter(files)
    if device.startswith("cuda"):
        try:
            return NvmlMeter()
        except Exception as err:  # no pynvml, no driver, no permission
            log.info("NVML energy counters unavailable (%s); estimating", err)
    return CpuTimeEstimate(watts_per_core)
