"""The evaluate stage in MLflow: the stage run's summary metrics, tags (the gate's and the
promotion's decisions) and artifacts. Each model's own run (its logged model and figures) is
completed by :mod:`tasks.evaluation.model_runs`; the registry step is
:mod:`tasks.evaluation.registration`."""

from __future__ import annotations

from pathlib import Path

import mlflow

from tasks.evaluation.results import Evaluation


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
    if rows := decision.get("compared_on"):  # both models on the test rows the champion never trained on
        metrics["unseen_test_rows"] = float(rows["compared"])
        for who, figures in (("current_champion", rows["champion"]), ("challenger", rows["challenger"])):
            metrics.update({f"{who}_unseen_{key}": float(value) for key, value in figures.items()
                            if key in {"accuracy", "macro_f1"} and value is not None})
    mlflow.log_metrics(metrics)
    mlflow.set_tags({
        "champion": evaluation.champion or "none",
        "champion_version": promotion.version or "none",
        "champion_run_id": evaluation.run_ids.get(evaluation.champion or "", "none"),
        "gate_decision": promotion.reason[:5000],
        "promotion_decision": f"{decision.get('verdict', 'none')}: {decision.get('reason', '')}"[:5000],
    })
    for folder in ("plots", "metrics", "evaluation"):
        mlflow.log_artifacts(str(staging / folder), folder)
