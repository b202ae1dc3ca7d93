"""Making one variant: its steps applied in order to its parent, each with its library.

:func:`make_variant` turns the parent :class:`~tasks.compression.candidate.Candidate`
into the variant's last eager model and the :class:`~tasks.compression.formats.Artifact`
it ships as. :class:`Work` holds what every variant's steps share (data, settings, the
fp32 ONNX exports of unchanged models, the fine-tuning curves).

What needs no training (export, fp16, static and dynamic int8, the pruning itself) runs
in this process; the steps that train (pruning and QAT fine-tuning, distillation) run on
the Horovod loop, each as a :class:`~tasks.compression.fine_tuning.TrainingStep`.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from tasks.compression import formats, pruning, quantization, search
from tasks.compression.candidate import Candidate, TrainingData
from tasks.compression.distillation import distill
from tasks.compression.fine_tuning import Trained, TrainingStep, fine_tune
from tasks.compression.formats import Artifact
from tasks.compression.onnx import export_onnx
from tasks.core.config import (
    CompressStep, DistillStep, ExportStep, HalfStep, Params, PruneStep, QuantizeStep, Variant,
)
from tasks.core.model_files import load_eager_model
from tasks.core.paths import ProjectPaths

log = logging.getLogger("slimflow.compress")


def trains(step: CompressStep) -> bool:
    """Whether ``step`` trains (on the Horovod loop): fine-tuning, QAT, distillation."""
    return isinstance(step, DistillStep) or (isinstance(step, (PruneStep, QuantizeStep)) and step.fine_tune_epochs > 0)


class Work:
    """What the steps of every variant share: data, settings, caches, the fine-tuning curves."""

    def __init__(self, params: Params, paths: ProjectPaths) -> None:
        from tasks.data import load_preprocessing, load_split

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

    def trained(self, step: TrainingStep, trained: Trained, method: str, epochs: int, extra: dict[str, Any]) -> None:
        """Keep a finished training step's curve (for its DVC plot) and record (for the manifest)."""
        self.curves[step.curve_name] = trained.history
        extra.setdefault("training", []).append(trained.record(method, epochs, step.number))

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


def _quantize_ort(
    candidate: Candidate, step: QuantizeStep, work: Work, what: str, run_id: str | None, extra: dict[str, Any]
) -> Artifact:
    fp32 = work.onnx_fp32(candidate)
    if step.mode == "static":
        calibration = work.data.calibration(work.params.compress.calibration_samples, work.params.base.seed)
        details = {**quantization.ORT_STATIC, **work.calibration_details()}
        if step.fallback == "auto":
            model, fp32_layers = _fallback_searched(candidate, fp32, calibration, work, what, run_id, extra)
            details["fp32_layers"] = fp32_layers  # the layers that fell back
        else:
            model = quantization.ort_static_int8(fp32, calibration)
    else:
        if candidate.family == "cnn":
            log.warning("%s: ONNX Runtime dynamic int8 runs convolutions slowly; mode: static suits CNNs", what)
        model = quantization.ort_dynamic_int8(fp32)
        details = dict(quantization.ORT_DYNAMIC)
    return formats.onnx_artifact(
        model, candidate.sparse, {"quantization": {"scheme": step.mode, "library": "onnxruntime.quantization", **details}}
    )


def _quantize_torch(
    candidate: Candidate, step: QuantizeStep, work: Work, what: str, training: TrainingStep | None,
    extra: dict[str, Any],
) -> Artifact:
    engine = quantization.quantized_engine()
    if step.mode == "dynamic":
        share = quantization.quantized_share(candidate.module)
        if share < 0.5:
            log.warning(
                "%s: torch dynamic int8 covers linear and recurrent layers only: %.0f%% of this %s's weights "
                "are quantized, the rest stay fp32", what, 100 * share, candidate.family,
            )
        quantized = quantization.torch_dynamic_int8(candidate.fresh_module())
    elif step.mode == "static":
        calibration = work.data.calibration(work.params.compress.calibration_samples, work.params.base.seed)
        quantized = quantization.torch_static_int8(candidate.fresh_module(), calibration)
    else:
        # QAT trains on the Horovod loop (a sparse model keeps its zeros), then converts here.
        assert training is not None
        trained = fine_tune(
            candidate, training, epochs=step.fine_tune_epochs, lr=work.fine_tune_lr(step), qat_engine=engine,
            masks=pruning.zero_masks(candidate.module) if candidate.sparse else None,
        )
        work.trained(training, trained, "quantize", step.fine_tune_epochs, extra)
        quantized = quantization.convert_qat(trained.folder)
    artifact = formats.torch_quantized_artifact(candidate, quantized, step.mode, engine)
    if step.mode == "static":
        artifact.extra["quantization"].update(work.calibration_details())
    return artifact


