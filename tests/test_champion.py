"""Promotion earned against the champion (:mod:`tasks.evaluation.challenge`,
:mod:`tasks.evaluation.registration`): the evaluate stage, driven directly on prepared
data made here, against a real MLflow registry.

A digits project (8x8 inputs) registers the first champion once per module; each test
then runs the stage again on a copy of that project (the same registry, copied):
a 28x28 IDX data set under the same registered name (the alias stays, the run says which
name to set, and under that name a new champion is registered); a worse challenger on the
same data (recorded evidence) and on other data (the champion re-measured on this split).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from conftest import make_project
from raw_files import write_idx
from test_evaluate_support import FAST_EVALUATE, SPEC, build_project, make_params, save_baseline, train_tiny

NAME = "tiny-classifier"
pytestmark = pytest.mark.integration  # each stage run measures and registers for real (~30 s here)


@contextmanager
def project_env(root: Path) -> Iterator[None]:
    """``root`` as the working project with its own MLflow store."""
    import mlflow

    with pytest.MonkeyPatch.context() as patch:
        uri = f"sqlite:///{root / 'mlflow.db'}"
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        for key in ("MLFLOW_EXPERIMENT_ID", "SLIMFLOW_RUN_CONTEXT", "MLFLOW_RUN_ID"):
            patch.delenv(key, raising=False)
        patch.setenv("SLIMFLOW_ROOT", str(root))
        patch.chdir(root)
        mlflow.set_tracking_uri(uri)
        yield


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A digits project whose evaluate stage registered the first champion (version 1)."""
    from tasks.core.paths import ProjectPaths
    from tasks.evaluate import run_evaluate

    root = build_project(tmp_path_factory.mktemp("champion") / "digits", onnx=False)
    settings = {**FAST_EVALUATE, "registered_model": NAME}
    (root / "params.yaml").write_text(yaml.safe_dump({"base": {"seed": 0, "experiment": "tests"}, "evaluate": settings}))
    for args in (["init", "-q"], ["-c", "user.email=t@t.invalid", "-c", "user.name=t", "commit", "-qm", "x", "--allow-empty"]):
        subprocess.run(["git", *args], cwd=root, check=True, capture_output=True)  # a git commit to record
    with project_env(root):
        evaluation = run_evaluate(ProjectPaths(root), make_params())
    assert evaluation.promotion.version == "1"
    return {"root": root, "evaluation": evaluation}


@pytest.fixture
def project(digits: dict[str, Any], tmp_path: Path) -> Iterator[Path]:
    """A copy of the digits project and its registry, as the working project."""
    root = tmp_path / "project"
    shutil.copytree(digits["root"], root)
    with project_env(root):
        yield root


def _promotion(root: Path) -> dict[str, Any]:
    return json.loads((root / "artifacts" / "evaluation" / "promotion.json").read_text())


def _champion(name: str = NAME) -> Any:
    import mlflow

    return mlflow.MlflowClient().get_model_version_by_alias(name, "champion")


def _idx_28x28(root: Path) -> None:
    """The digits upscaled to 28x28, written as IDX files and prepared by the prepare stage's code."""
    from sklearn.datasets import load_digits

    from tasks.core.config import PrepareParams
    from tasks.prepare import prepare_data, write_prepared

    data = load_digits()
    images = np.pad(np.kron(data.images, np.ones((3, 3))), ((0, 0), (2, 2), (2, 2)))
    write_idx(root / "data" / "raw" / "images-idx3-ubyte", (images * 255 / 16).astype(np.uint8))
    write_idx(root / "data" / "raw" / "labels-idx1-ubyte", data.target.astype(np.uint8))
    params = PrepareParams(source="idx", path="data/raw/images-idx3-ubyte", labels_path="data/raw/labels-idx1-ubyte")
    write_prepared(prepare_data(params, 0, root), root / "data" / "prepared")


def _only_baseline(root: Path, steps: int, input_shape: tuple[int, ...] = (1, 8, 8)) -> None:
    """Replace every model with one baseline trained for ``steps`` steps (0: untrained)."""
    shutil.rmtree(root / "artifacts" / "model")
    shutil.rmtree(root / "artifacts" / "compressed", ignore_errors=True)
    model = train_tiny(SPEC, root / "data" / "prepared", steps=steps, seed=3)
    save_baseline(model, root / "artifacts" / "model", input_shape=input_shape)


