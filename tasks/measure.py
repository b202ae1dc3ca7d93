"""How a model is measured: quality, cost and speed, the same way for every model.

Everything here is a plain function of a loaded model (:class:`tasks.core.model_files.LoadedModel`)
and arrays; :mod:`tasks.evaluate` calls it for the baseline and every variant.

Measurement choices, and why:

- **Latency** is wall-clock time (``perf_counter_ns``) of one ``predict`` call at batch 1,
  after warm-up, with the thread count fixed (``torch.set_num_threads`` and ONNX
  Runtime's intra-op threads). Models are timed in interleaved rounds, in a shuffled
  order each round, so a noisy moment on the machine hits every model alike; p95 on a
  shared machine includes the moments the process was descheduled. ``cpu_time_p50_ms``
  is the median process CPU time of the same calls (COMPRESSION.md's method), which
  other processes barely disturb.
- **Throughput** is samples per second of one call at a large batch, median of the rounds.
- **Energy** per 1,000 predictions is read over the large-batch calls from RAPL
  (``/sys/class/powercap/intel-rapl*/energy_uj``, the whole CPU package) where it is
  readable, from NVML where the model runs on a GPU, and otherwise estimated as process
  CPU time x a stated watts-per-core figure (``energy_source: estimate``). The default
  figure, 10 W per busy core (``evaluate.estimate_cpu_watts_per_core``), is a server
  CPU's package power over its cores rounded up (e.g. 280 W / 32 cores = 8.75 W): an
  upper-end estimate that ranks models fairly (same figure for all), not a measurement.
  RAPL counts the whole package, other processes included: compare models, not runs.
- **Peak inference memory** is measured in a fresh subprocess per model (python
  allocation tracers miss what torch and ONNX Runtime allocate natively): the rise of the
  process's peak resident set (``VmHWM``, reset through ``/proc/self/clear_refs``) over
  its resident set with the model loaded, during one cold call at the large batch. The
  first call is counted on purpose: arena and workspace growth is memory inference needs.
  Runtimes that loaders import lazily are imported before the baseline reading.
- **FLOPs** per sample come from ``torch.utils.flop_counter.FlopCounterMode`` on a
  torch module at batch 1 (one multiply-add = 2 FLOPs; CPU LSTMs, a fused kernel the
  counter does not see, are added from their shapes). ONNX and quantized models report
  their fp32 parent's count (same layers; see ``tasks.evaluate._flops``), or NaN.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import json
import logging
import math
import os
import random
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("slimflow.measure")

Predict = Callable[[np.ndarray], np.ndarray]

# Batch-1 calls timed per model in each interleaved round (each call timed on its own).
BATCH1_CALLS_PER_ROUND = 5
RAPL_ROOT = Path("/sys/class/powercap")
CODE_ROOT = Path(__file__).resolve().parent.parent  # the folder holding `tasks` and `models`


# ---------------------------------------------------------------------------- loading
def load_for_measurement(folder: Path, threads: int = 1) -> Any:
    """Load a model folder in its runtime, ONNX Runtime sessions with ``threads`` intra-op
    threads, so torch and ORT run with equal threads."""
    from tasks.compression.loading import load_model_dir

    return load_model_dir(folder, threads)


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Fix torch's intra-op thread count for the block, then restore it."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# ---------------------------------------------------------------------------- quality
def safe_key(text: str) -> str:
    """A class name as a metric-key fragment MLflow and DVC both accept."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", str(text)) or "_"


def predict_in_batches(predict: Predict, x: np.ndarray, batch: int) -> np.ndarray:
    """Logits for all of ``x`` in calls of exactly ``batch`` rows (the last one padded).

    Only two batch sizes ever reach a model (1 and ``batch``), which shape-specialised
    programs (compiled / frozen) need.
    """
    outputs = []
    for start in range(0, len(x), batch):
        chunk = x[start:start + batch]
        rows = len(chunk)
        if rows < batch and len(x) >= batch:
            chunk = np.concatenate([chunk, x[: batch - rows]])
        outputs.append(np.asarray(predict(np.ascontiguousarray(chunk)))[:rows])
    return np.concatenate(outputs)


def classification_metrics(
    y_true: np.ndarray, y_pred: np.ndarray, class_names: Sequence[str]
) -> tuple[dict[str, float], np.ndarray]:
    """Accuracy, macro F1, per-class precision and recall, and the confusion matrix."""
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

    labels = list(range(len(class_names)))
    precision, recall, _, _ = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0
    )
    metrics = {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
    }
    for index, name in enumerate(class_names):
        metrics[f"precision_{safe_key(name)}"] = float(precision[index])
        metrics[f"recall_{safe_key(name)}"] = float(recall[index])
    return metrics, confusion_matrix(y_true, y_pred, labels=labels)


