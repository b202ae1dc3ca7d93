"""What predictions score: :func:`classification_metrics` (accuracy, macro F1, each class's
precision, recall and support), :func:`class_recall_problem`, the one rule that judges a
class's recall falling: the evaluate gate applies it on the test split (against the run's
baseline and the current champion), the compression search on the validation split (a
searched variant aims at what the gate will accept), and :func:`paired_change_noise`, how
finely a split measures one model's accuracy change against another's.

Accuracy averages over the samples, so a class of 3% of them can lose half its recall
inside a 1-point accuracy budget: compression tends to cost the small, hard classes first
(Hooker et al., 2019, "What do compressed deep neural networks forget?").
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

_EPS = 1e-9
# A class's recall drop counts from this many of its samples lost: one sample's flip is noise
# (on the digits' 45 test samples a class, 2.2 points), not what a model forgot.
MIN_SAMPLES_LOST = 2


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


def class_recall_problem(per_class: Mapping[str, Mapping[str, float]],
                         baseline_per_class: Mapping[str, Mapping[str, float]], max_drop: float) -> str | None:
    """The class whose recall fell furthest below the reference's (``baseline_per_class``:
    its ``recall`` and the split's ``support``), when that is more than ``max_drop`` (a
    fraction) and at least :data:`MIN_SAMPLES_LOST` of its samples; else None."""
    worst: tuple[float, str, float, float, int, int] | None = None
    for name, base in baseline_per_class.items():
        if name not in per_class:
            continue
        before, after = float(base["recall"]), float(per_class[name]["recall"])
        support = int(base.get("support") or 0)
        drop, lost = before - after, round((before - after) * support)
        if drop > max_drop + _EPS and lost >= MIN_SAMPLES_LOST and (worst is None or drop > worst[0]):
            worst = (drop, name, before, after, lost, support)
    if worst is None:
        return None
    drop, name, before, after, lost, support = worst
    return (f"class {name!r} recall drop {drop:.4f} ({100 * before:.1f}% -> {100 * after:.1f}%, "
            f"{lost} of its {support} samples) > max_class_recall_drop {max_drop:.4f}")


def paired_standard_error(reference: Any, values: Any) -> float:
    """One standard error of the mean of ``values[i] - reference[i]`` (two measurements of
    the same items, paired): ``sd(d) / sqrt(n)``; NaN for fewer than two pairs."""
    paired = np.asarray(values, dtype=np.float64) - np.asarray(reference, dtype=np.float64)
    if paired.size < 2:
        return float("nan")
    return float(paired.std(ddof=1) / np.sqrt(paired.size))


def paired_change_noise(reference_right: np.ndarray, right: np.ndarray) -> tuple[float, int]:
    """One standard error of a model's accuracy change against a reference model scored on
    the same samples (a fraction), and the samples it rests on.

    Only the samples exactly one of the two gets right move the change (a paired comparison,
    as McNemar's test reads it): with ``d_i`` = +1 where only the model is right, -1 where
    only the reference is, 0 elsewhere, the change is their mean and its standard error
    ``sd(d) / sqrt(n)``. A split measures a change no finer than that. ``(nan, 0)`` for fewer
    than two samples.
    """
    noise = paired_standard_error(reference_right, right)
    if math.isnan(noise):
        return noise, 0
    return noise, int(np.count_nonzero(np.asarray(right) != np.asarray(reference_right)))
