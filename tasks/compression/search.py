"""Searching a knob to the accuracy budget: bounded, always with an answer, its trail kept.

A search runs trials (each one fine-tune, or one quantization) until its knob converges,
``compress.budget.max_trials`` trials have run, or the next trial would end past
``compress.budget.max_minutes`` (judged by the mean trial so far; the first trial always
runs, so a search never returns nothing). Its answer is the most compressed trial within
``max_accuracy_drop`` points of the baseline's validation accuracy, with no class's
validation recall down more than ``max_class_recall_drop`` (default: the gate's, so that
the search aims at what the gate accepts; :mod:`tasks.core.classification`), or, when none
is, the least-bad trial with a message saying so (the gate then decides). Each trial's drop
carries its noise on the validation split (:meth:`Budget.drop_noise`); a chosen trial whose
noise exceeds the budget is kept with a warning that the split cannot tell.

The search itself is pure (a function that runs one trial is passed in), so its rules are
tested on their own; :mod:`tasks.compression.build` runs the trials on the Horovod loop.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

import numpy as np

from tasks.core import metric_names as names
from tasks.core.classification import (
    class_disagreements, class_recall_problem, classification_metrics, paired_change_noise,
)
from tasks.core.config import Params
from tasks.core.tables import cell

log = logging.getLogger("slimflow.compress")

SPARSITY_RANGE = (0.0, 0.98)  # bisection bounds of unstructured ``sparsity: auto`` (0: the unpruned model passes)
FIRST_SPARSITY = 0.8  # the first guess: where one-shot recipes usually sit
RESOLUTION = 0.01  # sparsities are tried in steps of 1 point


@dataclass(frozen=True)
class Budget:
    """A searched variant's budget, resolved against the baseline."""

    max_drop_points: float
    max_trials: int
    max_minutes: float
    baseline_accuracy: float
    # The class limit (a fraction; None: not applied) and the baseline's validation recall
    # per class, with the split's support, that it is measured against.
    max_class_recall_drop: float | None = None
    baseline_classes: dict[str, dict[str, float]] = field(default_factory=dict)
    # The baseline's class for each validation sample: what a trial's drop is measured
    # against sample by sample, for its noise (None: the drop's noise is not measured).
    baseline_predictions: np.ndarray | None = field(default=None, compare=False, repr=False)
    # Each validation sample's record where the split holds copies of one (None: none): a
    # drop and a class's loss count each record once (tasks.data.record_ids).
    val_records: np.ndarray | None = field(default=None, compare=False, repr=False)

    @classmethod
    def of(cls, params: Params, baseline_accuracy: float, baseline_classes: dict[str, dict[str, float]] | None = None,
           baseline_predictions: np.ndarray | None = None, val_records: np.ndarray | None = None) -> Budget:
        budget = params.compress.budget
        drop = budget.max_accuracy_drop
        if drop is None:  # the gate's own allowance, in points
            drop = params.evaluate.gate.max_accuracy_drop_pts
        class_drop = budget.max_class_recall_drop
        if class_drop is None:  # the gate's own class limit (itself None: not applied)
            class_drop = params.evaluate.gate.max_class_recall_drop
        return cls(float(drop), budget.max_trials, budget.max_minutes, baseline_accuracy, class_drop,
                   dict(baseline_classes or {}), baseline_predictions, val_records)

    def drop_points(self, accuracy: float) -> float:
        return 100.0 * (self.baseline_accuracy - accuracy)

    def fits(self, accuracy: float) -> bool:
        return self.drop_points(accuracy) <= self.max_drop_points + 1e-9

    def judge(self, logits: np.ndarray, labels: np.ndarray) -> Judgement:
        """A trial's validation accuracy, its drop in points, whether it fits the budget, the
        class it lost too much of (None: none) and the drop's noise - from its logits on the
        validation split."""
        predictions = np.asarray(logits).argmax(1)
        quality, per_class, _ = classification_metrics(labels, predictions, list(self.baseline_classes))
        accuracy, problem = quality["accuracy"], None
        if self.max_class_recall_drop is not None and self.baseline_classes:
            paired = None if self.baseline_predictions is None else class_disagreements(
                labels, self.baseline_predictions, predictions, list(self.baseline_classes), self._records(labels))
            problem = class_recall_problem(per_class, self.baseline_classes, self.max_class_recall_drop, paired)
        return Judgement(accuracy, self.drop_points(accuracy), self.fits(accuracy) and problem is None, problem,
                         *self.drop_noise(predictions, labels))

    def _records(self, labels: np.ndarray) -> np.ndarray | None:
        """The validation samples' records, where ``labels`` are the whole validation split's."""
        return self.val_records if self.val_records is not None and len(self.val_records) == len(labels) else None

    def drop_noise(self, predictions: np.ndarray, labels: np.ndarray) -> tuple[float | None, int | None]:
        """One standard error of a measured drop, in points, and the samples it rests on: the
        paired comparison with the baseline on the same validation samples
        (:func:`tasks.core.classification.paired_change_noise`). A small validation split
        measures a drop no finer than that: a trial within budget by less than it may not be
        on the test split. (None, None) without the baseline's predictions."""
        if self.baseline_predictions is None or len(labels) < 2:
            return None, None
        labels = np.asarray(labels)
        noise, disagreements = paired_change_noise(self.baseline_predictions == labels, np.asarray(predictions) == labels,
                                                   self._records(labels))
        return 100.0 * noise, disagreements


