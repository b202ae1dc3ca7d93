"""The evaluate stage: identical metric keys for every model, sane timings, every declared
output on disk and in MLflow, a champion that loads through pyfunc and predicts what the
stage measured, and no half-written outputs on failure.

The stage runs once per module on a tiny project (digits, a 2.4k-parameter MLP baseline, a
narrower variant and an ONNX export) against a real MLflow sqlite store under tmp.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
import yaml

from test_evaluate_support import build_project, make_params

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The stage run once on a tiny project; its root, result and MLflow store."""
    root = build_project(tmp_path_factory.mktemp("evaluate") / "project")
    with pytest.MonkeyPatch.context() as patch:
        uri = f"sqlite:///{root / 'mlflow.db'}"
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        for key in ("MLFLOW_EXPERIMENT_ID", "SLIMFLOW_RUN_CONTEXT", "MLFLOW_RUN_ID"):
            patch.delenv(key, raising=False)
        patch.chdir(root)
        patch.setenv("SLIMFLOW_ROOT", str(root))
        import mlflow

        mlflow.set_tracking_uri(uri)
        from tasks.evaluate import run_evaluate
        from tasks.core.paths import ProjectPaths

        params = make_params()
        said = _Said()  # what MLflow's pyfunc logger said while the stage ran
        logging.getLogger("mlflow.pyfunc").addHandler(said)
        try:
            evaluation = run_evaluate(ProjectPaths(root), params)
        finally:
            logging.getLogger("mlflow.pyfunc").removeHandler(said)
        yield {"root": root, "evaluation": evaluation, "params": params, "uri": uri, "pyfunc_said": said.lines}


class _Said(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.levelname} {record.getMessage()}")


def _metrics_json(root: Path) -> dict[str, Any]:
    return json.loads((root / "metrics" / "evaluate.json").read_text())


def _model_entries(document: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: values for name, values in document.items() if isinstance(values, dict)}


# ---------------------------------------------------------------------------- the stage, end to end
def test_every_model_has_the_same_metric_keys_in_json_and_mlflow(evaluated: dict[str, Any]) -> None:
    import mlflow

    from tasks.core.metric_names import MODEL_FIGURES
    from tasks.evaluation.model_runs import logged_model_name

    document = _metrics_json(evaluated["root"])
    models = _model_entries(document)
    assert set(models) == {"baseline", "distilled-mlp-w0.5", "onnx-fp32"}
    for values in models.values():  # the vocabulary's figures, headline first, then the per-class table
        assert list(values) == [*MODEL_FIGURES, "per_class"]
        assert all(isinstance(v, (int, float)) or v is None for k, v in values.items() if k != "per_class")
        assert set(values["per_class"]) == {str(i) for i in range(10)}
        assert set(values["per_class"]["0"]) == {"precision", "recall", "f1", "support"}
    evaluation = evaluated["evaluation"]
    assert document["champion"] == evaluation.champion

    # These model folders name no MLflow run (made outside a pipeline): each model gets a run
    # under the stage run, holding its logged model and every figure.
    runs = mlflow.search_runs(
        experiment_names=["tests"], output_format="list",
        filter_string=f"tags.mlflow.parentRunId = '{evaluation.stage_run_id}'",
    )
    by_model = {r.data.tags["model"]: r for r in runs}
    assert set(by_model) == set(models)
    client = mlflow.MlflowClient()
    for name, run in by_model.items():
        assert run.info.status == "FINISHED"
        assert set(run.data.metrics) == set(MODEL_FIGURES), name
        assert run.data.tags["method"] == evaluation.models[name].method
        assert run.data.tags["runtime"] in {"pytorch", "onnxruntime"}
        assert run.data.tags["parent"] == ("none" if name == "baseline" else "baseline")
        assert run.data.tags["champion"] == str(name == evaluation.champion).lower()
        assert run.data.tags["gate"] in {"champion", "pass", "fail"}
        assert run.info.run_name == name
        assert [o.model_id for o in run.outputs.model_outputs] == [evaluation.model_uris[name].split("/")[-1]]
        # ...and the figures are the logged model's too: the Models tab compares them.
        logged = client.get_logged_model(evaluation.model_uris[name].split("/")[-1])
        assert {m.key for m in logged.metrics or []} == set(MODEL_FIGURES), name
        assert logged.name == logged_model_name(name) and logged.source_run_id == run.info.run_id
        files = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"recipe.json", "manifest.json", "per_class.json", "confusion_matrix.png"} <= files, files
    assert by_model["onnx-fp32"].data.tags["runtime"] == "onnxruntime"
    recipe = json.loads(Path(client.download_artifacts(by_model["distilled-mlp-w0.5"].info.run_id,
                                                       "recipe.json")).read_text())
    assert recipe["steps"][0]["method"] == "distill" and recipe["parent"] == "baseline"


