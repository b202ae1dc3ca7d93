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


def test_flow_runs_every_stage_tracks_it_and_leaves_dvc_clean(tiny_project: Path, prefect_server: None,
                                                              tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from flows.pipeline import pipeline
    from tasks.core.dvc import pipeline_status
    from tasks.core.telemetry import TELEMETRY_OFF

    # As in a user's shell, no telemetry switch is set (and whatever the run sets goes with
    # the test); ONNX Runtime would queue its telemetry under this cache.
    cache = tmp_path / "cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    for key in TELEMETRY_OFF:
        monkeypatch.setenv(key, "")  # recorded as unset before the test: undone after it
        monkeypatch.delenv(key)

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

    _assert_one_run_per_model(runs, stage_runs, tiny_project)
    _assert_every_computing_stage_records_its_energy(runs, stage_runs, pipeline_run, tiny_project)
    _assert_one_name_per_figure(runs)
    _assert_the_pipeline_run_shows_the_result(pipeline_run, result, tiny_project)
    _assert_a_baseline_cut_short_is_a_caveat_of_the_result(pipeline_run, tiny_project)

    metrics = json.loads((tiny_project / "metrics" / "evaluate.json").read_text())
    assert metrics["baseline"]["accuracy"] > 0.5
    assert "accuracy" in metrics["int8-dynamic"]

    assert pipeline_status(tiny_project) == {}
    # The evaluate stage loaded ONNX Runtime, which queues a usage event for Microsoft in each
    # process that loads it unless told not to (tasks/core/telemetry.py).
    assert not (cache / "Microsoft").exists(), sorted(str(p) for p in cache.rglob("*"))[:5]
    _assert_the_flow_run_shows_the_result(pipeline_run.data.tags["prefect_flow_run_id"], result["champion"])

    # A second run skips every stage, and still leaves DVC clean.
    again = pipeline()
    assert not any(s["ran"] or s["restored"] for s in again["stages"])
    assert pipeline_status(tiny_project) == {}


def _assert_one_run_per_model(runs, stage_runs, root: Path) -> None:
    """Each model has one run holding its logged model, recipe, figures and plots: the train
    run for the baseline, its compress run for a variant; the Models tab lists one each."""
    import mlflow

    from tasks.core.metric_names import MODEL_FIGURES

    models = [name for name, values in json.loads((root / "metrics" / "evaluate.json").read_text()).items()
              if isinstance(values, dict)]
    assert sorted(models) == ["baseline", "int8-dynamic"]
    client = mlflow.MlflowClient()
    logged = mlflow.search_logged_models(experiment_ids=[runs[0].info.experiment_id], output_format="list")
    assert len(logged) == len(models)  # the Models tab: one logged model per model
    for model in logged:  # ...its figures the evaluation's, each once (not the runs' earlier step-0 ones)
        assert sorted(m.key for m in model.metrics) == sorted(MODEL_FIGURES), model.tags.get("model")
    for name in models:
        holding = [r for r in runs if r.data.tags.get("model") == name
                   and (client.get_run(r.info.run_id).outputs.model_outputs or [])]
        assert len(holding) == 1, (name, [r.info.run_name for r in holding])
        (run,) = holding
        assert set(MODEL_FIGURES) <= set(run.data.metrics), name
        files = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"recipe.json", "manifest.json", "per_class.json", "confusion_matrix.png"} <= files, (name, files)
        assert run.data.tags["evaluate_run_id"] == stage_runs["evaluate"].info.run_id
        assert run.data.tags["champion"] in {"true", "false"} and "champion" not in run.data.metrics
        folder = root / "artifacts" / ("model" if name == "baseline" else f"compressed/{name}")
        assert json.loads((folder / "manifest.json").read_text())["mlflow_run_id"] == run.info.run_id
        manifest = json.loads((folder / "manifest.json").read_text())
        assert manifest["nonzeros"] <= manifest["parameters"]
    baseline_run = next(r for r in runs if r.data.tags.get("model") == "baseline")
    assert baseline_run.info.run_id == stage_runs["train"].info.run_id  # with its training curves
    variant_run = next(r for r in runs if r.data.tags.get("model") == "int8-dynamic")
    assert variant_run.data.tags["stage"] == "compress" and variant_run.data.params["recipe.step1.method"] == "quantize"
    assert {"val_accuracy", "size_reduction_x", "compress_time_s"} <= set(variant_run.data.metrics)
    # No second, unlinked run per model under the evaluate stage.
    assert not [r for r in runs if r.data.tags.get("mlflow.parentRunId") == stage_runs["evaluate"].info.run_id]


