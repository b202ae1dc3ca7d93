"""What the steps of every variant share while the compress stage runs (:class:`Work`): the
data, the settings, the fp32 ONNX exports of unchanged models, and what the steps leave
for the stage's outputs (fine-tuning curves, search trials, per-layer sensitivity)."""

from __future__ import annotations

import logging
from typing import Any

from tasks.compression.candidate import Candidate, TrainingData
from tasks.compression.fine_tuning import Trained, TrainingStep
from tasks.compression.onnx import export_onnx
from tasks.compression.search import Budget
from tasks.core.config import Params, PruneStep, QuantizeStep
from tasks.core.paths import ProjectPaths
from tasks.training.reporting import still_improving

log = logging.getLogger("slimflow.compress")


class Work:
    """What the steps of every variant share: data, settings, caches, the fine-tuning curves."""

    def __init__(self, params: Params, paths: ProjectPaths) -> None:
        from tasks.data import load_preprocessing, load_split, record_ids

        self.params, self.paths = params, paths
        preprocessing = load_preprocessing(paths.prepared)
        train = load_split(paths.prepared, "train", preprocessing)
        val = load_split(paths.prepared, "val", preprocessing)
        self.data = TrainingData(train.x, train.y, val.x, val.y)
        self.input_shape = tuple(preprocessing.input_shape)
        self.num_classes = preprocessing.num_classes
        self.onnx_exports: dict[str, bytes] = {}  # fp32 exports of unchanged saved models, by name
        # Per-epoch curves of every training step, by plot name (plots/fine_tune/<name>.json).
        self.curves: dict[str, list[dict[str, Any]]] = {}
        # Every searched variant's trials (plots/search/<variant>.json), by variant.
        self.searches: dict[str, list[dict[str, Any]]] = {}
        # Structured searches' per-layer sensitivity (plots/sensitivity/<variant>.json), by variant.
        self.sensitivities: dict[str, list[dict[str, Any]]] = {}
        self.baseline_accuracy: float | None = None  # the baseline's val accuracy: the budget's reference
        self.class_names = tuple(preprocessing.class_names)
        self.baseline_classes: dict[str, dict[str, float]] = {}  # its val recall per class (and support)
        self.baseline_predictions: Any = None  # its class for each val sample (a drop's noise is measured against it)
        self.val_records = record_ids(paths.prepared, "val")  # copies of one record count once (None: no copies)

    def set_baseline(self, val_logits: Any) -> float:
        """The baseline's validation figures, which every searched variant's budget is measured
        against (:meth:`budget`); returns its validation accuracy."""
        from tasks.core.classification import classification_metrics

        self.baseline_predictions = val_logits.argmax(1)
        quality, self.baseline_classes, _ = classification_metrics(self.data.y_val, self.baseline_predictions,
                                                                    self.class_names)
        self.baseline_accuracy = quality["accuracy"]
        return self.baseline_accuracy

    def budget(self) -> Budget:
        """A searched variant's budget (``compress.budget``; its defaults: the gate's limits), against the baseline."""
        assert self.baseline_accuracy is not None, "the baseline is measured first (set_baseline)"
        return Budget.of(self.params, self.baseline_accuracy, self.baseline_classes, self.baseline_predictions,
                         self.val_records)

    def trained(self, step: TrainingStep, trained: Trained, method: str, epochs: int, extra: dict[str, Any]) -> None:
        """Keep a finished training step's curve (for its DVC plot) and record (for the manifest)."""
        self.curves[step.curve_name] = trained.history
        extra.setdefault("training", []).append(trained.record(method, epochs, step.number))
        note = still_improving(trained.summary.get("val_accuracy_late_gain_pts", 0.0), epochs,
                               self.params.train.patience, self.params.evaluate.gate.max_accuracy_drop_pts)
        if note and not trained.reused:
            log.info("%s step %d (%s): %s (the step's epochs set them)", step.variant, step.number, method, note)

    def fine_tune_lr(self, step: PruneStep | QuantizeStep) -> float:
        return step.lr or self.params.compress.fine_tune_lr

    def onnx_fp32(self, candidate: Candidate) -> bytes:
        """The candidate as fp32 ONNX, exported once per saved model it is a copy of."""
        if candidate.origin is None:
            return export_onnx(candidate.module, self.data.example())
        if candidate.origin not in self.onnx_exports:
            self.onnx_exports[candidate.origin] = export_onnx(candidate.module, self.data.example())
        return self.onnx_exports[candidate.origin]

    def calibration_details(self) -> dict[str, Any]:
        samples = self.params.compress.calibration_samples
        return {"calibration_split": "train", "calibration_samples": min(samples, len(self.data.x_train))}