def test_timings_are_ordered_and_ratios_refer_to_the_baseline(evaluated: dict[str, Any]) -> None:
    from tasks.core.model_files import read_manifest

    evaluation = evaluated["evaluation"]
    for name, result in evaluation.models.items():
        m = result.metrics
        assert 0 < m["latency_p50_ms"] <= m["latency_p95_ms"], name
        assert m["throughput_sps"] > 0 and m["energy_per_1k_j"] > 0 and m["energy_per_1k_batch1_j"] > 0
        assert m["co2e_per_1k_g"] == pytest.approx(m["energy_per_1k_j"] / 3.6e6 * 475.0)
        assert m["size_bytes"] == read_manifest(result.folder)["size_bytes"]
        assert math.isfinite(m["peak_memory_mb"]) and m["peak_memory_mb"] >= 0
        assert m["flops"] > 0  # counted for torch, the parent's for the ONNX export
        assert result.notes["energy"] == "rapl" or result.notes["energy"].startswith("estimate (CodeCarbon")
    assert evaluation.settings["threads"] == 1
    base = evaluation.models["baseline"].metrics
    assert base["size_reduction_x"] == base["speedup_x"] == base["throughput_gain_x"] == 1.0
    assert base["accuracy_change_pts"] == 0.0
    onnx = evaluation.models["onnx-fp32"].metrics
    assert onnx["flops"] == base["flops"] and evaluation.models["onnx-fp32"].notes["flops"].startswith("parent")
    assert onnx["accuracy"] == pytest.approx(base["accuracy"])  # the same weights in another runtime
    narrow = evaluation.models["distilled-mlp-w0.5"].metrics
    assert narrow["size_reduction_x"] == pytest.approx(base["size_bytes"] / narrow["size_bytes"])
    assert narrow["speedup_x"] == pytest.approx(base["latency_p50_ms"] / narrow["latency_p50_ms"])
    assert narrow["parameters"] < base["parameters"]
    assert all(r.metrics["nonzeros"] <= r.metrics["parameters"] for r in evaluation.models.values())