# ---------------------------------------------------------------------------- another input
def test_a_28x28_run_under_the_same_name_leaves_the_digits_champion_and_says_why(
    project: Path, digits: dict[str, Any], capsys: pytest.CaptureFixture[str],
) -> None:
    import mlflow
    from mlflow.models import Model

    from tasks.evaluate import main

    _idx_28x28(project)
    _only_baseline(project, steps=60, input_shape=(1, 28, 28))
    assert main([]) == 0  # a new data set is not an error

    champion = _champion()
    assert str(champion.version) == "1" and champion.tags["variant"] == digits["evaluation"].champion
    assert json.loads(champion.tags["input_schema"])["shape"] == [-1, 1, 8, 8]
    assert json.loads(champion.tags["last_challenge"])["verdict"] == "other_input"
    assert len(mlflow.MlflowClient().search_model_versions(f"name='{NAME}'")) == 1
    decision = _promotion(project)
    assert decision["verdict"] == "other_input" and not decision["allowed"]
    assert decision["suggested_registered_model"] == f"{NAME}-28x28"
    assert decision["challenger"]["input_schema"]["shape"] == [-1, 28, 28]  # an IDX file's images: (N, 28, 28)
    assert decision["outcome"]["champion_version"] == "1"
    assert "tensor float32 (-1, 1, 8, 8)" in decision["reason"] and "evaluate.registered_model" in decision["reason"]
    report = (project / "artifacts" / "evaluation" / "report.md").read_text()
    assert f"@champion of `{NAME}` after this run: version 1**" in report
    assert f"evaluate.registered_model={NAME}-28x28" in report
    stage = mlflow.MlflowClient().get_run(decision["evaluate_run_id"])
    assert stage.data.tags["promotion_decision"].startswith("other_input")
    assert json.loads((project / "metrics" / "evaluate.json").read_text())["promoted"] == 0
    assert "evaluate.registered_model" in capsys.readouterr().out  # the closing table's caption says it

    # Under the name it suggests, the 28x28 model is the first champion.
    assert main(["--set", f"evaluate.registered_model={NAME}-28x28"]) == 0
    other = _champion(f"{NAME}-28x28")
    assert str(other.version) == "1" and _promotion(project)["verdict"] == "first_champion"
    local = mlflow.artifacts.download_artifacts(f"models:/{NAME}-28x28@champion")
    signature = Model.load(f"{local}/MLmodel").signature
    assert signature.inputs.inputs[0].shape == (-1, 28, 28)
    assert str(_champion().version) == "1"  # the digits champion is untouched


# ---------------------------------------------------------------------------- a worse challenger
def test_a_worse_challenger_does_not_take_the_alias_on_the_same_or_other_data(
    project: Path, digits: dict[str, Any],
) -> None:
    import mlflow

    from tasks.core.paths import ProjectPaths
    from tasks.evaluate import run_evaluate

    champion_accuracy = digits["evaluation"].models[digits["evaluation"].champion].metrics["accuracy"]
    # Barely trained (2 steps: about half right): it passes the gate of its own run. (An untrained
    # one is not challenged at all: it is no better than a constant answer.)
    _only_baseline(project, steps=2)

    # The same data, code and runtime: the champion's recorded figures decide.
    result = run_evaluate(ProjectPaths(project), make_params())
    decision = _promotion(project)
    assert result.champion == "baseline" and not result.promotion.promoted
    assert decision["verdict"] == "worse" and decision["basis"] == "recorded evidence"
    assert decision["champion"]["recorded"]["accuracy"] == pytest.approx(champion_accuracy)
    assert decision["challenger"]["figures"]["accuracy"] < champion_accuracy - 0.01
    assert str(_champion().version) == "1" and decision["outcome"]["champion_version"] == "1"
    assert "after this run: version 1**" in (project / "artifacts" / "evaluation" / "report.md").read_text()

    # Other data with the same input: the champion is re-measured on this run's test split.
    card = json.loads((project / "data" / "prepared" / "card.json").read_text())
    (project / "data" / "prepared" / "card.json").write_text(json.dumps({**card, "digest": "other-data"}))
    run_evaluate(ProjectPaths(project), make_params())
    decision = _promotion(project)
    assert decision["verdict"] == "worse" and decision["basis"] == "re-measured on this run's test split"
    assert decision["champion"]["remeasured"]["accuracy"] == pytest.approx(champion_accuracy)  # same test rows
    assert str(_champion().version) == "1"
    assert len(mlflow.MlflowClient().search_model_versions(f"name='{NAME}'")) == 1
    stage = mlflow.MlflowClient().get_run(decision["evaluate_run_id"])
    assert stage.data.metrics["current_champion_remeasured_accuracy"] == pytest.approx(champion_accuracy)
    logged = {item.path for item in mlflow.MlflowClient().list_artifacts(decision["evaluate_run_id"], "evaluation")}
    assert "evaluation/promotion.json" in logged


