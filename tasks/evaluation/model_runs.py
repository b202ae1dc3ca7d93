"""Each model's one place in MLflow: the run that made it, completed by the evaluate stage.

The baseline's run is the train stage's run; a variant's run is its run in the compress
stage. Each records its run in the model's ``manifest.json`` (``mlflow_run_id``). The
evaluate stage reopens that run and adds, for every model alike:

- the model logged as an MLflow model (a pyfunc taking raw inputs, so every model appears
  in the experiment's Models tab and the champion is registered from it, not logged twice);
- the evaluation figures under the names of :mod:`tasks.core.metric_names` (linked to the
  logged model, so the Models tab compares them too);
- ``recipe.json`` (how it was made), ``manifest.json``, ``per_class.json`` (precision,
  recall, F1, support per class) and its confusion matrix (``confusion_matrix.png``,
  ``confusion.json``);
- tags: ``model``, ``method``, ``runtime``, ``gate`` (champion / pass / fail) and why,
  ``champion`` (true / false), ``evaluate_run_id``; a one-paragraph description.

A manifest that names no run of this experiment (a model folder made outside a pipeline, a
run since deleted) gets a new run nested under the evaluate stage's run instead.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import mlflow

from tasks.core import metric_names as names
from tasks.core import tracking
from tasks.core.paths import ProjectPaths
from tasks.core.tables import cell, times
from tasks.evaluation.results import BASELINE, Evaluation, ModelResult, ordered_metrics
from tasks.evaluation.summary import gate_mark

log = logging.getLogger("slimflow.evaluate")

# A logged model is named after its model (:func:`logged_model_name`: the Models tab's and the
# runs table's Models column's name); models logged before were all named this, and are still
# found again.
EARLIER_LOGGED_MODEL_NAME = "model"
RUN_ID_KEY = "mlflow_run_id"  # the manifest key naming the run that made the model
SERVING_DIGEST = "serving_digest"  # a logged model's tag: the code and data contract it serves with
PER_CLASS_TABLE = "per_class.json"


def log_models(results: Mapping[str, ModelResult], class_names: tuple[str, ...], paths: ProjectPaths,
               experiment: str, stage_run_id: str) -> dict[str, tuple[str, str]]:
    """Into every model's run, what does not wait for its costs and the gate: the logged
    model and the files of :func:`_log_files`. Returns ``{model: (run_id, model_uri)}`` for
    :func:`log_model_runs`. The evaluate stage calls it while the memory probe runs."""
    return {name: _log_model_and_files(result, class_names, paths, experiment, stage_run_id)
            for name, result in results.items()}


def log_model_runs(evaluation: Evaluation, paths: ProjectPaths, experiment: str, stage_run_id: str,
                   logged: Mapping[str, tuple[str, str]] | None = None) -> None:
    """Complete every model's run (all but its confusion matrix picture: see
    :func:`log_confusion_matrices`), once the models are timed and gated: its figures (linked to its logged model) and tags, and
    what :func:`log_models` logs, for the models it did not; fills ``evaluation.run_ids``
    and ``evaluation.model_uris``."""
    for name, result in evaluation.models.items():
        if name in (logged or {}):
            run_id, uri = logged[name]
        else:
            run_id, uri = _log_model_and_files(result, evaluation.class_names, paths, experiment, stage_run_id)
        _log_figures(result, evaluation, run_id, uri, stage_run_id)
        evaluation.run_ids[name], evaluation.model_uris[name] = run_id, uri


def _log_model_and_files(result: ModelResult, class_names: tuple[str, ...], paths: ProjectPaths,
                         experiment: str, stage_run_id: str) -> tuple[str, str]:
    with _model_run(result, paths, experiment, stage_run_id) as (run, earlier):
        run_id = run.info.run_id
        uri = (_logged_model_uri(earlier, result, paths) if earlier else None) or _log_model(result, paths, run, earlier)
        _log_files(result, class_names, earlier)
    log.info("%s: MLflow run %s, logged model %s", result.name, run_id, uri)
    return run_id, uri


def log_confusion_matrices(run_ids: Mapping[str, str], figures: Path) -> None:
    """Each model's ``confusion/<model>.png`` under ``figures`` into its run (``run_ids``;
    named ``confusion_matrix.png`` there)."""
    import shutil
    import tempfile

    client = mlflow.MlflowClient()
    for name, run_id in run_ids.items():
        picture = figures / "confusion" / f"{name}.png"
        if not picture.is_file():
            continue
        with tempfile.TemporaryDirectory() as folder:  # on disk it is named after its model
            target = Path(folder) / "confusion_matrix.png"
            shutil.copy2(picture, target)
            client.log_artifact(run_id, str(target))


def _existing_run(manifest: dict[str, Any]) -> Any | None:
    """The run the manifest names (as read now), if it is in this store and the active experiment."""
    from mlflow.exceptions import MlflowException

    run_id = manifest.get(RUN_ID_KEY)
    if not run_id:
        return None
    try:
        run = mlflow.MlflowClient().get_run(run_id)
    except MlflowException:
        return None
    active = mlflow.active_run()  # the evaluate stage's run: its experiment is this one
    experiment = active.info.experiment_id if active else None
    if run.info.lifecycle_stage != "active" or (experiment and run.info.experiment_id != experiment):
        return None
    return run


@contextlib.contextmanager
def _model_run(result: ModelResult, paths: ProjectPaths, experiment: str,
               stage_run_id: str) -> Iterator[tuple[Any, Any | None]]:
    """The model's own run, reopened, with what it held before (read once: each ``get_run``
    reads all of a run's metrics, params and tags, 15-35 ms); or a new one under the
    evaluate stage's run, with None."""
    earlier = _existing_run(result.manifest)
    if earlier is not None:
        with tracking.resumed_run(earlier.info.run_id, fetched=earlier) as run:
            yield run, earlier
        return
    manifest = result.manifest
    params = tracking.recipe_params(manifest.get("parent"), result.method, manifest.get("recipe") or [])
    with tracking.stage_run("evaluate", paths.root, experiment, params=params, run_name=result.name,
                            parent_run_id=stage_run_id) as run:
        yield run, None


