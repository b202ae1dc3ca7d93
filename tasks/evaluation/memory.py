"""Peak inference memory, measured in a fresh process per model.

Python allocation tracers miss what torch and ONNX Runtime allocate natively, so each
model is loaded in its own ``python -m tasks.evaluation.memory`` process, which reports
the rise of its peak resident set (``VmHWM``, reset through ``/proc/self/clear_refs``)
over its resident set with the model loaded, during one cold call at the large batch. The
first call is counted on purpose: arena and workspace growth is memory inference needs.
Runtimes that loaders import lazily are imported before the baseline reading.
"""

from __future__ import annotations

import gc
import importlib
import json
import logging
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tasks.evaluation.measure import load_for_measurement
from tasks.evaluation.timing import tile_to

log = logging.getLogger("slimflow.measure")

CODE_ROOT = Path(__file__).resolve().parents[2]  # the folder holding `tasks` and `models`
PROBE_MODULE = "tasks.evaluation.memory"


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
    """:func:`memory_probe` in a fresh ``python -m tasks.evaluation.memory`` process."""
    command = [
        sys.executable, "-m", PROBE_MODULE, str(model_dir.resolve()), str(prepared.resolve()),
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
    """``python -m tasks.evaluation.memory MODEL_DIR PREPARED_DIR --batch N --threads T``: JSON on stdout."""
    import argparse

    parser = argparse.ArgumentParser(prog=f"python -m {PROBE_MODULE}",
                                     description="peak inference memory of one model, as JSON")
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("prepared", type=Path)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    result = memory_probe(args.model_dir, args.prepared, args.batch, args.threads)
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