def test_every_declared_output_exists(evaluated: dict[str, Any]) -> None:
    root = evaluated["root"]
    stage = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["evaluate"]
    declared = [next(iter(entry)) if isinstance(entry, dict) else entry
                for section in ("outs", "metrics", "plots") for entry in stage.get(section, [])]
    assert "plots/accuracy_vs_size.png" in declared
    for output in declared:
        assert (root / output).exists(), output
        if output.endswith(".png"):
            assert (root / output).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    evaluation_dir = root / "artifacts" / "evaluation"
    assert (evaluation_dir / "training_curves.png").is_file()
    report = (evaluation_dir / "report.md").read_text()
    for name in evaluated["evaluation"].models:
        assert f"| {name} |" in report
    assert "Decision:" in report and "objective: **smallest**" in report
    assert "## Energy" in report and "payback (preds)" in report and "accuracy_vs_energy.png" in report

    tradeoff = json.loads((root / "plots" / "tradeoff.json").read_text())
    assert {row["model"] for row in tradeoff} == set(evaluated["evaluation"].models)
    assert all(set(row) == {"model", "size_bytes", "latency_p50_ms", "energy_per_1k_j", "accuracy", "pareto"}
               for row in tradeoff)
    assert any(row["pareto"] for row in tradeoff)

    with (root / "plots" / "confusion.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(evaluated["evaluation"].y_true)
    assert set(rows[0]) == {"actual", "predicted"}
    leftovers = [p.name for p in (root / "artifacts").iterdir() if p.name.startswith(".evaluation-staging-")]
    assert leftovers == []


def test_outputs_are_logged_to_the_stage_run(evaluated: dict[str, Any]) -> None:
    import mlflow

    evaluation = evaluated["evaluation"]
    client = mlflow.MlflowClient()
    stage = client.get_run(evaluation.stage_run_id)
    assert stage.info.status == "FINISHED" and stage.data.tags["stage"] == "evaluate"
    assert stage.data.tags["champion"] == evaluation.champion
    # What measuring cost (the memory probes, forked children, left out), labelled.
    assert stage.data.metrics["energy_j"] > 0 and stage.data.metrics["co2e_g"] > 0
    assert stage.data.tags["stage_energy_source"] == evaluation.settings["energy_source"]
    logged = {
        f"{folder}/{item.path.split('/')[-1]}"
        for folder in ("plots", "metrics", "evaluation")
        for item in client.list_artifacts(evaluation.stage_run_id, folder)
    }
    assert {
        "plots/tradeoff.json", "plots/confusion.csv", "plots/accuracy_vs_size.png", "plots/accuracy_vs_latency.png",
        "plots/accuracy_vs_energy.png", "plots/confusion_matrix.png", "metrics/evaluate.json", "evaluation/report.md", "evaluation/training_curves.png",
        "evaluation/report.html", "evaluation/result.json",
    } <= logged
    result = json.loads((evaluated["root"] / "artifacts" / "evaluation" / "result.json").read_text())
    assert result["champion"] == evaluation.champion and result["model_runs"] == evaluation.run_ids
    assert result["registered_version"] == evaluation.promotion.version


def test_logging_the_models_says_nothing_in_the_stages_output(evaluated: dict[str, Any]) -> None:
    """MLflow's "Validating input example against model signature", once per model, is not
    in the stage's output (the check runs: an example that does not fit raises)."""
    assert evaluated["pyfunc_said"] == []


def test_champion_loads_through_pyfunc_and_predicts_like_the_stage(evaluated: dict[str, Any]) -> None:
    import mlflow

    evaluation = evaluated["evaluation"]
    root = evaluated["root"]
    name = evaluated["params"].evaluate.registered_model
    assert evaluation.champion is not None and evaluation.promotion.promoted
    version = mlflow.MlflowClient().get_model_version_by_alias(name, "champion")
    assert str(version.version) == evaluation.promotion.version
    assert version.tags["variant"] == evaluation.champion
    assert version.tags["data_digest"] == "test-digest-0001"
    assert {"metric.accuracy", "metric.size_bytes", "recipe", "model_digest", "source_run_id"} <= set(version.tags)
    # The champion's own logged model was registered: no second copy logged for the registry.
    assert version.run_id == evaluation.run_ids[evaluation.champion]
    assert version.source == evaluation.model_uris[evaluation.champion]
    # ...and the logged model names its version, as mlflow.register_model records it (the
    # runs table's Models column then shows "<registered model> v<N>" on the champion's run).
    logged = mlflow.MlflowClient().get_logged_model(version.source.removeprefix("models:/"))
    assert {"name": name, "version": version.version} in json.loads(logged.tags["mlflow.modelVersions"])
    experiment = mlflow.get_experiment_by_name("tests").experiment_id
    assert len(mlflow.search_logged_models(experiment_ids=[experiment], output_format="list")) == len(
        evaluation.models)
    champion_accuracy = evaluation.models[evaluation.champion].metrics["accuracy"]
    assert json.loads(version.tags["metric.accuracy"]) == pytest.approx(champion_accuracy)

    model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    raw = np.load(root / "data" / "prepared" / "test_x.npy")  # raw, (N, 1, 8, 8)
    expected = evaluation.models[evaluation.champion].predictions
    shaped = np.asarray(model.predict(raw))
    assert shaped.dtype.kind == "i"
    np.testing.assert_array_equal(shaped, expected)
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException, match=r"expected shape \(-1, 1, 8, 8\)"):  # the signature: shaped only
        model.predict(raw.reshape(len(raw), -1))
    with (root / "plots" / "confusion.csv").open() as handle:
        published = [row["predicted"] for row in csv.DictReader(handle)]
    assert published == [evaluation.class_names[i] for i in expected]
    assert _metrics_json(root)["promoted"] == 1


