"""Promotion in a real MLflow registry (complete versions, the alias moves last, earlier
versions stay, rollback), the signature and input example of every version, and the
champion served by ``mlflow models serve``, refusing ill-shaped requests
(:mod:`tasks.evaluation.promotion`, :mod:`~tasks.evaluation.pyfunc`,
:mod:`~tasks.evaluation.signature`, :mod:`flows.champion`)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import free_port
from test_evaluate_support import CLASS_NAMES, SPEC, save_baseline, save_narrow_variant, save_onnx_variant, train_tiny, write_prepared
from tasks.evaluation.promotion import CHAMPION_ALIAS, keep_champion, promote


@pytest.fixture
def two_models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mlflow_uri: str) -> dict[str, Path]:
    import mlflow

    monkeypatch.chdir(tmp_path)  # ./mlruns (artifacts) under tmp as well
    mlflow.set_experiment("registry-tests")  # not an experiment id remembered from another store
    prepared = tmp_path / "prepared"
    write_prepared(prepared)
    save_baseline(train_tiny(SPEC, prepared), tmp_path / "baseline")
    save_narrow_variant(prepared, tmp_path / "narrow")
    return {"prepared": prepared, "baseline": tmp_path / "baseline", "narrow": tmp_path / "narrow"}


def test_a_second_promotion_moves_the_alias_and_keeps_version_1(two_models: dict[str, Path]) -> None:
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient()
    name = "registry-test"
    evidence = {"data_digest": "d1", "git_commit": "abc123", "metric.accuracy": 0.97, "recipe": []}
    assert keep_champion(name, "nothing passed").version is None  # nothing registered yet

    with mlflow.start_run():
        first = promote("baseline", two_models["baseline"], two_models["prepared"], name, evidence)
    assert first.promoted and first.new_version and first.version == "1" and first.previous_version is None
    assert str(client.get_model_version_by_alias(name, CHAMPION_ALIAS).version) == "1"

    with mlflow.start_run():
        second = promote("distilled-mlp-w0.5", two_models["narrow"], two_models["prepared"], name,
                         {**evidence, "recipe": [{"method": "distill"}]})
    assert second.promoted and second.version == "2" and second.previous_version == "1"
    champion = client.get_model_version_by_alias(name, CHAMPION_ALIAS)
    assert str(champion.version) == "2"
    # Tags and description came with the version (one create_model_version call).
    assert champion.tags["variant"] == "distilled-mlp-w0.5" and champion.tags["data_digest"] == "d1"
    assert json.loads(champion.tags["recipe"]) == [{"method": "distill"}]
    assert champion.tags["git_commit"] == "abc123" and champion.tags["model_digest"]
    assert champion.tags["previous_champion"] == "1" and champion.tags["promoted_at"]
    assert champion.description.startswith("slimflow distilled-mlp-w0.5")
    version_1 = client.get_model_version(name, "1")
    assert version_1.tags["variant"] == "baseline" and CHAMPION_ALIAS not in version_1.aliases
    assert "previous_champion" not in version_1.tags
    kept = keep_champion(name, "no model passes the gate")
    assert not kept.promoted and kept.version == "2" and "no model passes the gate" in kept.reason
    assert {str(v.version) for v in client.search_model_versions(f"name='{name}'")} == {"1", "2"}

    # The champion takes raw SHAPED inputs and returns class indices; anything else is
    # refused with the expected shape, by MLflow's schema check and by predict() itself.
    model = mlflow.pyfunc.load_model(f"models:/{name}@{CHAMPION_ALIAS}")
    raw = np.load(two_models["prepared"] / "test_x.npy")
    shaped = model.predict(raw[:20])
    assert shaped.shape == (20,) and shaped.dtype == np.int64
    # ...or, asked for them, the class names (test_mlflow_models_serve_...: names other than the indices).
    assert list(model.predict(raw[:20], params={"output": "name"})) == [CLASS_NAMES[i] for i in shaped]
    with pytest.raises(MlflowException, match=r"params: output 'label': expected one of 'index', 'name'"):
        model.predict(raw[:20], params={"output": "label"})
    with pytest.raises(MlflowException, match=r"expected shape \(-1, 1, 8, 8\)"):
        model.predict(raw[:20].reshape(20, -1))
    with pytest.raises(MlflowException, match=r"expected shape \(-1, 1, 8, 8\)") as refused:
        model.unwrap_python_model().predict(None, raw[:20].reshape(20, -1))
    assert refused.value.error_code == "INVALID_PARAMETER_VALUE"  # `mlflow models serve` answers 400


def test_the_registered_version_has_a_signature_an_input_example_and_no_pickle(
    two_models: dict[str, Path],
) -> None:
    import mlflow
    from mlflow.models import Model

    name = "signature-test"
    with mlflow.start_run():
        promote("baseline", two_models["baseline"], two_models["prepared"], name, {"data_digest": "d"})
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{name}@{CHAMPION_ALIAS}"))
    mlmodel = Model.load(str(local / "MLmodel"))
    assert mlmodel.signature is not None
    inputs = mlmodel.signature.inputs
    assert inputs.is_tensor_spec() and inputs.input_names() == ["raw_shaped_input"]
    assert inputs.inputs[0].shape == (-1, 1, 8, 8) and str(inputs.inputs[0].type) == "float32"
    assert mlmodel.saved_input_example_info is not None
    example = mlmodel.load_input_example(str(local))  # {tensor name: array}
    assert np.asarray(example["raw_shaped_input"]).shape == (2, 1, 8, 8)
    serving = json.loads((local / "serving_input_example.json").read_text())
    assert np.asarray(serving["inputs"]).shape == (2, 1, 8, 8)  # the request body `mlflow models serve` takes
    # "Models from code": the model is this file, not a pickled object.
    pyfunc = mlmodel.flavors["python_function"]
    assert pyfunc["loader_module"] == "mlflow.pyfunc.loaders.code_model"
    assert (local / "champion_model.py").is_file() and not list(local.rglob("python_model.pkl"))


def test_a_tabular_version_has_a_column_schema(tmp_path: Path, two_models: dict[str, Path]) -> None:
    from tasks.data import Preprocessing
    from tasks.evaluation.signature import input_example, input_schema, model_signature

    preprocessing = Preprocessing((4,), 2, ("a", "b"), (0.0,) * 4, (1.0,) * 4)
    np.save(tmp_path / "test_x.npy", np.ones((3, 4), np.float32))
    signature = model_signature(preprocessing)
    assert not signature.inputs.is_tensor_spec() and signature.inputs.input_names() == ["x0", "x1", "x2", "x3"]
    assert list(input_example(tmp_path, preprocessing).columns) == ["x0", "x1", "x2", "x3"]
    assert input_schema(preprocessing) == {"type": "columns", "dtype": "double", "columns": 4,
                                           "layout": "raw, one column per feature"}


def _registered_tiny_mlp(prepared: Path, folder: Path, registered_model: str, steps: int) -> Any:
    """A small MLP trained on ``prepared`` (rows of features, 2 classes), saved in ``folder``,
    registered as ``registered_model`` @champion; the loaded pyfunc."""
    import mlflow

    from models.spec import ModelSpec
    from tasks.core.model_files import save_state_dict_model
    from tasks.data import load_preprocessing

    spec = ModelSpec(family="mlp", hidden_sizes=(16,), dropout=0.0)
    save_state_dict_model(train_tiny(spec, prepared, steps=steps), spec, load_preprocessing(prepared).input_shape, 2,
                          folder, {"name": "baseline", "method": "baseline", "recipe": [], "parent": None})
    with mlflow.start_run():
        promote("baseline", folder, prepared, registered_model, {"data_digest": "d"})
    return mlflow.pyfunc.load_model(f"models:/{registered_model}@{CHAMPION_ALIAS}")


def _prepared_npz(folder: Path, x: np.ndarray, y: np.ndarray) -> tuple[Any, Path]:
    """``x``/``y`` as ``data/raw/d.npz`` under ``folder``, prepared with the default settings
    into ``folder/prepared``: (the prepared data, that folder)."""
    from tasks.core.config import PrepareParams
    from tasks.prepare import prepare_data
    from tasks.prepare import write_prepared as write_prepared_data

    (folder / "data" / "raw").mkdir(parents=True)
    np.savez(folder / "data" / "raw" / "d.npz", x=x, y=y)
    data = prepare_data(PrepareParams(source="npz", path="data/raw/d.npz"), 42, folder)
    write_prepared_data(data, folder / "prepared")
    return data, folder / "prepared"


def test_a_model_of_a_3d_npz_takes_the_files_samples(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      mlflow_uri: str) -> None:
    """Sensor sequences ``(N, T, F)`` in an npz: the registered model takes them as the file
    holds them (before, its signature asked for the channel the prepared split adds,
    ``(-1, 1, T, F)``, and refused the file's own rows), and its input example is two of them."""
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.models import Model

    from models.spec import ModelSpec
    from tasks import synthetic
    from tasks.core.model_files import save_state_dict_model
    from tasks.evaluation.signature import describe, input_schema

    monkeypatch.chdir(tmp_path)
    mlflow.set_experiment("registry-tests")
    x, y = synthetic.sensor_sequences(300)
    data, prepared = _prepared_npz(tmp_path, x, y)
    spec = ModelSpec(family="gru", rnn_hidden=16, dropout=0.0)
    save_state_dict_model(train_tiny(spec, prepared, steps=60), spec, (1, 40, 4), 2, tmp_path / "baseline",
                          {"name": "baseline", "method": "baseline", "recipe": [], "parent": None})
    with mlflow.start_run():
        promote("baseline", tmp_path / "baseline", prepared, "sensors", {"data_digest": "d"})
    model = mlflow.pyfunc.load_model(f"models:/sensors@{CHAMPION_ALIAS}")
    assert model.metadata.get_input_schema().inputs[0].shape == (-1, 40, 4)
    assert describe(input_schema(data.preprocessing)) == "tensor float32 (-1, 40, 4)"
    assert (np.asarray(model.predict(x)) == y).mean() >= 0.9  # the file's rows, as they are
    local = Path(mlflow.artifacts.download_artifacts(f"models:/sensors@{CHAMPION_ALIAS}"))
    example = Model.load(str(local / "MLmodel")).load_input_example(str(local))
    assert np.asarray(example["raw_shaped_input"]).shape == (2, 40, 4)
    with pytest.raises(MlflowException, match=r"expected shape \(-1, 40, 4\)"):
        model.predict(x[:5, None])


def test_a_model_of_channels_last_images_takes_the_files_samples(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 mlflow_uri: str) -> None:
    """Colour images ``(N, H, W, 3)`` in an npz (channels last, as PIL and Keras hand them):
    the registered model takes them as the file holds them and moves the channels itself;
    the same images channels first are refused by the signature, not silently reshaped."""
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.models import Model

    from models.spec import ModelSpec
    from tasks import synthetic
    from tasks.core.model_files import save_state_dict_model
    from tasks.data import load_split
    from tasks.evaluation.signature import describe, input_schema

    monkeypatch.chdir(tmp_path)
    mlflow.set_experiment("registry-tests")
    x, y = synthetic.colour_shapes(400)
    data, prepared = _prepared_npz(tmp_path, x, y)
    import torch

    spec = ModelSpec(family="cnn", channels=(8, 16), dropout=0.0)
    model = train_tiny(spec, prepared, steps=120)
    save_state_dict_model(model, spec, (3, 16, 16), 4, tmp_path / "baseline",
                          {"name": "baseline", "method": "baseline", "recipe": [], "parent": None})
    with mlflow.start_run():
        promote("baseline", tmp_path / "baseline", prepared, "colours", {"data_digest": "d"})
    registered = mlflow.pyfunc.load_model(f"models:/colours@{CHAMPION_ALIAS}")
    assert registered.metadata.get_input_schema().inputs[0].shape == (-1, 16, 16, 3)
    assert describe(input_schema(data.preprocessing)) == "tensor float32 (-1, 16, 16, 3), channels last"
    with torch.no_grad():  # the model itself on the prepared split: what the registered one must give
        test = load_split(prepared, "test")
        expected = model(torch.from_numpy(test.x)).argmax(1).numpy()
    file_rows = data.preprocessing.to_raw(np.load(prepared / "test_x.npy"))
    np.testing.assert_array_equal(np.asarray(registered.predict(file_rows)), expected)
    assert (np.asarray(registered.predict(x.astype(np.float32))) == y).mean() >= 0.85  # every row of the file
    local = Path(mlflow.artifacts.download_artifacts(f"models:/colours@{CHAMPION_ALIAS}"))
    example = Model.load(str(local / "MLmodel")).load_input_example(str(local))
    assert np.asarray(example["raw_shaped_input"]).shape == (2, 16, 16, 3)
    with pytest.raises(MlflowException, match=r"expected shape \(-1, 16, 16, 3\)"):
        registered.predict(np.ascontiguousarray(x[:5].transpose(0, 3, 1, 2), dtype=np.float32))


def test_a_csv_model_takes_its_columns_by_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mlflow_uri: str) -> None:
    """A CSV's header names the registered model's columns (before, x0..x{F-1}: nothing said
    which CSV column x2 was, and a file with its columns in another order passed as the same input)."""
    import mlflow
    import pandas as pd
    from mlflow.exceptions import MlflowException
    from mlflow.models import Model

    from tasks.data import Preprocessing
    from tasks.evaluation.signature import column_difference, describe, input_schema, same_input

    monkeypatch.chdir(tmp_path)
    mlflow.set_experiment("registry-tests")
    names = ("age", "income", "visits", "score")
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(400, 4)) * [10, 1000, 3, 1] + [40, 5000, 6, 0]).astype(np.float32)
    x[:, 2] = np.round(x[:, 2])  # visits: a count, written as integers
    y = ((x[:, 0] - 40) / 10 + (x[:, 2] - 6) / 3 > 0).astype(np.int64)
    prepared = tmp_path / "prepared"
    prepared.mkdir()
    preprocessing = Preprocessing.fit(x[:300], 2, ["no", "yes"], feature_names=names, integer_features=(2,))
    for split, rows in {"train": slice(0, 300), "val": slice(300, 350), "test": slice(350, 400)}.items():
        np.save(prepared / f"{split}_x.npy", x[rows])
        np.save(prepared / f"{split}_y.npy", y[rows])
    (prepared / "preprocess.json").write_text(preprocessing.to_json())
    model = _registered_tiny_mlp(prepared, tmp_path / "baseline", "named-columns", steps=80)
    schema = model.metadata.get_input_schema()
    assert schema.input_names() == list(names)
    assert [t.name for t in schema.input_types()] == ["double", "double", "long", "double"]
    local = Path(mlflow.artifacts.download_artifacts(f"models:/named-columns@{CHAMPION_ALIAS}"))
    example = Model.load(str(local / "MLmodel")).load_input_example(str(local))
    assert list(example.columns) == list(names) and example["visits"].dtype == np.int64

    # As pandas reads the CSV: the integer column is int64 (a double column would refuse it:
    # MLflow does not convert int64 to float64).
    test = pd.DataFrame(x[350:].astype(np.float64), columns=list(names)).astype({"visits": np.int64})
    predicted = model.predict(test)
    assert (predicted == y[350:]).mean() >= 0.8
    # Columns are taken by name: another order and an extra column give the same answers.
    shuffled = test[["visits", "score", "age", "income"]].assign(customer_id=np.arange(len(test)))
    assert list(model.predict(shuffled)) == list(predicted)
    assert list(model.unwrap_python_model().predict(None, shuffled)) == list(predicted)
    with pytest.raises(MlflowException, match="visits"):
        model.predict(test.drop(columns=["visits"]))
    # A gap (NaN in a double column passes MLflow's schema): refused where the data was
    # prepared with missing_values refuse, filled with the train median where it was with median.
    gappy = test.astype({"income": np.float64}).copy()
    gappy.loc[3, "income"] = np.nan
    with pytest.raises(MlflowException, match=r"row 3, column 'income': a missing value \(NaN\); this model fills "
                                              r"none \(its data was prepared with prepare.missing_values refuse\)"):
        model.predict(gappy)
    import dataclasses

    classifier = model.unwrap_python_model()
    fills = tuple(float(v) for v in np.median(x[:300], axis=0))
    classifier._preprocessing = dataclasses.replace(classifier._preprocessing, fill_values=fills)
    expected = test.copy()
    expected.loc[3, "income"] = fills[1]
    assert list(model.predict(gappy)) == list(model.predict(expected))

    # The contract names the columns: another header of as many columns is another input.
    named = input_schema(preprocessing)
    renamed = input_schema(Preprocessing.fit(x[:300], 2, ["no", "yes"], feature_names=("age", "income", "visits", "tenure")))
    unnamed = input_schema(Preprocessing.fit(x[:300], 2, ["no", "yes"]))
    reordered = {**named, "names": ["income", "age", "visits", "score"]}
    assert same_input(named, dict(named)) and same_input(named, reordered)  # taken by name, in any order
    assert not same_input(named, renamed) and not same_input(named, unnamed)
    assert describe(named) == "4 columns (3 double, 1 long) age, income, visits, score"
    retyped = {key: value for key, value in named.items() if key != "long"}  # visits written as 3.0, 4.0...
    assert not same_input(named, retyped)
    assert column_difference(named, retyped, "the champion", "pruned") == (
        "column 'visits' is long for the champion, double for pruned")
    assert column_difference(named, renamed, "the champion", "pruned") == (
        "columns only the champion takes: 'score'; only pruned takes: 'tenure'")
    assert column_difference(named, reordered, "the champion", "pruned") is None
    assert column_difference(unnamed, named, "the champion", "pruned").startswith("columns only the champion takes: 'x0'")
    wide = input_schema(Preprocessing.fit(np.ones((3, 20), np.float32), 2, ["no", "yes"],
                                          feature_names=tuple(f"f{i}" for i in range(20))))
    assert describe(wide) == "20 double columns f0, f1, f2, f3, f4, f5, f6, f7, ... (12 more)"


