"""Making one variant: its steps applied in order to its parent, each with its library.

:func:`make_variant` turns the parent :class:`~tasks.compression.candidate.Candidate`
into the variant's last eager model and the :class:`~tasks.compression.formats.Artifact`
it ships as. :class:`~tasks.compression.work.Work` holds what every variant's steps share;
the steps with an ``auto`` knob are in :mod:`tasks.compression.searched`.

What needs no training (export, fp16, static and dynamic int8, the pruning itself) runs
in this process; the steps that train (pruning and QAT fine-tuning, distillation) run on
the Horovod loop, each as a :class:`~tasks.compression.fine_tuning.TrainingStep`.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from tasks.compression import formats, pruning, quantization, searched
from tasks.compression.candidate import Candidate
from tasks.compression.distillation import distill
from tasks.compression.fine_tuning import TrainingStep, fine_tune
from tasks.compression.formats import Artifact
from tasks.compression.work import Work
from tasks.core.config import CompressStep, DistillStep, ExportStep, HalfStep, PruneStep, QuantizeStep, Variant
from tasks.core.model_files import load_eager_model

log = logging.getLogger("slimflow.compress")


def trains(step: CompressStep) -> bool:
    """Whether ``step`` trains (on the Horovod loop): fine-tuning, QAT, distillation."""
    return isinstance(step, DistillStep) or (isinstance(step, (PruneStep, QuantizeStep)) and step.fine_tune_epochs > 0)


def _quantize_ort(
    candidate: Candidate, step: QuantizeStep, work: Work, what: str, run_id: str | None, extra: dict[str, Any]
) -> Artifact:
    fp32 = work.onnx_fp32(candidate)
    if step.mode == "static":
        calibration = work.data.calibration(work.params.compress.calibration_samples, work.params.base.seed)
        details = {**quantization.ORT_STATIC, **work.calibration_details()}
        if step.fallback == "auto":
            model, fp32_layers = searched.fallback_searched(candidate, fp32, calibration, work, what, run_id, extra)
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
    physically smaller model (structured). ``sparsity: auto``: searched (:mod:`tasks.compression.searched`)."""
    if step.sparsity == "auto":
        assert training is not None
        if step.kind == "structured":
            return searched.prune_structured_searched(candidate, step, work, training, extra)
        return searched.prune_searched(candidate, step, work, training, extra)
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


def _export(candidate: Candidate, step: ExportStep, work: Work) -> Artifact:
    if step.runtime == "onnxruntime":
        return formats.onnx_artifact(work.onnx_fp32(candidate), candidate.sparse, {})
    return formats.export_artifact(candidate, work.data.example())


def _distill(candidate: Candidate, step: DistillStep, work: Work, training: TrainingStep, extra: dict[str, Any]) -> Candidate:
    if step.student_width == "auto":
        return searched.distill_searched(candidate, step, work, training, extra)
    student, trained = distill(
        candidate, training, student_family=step.student_family, student_width=step.student_width,
        student_layers=step.student_layers, temperature=step.temperature, alpha=step.alpha, epochs=step.epochs, lr=step.lr,
        student_init=step.student_init, example=work.data.example(),
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
