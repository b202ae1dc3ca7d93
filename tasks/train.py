"""The ``train`` stage: Horovod data-parallel training of the baseline model.

``python -m tasks.train`` (the DVC stage command) validates the parameters, opens the
stage's MLflow run, starts ``train.workers`` Horovod workers (or ``train.hosts``) that run
the loop of :mod:`tasks.training`, and, when they succeed, logs the trained model to
MLflow. A re-run after a crash resumes from the last checkpoint in ``artifacts/checkpoints``.

Workers get ``cores // local workers`` threads each, and Horovod's background thread
waits for work instead of coordinating every cycle (``HOROVOD_IDLE_CYCLE_TIME``, slimflow's
Horovod patch; see :func:`tasks.training.launcher.worker_environment`).
"""

from __future__ import annotations

import json
import logging
import sys

from tasks.core.config import Params, ParamsError, load_params
from tasks.core.errors import report_stage_error, stage_main
from tasks.core.paths import ProjectPaths
from tasks.core.processes import die_with_parent
from tasks.core.stage_cli import setup_logging
from tasks.training import FitJob, LaunchError, launch_fit
from tasks.training.fault import fault_after_epoch_from_env

log = logging.getLogger("slimflow.train")


def fit_job(params: Params, paths: ProjectPaths, run_id: str | None) -> FitJob:
    """The baseline's training job: ``params.train`` on the prepared data, into the stage's outputs."""
    train = params.train
    return FitJob.from_train(
        train,
        spec=train.model.spec().to_dict(),
        prepared=str(paths.prepared),
        output=str(paths.model),
        checkpoints=str(paths.checkpoints),
        seed=params.base.seed,
        run_id=run_id,
        metrics_path=str(paths.metrics / "train.json"),
        history_path=str(paths.plots / "train_history.json"),
        manifest={"name": "baseline", "method": "baseline", "recipe": [], "parent": None},
        fault_after_epoch=fault_after_epoch_from_env(),  # tests only: see tasks.training.fault
    )


def log_trained_model(paths: ProjectPaths) -> None:
    """Log the trained baseline to the active MLflow run with a signature and an input example."""
    import mlflow
    import numpy as np
    import torch
    from mlflow.models import infer_signature

    from tasks.data import load_preprocessing, load_split
    from tasks.core.model_files import load_eager_model

    model = load_eager_model(paths.model)
    preprocessing = load_preprocessing(paths.prepared)
    example = load_split(paths.prepared, "val", preprocessing).x[:2].copy()
    with torch.inference_mode():
        output = model(torch.from_numpy(example)).numpy()
    mlflow.pytorch.log_model(
        model, name="model", signature=infer_signature(example, output),
        input_example=example, serialization_format="pickle",
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"numpy=={np.__version__}"],
    )


@stage_main("train", lambda: ProjectPaths.discover().model)
def main(argv: list[str] | None = None) -> int:
    setup_logging()
    paths = ProjectPaths.discover()
    try:
        params = load_params(paths.params)
        if not (paths.prepared / "preprocess.json").exists():
            raise ParamsError(f"{paths.prepared}: no prepared data; run the prepare stage first")
    except ParamsError as err:
        report_stage_error("train", str(err))
        return 2

    from tasks.core import tracking

    try:
        with tracking.stage_run(
            "train", paths.root, params.base.experiment,
            params={"train": params.train.model_dump(), "seed": params.base.seed},
        ) as run:
            job = fit_job(params, paths, run.info.run_id)
            launch_fit(job, params.train, paths.root)
            result = json.loads((paths.metrics / "train.json").read_text())
            import mlflow

            # The per-epoch curves, world size and threads were logged by rank 0 during training.
            mlflow.log_metrics({
                "best_epoch": result["best_epoch"], "epochs_run": result["epochs_run"],
                "best_val_loss": result["val_loss"], "best_val_accuracy": result["val_accuracy"],
            })
            log_trained_model(paths)
    except LaunchError as err:
        report_stage_error("train", str(err))
        return 1
    return 0


if __name__ == "__main__":
    die_with_parent()  # the stage dies with the run that started it (tasks.core.processes)
    sys.exit(main())