def _prune(
    candidate: Candidate, step: PruneStep, work: Work, training: TrainingStep | None, extra: dict[str, Any]
) -> Candidate:
    """Prune here; fine-tune on the Horovod loop: under the masks (unstructured), or the
    physically smaller model (structured). ``sparsity: auto``: searched (:func:`_prune_searched`)."""
    if step.sparsity == "auto":
        assert training is not None
        if step.kind == "structured":
            return _prune_structured_searched(candidate, step, work, training, extra)
        return _prune_searched(candidate, step, work, training, extra)
    masks = None
    if step.kind == "unstructured":
        pruned, masks = pruning.prune_unstructured(candidate, step.sparsity)
    else:
        pruned = pruning.prune_structured(candidate, step.sparsity, work.data.example())
    if training is None:
        return pruned
    if masks is None and pruned.sparse:  # a sparse parent's zeros stay zeros
        masks = pruning.zero_masks(pruned.module)
    trained = fine_tune(pruned, training, epochs=step.fine_tune_epochs, lr=work.fine_tune_lr(step), masks=masks)
    work.trained(training, trained, "prune", step.fine_tune_epochs, extra)
    return pruned.changed(load_eager_model(trained.folder))


def _prune_searched(
    candidate: Candidate, step: PruneStep, work: Work, training: TrainingStep, extra: dict[str, Any]
) -> Candidate:
    """``sparsity: auto``: gradual (cubic) pruning while fine-tuning, one trial per final
    sparsity, bisected to the highest within the budget (:func:`tasks.compression.search.search_sparsity`);
    each trial continues from the best passing one. Records the trail (manifest ``search``,
    MLflow, ``plots/search``)."""
    from dataclasses import replace

    from tasks.compression.candidate import accuracy
    from tasks.compression.weights import parameters_and_nonzeros, weight_sparsity
    from tasks.core.model_files import torch_predictor

    assert work.baseline_accuracy is not None
    budget = search.Budget.of(work.params, work.baseline_accuracy)
    trained_by_trial: dict[int, tuple[TrainingStep, Trained]] = {}

    def run_trial(target: float, warm: search.Trial | None, number: int) -> search.Trial:
        started = time.perf_counter()
        origin: Candidate = warm.model if warm is not None else candidate
        trial_step = replace(training, trial=number)
        schedule = search.cubic_schedule(min(weight_sparsity(origin.module), target), target, step.fine_tune_epochs)
        trained = fine_tune(origin, trial_step, epochs=step.fine_tune_epochs, lr=work.fine_tune_lr(step),
                            masks=pruning.zero_masks(origin.module), prune_schedule=schedule)
        trained_by_trial[number] = (trial_step, trained)
        model = origin.changed(load_eager_model(trained.folder), sparse=True)
        val_accuracy = accuracy(torch_predictor(model.module)(work.data.x_val), work.data.y_val)
        _, nonzeros = parameters_and_nonzeros(model.module)
        size = len(formats.gzip.compress(formats.torch_bytes(model.module.state_dict()), compresslevel=9, mtime=0))
        return search.Trial(
            number, target, val_accuracy, budget.drop_points(val_accuracy), budget.fits(val_accuracy), size,
            nonzeros, round(weight_sparsity(model.module), 6), time.perf_counter() - started,
            warm.setting if warm is not None else None, model,
        )

    outcome = search.search_sparsity(run_trial, budget)
    trial_step, trained = trained_by_trial[outcome.best.number]
    work.curves[training.curve_name] = trained.history
    extra.setdefault("training", []).append(
        {**trained.record("prune", step.fine_tune_epochs, training.number), "trial": outcome.best.number}
    )
    extra["search"] = {
        **outcome.record(),
        # the search's cost in epochs: every trial's fine-tuning (early stopping may cut one short)
        "epochs_run": sum(trained_by_trial[t.number][1].summary.get("epochs_run", 0) for t in outcome.trials),
    }
    return _recorded(outcome, training, work, extra["search"])