def test_a_model_with_categorical_columns_takes_their_values(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mlflow_uri: str, caplog: pytest.LogCaptureFixture,
) -> None:
    """Columns of categories (words, integer codes) go in as a client's DataFrame holds them
    (pd.read_csv of the raw file); the model sees one 0/1 feature per category, an unseen
    category sets none (the serving log says so), and the champion's re-measurement sends the
    same table."""
    import logging

    import mlflow
    import pandas as pd
    from mlflow.models import Model

    from tasks.core.config import PrepareParams
    from tasks.data import decode_table
    from tasks.evaluation.challenge import remeasure
    from tasks.evaluation.signature import describe, input_schema
    from tasks.prepare import prepare_data, write_prepared

    monkeypatch.chdir(tmp_path)
    mlflow.set_experiment("registry-tests")
    rng = np.random.default_rng(0)
    n = 600
    plan = rng.choice(["basic", "gold", "silver"], n)
    region = rng.integers(1, 5, n)
    spend = rng.normal(50, 10, n).round(2)
    y = np.where((plan == "gold") | ((plan == "silver") & (spend > 50)), "renewed", "left")
    raw_file = tmp_path / "data" / "raw" / "plans.csv"
    raw_file.parent.mkdir(parents=True)
    pd.DataFrame({"id": np.arange(n), "plan": plan, "region": region, "spend": spend, "outcome": y}).to_csv(
        raw_file, index=False)
    params = PrepareParams(source="csv", path="data/raw/plans.csv", csv_label_column="outcome",
                           csv_ignore_columns=["id"], csv_categorical_columns=["plan", "region"])
    prepared = prepare_data(params, 0, tmp_path)
    assert prepared.card["categorical"] == {"plan": {"dtype": "string", "values": ["basic", "gold", "silver"]},
                                            "region": {"dtype": "long", "values": ["1", "2", "3", "4"]}}
    folder = tmp_path / "prepared"
    write_prepared(prepared, folder)
    model = _registered_tiny_mlp(folder, tmp_path / "baseline", "plans", steps=150)
    schema = model.metadata.get_input_schema()
    assert [(c.name, c.type.name) for c in schema.inputs] == [("plan", "string"), ("region", "long"), ("spend", "double")]
    assert describe(input_schema(prepared.preprocessing)) == "3 columns (1 double, 1 long, 1 string) plan, region, spend"
    local = Path(mlflow.artifacts.download_artifacts(f"models:/plans@{CHAMPION_ALIAS}"))
    example = Model.load(str(local / "MLmodel")).load_input_example(str(local))
    assert set(example["plan"]) <= {"basic", "gold", "silver"} and example["region"].dtype == np.int64

    table = pd.read_csv(raw_file)  # the client's frame: id and label columns too, region int64, plan strings
    truth = table.pop("outcome")
    names = np.asarray(model.predict(table, params={"output": "name"}))
    assert (names == truth.to_numpy()).mean() >= 0.9
    assert list(model.predict(table[["spend", "region", "plan", "id"]])) == list(model.predict(table))
    unseen = table.head(3).assign(plan="platinum")  # a category the data never had: no plan feature set
    with caplog.at_level(logging.WARNING, logger="slimflow.model"):
        assert len(model.predict(unseen)) == 3
    assert ("column 'plan': 3 of 3 rows hold a category the model was not trained on ('platinum'): none of its "
            "features set") in caplog.text

    # The re-measurement a later run makes of this champion sends its test rows as this table.
    test = np.load(folder / "test_x.npy")
    expected = np.asarray(model.unwrap_python_model().predict(None, decode_table(prepared.preprocessing, test)))
    figures = remeasure(f"models:/plans@{CHAMPION_ALIAS}", folder, prepared.preprocessing.class_names)
    assert list(figures["predictions"]) == list(expected)
    assert figures["accuracy"] == pytest.approx((expected == np.load(folder / "test_y.npy")).mean())


