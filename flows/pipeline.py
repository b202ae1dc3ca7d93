"""The pipeline flow: prepare -> train -> compress -> evaluate, each a DVC stage.

A Prefect task per stage runs that stage through DVC (so an unchanged stage is skipped
here and by ``dvc repro`` alike). The flow opens one MLflow run for the pipeline run;
stages open runs nested under it. One pipeline runs at a time per project; waiting runs
start in the order they were scheduled (:mod:`tasks.core.lock`). A run owns its process
tree (:mod:`tasks.core.processes`), and its first act under the lock is to repair what a
dead run left (:mod:`flows.recovery`).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.context import get_run_context
from prefect.tasks import exponential_backoff

from flows.heartbeat import flow_run_heartbeats
from flows.recovery import RunRecord, repair_after_crash
from flows.results import STAGE_OUTCOME_WORDS, log_pipeline_params, publish_result, stage_outcome
from tasks.compression.recipes import check_pipeline
from tasks.core import tracking
from tasks.core.config import load_params, write_overrides
from tasks.core.dvc import Reproduced, StageFailed, pipeline_lock, push_outputs, reproduce_stage, select_stages
from tasks.core.errors import disk_full_message
from tasks.core.fork_server import fork_server
from tasks.core.paths import ProjectPaths
from tasks.core.processes import own_process_tree
from tasks.core.run_context import RunContext
from tasks.data import data_digest
from tasks.sources import check_raw_data


def _run_stage(stage: str, root: str, force: bool, context: RunContext) -> dict[str, Any]:
    logger = get_run_logger()
    # DVC's "to track the changes with git, run ..." hints are for its own CLI users.
    logging.getLogger("dvc.repo.scm_context").setLevel(logging.WARNING)
    started = time.perf_counter()
    outcome = reproduce_stage(Path(root), stage, force=force, context=context)
    seconds = time.perf_counter() - started
    logger.info("%s %s in %.1f s%s", stage, STAGE_OUTCOME_WORDS[outcome], seconds,
                " (these inputs ran before: DVC checked out their outputs, the command did not run)"
                if outcome is Reproduced.RESTORED else "")
    return {"stage": stage, "ran": outcome is Reproduced.RAN, "restored": outcome is Reproduced.RESTORED,
            "seconds": seconds}


def _worth_retrying(task: Any, task_run: Any, state: Any) -> bool:
    """Retry crashes, not bad input or a full disk: those fail the same way again."""
    try:
        error = state.result(raise_on_failure=False)
    except Exception:
        return True
    return not (isinstance(error, StageFailed) and error.retry_futile)


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
    stages = select_stages(first, last, paths.root)
    flow_run = get_run_context().flow_run
    # Everything this run starts from here on dies with it (tasks.core.processes), and a
    # record lets the next start end its states if it dies (flows.recovery).
    own_process_tree()
    record = RunRecord.begin(paths.root, str(flow_run.id))
    scheduled = flow_run.expected_start_time.timestamp() if flow_run.expected_start_time else None
    with ExitStack() as held:
        held.enter_context(flow_run_heartbeats())  # when `slimflow run` turned Prefect's off (flows.heartbeat)
        try:
            lock = held.enter_context(pipeline_lock(paths.root, wait_s, scheduled_at=scheduled, on_wait=logger.info))
        except BaseException:
            record.end(paths.root)  # it never started: nothing to repair
            raise
        # Overrides are validated before anything runs, then recorded in params.yaml,
        # so dvc.lock records them and `dvc repro` reproduces this run.
        params = load_params(paths.params, overrides)
        check_pipeline(params, input_shape=check_raw_data(params.prepare, paths.root) if "prepare" in stages else None)
        # Stage processes and Horovod workers start as children of one process that has
        # imported torch, MLflow and the rest already (tasks.core.fork_server); it starts
        # loading now, while the run sets up.
        server = held.enter_context(fork_server(paths.root))
        experiment_id = tracking.configure(paths.root, params.base.experiment)
        if server is not None:
            server.tracking_ready(os.environ["MLFLOW_TRACKING_URI"])  # configure exported it
        repair_after_crash(paths, lock, logger.warning)
        if overrides:
            held.enter_context(overrides_recorded(paths, overrides, logger.info))
        result = _tracked_run(paths, params, overrides, stages, force, push_data, record, experiment_id)
    record.end(paths.root)  # only now: a run that raised leaves it, and the next start checks its states
    logger.info("pipeline run %s finished: %s", result["mlflow_run_id"],
                ", ".join(f"{r['stage']} {stage_outcome(r)}" for r in result["stages"]))
    for line in result.pop("result_lines"):  # the flow run's log ends with the result
        logger.info("%s", line)
    return result


@contextmanager
def overrides_recorded(paths: ProjectPaths, overrides: list[str], say: Callable[[str], Any]) -> Iterator[None]:
    """``overrides`` written into ``params.yaml`` for the run (as ``dvc exp run -S`` does, so
    ``dvc.lock`` records them); taken back out if the run fails before any stage recorded
    them (``dvc.lock`` as it was: a data file the prepare stage could not read), so a
    refused run leaves the project as it found it. Once a stage has recorded them they
    stay, with ``dvc.lock``: the next run goes on from there. A ``params.yaml`` edited
    meanwhile is left alone."""
    lock = paths.root / "dvc.lock"

    def lock_bytes() -> bytes | None:
        return lock.read_bytes() if lock.exists() else None

    before, lock_before = paths.params.read_bytes(), lock_bytes()
    write_overrides(paths.params, overrides)
    written = paths.params.read_bytes()
    try:
        yield
    except BaseException:
        if lock_bytes() == lock_before and paths.params.read_bytes() == written:
            staged = paths.params.with_suffix(".yaml.tmp")
            staged.write_bytes(before)
            os.replace(staged, paths.params)
            say("params.yaml: the overrides taken back out (the run failed before any stage recorded them)")
        raise


def _tracked_run(
    paths: ProjectPaths, params: Any, overrides: list[str] | None, stages: list[str], force: bool,
    push_data: bool, record: RunRecord, experiment_id: str,
) -> dict[str, Any]:
    """The pipeline's MLflow run around its stages; ends FAILED, with the error, if one fails."""
    import mlflow

    root = str(paths.root)
    flow_run_id = record.flow_run_id
    tags = {**tracking.link_tags(paths.root), "prefect_flow_run_id": flow_run_id, "pipeline": "slimflow",
            "slimflow.pid": str(record.pid), "slimflow.host": record.host}
    with mlflow.start_run(run_name=f"pipeline {time.strftime('%Y-%m-%d %H:%M:%S')}", tags=tags) as run:
        record.update(paths.root, mlflow_run_id=run.info.run_id, tracking_uri=mlflow.get_tracking_uri())
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
            mlflow.set_tags({**_stage_tags(results), **_lineage_tags(paths)})
            outcome = publish_result(paths, run.info.run_id, experiment_id, results)
        except BaseException as err:  # the run's MLflow status is FAILED: its tags say why, and what ran first
            _tag_error(err, results)
            raise
    return {"mlflow_run_id": run.info.run_id, "stages": results, "comparison": outcome.rows,
            "champion": outcome.champion, "result_lines": outcome.lines}


def _stage_tags(results: list[dict[str, Any]]) -> dict[str, str]:
    """``stages_ran``, ``stages_restored``, ``stages_skipped``: what DVC did with each stage
    of ``results`` (comma-separated stage names, or ``none``)."""
    return {f"stages_{done}": ",".join(r["stage"] for r in results if stage_outcome(r) is done) or "none"
            for done in Reproduced}


def _tag_error(err: BaseException, results: list[dict[str, Any]]) -> None:
    """The error as a tag of the pipeline run, with the stages done before it (best effort:
    on a full disk MLflow may not write)."""
    import mlflow

    message = disk_full_message(err) or str(err) or type(err).__name__
    try:
        mlflow.set_tags({**_stage_tags(results), "error": message[:5000]})
    except Exception as tag_err:
        get_run_logger().warning("could not tag the MLflow run with its error: %s", tag_err)


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