def _logged_model_uri(earlier: Any, result: ModelResult, paths: ProjectPaths) -> str | None:
    """This model file's logged model in the run (``earlier``: as it was before this
    evaluation reopened it), if an earlier evaluation logged it already with the same code
    and data contract (:func:`~tasks.evaluation.promotion.serving_digest`)."""
    from tasks.evaluation.promotion import serving_digest

    client = mlflow.MlflowClient()
    outputs = earlier.outputs
    serving = serving_digest(paths.prepared)
    for output in (outputs.model_outputs if outputs else None) or []:
        model = client.get_logged_model(output.model_id)
        named = model.name in (logged_model_name(result.name), EARLIER_LOGGED_MODEL_NAME)
        if (named and model.tags.get("model_digest") == result.manifest.get("digest")
                and model.tags.get(SERVING_DIGEST) == serving):
            return f"models:/{model.model_id}"
    return None


def logged_model_name(model: str) -> str:
    """``model`` as a logged model's name: MLflow refuses ``/ : . % " '`` there, so each
    character but letters, digits, ``-`` and ``_`` becomes ``_`` (``distilled-w0.5`` ->
    ``distilled-w0_5``; the run's ``model`` tag keeps the name itself)."""
    return "".join(c if c.isascii() and (c.isalnum() or c in "-_") else "_" for c in model)