def _prune_structured_searched(
    candidate: Candidate, step: PruneStep, work: Work, training: TrainingStep, extra: dict[str, Any]
) -> Candidate:
    """Structured ``sparsity: auto`` (mlp, cnn; a transformer: :func:`_prune_heads_searched`):
    measure each layer's sensitivity (pruned alone at
    :data:`search.SENSITIVITY_RATIOS`, no fine-tuning), then bisect the global channel ratio
    (:func:`search.search_ratio`), shared out between the layers by their sensitivity
    (:func:`search.layer_ratios`: the least sensitive pruned most); each trial prunes (from the
    best passing trial, or the parent) to its per-layer widths and fine-tunes on the Horovod
    loop. Records the sensitivity (table in the log, chart and rows in MLflow, ``plots/sensitivity``)
    and the trail (manifest ``search``, MLflow, ``plots/search``)."""
    from dataclasses import replace

    if candidate.spec.family == "transformer":
        return _prune_heads_searched(candidate, step, work, training, extra)
    from tasks.compression import sensitivity
    from tasks.compression.candidate import accuracy
    from tasks.compression.weights import parameters_and_nonzeros, weight_sparsity
    from tasks.core.model_files import torch_predictor
    from tasks.core.tables import as_text

    assert work.baseline_accuracy is not None
    budget = search.Budget.of(work.params, work.baseline_accuracy)
    example, x_val, y_val = work.data.example(), work.data.x_val, work.data.y_val

    def val_accuracy(model: Candidate) -> float:
        return accuracy(torch_predictor(model.module)(x_val), y_val)

    began = time.perf_counter()
    widths = pruning.layer_widths(candidate.module)
    measured = pruning.structured_sensitivity(candidate, example, search.SENSITIVITY_RATIOS, val_accuracy)
    rows = sensitivity.rows(measured, widths, val_accuracy(candidate))
    scores = {layer: search.sensitivity_score(drops) for layer, drops in sensitivity.drops_by_layer(rows).items()}
    sensitivity_seconds = time.perf_counter() - began
    trained_by_trial: dict[int, Trained] = {}
    ratios_by_trial: dict[int, dict[str, float]] = {}

    def run_trial(ratio: float, warm: search.Trial | None, number: int) -> search.Trial:
        started = time.perf_counter()
        ratios = search.layer_ratios(ratio, widths, scores)
        keep = search.kept_widths(widths, ratios)
        origin: Candidate = warm.model if warm is not None else candidate
        current = pruning.layer_widths(origin.module)
        pruned = pruning.prune_structured(origin, 0.0, example, {k: min(keep[k], current[k]) for k in keep})
        masks = pruning.zero_masks(pruned.module) if pruned.sparse else None  # a sparse parent's zeros stay zeros
        trial_step = replace(training, trial=number)
        trained = fine_tune(pruned, trial_step, epochs=step.fine_tune_epochs, lr=work.fine_tune_lr(step), masks=masks)
        trained_by_trial[number], ratios_by_trial[number] = trained, ratios
        model = pruned.changed(load_eager_model(trained.folder))
        accuracy_now = val_accuracy(model)
        _, nonzeros = parameters_and_nonzeros(model.module)
        return search.Trial(
            number, ratio, accuracy_now, budget.drop_points(accuracy_now), budget.fits(accuracy_now),
            len(formats.torch_bytes(model.module.state_dict())), nonzeros, round(weight_sparsity(model.module), 6),
            time.perf_counter() - started, warm.setting if warm is not None else None, model,
        )

    outcome = search.search_ratio(run_trial, budget)
    best = outcome.best
    trained = trained_by_trial[best.number]
    work.curves[training.curve_name] = trained.history
    extra.setdefault("training", []).append(
        {**trained.record("prune", step.fine_tune_epochs, training.number), "trial": best.number}
    )
    extra["search"] = {
        **outcome.record(),
        "layer_ratios": ratios_by_trial[best.number], "widths_before": widths,
        "widths": pruning.layer_widths(best.model.module), "sensitivity": scores,
        "sensitivity_seconds": round(sensitivity_seconds, 2),
        "epochs_run": sum(t.summary.get("epochs_run", 0) for t in trained_by_trial.values()),
    }
    work.sensitivities[training.variant] = rows
    shown = sensitivity.table(rows, ratios_by_trial[best.number], title=f"{training.variant}: sensitivity per layer")
    log.info("%s: per-layer sensitivity (%.1fs):\n%s", training.variant, sensitivity_seconds, as_text(shown))
    if training.run_id is not None:
        import mlflow

        client = mlflow.MlflowClient()
        client.log_dict(training.run_id, rows, "search/sensitivity.json")
        client.log_text(training.run_id, as_text(shown), "search/sensitivity.txt")
        _log_png(client, training.run_id, sensitivity.chart_png(rows, f"{training.variant}: per-layer sensitivity"),
                 "search/sensitivity.png")
    return _recorded(outcome, training, work, extra["search"])


