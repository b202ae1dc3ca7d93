"""Rows in time order: where a column says when each row was observed, the earliest rows train
and the latest test, so that the test split measures a model on rows after the ones it
learned from (``prepare.csv_time_column``)."""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path

import numpy as np
import pytest

from tasks.core.config import ParamsError, load_params
from tasks.data import data_split, described_test_split
from tasks.evaluation.challenge import split_text
from tasks.prepare import write_prepared
from tasks.sources import DataError

from raw_files import write_csv
from split_checks import nearest_neighbour_accuracy, prepared_csv, run_prepare_stage

FEATURES = [f"f{i}" for i in range(8)]
START = dt.date(2024, 1, 1)
DAYS = 730  # the file covers two years


def _drifting(count: int, seed: int, first_day: int = 0, last_day: int = DAYS, classes: int = 3,
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows of ``classes`` classes observed on days ``first_day`` .. ``last_day``; each class's
    centre moves over the two years toward where the next class's centre started."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(7).normal(0, 1.0, (classes, len(FEATURES)))
    drift = 0.3 * (centres[np.roll(np.arange(classes), -1)] - centres)
    day = rng.integers(first_day, last_day, count)
    y = rng.integers(0, classes, count)
    x = centres[y] + (day / DAYS)[:, None] * drift[y] + rng.normal(0, 0.5, (count, len(FEATURES)))
    return np.round(x, 4), y, day


def _date(day: int) -> str:
    return (START + dt.timedelta(days=int(day))).isoformat()


def _write(root: Path, x: np.ndarray, y: np.ndarray, times: list[object], column: str = "date") -> str:
    write_csv(root / "data" / "raw" / "rows.csv", [[time, *row, f"c{label}"] for time, row, label in
                                                   zip(times, x.tolist(), y)], [column, *FEATURES, "label"])
    return "data/raw/rows.csv"




def _days_of(prepared, split: str, x: np.ndarray, day: np.ndarray) -> np.ndarray:
    """The days of a split's rows, found by their values in the file's rows."""
    where = {row.tobytes(): d for row, d in zip(x.astype(np.float32), day)}
    return np.array([where[row.tobytes()] for row in prepared.splits[split][0]])


def test_a_time_column_trains_on_the_past_and_its_test_figure_is_what_the_next_month_reads(tmp_path: Path) -> None:
    x, y, day = _drifting(900, seed=0)
    path = _write(tmp_path, x, y, [_date(d) for d in day])
    by_time = prepared_csv(tmp_path, path, csv_time_column="date")
    at_random = prepared_csv(tmp_path, path, csv_ignore_columns=["date"])
    assert by_time.card["feature_names"] == FEATURES  # the time column is no feature

    days = {split: _days_of(by_time, split, x, day) for split in ("train", "val", "test")}
    assert days["train"].max() < days["val"].min() and days["val"].max() < days["test"].min()
    assert {split: len(days[split]) for split in days} == by_time.card["split_sizes"]
    assert abs(len(days["test"]) - 225) <= 5 and abs(len(days["val"]) - 135) <= 5  # the fractions, to a day's rows
    card = by_time.card["time"]
    assert (card["column"], card["kind"], card["rows"]) == ("date", "date", 900)
    assert card["splits"]["train"]["first"] == _date(day.min()) and card["splits"]["test"]["last"] == _date(day.max())
    assert card["splits"]["test"]["first"] == _date(days["test"].min())
    assert card["train_rows_from_test_period"]["time"] == 0
    assert card["train_rows_from_test_period"]["random"] == int((_days_of(at_random, "train", x, day)
                                                                  >= days["test"].min()).sum()) > 50

    # The month after the file: a random split's test figure overstates it by far more than a
    # split in time order does (measured: 82.7% on test vs 81.0% by time; 90.6% vs 79.5% at random).
    fresh_x, fresh_y, _ = _drifting(600, seed=10, first_day=DAYS, last_day=DAYS + 30)
    gaps = {}
    for name, prepared in (("time", by_time), ("random", at_random)):
        classes = prepared.preprocessing.class_names
        fresh = np.array([classes.index(f"c{label}") for label in fresh_y])
        gaps[name] = (nearest_neighbour_accuracy(prepared.splits["train"], *prepared.splits["test"])
                      - nearest_neighbour_accuracy(prepared.splits["train"], fresh_x.astype(np.float32), fresh))
    assert abs(gaps["time"]) < 0.05 and gaps["random"] > 0.08, gaps

    write_prepared(by_time, tmp_path / "prepared")
    assert data_split(tmp_path / "prepared") == {"seed": 42, "val_fraction": 0.15, "test_fraction": 0.25,
                                                 "time": "date"}
    assert split_text(data_split(tmp_path / "prepared")) == "seed 42, val/test 0.15/0.25, in 'date' order"
    assert described_test_split(tmp_path / "prepared") == {  # what the closing table and the report say
        "test_split": f"its latest {len(days['test'])} rows, {_date(days['test'].min())} to {_date(day.max())} in "
                      "'date' order"}


def test_rows_of_one_time_stay_in_one_split_and_numbers_are_times_too(tmp_path: Path) -> None:
    x, y, _ = _drifting(600, seed=3)
    week = np.repeat(np.arange(20), 30)  # 20 weeks of 30 rows: every cut falls inside a week
    path = _write(tmp_path, x, y, [int(w) for w in week], column="week")
    prepared = prepared_csv(tmp_path, path, csv_time_column="week", val_fraction=0.12, test_fraction=0.22)
    weeks = {split: set(_days_of(prepared, split, x, week).tolist()) for split in ("train", "val", "test")}
    assert max(weeks["train"]) < min(weeks["val"]) and max(weeks["val"]) < min(weeks["test"])
    assert sum(len(w) for w in weeks.values()) == 20
    # a cut inside a week moves to the week's start: 132 test rows become 5 weeks, 72 val rows 3 weeks
    assert prepared.card["split_sizes"] == {"train": 360, "val": 90, "test": 150}
    assert prepared.card["time"]["kind"] == "number"
    assert prepared.card["time"]["splits"]["test"] == {"rows": 150, "first": "15", "last": "19"}
    path = _write(tmp_path, x, y, [1_709_550_000 + 3600 * int(w) for w in week], column="week")  # Unix times
    unix = prepared_csv(tmp_path, path, csv_time_column="week", val_fraction=0.12, test_fraction=0.22)
    assert unix.card["time"]["splits"]["test"]["last"] == "1709618400"


def test_times_of_day_and_zones_are_ordered_as_instants(tmp_path: Path) -> None:
    x, y, _ = _drifting(120, seed=4)
    base = dt.datetime(2025, 3, 1, 12, 0, tzinfo=dt.timezone.utc)
    instants = [base + dt.timedelta(hours=int(h)) for h in range(120)]
    # every third written in another zone, the rest without one (read as UTC)
    times = [(t.astimezone(dt.timezone(dt.timedelta(hours=-5))).isoformat() if i % 3 == 0 else
              t.replace(tzinfo=None).isoformat()) for i, t in enumerate(instants)]
    path = _write(tmp_path, x, y, times, column="seen_at")
    prepared = prepared_csv(tmp_path, path, csv_time_column="seen_at")
    hours = {split: _days_of(prepared, split, x, np.arange(120)) for split in ("train", "val", "test")}
    assert hours["train"].max() < hours["val"].min() and hours["val"].max() < hours["test"].min()
    assert prepared.card["time"]["splits"]["test"]["last"] == "2025-03-06T11:00:00+00:00"


def test_another_layout_of_dates_is_read_as_its_format_says(tmp_path: Path) -> None:
    x, y, day = _drifting(300, seed=8)
    iso = prepared_csv(tmp_path, _write(tmp_path, x, y, [_date(d) for d in day]), csv_time_column="date")
    day_first = [(START + dt.timedelta(days=int(d))).strftime("%d/%m/%Y") for d in day]
    path = _write(tmp_path, x, y, day_first)
    with pytest.raises(DataError, match=r"line 2, column 'date': not a time: '\d\d/\d\d/2\d\d\d' .*prepare.csv_time_format "
                                        r"reads another layout, e.g. '%d/%m/%Y'"):
        prepared_csv(tmp_path, path, csv_time_column="date")
    read = prepared_csv(tmp_path, path, csv_time_column="date", csv_time_format="%d/%m/%Y")
    assert read.card["time"] == iso.card["time"]  # the same days, the same split
    assert all(np.array_equal(read.splits[split][0], iso.splits[split][0]) for split in ("train", "val", "test"))
    day_first[5] = "2024-03-04"
    with pytest.raises(DataError, match=r"line 7, column 'date': '2024-03-04' is no time written as "
                                        r"prepare.csv_time_format '%d/%m/%Y'$"):
        prepared_csv(tmp_path, _write(tmp_path, x, y, day_first), csv_time_column="date", csv_time_format="%d/%m/%Y")


def test_the_stage_says_how_it_split_in_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    x, y, day = _drifting(300, seed=5)
    root = tmp_path / "project"
    path = _write(root, x, y, [_date(d) for d in day])
    with caplog.at_level(logging.INFO, logger="slimflow.prepare"):
        assert run_prepare_stage(root, f"source: csv, path: {path}, csv_time_column: date", tmp_path / "mlflow.db",
                                 monkeypatch) == 0
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("time:")]
    card = prepared_csv(root, path, csv_time_column="date").card["time"]
    spans = card["splits"]
    assert said == [
        f"time: 300 rows split in 'date' order (prepare.csv_time_column): train {spans['train']['first']} to "
        f"{spans['train']['last']} ({spans['train']['rows']} rows) / val {spans['val']['first']} to "
        f"{spans['val']['last']} ({spans['val']['rows']} rows) / test {spans['test']['first']} to "
        f"{spans['test']['last']} ({spans['test']['rows']} rows); test holds only rows later than every training "
        f"row; a random split would have trained on {card['train_rows_from_test_period']['random']} rows from the "
        "test period"]


