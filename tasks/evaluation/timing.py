"""Latency and throughput, timed the same way for every model.

**Latency** is wall-clock time (``perf_counter_ns``) of one ``predict`` call at batch 1,
after warm-up, with the thread count fixed (``torch.set_num_threads`` and ONNX Runtime's
intra-op threads). Models are timed in interleaved rounds, in a shuffled order each
round, so a noisy moment on the machine hits every model alike; p95 on a shared machine
includes the moments the process was descheduled. ``cpu_time_p50_ms`` is the median
process CPU time of the same calls (COMPRESSION.md's method), which other processes
barely disturb. **Throughput** is samples per second of one call at a large batch,
median of the rounds. **Energy** (:mod:`tasks.core.energy`) is read after the rounds, per
model, over windows of back-to-back calls long enough for the meter (``energy_window_s``
of each kind): batch-1 calls, then throughput-batch calls; per 1,000 predictions of each.
A model's windows are read in ``energy_readings`` parts, in as many interleaved passes
over the models (a shuffled order each), so the readings of two models in one pass are
paired: what the machine did meanwhile hits both, and the spread of the paired
differences says how finely the run measures an energy saving (:func:`paired_saving_noise`).
"""

from __future__ import annotations

import gc
import math
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from tasks.core.classification import paired_standard_error
from tasks.core.energy import EnergyMeter

Predict = Callable[[np.ndarray], np.ndarray]

# Batch-1 calls timed per model in each interleaved round (each call timed on its own).
BATCH1_CALLS_PER_ROUND = 5


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


@dataclass
class Timing:
    """Raw timings of one model; summary() turns them into metrics."""

    batch1_ms: list[float] = field(default_factory=list)  # wall clock
    batch1_cpu_ms: list[float] = field(default_factory=list)  # process CPU time, all threads
    batch_s: list[float] = field(default_factory=list)
    batch_size: int = 1
    energy_j: float = 0.0  # over `predictions` predictions at the throughput batch
    predictions: int = 0
    batch1_energy_j: float = 0.0  # over `batch1_predictions` batch-1 calls
    batch1_predictions: int = 0
    energy_readings_per_1k_j: list[float] = field(default_factory=list)  # each throughput-batch reading, per 1k
    energy_step_per_1k_j: float = 0.0  # the meter's least step in those readings' units (the largest of them)

    def summary(self) -> dict[str, float]:
        median_batch_s = float(np.median(self.batch_s))
        return {
            "latency_p50_ms": percentile(self.batch1_ms, 50),
            "latency_p95_ms": percentile(self.batch1_ms, 95),
            "latency_mean_ms": float(np.mean(self.batch1_ms)),
            "cpu_time_p50_ms": percentile(self.batch1_cpu_ms, 50) if self.batch1_cpu_ms else math.nan,
            "throughput_sps": self.batch_size / median_batch_s if median_batch_s > 0 else math.nan,
            "energy_per_1k_j": 1000.0 * self.energy_j / self.predictions if self.predictions else math.nan,
            "energy_per_1k_batch1_j": (
                1000.0 * self.batch1_energy_j / self.batch1_predictions if self.batch1_predictions else math.nan
            ),
        }


def _warm_up(predict: Predict, singles: Sequence[np.ndarray], x_batch: np.ndarray, warmup: int) -> None:
    """Lazy initialisation, caches, allocator arenas: not the model's steady cost."""
    for i in range(max(warmup, 1)):
        predict(singles[i % len(singles)])
    predict(x_batch)


def _time_batch1(predict: Predict, singles: Sequence[np.ndarray], first: int, timing: Timing) -> None:
    """One untimed call, then ``BATCH1_CALLS_PER_ROUND`` single-sample calls, each timed."""
    # The untimed call: the model that ran before evicted this one's weights from the
    # caches (measured: the first call after a switch is 1.7-5x slower).
    predict(singles[first % len(singles)])
    for offset in range(BATCH1_CALLS_PER_ROUND):
        x = singles[(first + offset) % len(singles)]
        start, cpu_start = time.perf_counter_ns(), time.process_time_ns()
        predict(x)
        cpu_end, end = time.process_time_ns(), time.perf_counter_ns()
        timing.batch1_ms.append((end - start) / 1e6)
        timing.batch1_cpu_ms.append((cpu_end - cpu_start) / 1e6)


def _time_batch(predict: Predict, x_batch: np.ndarray, timing: Timing) -> None:
    """One large-batch call, timed."""
    start = time.perf_counter_ns()
    predict(x_batch)
    timing.batch_s.append((time.perf_counter_ns() - start) / 1e9)


def calls_for(window_s: float, seconds_per_call: float, least: int = 1, most: int = 100_000) -> int:
    """Back-to-back calls that fill ``window_s`` at ``seconds_per_call`` each."""
    if not math.isfinite(seconds_per_call) or seconds_per_call <= 0:
        return most
    return int(min(most, max(least, math.ceil(window_s / seconds_per_call))))


