"""MLflow helpers shared by the stages: where to track, and runs that link up.

With no configuration the store is ``sqlite:///<project>/mlflow.db`` (no server);
``MLFLOW_TRACKING_URI`` points it elsewhere. A pipeline run (opened by the flow) hands
its run id and experiment to the stage processes in the
:class:`~tasks.core.run_context.RunContext`; each stage then opens a run nested under
it. A stage run by plain ``dvc repro`` has no context and opens a top-level run of its
own in ``base.experiment``. A DVC experiment that runs outside the workspace (``dvc exp
run --temp``, queued experiments) logs to the store of the project it came from, not to
one in DVC's copy, which DVC deletes afterwards (:func:`store_home`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from tasks.core.run_context import RunContext
from tasks.core.telemetry import turn_off_telemetry

# (tracking URI, experiment) -> experiment id, for what this process configured already:
# set_experiment is a database round trip (0.3-0.4 s each here), and the evaluate stage
# opens a run per model.
_CONFIGURED: dict[tuple[str, str], str] = {}


def default_tracking_uri(root: Path) -> str:
    return f"sqlite:///{(root / 'mlflow.db').resolve()}"


def store_home(root: Path) -> Path:
    """The project whose MLflow store (and ``mlruns/``) a process working in ``root`` uses:
    ``root`` itself, except in a DVC experiment that runs in a copy of the project (``dvc
    exp run --temp``, ``dvc exp run --queue`` then ``dvc queue start``): DVC runs it under
    ``.dvc/tmp/exps/``, deletes that copy when it ends, and names the project it came from
    in ``DVC_ROOT`` (with ``DVC_EXP_NAME``, which only an experiment sets)."""
    home = os.environ.get("DVC_ROOT")
    if not home or not os.environ.get("DVC_EXP_NAME"):
        return root
    home_path = Path(home).resolve()
    return home_path if home_path != root.resolve() and (home_path / "dvc.yaml").is_file() else root


def experiment_tags() -> dict[str, str]:
    """The DVC experiment a run belongs to (``dvc exp show`` lists it by this name)."""
    tags = {}
    if name := os.environ.get("DVC_EXP_NAME"):
        tags["dvc_experiment"] = name
    if baseline := os.environ.get("DVC_EXP_BASELINE_REV"):
        tags["dvc_experiment_baseline"] = baseline
    return tags


def store_template() -> Path:
    """Where ``make install`` leaves an empty SQLite database with this MLflow's tables."""
    from importlib.metadata import version

    from tasks.core.paths import install_share

    return install_share() / f"mlflow-{version('mlflow')}.db"