class Judgement(NamedTuple):
    """What :meth:`Budget.judge` found of one trial on the validation split."""

    accuracy: float
    drop_points: float
    fits: bool
    class_problem: str | None
    noise_points: float | None  # one standard error of ``drop_points`` (None: not measured)
    disagreements: int | None  # validation samples exactly one of the trial and the baseline gets right


@dataclass
class Trial:
    """One trial: its knob's value, what it measured, what it cost."""

    number: int  # from 1
    setting: float  # the knob's value (sparsity: the target share of zeros)
    val_accuracy: float
    drop_points: float
    within_budget: bool
    size_bytes: int
    nonzeros: int
    sparsity: float  # measured share of zeros among the prunable weights
    seconds: float
    warm_start: float | None = None  # the setting of the trial it started from (None: the parent)
    model: Any = field(default=None, repr=False)  # what the trial made (not recorded)
    class_problem: str | None = None  # the class it lost too much of (over budget on that, not accuracy)
    noise_points: float | None = None  # one standard error of drop_points (Budget.drop_noise; None: not measured)
    disagreements: int | None = None  # the validation samples that standard error rests on

    @classmethod
    def judged(cls, number: int, setting: float, judgement: Judgement, *, size_bytes: int, nonzeros: int,
               sparsity: float, seconds: float, warm_start: float | None = None, model: Any = None) -> Trial:
        """A trial from what :meth:`Budget.judge` found of it and what it made."""
        return cls(number, setting, judgement.accuracy, judgement.drop_points, judgement.fits, size_bytes, nonzeros,
                   sparsity, seconds, warm_start, model, judgement.class_problem, judgement.noise_points,
                   judgement.disagreements)

    def row(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "model"}

    def change_text(self) -> str:
        """Its change against the baseline, with its noise where measured, as the tables and
        headlines write a change: ``-1.04±0.74 pts``."""
        change = {names.ACCURACY_CHANGE_PTS: round(-self.drop_points, 2) + 0.0,  # + 0.0: no "-0.00"
                  names.ACCURACY_CHANGE_NOISE_PTS: self.noise_points}
        return f"{cell(names.ACCURACY_CHANGE_PTS, change)} pts"


@dataclass
class Outcome:
    """A search's answer and its trail."""

    knob: str
    best: Trial
    trials: list[Trial]
    within_budget: bool
    stopped_by: str  # converged | max_trials | max_minutes
    seconds: float
    budget: Budget
    message: str

    @property
    def log_level(self) -> int:
        """How its message is logged: a warning where nothing fit the budget, or where the
        validation split measures the chosen trial's drop more coarsely than the budget."""
        return logging.INFO if self.within_budget and _coarser_than_the_budget(self.best, self.budget) is None \
            else logging.WARNING

    def record(self) -> dict[str, Any]:
        """What the variant's manifest keeps (``search``)."""
        return {
            "knob": self.knob, "chosen": self.best.setting, "sparsity": self.best.sparsity,
            "val_accuracy": self.best.val_accuracy, "drop_points": round(self.best.drop_points, 4),
            "within_budget": self.within_budget, "message": self.message, "trials": len(self.trials),
            "stopped_by": self.stopped_by, "seconds": round(self.seconds, 2),
            "noise_points": None if self.best.noise_points is None else round(self.best.noise_points, 4),
            "disagreements": self.best.disagreements,
            "budget": {"max_accuracy_drop": self.budget.max_drop_points, "max_trials": self.budget.max_trials,
                       "max_minutes": self.budget.max_minutes, "baseline_val_accuracy": self.budget.baseline_accuracy,
                       "max_class_recall_drop": self.budget.max_class_recall_drop},
        }


