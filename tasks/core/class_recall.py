"""Each class's recall, and the one rule that judges its fall: the evaluate gate applies it
on the test split (against the run's baseline and the current champion), the compression
search on the validation split (a searched variant aims at what the gate will accept).

Accuracy averages over the samples, so a class of 3% of them can lose half its recall
inside a 1-point accuracy budget: compression tends to cost the small, hard classes first
(Hooker et al., 2019, "What do compressed deep neural networks forget?").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

_EPS = 1e-9
# A class's recall drop counts from this many of its samples lost: one sample's flip is noise
# (on the digits' 45 test samples a class, 2.2 points), not what a model forgot.
MIN_SAMPLES_LOST = 2


def per_class_recall(predicted: np.ndarray, labels: np.ndarray,
                     class_names: Sequence[str]) -> dict[str, dict[str, float]]:
    """``{class: {recall, support}}`` of predicted class indices against ``labels``."""
    predicted, labels = np.asarray(predicted), np.asarray(labels)
    rows = {}
    for index, name in enumerate(class_names):
        mask = labels == index
        support = int(mask.sum())
        rows[str(name)] = {"recall": float((predicted[mask] == index).mean()) if support else 0.0,
                           "support": support}
    return rows


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