def test_a_champion_is_measured_only_on_the_test_rows_it_never_trained_on(project: Path, digits: dict[str, Any]) -> None:
    """The data split again another way (another seed, or a file that grew): half of this
    run's test rows were in the champion's train split. The version kept the fingerprints of
    the rows it trained on; the decision compares both models on the other half."""
    from tasks.core.paths import ProjectPaths
    from tasks.data import ROWS_FILE, load_row_fingerprints
    from tasks.evaluate import run_evaluate
    from tasks.evaluation.registration import champion_seen_rows

    prepared = project / "data" / "prepared"
    champion = _champion()
    seen = champion_seen_rows(champion)  # the version's run holds them, as its tag says
    assert champion.tags["seen_rows"] == "seen_rows.npy" and champion.tags["seen_rows_scheme"] == "blake2b-64/1"
    assert set(seen.tolist()) == set(load_row_fingerprints(prepared, "train", "val").tolist())
    assert not set(seen.tolist()) & set(load_row_fingerprints(prepared, "test").tolist())
    other_scheme = champion.__class__.from_proto(champion.to_proto())  # fingerprints computed another way: unused
    other_scheme.tags["seen_rows_scheme"] = "blake2b-64/0"
    assert champion_seen_rows(other_scheme) is None

    arrays = {split: {kind: np.load(prepared / f"{split}_{kind}.npy") for kind in ("x", "y", "rows")}
              for split in ("train", "test")}
    moved = {"test": {k: np.concatenate([arrays["test"][k][:75], arrays["train"][k][:75]]) for k in ("x", "y", "rows")},
             "train": {k: np.concatenate([arrays["train"][k][75:], arrays["test"][k][75:]]) for k in ("x", "y", "rows")}}
    for split, kinds in moved.items():
        for kind, values in kinds.items():
            np.save(prepared / (ROWS_FILE.format(split=split) if kind == "rows" else f"{split}_{kind}.npy"), values)
    card = json.loads((prepared / "card.json").read_text())
    (prepared / "card.json").write_text(json.dumps({**card, "digest": "other-data", "seed": 1}))
    _only_baseline(project, steps=2)  # barely trained: worse than the champion, better than a constant
    run_evaluate(ProjectPaths(project), make_params())
    decision = _promotion(project)
    assert decision["verdict"] == "worse" and decision["basis"] == (
        "re-measured on this run's test split, on the 75 of its 150 rows the champion never trained on")
    compared = decision["compared_on"]
    assert (compared["test_rows"], compared["compared"], compared["left_out"]) == (150, 75, 75)
    remeasured = decision["champion"]["remeasured"]
    assert remeasured["on_unseen_rows"]["accuracy"] == pytest.approx(compared["champion"]["accuracy"])
    import mlflow  # the evaluate run's metrics, to compare runs by in the MLflow UI

    metrics = mlflow.MlflowClient().get_run(decision["evaluate_run_id"]).data.metrics
    assert metrics["unseen_test_rows"] == 75
    assert metrics["current_champion_unseen_accuracy"] == pytest.approx(compared["champion"]["accuracy"])
    assert metrics["challenger_unseen_accuracy"] == pytest.approx(compared["challenger"]["accuracy"])
    report = (project / "artifacts" / "evaluation" / "report.md").read_text()
    assert ("75 of this split's 150 test rows were in the champion's train or validation split. The decision compares "
            "both on the 75 it never trained on: accuracy") in report


