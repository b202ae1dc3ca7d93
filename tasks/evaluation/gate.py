"""The quality gate, the champion and the Pareto front: pure functions of measured metrics.

:func:`select_champion`: every model (the baseline included) that keeps within the gate
(accuracy drop vs. the baseline, the largest drop of one class's recall vs. the
baseline's, and optionally p95 latency, size on disk and energy per 1,000 predictions) is a
candidate; the objective (``smallest``, ``fastest`` or
``lowest_energy``) picks one. Impossible thresholds give no champion.

Where a candidate is more accurate than the baseline by more than ``max_accuracy_drop``,
beyond chance (its gain more than :data:`BEYOND_CHANCE` standard errors, paired on the same
test samples, and more where several models were compared: :func:`beyond_chance_of_best`), the baseline is no measure of the accuracy within reach: the most accurate such candidate becomes the accuracy
reference, and a candidate more than ``max_accuracy_drop`` below it fails too
(:func:`raised_reference`). Seen on a topic-text set whose transformer overfit: its
half-width student read +9.5±1.5 points, and the smallest model within a point of the
baseline was 9 points less accurate than that student.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from tasks.core import metric_names as names
from tasks.core.classification import (
    class_disagreements, class_recall_problem, class_recall_within_chance, paired_change_noise,
)
from tasks.core.config import EvaluateParams, GateParams
from tasks.evaluation.results import BASELINE, Evaluation
from tasks.training.reporting import kept_less_accurate, still_improving

log = logging.getLogger("slimflow.evaluate")

_EPS = 1e-9  # accuracies are ratios of integers: forgive float round-off at the threshold
# memorized(): a baseline right on this share of its training rows at its best epoch, and
# more than this many points fewer of the validation split, learned its rows, not the task.
MEMORIZED_TRAIN_ACCURACY = 0.98
MEMORIZED_GAP_PTS = 20.0

# Metric each objective minimises, and the tie-breakers after it.
OBJECTIVES: dict[str, tuple[str, ...]] = {
    "smallest": ("size_bytes", "latency_p50_ms"),
    "fastest": ("latency_p50_ms", "size_bytes"),
    "lowest_energy": ("energy_per_1k_j", "latency_p50_ms"),
}
BEYOND_CHANCE = 2.0  # standard errors of a paired accuracy gain that make it more than chance
IMBALANCED_SHARE = 0.5  # a test split whose most frequent class is at least this share is imbalanced
# How the objective's measure reads in a reason.
_SHOWN = {"size_bytes": "{:.0f} B", "latency_p50_ms": "{:.3f} ms p50", "energy_per_1k_j": "{:.4g} J per 1k predictions"}


def _number(metrics: Mapping[str, Any], key: str) -> float | None:
    value = metrics.get(key)
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def gate_problems(metrics: Mapping[str, Any], baseline_accuracy: float, gate: GateParams,
                  per_class: Mapping[str, Mapping[str, float]] | None = None,
                  baseline_per_class: Mapping[str, Mapping[str, float]] | None = None,
                  disagreements: Mapping[str, tuple[int, int]] | None = None) -> list[str]:
    """Why a model fails the gate (empty when it passes). ``per_class`` and
    ``baseline_per_class`` (``{class: {recall, support, ...}}``) gate the recall of each
    class; without them that limit is not applied. ``disagreements`` (per class: samples only
    the baseline gets right, only the model) leave out a class loss chance explains."""
    problems = []
    accuracy = _number(metrics, "accuracy")
    if accuracy is None:
        problems.append("accuracy not measured")
    else:
        drop = baseline_accuracy - accuracy
        if drop > gate.max_accuracy_drop + _EPS:
            noise = _number(metrics, names.ACCURACY_CHANGE_NOISE_PTS)  # how finely the split measures it
            problems.append(f"accuracy drop {drop:.4f} > max_accuracy_drop {gate.max_accuracy_drop:.4f}"
                            + ("" if noise is None else f" (±{noise / 100:.4f}, one standard error on the test split)"))
    if gate.max_class_recall_drop is not None and per_class and baseline_per_class:
        if problem := class_recall_problem(per_class, baseline_per_class, gate.max_class_recall_drop, disagreements):
            problems.append(problem)
    limits = (  # (upper limit, metric, how the value reads, how the limit reads)
        (gate.max_latency_p95_ms, "latency_p95_ms", "latency p95 {:.3f} ms", "{:g}"),
        (gate.max_size_bytes, "size_bytes", "size {:.0f} B", "{}"),
        (gate.max_energy_per_1k_j, "energy_per_1k_j", "energy {:.4g} J per 1k predictions", "{:g}"),
    )
    for limit, key, value_text, limit_text in limits:
        if limit is None:
            continue
        value = _number(metrics, key)
        if value is None:
            problems.append(f"{key} not measured")
        elif value > limit:
            problems.append(f"{value_text.format(value)} > max_{key} {limit_text.format(limit)}")
    return problems


def select_champion(
    metrics: Mapping[str, Mapping[str, Any]],
    gate: GateParams,
    objective: str,
    baseline: str = BASELINE,
    per_class: Mapping[str, Mapping[str, Mapping[str, float]]] | None = None,
    disagreements: Mapping[str, Mapping[str, tuple[int, int]]] | None = None,
) -> tuple[str | None, dict[str, str]]:
    """Pick the champion among every model that passes the gate; None when none does.

    ``metrics`` maps a model name to its metrics (``accuracy``, ``size_bytes``,
    ``latency_p50_ms``, ``latency_p95_ms``, ``energy_per_1k_j``); the accuracy drop is
    measured against ``metrics[baseline]``, and each class's recall drop against
    ``per_class[baseline]`` (``per_class``: a model name to its per-class figures; without
    them the class limit is not applied; ``disagreements``, a model name to
    :func:`~tasks.core.classification.class_disagreements` with the baseline, leave out a class
    loss chance explains, and a passing model's reason then names it). Among the models that pass, ``objective``
    ``smallest`` takes the least ``size_bytes``, ``fastest`` the least ``latency_p50_ms``,
    ``lowest_energy`` the least ``energy_per_1k_j``; ties go to the higher accuracy, then
    the second measure of :data:`OBJECTIVES`, then the name. Returns the champion's name
    (or None) and a one-line reason for every model.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; expected one of {sorted(OBJECTIVES)}")
    if baseline not in metrics:
        raise ValueError(f"no metrics for the baseline {baseline!r}: the accuracy drop has no reference")
    baseline_accuracy = _number(metrics[baseline], "accuracy")
    if baseline_accuracy is None:
        raise ValueError(f"the baseline {baseline!r} has no accuracy")
    primary, secondary = OBJECTIVES[objective]
    per_class, disagreements = per_class or {}, disagreements or {}

    reasons: dict[str, str] = {}
    passing: list[tuple[float, float, float, str]] = []
    for name, values in metrics.items():
        problems = gate_problems(values, baseline_accuracy, gate, per_class.get(name), per_class.get(baseline),
                                 disagreements.get(name))
        measure = _number(values, primary)
        if measure is None and not problems:
            problems.append(f"{primary} not measured (objective {objective})")
        if problems:
            reasons[name] = "fails the gate: " + "; ".join(problems)
            continue
        other = _number(values, secondary)
        passing.append((measure, -float(values["accuracy"]), math.inf if other is None else other, name))

    if reference := raised_reference(metrics, [entry[3] for entry in passing], gate, baseline):
        within = []
        for entry in passing:
            accuracy = -entry[1]
            if reference.accuracy - accuracy > gate.max_accuracy_drop + _EPS:
                reasons[entry[3]] = (f"fails the gate: accuracy {accuracy:.4f} is {reference.accuracy - accuracy:.4f} "
                                     f"below {reference.said()} > max_accuracy_drop {gate.max_accuracy_drop:.4f}")
            else:
                within.append(entry)
        passing = within
    if not passing:
        return None, {name: reasons[name] for name in metrics}
    passing.sort()
    winner = passing[0][3]
    for measure, _, _, name in passing:
        shown = _SHOWN[primary].format(measure)
        if name == winner:
            reasons[name] = f"champion: passes the gate and is the {objective} of {len(passing)} passing ({shown})"
        else:
            reasons[name] = f"passes the gate; not the {objective} ({shown})"
        if gate.max_class_recall_drop is not None and per_class.get(name) and name in disagreements and (
                note := class_recall_within_chance(per_class[name], per_class.get(baseline) or {},
                                                   gate.max_class_recall_drop, disagreements[name])):
            reasons[name] += f"; {note}"
    return winner, {name: reasons[name] for name in metrics}


@dataclass(frozen=True)
class Reference:
    """A model more accurate than the baseline beyond chance: the gate's accuracy reference."""

    name: str
    accuracy: float
    gain_pts: float  # over the baseline, and one standard error of it (paired)
    noise_pts: float

    def said(self) -> str:
        return (f"{self.name}'s {self.accuracy:.4f} (the accuracy reference: {self.gain_pts:+.2f}±{self.noise_pts:.2f} "
                "points over the baseline, beyond chance)")


def beyond_chance_of_best(compared: int) -> float:
    """Standard errors that make the largest of ``compared`` paired accuracy gains more than
    chance: :data:`BEYOND_CHANCE` for one model, more for several (Bonferroni: the same
    one-sided chance, about 2.3%, shared among them; 2.43 for 3 models, 2.87 for 11). The most
    accurate of many variants that differ from the baseline only by noise clears 2 standard
    errors far more often than one model does."""
    from statistics import NormalDist

    normal = NormalDist()
    return normal.inv_cdf(1.0 - (1.0 - normal.cdf(BEYOND_CHANCE)) / max(1, compared))


def raised_reference(metrics: Mapping[str, Mapping[str, Any]], candidates: Sequence[str], gate: GateParams,
                     baseline: str = BASELINE) -> Reference | None:
    """The most accurate of ``candidates`` whose accuracy gain over the baseline exceeds the
    gate's ``max_accuracy_drop`` (the baseline would fail against it) and chance for the best
    of the models compared (:func:`beyond_chance_of_best` standard errors, counting every
    model of ``metrics`` whose paired ``accuracy_change_noise_pts`` is above 0: one that never
    disagrees with the baseline cannot gain); None when none does, and the baseline stays the
    reference."""
    least = gate.max_accuracy_drop_pts
    compared = sum(1 for name, values in metrics.items()
                   if name != baseline and (_number(values, names.ACCURACY_CHANGE_NOISE_PTS) or 0.0) > 0)
    threshold = beyond_chance_of_best(compared)
    best = None
    for name in candidates:
        values = metrics[name]
        gain, noise = _number(values, names.ACCURACY_CHANGE_PTS), _number(values, names.ACCURACY_CHANGE_NOISE_PTS)
        accuracy = _number(values, "accuracy")
        if (name == baseline or gain is None or noise is None or accuracy is None
                or gain <= max(threshold * noise, least) + _EPS):
            continue
        if best is None or (accuracy, -len(name)) > (best.accuracy, -len(best.name)):
            best = Reference(name, accuracy, gain, noise)
    return best


def still_improving_caveat(baseline_manifest: Mapping[str, Any], gate: GateParams) -> str | None:
    """What to tell a user whose baseline was still improving, by more than the gate tolerates
    (``max_accuracy_drop``), when its epochs ran out (the ``fit`` record its training wrote):
    every variant is then compared with a model more epochs would have made stronger, and a
    student that "beats its teacher" may only have trained longer. None otherwise, and for a
    model saved before the record existed."""
    fit = baseline_manifest.get("fit") or {}
    if "val_accuracy_late_gain_pts" not in fit:
        return None
    note = still_improving(fit["val_accuracy_late_gain_pts"], fit["epochs"], fit["patience"],
                           gate.max_accuracy_drop_pts)
    return note and (f"the baseline was {note}; the variants are compared with an under-trained baseline "
                     "(raise train.epochs)")


def less_accurate_epoch_caveat(baseline_manifest: Mapping[str, Any], gate: GateParams) -> str | None:
    """What to tell a user whose baseline kept, by ``val_loss``, an epoch less accurate on
    the validation split than another by more than the gate tolerates: every variant is
    compared with (and fine-tuned or distilled from) that epoch. None otherwise, and for a
    model saved before the record existed."""
    fit = baseline_manifest.get("fit") or {}
    if fit.get("monitor") != "val_loss" or "val_accuracy_missed_pts" not in fit:
        return None
    note = kept_less_accurate(int(baseline_manifest.get("best_epoch") or 0), int(fit["most_accurate_epoch"]),
                              float(fit["val_accuracy_missed_pts"]), gate.max_accuracy_drop_pts)
    return note and f"the baseline {note}"


def memorized(baseline_manifest: Mapping[str, Any]) -> str | None:
    """Why variants beat the baseline, where its ``fit`` record shows it memorized its
    training rows: at its best epoch right on at least :data:`MEMORIZED_TRAIN_ACCURACY` of
    them and more than :data:`MEMORIZED_GAP_PTS` points fewer of the validation split (seen
    on 600 rows of 2,000 measured features: 99.2% against 64.0%, and the pruned variants,
    which drop most weights, read 38 points more on test). None otherwise, and for a model
    saved before the record held both figures. (A split in time order widens the gap by
    itself, the validation rows being later, so the gap alone is no sign.)"""
    fit = baseline_manifest.get("fit") or {}
    if "train_accuracy" not in fit or "val_accuracy" not in fit:
        return None
    train, val = float(fit["train_accuracy"]), float(fit["val_accuracy"])
    if train < MEMORIZED_TRAIN_ACCURACY or 100 * (train - val) <= MEMORIZED_GAP_PTS:
        return None
    return (f"the baseline memorized its training rows (at its best epoch, {baseline_manifest.get('best_epoch')}, "
            f"right on {100 * train:.1f}% of them and {100 * val:.1f}% of the validation split); a baseline that "
            "generalizes (more dropout: train.model.dropout; a narrower model: train.model.width; fewer features or "
            "more rows) would be the fairer measure")


@dataclass(frozen=True)
class ConstantAnswer:
    """A model against always answering the test split's most frequent class, paired on the
    same samples."""

    majority: int  # that class's index
    share: float  # its share of the test split: the constant answer's accuracy
    accuracy: float  # the model's
    gain: float  # accuracy - share, and one standard error of it
    noise: float


def _against_constant_answer(evaluation: Evaluation, name: str) -> ConstantAnswer | None:
    """Model ``name`` against always answering the test split's most frequent class; None
    where the model is beyond chance above it, and on a split of fewer than two samples or of
    one class."""
    y_true = np.asarray(evaluation.y_true).astype(np.int64)
    counts = np.bincount(y_true, minlength=len(evaluation.class_names))
    majority = int(counts.argmax())
    constant_right, right = y_true == majority, evaluation.models[name].predictions == y_true
    noise, _ = paired_change_noise(constant_right, right, evaluation.records)
    gain = float(right.mean() - constant_right.mean())
    if math.isnan(noise) or counts[majority] == len(y_true) or gain > BEYOND_CHANCE * noise + _EPS:
        return None  # (a split of one class: no other answer to tell apart)
    return ConstantAnswer(majority, float(constant_right.mean()), float(right.mean()), gain, noise)


def no_skill_problem(evaluation: Evaluation, name: str) -> str | None:
    """Why model ``name`` must not become the champion, where on a balanced test split (its
    most frequent class under :data:`IMBALANCED_SHARE`) it is, within chance, no more accurate
    than always answering that class: it learned nothing, and a registered version would answer
    requests no better than a constant. None otherwise (on imbalanced data accuracy is a poor
    measure and :func:`majority_class_caveat` says so instead)."""
    against = _against_constant_answer(evaluation, name)
    if against is None or against.share >= IMBALANCED_SHARE:
        return None
    answer = evaluation.class_names[against.majority]
    said = (f"right on exactly the samples always answering {answer!r} gets right ({against.share:.4f})"
            if against.noise == 0 else f"{100 * against.gain:+.2f}±{100 * against.noise:.2f} points from always "
            f"answering {answer!r} ({against.share:.4f}), within chance")
    return (f"{name} learned no more than a constant answer: its accuracy {against.accuracy:.4f} is {said}; a champion "
            "must beat that beyond chance (check the data and how it was prepared: the prepare stage's log)")


def majority_class_caveat(evaluation: Evaluation) -> str | None:
    """What to tell a user whose baseline is, within chance, no more accurate than always
    answering the test split's most frequent class (paired on the same samples, as
    :func:`~tasks.core.classification.paired_change_noise` reads a change): on imbalanced data
    (2% fraud) accuracy then hardly measures the models, and a variant that drops the rare
    class's few catches still passes an accuracy gate. None where the baseline is beyond chance
    above it, and on a split of fewer than two samples or of one class."""
    baseline = evaluation.models[BASELINE]
    against = _against_constant_answer(evaluation, BASELINE)
    if against is None:
        return None
    majority = evaluation.class_names[against.majority]
    others = [(name, values) for name, values in baseline.per_class.items()
              if name != majority and values.get("support")]
    recalls = ", ".join(f"{name!r} {values['recall']:.3f} ({round(values['recall'] * values['support'])} of "
                        f"{int(values['support'])})" for name, values in others[:4])
    more = f", ... ({len(others)} classes)" if len(others) > 4 else ""
    said = (f"the baseline's accuracy {against.accuracy:.4f} is {100 * against.gain:+.2f}±{100 * against.noise:.2f} "
            f"points from always answering {majority!r} ({against.share:.4f}, its share of the test split), "
            f"within chance; its recall of the other classes: {recalls}{more}; macro F1 "
            f"{baseline.metrics.get('macro_f1', math.nan):.3f}")
    if against.share >= IMBALANCED_SHARE:
        return (f"{said}. On data this imbalanced accuracy hardly measures the models: judge them by per-class recall "
                "and macro F1 (evaluate.gate.max_class_recall_drop guards each class's recall)")
    return (f"{said}. The baseline learned no more than a constant answer: check the data and how it was prepared "
            "(the prepare stage's log; the train stage's figures)")


def apply_gate(evaluation: Evaluation, params: EvaluateParams) -> None:
    """Run the gate; mark ``passed_gate`` and ``champion`` in every model's metrics; note a
    baseline that was still improving (:func:`still_improving_caveat`)."""
    baseline = evaluation.models[BASELINE]
    disagreements = {name: class_disagreements(evaluation.y_true, baseline.predictions, result.predictions,
                                               evaluation.class_names, evaluation.records)
                     for name, result in evaluation.models.items()}
    champion, reasons = select_champion(evaluation.metrics(), params.gate, params.objective, BASELINE,
                                        {name: result.per_class for name, result in evaluation.models.items()},
                                        disagreements)
    evaluation.champion, evaluation.reasons = champion, reasons
    for name, result in evaluation.models.items():
        result.metrics["passed_gate"] = 0.0 if reasons[name].startswith("fails") else 1.0
        result.metrics["champion"] = 1.0 if name == champion else 0.0
    if champion:
        log.info("gate: %s wins (objective %s)", champion, params.objective)
        for name, reason in reasons.items():  # the closing table says "fail"; here is why
            if reason.startswith("fails") or "within chance" in reason:
                log.info("gate: %s %s", name, reason)
    else:
        log.warning("gate: no model passes (%s)", "; ".join(f"{k}: {v}" for k, v in reasons.items()))
    passing = [name for name, result in evaluation.models.items() if result.metrics["passed_gate"]]
    if reference := raised_reference(evaluation.metrics(), passing, params.gate):
        why = memorized(baseline.manifest) or ("a baseline its variants beat was over- or under-trained (its train and "
                                               "validation figures are on the train stage's run)")
        caveat = (f"{reference.name} is {reference.gain_pts:+.2f}±{reference.noise_pts:.2f} points more accurate than "
                  "the baseline, more than max_accuracy_drop and beyond chance, so the gate held every model to within max_accuracy_drop of its "
                  f"accuracy {reference.accuracy:.4f}, not the baseline's: {why}")
        evaluation.caveats.append(caveat)
        log.warning("caveat: %s", caveat)
    if caveat := less_accurate_epoch_caveat(evaluation.models[BASELINE].manifest, params.gate):
        evaluation.caveats.append(caveat)
        log.warning("caveat: %s", caveat)
    if caveat := still_improving_caveat(evaluation.models[BASELINE].manifest, params.gate):
        evaluation.caveats.append(caveat)
        log.warning("caveat: %s", caveat)
    if caveat := majority_class_caveat(evaluation):
        evaluation.caveats.append(caveat)
        log.warning("caveat: %s", caveat)


def pareto_flags(costs: Sequence[Sequence[float]], accuracy: Sequence[float]) -> list[bool]:
    """True for points no other point beats: cost(s) no higher, accuracy no lower, one strictly."""
    flags = []
    for i in range(len(accuracy)):
        dominated = False
        for j in range(len(accuracy)):
            if i == j:
                continue
            no_worse = all(cj[j] <= cj[i] for cj in costs) and accuracy[j] >= accuracy[i]
            better = any(cj[j] < cj[i] for cj in costs) or accuracy[j] > accuracy[i]
            if no_worse and better:
                dominated = True
                break
        flags.append(not dominated)
    return flags