def _log_model(result: ModelResult, paths: ProjectPaths, run: Any, earlier: Any | None) -> str:
    """Log the model folder as a pyfunc (raw inputs in, class indices out) as the output of
    ``run`` (the model's run, active; ``earlier``: as it was before it was reopened, or None).

    The logged model's figures are the evaluation's alone (:func:`_log_figures` links them).
    ``log_model`` inside the run would also link every figure the run holds at step 0, read
    one metric history at a time (16-30 queries a model): on a variant's run, the compress
    stage's size figures a second time and its fine-tuning curve's first point (the pruned
    model's accuracy *before* fine-tuning, shown in the Models tab as the model's own). So
    the logged model is made for its run first (``initialize_logged_model``: source run,
    the run's params, tags), filled by ``log_model`` in a thread with no active run
    (MLflow's active run is per thread), and named the run's output (what ``log_model``
    records). Its ``MLmodel`` file then names no run; the logged model and the registered
    version do.
    """
    from concurrent.futures import ThreadPoolExecutor

    from mlflow.entities import LoggedModelOutput

    from tasks.evaluation.promotion import log_pyfunc_model, serving_digest

    run_id = run.info.run_id
    params = (earlier or mlflow.MlflowClient().get_run(run_id)).data.params
    model = mlflow.initialize_logged_model(
        name=logged_model_name(result.name), source_run_id=run_id, params=dict(params),
        experiment_id=run.info.experiment_id,
        tags={"model": result.name, "model_digest": str(result.manifest.get("digest")),
              SERVING_DIGEST: serving_digest(paths.prepared), "method": result.method, "runtime": result.runtime},
    )
    with ThreadPoolExecutor(1, thread_name_prefix="log-model") as thread:
        thread.submit(log_pyfunc_model, result.folder, paths.prepared, model.name, model.model_id).result()
    mlflow.MlflowClient().log_outputs(run_id, [LoggedModelOutput(model.model_id, step=0)])
    return f"models:/{model.model_id}"


def recipe_document(result: ModelResult) -> dict[str, Any]:
    """``recipe.json``: how the model was made, from its manifest (readable, not a repr)."""
    manifest = result.manifest
    document: dict[str, Any] = {
        "model": result.name,
        "method": result.method,
        "parent": manifest.get("parent") or (None if result.name == BASELINE else BASELINE),
        "steps": manifest.get("recipe") or [],
    }
    if manifest.get("full_recipe"):
        document["chain_from_baseline"] = manifest["full_recipe"]
    for key in ("teacher", "model_spec", "format", "runtime", "best_epoch", "world_size"):
        if manifest.get(key) is not None:
            document[key] = manifest[key]
    return document


def _tags(result: ModelResult, evaluation: Evaluation, stage_run_id: str) -> dict[str, str]:
    manifest = result.manifest
    gate = gate_mark(evaluation, result.name)
    return {
        "model": result.name,
        "method": result.method,
        "runtime": result.runtime,
        "format": str(manifest.get("format", "")),
        "parent": str(manifest.get("parent") or ("none" if result.name == BASELINE else BASELINE)),
        "gate": gate,
        "gate_reason": evaluation.reasons.get(result.name, "")[:5000],
        "champion": str(gate == "champion").lower(),
        "evaluate_run_id": stage_run_id,
        "model_digest": str(manifest.get("digest", "")),
        "energy_source": result.notes.get("energy", ""),
        "make_energy_source": result.notes.get("make_energy", ""),
        "flops_source": result.notes.get("flops", ""),
        "memory_method": result.notes.get("memory", ""),
        "mlflow.note.content": describe(result, evaluation),
    }


def describe(result: ModelResult, evaluation: Evaluation) -> str:
    """The run's description: what the model is and how it fared, in one paragraph."""
    m = result.metrics
    made = "the trained baseline" if result.name == BASELINE else (
        f"{result.method} of {result.manifest.get('parent') or BASELINE}"
    )
    figures = (
        f"test accuracy {cell(names.ACCURACY, m)}% "
        f"({cell(names.ACCURACY_CHANGE_PTS, m)} pts vs the baseline), "
        f"{cell(names.SIZE_BYTES, m)} KiB "
        f"({times(m.get(names.SIZE_REDUCTION_X), 'smaller', 'larger')}), "
        f"latency p50 {cell(names.LATENCY_P50_MS, m)} ms "
        f"({times(m.get(names.SPEEDUP_X), 'faster', 'slower')})"
    )
    return (
        f"**{result.name}**: {made}, {result.runtime}. {figures[0].upper()}{figures[1:]}. "
        f"Gate: {evaluation.reasons.get(result.name, '-')}. "
        "Artifacts: the logged model, recipe.json, manifest.json, per_class.json, confusion_matrix.png."
    )