@pytest.mark.parametrize("case", ["no such column", "the label", "an empty cell", "not a time", "two kinds",
                                  "a class only in the past", "one time"])
def test_a_bad_time_column_is_refused_naming_it(case: str, tmp_path: Path) -> None:
    x, y, day = _drifting(200, seed=6)
    times: list[object] = [_date(d) for d in day]
    column = {"no such column": "when", "the label": "label"}.get(case, "date")
    if case == "an empty cell":
        times[7] = ""
    elif case == "not a time":
        times[7] = "03/04/2024"
    elif case == "two kinds":
        times[7] = "20240304"
    elif case == "a class only in the past":
        y = np.where(day > 300, y % 2, y)  # class 'c2' has no rows after day 300
    elif case == "one time":
        times = ["2024-05-01"] * len(times)
    path = _write(tmp_path, x, y, times)
    expected = {
        "no such column": r"prepare.csv_time_column: no column 'when' in the header \(columns: date, f0,",
        "the label": r"prepare.csv_time_column: 'label' is the label column or a categorical feature",
        "an empty cell": r"line 9, column 'date': empty time \(prepare.csv_time_column: every row says when it was "
                         r"observed\)",
        "not a time": r"line 9, column 'date': not a time: '03/04/2024' \(prepare.csv_time_column reads ISO 8601 "
                      r"dates and times such as 2024-03-04",
        "two kinds": r"line 9, column 'date': '20240304' is a number, but the rows before hold dates "
                     r"\(prepare.csv_time_column: one kind of time in a column\)",
        "a class only in the past": r"class 'c2' has no rows in the val split of a split in time order "
                                    r"\(prepare.csv_time_column 'date': its \d+ rows are from 2024-\d\d-\d\d to 2024-\d\d-\d\d;"
                                    r" the val split holds 2025-",
        "one time": r"prepare.csv_time_column 'date': 1 distinct times for 200 rows cannot make train, val and test "
                    r"splits in time order",
    }[case]
    with pytest.raises(DataError, match=rf"^data/raw/rows.csv: {expected}"):
        prepared_csv(tmp_path, path, csv_time_column=column)


