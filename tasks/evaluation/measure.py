"""How a model is loaded for measurement and predicts in batches (its predictions are scored by
:func:`tasks.core.classification.classification_metrics`).

Everything here is a plain function of a model folder, a loaded model
(:class:`tasks.core.model_files.LoadedModel`) or arrays; the cost figures live beside it:
:mod:`~tasks.evaluation.timing` (latency, throughput, energy), :mod:`~tasks.core.energy`,
:mod:`~tasks.evaluation.memory` (peak inference memory, a forked child per model) and
:mod:`~tasks.evaluation.flops`. :mod:`tasks.evaluation.benchmark` measures every model
with them, the baseline and each variant alike.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

Predict = Callable[[np.ndarray], np.ndarray]


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
