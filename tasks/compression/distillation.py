"""Knowledge distillation: a smaller student trained from a teacher's soft targets, with Horovod.

The student trains on the same Horovod loop as the baseline (``tasks.fit`` with a
``teacher``: loss = alpha * T^2 * KL(teacher || student at temperature T) + (1 - alpha) * CE),
launched on ``train.workers`` workers (or ``train.hosts``) by ``tasks.train.launch_fit``.
Its checkpoints and output live in a scratch folder that is removed afterwards.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from models.factory import build_model, count_parameters
from models.spec import ModelSpec
from tasks.compression.candidate import Candidate
from tasks.core.model_files import load_eager_model, read_manifest, save_state_dict_model

log = logging.getLogger("slimflow.compress")


def student_spec(teacher: ModelSpec, student_family: str | None, student_width: float | None) -> ModelSpec:
    """The teacher's spec with the student's family and/or width (``width`` scales the spec's sizes)."""
    changes = {"family": student_family, "width": student_width}
    return teacher.spec(**{key: value for key, value in changes.items() if value})


def teacher_folder(candidate: Candidate, scratch: Path) -> Path:
    """A ``torch-state-dict`` folder holding the teacher, as the training loop loads it."""
    if candidate.origin_folder is not None and read_manifest(candidate.origin_folder)["format"] == "torch-state-dict":
        return candidate.origin_folder
    folder = scratch / "teacher"
    save_state_dict_model(
        candidate.module, candidate.spec, candidate.input_shape, candidate.num_classes, folder,
        {"name": "teacher", "method": "teacher", "recipe": [], "parent": None},
    )
    return folder


def distill(
    candidate: Candidate,
    *,
    student_family: str | None,
    student_width: float | None,
    temperature: float,
    alpha: float,
    epochs: int,
    lr: float | None,
    params: Any,  # tasks.core.config.Params
    prepared: Path,
    root: Path,
    scratch: Path,
    run_id: str | None,
) -> Candidate:
    """Train a student from ``candidate`` (the teacher) with Horovod; return the student.

    The loop, batch size, warm-up and patience are the baseline's (``params.train``); ``lr``
    (per worker) defaults to ``train.lr``.
    """
    from tasks.training import FitJob, launch_fit

    spec = student_spec(candidate.spec, student_family, student_width)
    teacher_params = count_parameters(candidate.module)
    student_params = count_parameters(build_model(spec, candidate.input_shape, candidate.num_classes))
    log.info(
        "distillation: %s student (%d parameters, %.0f%% of the teacher's %d), T=%g alpha=%g, %d epochs on %d workers",
        spec.family, student_params, 100 * student_params / teacher_params, teacher_params,
        temperature, alpha, epochs, params.train.workers,
    )
    if student_params >= teacher_params:
        log.warning("distillation: the student is not smaller than its teacher")
    train = params.train
    output = scratch / "student"
    job = FitJob(
        spec=spec.to_dict(),
        prepared=str(prepared.resolve()),
        output=str(output.resolve()),
        checkpoints=str((scratch / "checkpoints").resolve()),
        epochs=epochs,
        batch_size=train.batch_size,
        lr=lr or train.lr,  # per worker, scaled by the world size like the baseline's
        seed=params.base.seed,
        weight_decay=train.weight_decay,
        warmup_epochs=min(train.warmup_epochs, epochs - 1),
        patience=train.patience,
        fp16_allreduce=train.fp16_allreduce,
        backward_passes_per_step=train.backward_passes_per_step,
        allreduce_groups=train.allreduce_groups,
        mixed_precision=train.mixed_precision,
        channels_last=train.channels_last,
        teacher=str(teacher_folder(candidate, scratch).resolve()),
        temperature=temperature,
        alpha=alpha,
        run_id=run_id,  # rank 0 logs the student's training curves into the variant's run
        manifest={"name": "student", "method": "distill", "recipe": [], "parent": None},
    )
    launch_fit(job, train, root)
    student = load_eager_model(output)
    return candidate.changed(student, spec=spec, sparse=False)
