"""The prepare stage: the outputs and their determinism, and bad data refused by the stage (the readers: test_sources.py).

Each test writes its own small raw files under ``tmp_path``. The MLflow and DVC tests
are marked ``integration``.
"""


from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import yaml

from tasks.core.config import PrepareParams
from tasks.data import SPLITS, Preprocessing, load_preprocessing, load_split
from tasks.prepare import class_index_line, main, prepare_data, write_prepared
from tasks.sources.splits import stratified_split
from tasks.sources import (
    DataError,
    load_sklearn,
    sklearn_digest,
)

from raw_files import HEIGHT, WIDTH, sample_images, tabular_rows, write_csv, write_idx, write_image_folder

REPO = Path(__file__).resolve().parents[1]


def make_project(root: Path, prepare: dict, seed: int = 42) -> Path:
    """The least a project needs: params.yaml, an empty dvc.yaml and data/raw."""
    (root / "data" / "raw").mkdir(parents=True, exist_ok=True)
    (root / "dvc.yaml").write_text("stages: {}\n")
    (root / "params.yaml").write_text(yaml.safe_dump({"base": {"seed": seed}, "prepare": prepare}))
    return root


def read_outputs(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}



# --------------------------------------------------------------------------- prepare_data / write_prepared


def csv_params(**changes: object) -> PrepareParams:
    return PrepareParams(source="csv", path="data/raw/iris.csv", csv_label_column="species", **changes)


@pytest.fixture
def csv_root(tmp_path: Path) -> Path:
    rows = [r[:3] for r in tabular_rows(per_class=20)]
    write_csv(tmp_path / "data" / "raw" / "iris.csv", rows, ["a", "b", "species"])
    return tmp_path


def test_prepare_writes_the_contract(csv_root: Path, tmp_path: Path) -> None:
    prepared = prepare_data(csv_params(), 42, csv_root)
    out = tmp_path / "data" / "prepared"
    write_prepared(prepared, out)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["card.json", "preprocess.json", *(f"{s}_{a}.npy" for s in SPLITS for a in ("x", "y", "rows"))]
    )
    train_x = np.load(out / "train_x.npy")
    assert train_x.dtype == np.float32 and np.load(out / "train_y.npy").dtype == np.int64
    # Statistics come from the train split only.
    assert load_preprocessing(out) == Preprocessing.fit(train_x, 3, ["setosa", "versicolor", "virginica"],
                                                        feature_names=("a", "b"))
    assert load_split(out, "test").x.shape[1:] == (2,)
    # The header's names are the model's column names, in preprocess.json and the card.
    assert json.loads((out / "preprocess.json").read_text())["feature_names"] == ["a", "b"]

    card = json.loads((out / "card.json").read_text())
    raw_file = csv_root / "data" / "raw" / "iris.csv"
    assert card["source"] == "csv" and card["path"] == "data/raw/iris.csv"
    assert card["digest"] == hashlib.md5(raw_file.read_bytes()).hexdigest()
    assert card["num_samples"] == 60 and card["input_shape"] == [2] and card["dtype"] == "float32"
    assert card["class_names"] == ["setosa", "versicolor", "virginica"] and card["seed"] == 42
    assert card["feature_names"] == ["a", "b"]
    assert card["split_sizes"] == {"train": 36, "val": 9, "test": 15}
    assert card["counts"]["test"] == {"setosa": 5, "versicolor": 5, "virginica": 5}
    assert card["fractions"] == {"train": 0.6, "val": 0.15, "test": 0.25}
    all_x = np.concatenate([np.load(out / f"{s}_x.npy") for s in SPLITS])
    assert card["value_range"] == {"min": float(all_x.min()), "max": float(all_x.max())}
    assert (out / "card.json").read_text() == json.dumps(card, indent=2, sort_keys=True) + "\n"


def test_labels_1_to_k_are_prepared_as_class_names_and_the_log_says_which_index_is_which(tmp_path: Path) -> None:
    rows = [[a, b, 1 + i % 3] for i, (a, b, *_) in enumerate(tabular_rows(per_class=20))]
    write_csv(tmp_path / "data" / "raw" / "wine.csv", rows, ["a", "b", "cultivar"])
    params = PrepareParams(source="csv", path="data/raw/wine.csv", csv_label_column="cultivar")
    prepared = prepare_data(params, 42, tmp_path)  # was: "class '0' has 0 samples"
    assert prepared.card["class_names"] == ["1", "2", "3"] and prepared.preprocessing.num_classes == 3
    assert prepared.card["counts"]["test"] == {"1": 5, "2": 5, "3": 5}
    assert set(np.unique(prepared.splits["train"][1])) == {0, 1, 2}
    assert class_index_line(prepared.card["class_names"]) == (
        "classes (a model predicts the index; all in preprocess.json): 0 = '1', 1 = '2', 2 = '3'")

    assert class_index_line([str(i) for i in range(10)]) is None  # the index is the label
    many = class_index_line([f"c{i}" for i in range(40)])
    assert many.endswith("7 = 'c7', ... (40 classes)") and "8 = " not in many


