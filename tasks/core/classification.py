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
# ...and, where both models' predictions on the same samples are known, only when chance is an
# unlikely explanation: the class's loss would come by chance (:func:`chance_of_loss`) no more
# often than this, shared over the classes compared (0.25 each of two classes, 0.0125 each of
# 40), so a model that lost nothing has at most this many classes counted against it on
# average. With 40 classes of 18 test samples, a model that changes a tenth of its answers
# loses two or three samples of some class by chance alone, and the fixed floor above failed
# such models in nearly every run; with two classes the test seldom binds once a loss is over
# the limit (a fraud class of 46: 5 of its samples lost and none gained is 3%).
CLASS_LOSS_CHANCE = 0.5


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


def class_disagreements(y_true: Any, reference_predictions: Any, predictions: Any,
                        class_names: Sequence[str], records: Any = None) -> dict[str, tuple[int, int]]:
    """Per class, of its samples: how many only the reference model gets right, and how many
    only the model gets right (the samples both get right or both wrong move no recall).
    With ``records`` (each sample's record: copies of one share an id, and a model answers
    them alike), each record counts once: its copies are one draw for the chance of a loss."""
    y_true = np.asarray(y_true, dtype=np.int64).ravel()
    reference_right = np.asarray(reference_predictions).ravel() == y_true
    right = np.asarray(predictions).ravel() == y_true
    classes = len(class_names)
    known = (y_true >= 0) & (y_true < classes)

    record = None if records is None else np.unique(np.asarray(records).ravel(), return_inverse=True)[1].ravel()

    def per_class(mask: np.ndarray) -> np.ndarray:
        if record is None:
            return np.bincount(y_true[mask], minlength=classes)
        pairs = np.unique(record[mask] * classes + y_true[mask])  # (record, class): once each
        return np.bincount(pairs % classes, minlength=classes)

    only_reference = per_class(known & reference_right & ~right)
    only_model = per_class(known & right & ~reference_right)
    return {str(name): (int(only_reference[i]), int(only_model[i])) for i, name in enumerate(class_names)}


def chance_of_loss(only_reference: int, only_model: int) -> float:
    """How likely a model no worse than the reference loses at least this many of a class's
    samples: of the ``only_reference + only_model`` samples exactly one of the two gets right,
    each a fair coin's toss (McNemar's exact test, one-sided)."""
    tosses = only_reference + only_model
    return sum(math.comb(tosses, k) for k in range(only_reference, tosses + 1)) / 2.0 ** tosses


def class_recall_problem(per_class: Mapping[str, Mapping[str, float]],
                         baseline_per_class: Mapping[str, Mapping[str, float]], max_drop: float,
                         disagreements: Mapping[str, tuple[int, int]] | None = None) -> str | None:
    """The class whose recall fell furthest below the reference's (``baseline_per_class``:
    its ``recall`` and the split's ``support``), when that is more than ``max_drop`` (a
    fraction) and at least :data:`MIN_SAMPLES_LOST` of its samples; else None.

    With ``disagreements`` (:func:`class_disagreements` of the two models on the same
    samples), a class counts only when chance explains its loss less often than
    :data:`CLASS_LOSS_CHANCE` shared over the classes compared (:func:`chance_of_loss`)."""
    worst = _worst_drop(per_class, baseline_per_class, max_drop, disagreements, beyond_chance=True)
    if worst is None:
        return None
    drop, name, before, after, lost, support, _ = worst
    return (f"class {name!r} recall drop {drop:.4f} ({100 * before:.1f}% -> {100 * after:.1f}%, "
            f"{lost} of its {support} samples) > max_class_recall_drop {max_drop:.4f}")


def class_recall_within_chance(per_class: Mapping[str, Mapping[str, float]],
                               baseline_per_class: Mapping[str, Mapping[str, float]], max_drop: float,
                               disagreements: Mapping[str, tuple[int, int]]) -> str | None:
    """The largest class recall drop over ``max_drop`` that :func:`class_recall_problem` does
    not count because chance explains it, said as a note; None where there is none."""
    worst = _worst_drop(per_class, baseline_per_class, max_drop, disagreements, beyond_chance=False)
    if worst is None:
        return None
    drop, name, before, after, lost, support, chance = worst
    level = _chance_per_class(len(baseline_per_class))
    return (f"class {name!r} recall drop {drop:.4f} ({100 * before:.1f}% -> {100 * after:.1f}%, {lost} of its "
            f"{support} samples) is within chance: a model no worse would lose that many {_percent(chance)} "
            f"of the time (a class counts below {_percent(level)}: {CLASS_LOSS_CHANCE:g} shared over "
            f"{len(baseline_per_class)} classes)")