def test_the_figures_are_drawn_meanwhile_and_their_energy_counts(evaluated: dict[str, Any], tmp_path: Path) -> None:
    """The drawing processes leave every figure, no input or energy report behind, and (with
    a per-process estimate meter, which cannot see them) their energy is credited to the
    stage. The first part (while the models are logged) draws what needs only the scored
    models; the second the comparison, and it does not draw the first part's again."""
    from tasks.core.energy import process_meter
    from tasks.evaluation.drawing import COMPARISON, ENERGY, INPUT, MODEL_FIGURES, figures_drawn_meanwhile

    evaluation = evaluated["evaluation"]
    history = [{"epoch": 1, "train_loss": 1.0, "val_loss": 1.2}]
    meter = process_meter()
    before = meter.credited.total
    with figures_drawn_meanwhile(tmp_path, evaluation, history, MODEL_FIGURES):
        pass
    first = {p.relative_to(tmp_path).as_posix(): p.stat().st_mtime_ns for p in tmp_path.rglob("*.png")}
    assert set(first) == {"evaluation/training_curves.png"} | {
        f"evaluation/confusion/{name}.png" for name in evaluation.models}
    with figures_drawn_meanwhile(tmp_path, evaluation, history):
        pass
    drawn = {p.relative_to(tmp_path).as_posix(): p.stat().st_mtime_ns for p in tmp_path.rglob("*.png")}
    assert {"plots/confusion_matrix.png", "plots/accuracy_vs_size.png", "evaluation/accuracy_vs_energy.png"} <= set(drawn)
    assert {name: drawn[name] for name in first} == first  # not drawn twice
    for part in (MODEL_FIGURES, COMPARISON):
        assert not (tmp_path / INPUT.format(part=part)).exists() and not (tmp_path / ENERGY.format(part=part)).exists()
    credited = meter.credited.total - before
    assert credited > 0 if meter.estimated else credited == 0, (meter.source, credited)


@pytest.mark.parametrize("failure", ["drawing before the timing", "drawing", "after drawing"])
def test_a_failure_leaves_the_previous_outputs_whole(
    evaluated: dict[str, Any], monkeypatch: pytest.MonkeyPatch, failure: str
) -> None:
    """The figures are drawn in processes of their own (tasks.evaluation.drawing): a
    failure of either (the models' part, while the memory probe runs; the comparison),
    or one after them, leaves every published output as it was; the first stops the stage
    before any timing, and the probe with it."""
    import copy

    import mlflow
    import numpy as np

    from tasks import evaluate
    from tasks.core.paths import ProjectPaths
    from tasks.evaluation import model_runs
    from tasks.evaluation.drawing import DrawingFailed

    root = evaluated["root"]
    files = [
        root / "metrics" / "evaluate.json", root / "plots" / "tradeoff.json",
        root / "plots" / "confusion_matrix.png", root / "artifacts" / "evaluation" / "report.md",
    ]
    before = {path: path.read_bytes() for path in files}
    evaluation = copy.deepcopy(evaluated["evaluation"])
    timed: list[bool] = []
    if failure == "drawing before the timing":  # a matrix matplotlib cannot draw, from the scoring
        from tasks.evaluation import benchmark

        score, time_models = benchmark._score, benchmark.time_models

        def broken_scores(*args: Any, **kwargs: Any) -> Any:
            results = score(*args, **kwargs)
            results[list(results)[-1]].confusion = np.zeros(3, dtype=np.int64)
            return results

        monkeypatch.setattr(benchmark, "_score", broken_scores)
        monkeypatch.setattr(benchmark, "time_models", lambda *a, **k: timed.append(True) or time_models(*a, **k))
        expected: tuple[type[BaseException], str] = (DrawingFailed, r"evaluation figures \(models\)")
    else:
        monkeypatch.setattr(evaluate, "measure_models", lambda *args, **kwargs: evaluation)
    if failure == "drawing":  # a matrix matplotlib cannot draw: the drawing process fails midway
        last = list(evaluation.models)[-1]
        evaluation.models[last].confusion = np.zeros(3, dtype=np.int64)
        expected = (DrawingFailed, r"evaluation figures \(comparison\)")
    elif failure == "after drawing":
        def broken(*args: Any, **kwargs: Any) -> None:
            raise RuntimeError("disk on fire")

        monkeypatch.setattr(model_runs, "log_confusion_matrices", broken)
        expected = (RuntimeError, "disk on fire")
    with pytest.raises(expected[0], match=expected[1]):
        evaluate.run_evaluate(ProjectPaths(root), evaluated["params"])
    assert {path: path.read_bytes() for path in files} == before
    assert not [p for p in (root / "artifacts").iterdir() if p.name.startswith(".evaluation-staging-")]
    assert not timed and not [p for p in psutil.Process().children(recursive=True)
                              if "tasks.evaluation.memory" in " ".join(p.cmdline())]
    failed = mlflow.search_runs(experiment_names=["tests"], output_format="list",
                                filter_string="attributes.status = 'FAILED'")
    assert any(r.data.tags.get("stage") == "evaluate" and "variant" not in r.data.tags for r in failed)