def _heavy_rows(rows: int = 600, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two lognormal amounts of median 100 (the class in their logs), a normal feature, a signed one, a constant."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(rows, 3))
    y = (z[:, 0] + z[:, 1] > 0).astype(np.int64)
    x = np.column_stack([100 * np.exp(1.6 * z[:, 0]), 100 * np.exp(1.6 * z[:, 1]), z[:, 2] + 50, z[:, 2] ** 3,
                         np.full(rows, 3.0)])
    return x.astype(np.float32), y


def test_heavy_tailed_features_are_found_and_logged_before_standardizing(tmp_path: Path) -> None:
    from tasks.sources.rows import chosen_log_features, heavy_tailed_features

    x, y = _heavy_rows()
    # The amounts; not the normal feature, the signed heavy one (negative values), the constant.
    assert heavy_tailed_features(x) == (0, 1)
    (tmp_path / "data" / "raw").mkdir(parents=True)
    np.savez(tmp_path / "data" / "raw" / "rows.npz", x=x, y=y)
    params = PrepareParams(source="npz", path="data/raw/rows.npz", log_features="auto")
    prepared = prepare_data(params, 42, tmp_path)
    assert prepared.preprocessing.log_features == (0, 1) and prepared.card["log_features"] == [0, 1]
    out = tmp_path / "data" / "prepared"
    write_prepared(prepared, out)
    assert json.loads((out / "preprocess.json").read_text())["log_features"] == [0, 1]
    # The train split's amounts, standardized after log(1 + x), are no longer heavy-tailed:
    # standardized alone, their bulk sits in a sliver near the smallest value.
    def skewness(values: np.ndarray) -> float:
        return float(((values - values.mean()) ** 3).mean() / values.std() ** 3)

    train = load_split(out, "train").x
    assert abs(train[:, 0].mean()) < 1e-5 and train[:, 0].std() == pytest.approx(1.0, abs=1e-4)
    plain = load_split(out, "train", Preprocessing.fit(prepared.splits["train"][0], 2, ["0", "1"])).x
    assert skewness(train[:, 0]) < 1.5 < 5 < skewness(plain[:, 0])
    # The same transform on raw inputs wherever the model runs (the registered pyfunc applies this).
    raw_test = np.load(out / "test_x.npy")
    expected = (np.log1p(raw_test[:, 0]) - prepared.preprocessing.mean[0]) / prepared.preprocessing.std[0]
    np.testing.assert_allclose(load_preprocessing(out).apply(raw_test)[:, 0], expected, rtol=1e-5, atol=1e-5)
    # An explicit list; a feature that does not exist; images; none (and the file as before).
    assert chosen_log_features([3, 0, 3], x) == (0, 3)
    with pytest.raises(DataError, match=r"^params.yaml: prepare.log_features: feature 5 does not exist: "
                                        r"the data has 5 features \(0..4\)$"):
        chosen_log_features([5], x)
    with pytest.raises(DataError, match=r"the data is not rows of features \(input shape \(1, 2, 2\)\)"):
        chosen_log_features([0], np.ones((4, 1, 2, 2), np.float32))
    assert chosen_log_features("auto", np.ones((4, 1, 2, 2), np.float32)) == ()
    assert "log_features" not in json.loads(Preprocessing.fit(x, 2, ["0", "1"]).to_json())


@pytest.mark.integration
def test_the_stage_says_which_features_are_heavy_tailed_and_which_it_logged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mlflow_uri: str, caplog: pytest.LogCaptureFixture,
) -> None:
    import logging

    root = make_project(tmp_path / "project", {"source": "npz", "path": "data/raw/rows.npz"})
    np.savez(root / "data" / "raw" / "rows.npz", **dict(zip("xy", _heavy_rows())))
    monkeypatch.setenv("SLIMFLOW_ROOT", str(root))
    caplog.set_level(logging.INFO)
    assert main([]) == 0  # log_features none: a hint naming the option
    assert ("heavy-tailed features (non-negative, skewness above 2 on the train split): x0, x1; "
            "prepare.log_features=auto takes them to log(1 + x) before standardizing") in caplog.text
    caplog.clear()
    assert main(["--set", "prepare.log_features=auto"]) == 0
    assert "log(1 + x) before standardizing (prepare.log_features auto): x0, x1" in caplog.text
    assert "heavy-tailed features" not in caplog.text


def test_a_csv_names_its_features_by_header_and_log_features_by_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mlflow_uri: str, caplog: pytest.LogCaptureFixture,
) -> None:
    import logging

    from tasks.sources.rows import chosen_log_features

    x, y = _heavy_rows()
    header = ["amount", "spend", "age", "signed", "flat"]
    root = make_project(tmp_path / "project", {"source": "csv", "path": "data/raw/rows.csv",
                                               "csv_ignore_columns": ["id"]})
    write_csv(root / "data" / "raw" / "rows.csv", [[i, *row, label] for i, (row, label) in enumerate(zip(x, y))],
              ["id", *header, "label"])
    monkeypatch.setenv("SLIMFLOW_ROOT", str(root))
    caplog.set_level(logging.INFO)
    assert main([]) == 0  # the hint names the columns by their header names
    assert ("heavy-tailed features (non-negative, skewness above 2 on the train split): amount (0), spend (1); "
            "prepare.log_features=auto") in caplog.text
    assert "columns left out (prepare.csv_ignore_columns): id" in caplog.text
    prepared = load_preprocessing(root / "data" / "prepared")
    assert prepared.feature_names == tuple(header) and prepared.input_shape == (5,)
    card = json.loads((root / "data" / "prepared" / "card.json").read_text())
    assert card["feature_names"] == header and card["ignored_columns"] == ["id"]

    caplog.clear()
    assert main(["--set", "prepare.log_features=[spend, 0]"]) == 0  # names and indices alike
    assert "log(1 + x) before standardizing (prepare.log_features ['spend', 0]): amount (0), spend (1)" in caplog.text
    assert load_preprocessing(root / "data" / "prepared").log_features == (0, 1)

    with pytest.raises(DataError, match=r"^params.yaml: prepare.log_features: no column 'amt' \(columns: amount, "
                                        r"spend, age, signed, flat\)$"):
        chosen_log_features(["amt"], x, tuple(header))
    with pytest.raises(DataError, match=r"prepare.log_features: 'amount': the data names no columns \(only a CSV's "
                                        r"header does\); name features by index 0..4$"):
        chosen_log_features(["amount"], x)