def _log_png(client: Any, run_id: str, png: bytes, artifact: str) -> None:
    """PNG bytes as the run's ``artifact`` (MLflow logs files: through a temporary folder)."""
    import tempfile
    from pathlib import Path

    folder, name = artifact.rsplit("/", 1)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / name).write_bytes(png)
        client.log_artifact(run_id, str(Path(tmp) / name), folder)


def _prune_heads_searched(
    candidate: Candidate, step: PruneStep, work: Work, training: TrainingStep, extra: dict[str, Any]
) -> Candidate:
    """Structured ``sparsity: auto`` of a transformer: prune :data:`search.STRUCTURED_SPARSITIES` of the channels /
    heads / units from the parent, highest first, each fine-tuned on the Horovod loop; the
    first within budget is kept (:func:`search.search_structured`)."""
    from dataclasses import replace

    from tasks.compression.candidate import accuracy
    from tasks.compression.weights import parameters_and_nonzeros
    from tasks.core.model_files import torch_predictor

    assert work.baseline_accuracy is not None
    budget = search.Budget.of(work.params, work.baseline_accuracy)
    before, _ = parameters_and_nonzeros(candidate.module)
    trained_by_trial: dict[int, Trained] = {}

    def run_trial(sparsity: float, number: int) -> search.Trial:
        began = time.perf_counter()
        pruned = pruning.prune_structured(candidate, sparsity, work.data.example())
        trained = fine_tune(pruned, replace(training, trial=number), epochs=step.fine_tune_epochs,
                            lr=work.fine_tune_lr(step))
        trained_by_trial[number] = trained
        model = pruned.changed(load_eager_model(trained.folder))
        val_accuracy = accuracy(torch_predictor(model.module)(work.data.x_val), work.data.y_val)
        parameters, nonzeros = parameters_and_nonzeros(model.module)
        return search.Trial(
            number, sparsity, val_accuracy, budget.drop_points(val_accuracy), budget.fits(val_accuracy),
            len(formats.torch_bytes(model.module.state_dict())), nonzeros,
            round(1.0 - parameters / before, 6),  # the share of the parameters removed
            time.perf_counter() - began, None, model,
        )

    outcome = search.search_structured(run_trial, budget)
    trained = trained_by_trial[outcome.best.number]
    work.curves[training.curve_name] = trained.history
    extra.setdefault("training", []).append(
        {**trained.record("prune", step.fine_tune_epochs, training.number), "trial": outcome.best.number}
    )
    extra["search"] = {**outcome.record(), "sparsities": list(search.STRUCTURED_SPARSITIES),
                       "epochs_run": sum(t.summary.get("epochs_run", 0) for t in trained_by_trial.values())}
    return _recorded(outcome, training, work, extra["search"])