# ---------------------------------------------------------------------------- rollback
def test_rollback_moves_the_alias_back_and_records_the_reason(
    two_models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`slimflow champion show / rollback` (the typer sub-app, in-process) on a real registry."""
    import mlflow
    from typer.testing import CliRunner

    from flows.champion import app as champion_app

    name = "rollback-test"
    with mlflow.start_run():
        promote("baseline", two_models["baseline"], two_models["prepared"], name, {"data_digest": "d1"})
    with mlflow.start_run():
        promote("distilled-mlp-w0.5", two_models["narrow"], two_models["prepared"], name,
                {"data_digest": "d1", "class_names": ["-1", "1", "7"], "seen_rows": "seen_rows.npy",
                 "data_split": {"seed": 7, "val_fraction": 0.15, "test_fraction": 0.25}})
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    (tmp_path / "params.yaml").write_text(f"base:\n  experiment: registry-tests\nevaluate:\n  registered_model: {name}\n")
    monkeypatch.setenv("SLIMFLOW_ROOT", str(tmp_path))
    runner, client = CliRunner(), mlflow.MlflowClient()

    shown = runner.invoke(champion_app, ["show"])
    assert shown.exit_code == 0, shown.output
    assert client.get_model_version(name, "2").description.endswith(
        "; with params {\"output\": \"name\"} the class names (0 = '-1', 1 = '1', 2 = '7').")
    assert "distilled-mlp-w0.5" in shown.output and "previous champion" in shown.output
    assert "0 = '-1', 1 = '1', 2 = '7'" in shown.output  # what each predicted index stands for
    assert "seed 7, val/test 0.15/0.25; the train and validation rows' fingerprints kept" in " ".join(
        shown.output.split())  # how the data was split, and that a challenger can leave out the rows it learned

    done = runner.invoke(champion_app, ["rollback", "--reason", "latency regression in production"])
    assert done.exit_code == 0, done.output
    assert "version 2 -> 1" in done.output
    champion = client.get_model_version_by_alias(name, CHAMPION_ALIAS)
    assert str(champion.version) == "1"
    assert champion.tags["rollback_reason"] == "latency regression in production"
    assert champion.tags["rolled_back_from"] == "2"
    assert json.loads(client.get_model_version(name, "2").tags["rolled_back"])["reason"] == (
        "latency regression in production")
    shown = runner.invoke(champion_app, ["show"])
    assert "latency regression in production" in shown.output
    assert re.search(r"classes \(index = name\)\s*│ -\s", shown.output)  # version 1 records no classes

    # Version 1 had no champion before it: say so, move nothing.
    again = runner.invoke(champion_app, ["rollback", "--reason", "again"])
    assert again.exit_code == 1 and "records no previous champion" in again.output
    missing = runner.invoke(champion_app, ["rollback", "--reason", "x", "--to", "9"])
    assert missing.exit_code == 1 and "no version 9" in missing.output
    assert str(client.get_model_version_by_alias(name, CHAMPION_ALIAS).version) == "1"
    forward = runner.invoke(champion_app, ["rollback", "--reason", "fixed", "--to", "2"])
    assert forward.exit_code == 0, forward.output
    assert str(client.get_model_version_by_alias(name, CHAMPION_ALIAS).version) == "2"
    # Version 3's classes ('0'..'9', from its per-class recall) against version 4's words: refused.
    with mlflow.start_run():
        promote("baseline", two_models["baseline"], two_models["prepared"], name,
                {"data_digest": "d1", "class_recall": {str(c): 0.9 for c in range(10)}})
    with mlflow.start_run():
        promote("baseline", two_models["baseline"], two_models["prepared"], name,
                {"data_digest": "d2", "class_names": [f"c{c}" for c in range(10)]})
    other = runner.invoke(champion_app, ["rollback", "--reason", "x", "--to", "3"])
    assert other.exit_code == 1 and "a rollback never changes what an index means" in other.output, other.output
    assert str(client.get_model_version_by_alias(name, CHAMPION_ALIAS).version) == "4"
    assert runner.invoke(champion_app, ["rollback", "--reason", "y", "--to", "1"]).exit_code == 0  # records none


def test_the_cli_has_the_champion_commands() -> None:
    from typer.main import get_command

    from flows.cli import app

    group = get_command(app).commands["champion"]
    assert set(group.commands) == {"show", "rollback"}


# ---------------------------------------------------------------------------- serving
def _post(url: str, payload: Any, timeout: float = 10.0) -> Any:
    request = urllib.request.Request(
        url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


@pytest.mark.integration
@pytest.mark.timeout(240)
def test_mlflow_models_serve_answers_with_the_champion(
    two_models: dict[str, Path], mlflow_uri: str, tmp_path: Path,
) -> None:
    import shutil

    import mlflow

    name = "served-test"
    # Class names that are not the indices (labels -1..8 say, or words): a request may ask for them.
    prepared = Path(shutil.copytree(two_models["prepared"], tmp_path / "prepared-named"))
    words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    preprocess = json.loads((prepared / "preprocess.json").read_text())
    (prepared / "preprocess.json").write_text(json.dumps({**preprocess, "class_names": words}))
    with mlflow.start_run():
        promote("baseline", two_models["baseline"], prepared, name, {"data_digest": "d"})
    expected = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    raw = np.load(prepared / "test_x.npy")[:16]

    port = free_port()
    mlflow_cli = str(Path(sys.executable).parent / "mlflow")
    server = subprocess.Popen(
        [mlflow_cli, "models", "serve", "-m", f"models:/{name}@champion", "--env-manager", "local",
         "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
        # `mlflow models serve` execs `uvicorn` by name: the venv's bin must be on PATH.
        env={**os.environ, "MLFLOW_TRACKING_URI": mlflow_uri,
             "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            if server.poll() is not None:
                pytest.fail(f"mlflow models serve exited {server.returncode}: {server.stderr.read().decode()[-2000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("mlflow models serve did not answer /ping within 60 s")
            time.sleep(0.5)
        # A request in the documented form: raw values, shaped (N, 1, 8, 8).
        answer = _post(f"http://127.0.0.1:{port}/invocations", {"inputs": raw.tolist()})
        assert answer["predictions"] == expected.predict(raw).tolist()
        named = _post(f"http://127.0.0.1:{port}/invocations", {"inputs": raw.tolist(), "params": {"output": "name"}})
        assert named["predictions"] == [words[i] for i in answer["predictions"]]
        assert named["predictions"] == expected.predict(raw, params={"output": "name"}).tolist()
        # Wrongly shaped (flat rows, or another image size): HTTP 400 naming the expected shape.
        for wrong in (raw.reshape(len(raw), -1), np.zeros((2, 1, 28, 28))):
            with pytest.raises(urllib.error.HTTPError) as refused:
                _post(f"http://127.0.0.1:{port}/invocations", {"inputs": wrong.tolist()})
            assert refused.value.code == 400
            message = json.loads(refused.value.read())["message"]
            assert "expected shape (-1, 1, 8, 8)" in message, message[-500:]
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server and its gunicorn/uvicorn workers
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=5)


def test_a_champion_run_on_onnx_runtime_sends_no_usage_telemetry_where_it_is_served(
    two_models: dict[str, Path], tmp_path: Path, mlflow_uri: str
) -> None:
    """The default champion is an ONNX Runtime model; loading it (as ``mlflow models serve``
    does) in a process where nothing turned telemetry off leaves no telemetry queue behind:
    ONNX Runtime's Linux build queues a usage event for Microsoft in each process that loads it."""
    import mlflow

    from tasks.core.telemetry import TELEMETRY_OFF

    save_onnx_variant(train_tiny(SPEC, two_models["prepared"]), tmp_path / "onnx-fp32")
    name = "onnx-served-test"
    with mlflow.start_run():
        promote("onnx-fp32", tmp_path / "onnx-fp32", two_models["prepared"], name, {"data_digest": "d"})
    cache = tmp_path / "cache"
    environ = {k: v for k, v in os.environ.items() if k not in TELEMETRY_OFF}
    code = ("import sys, numpy as np, mlflow; m = mlflow.pyfunc.load_model(sys.argv[1]); "
            "import onnxruntime; print(m.predict(np.load(sys.argv[2])[:4]).tolist())")
    test_x = str(two_models["prepared"] / "test_x.npy")
    done = subprocess.run([sys.executable, "-c", code, f"models:/{name}@champion", test_x],
                          env={**environ, "XDG_CACHE_HOME": str(cache), "MLFLOW_TRACKING_URI": mlflow_uri},
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(json.loads(done.stdout.strip().splitlines()[-1])) == 4  # it did load and run
    assert not (cache / "Microsoft").exists(), sorted(str(p) for p in cache.rglob("*"))[:5]


def test_one_promotion_at_a_time_per_project_the_next_waits_or_says_why(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Two evaluate stages at once (queued DVC experiments run in parallel) would both
    challenge the same champion; the second waits until the first has moved the alias."""
    import logging

    from tasks.core.paths import ProjectPaths
    from tasks.evaluation.promotion import RegistryError
    from tasks.evaluation.registration import registry_lock

    paths = ProjectPaths(tmp_path)
    lock = tmp_path / ".slimflow" / "registry.lock"
    lock.parent.mkdir()
    hold = ("import sys, time; from filelock import FileLock; lock = FileLock(sys.argv[1]); lock.acquire(); "
            "print('held', flush=True); time.sleep(float(sys.argv[2]))")
    holder = subprocess.Popen([sys.executable, "-c", hold, str(lock), "1.0"], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    started = time.monotonic()
    with caplog.at_level(logging.INFO, logger="slimflow.registry"), registry_lock(paths):
        waited = time.monotonic() - started
    holder.wait(timeout=30)
    assert waited >= 0.5, waited
    assert "waiting for another run's promotion to finish" in caplog.text

    holder = subprocess.Popen([sys.executable, "-c", hold, str(lock), "30"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RegistryError, match=r"registry.lock: another run held the registry for 0 s; nothing registered"):
            with registry_lock(paths, wait_s=0.2):
                pass
    finally:
        holder.kill()
        holder.wait(timeout=30)
