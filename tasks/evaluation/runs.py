"""The evaluate stage in MLflow: one nested run per model (identical metric keys, the
manifest as params, so the compare view lines them up), the stage run's summary metrics,
tags and artifacts, and the champion's registration with its evidence as version tags."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow

from tasks.core import tracking
from tasks.core.config import EvaluateParams
from tasks.core.paths import ProjectPaths
from tasks.evaluation.promotion import Promotion, keep_champion, promote
from tasks.evaluation.results import BASELINE, Evaluation, ModelResult, json_number, ordered_metrics


def data_digest_or_none(prepared: Path) -> str | None:
    """The prepared data's digest, or None when it cannot be read."""
    from tasks.data import data_digest

    try:
        return data_digest(prepared)
    except (OSError, KeyError, ValueError):
        return None


def _model_tags(result: ModelResult) -> dict[str, str]:
    manifest = result.manifest
    return {
        "variant": result.name,
        "method": result.method,
        "runtime": result.runtime,
        "format": str(manifest.get("format", "")),
        "parent": str(manifest.get("parent") or ("none" if result.name == BASELINE else BASELINE)),
        "energy_source": result.notes.get("energy", ""),
        "flops_source": result.notes.get("flops", ""),
        "memory_method": result.notes.get("memory", ""),
    }


def log_model_run(
    result: ModelResult, evaluation: Evaluation, paths: ProjectPaths, experiment: str, parent_run_id: str
) -> str:
    """One nested run per model: identical metric keys, the manifest as params."""
    manifest = {k: v for k, v in result.manifest.items() if k not in {"digest"}}
    manifest["recipe"] = json.dumps(manifest.get("recipe"), sort_keys=True, default=str)
    run_params = {"manifest": manifest, "model_digest": result.manifest.get("digest"),
                  "evaluation": {k: v for k, v in evaluation.settings.items() if k != "memory_method"}}
    with tracking.stage_run(
        "evaluate", paths.root, experiment, params=run_params, run_name=result.name,
        tags=_model_tags(result), parent_run_id=parent_run_id,
    ) as run:
        mlflow.log_metrics({k: float(v) for k, v in ordered_metrics(result.metrics).items()})
        mlflow.log_dict(
            {"labels": list(evaluation.class_names), "matrix": result.confusion.tolist()}, "confusion.json"
        )
        mlflow.set_tag("gate", evaluation.reasons.get(result.name, "")[:5000])
        return run.info.run_id


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
    # The pyfunc model is logged into the champion's own run (resumed).
    with mlflow.start_run(run_id=evaluation.run_ids[champion.name], nested=True):
        return promote(
            champion.name, champion.folder, paths.prepared / "preprocess.json",
            params.registered_model, evidence(champion, evaluation, paths, params),
        )


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
        "gate_decision": evaluation.promotion.reason[:5000],
    })
    for folder in ("plots", "metrics", "evaluation"):
        mlflow.log_artifacts(str(staging / folder), folder)