def _assert_every_computing_stage_records_its_energy(runs, stage_runs, pipeline_run, root: Path) -> None:
    """Train, compress and evaluate each record their energy, labelled (on this CPU machine: the
    estimate, its method named); every model its making and its energy per 1,000 predictions;
    the pipeline run the total."""
    import mlflow

    from tasks.core.energy import rapl_readable

    label = "rapl" if rapl_readable() else "estimate (CodeCarbon: process CPU time x "
    for stage in ("train", "compress", "evaluate"):
        run = stage_runs[stage]
        assert run.data.metrics["energy_j"] > 0, stage
        assert run.data.tags["stage_energy_source"].startswith(label), (stage, run.data.tags["stage_energy_source"])
    train = json.loads((root / "metrics" / "train.json").read_text())
    epochs = mlflow.MlflowClient().get_metric_history(stage_runs["train"].info.run_id, "epoch_energy_j")
    assert len(epochs) == 3 and all(m.value > 0 for m in epochs)  # per epoch, both ranks summed
    assert train["train_energy_j"] >= sum(m.value for m in epochs)
    evaluated = json.loads((root / "metrics" / "evaluate.json").read_text())
    assert evaluated["baseline"]["make_energy_j"] == pytest.approx(train["train_energy_j"])
    for name in ("baseline", "int8-dynamic"):
        figures = evaluated[name]
        assert figures["energy_per_1k_j"] > 0 and figures["energy_per_1k_batch1_j"] > 0, name
        assert figures["make_energy_j"] > 0 and figures["make_co2e_g"] > 0, name
        run = next(r for r in runs if r.data.tags.get("model") == name and "energy_source" in r.data.tags)
        assert run.data.tags["energy_source"].startswith(label) and run.data.tags["make_energy_source"], name
    assert "payback_predictions" in evaluated["int8-dynamic"]
    total = pipeline_run.data.metrics
    stages = sum(total[f"stage_energy_j.{stage}"] for stage in ("train", "compress", "evaluate"))
    assert total["energy_j"] == pytest.approx(stages) and total["co2e_g"] > 0
    assert total["stage_energy_j.train"] == pytest.approx(stage_runs["train"].data.metrics["energy_j"])


def _assert_one_name_per_figure(runs) -> None:
    """Every metric any run logged is a name of the one vocabulary (which defines each figure once)."""
    from tasks.core.metric_names import is_known

    unknown = {(r.info.run_name, key) for r in runs for key in r.data.metrics if not is_known(key)}
    assert not unknown, sorted(unknown)


def _assert_the_pipeline_run_shows_the_result(pipeline_run, result, root: Path) -> None:
    import mlflow

    tags, metrics = pipeline_run.data.tags, pipeline_run.data.metrics
    evaluated = json.loads((root / "metrics" / "evaluate.json").read_text())
    champion = evaluated["champion"]
    assert champion and tags["champion"] == champion == result["champion"]
    decision = json.loads((root / "artifacts" / "evaluation" / "result.json").read_text())
    assert tags["champion_version"] == str(decision["registered_version"])
    assert tags["champion_registered_model"] == "slimflow-digits"
    assert tags["champion_run_id"] == decision["model_runs"][champion]
    assert tags["gate_decision"] and tags["data_digest"]
    for key in ("accuracy", "accuracy_change_pts", "size_reduction_x", "speedup_x", "size_bytes", "latency_p50_ms"):
        assert metrics[key] == pytest.approx(evaluated[champion][key]), key
    assert {"stage_time_s.train", "stage_time_s.evaluate"} <= set(metrics)
    files = {a.path for a in mlflow.MlflowClient().list_artifacts(pipeline_run.info.run_id, "result")}
    assert {"result/comparison.csv", "result/comparison.json", "result/accuracy_vs_size.png",
            "result/accuracy_vs_latency.png", "result/accuracy_vs_energy.png", "result/report.md",
            "result/report.html"} <= files
    # Params people can read: the recipes as an artifact, not a Python repr.
    params = pipeline_run.data.params
    assert json.loads(params["compress.variants"]) == ["int8-dynamic"]
    assert max(len(v) for v in params.values()) < 500
    root_files = {a.path for a in mlflow.MlflowClient().list_artifacts(pipeline_run.info.run_id)}
    assert {"recipes.json", "params.yaml"} <= root_files