def _log_files(result: ModelResult, class_names: tuple[str, ...], earlier: Any | None) -> None:
    """``recipe.json``, ``manifest.json``, ``per_class.json`` and ``confusion.json`` into the
    active (model's) run; the ``error`` tag of an earlier attempt that failed (``earlier``:
    the run before it was reopened; None: a new run) goes."""
    if earlier is not None and "error" in earlier.data.tags:
        mlflow.MlflowClient().delete_tag(mlflow.active_run().info.run_id, "error")
    mlflow.log_dict(recipe_document(result), "recipe.json")
    mlflow.log_text(json.dumps(result.manifest, indent=2, sort_keys=True) + "\n", "manifest.json")
    classes = list(result.per_class)
    table = {"class": classes}
    for column in names.PER_CLASS_COLUMNS:
        table[column] = [result.per_class[c][column] for c in classes]
    _log_table(table, PER_CLASS_TABLE, replace=earlier is not None)
    mlflow.log_dict({"labels": list(class_names), "matrix": result.confusion.tolist()}, "confusion.json")


def _log_table(table: Mapping[str, list[Any]], name: str, replace: bool) -> None:
    """``table`` as the active run's table ``name`` (``mlflow.log_table``: the artifact
    viewer shows it as a table). ``log_table`` *appends* to a table the run has already,
    and a reopened run has the one an earlier evaluation logged (a re-evaluation doubled
    every row); with ``replace``, a table already there is written over, in the format
    ``log_table`` writes."""
    import tempfile

    import pandas as pd

    run_id = mlflow.active_run().info.run_id
    if not (replace and any(f.path == name for f in mlflow.MlflowClient().list_artifacts(run_id))):
        mlflow.log_table(dict(table), name)
        return
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / name
        pd.DataFrame(dict(table)).to_json(path, orient="split", index=False, date_format="iso")
        mlflow.log_artifact(str(path))


def _log_figures(result: ModelResult, evaluation: Evaluation, run_id: str, model_uri: str,
                 stage_run_id: str) -> None:
    """Figures (linked to the logged model) and tags into the model's run, which stays as
    :func:`log_models` left it (ended, with its own end time): one ``log_batch``, what
    ``mlflow.log_metrics(..., model_id=, run_id=)`` writes for the figures, without its
    ``get_run`` and second transaction."""
    import time

    from mlflow.entities import Metric, RunTag

    now, model_id = int(time.time() * 1000), model_uri.removeprefix("models:/")
    # Every model gets every key (NaN where a figure could not be taken), so runs line up.
    metrics = [Metric(key, float(value), now, 0, model_id=model_id, run_id=run_id)
               for key, value in ordered_metrics(result.metrics).items()]
    tags = [RunTag(key, value) for key, value in _tags(result, evaluation, stage_run_id).items()]
    mlflow.MlflowClient().log_batch(run_id, metrics=metrics, tags=tags)


def tag_registration(evaluation: Evaluation) -> None:
    """The champion's run names the registry version made from its logged model."""
    promotion = evaluation.promotion
    if not (promotion and promotion.promoted and promotion.version and evaluation.champion in evaluation.run_ids):
        return
    run_id = evaluation.run_ids[evaluation.champion]
    client = mlflow.MlflowClient()
    client.set_tag(run_id, "registered_model", promotion.registered_model)
    client.set_tag(run_id, "registered_version", str(promotion.version))
