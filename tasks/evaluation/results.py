"""What the evaluate stage measured and decided, as plain data: one :class:`ModelResult`
per model (the same metric keys for every model), the :class:`Evaluation` around them,
and the ratios to the baseline."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tasks.core import metric_names as names
from tasks.core.classification import paired_change_noise
from tasks.evaluation.timing import paired_saving_noise

BASELINE = "baseline"


class EvaluateError(RuntimeError):
    """An input of the stage is missing or unreadable; the message names it."""


@dataclass
class ModelResult:
    """One model's measurements (``metrics`` has the same keys for every model)."""

    name: str
    folder: Path
    manifest: dict[str, Any]
    metrics: dict[str, float]
    predictions: np.ndarray
    confusion: np.ndarray
    notes: dict[str, str] = field(default_factory=dict)  # how a figure was obtained
    per_class: dict[str, dict[str, float]] = field(default_factory=dict)  # {class: {precision, recall, f1, support}}

    @property
    def method(self) -> str:
        return str(self.manifest.get("method") or BASELINE)

    @property
    def runtime(self) -> str:
        return str(self.manifest.get("runtime", "unknown"))


@dataclass
class Evaluation:
    """Everything the stage measured and decided."""

    models: dict[str, ModelResult]  # the baseline first
    class_names: tuple[str, ...]
    y_true: np.ndarray
    settings: dict[str, Any]
    champion: str | None = None
    reasons: dict[str, str] = field(default_factory=dict)
    promotion: Any = None  # tasks.evaluation.promotion.Promotion
    run_ids: dict[str, str] = field(default_factory=dict)  # each model's own MLflow run
    model_uris: dict[str, str] = field(default_factory=dict)  # each model's logged MLflow model
    stage_run_id: str | None = None
    # What may make the comparison mislead (e.g. a baseline still improving): shown with the result.
    caveats: list[str] = field(default_factory=list)
    # Each test sample's record where the split holds copies of one (equal ids; None: none):
    # a change is counted over records, which a model gets right or wrong with all their copies.
    records: np.ndarray | None = None

    def metrics(self) -> dict[str, dict[str, float]]:
        return {name: result.metrics for name, result in self.models.items()}

    @property
    def shown_model(self) -> str:
        """The model whose confusion matrix is published: the champion, else the baseline."""
        return self.champion or BASELINE


def add_ratios(results: Mapping[str, ModelResult], y_true: np.ndarray | None = None,
               energy_readings: Mapping[str, Sequence[float]] | None = None,
               energy_steps: Mapping[str, float] | None = None, records: np.ndarray | None = None) -> None:
    """The figures relative to the baseline: accuracy change (points) and "times better" ratios;
    with the split's labels (``y_true``: the predictions' samples) also how finely the split
    measures each accuracy change, and with each model's energy readings (per 1k predictions,
    read in the same passes; ``energy_steps``: the meter's step in those units) how finely
    the run measures each energy saving (NaN without). ``records``: each sample's record, where
    the split holds copies (:attr:`Evaluation.records`)."""
    base = results[BASELINE].metrics
    readings, steps = energy_readings or {}, energy_steps or {}
    base_right = None if y_true is None else results[BASELINE].predictions == y_true

    def ratio(value: float, reference: float) -> float:
        return value / reference if reference and not math.isnan(reference) and not math.isnan(value) else math.nan

    for result in results.values():
        metrics = result.metrics
        # Rounded: accuracies are ratios of counts, and -0.5000000000000004 pts helps nobody.
        metrics[names.ACCURACY_CHANGE_PTS] = round(100.0 * (metrics[names.ACCURACY] - base[names.ACCURACY]), 6)
        metrics[names.ACCURACY_CHANGE_NOISE_PTS] = math.nan if base_right is None else round(
            100.0 * paired_change_noise(base_right, result.predictions == y_true, records)[0], 6)
        metrics[names.SIZE_REDUCTION_X] = ratio(base[names.SIZE_BYTES], metrics[names.SIZE_BYTES])
        metrics[names.SPEEDUP_X] = ratio(base[names.LATENCY_P50_MS], metrics[names.LATENCY_P50_MS])
        metrics[names.THROUGHPUT_GAIN_X] = ratio(metrics[names.THROUGHPUT_SPS], base[names.THROUGHPUT_SPS])
        saved = base.get(names.ENERGY_PER_1K_J, math.nan) - metrics.get(names.ENERGY_PER_1K_J, math.nan)
        metrics[names.ENERGY_SAVED_PER_1K_J] = saved
        paired = min(len(readings.get(BASELINE, ())), len(readings.get(result.name, ())))
        noise = (math.nan if result.name == BASELINE
                 else paired_saving_noise(readings.get(BASELINE, ()), readings.get(result.name, ()),
                                          steps.get(BASELINE, 0.0), steps.get(result.name, 0.0)))
        metrics[names.ENERGY_SAVED_PER_1K_NOISE_J] = noise
        metrics[names.PAYBACK_PREDICTIONS] = (
            math.nan if result.name == BASELINE
            else payback_predictions(metrics.get(names.MAKE_ENERGY_J, math.nan), saved, saving_margin(noise, paired))
        )
        metrics[names.WORST_CLASS_RECALL_CHANGE_PTS] = worst_class_recall_change_pts(
            result.per_class, results[BASELINE].per_class)
        metrics.setdefault(names.PASSED_GATE, math.nan)


