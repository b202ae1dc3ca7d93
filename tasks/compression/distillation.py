"""Knowledge distillation: a smaller student trained from a teacher's soft targets, with Horovod.

The student trains on the same Horovod loop as the baseline (a :class:`~tasks.training.FitJob`
with a ``teacher``: loss = alpha * T^2 * KL(teacher || student at temperature T) +
(1 - alpha) * CE), launched like every training step of a variant by
:mod:`tasks.compression.fine_tuning` on ``train.workers`` workers (or ``train.hosts``),
with its checkpoints in the step's folder and its curve in the variant's MLflow run.
"""

from __future__ import annotations

import logging

from models.factory import build_model, count_parameters
from models.spec import ModelSpec
from tasks.compression import fine_tuning
from tasks.compression.candidate import Candidate
from tasks.compression.fine_tuning import TrainingStep, Trained
from tasks.core.model_files import load_eager_model

log = logging.getLogger("slimflow.compress")


def student_spec(
    teacher: ModelSpec, student_family: str | None, student_width: float | None, student_layers: int | None = None
) -> ModelSpec:
    """The teacher's spec with the student's family, width (``width`` scales the spec's sizes)
    and/or transformer encoder layers."""
    changes = {"family": student_family, "width": student_width, "layers": student_layers}
    return teacher.spec(**{key: value for key, value in changes.items() if value})


def distill(
    candidate: Candidate,
    step: TrainingStep,
    *,
    student_family: str | None,
    student_width: float | None,
    temperature: float,
    student_layers: int | None = None,
    alpha: float,
    epochs: int,
    lr: float | None,
) -> tuple[Candidate, Trained]:
    """Train a student from ``candidate`` (the teacher) with Horovod; return the student and its training.

    The loop, batch size, warm-up and patience are the baseline's (``params.train``); ``lr``
    (per worker) defaults to ``train.lr``.
    """
    params = step.params
    spec = student_spec(candidate.spec, student_family, student_width, student_layers)
    teacher_params = count_parameters(candidate.module)
    student_params = count_parameters(build_model(spec, candidate.input_shape, candidate.num_classes))
    log.info(
        "distillation: %s student (%d parameters, %.0f%% of the teacher's %d), T=%g alpha=%g, %d epochs on %d workers",
        spec.family, student_params, 100 * student_params / teacher_params, teacher_params,
        temperature, alpha, epochs, params.train.workers,
    )
    if student_params >= teacher_params:
        log.warning("distillation: the student is not smaller than its teacher")
    step.folder.mkdir(parents=True, exist_ok=True)
    teacher = fine_tuning.start_folder(candidate, step, "teacher")
    job = fine_tuning.fit_job(
        step, spec, epochs, lr or params.train.lr,  # per worker, scaled by the world size like the baseline's
        teacher=str(teacher), temperature=temperature, alpha=alpha,
    )
    trained = fine_tuning.run(step, job)
    student = load_eager_model(trained.folder)
    return candidate.changed(student, spec=spec, sparse=False), trained