def _evaluated_again(evaluated: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, str, Any]:
    """A copy of the evaluated project and its registry, to run the stage again in: its root,
    the registered model's name, and the version ``@champion`` points at before."""
    import shutil

    import mlflow

    root = tmp_path / "project"
    shutil.copytree(evaluated["root"], root)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(root)
    mlflow.set_tracking_uri(uri)
    name = evaluated["params"].evaluate.registered_model
    return root, name, mlflow.MlflowClient().get_model_version_by_alias(name, "champion")


def test_an_impossible_gate_promotes_nothing_and_says_why(
    evaluated: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import copy

    import mlflow

    from tasks import evaluate
    from tasks.core.paths import ProjectPaths

    root, name, before = _evaluated_again(evaluated, tmp_path, monkeypatch)
    monkeypatch.setattr(evaluate, "measure_models", lambda *a, **k: copy.deepcopy(evaluated["evaluation"]))

    params = make_params(gate={"max_accuracy_drop": 0.0, "max_size_bytes": 1})
    result = evaluate.run_evaluate(ProjectPaths(root), params)

    assert result.champion is None and not result.promotion.promoted
    after = mlflow.MlflowClient().get_model_version_by_alias(name, "champion")
    assert after.version == before.version  # the alias stays where it was
    document = _metrics_json(root)
    assert document["promoted"] == 0 and document["champion"] is None
    assert all(values["passed_gate"] == 0 for values in _model_entries(document).values())
    report = (root / "artifacts" / "evaluation" / "report.md").read_text()
    assert "nothing promoted" in report and "max_size_bytes 1" in report and "stays @champion" in report
    with (root / "plots" / "confusion.csv").open() as handle:  # no champion: the baseline's predictions
        published = [row["predicted"] for row in csv.DictReader(handle)]
    assert published == [result.class_names[i] for i in result.models["baseline"].predictions]



def test_a_champion_no_better_than_a_constant_answer_is_not_registered(
    evaluated: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sensor sequences read as one channel trained at chance (26.7% of 4 balanced classes)
    and their baseline became version 1 of the registered model: a production alias on a
    model that answers no better than a constant. Now the gate's winner is held to beat
    always answering the most frequent class beyond chance on a balanced split."""
    import copy

    import mlflow
    import numpy as np

    from tasks import evaluate
    from tasks.core.paths import ProjectPaths

    root, name, before = _evaluated_again(evaluated, tmp_path, monkeypatch)
    constant = copy.deepcopy(evaluated["evaluation"])
    majority = int(np.bincount(constant.y_true).argmax())
    for result in constant.models.values():  # every model answers the most frequent class, whatever it is shown
        result.predictions = np.full_like(result.predictions, majority)
    monkeypatch.setattr(evaluate, "measure_models", lambda *a, **k: copy.deepcopy(constant))

    result = evaluate.run_evaluate(ProjectPaths(root), make_params())

    assert result.champion is not None and not result.promotion.promoted
    assert f"{result.champion} learned no more than a constant answer: its accuracy" in result.promotion.reason
    assert f"always answering {result.class_names[majority]!r} gets right" in result.promotion.reason
    assert mlflow.MlflowClient().get_model_version_by_alias(name, "champion").version == before.version
    assert _metrics_json(root)["promoted"] == 0


def test_the_closing_table_uses_the_shared_columns(evaluated: dict[str, Any]) -> None:
    from tasks.core.tables import as_text
    from tasks.evaluation.summary import summary_rows, summary_table

    evaluation = evaluated["evaluation"]
    text = as_text(summary_table(evaluation))
    assert "size ×" in text and "speed ×" in text and "champion" in text
    assert all(name in text for name in evaluation.models)
    rows = {row["model"]: row for row in summary_rows(evaluation)}
    narrow = evaluation.models["distilled-mlp-w0.5"].metrics
    assert rows["distilled-mlp-w0.5"]["size_reduction_x"] == narrow["size_reduction_x"]
    assert rows["baseline"]["speedup_x"] == 1.0 and rows[evaluation.champion]["gate"] == "champion"


def test_the_closing_table_and_report_say_how_the_test_split_was_drawn(evaluated: dict[str, Any]) -> None:
    """A split in time order or by group: the table's title and the report's methods say
    which rows the test split holds, and the noise note counts a group's rows together."""
    import copy

    from tasks.core.tables import as_text
    from tasks.evaluation.report import _methods
    from tasks.evaluation.summary import summary_table

    evaluation = copy.deepcopy(evaluated["evaluation"])
    test_samples = evaluation.settings["test_samples"]
    evaluation.settings.update(test_split="its latest 200 rows, 2025-07-08 to 2025-12-30 in 'date' order")
    table = summary_table(evaluation)
    assert table.title == ("slimflow evaluation (test split: its latest 200 rows, 2025-07-08 to 2025-12-30 in 'date' "
                           "order)")
    assert _methods(evaluation, None)[0] == (f"- Test split: {test_samples} samples, {evaluation.settings['classes']} "
                                             "classes; its latest 200 rows, 2025-07-08 to 2025-12-30 in 'date' order.")
    evaluation.settings.update(test_split="12 'patient' groups no model trained on", test_groups="patient",
                               test_records=12)
    assert (f"counted over its 12 'patient' groups, each group's rows among its {test_samples} samples counted "
            "together)") in " ".join(as_text(summary_table(evaluation)).split())
    assert summary_table(evaluated["evaluation"]).title == "slimflow evaluation (test split)"  # at random: as before


# ---------------------------------------------------------------------------- the command line
def _cli_project(tmp_path: Path, params_text: str) -> Path:
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    (tmp_path / "params.yaml").write_text(params_text)
    return tmp_path


def test_main_rejects_a_bad_parameter_before_work_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from tasks.evaluate import main

    root = _cli_project(tmp_path, "evaluate:\n  latency_repeats: 1\n  objective: cheapest\n")
    monkeypatch.setenv("SLIMFLOW_ROOT", str(root))
    monkeypatch.delenv("SLIMFLOW_RUN_CONTEXT", raising=False)
    assert main([]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "evaluate.latency_repeats" in err and "evaluate.objective" in err
    assert not (root / "metrics").exists() and not (root / "mlflow.db").exists()


def test_main_names_a_missing_baseline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from tasks.evaluate import main

    root = _cli_project(tmp_path, "evaluate:\n  latency_repeats: 3\n")
    monkeypatch.setenv("SLIMFLOW_ROOT", str(root))
    monkeypatch.delenv("SLIMFLOW_RUN_CONTEXT", raising=False)
    assert main(["--set", "evaluate.threads=1"]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and str(root / "artifacts" / "model" / "manifest.json") in err


def test_a_logged_model_holds_the_evaluation_figures_alone_not_its_runs_earlier_ones(
    evaluated: dict[str, Any],
) -> None:
    """A variant's run holds figures from the compress stage at step 0 (its size, its
    fine-tuning curve's first point: the accuracy *before* fine-tuning) when the evaluate
    stage logs its model there. The logged model (the Models tab's row) gets the
    evaluation's figures, each key once, and none of those; it names the run as its source
    and the run names it as its output."""
    import dataclasses

    import mlflow

    from tasks.core.metric_names import MODEL_FIGURES
    from tasks.core.paths import ProjectPaths
    from tasks.evaluation.model_runs import RUN_ID_KEY, log_model_runs, log_models

    evaluation, client = evaluated["evaluation"], mlflow.MlflowClient()
    experiment = mlflow.get_experiment_by_name(evaluated["params"].base.experiment).experiment_id
    name = "distilled-mlp-w0.5"
    result = evaluation.models[name]
    run = client.create_run(experiment, run_name=name, tags={"stage": "compress"})
    client.log_batch(run.info.run_id, metrics=[
        mlflow.entities.Metric("size_bytes", result.metrics["size_bytes"] + 1, 0, 0),
        mlflow.entities.Metric("fine_tune/val_accuracy", 0.24, 0, 0),
        mlflow.entities.Metric("fine_tune/val_accuracy", 0.91, 0, 1),
    ], params=[mlflow.entities.Param("recipe.step1.method", "distill")])
    client.set_terminated(run.info.run_id, "FINISHED")
    made_here = dataclasses.replace(result, manifest={**result.manifest, RUN_ID_KEY: run.info.run_id})
    paths = ProjectPaths(evaluated["root"])

    logged = log_models({name: made_here}, evaluation.class_names, paths,
                        evaluated["params"].base.experiment, evaluation.stage_run_id)
    run_id, uri = logged[name]
    model = client.get_logged_model(uri.removeprefix("models:/"))
    assert run_id == run.info.run_id and model.source_run_id == run_id
    assert not model.metrics, [(m.key, m.value) for m in model.metrics]  # the figures come with the gate
    assert model.params == {"recipe.step1.method": "distill"}
    assert model.tags["model"] == name and model.tags["model_digest"] == str(result.manifest.get("digest"))
    assert model.name == "distilled-mlp-w0_5"  # named after its model, as MLflow allows ("." is not)
    assert [o.model_id for o in client.get_run(run_id).outputs.model_outputs] == [model.model_id]

    alone = dataclasses.replace(evaluation, models={name: made_here}, run_ids={}, model_uris={})
    log_model_runs(alone, paths, evaluated["params"].base.experiment, evaluation.stage_run_id, logged)
    keys = [m.key for m in client.get_logged_model(model.model_id).metrics]
    assert sorted(keys) == sorted(MODEL_FIGURES)  # each once
    assert mlflow.pyfunc.load_model(uri).metadata.model_id == model.model_id


def test_a_model_evaluated_again_keeps_its_run_and_logged_model_and_loses_an_old_error(
    evaluated: dict[str, Any],
) -> None:
    """A model whose manifest names its run (as the train and compress stages write it) is
    evaluated into that run again: no second logged model, the run's end time kept, and
    the ``error`` tag an earlier failed attempt left removed."""
    import dataclasses

    import mlflow

    from tasks.core.paths import ProjectPaths
    from tasks.evaluation.model_runs import RUN_ID_KEY, log_models

    evaluation, client = evaluated["evaluation"], mlflow.MlflowClient()
    name = next(iter(evaluation.models))
    run_id = evaluation.run_ids[name]
    client.set_tag(run_id, "error", "an earlier attempt failed")
    before = client.get_run(run_id)
    result = evaluation.models[name]
    again = dataclasses.replace(result, manifest={**result.manifest, RUN_ID_KEY: run_id})
    logged = log_models({name: again}, evaluation.class_names, ProjectPaths(evaluated["root"]),
                        evaluated["params"].base.experiment, evaluation.stage_run_id)
    assert logged == {name: (run_id, evaluation.model_uris[name])}
    after = client.get_run(run_id)
    assert "error" not in after.data.tags
    assert after.info.status == "FINISHED" and after.info.end_time == before.info.end_time
    assert [o.model_id for o in after.outputs.model_outputs] == [evaluation.model_uris[name].split("/")[-1]]
    # Its per-class table is this evaluation's, one row a class (MLflow's log_table appends).
    table = mlflow.load_table("per_class.json", run_ids=[run_id])
    assert [str(c) for c in table["class"]] == list(result.per_class) and len(table) == len(evaluation.class_names)
    assert list(table["recall"]) == pytest.approx([result.per_class[c]["recall"] for c in result.per_class])
    # The same model file, another contract to serve (preprocess.json here; a changed slimflow
    # alike): logged anew, so no registered version serves with an older contract or code.
    from tasks.evaluation.model_runs import SERVING_DIGEST
    from tasks.evaluation.promotion import serving_digest

    prepared = ProjectPaths(evaluated["root"]).prepared
    original = (prepared / "preprocess.json").read_text()
    try:
        (prepared / "preprocess.json").write_text(original + "\n")
        (_, uri), = log_models({name: again}, evaluation.class_names, ProjectPaths(evaluated["root"]),
                               evaluated["params"].base.experiment, evaluation.stage_run_id).values()
        assert uri != evaluation.model_uris[name]
        assert client.get_logged_model(uri.split("/")[-1]).tags[SERVING_DIGEST] == serving_digest(prepared)
        assert len(client.get_run(run_id).outputs.model_outputs) == 2
    finally:
        (prepared / "preprocess.json").write_text(original)
