"""Making one variant: its steps applied in order to its parent, each with its library.

:func:`make_variant` turns the parent :class:`~tasks.compression.candidate.Candidate`
into the variant's last eager model and the :class:`~tasks.compression.formats.Artifact`
it ships as. :class:`Work` holds what every variant's steps share (data, settings,
scratch space, the fp32 ONNX exports of unchanged models).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

from torch import nn

from tasks.compression import formats, pruning, quantization
from tasks.compression.candidate import Candidate, TrainingData, fine_tune
from tasks.compression.distillation import distill
from tasks.compression.formats import Artifact
from tasks.compression.onnx import export_onnx
from tasks.core.config import (
    CompressStep, DistillStep, ExportStep, HalfStep, Params, PruneStep, QuantizeStep, Variant,
)
from tasks.core.paths import ProjectPaths

log = logging.getLogger("slimflow.compress")


class Work:
    """What the steps of every variant share: data, settings, scratch space, caches."""

    def __init__(self, params: Params, paths: ProjectPaths, scratch: Path) -> None:
        from tasks.data import load_preprocessing, load_split

        self.params, self.paths, self.scratch = params, paths, scratch
        preprocessing = load_preprocessing(paths.prepared)
        train = load_split(paths.prepared, "train", preprocessing)
        val = load_split(paths.prepared, "val", preprocessing)
        self.data = TrainingData(train.x, train.y, val.x, val.y)
        self.input_shape = tuple(preprocessing.input_shape)
        self.num_classes = preprocessing.num_classes
        self.onnx_exports: dict[str, bytes] = {}  # fp32 exports of unchanged saved models, by name

    def fine_tuner(self, step: PruneStep | QuantizeStep, what: str) -> Callable[[nn.Module], nn.Module] | None:
        """The step's fine-tuning (None without fine_tune_epochs), on the train split in this process."""
        if step.fine_tune_epochs < 1:
            return None
        return partial(
            fine_tune, data=self.data, epochs=step.fine_tune_epochs, lr=step.lr or self.params.compress.fine_tune_lr,
            batch_size=self.params.train.batch_size, seed=self.params.base.seed, what=what,
        )

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


def _quantize_ort(candidate: Candidate, step: QuantizeStep, work: Work, what: str) -> Artifact:
    fp32 = work.onnx_fp32(candidate)
    if step.mode == "static":
        calibration = work.data.calibration(work.params.compress.calibration_samples, work.params.base.seed)
        model = quantization.ort_static_int8(fp32, calibration)
        details = {**quantization.ORT_STATIC, **work.calibration_details()}
    else:
        if candidate.family == "cnn":
            log.warning("%s: ONNX Runtime dynamic int8 runs convolutions slowly; mode: static suits CNNs", what)
        model = quantization.ort_dynamic_int8(fp32)
        details = dict(quantization.ORT_DYNAMIC)
    return formats.onnx_artifact(
        model, candidate.sparse, {"quantization": {"scheme": step.mode, "library": "onnxruntime.quantization", **details}}
    )


def _quantize_torch(candidate: Candidate, step: QuantizeStep, work: Work, what: str) -> Artifact:
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
        quantized = quantization.torch_qat_int8(candidate.fresh_module(), work.fine_tuner(step, f"{what} (QAT)"))
    artifact = formats.torch_quantized_artifact(candidate, quantized, step.mode, engine)
    if step.mode == "static":
        artifact.extra["quantization"].update(work.calibration_details())
    return artifact


def _prune(candidate: Candidate, step: PruneStep, work: Work, what: str) -> Candidate:
    fine_tune_step = work.fine_tuner(step, what)
    if step.kind == "unstructured":
        return pruning.prune_unstructured(candidate, step.sparsity, fine_tune_step)
    return pruning.prune_structured(candidate, step.sparsity, work.data.example(), fine_tune_step)


def _export(candidate: Candidate, step: ExportStep, work: Work) -> Artifact:
    if step.runtime == "onnxruntime":
        return formats.onnx_artifact(work.onnx_fp32(candidate), candidate.sparse, {})
    return formats.export_artifact(candidate, work.data.example())


def _distill(candidate: Candidate, step: DistillStep, work: Work, variant: Variant, number: int, run_id: str | None) -> Candidate:
    scratch = work.scratch / f"{variant.name}-step{number}"
    with _student_run(variant, number, step, work, run_id) as student_run_id:
        student = distill(
            candidate, student_family=step.student_family, student_width=step.student_width,
            temperature=step.temperature, alpha=step.alpha, epochs=step.epochs, lr=step.lr,
            params=work.params, prepared=work.paths.prepared, root=work.paths.root, scratch=scratch,
            run_id=student_run_id,
        )
    shutil.rmtree(scratch, ignore_errors=True)  # checkpoints and the student's scratch copy
    return student


def make_variant(
    variant: Variant, parent: Candidate, work: Work, run_id: str | None
) -> tuple[Candidate, Artifact, dict[str, Any]]:
    """Apply the variant's steps to its parent; return (last eager model, artifact, extra manifest fields).

    Eager steps (prune, distill) change the candidate; a final step (quantize, half,
    export) makes the artifact; without one the artifact is the eager model's state_dict.
    """
    candidate, artifact, extra = parent, None, {}
    for number, step in enumerate(variant.steps, start=1):
        what = f"{variant.name} step {number} ({step.method})"
        started, cpu = time.perf_counter(), time.process_time()
        if isinstance(step, PruneStep):
            candidate = _prune(candidate, step, work, what)
        elif isinstance(step, DistillStep):
            extra["teacher"] = candidate.origin or f"{variant.name} before step {number}"
            candidate = _distill(candidate, step, work, variant, number, run_id)
        elif isinstance(step, QuantizeStep):
            quantize = _quantize_ort if step.runtime == "onnxruntime" else _quantize_torch
            artifact = quantize(candidate, step, work, what)
        elif isinstance(step, HalfStep):
            artifact = formats.half_artifact(candidate)
        elif isinstance(step, ExportStep):
            artifact = _export(candidate, step, work)
        log.info("%s: done in %.1fs (%.1fs CPU here)", what, time.perf_counter() - started, time.process_time() - cpu)
    return candidate, artifact or formats.state_dict_artifact(candidate), extra


@contextlib.contextmanager
def _student_run(
    variant: Variant, number: int, step: CompressStep, work: Work, variant_run_id: str | None
) -> Iterator[str | None]:
    """A run nested under the variant's for the student's training curves (its keys are the
    baseline's train_loss, val_accuracy...; the variant's run keeps the final figures)."""
    if variant_run_id is None:
        yield None
        return
    from tasks.core import tracking

    with tracking.stage_run(
        "compress", work.paths.root, work.params.base.experiment, params=step.model_dump(),
        run_name=f"{variant.name} student training", parent_run_id=variant_run_id,
        tags={"variant": variant.name, "role": "distillation-training", "step": str(number)},
    ) as run:
        yield run.info.run_id