def worst_class_recall_change_pts(per_class: Mapping[str, Mapping[str, float]],
                                  baseline_per_class: Mapping[str, Mapping[str, float]]) -> float:
    """The lowest, over the classes, of a class's recall minus the baseline's, in points
    (NaN without per-class figures): what a compressed model forgot, where accuracy, an
    average dominated by the large classes, hides it."""
    changes = [100.0 * (float(per_class[c]["recall"]) - float(row["recall"]))
               for c, row in baseline_per_class.items() if c in per_class]
    return round(min(changes), 6) if changes else math.nan


def saving_margin(noise_j: float, readings: int) -> float:
    """How far above zero a saving must be to count: the half-width of its 95% interval,
    Student's t with ``readings - 1`` degrees of freedom times ``noise_j`` (one standard
    error). With five readings that is 2.78 standard errors, not 2: the noise is itself
    estimated from five pairs. NaN without a noise or with fewer than two readings."""
    if readings < 2 or not math.isfinite(noise_j):
        return math.nan
    from scipy.special import stdtrit  # only the evaluate stage's last step needs it (0.26 s to import)

    return float(stdtrit(readings - 1, 0.975)) * noise_j


def payback_predictions(make_energy_j: float, saved_per_1k_j: float, saved_margin_j: float = math.nan) -> float:
    """Predictions after which a variant has repaid the energy spent making it.

    ``make_energy_j``: what making it cost (from the trained baseline); ``saved_per_1k_j``:
    the baseline's energy per 1,000 predictions minus the variant's; ``saved_margin_j``: how
    far above zero the saving must be to count (:func:`saving_margin`; NaN: not known). A
    variant that saves nothing, or no more than the margin (a model that computes what the
    baseline computes reads a few percent either side of it, run by run), never pays back
    (inf); an unknown figure gives NaN.
    """
    if math.isnan(make_energy_j) or math.isnan(saved_per_1k_j):
        return math.nan
    if saved_per_1k_j <= 0 or (math.isfinite(saved_margin_j) and saved_per_1k_j <= saved_margin_j):
        return math.inf
    return make_energy_j / (saved_per_1k_j / 1000.0)


def ordered_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    """The model figures of the vocabulary, headline first (missing ones as NaN, so every
    model has the same keys); anything else in ``metrics`` is not a figure and is left out."""
    return {key: metrics.get(key, math.nan) for key in names.MODEL_FIGURES}


def json_number(value: Any) -> Any:
    """A metric value as JSON holds it: NaN/inf as None (the key stays), whole floats as int."""
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN; the key stays, so every model keeps the same keys
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    return value