class _Clock:
    """The bounds: trials and minutes."""

    def __init__(self, budget: Budget, clock: Callable[[], float]) -> None:
        self.budget, self.clock, self.started = budget, clock, clock()

    def elapsed(self) -> float:
        return self.clock() - self.started

    def stop_reason(self, trials: list[Trial]) -> str | None:
        """Why no further trial may start (None: one may)."""
        if len(trials) >= self.budget.max_trials:
            return "max_trials"
        if trials:
            mean = sum(t.seconds for t in trials) / len(trials)
            if self.elapsed() + mean > 60.0 * self.budget.max_minutes:
                return "max_minutes"
        return None


def _rounded(value: float) -> float:
    return round(round(value / RESOLUTION) * RESOLUTION, 6)


def search_sparsity(
    run_trial: Callable[[float, Trial | None, int], Trial],
    budget: Budget,
    *,
    first: float = FIRST_SPARSITY,
    clock: Callable[[], float] = time.perf_counter,
) -> Outcome:
    """The highest sparsity within ``budget`` by bisection between the highest passing and
    the lowest failing sparsity tried (steps of :data:`RESOLUTION`, up to ``SPARSITY_RANGE[1]``).

    ``run_trial(sparsity, warm_start, number)`` makes and measures one trial; ``warm_start``
    is the best passing trial so far (the trial continues from its model), or None.
    """
    return _bisect("sparsity", run_trial, budget, first, SPARSITY_RANGE[1], clock, key=lambda t: t.sparsity)


RATIO_RANGE = (0.0, 0.9)  # structured ``sparsity: auto``: the share of channels removed overall (each layer keeps >= 1)
FIRST_RATIO = 0.5  # the first guess: where the fixed structured recipe sits
SENSITIVITY_RATIOS = (0.25, 0.5, 0.75)  # each layer alone pruned at these shares of its channels
SENSITIVITY_FLOOR = 1.0  # points added to every layer's sensitivity, so that a layer that lost nothing
# alone is not pruned without limit: it is pruned at most (its drop + 1) / 1 times more than one losing 0


def search_ratio(
    run_trial: Callable[[float, Trial | None, int], Trial],
    budget: Budget,
    *,
    first: float = FIRST_RATIO,
    clock: Callable[[], float] = time.perf_counter,
) -> Outcome:
    """Structured pruning: the highest global channel ratio (the share of all prunable channels
    removed, shared out between the layers by :func:`layer_ratios`) within ``budget``, by the
    same bisection as :func:`search_sparsity`, up to ``RATIO_RANGE[1]``."""
    return _bisect("ratio", run_trial, budget, first, RATIO_RANGE[1], clock, key=lambda t: t.setting)


def _bisect(
    knob: str, run_trial: Callable[[float, Trial | None, int], Trial], budget: Budget, first: float, upper: float,
    clock: Callable[[], float], key: Callable[[Trial], float],
) -> Outcome:
    """Bisection between the highest passing setting (0 passes by definition) and the lowest
    failing one, each trial warm-started from the best passing trial; see the module's bounds."""
    bounds = _Clock(budget, clock)
    trials: list[Trial] = []
    low = 0.0  # the highest passing setting (0: the unpruned model passes by definition)
    high = upper + RESOLUTION  # the lowest failing one (above the range until a trial fails)
    passing: Trial | None = None
    target, stopped_by = _rounded(first), "converged"
    while True:
        if (reason := bounds.stop_reason(trials)) is not None:
            stopped_by = reason
            break
        trial = run_trial(target, passing, len(trials) + 1)
        trials.append(trial)
        log.info("search trial %d: %s %.2f -> val accuracy %.4f (%s, %s), %.1fs",
                 trial.number, knob, target, trial.val_accuracy, trial.change_text(), _verdict(trial, budget),
                 trial.seconds)
        if trial.within_budget:
            low, passing = target, trial
        else:
            high = target
        target = _rounded((low + high) / 2)
        if target <= low or target >= high or any(abs(t.setting - target) < 1e-9 for t in trials):
            break  # converged: no untried setting between the bounds
    return _outcome(knob, trials, budget, stopped_by, bounds.elapsed(), key=key)


