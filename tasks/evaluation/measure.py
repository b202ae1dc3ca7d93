"""How a model is loaded for measurement and how its predictions are scored.

Everything here is a plain function of a model folder, a loaded model
(:class:`tasks.core.model_files.LoadedModel`) or arrays; the cost figures live beside it:
:mod:`~tasks.evaluation.timing` (latency, throughput), :mod:`~tasks.evaluation.energy`,
:mod:`~tasks.evaluation.memory` (peak inference memory, in a fresh process) and
:mod:`~tasks.evaluation.flops`. :mod:`tasks.evaluation.benchmark` measures every model
with them, the baseline and each variant alike.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
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


def classification_metrics(
    y_true: np.ndarray, y_pred: np.ndarray, class_names: Sequence[str]
) -> tuple[dict[str, float], dict[str, dict[str, float]], np.ndarray]:
    """Accuracy and macro F1; per class precision, recall, F1 and support; the confusion matrix.

    Per-class figures are a table (``{class: {precision, recall, f1, support}}``), not
    metrics: one metric per class and figure would bury the headline figures.
    """
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

    labels = list(range(len(class_names)))
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0
    )
    metrics = {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
    }
    per_class = {
        str(name): {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                    "support": int(support[i])}
        for i, name in enumerate(class_names)
    }
    return metrics, per_class, confusion_matrix(y_true, y_pred, labels=labels)