def _measure_energy(
    predict: Predict, singles: Sequence[np.ndarray], x_batch: np.ndarray, meter: EnergyMeter, window_s: float,
    timing: Timing,
) -> None:
    """Energy of back-to-back batch-1 calls, then of throughput-batch calls, each over ~``window_s``;
    the second reading is also kept on its own (``energy_readings_per_1k_j``)."""
    calls = calls_for(window_s, float(np.median(timing.batch1_ms)) / 1e3, least=BATCH1_CALLS_PER_ROUND)
    before = meter.read()
    for i in range(calls):
        predict(singles[i % len(singles)])
    timing.batch1_energy_j += (meter.read() - before).total
    timing.batch1_predictions += calls
    calls = calls_for(window_s, float(np.median(timing.batch_s)))
    before = meter.read()
    for _ in range(calls):
        predict(x_batch)
    used, predictions = (meter.read() - before).total, calls * len(x_batch)
    timing.energy_j += used
    timing.predictions += predictions
    timing.energy_readings_per_1k_j.append(1000.0 * used / predictions)
    if math.isfinite(meter.resolution_j):
        timing.energy_step_per_1k_j = max(timing.energy_step_per_1k_j, 1000.0 * meter.resolution_j / predictions)


def paired_saving_noise(reference: Sequence[float], readings: Sequence[float],
                        reference_step: float = 0.0, step: float = 0.0) -> float:
    """One standard error of an energy saving (``reference`` - ``readings``, per 1k
    predictions), from readings taken in the same passes: with ``d_i`` the difference of
    the two models' readings in pass ``i``, ``sd(d) / sqrt(n)``. NaN with fewer than two
    pairs (one reading per model measures no spread).

    A meter that reads in steps (``reference_step``, ``step``: the CPU estimate's clock
    tick, in the readings' units) is off by up to a step either way in each reading
    (variance step² / 6), so the result is never below ``sqrt((reference_step² + step²) /
    6 / n)``: five readings of a 0.1 s window often show the same number of ticks, and
    their spread alone would then say the saving is exact."""
    n = min(len(reference), len(readings))
    spread = paired_standard_error(readings[:n], reference[:n])
    if math.isnan(spread):
        return spread
    return max(spread, math.sqrt((reference_step ** 2 + step ** 2) / 6.0 / n))


def time_models(
    predictors: Mapping[str, Predict],
    x_single: np.ndarray,
    x_batch: np.ndarray,
    repeats: int,
    warmup: int,
    meter: EnergyMeter,
    seed: int = 0,
    energy_window_s: float = 0.5,
    energy_readings: int = 1,
) -> dict[str, Timing]:
    """Latency at batch 1 and throughput at ``len(x_batch)``, interleaved across models; then energy.

    ``x_single`` holds samples fed one at a time (cycled); ``x_batch`` is the large batch.
    Each of ``repeats`` rounds times every model in a freshly shuffled order: one untimed
    call, ``BATCH1_CALLS_PER_ROUND`` single-sample calls each timed on its own (wall clock,
    and process CPU time, which a busy machine disturbs less), then - in another shuffled
    order - one large-batch call. After the rounds, each model's energy is read over
    ``energy_window_s`` of batch-1 calls and as long of large-batch calls (a reading costs
    milliseconds: one per call would measure the meter), in ``energy_readings`` passes over
    the models, each a shuffled order and a part of the window.
    """
    names = list(predictors)
    timings = {name: Timing(batch_size=len(x_batch)) for name in names}
    singles = [np.ascontiguousarray(x_single[i:i + 1]) for i in range(len(x_single))]
    x_batch = np.ascontiguousarray(x_batch)
    for name in names:
        _warm_up(predictors[name], singles, x_batch, warmup)
    rng = random.Random(seed)
    order = list(names)
    sample = 0
    gc_was_enabled = gc.isenabled()
    gc.disable()  # a collection in the middle of a call is noise, not the model
    try:
        for _ in range(repeats):
            rng.shuffle(order)
            for name in order:
                _time_batch1(predictors[name], singles, sample, timings[name])
                sample += BATCH1_CALLS_PER_ROUND
            rng.shuffle(order)
            for name in order:
                _time_batch(predictors[name], x_batch, timings[name])
        for _ in range(energy_readings):
            rng.shuffle(order)
            for name in order:
                _measure_energy(predictors[name], singles, x_batch, meter, energy_window_s / energy_readings,
                                timings[name])
    finally:
        if gc_was_enabled:
            gc.enable()
    return timings


def tile_to(x: np.ndarray, rows: int) -> np.ndarray:
    """``rows`` samples taken from ``x`` in order, repeating it when it is shorter."""
    index = np.arange(rows) % len(x)
    return np.ascontiguousarray(x[index])