def test_categorical_columns_are_logged_and_never_taken_to_log_scale(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mlflow_uri: str, caplog: pytest.LogCaptureFixture,
) -> None:
    import logging

    from tasks.sources.rows import chosen_log_features

    x, y = _heavy_rows()
    # A rare category: its 0/1 feature is skewed (about 4), but it is no amount to log.
    plans = np.where(np.arange(len(y)) % 20 == 0, "platinum", np.where(y == 1, "gold", "basic"))
    root = make_project(tmp_path / "project", {"source": "csv", "path": "data/raw/rows.csv",
                                               "csv_categorical_columns": ["plan"]})
    write_csv(root / "data" / "raw" / "rows.csv", [[*row[:2], p, label] for row, p, label in zip(x, plans, y)],
              ["amount", "spend", "plan", "label"])
    monkeypatch.setenv("SLIMFLOW_ROOT", str(root))
    caplog.set_level(logging.INFO)
    assert main(["--set", "prepare.log_features=auto"]) == 0
    assert ("categorical columns (one 0/1 feature per category; prepare.csv_categorical_columns): "
            "plan (3: basic, gold, platinum)") in caplog.text
    assert "log(1 + x) before standardizing (prepare.log_features auto): amount (0), spend (1)" in caplog.text
    preprocessing = load_preprocessing(root / "data" / "prepared")
    assert preprocessing.columns == ("amount", "spend", "plan") and preprocessing.input_shape == (5,)
    assert preprocessing.feature_names[2:] == ("plan=basic", "plan=gold", "plan=platinum")
    assert preprocessing == Preprocessing.from_json(preprocessing.to_json())  # round trip
    card = json.loads((root / "data" / "prepared" / "card.json").read_text())
    assert card["columns"] == ["amount", "spend", "plan"] and card["categorical"]["plan"]["dtype"] == "string"
    import mlflow  # the run's dataset: the raw columns, the plan as its words

    (dataset_input,) = mlflow.search_runs(experiment_names=["slimflow"], output_format="list")[0].inputs.dataset_inputs
    schema = json.loads(dataset_input.dataset.schema)["mlflow_colspec"]
    assert [(c["name"], c["type"]) for c in schema] == [("amount", "double"), ("spend", "double"), ("plan", "string"),
                                                        ("label", "string")]
    with pytest.raises(DataError, match=r"prepare.log_features: 'plan' is a categorical column"):
        chosen_log_features(["plan"], np.zeros((4, 5), np.float32), preprocessing.feature_names,
                            preprocessing.categorical)


