"""The evaluate stage in MLflow: the stage run's summary metrics, tags and artifacts, and the
champion's registration with its evidence as version tags. Each model's own run (its
logged model and figures) is completed by :mod:`tasks.evaluation.model_runs`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow

from tasks.core import tracking
from tasks.core.config import EvaluateParams
from tasks.core.paths import ProjectPaths
from tasks.evaluation.promotion import Promotion, keep_champion, promote
from tasks.evaluation.results import Evaluation, ModelResult, json_number, ordered_metrics


def data_digest_or_none(prepared: Path) -> str | None:
    """The prepared data's digest, or None when it cannot be read."""
    from tasks.data import data_digest

    try:
        return data_digest(prepared)
    except (OSError, KeyError, ValueError):
        return None


def evidence(
    result: ModelResult, evaluation: Evaluation, paths: ProjectPaths, params: EvaluateParams
) -> dict[str, Any]:
    """Version tags: the champion's metrics, recipe, data digest, git commit, runs, gate."""
    found: dict[str, Any] = {f"metric.{k}": json_number(v) for k, v in ordered_metrics(result.metrics).items()}
    found.update(
        method=result.method,
        runtime=result.runtime,
        recipe=result.manifest.get("recipe") or [],
        data_digest=data_digest_or_none(paths.prepared),
        git_commit=tracking.git_commit(paths.root),
        source_run_id=evaluation.run_ids.get(result.name),
        evaluate_run_id=evaluation.stage_run_id,
        gate=params.gate.model_dump(),
        objective=params.objective,
    )
    return found


def register_champion(evaluation: Evaluation, paths: ProjectPaths, params: EvaluateParams) -> Promotion:
    """Register the gate's winner with the ``champion`` alias, or keep the alias and say why."""
    if not evaluation.champion:
        return keep_champion(params.registered_model, "no model passes the gate (see the reasons per model)")
    champion = evaluation.models[evaluation.champion]
    found = evidence(champion, evaluation, paths, params)
    if champion.name in evaluation.model_uris:  # the model its own run logged: registered, not logged again
        return promote(champion.name, champion.folder, paths.prepared / "preprocess.json",
                       params.registered_model, found, model_uri=evaluation.model_uris[champion.name])
    # No logged model yet: the pyfunc model is logged into the champion's own run (resumed).
    with mlflow.start_run(run_id=evaluation.run_ids[champion.name], nested=True):
        return promote(champion.name, champion.folder, paths.prepared / "preprocess.json",
                       params.registered_model, found)


def log_stage_summary(evaluation: Evaluation, staging: Path) -> None:
    """Into the active (stage) run: the decision as metrics and tags, the staged outputs as artifacts."""
    mlflow.log_metrics({
        "promoted": float(evaluation.promotion.promoted),
        "registered_new_version": float(evaluation.promotion.new_version),
        "models_evaluated": float(len(evaluation.models)),
        "models_passing": float(sum(r.metrics["passed_gate"] for r in evaluation.models.values())),
    })
    mlflow.set_tags({
        "champion": evaluation.champion or "none",
        "champion_version": evaluation.promotion.version or "none",
        "champion_run_id": evaluation.run_ids.get(evaluation.champion or "", "none"),
        "gate_decision": evaluation.promotion.reason[:5000],
    })
    for folder in ("plots", "metrics", "evaluation"):
        mlflow.log_artifacts(str(staging / folder), folder)