def sensitivity_score(drops: dict[float, float]) -> float:
    """A layer's sensitivity: its mean accuracy drop (points, losses only) over the ratios it was pruned at alone."""
    return sum(max(0.0, drop) for drop in drops.values()) / max(1, len(drops))


def layer_ratios(
    ratio: float, widths: dict[str, int], sensitivity: dict[str, float], cap: float = RATIO_RANGE[1]
) -> dict[str, float]:
    """Share a global channel ``ratio`` out between the layers, the least sensitive pruned most.

    Each layer's share is proportional to 1 / (its sensitivity + :data:`SENSITIVITY_FLOOR`),
    scaled so that the channels removed over all layers are ``ratio`` of all their channels;
    a layer whose share would pass ``cap`` is held there and the rest is shared among the others.
    """
    weights = {name: 1.0 / (sensitivity.get(name, 0.0) + SENSITIVITY_FLOOR) for name in widths}
    to_remove = ratio * sum(widths.values())
    ratios: dict[str, float] = {}
    free = set(widths)
    while free:
        scale = to_remove / sum(widths[name] * weights[name] for name in free)
        over = {name for name in free if scale * weights[name] > cap}
        if not over:
            ratios.update({name: scale * weights[name] for name in free})
            break
        for name in over:
            ratios[name] = cap
            to_remove -= widths[name] * cap
        free -= over
    return {name: round(min(cap, max(0.0, ratios[name])), 6) for name in widths}


def kept_widths(widths: dict[str, int], ratios: dict[str, float]) -> dict[str, int]:
    """The channels each layer keeps at its ratio (at least one)."""
    return {name: max(1, round(width * (1.0 - ratios[name]))) for name, width in widths.items()}


def search_fallback(
    layers_by_harm: list[str],
    run_trial: Callable[[list[str], int], Trial],
    budget: Budget,
    *,
    clock: Callable[[], float] = time.perf_counter,
    started: float | None = None,
) -> Outcome:
    """Static int8 with fallback: everything int8 first, then the most harmful layers kept in
    fp32, one more per trial (cumulatively), until the drop fits; the answer has the fewest
    fp32 layers within budget. ``run_trial(fp32_layers, number)``; the trial's ``setting`` is
    the number of fp32 layers. ``started``: when the search began (its ranking counts)."""
    settings = [layers_by_harm[:count] for count in range(len(layers_by_harm) + 1)]
    return _first_that_fits("fallback", settings, run_trial, budget, clock, started)


STRUCTURED_SPARSITIES = (0.75, 0.5, 0.25)  # structured ``sparsity: auto``: shares of heads / units, highest first


def search_structured(
    run_trial: Callable[[float, int], Trial],
    budget: Budget,
    *,
    clock: Callable[[], float] = time.perf_counter,
) -> Outcome:
    """Structured pruning ``sparsity: auto``: the shares of :data:`STRUCTURED_SPARSITIES`,
    highest first, each pruned from the parent and fine-tuned; the first that fits is kept.
    (Not bisected: a share removes whole heads / units, so nearby shares are the same model.)"""
    return _first_that_fits("sparsity", list(STRUCTURED_SPARSITIES), run_trial, budget, clock, None, descending=True)


STUDENT_WIDTHS = (0.25, 0.5, 0.75)  # ``student_width: auto``: shares of the teacher's width, smallest first


def search_width(
    widths: list[float],
    run_trial: Callable[[float, int], Trial],
    budget: Budget,
    *,
    clock: Callable[[], float] = time.perf_counter,
) -> Outcome:
    """Distillation ``student_width: auto``: the smallest width (``widths`` ascending) whose
    student fits; stops at the first that does. ``run_trial(width, number)``."""
    return _first_that_fits("student_width", list(widths), run_trial, budget, clock, None)


