"""The pipeline flow: prepare -> train -> compress -> evaluate, each a DVC stage.

A Prefect task per stage runs that stage through DVC (so an unchanged stage is skipped
here and by ``dvc repro`` alike). The flow opens one MLflow run for the pipeline run;
stages open runs nested under it. One pipeline runs at a time per project.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.context import get_run_context
from prefect.tasks import exponential_backoff

from flows.results import log_pipeline_params, publish_result
from tasks.core import tracking
from tasks.compression.recipes import check_pipeline
from tasks.core.config import load_params, write_overrides
from tasks.core.dvc import StageFailed, pipeline_lock, push_outputs, reproduce_stage, select_stages
from tasks.core.paths import ProjectPaths
from tasks.core.run_context import RunContext
from tasks.data import data_digest


def _run_stage(stage: str, root: str, force: bool, context: RunContext) -> dict[str, Any]:
    logger = get_run_logger()
    # DVC's "to track the changes with git, run ..." hints are for its own CLI users.
    logging.getLogger("dvc.repo.scm_context").setLevel(logging.WARNING)
    started = time.perf_counter()
    ran = reproduce_stage(Path(root), stage, force=force, context=context)
    seconds = time.perf_counter() - started
    logger.info("%s %s in %.1f s", stage, "ran" if ran else "skipped (up to date)", seconds)
    return {"stage": stage, "ran": ran, "seconds": seconds}


def _worth_retrying(task: Any, task_run: Any, state: Any) -> bool:
    """Retry crashes, not bad input: a bad data file or parameter fails the same way again."""
    try:
        error = state.result(raise_on_failure=False)
    except Exception:
        return True
    return not (isinstance(error, StageFailed) and error.bad_input)


# Stages write their outputs atomically and record nothing half-done, so retrying is safe;
# a retried train stage resumes from its last checkpoint.
_retry = {
    "retries": 2, "retry_delay_seconds": exponential_backoff(backoff_factor=2), "retry_jitter_factor": 0,
    "retry_condition_fn": _worth_retrying,
}


@task(**_retry)
def run_stage(stage: str, root: str, force: bool, context: RunContext) -> dict[str, Any]:
    """One ``dvc.yaml`` stage through DVC (skipped when up to date); its Prefect task is named after it."""
    return _run_stage(stage, root, force, context)


def stage_task(stage: str) -> Any:
    """The Prefect task of ``stage``: :func:`run_stage` under the stage's own name."""
    return run_stage.with_options(name=stage, task_run_name=stage)


@task(name="dvc-push", **_retry)
def push(root: str) -> int | None:
    """``dvc push --run-cache`` to the project's default DVC remote, if it has one."""
    pushed = push_outputs(Path(root))
    get_run_logger().info("dvc push: %s", "no DVC remote configured; outputs stay in .dvc/cache"
                          if pushed is None else f"{pushed} file(s) sent")
    return pushed


@flow(name="slimflow-pipeline", log_prints=False)
def pipeline(
    overrides: list[str] | None = None,
    first: str | None = None,
    last: str | None = None,
    force: bool = False,
    wait_s: float = 0.0,
    push_data: bool = True,
) -> dict[str, Any]:
    """Run the pipeline stages (all, or ``first``..``last``) through DVC, tracked in MLflow."""
    logger = get_run_logger()
    paths = ProjectPaths.discover()
    root = str(paths.root)
    stages = select_stages(first, last, paths.root)
    flow_run_id = str(get_run_context().flow_run.id)
    with pipeline_lock(paths.root, wait_s):
        # Overrides are validated before anything runs, then recorded in params.yaml,
        # so dvc.lock records them and `dvc repro` reproduces this run.
        params = load_params(paths.params, overrides)
        check_pipeline(params)
        if overrides:
            write_overrides(paths.params, overrides)
        experiment_id = tracking.configure(paths.root, params.base.experiment)
        import mlflow

        tags = {**tracking.link_tags(paths.root), "prefect_flow_run_id": flow_run_id, "pipeline": "slimflow"}
        with mlflow.start_run(run_name=f"pipeline {time.strftime('%Y-%m-%d %H:%M:%S')}", tags=tags) as run:
            log_pipeline_params(params)
            if overrides:
                mlflow.set_tag("overrides", " ".join(overrides))
            context = RunContext(parent_run_id=run.info.run_id, flow_run_id=flow_run_id, experiment_id=experiment_id)
            results = []
            try:
                for stage in stages:
                    results.append(stage_task(stage)(stage, root, force, context))
                # Share data and outputs with the team when the project has a DVC remote.
                if push_data and (pushed := push(root)) is not None:
                    mlflow.set_tag("dvc_pushed_files", str(pushed))
            except BaseException as err:
                mlflow.set_tag("error", str(err)[:5000])
                raise
            mlflow.set_tags({
                "stages_ran": ",".join(r["stage"] for r in results if r["ran"]) or "none",
                "stages_skipped": ",".join(r["stage"] for r in results if not r["ran"]) or "none",
                **_lineage_tags(paths),
            })
            outcome = publish_result(paths, run.info.run_id, experiment_id, results)
    logger.info("pipeline run %s finished: %s", run.info.run_id,
                ", ".join(f"{r['stage']} {'ran' if r['ran'] else 'skipped'}" for r in results))
    for line in outcome.lines:  # the flow run's log ends with the result
        logger.info("%s", line)
    return {"mlflow_run_id": run.info.run_id, "stages": results, "comparison": outcome.rows,
            "champion": outcome.champion}


def _lineage_tags(paths: ProjectPaths) -> dict[str, str]:
    """The data digest and the DVC lock this run left, so a run names exactly what it used."""
    import hashlib

    tags = {}
    if (paths.prepared / "card.json").exists():
        tags["data_digest"] = data_digest(paths.prepared)
    lock = paths.root / "dvc.lock"
    if lock.exists():
        tags["dvc_lock_md5"] = hashlib.md5(lock.read_bytes()).hexdigest()
    return tags