def _distill_searched(
    candidate: Candidate, step: DistillStep, work: Work, training: TrainingStep, extra: dict[str, Any]
) -> Candidate:
    """``student_width: auto``: students of :data:`search.STUDENT_WIDTHS` x the teacher's width,
    smallest first, each distilled on the Horovod loop; the first within budget is kept
    (:func:`search.search_width`)."""
    from dataclasses import replace

    from tasks.compression.candidate import accuracy
    from tasks.compression.weights import parameters_and_nonzeros, weight_sparsity
    from tasks.core.model_files import torch_predictor

    assert work.baseline_accuracy is not None
    budget = search.Budget.of(work.params, work.baseline_accuracy)
    widths = [round(share * candidate.spec.width, 6) for share in search.STUDENT_WIDTHS]
    trained_by_trial: dict[int, Trained] = {}

    def run_trial(width: float, number: int) -> search.Trial:
        began = time.perf_counter()
        student, trained = distill(
            candidate, replace(training, trial=number), student_family=step.student_family, student_width=width,
            student_layers=step.student_layers, temperature=step.temperature, alpha=step.alpha, epochs=step.epochs, lr=step.lr,
        )
        trained_by_trial[number] = trained
        val_accuracy = accuracy(torch_predictor(student.module)(work.data.x_val), work.data.y_val)
        _, nonzeros = parameters_and_nonzeros(student.module)
        size = len(formats.torch_bytes(student.module.state_dict()))
        return search.Trial(number, width, val_accuracy, budget.drop_points(val_accuracy), budget.fits(val_accuracy),
                            size, nonzeros, round(weight_sparsity(student.module), 6),
                            time.perf_counter() - began, None, student)

    outcome = search.search_width(widths, run_trial, budget)
    trained = trained_by_trial[outcome.best.number]
    work.curves[training.curve_name] = trained.history
    extra.setdefault("training", []).append(
        {**trained.record("distill", step.epochs, training.number), "trial": outcome.best.number}
    )
    extra["search"] = {**outcome.record(), "widths": widths,
                       "epochs_run": sum(t.summary.get("epochs_run", 0) for t in trained_by_trial.values())}
    return _recorded(outcome, training, work, extra["search"])


SENSITIVITY_SAMPLES = 256  # validation samples the per-layer output error is measured on


def _fallback_searched(
    candidate: Candidate, fp32: bytes, calibration: Any, work: Work, what: str, run_id: str | None,
    extra: dict[str, Any],
) -> tuple[bytes, list[str]]:
    """``fallback: auto``: rank the weighted layers by the output error each costs when it
    alone is int8 (normalized MSE of the logits against fp32 on the validation split), then
    keep the worst in fp32, one more per trial, until the drop fits (:func:`search.search_fallback`).
    Returns the chosen model and its fp32 layers."""
    import numpy as np

    from tasks.compression.candidate import accuracy
    from tasks.compression.onnx import onnx_predictor
    from tasks.compression.weights import parameters_and_nonzeros, weight_sparsity

    assert work.baseline_accuracy is not None
    budget = search.Budget.of(work.params, work.baseline_accuracy)
    started = time.perf_counter()
    layers = quantization.ort_weighted_nodes(fp32)
    x_val, y_val = work.data.x_val, work.data.y_val
    probe = x_val[:SENSITIVITY_SAMPLES]
    reference = onnx_predictor(fp32)(probe)
    sensitivity: dict[str, float] = {}
    for layer in layers:  # this layer alone in int8
        alone = quantization.ort_static_int8(fp32, calibration, nodes_to_exclude=[n for n in layers if n != layer])
        error = float(np.mean((onnx_predictor(alone)(probe) - reference) ** 2) / max(np.mean(reference**2), 1e-12))
        sensitivity[layer] = error
    ranked = sorted(layers, key=lambda name: -sensitivity[name])
    log.info("%s: layers by the output error int8 costs them: %s", what,
             ", ".join(f"{name} {sensitivity[name]:.2e}" for name in ranked))
    _, nonzeros = parameters_and_nonzeros(candidate.module)
    sparsity = round(weight_sparsity(candidate.module), 6)

    def run_trial(fp32_layers: list[str], number: int) -> search.Trial:
        began = time.perf_counter()
        model = quantization.ort_static_int8(fp32, calibration, nodes_to_exclude=fp32_layers)
        val_accuracy = accuracy(onnx_predictor(model)(x_val), y_val)
        return search.Trial(number, float(len(fp32_layers)), val_accuracy, budget.drop_points(val_accuracy),
                            budget.fits(val_accuracy), len(model), nonzeros, sparsity,
                            time.perf_counter() - began, None, (model, list(fp32_layers)))

    outcome = search.search_fallback(ranked, run_trial, budget, started=started)
    model, fp32_layers = outcome.best.model
    record = {**outcome.record(), "fp32_layers": fp32_layers, "sensitivity": sensitivity,
              "ranking_seconds": round(outcome.seconds - sum(t.seconds for t in outcome.trials), 2)}
    extra["search"] = record
    rows = [{**trial.row(), "fp32_layers": trial.model[1]} for trial in outcome.trials]
    name = what.split(" step ")[0]
    work.searches[name] = rows
    if run_id is not None:
        _log_search(run_id, rows, record)
        import mlflow

        mlflow.MlflowClient().log_dict(run_id, sensitivity, "search/sensitivity.json")
    log.info("%s: %s; fp32 layers: %s", what, outcome.message, fp32_layers or "none")
    return model, fp32_layers