# ---------------------------------------------------------------------------- FLOPs
def _recurrent_flops(rnn: Any, x: Any) -> float:
    """Matrix-multiply FLOPs of an nn.LSTM/GRU/RNN over input ``x`` (what GRU's decomposition counts)."""
    gates = {"LSTM": 4, "GRU": 3}.get(type(rnn).__name__, 1)
    if x.dim() == 2:  # unbatched (T, F)
        steps, batch = x.shape[0], 1
    else:
        steps, batch = (x.shape[1], x.shape[0]) if rnn.batch_first else (x.shape[0], x.shape[1])
    directions = 2 if rnn.bidirectional else 1
    total = 0.0
    for layer in range(rnn.num_layers):
        inputs = rnn.input_size if layer == 0 else rnn.hidden_size * directions
        total += 2.0 * steps * batch * directions * gates * rnn.hidden_size * (inputs + rnn.hidden_size)
    return total


def count_flops(module: Any, example: np.ndarray) -> float | None:
    """FLOPs of one forward pass on ``example`` (None when nothing countable ran).

    FlopCounterMode counts the matrix multiplies torch dispatches; CPU LSTMs run as one
    fused kernel it does not see, so recurrent layers it counted nothing for are added
    from their shapes (the same matrix-multiply count it gives a GRU).
    """
    import torch
    from torch import nn
    from torch.utils.flop_counter import FlopCounterMode

    if module is None:
        return None
    recurrent_inputs: dict[str, Any] = {}

    def remember(name: str) -> Callable[..., None]:
        def hook(rnn: Any, args: tuple[Any, ...], output: Any) -> None:  # returns None: output unchanged
            recurrent_inputs.setdefault(name, (rnn, args[0]))
        return hook

    hooks = []
    if isinstance(module, nn.Module):
        for name, child in module.named_modules():
            if isinstance(child, nn.RNNBase):
                hooks.append(child.register_forward_hook(remember(name)))
    try:
        counter = FlopCounterMode(display=False)
        with torch.inference_mode(), counter:
            module(torch.from_numpy(np.ascontiguousarray(example, dtype=np.float32)))
        total = float(counter.get_total_flops())
        counts = counter.get_flop_counts()
    except Exception as err:  # an exotic program the counter cannot follow
        log.warning("FLOPs not counted: %s", err)
        return None
    finally:
        for hook in hooks:
            hook.remove()
    root = type(module).__name__
    for name, (rnn, x) in recurrent_inputs.items():
        if not sum(counts.get(f"{root}.{name}" if name else root, {}).values()):
            total += _recurrent_flops(rnn, x)
    return total if total > 0 else None


# ---------------------------------------------------------------------------- energy
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


# ---------------------------------------------------------------------------- timing
def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


@dataclass
class Timing:
    """Raw timings of one model; summary() turns them into metrics."""

    batch1_ms: list[float] = field(default_factory=list)  # wall clock
    batch1_cpu_ms: list[float] = field(default_factory=list)  # process CPU time, all threads
    batch_s: list[float] = field(default_factory=list)
    batch_size: int = 1
    energy_j: float = 0.0
    predictions: int = 0

    def summary(self) -> dict[str, float]:
        median_batch_s = float(np.median(self.batch_s))
        return {
            "latency_p50_ms": percentile(self.batch1_ms, 50),
            "latency_p95_ms": percentile(self.batch1_ms, 95),
            "latency_mean_ms": float(np.mean(self.batch1_ms)),
            "cpu_time_p50_ms": percentile(self.batch1_cpu_ms, 50) if self.batch1_cpu_ms else math.nan,
            "throughput_sps": self.batch_size / median_batch_s if median_batch_s > 0 else math.nan,
            "energy_per_1k_j": 1000.0 * self.energy_j / self.predictions if self.predictions else math.nan,
        }


def time_models(
    predictors: Mapping[str, Predict],
    x_single: np.ndarray,
    x_batch: np.ndarray,
    repeats: int,
    warmup: int,
    meter: EnergyMeter,
    seed: int = 0,
) -> dict[str, Timing]:
    """Latency at batch 1 and throughput at ``len(x_batch)``, interleaved across models.

    ``x_single`` holds samples fed one at a time (cycled); ``x_batch`` is the large batch.
    Each of ``repeats`` rounds times every model in a freshly shuffled order: one untimed
    call, ``BATCH1_CALLS_PER_ROUND`` single-sample calls each timed on its own (wall clock,
    and process CPU time, which a busy machine disturbs less), then - in another shuffled
    order - one large-batch call over which energy is read.
    """
    names = list(predictors)
    timings = {name: Timing(batch_size=len(x_batch)) for name in names}
    singles = [np.ascontiguousarray(x_single[i:i + 1]) for i in range(len(x_single))]
    x_batch = np.ascontiguousarray(x_batch)
    for name in names:  # warm-up: lazy initialisation, caches, allocator arenas
        for i in range(max(warmup, 1)):
            predictors[name](singles[i % len(singles)])
        predictors[name](x_batch)
    rng = random.Random(seed)
    order = list(names)
    sample = 0
    gc_was_enabled = gc.isenabled()
    gc.disable()  # a collection in the middle of a call is noise, not the model
    try:
        for _ in range(repeats):
            rng.shuffle(order)
            for name in order:
                predict = predictors[name]
                # One untimed call: the model that ran before evicted this one's weights
                # from the caches (measured: the first call after a switch is 1.7-5x slower).
                predict(singles[sample % len(singles)])
                for _ in range(BATCH1_CALLS_PER_ROUND):
                    x = singles[sample % len(singles)]
                    sample += 1
                    start, cpu_start = time.perf_counter_ns(), time.process_time_ns()
                    predict(x)
                    cpu_end, end = time.process_time_ns(), time.perf_counter_ns()
                    timings[name].batch1_ms.append((end - start) / 1e6)
                    timings[name].batch1_cpu_ms.append((cpu_end - cpu_start) / 1e6)
            rng.shuffle(order)
            for name in order:
                energy_before = meter.read()
                start = time.perf_counter_ns()
                predictors[name](x_batch)
                elapsed = (time.perf_counter_ns() - start) / 1e9
                timings[name].energy_j += meter.read() - energy_before
                timings[name].batch_s.append(elapsed)
                timings[name].predictions += len(x_batch)
    finally:
        if gc_was_enabled:
            gc.enable()
    return timings