@pytest.mark.parametrize("yaml, expected", [
    ("{source: npz, path: data/raw/d.npz, csv_time_column: date}",
     r"csv_time_column date: source 'npz' has no named columns; only csv"),
    ("{source: csv, path: data/raw/d.csv, csv_time_column: date, csv_group_column: patient}",
     r"csv_group_column patient and csv_time_column date: a split keeps each group together or splits in time "
     r"order, not both; set one"),
    ("{source: csv, path: data/raw/d.csv, csv_time_column: date, duplicates: together}",
     r"duplicates together: csv_time_column date decides the split \(copies observed at one time fall in one split, "
     r"and a copy observed later is a new observation\); leave duplicates at auto"),
    ("{source: csv, path: data/raw/d.csv, csv_time_format: '%d/%m/%Y'}",
     r"csv_time_format '%d/%m/%Y': a strptime format such as '%d/%m/%Y' for the cells of csv_time_column, which is "
     r"not set"),
    ("{source: csv, path: data/raw/d.csv, csv_time_column: date, csv_time_format: dd/mm/yyyy}",
     r"csv_time_format 'dd/mm/yyyy': a strptime format such as '%d/%m/%Y' for the cells of csv_time_column$"),
    ("{source: csv, path: data/raw/d.csv, csv_group_column: patient, duplicates: apart}",
     r"duplicates apart: csv_group_column patient decides the split \(a record's copies are rows of its group\)"),
])
def test_a_time_column_is_for_a_csv_and_decides_the_split_alone(yaml: str, expected: str, tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text(f"prepare: {yaml}\n")
    with pytest.raises(ParamsError, match=expected):
        load_params(params)
