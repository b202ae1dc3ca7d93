"""The whole chain, for real: a Prefect flow runs the DVC stages (Horovod training with 2
workers over Gloo), everything is recorded in MLflow, and DVC agrees afterwards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def _runs(experiment: str = "slimflow"):
    import mlflow

    exp = mlflow.get_experiment_by_name(experiment)
    return mlflow.search_runs(experiment_ids=[exp.experiment_id], output_format="list", max_results=500)


def test_flow_runs_every_stage_tracks_it_and_leaves_dvc_clean(tiny_project: Path, prefect_server: None) -> None:
    from flows.pipeline import pipeline
    from tasks.core.dvc import pipeline_status

    result = pipeline()
    assert [s["stage"] for s in result["stages"]] == ["prepare", "train", "compress", "evaluate"]
    assert all(s["ran"] for s in result["stages"])

    runs = _runs()
    by_id = {r.info.run_id: r for r in runs}
    pipeline_run = by_id[result["mlflow_run_id"]]
    assert pipeline_run.info.status == "FINISHED"
    assert pipeline_run.data.tags["prefect_flow_run_id"]
    card = json.loads((tiny_project / "data" / "prepared" / "card.json").read_text())
    assert pipeline_run.data.tags["data_digest"] == card["digest"]
    assert len(pipeline_run.data.tags["dvc_lock_md5"]) == 32
    stage_runs = {
        r.data.tags.get("stage"): r for r in runs if r.data.tags.get("mlflow.parentRunId") == pipeline_run.info.run_id
    }
    assert {"prepare", "train", "compress", "evaluate"} <= set(stage_runs)
    assert all(r.info.status == "FINISHED" for r in runs), [(r.info.run_name, r.info.status) for r in runs]

    train_run = stage_runs["train"]
    assert train_run.data.params["world_size"] == "2"
    import mlflow

    history = mlflow.MlflowClient().get_metric_history(train_run.info.run_id, "train_loss")
    assert len(history) == 3  # one point per epoch (TINY_PARAMS: 3 epochs)
    assert {"val_accuracy", "samples_per_s", "epoch_time_s"} <= set(train_run.data.metrics)

    # One evaluation run per model, with identical metric keys.
    model_runs = [r for r in runs if r.data.tags.get("variant")
                  and r.data.tags.get("mlflow.parentRunId") == stage_runs["evaluate"].info.run_id]
    names = {r.data.tags["variant"] for r in model_runs}
    assert {"baseline", "int8-dynamic"} <= names
    keys = {frozenset(r.data.metrics) for r in model_runs}
    assert len(keys) == 1 and "accuracy" in next(iter(keys))

    metrics = json.loads((tiny_project / "metrics" / "evaluate.json").read_text())
    assert metrics["baseline"]["accuracy"] > 0.5
    assert "accuracy" in metrics["int8-dynamic"]

    assert pipeline_status(tiny_project) == {}

    # A second run skips every stage, and still leaves DVC clean.
    again = pipeline()
    assert not any(s["ran"] for s in again["stages"])
    assert pipeline_status(tiny_project) == {}