def _log_search(run_id: str, rows: list[dict[str, Any]], record: dict[str, Any]) -> None:
    """Each trial as step-indexed ``search/...`` metrics, the table and the chosen setting in the variant's run."""
    import mlflow

    from tasks.core.metric_names import SEARCH_TRIAL_KEYS

    client = mlflow.MlflowClient()
    for row in rows:
        for name, key in SEARCH_TRIAL_KEYS.items():
            client.log_metric(run_id, name, float(row[key]), step=row["number"])
    client.log_dict(run_id, rows, "search/trials.json")
    client.log_dict(run_id, record, "search/chosen.json")
    client.set_tag(run_id, "search", f"{record['knob']}={record['chosen']:g}"
                   + ("" if record["within_budget"] else " (over budget)"))


def _export(candidate: Candidate, step: ExportStep, work: Work) -> Artifact:
    if step.runtime == "onnxruntime":
        return formats.onnx_artifact(work.onnx_fp32(candidate), candidate.sparse, {})
    return formats.export_artifact(candidate, work.data.example())


def _distill(candidate: Candidate, step: DistillStep, work: Work, training: TrainingStep, extra: dict[str, Any]) -> Candidate:
    if step.student_width == "auto":
        return _distill_searched(candidate, step, work, training, extra)
    student, trained = distill(
        candidate, training, student_family=step.student_family, student_width=step.student_width,
        student_layers=step.student_layers, temperature=step.temperature, alpha=step.alpha, epochs=step.epochs, lr=step.lr,
    )
    work.trained(training, trained, "distill", step.epochs, extra)
    return student


def make_variant(
    variant: Variant, parent: Candidate, work: Work, run_id: str | None
) -> tuple[Candidate, Artifact, dict[str, Any]]:
    """Apply the variant's steps to its parent; return (last eager model, artifact, extra manifest fields).

    Eager steps (prune, distill) change the candidate; a final step (quantize, half,
    export) makes the artifact; without one the artifact is the eager model's state_dict.
    Training steps log their curves into ``run_id`` (the variant's MLflow run).
    """
    candidate, artifact, extra = parent, None, {}
    several = sum(trains(step) for step in variant.steps) > 1
    for number, step in enumerate(variant.steps, start=1):
        what = f"{variant.name} step {number} ({step.method})"
        training = TrainingStep(work.params, work.paths, variant.name, number, run_id, several) if trains(step) else None
        started, cpu = time.perf_counter(), time.process_time()
        if isinstance(step, PruneStep):
            candidate = _prune(candidate, step, work, training, extra)
        elif isinstance(step, DistillStep):
            extra["teacher"] = candidate.origin or f"{variant.name} before step {number}"
            candidate = _distill(candidate, step, work, training, extra)
        elif isinstance(step, QuantizeStep):
            if step.runtime == "onnxruntime":
                artifact = _quantize_ort(candidate, step, work, what, run_id, extra)
            else:
                artifact = _quantize_torch(candidate, step, work, what, training, extra)
        elif isinstance(step, HalfStep):
            artifact = formats.half_artifact(candidate)
        elif isinstance(step, ExportStep):
            artifact = _export(candidate, step, work)
        log.info("%s: done in %.1fs (%.1fs CPU here)", what, time.perf_counter() - started, time.process_time() - cpu)
    return candidate, artifact or formats.state_dict_artifact(candidate), extra


def _recorded(outcome: Any, training: Any, work: Any, search: dict[str, Any]) -> Any:
    """Keep a finished search's trials (compress table, MLflow run) and return its best model."""
    rows = [trial.row() for trial in outcome.trials]
    work.searches[training.variant] = rows
    if training.run_id is not None:
        _log_search(training.run_id, rows, search)
    log.info("%s: %s", training.variant, outcome.message)
    return outcome.best.model