def write_store_template(template: Path | None = None) -> Path:
    """Create MLflow's tables (its initial schema, then every migration) in a new database.

    Tables only, as MLflow's SQL store creates them in a database that has none
    (``_initialize_tables``): the store adds its Default experiment, with the project's
    artifact root, when a project first opens its copy.
    """
    turn_off_telemetry()  # `make install` runs this: MLflow would keep an installation id on import
    import sqlalchemy
    from mlflow.store.db.utils import _initialize_tables

    template = template or store_template()
    template.parent.mkdir(parents=True, exist_ok=True)
    partial = template.with_name(f".{template.name}.partial")
    partial.unlink(missing_ok=True)
    engine = sqlalchemy.create_engine(f"sqlite:///{partial}")
    try:
        _initialize_tables(engine)
    finally:
        engine.dispose()
    os.replace(partial, template)
    return template


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` tracking URI, else None."""
    if not uri.startswith("sqlite:///") or uri.startswith("sqlite:///:memory:"):
        return None
    return Path(uri.removeprefix("sqlite:///").split("?", 1)[0])


def seed_store(uri: str, template: Path | None = None) -> bool:
    """Start a new SQLite tracking store as a copy of :func:`store_template`.

    MLflow creates its tables in a new database, one migration after another: 1-2 s of a
    new project's first run on the 2-core machine. Never over an existing database (one
    made meanwhile by another process included), and only where the template exists and
    the URI is a SQLite file; True when it copied.
    """
    from tasks.core.paths import copy_if_missing

    target = sqlite_path(uri)
    return target is not None and copy_if_missing(template or store_template(), target)


def configure(root: Path, experiment: str, context: RunContext | None = None) -> str:
    """Point MLflow at the configured store and experiment; returns the experiment id.

    Inside a pipeline run the run context's experiment wins (the flow resolved
    ``base.experiment`` already); otherwise ``experiment`` is used, by name. The tracking
    URI is exported so that processes this one starts (Horovod workers) use the same store.
    """
    turn_off_telemetry()
    import mlflow

    home = store_home(root)
    uri = os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(home)
    os.environ["MLFLOW_TRACKING_URI"] = uri
    context = context or RunContext.current()
    key = (uri, f"id:{context.experiment_id}" if context.experiment_id else f"name:{experiment}")
    if key in _CONFIGURED and mlflow.get_tracking_uri() == uri and _active_experiment_id() == _CONFIGURED[key]:
        return _CONFIGURED[key]
    seed_store(uri)
    # MLflow resolves a new store's artifact root ("./mlruns") against the working folder:
    # an experiment made from DVC's copy would keep its artifacts there.
    with contextlib.chdir(home) if home != root else contextlib.nullcontext():
        mlflow.set_tracking_uri(uri)
        if context.experiment_id:
            mlflow.set_experiment(experiment_id=context.experiment_id)
            _CONFIGURED[key] = context.experiment_id
        else:
            _CONFIGURED[key] = mlflow.set_experiment(experiment).experiment_id
    return _CONFIGURED[key]


def _active_experiment_id() -> str | None:
    """MLflow's active experiment in this process (what ``start_run`` uses), if set."""
    from mlflow.tracking import fluent

    return getattr(fluent, "_active_experiment_id", None)


def git_commit(root: Path) -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"model": {"width": 1}} -> {"model.width": 1}; lists become their string form."""
    flat: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def readable_params(params: Mapping[str, Any]) -> dict[str, str]:
    """MLflow params people can read: nested keys flattened, lists and dicts as JSON (not a
    Python repr), each value cut to MLflow's 6,000 characters."""
    import json

    def text(value: Any) -> str:
        return json.dumps(value, default=str) if isinstance(value, (list, tuple, dict)) else str(value)

    return {key: text(value)[:6000] for key, value in flatten(params).items()}


def recipe_params(parent: str | None, method: str, steps: list[Mapping[str, Any]]) -> dict[str, Any]:
    """A variant's recipe as params: ``recipe.parent``, ``recipe.method``,
    ``recipe.step1.method``, ``recipe.step1.sparsity``... (None settings left out)."""
    recipe: dict[str, Any] = {"parent": parent or "baseline", "method": method}
    for number, step in enumerate(steps, start=1):
        recipe[f"step{number}"] = {k: v for k, v in step.items() if v is not None}
    return {"recipe": recipe}


def link_tags(root: Path, stage: str | None = None, context: RunContext | None = None) -> dict[str, str]:
    """Tags that tie a run to its code, its flow run and its pipeline stage."""
    context = context or RunContext.current()
    tags: dict[str, str] = {}
    if commit := git_commit(root):
        tags["mlflow.source.git.commit"] = commit
        tags["git_commit"] = commit
    if context.flow_run_id:
        tags["prefect_flow_run_id"] = context.flow_run_id
    if stage:
        tags["stage"] = stage
    return {**tags, **experiment_tags()}


@contextlib.contextmanager
def _sigterm_as_exit() -> Iterator[None]:
    """Turn SIGTERM (and SIGHUP: the terminal closed) into SystemExit so ``with start_run()``
    ends the run FAILED, not RUNNING. (SIGKILL cannot be caught: the next start repairs.)"""

    def handler(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    try:
        previous = {number: signal.signal(number, handler) for number in (signal.SIGTERM, signal.SIGHUP)}
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        for number, old in previous.items():
            signal.signal(number, old)


def _log_batch(run_id: str, params: Mapping[str, Any], metrics: Mapping[str, float]) -> None:
    """Params (flattened, as strings) and metrics (step 0, now) of ``run_id`` in one call."""
    import time

    import mlflow
    from mlflow.entities import Metric, Param

    now = int(time.time() * 1000)
    mlflow.MlflowClient().log_batch(
        run_id,
        metrics=[Metric(key, float(value), now, 0) for key, value in metrics.items()],
        params=[Param(key, value) for key, value in readable_params(params).items()],
    )


@contextlib.contextmanager
def resumed_run(run_id: str, fetched: Any | None = None) -> Iterator[Any]:
    """Reopen a run to add to it (nested in the active run, if any), as the evaluate stage
    does with each model's run. It ends FINISHED with its own end time kept (its duration
    stays the time it took to make the model), or FAILED on any exception, SIGTERM included.
    ``fetched``: the run as the caller just read it (``get_run``), not read again."""
    import mlflow

    client = mlflow.MlflowClient()
    ended = (fetched or client.get_run(run_id)).info.end_time
    with _sigterm_as_exit(), mlflow.start_run(run_id=run_id, nested=mlflow.active_run() is not None) as run:
        try:
            yield run
        except BaseException as err:
            mlflow.set_tag("error", (str(err) or type(err).__name__)[:5000])
            raise
    if ended:
        client.set_terminated(run_id, "FINISHED", end_time=ended)


@contextlib.contextmanager
def stage_run(
    stage: str,
    root: Path,
    experiment: str,
    params: Mapping[str, Any] | None = None,
    run_name: str | None = None,
    tags: Mapping[str, str] | None = None,
    parent_run_id: str | None = None,
    metrics: Mapping[str, float] | None = None,
) -> Iterator[Any]:
    """Open the MLflow run of one stage (or one model), nested under the pipeline run.

    ``tags`` go in with the run's creation and ``params`` with ``metrics`` in one
    ``log_batch`` (one database transaction instead of one per call: the evaluate stage
    opens a run per model). The run ends FINISHED on success and FAILED on any
    exception, SIGTERM included.
    """
    import mlflow

    context = RunContext.current()
    configure(root, experiment, context)
    parent = parent_run_id or context.parent_run_id
    all_tags = {**link_tags(root, stage, context), **(tags or {})}
    with _sigterm_as_exit(), mlflow.start_run(
        run_name=run_name or stage,
        parent_run_id=parent or None,
        nested=bool(parent) or mlflow.active_run() is not None,
        tags=all_tags,
    ) as run:
        if params or metrics:
            _log_batch(run.info.run_id, params or {}, metrics or {})
        try:
            yield run
        except BaseException as err:
            # The run ends FAILED (start_run's exit does that); say why, in the run itself.
            mlflow.set_tag("error", (str(err) or type(err).__name__)[:5000])
            raise


def log_stage_energy(joules: float, source: str, grid_co2e_g_per_kwh: float | None = None) -> None:
    """The stage's energy (every process that computed for it) on its active run, how it was
    obtained and, where the stage reads the grid intensity, its CO2e."""
    import mlflow

    from tasks.core import metric_names as names
    from tasks.core.energy import co2e_g

    figures = {names.ENERGY_J: joules}
    if grid_co2e_g_per_kwh is not None:
        figures[names.CO2E_G] = co2e_g(joules, grid_co2e_g_per_kwh)
    mlflow.log_metrics(figures)
    # Not `energy_source`: on a model's run (the train stage's is the baseline's) that tag
    # says how its energy per 1,000 predictions was measured.
    mlflow.set_tag("stage_energy_source", source)


if __name__ == "__main__":
    if sys.argv[1:] == ["--write-store-template"]:  # make install
        print(f"MLflow store template: {write_store_template()}")
        sys.exit(0)
    sys.exit("usage: python -m tasks.core.tracking --write-store-template")