def _first_that_fits(
    knob: str, settings: list[Any], run_trial: Callable[[Any, int], Trial], budget: Budget,
    clock: Callable[[], float], started: float | None, descending: bool = False,
) -> Outcome:
    """Try ``settings`` in order (most compressed first) until one fits the budget or a bound
    stops the search; the trial's ``setting`` is a number that grows as compression falls
    (``descending``: that falls as compression falls, e.g. a sparsity)."""
    bounds = _Clock(budget, clock)
    if started is not None:
        bounds.started = started
    trials: list[Trial] = []
    stopped_by = "converged"
    for setting in settings:
        if (reason := bounds.stop_reason(trials)) is not None:
            stopped_by = reason
            break
        trial = run_trial(setting, len(trials) + 1)
        trials.append(trial)
        log.info("search trial %d: %s %g -> val accuracy %.4f (%s, %s)", trial.number, knob, trial.setting,
                 trial.val_accuracy, trial.change_text(), _verdict(trial, budget))
        if trial.within_budget:
            break
    return _outcome(knob, trials, budget, stopped_by, bounds.elapsed(),
                    key=(lambda t: t.setting) if descending else (lambda t: -t.setting))


def _outcome(
    knob: str, trials: list[Trial], budget: Budget, stopped_by: str, seconds: float, key: Callable[[Trial], float]
) -> Outcome:
    """The most compressed (by ``key``) trial within budget, else the least-bad one."""
    within = [t for t in trials if t.within_budget]
    if within:
        best = max(within, key=lambda t: (key(t), t.val_accuracy))
        message = (f"{knob} {best.setting:g}: {_versus_baseline(best.drop_points)}, within the budget "
                   f"of {budget.max_drop_points:g} ({len(trials)} trials, stopped: {stopped_by})")
        message += _coarser_than_the_budget(best, budget) or ""
    else:
        best = max(trials, key=lambda t: (t.val_accuracy, key(t)))
        # Its verdict says on what it is over: a trial inside the accuracy budget lost a class.
        message = (f"no trial fits the budget of {budget.max_drop_points:g} points: kept the least-bad, {knob} "
                   f"{best.setting:g}, {_versus_baseline(best.drop_points)}, {_verdict(best, budget)} "
                   f"({len(trials)} trials, stopped: {stopped_by})")
    return Outcome(knob, best, trials, bool(within), stopped_by, seconds, budget, message)


def _coarser_than_the_budget(best: Trial, budget: Budget) -> str | None:
    """What to add to a search's message where the validation split measures the chosen
    trial's drop more coarsely than the budget allows (None where it does not): the test
    split, where the gate judges, may then find it over."""
    if best.noise_points is None or best.noise_points <= budget.max_drop_points or budget.baseline_predictions is None:
        return None
    samples = f"{len(budget.baseline_predictions)} validation samples" + (
        "" if budget.val_records is None else f" ({int(budget.val_records.max()) + 1} distinct records)")
    return (f"; but {samples} measure that drop only to ±{best.noise_points:.2f} points "
            f"(one standard error: the two models disagree on {best.disagreements} of them), coarser than the "
            f"budget: the gate may find it over on the test split (more validation data narrows it: "
            f"prepare.val_fraction)")


def _verdict(trial: Trial, budget: Budget) -> str:
    """``within budget``, or ``over budget`` and on what: the accuracy drop, a class, or both."""
    if trial.within_budget:
        return "within budget"
    why = [] if budget.fits(trial.val_accuracy) else [f"accuracy drop past {budget.max_drop_points:g} pt"]
    if trial.class_problem:
        why.append(trial.class_problem)
    return f"over budget: {'; '.join(why)}" if why else "over budget"


def _versus_baseline(drop_points: float) -> str:
    """``1.50 points below the baseline``; a model that gained reads ``0.40 points above``."""
    return f"{abs(drop_points):.2f} points {'below' if drop_points >= 0 else 'above'} the baseline"


def cubic_schedule(start: float, final: float, epochs: int) -> list[float]:
    """Gradual pruning (Zhu & Gupta 2017), s_t = s_f + (s_i - s_f)(1 - t/T)^3: the sparsity
    at the start of each of ``epochs`` epochs, rising from ``start`` to ``final`` over
    T = epochs - 1 steps (the last epoch trains at ``final``; one epoch: one-shot)."""
    ramp = max(1, epochs - 1)
    return [round(final + (start - final) * (1.0 - min(1.0, (t + 1) / ramp)) ** 3, 6) for t in range(epochs)]
