"""How a model is loaded for measurement and how its predictions are scored.

Everything here is a plain function of a model folder, a loaded model
(:class:`tasks.core.model_files.LoadedModel`) or arrays; the cost figures live beside it:
:mod:`~tasks.evaluation.timing` (latency, throughput, energy), :mod:`~tasks.core.energy`,
:mod:`~tasks.evaluation.memory` (peak inference memory, a forked child per model) and
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

    The definitions of scikit-learn's ``accuracy_score``, ``f1_score(average="macro")``,
    ``precision_recall_fscore_support`` and ``confusion_matrix`` with ``labels=0..K-1`` and
    ``zero_division=0`` (tests/test_measure.py checks them against scikit-learn), in numpy:
    importing ``sklearn.metrics`` (scipy) cost the evaluate stage ~2.6 s of start-up.
    """
    classes = len(class_names)
    y_true = np.asarray(y_true, dtype=np.int64).ravel()
    y_pred = np.asarray(y_pred, dtype=np.int64).ravel()
    known = (y_true >= 0) & (y_true < classes) & (y_pred >= 0) & (y_pred < classes)
    confusion = np.bincount(
        y_true[known] * classes + y_pred[known], minlength=classes * classes
    ).reshape(classes, classes)  # rows: true label, columns: predicted
    true_positives = np.diag(confusion).astype(np.float64)
    predicted = confusion.sum(axis=0).astype(np.float64)
    actual = confusion.sum(axis=1).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(predicted > 0, true_positives / predicted, 0.0)
        recall = np.where(actual > 0, true_positives / actual, 0.0)
        f1_denominator = predicted + actual  # 2 tp + fp + fn
        f1 = np.where(f1_denominator > 0, 2 * true_positives / f1_denominator, 0.0)
    metrics = {
        "accuracy": float(np.mean(y_true == y_pred)) if len(y_true) else 0.0,
        "macro_f1": float(f1.mean()) if classes else 0.0,
    }
    per_class = {
        str(name): {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                    "support": int(actual[i])}
        for i, name in enumerate(class_names)
    }
    return metrics, per_class, confusion