def tile_to(x: np.ndarray, rows: int) -> np.ndarray:
    """``rows`` samples taken from ``x`` in order, repeating it when it is shorter."""
    index = np.arange(rows) % len(x)
    return np.ascontiguousarray(x[index])


# ---------------------------------------------------------------------------- memory
def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmHWM in /proc/self/status")


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # Linux >= 4.0: reset the peak resident set to the current one
        return True
    except OSError:
        return False


def memory_probe(model_dir: Path, prepared: Path, batch: int, threads: int) -> dict[str, Any]:
    """Run inside a fresh process: resident memory of loading, and the peak of one cold call."""
    import torch

    from tasks.data import load_split

    torch.set_num_threads(threads)
    # Import the runtimes loaders import lazily now, so their code is not counted as the model's.
    for module in ("onnxruntime", "tasks.compression.formats", "tasks.compression.quantization"):
        try:
            importlib.import_module(module)
        except ImportError:
            pass
    x = tile_to(load_split(prepared, "test").x, batch)
    gc.collect()
    before_load = _rss_bytes()
    loaded = load_for_measurement(model_dir, threads)
    gc.collect()
    loaded_rss = _rss_bytes()
    reset = _reset_peak_rss()
    if not reset:  # without a reset, the peak since start-up (imports) would be read
        return {"load_mb": (loaded_rss - before_load) / 2**20, "peak_mb": None, "method": "unavailable"}
    loaded.predict(x)
    peak = _peak_rss_bytes()
    return {
        "load_mb": max(0, loaded_rss - before_load) / 2**20,
        "peak_mb": max(0, peak - loaded_rss) / 2**20,
        "method": "vmhwm-delta",
    }


def measure_memory(
    model_dir: Path, prepared: Path, batch: int, threads: int, timeout_s: float = 300.0
) -> dict[str, Any]:
    """:func:`memory_probe` in a fresh ``python -m tasks.measure memory`` process."""
    command = [
        sys.executable, "-m", "tasks.measure", "memory", str(model_dir.resolve()), str(prepared.resolve()),
        "--batch", str(batch), "--threads", str(threads),
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(CODE_ROOT), os.environ.get("PYTHONPATH")]))}
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, env=env, cwd=CODE_ROOT)
    except subprocess.TimeoutExpired:
        log.warning("%s: memory probe timed out after %.0f s", model_dir.name, timeout_s)
        return {"load_mb": None, "peak_mb": None, "method": "failed"}
    if done.returncode != 0:
        log.warning("%s: memory probe failed: %s", model_dir.name, done.stderr.strip()[-500:])
        return {"load_mb": None, "peak_mb": None, "method": "failed"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure_memory_all(
    model_dirs: Mapping[str, Path], prepared: Path, batch: int, threads: int
) -> dict[str, dict[str, Any]]:
    """One fresh process per model, a few at a time (memory is not timing: parallel is fine)."""
    from concurrent.futures import ThreadPoolExecutor

    workers = max(1, min(len(model_dirs), (os.cpu_count() or 1)))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {
            name: pool.submit(measure_memory, folder, prepared, batch, threads) for name, folder in model_dirs.items()
        }
        return {name: future.result() for name, future in futures.items()}


def main(argv: list[str] | None = None) -> int:
    """``python -m tasks.measure memory MODEL_DIR PREPARED_DIR --batch N --threads T``."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m tasks.measure")
    sub = parser.add_subparsers(dest="command", required=True)
    memory = sub.add_parser("memory", help="peak inference memory of one model, as JSON")
    memory.add_argument("model_dir", type=Path)
    memory.add_argument("prepared", type=Path)
    memory.add_argument("--batch", type=int, default=256)
    memory.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    result = memory_probe(args.model_dir, args.prepared, args.batch, args.threads)
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
