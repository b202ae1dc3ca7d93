"""Copies of one record in the raw data: the split keeps them in one split, so that the test
split never scores a copy of a training sample as unseen (``prepare.duplicates``)."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest

from tasks.core.classification import class_disagreements, paired_change_noise, paired_standard_error
from tasks.core.config import ParamsError, PrepareParams, load_params
from tasks.data import data_split, described_test_split, record_ids
from tasks.prepare import prepare_data, write_prepared
from tasks.sources import DataError
from tasks.sources.splits import copies_kept_together, find_duplicates, stratified_split

from raw_files import write_csv
from split_checks import nearest_neighbour_accuracy, prepared_csv, run_prepare_stage

FEATURES = [f"f{i}" for i in range(8)]


def _records(count: int, seed: int, classes: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """Overlapping Gaussian classes of measured values (a nearest neighbour is right about half the time)."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(99).normal(0, 0.9, (classes, len(FEATURES)))
    y = rng.integers(0, classes, count)
    return np.round(centres[y] + rng.normal(0, 1, (count, len(FEATURES))), 4), y


def _with_copies(x: np.ndarray, y: np.ndarray, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Each record written 1 to 5 times, the rows shuffled (a join that fanned out)."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(np.repeat(np.arange(len(y)), rng.integers(1, 6, len(y))))
    return x[order], y[order]


def _write(root: Path, x: np.ndarray, y: np.ndarray, name: str = "records.csv") -> str:
    write_csv(root / "data" / "raw" / name, [[*row, f"c{label}"] for row, label in zip(x.tolist(), y)],
              [*FEATURES, "label"])
    return f"data/raw/{name}"




def test_copies_of_a_record_stay_in_one_split_and_the_test_figure_is_what_new_records_read(tmp_path: Path) -> None:
    x, y = _records(700, seed=0)
    path = _write(tmp_path, *_with_copies(x, y))
    together, apart = prepared_csv(tmp_path, path), prepared_csv(tmp_path, path, duplicates="apart")
    fresh_x, fresh_y = _records(1500, seed=5)  # new records of the same kind, none in the file

    def records(split: tuple[np.ndarray, np.ndarray]) -> set[bytes]:
        return {row.tobytes() for row in split[0]}

    def accuracies(prepared) -> tuple[float, float]:
        classes = prepared.preprocessing.class_names
        test_x, test_y = prepared.splits["test"]
        fresh = np.array([classes.index(f"c{label}") for label in fresh_y])
        train = prepared.splits["train"]
        return (nearest_neighbour_accuracy(train, test_x, test_y),
                nearest_neighbour_accuracy(train, fresh_x.astype(np.float32), fresh))

    train, val, test = (records(together.splits[split]) for split in ("train", "val", "test"))
    assert not train & test and not train & val and not val & test
    assert len(train | val | test) == 700
    leaked = sum(row.tobytes() in records(apart.splits["train"]) for row in apart.splits["test"][0])
    assert leaked > 0.6 * len(apart.splits["test"][1])  # most test rows of the old split were training rows too

    card = together.card["duplicates"]
    assert card["samples"] == len(together.splits["train"][1]) + len(together.splits["val"][1]) + len(
        together.splits["test"][1])
    assert (card["distinct"], card["copies"], card["setting"]) == (700, "together", "auto")
    assert card["test_copies_of_train"] == {"together": 0, "apart": leaked}
    assert apart.card["duplicates"]["copies"] == "apart"
    write_prepared(together, tmp_path / "prepared")  # what a registered version records of its split
    assert data_split(tmp_path / "prepared") == {"seed": 42, "val_fraction": 0.15, "test_fraction": 0.25,
                                                 "copies": "together"}

    # The figure that matters: a model that memorizes (a nearest neighbour) reads on the test
    # split what it reads on new records only where the copies stay together.
    test_together, fresh_together = accuracies(together)
    test_apart, fresh_apart = accuracies(apart)
    assert abs(test_together - fresh_together) < 0.07, (test_together, fresh_together)
    assert test_apart - fresh_apart > 0.2, (test_apart, fresh_apart)
    shares = [len(together.splits[split][1]) / card["samples"] for split in ("val", "test")]
    assert shares == pytest.approx([0.15, 0.25], abs=0.03)  # the fractions hold, counted in records


def test_data_without_copies_is_split_as_before(tmp_path: Path) -> None:
    x, y = _records(300, seed=2)
    path = _write(tmp_path, x, y)
    prepared, apart = prepared_csv(tmp_path, path), prepared_csv(tmp_path, path, duplicates="apart")
    assert "duplicates" not in prepared.card
    assert prepared.digest == apart.digest
    write_prepared(prepared, tmp_path / "prepared")
    assert data_split(tmp_path / "prepared") == {"seed": 42, "val_fraction": 0.15, "test_fraction": 0.25}
    index = stratified_split(y, 6, 0.15, 0.25, 42)  # class 'c0'..'c5' = index 0..5
    for split in ("train", "val", "test"):
        assert np.array_equal(prepared.splits[split][0], x[index[split]].astype(np.float32))


def test_a_table_of_few_possible_rows_repeats_by_nature_and_is_split_as_samples(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    answers = rng.integers(0, 3, (600, 3)).astype(np.float32)  # three questions, three answers each: 27 rows
    y = (answers.sum(axis=1) + rng.integers(0, 2, 600) > 3).astype(np.int64)
    together, why = copies_kept_together("auto", answers)
    assert not together
    assert why == ("prepare.duplicates auto: the table's columns take few values (about 27 possible rows for 600 "
                   "samples), so identical rows are natural repeats")
    duplicates = find_duplicates(answers, y)
    assert duplicates.distinct == 27 and duplicates.conflicting > 0
    assert copies_kept_together("together", answers) == (True, "prepare.duplicates together")
    assert copies_kept_together("auto", np.zeros((600, 1, 4, 4), np.float32))[0]
    assert copies_kept_together("auto", ["a text", "a text"])[0]


def read_card(root: Path) -> dict:
    return json.loads((root / "data" / "prepared" / "card.json").read_text())


def test_a_table_of_categories_counts_each_column_once_not_each_category(tmp_path: Path) -> None:
    """Four questions of five answers each (625 possible rows for 600 people): identical rows
    are answers that coincide. Their 20 0/1 features alone would read as a million rows."""
    rng = np.random.default_rng(9)
    answers = rng.integers(0, 5, (600, 4))
    answers[:, 1] = answers[:, 0]  # two questions answered alike: plenty of repeats
    labels = np.where(answers.sum(axis=1) > 8, "yes", "no")
    write_csv(tmp_path / "data" / "raw" / "survey.csv",
              [[*(f"a{v}" for v in row), label] for row, label in zip(answers, labels)], ["q1", "q2", "q3", "q4", "label"])
    prepared = prepare_data(PrepareParams(source="csv", path="data/raw/survey.csv",
                                          csv_categorical_columns=["q1", "q2", "q3", "q4"]), 42, tmp_path)
    card = prepared.card["duplicates"]
    assert card["copies"] == "apart" and card["distinct"] == len({tuple(row) for row in answers}), card
    assert card["reason"] == ("prepare.duplicates auto: the table's columns take few values (about 625 possible rows "
                              "for 600 samples), so identical rows are natural repeats")


def test_the_stage_says_what_it_found_and_names_conflicting_labels(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    x, y = _records(200, seed=4)
    x, y = np.concatenate([x, x[:3]]), np.concatenate([y, (y[:3] + 1) % 6])  # 3 records copied with another label
    root = tmp_path / "project"
    path = _write(root, x, y)
    with caplog.at_level(logging.INFO, logger="slimflow.prepare"):
        assert run_prepare_stage(root, f"source: csv, path: {path}", tmp_path / "mlflow.db", monkeypatch) == 0
    said = {r.levelno: r.getMessage() for r in caplog.records if r.getMessage().startswith("duplicates:")}
    assert said[logging.INFO] == (
        "duplicates: 203 samples are 200 distinct records (3 of them twice); each record's copies kept in one split "
        "(prepare.duplicates auto: the values of its 8 columns make far more possible rows than its 203 samples, so "
        "identical rows are copies of one record); prepare.duplicates=apart would split them as separate samples: "
        f"{read_card(root)['duplicates']['test_copies_of_train']['apart']} test samples would be copies of training "
        "samples, scored as unseen")
    assert re.fullmatch(r"duplicates: 3 records appear with different labels \(e.g. samples [012] and 20[012], counting from 0 "
                        r"in the order read: the same input labelled 'c\d' and 'c\d'\); no model is right on every "
                        r"copy: check the labels", said[logging.WARNING])
    card = read_card(root)["duplicates"]
    import mlflow

    run = mlflow.search_runs(experiment_names=["slimflow"], output_format="list")[0]
    assert (run.data.metrics["num_samples"], run.data.metrics["num_distinct_samples"],
            run.data.metrics["num_test_copies_of_train"]) == (203, 200, 0)
    a, b = card["conflict_example"]["samples"]
    assert card["conflicting_labels"] == 3 and b == a + 200
    assert card["conflict_example"]["labels"] == [f"c{y[a]}", f"c{y[b]}"]


def test_a_class_of_too_few_distinct_records_is_refused_with_both_counts(tmp_path: Path) -> None:
    x, y = _records(120, seed=6, classes=2)
    x = np.concatenate([x, np.repeat(x[:1] + 50, 12, axis=0)])  # class 'c9': 12 samples, one record
    y = np.concatenate([y, np.full(12, 9)])
    path = _write(tmp_path, x, y)
    with pytest.raises(DataError, match=(
            r"^data/raw/records.csv: class 'c9' has 12 samples but 1 distinct ones \(the others are copies\); a split "
            r"that keeps each record's copies in one split \(prepare.duplicates\) .* needs at least 7 distinct samples "
            r"per class; prepare.duplicates=apart splits the copies as separate samples")):
        prepared_csv(tmp_path, path)
    assert prepared_csv(tmp_path, path, duplicates="apart").card["duplicates"]["copies"] == "apart"


def test_copied_texts_and_images_stay_in_one_split(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    words = ["alpha", "beta", "gamma", "delta", "omega", "sigma"]
    texts = [" ".join(rng.choice(words, 6)) for _ in range(120)]
    labels = [f"t{i % 3}" for i in range(120)]
    table = tmp_path / "data" / "raw" / "texts.csv"
    order = rng.permutation(np.repeat(np.arange(120), 3))
    write_csv(table, [[texts[i], labels[i]] for i in order], ["text", "label"])
    prepared = prepare_data(PrepareParams(source="text_table", path="data/raw/texts.csv"), 42, tmp_path)
    assert prepared.card["duplicates"]["distinct"] == len(set(texts))
    assert prepared.card["duplicates"]["copies"] == "together"
    seen = {row.tobytes() for row in prepared.splits["train"][0]}
    assert not any(row.tobytes() in seen for row in prepared.splits["test"][0])

    images = rng.integers(0, 255, (90, 8, 8, 3)).astype(np.uint8)
    order = rng.permutation(np.repeat(np.arange(90), 2))
    np.savez(tmp_path / "data" / "raw" / "images.npz", x=images[order], y=(np.arange(90) % 3)[order])
    prepared = prepare_data(PrepareParams(source="npz", path="data/raw/images.npz"), 42, tmp_path)
    assert (prepared.card["duplicates"]["distinct"], prepared.card["duplicates"]["copies"]) == (90, "together")
    seen = {row.tobytes() for row in prepared.splits["train"][0]}
    assert not any(row.tobytes() in seen for row in prepared.splits["test"][0])


def test_the_setting_is_checked(tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text("prepare: {duplicates: drop}\n")
    with pytest.raises(ParamsError, match=r"prepare.duplicates: .*'auto', 'together' or 'apart'"):
        load_params(params)


def test_a_change_on_copies_of_records_is_counted_over_records() -> None:
    """Two models no different in truth, scored on 400 records written 1 to 5 times: each is
    right or wrong on all of a record's copies. Counted per sample, their accuracy change is
    "beyond chance" (over 2 standard errors) far more often than 2 standard errors allow;
    counted over records (the copies one draw), about as often as they allow."""
    rng = np.random.default_rng(0)
    record = np.repeat(np.arange(400), rng.integers(1, 6, 400))
    called = {"samples": 0, "records": 0}
    for _ in range(400):
        base_right, right = (rng.random(400) < 0.6)[record], (rng.random(400) < 0.6)[record]
        gain = right.mean() - base_right.mean()
        called["samples"] += abs(gain) > 2 * paired_change_noise(base_right, right)[0]
        called["records"] += abs(gain) > 2 * paired_change_noise(base_right, right, record)[0]
    assert called["records"] / 400 < 0.08 and called["samples"] / 400 > 0.2, called
    # Every record once: the same figure as without records.
    once = np.arange(300)
    a, b = rng.random(300) < 0.6, rng.random(300) < 0.7
    assert paired_standard_error(a, b, once[::-1]) == pytest.approx(paired_standard_error(a, b), rel=1e-12)


def test_a_class_loss_on_copies_counts_each_record_once() -> None:
    """A class's samples only the baseline gets right: 12 samples, but 3 records (fingerprints,
    uint64, as the prepared data keeps them) of 4 copies each."""
    fingerprints = np.array([2**63 + 5, 2**63 + 5, 2**63 + 5, 2**63 + 5, 17, 17, 17, 17, 9, 9, 9, 9, 1, 2],
                            dtype=np.uint64)
    y = np.array([0] * 12 + [1, 1])
    baseline, model = np.array([0] * 12 + [1, 0]), np.array([1] * 12 + [1, 1])
    assert class_disagreements(y, baseline, model, ["a", "b"]) == {"a": (12, 0), "b": (0, 1)}
    assert class_disagreements(y, baseline, model, ["a", "b"], fingerprints) == {"a": (3, 0), "b": (0, 1)}


def test_the_evaluate_stage_reads_the_test_splits_records_from_its_fingerprints(tmp_path: Path) -> None:
    from tasks.data import record_ids

    x, y = _records(300, seed=8)
    path = _write(tmp_path, *_with_copies(x, y))
    prepared = prepared_csv(tmp_path, path)
    write_prepared(prepared, tmp_path / "prepared")
    records = record_ids(tmp_path / "prepared", "test")
    test_x = prepared.splits["test"][0]
    assert records is not None and len(records) == len(test_x)
    same_input = (test_x[:, None, :] == test_x[None, :, :]).all(axis=2)
    assert np.array_equal(same_input, records[:, None] == records[None, :])
    assert records.max() + 1 == len(np.unique(test_x, axis=0)) < len(test_x)

    _write(tmp_path, x, y, "distinct.csv")
    write_prepared(prepared_csv(tmp_path, "data/raw/distinct.csv"), tmp_path / "prepared-distinct")
    assert record_ids(tmp_path / "prepared-distinct", "test") is None


def test_a_compression_search_counts_the_validation_splits_copies_once() -> None:
    """A trial that lost 3 records of one class, each 3 times in the validation split: 9 samples
    read as a loss beyond chance (0.2%), 3 records as one chance explains (12.5%, over the 5%
    a class of 10 may take); its drop's noise is the records'."""
    from tasks.compression.search import Budget

    labels = np.repeat(np.arange(10), 30)  # 10 classes, each 10 records of 3 copies
    records = np.repeat(np.arange(100), 3)
    predictions = labels.copy()
    predictions[:9] = 1  # class 0's first 3 records, all copies
    baseline_classes = {str(c): {"recall": 1.0, "support": 30} for c in range(10)}
    logits = np.eye(10)[predictions]
    per_sample, per_record = (
        Budget(max_drop_points=5.0, max_trials=4, max_minutes=1.0, baseline_accuracy=1.0, max_class_recall_drop=0.1,
               baseline_classes=baseline_classes, baseline_predictions=labels, val_records=ids).judge(logits, labels)
        for ids in (None, records))
    assert per_sample.class_problem is not None and not per_sample.fits
    assert per_record.class_problem is None and per_record.fits
    assert per_record.noise_points == pytest.approx(
        100 * paired_change_noise(labels[::3] == labels[::3], predictions[::3] == labels[::3])[0])

    from tasks.compression.search import Trial, _coarser_than_the_budget

    budget = Budget(max_drop_points=0.5, max_trials=4, max_minutes=1.0, baseline_accuracy=1.0,
                    baseline_predictions=labels, val_records=records)
    trial = Trial(1, 0.5, per_record.accuracy, per_record.drop_points, True, 100, 10, 0.5, 1.0,
                  noise_points=per_record.noise_points, disagreements=per_record.disagreements)
    assert _coarser_than_the_budget(trial, budget).startswith(
        f"; but 300 validation samples (100 distinct records) measure that drop only to ±{per_record.noise_points:.2f} "
        "points (one standard error: the two models disagree on 9 of them)")


# --------------------------------------------------------------------------- a column naming each row's group


def _visits(patients: int, seed: int, first_id: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each patient 2 to 9 visits sharing a strong personal signature and a weak sign of the
    patient's diagnosis (3 classes)."""
    rng = np.random.default_rng(seed)
    sign = np.random.default_rng(42).normal(0, 0.6, (3, len(FEATURES)))
    x, y, ids = [], [], []
    for patient in range(patients):
        label, visits = rng.integers(0, 3), rng.integers(2, 10)
        signature = rng.normal(0, 1.5, len(FEATURES)) + sign[label]
        x += list(signature + rng.normal(0, 0.4, (visits, len(FEATURES))))
        y += [label] * visits
        ids += [f"P{first_id + patient:04d}"] * visits
    order = rng.permutation(len(y))
    return np.round(np.array(x), 3)[order], np.array(y)[order], np.array(ids)[order]


def _write_visits(root: Path, x: np.ndarray, y: np.ndarray, ids: np.ndarray) -> str:
    write_csv(root / "data" / "raw" / "visits.csv", [[pid, *row, f"c{label}"] for pid, row, label in
                                                     zip(ids, x.tolist(), y)], ["patient", *FEATURES, "label"])
    return "data/raw/visits.csv"


def test_a_group_column_keeps_each_groups_rows_in_one_split_and_the_test_figure_is_new_groups(tmp_path: Path) -> None:
    x, y, ids = _visits(240, seed=0)
    path = _write_visits(tmp_path, x, y, ids)
    grouped = prepared_csv(tmp_path, path, csv_group_column="patient")
    by_rows = prepared_csv(tmp_path, path, csv_ignore_columns=["patient"])
    assert grouped.card["feature_names"] == FEATURES  # the group column is no feature

    where = {split: {row.tobytes() for row in grouped.splits[split][0]} for split in ("train", "val", "test")}
    patients = {split: {pid for row, pid in zip(x.astype(np.float32), ids) if row.tobytes() in where[split]}
                for split in where}
    assert not patients["train"] & patients["test"] and not patients["train"] & patients["val"]
    assert not patients["val"] & patients["test"] and len(patients["train"] | patients["val"] | patients["test"]) == 240
    card = grouped.card["groups"]
    assert (card["column"], card["groups"], card["samples"], card["mixed_labels"]) == ("patient", 240, len(y), 0)
    assert sum(card["split_groups"].values()) == 240 and card["split_groups"]["test"] == len(patients["test"])
    assert card["test_rows_of_train_groups"]["apart"] > 0.9 * len(by_rows.splits["test"][1])

    fresh_x, fresh_y, _ = _visits(200, seed=5, first_id=5000)  # new patients
    results = {}
    for name, prepared in (("groups", grouped), ("rows", by_rows)):
        classes = prepared.preprocessing.class_names
        fresh = np.array([classes.index(f"c{label}") for label in fresh_y])
        results[name] = (nearest_neighbour_accuracy(prepared.splits["train"], *prepared.splits["test"]),
                         nearest_neighbour_accuracy(prepared.splits["train"], fresh_x.astype(np.float32), fresh))
    assert abs(results["groups"][0] - results["groups"][1]) < 0.08, results
    assert results["rows"][0] - results["rows"][1] > 0.3, results

    write_prepared(grouped, tmp_path / "prepared")  # the groups travel with the splits, and the split names them
    assert data_split(tmp_path / "prepared") == {"seed": 42, "val_fraction": 0.15, "test_fraction": 0.25,
                                                 "groups": "patient"}
    records = record_ids(tmp_path / "prepared", "test")
    test_patients = [pid for row in grouped.splits["test"][0] for pid in
                     [ids[np.flatnonzero((x.astype(np.float32) == row).all(axis=1))[0]]]]
    assert np.array_equal(records[:, None] == records[None, :],
                          np.array(test_patients)[:, None] == np.array(test_patients)[None, :])
    from tasks.evaluation.challenge import split_text

    assert split_text(data_split(tmp_path / "prepared")) == "seed 42, val/test 0.15/0.25, each 'patient' group in one split"
    assert described_test_split(tmp_path / "prepared") == {
        "test_split": f"{card['split_groups']['test']} 'patient' groups no model trained on", "test_groups": "patient"}


@pytest.mark.parametrize("case", ["no such column", "the label", "an empty cell", "too few groups"])
def test_a_bad_group_column_is_refused_naming_it(case: str, tmp_path: Path) -> None:
    x, y, ids = _visits(60, seed=1)
    column = {"no such column": "customer", "the label": "label"}.get(case, "patient")
    if case == "an empty cell":
        ids[4] = ""
    if case == "too few groups":
        keep = (y != 2) | np.isin(ids, np.unique(ids[y == 2])[:3])  # class 'c2': 3 patients
        x, y, ids = x[keep], y[keep], ids[keep]
    path = _write_visits(tmp_path, x, y, ids)
    expected = {
        "no such column": r"prepare.csv_group_column: no column 'customer' in the header \(columns: patient, f0,",
        "the label": r"prepare.csv_group_column: 'label' is the label column or a categorical feature",
        "an empty cell": r"line \d+, column 'patient': empty group \(prepare.csv_group_column: every row names its group\)",
        "too few groups": r"class 'c2' has \d+ rows but 3 groups \(prepare.csv_group_column 'patient': .*needs at least "
                          r"7 groups per class",
    }[case]
    with pytest.raises(DataError, match=rf"^data/raw/visits.csv: {expected}"):
        prepared_csv(tmp_path, path, csv_group_column=column)


def test_a_group_column_is_for_a_csv(tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text("prepare: {source: npz, path: data/raw/d.npz, csv_group_column: patient}\n")
    with pytest.raises(ParamsError, match=r"csv_group_column patient: source 'npz' has no named columns; only csv"):
        load_params(params)
