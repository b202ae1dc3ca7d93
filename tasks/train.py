"""The ``train`` stage: Horovod data-parallel training of the baseline model.

``python -m tasks.train`` (the DVC stage command) validates the parameters, opens the
stage's MLflow run, starts ``train.workers`` Horovod workers (or ``train.hosts``) that run
the loop of :mod:`tasks.training`, and, when they succeed, records the run in the model's
manifest: it is the baseline's run, where the evaluate stage logs the model and its figures. A re-run after a crash resumes from the last checkpoint in ``artifacts/checkpoints``.

Workers get ``cores // local workers`` threads each, and Horovod's background thread
waits for work instead of coordinating every cycle (``HOROVOD_IDLE_CYCLE_TIME``, slimflow's
Horovod patch; see :func:`tasks.training.launcher.worker_environment`).
"""

from __future__ import annotations

# In a pipeline run or a `dvc repro` this process becomes a child of a fork server (tasks.core.fork_server)
# before it imports anything else: the imports below took the entry 0.1-0.3 s for nothing.
if __name__ == "__main__":
    from tasks.core.dvc_fork_server import run_stage_forked

    run_stage_forked("tasks.train")

import json
import logging

from tasks.core.config import Params, ParamsError, load_params
from tasks.core.errors import report_stage_error, stage_main
from tasks.core.paths import ProjectPaths
from tasks.core.processes import die_with_parent, exit_process
from tasks.core.stage_cli import start_stage
from tasks.training import FitJob, LaunchError, launch_fit, worker_pool
from tasks.training.fault import fault_after_epoch_from_env
from tasks.training.reporting import kept_less_accurate, still_improving

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


def _check_family_reads_data(params: Params, paths: ProjectPaths) -> None:
    """The model must read the prepared data (token ids, images, rows of features): a family
    that does not is refused here, naming the key and the families that do, before any
    worker starts (in the workers it was a traceback per worker, retried twice). A
    transformer cutting images into very many patches is said (:func:`patch_count_note`)."""
    from models.spec import patch_count_note
    from tasks.data import load_preprocessing, reading_problem, spec_for_data

    preprocessing = load_preprocessing(paths.prepared)
    try:
        spec = spec_for_data(params.train.model.spec(), preprocessing)
    except ValueError as err:  # names train.model.vocab_size
        raise ParamsError(f"params.yaml: {err}") from None
    where = f"the data prepared in {paths.prepared.relative_to(paths.root)}"  # always inside the project
    problem = reading_problem(spec, preprocessing.input_shape, preprocessing.is_text, where)
    if problem:
        raise ParamsError(f"params.yaml: {problem}")
    if note := patch_count_note(spec, preprocessing.input_shape):  # reads, but slowly: said, not refused
        log.warning("%s", note)


def record_model_run(paths: ProjectPaths, run_id: str) -> None:
    """Make the stage's run the baseline's one place in MLflow.

    The run's id goes into the baseline's manifest, so the evaluate stage adds its figures
    and logs the model (as a pyfunc taking raw inputs, like every variant) in this same run;
    the model folder is logged here as plain files.
    """
    import mlflow

    from tasks.core.model_files import read_manifest, write_manifest

    write_manifest(paths.model, {**read_manifest(paths.model), "mlflow_run_id": run_id})
    mlflow.log_artifacts(str(paths.model), artifact_path="baseline")


@stage_main("train", lambda: ProjectPaths.discover().model)
def main(argv: list[str] | None = None) -> int:
    start_stage()
    paths = ProjectPaths.discover()
    try:
        params = load_params(paths.params)
        if not (paths.prepared / "preprocess.json").exists():
            raise ParamsError(f"{paths.prepared}: no prepared data; run the prepare stage first")
        _check_family_reads_data(params, paths)
    except ParamsError as err:
        report_stage_error("train", str(err))
        return 2

    from tasks.core import tracking

    from tasks.core import metric_names as names

    try:
        # The workers start up while the stage opens its MLflow run.
        with worker_pool(params.train, paths.root, start=True), tracking.stage_run(
            "train", paths.root, params.base.experiment,
            params={"train": params.train.model_dump(), "seed": params.base.seed},
            run_name="train baseline", tags={"model": "baseline", "method": "baseline"},
        ) as run:
            job = fit_job(params, paths, run.info.run_id)
            launch_fit(job, params.train, paths.root)
            result = json.loads((paths.metrics / "train.json").read_text())
            import mlflow

            # The per-epoch curves, world size and threads were logged by rank 0 during training.
            mlflow.log_metrics({
                names.BEST_EPOCH: result["best_epoch"], names.EPOCHS_RUN: result["epochs_run"],
                names.BEST_VAL_LOSS: result["val_loss"], names.BEST_VAL_ACCURACY: result["val_accuracy"],
                names.VAL_ACCURACY_LATE_GAIN_PTS: result["val_accuracy_late_gain_pts"],
                names.VAL_ACCURACY_MISSED_PTS: result["val_accuracy_missed_pts"],
                names.TRAIN_ENERGY_J: result["train_energy_j"],
            })
            if note := still_improving(result["val_accuracy_late_gain_pts"], params.train.epochs, params.train.patience,
                                       params.evaluate.gate.max_accuracy_drop_pts):
                log.info("training was %s (train.epochs sets them)", note)
            if params.train.monitor == "val_loss" and (note := kept_less_accurate(
                    result["best_epoch"], result["most_accurate_epoch"], result["val_accuracy_missed_pts"],
                    params.evaluate.gate.max_accuracy_drop_pts)):
                log.info("training %s", note)
            # The stage's computation is its workers' (each measured itself; rank 0 summed them).
            tracking.log_stage_energy(result["train_energy_j"], result["energy_source"])
            record_model_run(paths, run.info.run_id)
    except LaunchError as err:
        report_stage_error("train", str(err))
        return 1
    return 0


if __name__ == "__main__":
    die_with_parent()  # the stage dies with the run that started it (tasks.core.processes)
    exit_process(main())
