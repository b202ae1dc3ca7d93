"""The evaluate stage in MLflow: one nested run per model (identical metric keys, the
manifest as params, so the compare view lines them up), and the stage run's summary
metrics, tags (the gate's and the promotion's decisions) and artifacts. The registry step
is :mod:`tasks.evaluation.registration`."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow

from tasks.core import tracking
from tasks.core.paths import ProjectPaths
from tasks.evaluation.results import BASELINE, Evaluation, ModelResult, ordered_metrics


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
    tags = {**_model_tags(result), "gate": evaluation.reasons.get(result.name, "")[:5000]}
    with tracking.stage_run(
        "evaluate", paths.root, experiment, params=run_params, run_name=result.name, tags=tags,
        parent_run_id=parent_run_id, metrics={k: float(v) for k, v in ordered_metrics(result.metrics).items()},
    ) as run:
        mlflow.log_dict(
            {"labels": list(evaluation.class_names), "matrix": result.confusion.tolist()}, "confusion.json"
        )
        return run.info.run_id


def log_stage_summary(evaluation: Evaluation, staging: Path) -> None:
    """Into the active (stage) run: the decisions as metrics and tags, the staged outputs
    (``evaluation/promotion.json`` among them) as artifacts."""
    promotion = evaluation.promotion
    decision = promotion.decision
    metrics = {
        "promoted": float(promotion.promoted),
        "registered_new_version": float(promotion.new_version),
        "models_evaluated": float(len(evaluation.models)),
        "models_passing": float(sum(r.metrics["passed_gate"] for r in evaluation.models.values())),
    }
    champion = decision.get("champion") or {}
    for source in ("recorded", "remeasured"):  # the current champion's figures beside the challenger's
        for key, value in (champion.get(source) or {}).items():
            if key in {"accuracy", "macro_f1"} and value is not None:
                metrics[f"current_champion_{source}_{key}"] = float(value)
    mlflow.log_metrics(metrics)
    mlflow.set_tags({
        "champion": evaluation.champion or "none",
        "champion_version": promotion.version or "none",
        "gate_decision": promotion.reason[:5000],
        "promotion_decision": f"{decision.get('verdict', 'none')}: {decision.get('reason', '')}"[:5000],
    })
    for folder in ("plots", "metrics", "evaluation"):
        mlflow.log_artifacts(str(staging / folder), folder)