def _chance_per_class(classes: int) -> float:
    """A class's share of :data:`CLASS_LOSS_CHANCE` among ``classes`` compared."""
    return CLASS_LOSS_CHANCE / max(1, classes)


def _percent(chance: float) -> str:
    return f"{100 * chance:.2g}%" if chance < 0.1 else f"{100 * chance:.0f}%"


def _worst_drop(per_class: Mapping[str, Mapping[str, float]], baseline_per_class: Mapping[str, Mapping[str, float]],
                max_drop: float, disagreements: Mapping[str, tuple[int, int]] | None,
                beyond_chance: bool) -> tuple[float, str, float, float, int, int, float | None] | None:
    """The largest recall drop over ``max_drop`` and :data:`MIN_SAMPLES_LOST` among the classes
    chance does not explain (``beyond_chance``) or among those it does."""
    level = _chance_per_class(len(baseline_per_class))
    worst = None
    for name, base in baseline_per_class.items():
        if name not in per_class:
            continue
        before, after = float(base["recall"]), float(per_class[name]["recall"])
        support = int(base.get("support") or 0)
        drop, lost = before - after, round((before - after) * support)
        if drop <= max_drop + _EPS or lost < MIN_SAMPLES_LOST:
            continue
        pair = (disagreements or {}).get(name)
        chance = None if pair is None else chance_of_loss(*pair)
        if (chance is None or chance <= level) != beyond_chance:
            continue
        if worst is None or drop > worst[0]:
            worst = (drop, name, before, after, lost, support, chance)
    return worst


def paired_standard_error(reference: Any, values: Any, records: Any = None) -> float:
    """One standard error of the mean of ``values[i] - reference[i]`` (two measurements of
    the same items, paired): ``sd(d) / sqrt(n)``; NaN for fewer than two pairs.

    With ``records`` (one id per item; equal ids: copies of one record, which a model gets
    right or wrong together), the items of a record are one draw, not several: the
    cluster-robust standard error ``sqrt(G / (G - 1) * sum_g S_g^2) / n``, ``S_g`` the sum of
    record g's deviations from the mean; with every record once, the same figure as
    without. NaN for fewer than two records."""
    paired = np.asarray(values, dtype=np.float64) - np.asarray(reference, dtype=np.float64)
    if records is None:
        if paired.size < 2:
            return float("nan")
        return float(paired.std(ddof=1) / np.sqrt(paired.size))
    _, record = np.unique(np.asarray(records), return_inverse=True)
    sums = np.bincount(record.reshape(-1), weights=paired - paired.mean())
    if sums.size < 2:
        return float("nan")
    return float(np.sqrt(sums.size / (sums.size - 1) * np.sum(sums**2)) / paired.size)


def paired_change_noise(reference_right: np.ndarray, right: np.ndarray, records: Any = None) -> tuple[float, int]:
    """One standard error of a model's accuracy change against a reference model scored on
    the same samples (a fraction), and the samples it rests on.

    Only the samples exactly one of the two gets right move the change (a paired comparison,
    as McNemar's test reads it): with ``d_i`` = +1 where only the model is right, -1 where
    only the reference is, 0 elsewhere, the change is their mean and its standard error
    ``sd(d) / sqrt(n)``; with ``records`` (each sample's record: copies share one), counted
    over records (:func:`paired_standard_error`). A split measures a change no finer than
    that. ``(nan, 0)`` for fewer than two samples.
    """
    noise = paired_standard_error(reference_right, right, records)
    if math.isnan(noise):
        return noise, 0
    return noise, int(np.count_nonzero(np.asarray(right) != np.asarray(reference_right)))


def index_names(class_names: Sequence[str], shown: int = 8) -> str:
    """What each predicted index stands for: ``0 = '1', 1 = '2', 2 = '3'`` (the first
    ``shown``, then the count)."""
    pairs = ", ".join(f"{i} = {name!r}" for i, name in enumerate(class_names[:shown]))
    return pairs + (f", ... ({len(class_names)} classes)" if len(class_names) > shown else "")