def test_missing_values_become_the_train_split_median(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mlflow_uri: str, caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import logging

    from tasks.sources import read_csv

    rows = [r[:3] for r in tabular_rows(per_class=20)]
    for i in range(0, 60, 7):
        rows[i][0] = ""  # nine gaps in 'a'
    rows[5][1] = "NA"
    root = make_project(tmp_path / "project", {"source": "csv", "path": "data/raw/iris.csv",
                                               "csv_label_column": "species"})
    write_csv(root / "data" / "raw" / "iris.csv", rows, ["a", "b", "species"])
    monkeypatch.setenv("SLIMFLOW_ROOT", str(root))
    caplog.set_level(logging.INFO)
    # By default a gap is refused, naming its place and the setting; nothing is written.
    assert main([]) == 2
    assert capsys.readouterr().err == ("error: prepare: data/raw/iris.csv: line 2, column 'a': a missing value (''); "
                                       "prepare.missing_values=median fills missing values with the train split's median\n")
    assert not (root / "data" / "prepared").exists()

    caplog.clear()
    assert main(["--set", "prepare.missing_values=median"]) == 0
    out = root / "data" / "prepared"
    raw = read_csv(root / "data" / "raw" / "iris.csv", "iris.csv", "species", missing=True)
    train = stratified_split(raw.y, 3, 0.15, 0.25, 42)["train"]
    medians = np.nanmedian(raw.x[train].astype(np.float64), axis=0)  # the train split's, its gaps left out
    preprocessing = load_preprocessing(out)
    np.testing.assert_allclose(preprocessing.fill_values, medians)
    for split in SPLITS:  # every split's gaps filled: nothing downstream sees a NaN
        assert not np.isnan(np.load(out / f"{split}_x.npy")).any()
    card = json.loads((out / "card.json").read_text())
    assert card["missing_values"]["counts"] == {"a": 9, "b": 1}
    assert card["missing_values"]["fill_values"]["a"] == pytest.approx(medians[0])
    assert f"prepare.missing_values median): a 9 of 60 (15.0%) -> {medians[0]:g}, b 1 of 60" in caplog.text
    # The registered model's preprocessing fills a raw request's gaps the same way.
    request = np.array([[np.nan, 0.5], [0.25, np.nan]], np.float32)
    filled = np.array([[medians[0], 0.5], [0.25, medians[1]]], np.float32)
    np.testing.assert_allclose(preprocessing.apply(request), preprocessing.apply(filled), rtol=1e-6)

    rows = [[r[0], "", r[2]] for r in rows]  # 'b' has no value at all: nothing to fill it with
    write_csv(root / "data" / "raw" / "iris.csv", rows, ["a", "b", "species"])
    with pytest.raises(DataError, match=r"^data/raw/iris.csv: feature 'b' has no value in the train split; leave it "
                                        r"out \(prepare.csv_ignore_columns\) or give it values$"):
        prepare_data(csv_params(missing_values="median"), 42, root)


def test_prepare_image_sources(tmp_path: Path) -> None:
    images, labels = sample_images()
    write_idx(tmp_path / "data/raw/img.idx.gz", images, gz=True)
    write_idx(tmp_path / "data/raw/lbl.idx", labels)
    params = PrepareParams(source="idx", path="data/raw/img.idx.gz", labels_path="data/raw/lbl.idx", val_fraction=0.2, test_fraction=0.2)
    prepared = prepare_data(params, 0, tmp_path)
    assert prepared.preprocessing.input_shape == (1, HEIGHT, WIDTH) and len(prepared.preprocessing.mean) == 1
    assert prepared.card["labels_digest"] == hashlib.md5((tmp_path / "data/raw/lbl.idx").read_bytes()).hexdigest()
    assert sum(prepared.card["split_sizes"].values()) == 30

    write_image_folder(tmp_path / "data/raw/pets")
    params = PrepareParams(source="image_folder", path="data/raw/pets", image_size=(4, 3), image_mode="RGB", val_fraction=0.2, test_fraction=0.2)
    prepared = prepare_data(params, 0, tmp_path)
    assert prepared.splits["train"][0].shape[1:] == (3, 4, 3) and len(prepared.preprocessing.mean) == 3
    assert prepared.card["digest"].endswith(".dir") and prepared.card["class_names"] == ["cat", "dog", "owl"]


def test_prepare_digits_default() -> None:
    prepared = prepare_data(PrepareParams(), 42, REPO)
    assert prepared.card["source"] == "digits" and prepared.card["path"] is None
    assert prepared.source_uri == "sklearn:digits" and len(prepared.digest) == 32
    assert prepared.card["input_shape"] == [1, 8, 8] and prepared.card["value_range"] == {"min": 0.0, "max": 16.0}
    sizes = prepared.card["split_sizes"]
    assert sum(sizes.values()) == 1797 and 440 <= sizes["test"] <= 450


def test_same_params_give_byte_identical_outputs(csv_root: Path, tmp_path: Path) -> None:
    write_prepared(prepare_data(csv_params(), 7, csv_root), tmp_path / "one")
    write_prepared(prepare_data(csv_params(), 7, csv_root), tmp_path / "two")
    assert read_outputs(tmp_path / "one") == read_outputs(tmp_path / "two")


def test_new_seed_new_split_same_proportions(csv_root: Path) -> None:
    first, second = (prepare_data(csv_params(), seed, csv_root) for seed in (1, 2))
    assert first.card["counts"] == second.card["counts"]
    assert not np.array_equal(first.splits["train"][0], second.splits["train"][0])
    assert first.digest == second.digest


def test_each_row_keeps_its_fingerprint_whatever_the_split_column_order_or_categories(tmp_path: Path) -> None:
    """What lets a later run leave out the test rows a champion trained on: a row's
    fingerprint is the same in another split (another seed), with the file's columns in
    another order, and after the file grew a category; another row's differs."""
    from tasks.data import load_row_fingerprints, row_fingerprints, text_fingerprints

    rng = np.random.default_rng(0)
    rows = [[round(float(rng.normal(50, 10)), 2), int(rng.integers(0, 9)), str(rng.choice(["basic", "gold"])),
             str(rng.choice(["stay", "churn"]))] for _ in range(120)]
    header = ["income", "visits", "plan", "label"]
    raw = tmp_path / "data" / "raw"
    write_csv(raw / "rows.csv", rows, header)
    write_csv(raw / "reordered.csv", [[r[2], r[3], r[1], r[0]] for r in rows], ["plan", "label", "visits", "income"])
    write_csv(raw / "grown.csv", [*rows, [61.5, 3, "enterprise", "stay"], [48.25, 0, "gold", "churn"]], header)
    write_csv(raw / "gap.csv", [*rows, [52.5, "", "", "stay"]], header)  # visits becomes double, plan has a gap

    def fingerprints(path: str, seed: int, folder: str) -> dict[str, np.ndarray]:
        params = PrepareParams(source="csv", path=f"data/raw/{path}", csv_label_column="label",
                               csv_categorical_columns=["plan"], missing_values="median")
        write_prepared(prepare_data(params, seed, tmp_path), tmp_path / folder)
        return {split: load_row_fingerprints(tmp_path / folder, split) for split in SPLITS}

    first, other_seed = fingerprints("rows.csv", 1, "a"), fingerprints("rows.csv", 2, "b")
    everything = np.concatenate(list(first.values()))
    assert everything.dtype == np.uint64 and len(np.unique(everything)) == 120  # one per row
    assert not np.array_equal(first["test"], other_seed["test"])  # other rows in each split...
    assert set(everything.tolist()) == set(np.concatenate(list(other_seed.values())).tolist())  # ...the same rows
    assert set(np.concatenate(list(fingerprints("reordered.csv", 1, "c").values())).tolist()) == set(everything.tolist())
    grown = set(np.concatenate(list(fingerprints("grown.csv", 1, "d").values())).tolist())
    assert set(everything.tolist()) < grown and len(grown) == 122  # 'enterprise' changed every row's 0/1 features
    with_gap = set(np.concatenate(list(fingerprints("gap.csv", 1, "e").values())).tolist())
    assert set(everything.tolist()) < with_gap and len(with_gap) == 121
    # Images: the raw bytes; texts: the text itself.
    images = np.zeros((3, 1, 4, 4), np.float32)
    images[1, 0, 0, 0] = 1.0
    image_rows = row_fingerprints(Preprocessing.fit(images, 2, ["a", "b"]), images)
    assert image_rows[0] == image_rows[2] != image_rows[1]
    assert text_fingerprints(["good", "bad", "good"]).tolist()[::2] == text_fingerprints(["good", "good"]).tolist()
    assert load_row_fingerprints(tmp_path / "nowhere", "test") is None  # prepared before fingerprints: none


def test_stratified_split_partitions_every_class() -> None:
    y = np.repeat(np.arange(4), [7, 20, 33, 100])
    index = stratified_split(y, 4, 0.15, 0.25, seed=3)
    together = np.concatenate([index[s] for s in SPLITS])
    assert sorted(together.tolist()) == list(range(len(y)))  # a partition
    for split in SPLITS:
        assert set(np.bincount(y[index[split]], minlength=4).tolist()).isdisjoint({0})
    assert np.bincount(y[index["test"]]).tolist() == [1, 5, 8, 25]


def test_write_failure_keeps_the_earlier_outputs(csv_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "data" / "prepared"
    write_prepared(prepare_data(csv_params(), 1, csv_root), out)
    before = read_outputs(out)
    prepared = prepare_data(csv_params(), 2, csv_root)
    calls = []

    def failing_save(*args: object, **kwargs: object) -> None:
        calls.append(args)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        with open(args[0], "wb") as handle:  # type: ignore[call-overload]
            np.lib.format.write_array(handle, args[1])  # type: ignore[arg-type]

    monkeypatch.setattr(np, "save", failing_save)
    with pytest.raises(OSError, match="No space left"):
        write_prepared(prepared, out)
    monkeypatch.undo()
    assert read_outputs(out) == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["prepared", "raw"]  # no temp folder left
    write_prepared(prepared, out)  # and a later write replaces it whole
    assert read_outputs(out) != before
    assert sorted(p.name for p in out.parent.iterdir()) == ["prepared", "raw"]


# --------------------------------------------------------------------------- the command line


def _truncated_idx(raw: Path) -> dict:
    images, labels = sample_images()
    path = write_idx(raw / "img.idx", images)
    path.write_bytes(path.read_bytes()[:100])
    write_idx(raw / "lbl.idx", labels)
    return {"source": "idx", "path": "data/raw/img.idx", "labels_path": "data/raw/lbl.idx"}


def _wrong_magic(raw: Path) -> dict:
    images, labels = sample_images()
    write_idx(raw / "img.idx", images, magic=0x00000802)
    write_idx(raw / "lbl.idx", labels)
    return {"source": "idx", "path": "data/raw/img.idx", "labels_path": "data/raw/lbl.idx"}


def _count_mismatch(raw: Path) -> dict:
    images, labels = sample_images()
    write_idx(raw / "img.idx.gz", images, gz=True)
    write_idx(raw / "lbl.idx.gz", labels[:20], gz=True)
    return {"source": "idx", "path": "data/raw/img.idx.gz", "labels_path": "data/raw/lbl.idx.gz"}


# --------------------------------------------------------------------------- a 3-D npz: images or sequences


def _prepared_npz(root: Path, layout: str) -> Path:
    """``data/raw/s.npz`` prepared with ``prepare.npz_layout`` ``layout`` into ``root/layout``."""
    prepared = prepare_data(PrepareParams(source="npz", path="data/raw/s.npz", npz_layout=layout), 42, root)
    write_prepared(prepared, root / layout)
    return root / layout


def test_sensor_sequences_get_a_mean_and_std_per_feature_and_a_model_learns_them(tmp_path: Path) -> None:
    """Sequences ``(N, T, F)`` of readings in their own units (a pressure in hPa, a vibration
    in metres that carries the class). Standardized as one image channel (before), the
    vibration reached the model as a constant and a GRU stayed at chance (an LSTM on 3,000
    such sequences: 26.7% of 4 classes); ``auto`` sees the features on other scales and gives
    each its own mean and std. The registered model takes the file's samples, ``(N, T, F)``."""
    import torch

    from models.spec import ModelSpec
    from tasks import synthetic
    from test_evaluate_support import train_tiny

    x, y = synthetic.sensor_sequences(600)
    (tmp_path / "data" / "raw").mkdir(parents=True)
    np.savez(tmp_path / "data" / "raw" / "s.npz", x=x, y=y)
    sequences, images = _prepared_npz(tmp_path, "auto"), _prepared_npz(tmp_path, "images")
    card = json.loads((sequences / "card.json").read_text())["npz_layout"]
    assert card["layout"] == "sequences" and card["setting"] == "auto" and {1, 2, 3} <= set(card["squeezed"])
    preprocessing = load_preprocessing(sequences)
    assert preprocessing.sequence_features and preprocessing.raw_shape == (40, 4)
    assert preprocessing.input_shape == (1, 40, 4) and preprocessing.shape_taken == (40, 4)
    train = load_split(sequences, "train").x
    np.testing.assert_allclose(train.mean(axis=(0, 1, 2)), 0, atol=1e-4)
    np.testing.assert_allclose(train.std(axis=(0, 1, 2)), 1, atol=1e-3)
    # The registered model's path: raw samples as the file holds them, normalized the same way.
    raw_test = np.load(sequences / "test_x.npy")
    np.testing.assert_allclose(preprocessing.apply(raw_test[:, 0]), load_split(sequences, "test").x, atol=1e-5)
    as_images = load_preprocessing(images)
    assert not as_images.sequence_features and len(as_images.mean) == 1
    assert load_split(images, "train").x[..., 1].std() < 1e-5  # the vibration: flat
    spec = ModelSpec(family="gru", rnn_hidden=16, dropout=0.0)
    accuracy = {}
    for name, folder in (("sequences", sequences), ("images", images)):
        test = load_split(folder, "test")
        model = train_tiny(spec, folder, steps=80)
        with torch.no_grad():
            accuracy[name] = float((model(torch.from_numpy(test.x)).argmax(1).numpy() == test.y).mean())
    print(accuracy)
    assert accuracy["sequences"] >= 0.9 and accuracy["images"] <= 0.7, accuracy


def test_images_in_a_3d_npz_keep_one_mean_and_std(tmp_path: Path) -> None:
    """28x28 images whose border columns hold no ink or a speck (what a per-column std would
    blow up): ``auto`` reads them as one-channel images, as before; the registered model takes
    ``(N, 28, 28)``, the file's samples. ``sequences`` standardizes the columns one by one."""
    from tasks import synthetic

    x, y = synthetic.noisy_digits(300)
    x = np.clip(x[:, 0], 0, None) * 255 / max(float(x.max()), 1e-6)
    x[:, :, :3] = 0.0
    x[5, 14, 2] = 40.0  # a speck of ink in an otherwise empty column
    (tmp_path / "data" / "raw").mkdir(parents=True)
    np.savez(tmp_path / "data" / "raw" / "s.npz", x=x.astype(np.float32), y=y)
    images = load_preprocessing(_prepared_npz(tmp_path, "auto"))
    assert not images.sequence_features and len(images.mean) == 1 and images.shape_taken == (28, 28)
    assert json.loads((tmp_path / "auto" / "card.json").read_text())["npz_layout"] == {
        "layout": "images", "setting": "auto", "squeezed": []}
    columns = load_preprocessing(_prepared_npz(tmp_path, "sequences"))
    assert columns.sequence_features and len(columns.mean) == 28
    # preprocess.json of a prepare before these fields: one channel, the prepared shape taken.
    old = json.loads(images.to_json())
    del old["raw_shape"]
    assert Preprocessing.from_json(json.dumps(old)).shape_taken == (1, 28, 28)
    assert "sequence_features" not in old and "raw_shape" not in json.loads(Preprocessing.fit(
        np.ones((4, 1, 2, 2), np.float32), 2, ["0", "1"]).to_json())


@pytest.mark.integration
def test_the_stage_says_how_it_read_a_3d_npz(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mlflow_uri: str, caplog: pytest.LogCaptureFixture,
) -> None:
    import logging

    from tasks import synthetic

    root = make_project(tmp_path / "project", {"source": "npz", "path": "data/raw/s.npz"})
    x, y = synthetic.sensor_sequences(200)
    np.savez(root / "data" / "raw" / "s.npz", x=x, y=y)
    monkeypatch.setenv("SLIMFLOW_ROOT", str(root))
    caplog.set_level(logging.INFO)
    assert main([]) == 0
    assert re.search(r"sequences of 40 steps x 4 features: each feature standardized on its own \(prepare.npz_layout "
                     r"auto: as one image channel, features [0-9, ]+ of 0..3 would span less than 0.1 of a unit; "
                     r"prepare.npz_layout=images reads the array as one-channel images\)", caplog.text), caplog.text
    caplog.clear()
    assert main(["--set", "prepare.npz_layout=images"]) == 0
    assert re.search(r"one-channel 40x4 images: one mean and std \(prepare.npz_layout images\); as one image channel, "
                     r"features [0-9, ]+ of 0..3 would span less than 0.1 of a unit, so the model hardly sees them: "
                     r"prepare.npz_layout=sequences standardizes each feature on its own", caplog.text), caplog.text


# --------------------------------------------------------------------------- a 4-D npz: channels first or last


def test_channels_last_images_are_prepared_as_their_channels_first_copy(tmp_path: Path) -> None:
    """Colour images as PIL, Keras and TensorFlow Datasets hand them, ``(N, H, W, 3)``: before,
    a 4-D npz was taken as ``(N, C, H, W)``, so 32x32 RGB images became 32 channels of 32x3
    pixels (on 3,000 generated colour shapes: 83.2% on test against 94.5% for the same images
    channels first, and nothing said why). ``auto`` takes the last axis as the channels where it
    has at most 4 entries and the second more: the prepared splits and statistics are those of
    the channels-first file, byte for byte. The registered model takes the file's samples."""
    import torch

    from models.spec import ModelSpec
    from tasks import synthetic
    from tasks.sources import npz_channels_line, npz_input_shape
    from test_evaluate_support import train_tiny

    x, y = synthetic.colour_shapes(400)
    raw = tmp_path / "data" / "raw"
    raw.mkdir(parents=True)
    np.savez(raw / "last.npz", x=x, y=y)
    np.savez(raw / "first.npz", x=np.ascontiguousarray(x.transpose(0, 3, 1, 2)), y=y)
    folders = {}
    for name, setting in (("last", "auto"), ("first", "auto"), ("as-stored", "first")):
        params = PrepareParams(source="npz", path=f"data/raw/{name if name != 'as-stored' else 'last'}.npz",
                               npz_channels=setting)
        write_prepared(prepare_data(params, 42, tmp_path), tmp_path / name)
        folders[name] = tmp_path / name
    last, first = read_outputs(folders["last"]), read_outputs(folders["first"])
    for split in SPLITS:
        assert last[f"{split}_x.npy"] == first[f"{split}_x.npy"] and last[f"{split}_y.npy"] == first[f"{split}_y.npy"]
    as_last, as_first = load_preprocessing(folders["last"]), load_preprocessing(folders["first"])
    assert as_last.input_shape == as_first.input_shape == (3, 16, 16) and as_last.mean == as_first.mean
    assert as_last.channels_last and as_last.raw_shape == as_last.shape_taken == (16, 16, 3)
    assert not as_first.channels_last and as_first.shape_taken == (3, 16, 16)
    assert load_preprocessing(folders["as-stored"]).input_shape == (16, 16, 3)  # npz_channels first: as before
    card = json.loads((folders["last"] / "card.json").read_text())["npz_channels"]
    assert card == {"channels": "last", "setting": "auto", "file_shape": [16, 16, 3]}
    assert json.loads((folders["first"] / "card.json").read_text())["npz_channels"]["channels"] == "first"
    assert npz_input_shape(raw / "last.npz", "x") == (3, 16, 16)  # what the checks before a run see
    assert npz_input_shape(raw / "last.npz", "x", "first") == (16, 16, 3)
    # The registered model's path: the file's samples, channels last, normalized as the split.
    test_x = np.load(folders["last"] / "test_x.npy")
    file_rows = as_last.to_raw(test_x)
    assert file_rows.shape[1:] == (16, 16, 3) and np.isin(file_rows, x.astype(np.float32)).all()
    np.testing.assert_array_equal(as_last.apply(as_last.from_raw(file_rows)), load_split(folders["last"], "test").x)
    assert Preprocessing.from_json(as_last.to_json()) == as_last
    assert "channels_last" not in json.loads(as_first.to_json())  # older files read as before
    accuracy = {}  # a tiny CNN on each reading of the same file
    for name in ("last", "as-stored"):
        test = load_split(folders[name], "test")
        model = train_tiny(ModelSpec(family="cnn", channels=(8, 16), dropout=0.0), folders[name], steps=120)
        with torch.no_grad():
            accuracy[name] = float((model(torch.from_numpy(test.x)).argmax(1).numpy() == test.y).mean())
    print(accuracy)
    assert accuracy["last"] >= 0.85 and accuracy["as-stored"] <= 0.7, accuracy
    assert npz_channels_line(card) == (
        "channels last: the file's (16, 16, 3) samples are 3-channel 16x16 images (prepare.npz_channels auto: its "
        "last axis has at most 4 entries, its second more); the registered model takes them as the file holds "
        "them; prepare.npz_channels=first reads them as 16 channels of 16x3")
    assert npz_channels_line({"channels": "first", "setting": "auto", "file_shape": [3, 4, 4]}).endswith(
        "(prepare.npz_channels auto: its second axis has at most 4 entries too); "
        "prepare.npz_channels=last reads them as 4 channels of 3x4")


@pytest.mark.parametrize(("shape", "setting", "prepared"), [
    ((20, 28, 28, 1), "auto", (1, 28, 28)), ((20, 1, 28, 28), "auto", (1, 28, 28)),
    ((20, 8, 8, 4), "auto", (4, 8, 8)), ((20, 3, 3, 3), "auto", (3, 3, 3)), ((20, 3, 3, 3), "last", (3, 3, 3)),
    ((20, 16, 16, 16), "auto", (16, 16, 16)), ((20, 16, 16, 16), "last", (16, 16, 16)),
    ((20, 6, 5, 2), "last", (2, 6, 5)), ((20, 2, 5, 6), "auto", (2, 5, 6)),
])
def test_which_axis_of_a_4d_npz_holds_the_channels(
    shape: tuple[int, ...], setting: str, prepared: tuple[int, ...], tmp_path: Path,
) -> None:
    """Grey images with their channel last are read channels last; anything whose last axis is
    longer than 4, or whose second is as short, stays channels first unless ``last`` is asked."""
    from tasks.sources import npz_input_shape, read_npz

    x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(shape[0]) % 2)
    data = read_npz(tmp_path / "d.npz", "d.npz", "x", "y", channels=setting)
    assert data.x.shape[1:] == prepared == npz_input_shape(tmp_path / "d.npz", "x", setting)
    assert data.file_shape == shape[1:]
    np.testing.assert_array_equal(data.x, np.moveaxis(x, -1, 1) if data.channels_last else x)


def _nan_csv(raw: Path) -> dict:
    rows = [r[:3] for r in tabular_rows()]
    rows[4][1] = "NaN"
    write_csv(raw / "t.csv", rows, ["a", "b", "label"])
    return {"source": "csv", "path": "data/raw/t.csv"}


def _no_label_column(raw: Path) -> dict:
    write_csv(raw / "t.csv", [r[:3] for r in tabular_rows()], ["a", "b", "species"])
    return {"source": "csv", "path": "data/raw/t.csv"}


def _bad_image(raw: Path) -> dict:
    write_image_folder(raw / "pets")
    (raw / "pets" / "owl" / "03.png").write_bytes(b"truncated")
    return {"source": "image_folder", "path": "data/raw/pets"}


def _single_class(raw: Path) -> dict:
    np.savez(raw / "d.npz", x=np.ones((30, 3)), y=np.zeros(30, dtype=np.int64))
    return {"source": "npz", "path": "data/raw/d.npz"}


def _sequences_of_rows(raw: Path) -> dict:
    np.savez(raw / "d.npz", x=np.arange(90.0).reshape(30, 3), y=np.arange(30) % 2)
    return {"source": "npz", "path": "data/raw/d.npz", "npz_layout": "sequences"}


def _channels_of_sequences(raw: Path) -> dict:
    np.savez(raw / "d.npz", x=np.arange(240.0).reshape(30, 4, 2), y=np.arange(30) % 2)
    return {"source": "npz", "path": "data/raw/d.npz", "npz_channels": "last"}


def _prices_as_labels(raw: Path) -> dict:
    rng = np.random.default_rng(0)
    rows = [[int(rng.integers(1, 6)), round(float(rng.uniform(30, 200)), 1), f"{rng.uniform(1e5, 9e5):.2f}"]
            for _ in range(60)]
    write_csv(raw / "houses.csv", rows, ["rooms", "area", "price"])
    return {"source": "csv", "path": "data/raw/houses.csv", "csv_label_column": "price"}


def _small_class(raw: Path) -> dict:
    rows = [r[:3] for r in tabular_rows() if r[2] != "versicolor"] + [[0.1, 0.2, "versicolor"]] * 4
    write_csv(raw / "t.csv", rows, ["a", "b", "label"])
    return {"source": "csv", "path": "data/raw/t.csv"}


BAD_DATA: dict[str, tuple[Callable[[Path], dict], str]] = {
    "truncated idx": (_truncated_idx, r"data/raw/img.idx: truncated: .*expected 916 bytes .*found 100"),
    "wrong magic": (_wrong_magic, r"data/raw/img.idx: not an IDX image file: magic number 0x00000802"),
    "count mismatch": (_count_mismatch, r"data/raw/lbl.idx.gz: has 20 labels but data/raw/img.idx.gz has 30 images"),
    "nan in csv": (_nan_csv, r"data/raw/t.csv: line 6, column 'b': a missing value \('NaN'\); "
                             r"prepare.missing_values=median fills"),
    "no label column": (_no_label_column, r"data/raw/t.csv: no label column 'label'"),
    "unreadable image": (_bad_image, r"data/raw/pets/owl/03.png: cannot read image"),
    "single class": (_single_class, r"data/raw/d.npz: all 30 samples belong to one class \('0'\)"),
    "sequences of rows": (_sequences_of_rows, r"params.yaml: prepare.npz_layout: sequences: data/raw/d.npz's array "
                                              r"'x' is not 3-D \(one sample: \(3,\)\); sequences are an \(N, T, F\) array"),
    "channels of sequences": (_channels_of_sequences, r"params.yaml: prepare.npz_channels: last: data/raw/d.npz's "
                                                      r"array 'x' is not 4-D \(one sample: \(4, 2\)\); channels are "
                                                      r"the second or the last axis"),
    "prices as labels": (_prices_as_labels, r"data/raw/houses.csv: the labels are 60 distinct numbers with fractions "
                                            r"\(e.g. '1[0-9.]+', '[0-9.]+'\), 60 of them too rare to split: a quantity "
                                            r"to predict \(regression\), not classes; .*prepare.csv_label_column"),
    "class too small": (_small_class, r"data/raw/t.csv: class 'versicolor' has 4 samples; .* at least 7"),
}


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_cli_bad_data_one_message_no_outputs(
    case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    writer, pattern = BAD_DATA[case]
    raw = tmp_path / "project" / "data" / "raw"
    raw.mkdir(parents=True)
    root = make_project(tmp_path / "project", writer(raw))
    monkeypatch.delenv("SLIMFLOW_ROOT", raising=False)
    monkeypatch.delenv("SLIMFLOW_RUN_CONTEXT", raising=False)
    monkeypatch.chdir(root)
    assert main([]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert re.fullmatch(rf"error: prepare: {pattern}.*\n", err), err
    assert sorted(p.name for p in (root / "data").iterdir()) == ["raw"]  # nothing prepared, no temp folder


def test_cli_failure_keeps_earlier_good_outputs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    root = make_project(tmp_path, _nan_csv(tmp_path / "data" / "raw"))
    good = csv_params()
    write_csv(tmp_path / "data" / "raw" / "iris.csv", [r[:3] for r in tabular_rows()], ["a", "b", "species"])
    write_prepared(prepare_data(good, 42, root), root / "data" / "prepared")
    before = read_outputs(root / "data" / "prepared")
    monkeypatch.setenv("SLIMFLOW_ROOT", str(root))
    assert main([]) == 2
    assert read_outputs(root / "data" / "prepared") == before
    assert main(["--set", "prepare.val_fraction=0.9"]) == 2
    assert capsys.readouterr().err.splitlines()[-1].startswith("error: prepare: params.yaml: prepare: ")


def test_cli_subprocess_exit_code_and_stderr(tmp_path: Path) -> None:
    root = make_project(tmp_path, _no_label_column(tmp_path / "data" / "raw"))
    from tasks.core.run_context import RunContext

    context = RunContext(error_file=str(tmp_path / "stage.error"))
    env = {**os.environ, "PYTHONPATH": str(REPO), **context.as_env()}
    env.pop("SLIMFLOW_ROOT", None)
    done = subprocess.run([sys.executable, "-m", "tasks.prepare"], cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    message = "prepare: data/raw/t.csv: no label column 'label' in the header (columns: a, b, species)"
    assert done.stderr == f"error: {message}\n"
    assert (tmp_path / "stage.error").read_text() == message + "\n"  # handed to the flow
    assert not (root / "data" / "prepared").exists()


@pytest.mark.integration
def test_cli_logs_dataset_digest_to_mlflow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mlflow_uri: str) -> None:
    import mlflow

    root = make_project(tmp_path / "project", {"source": "csv", "path": "data/raw/iris.csv", "csv_label_column": "species"})
    raw_file = write_csv(root / "data" / "raw" / "iris.csv", [r[:3] for r in tabular_rows()], ["a", "b", "species"])
    expected = hashlib.md5(raw_file.read_bytes()).hexdigest()  # what `dvc add` records for a file
    monkeypatch.setenv("SLIMFLOW_ROOT", str(root))
    assert main([]) == 0

    runs = mlflow.search_runs(experiment_names=["slimflow"], output_format="list")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.tags["data_digest"] == expected
    (dataset_input,) = run.inputs.dataset_inputs
    assert dataset_input.dataset.digest == expected
    assert json.loads(dataset_input.dataset.source) == {"uri": "data/raw/iris.csv"}
    assert {t.key: t.value for t in dataset_input.tags}["mlflow.data.context"] == "training"
    # A CSV's train split is a table of its columns (what the MLflow UI's Datasets panel shows).
    schema = json.loads(dataset_input.dataset.schema)["mlflow_colspec"]
    assert [(c["name"], c["type"]) for c in schema] == [("a", "double"), ("b", "double"), ("species", "string")]
    assert json.loads(dataset_input.dataset.profile)["num_rows"] == 21
    assert run.data.metrics["num_samples"] == 30 and run.data.metrics["num_train"] == 21
    card = mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/data_card.json")
    assert card == json.loads((root / "data" / "prepared" / "card.json").read_text())
    assert card["digest"] == expected

    # A built-in set is logged with an `sklearn:` source and the digest of its canonical bytes.
    assert main(["--set", "prepare.source=digits", "--set", "prepare.path=null"]) == 0
    latest = mlflow.search_runs(experiment_names=["slimflow"], output_format="list", order_by=["start_time DESC"])[0]
    (dataset_input,) = latest.inputs.dataset_inputs
    assert dataset_input.dataset.source_type == "sklearn" and dataset_input.dataset.name == "digits"
    assert json.loads(dataset_input.dataset.source) == {"uri": "sklearn:digits"}
    assert dataset_input.dataset.digest == sklearn_digest(load_sklearn("digits"))