def test_the_champion_carries_the_evidence_a_reviewer_needs(digits: dict[str, Any]) -> None:
    with project_env(digits["root"]):
        champion = _champion()
    tags = champion.tags
    assert {"variant", "method", "recipe", "data_digest", "git_commit", "runtime_versions", "input_schema",
            "num_classes", "gate_decision", "promotion_decision", "promoted_at", "pipeline_run_id",
            "evaluate_run_id", "source_run_id", "model_digest", "metric.accuracy", "metric.size_bytes",
            "class_recall", "class_names", "data_split"} <= set(tags)
    assert json.loads(tags["data_split"]) == {"seed": 0, "val_fraction": 0.15, "test_fraction": 0.25}  # the card's
    assert json.loads(tags["class_names"]) == [str(c) for c in range(10)]  # what each predicted index means
    assert tags["git_commit"] and tags["data_digest"] == "test-digest-0001"
    evaluation = digits["evaluation"]  # each class's recall, for the next challenger to be held to
    per_class = evaluation.models[evaluation.champion].per_class
    assert json.loads(tags["class_recall"]) == pytest.approx({c: row["recall"] for c, row in per_class.items()})
    assert not [key for key in tags if key.startswith("metric.precision_")]  # a handful, not every metric
    assert champion.description and "tensor float32 (-1, 1, 8, 8)" in champion.description


# ---------------------------------------------------------------------------- DVC's run cache
def test_the_evaluate_stage_is_never_replayed_from_the_run_cache(tmp_path: Path) -> None:
    """A replay would check out a report naming another version than @champion (issue 15)."""
    from dvc.repo import Repo
    from dvc.stage.cache import _can_hash
    from dvc_data.hashfile.hash_info import HashInfo

    root = make_project(tmp_path / "project")
    with Repo(str(root)) as repo:
        stages = {stage.name: stage for stage in repo.index.stages}
    evaluate, train = stages["evaluate"], stages["train"]
    assert [out.def_path for out in evaluate.outs if out.persist] == ["artifacts/evaluation"]
    for stage in (evaluate, train):  # as if every input were there and hashed
        for dep in stage.deps:
            dep.get_hash = lambda: HashInfo("md5", "0" * 32)
    assert _can_hash(train)  # the run cache serves the other stages...
    assert not _can_hash(evaluate)  # ...never the one with the registry step


# ---------------------------------------------------------------------------- a kill mid-registration
def test_a_kill_during_registration_leaves_no_version_without_evidence_and_the_next_run_converges(
    project: Path,
) -> None:
    """kill -9 of the evaluate stage between the new version and the alias (issue 15)."""
    import os
    import sys

    import mlflow

    from tasks.evaluation.promotion import FAULT_BEFORE_ALIAS_ENV

    name = "tiny-killed"
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["evaluate"]["registered_model"] = name
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), FAULT_BEFORE_ALIAS_ENV: "1"}
    killed = subprocess.run([sys.executable, "-m", "tasks.evaluate"], cwd=project, env=env,
                            capture_output=True, text=True, timeout=600)
    assert killed.returncode == -9, killed.stderr[-2000:]

    client = mlflow.MlflowClient()
    versions = client.search_model_versions(f"name = '{name}'")
    assert len(versions) == 1  # created in one call, with everything a reviewer needs...
    for version in versions:
        assert version.description and version.tags.get("variant") and version.tags.get("promoted_at")
        assert version.tags.get("data_digest") and version.tags.get("model_digest")
    assert client.get_registered_model(name).aliases == {}  # ...and the alias never moved

    env.pop(FAULT_BEFORE_ALIAS_ENV)
    done = subprocess.run([sys.executable, "-m", "tasks.evaluate"], cwd=project, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    champion = _champion(name)
    assert champion.tags.get("variant") and champion.description
    assert all(v.description and v.tags.get("promoted_at") for v in client.search_model_versions(f"name = '{name}'"))
    assert _promotion(project)["outcome"]["champion_version"] == str(champion.version)
    assert f"version {champion.version}" in (project / "artifacts" / "evaluation" / "report.md").read_text()