def _assert_a_baseline_cut_short_is_a_caveat_of_the_result(pipeline_run, root: Path) -> None:
    """TINY_PARAMS train 3 epochs: the baseline is still improving (by far more than the
    gate's 1 point) when they run out, and the result says so where it is read."""
    fit = json.loads((root / "artifacts" / "model" / "manifest.json").read_text())["fit"]
    assert fit["epochs"] == fit["epochs_run"] == 3 and fit["val_accuracy_late_gain_pts"] > 1.0
    caveats = json.loads((root / "artifacts" / "evaluation" / "result.json").read_text())["caveats"]
    # (Its 3 epochs may also have kept, by val_loss, a less accurate epoch: a caveat of its own.)
    (caveat,) = [caveat for caveat in caveats if caveat.startswith("the baseline was still improving")]
    assert caveat.startswith("the baseline was still improving when its 3 epochs ran out: validation accuracy "
                             f"+{fit['val_accuracy_late_gain_pts']:.2f} points in its last 2 epochs"), caveat
    assert f"**Caveat**: T{caveat[1:]}." in (root / "artifacts" / "evaluation" / "report.md").read_text()
    description = pipeline_run.data.tags["mlflow.note.content"]
    # Under the headline, above the fold of the MLflow UI's description (links, registry, gate after it).
    assert f"Caveat: {caveat}." in description.split("\n\n")[1:1 + len(caveats)]


def _assert_the_flow_run_shows_the_result(flow_run_id: str, champion: str) -> None:
    """The flow run's log ends with the result; its artifacts are formatted and link the runs."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, LogFilter, LogFilterFlowRunId

    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()  # the flow's last lines may still be on their way to the API
    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    messages = [entry.message for entry in sorted(logs, key=lambda entry: entry.timestamp)]
    # The flow's own last lines (Prefect then adds its "Finished in state ..." line).
    own = [m for m in messages if not m.startswith("Finished in state")]
    assert own[-1].startswith("result: MLflow pipeline run"), own[-5:]
    assert any(m.startswith(f"result: champion {champion}") and "accuracy" in m and "latency p50" in m for m in own)
    assert any(m.startswith("result: caveat: the baseline was still improving when its 3 epochs ran out") for m in own)
    by_key = {a.key: a for a in artifacts}
    table = json.loads(by_key["variant-comparison"].data) if isinstance(by_key["variant-comparison"].data, str) \
        else by_key["variant-comparison"].data
    cells = [str(v) for row in table for v in row.values()]
    assert "champion" in cells and all(len(c) <= 12 for c in cells if c[:1].isdigit())  # no 0.19512649999999998
    runs_md = str(by_key["mlflow-runs"].data)
    assert "Champion" in runs_md and "stage train" in runs_md and f"model {champion}" in runs_md
    assert "**Caveat**: the baseline was still improving when its 3 epochs ran out" in runs_md


def test_a_run_that_fails_after_its_stages_says_why_in_mlflow(tiny_project: Path, prefect_server: None,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The pipeline run ends FAILED with the error as its tag wherever the run breaks, also
    after its stages (publishing the result), so `slimflow status` shows why."""
    import flows.pipeline
    from flows.pipeline import pipeline

    def broken_publish(*args, **kwargs):
        raise RuntimeError("the result could not be published")

    monkeypatch.setattr(flows.pipeline, "publish_result", broken_publish)
    with pytest.raises(RuntimeError, match="could not be published"):
        pipeline(last="prepare")
    (run,) = [r for r in _runs() if r.data.tags.get("pipeline") == "slimflow"]
    assert run.info.status == "FAILED"
    assert run.data.tags["error"] == "the result could not be published"
    assert run.data.tags["stages_ran"] == "prepare"
