"""The train/val/test split in time order, where a column says when each row was observed.

A model is used on rows that come after the ones it learned from. Split at random, the
training rows come from the whole period the file covers, so the test split asks the models
about times they trained on, and where the data drifts (prices rise, a product changes, the
customers change) its figure is the one of a model that knew the future. Measured on a
generated 4-class table whose classes drift over two years (4,000 rows): a random split's
champion read far more on its test split than on the quarter after the file
(README: Your own data, "Rows in time order").

:func:`time_value` reads a time cell (an ISO 8601 date or date and time, or a number such as
a day index or a Unix time); :func:`split_by_time` puts the earliest rows in train, the next
in val and the latest in test, every time in one split, and makes the data card's ``time``.
"""

from __future__ import annotations

import datetime as dt
import math

import numpy as np

from tasks.sources.common import DataError
from tasks.sources.splits import SPLITS, stratified_split

DATE, NUMBER = "date", "number"
_DAY = 86_400.0


def time_value(cell: str, column: str, shown: str, line: int, time_format: str | None = None) -> tuple[float, str]:
    """A time cell as a number (dates: seconds since 1970 in UTC; a date or time without a
    zone is read as UTC) and its kind (:data:`DATE` or :data:`NUMBER`). ``time_format``
    (``prepare.csv_time_format``, a ``strptime`` format such as ``%d/%m/%Y``): how every cell
    is written, where it is no ISO 8601 date or number."""
    text = cell.strip()
    if not text:
        raise DataError(f"{shown}: line {line}, column {column!r}: empty time (prepare.csv_time_column: every row says "
                        "when it was observed)")
    if time_format is not None:
        try:
            return _utc_seconds(dt.datetime.strptime(text, time_format)), DATE
        except ValueError:
            raise DataError(f"{shown}: line {line}, column {column!r}: {text!r} is no time written as "
                            f"prepare.csv_time_format {time_format!r}") from None
    try:
        number = float(text)
    except ValueError:
        pass
    else:
        if math.isfinite(number):
            return number, NUMBER
    try:
        moment = dt.datetime.fromisoformat(text)
    except ValueError:
        raise DataError(f"{shown}: line {line}, column {column!r}: not a time: {text!r} (prepare.csv_time_column "
                        "reads ISO 8601 dates and times such as 2024-03-04 or 2024-03-04T10:15:00, or numbers such "
                        "as a day index or a Unix time; prepare.csv_time_format reads another layout, e.g. "
                        "'%d/%m/%Y' or '%m/%d/%Y %H:%M')") from None
    return _utc_seconds(moment), DATE


def _utc_seconds(moment: dt.datetime) -> float:
    """Seconds since 1970; a moment without a zone is read as UTC."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.timezone.utc)
    return moment.timestamp()


def time_text(value: float, kind: str, dates_only: bool) -> str:
    """A time as the card and the log write it: ``2024-03-04`` (dates without a time of day),
    ``2024-03-04T10:15:00+00:00``, or the number."""
    if kind == NUMBER:  # every digit of a Unix time, not 1.70955e+09
        return f"{value:.15g}"
    moment = dt.datetime.fromtimestamp(value, dt.timezone.utc)
    return moment.date().isoformat() if dates_only else moment.isoformat()


def split_by_time(
    times: np.ndarray, kind: str, y: np.ndarray, class_names: tuple[str, ...], column: str, val_fraction: float,
    test_fraction: float, seed: int, shown: str,
) -> tuple[dict[str, np.ndarray], dict]:
    """The prepare stage's split where ``column`` says when each row was observed
    (``prepare.csv_time_column``): the earliest rows in train, the next ``val_fraction`` in
    val, the latest ``test_fraction`` in test, every time in one split (a time the cut
    falls on goes to the later split; within a split the order is shuffled with ``seed``);
    and the data card's ``time``. Refused where a split would miss a class."""
    order = np.argsort(times, kind="stable")
    ordered = times[order]
    n = len(times)
    # 1e-9: as stratified_split, 20 * 0.15 is 3. A cut inside a run of equal times moves to its start.
    test_at = _cut(ordered, n - math.floor(n * test_fraction + 1e-9))
    val_at = _cut(ordered, test_at - math.floor(n * val_fraction + 1e-9))
    if val_at == 0 or val_at == test_at or test_at == n:
        raise DataError(f"{shown}: prepare.csv_time_column {column!r}: {len(np.unique(times))} distinct times for "
                        f"{n} rows cannot make train, val and test splits in time order (val_fraction={val_fraction}, "
                        f"test_fraction={test_fraction})")
    rng = np.random.default_rng(seed)
    index = {"train": rng.permutation(order[:val_at]), "val": rng.permutation(order[val_at:test_at]),
             "test": rng.permutation(order[test_at:])}
    dates_only = kind == DATE and bool(np.all(np.mod(times, _DAY) == 0))
    _check_classes(index, times, kind, dates_only, y, class_names, column, shown)
    # what a random split (stratified, as without the column) would have trained on from the test period
    random = stratified_split(y, len(class_names), val_fraction, test_fraction, seed)
    test_start = ordered[test_at]
    card = {"column": column, "kind": kind, "rows": n, "splits": {
        split: {"rows": int(len(index[split])), "first": time_text(float(times[index[split]].min()), kind, dates_only),
                "last": time_text(float(times[index[split]].max()), kind, dates_only)} for split in SPLITS},
        # training rows observed in the test split's period: none here, and in a random split
        "train_rows_from_test_period": {"time": 0, "random": int((times[random["train"]] >= test_start).sum())}}
    return index, card


def _cut(ordered: np.ndarray, at: int) -> int:
    """Where a split starts that would start at ``at`` in the sorted times, moved back to the
    first row of the time ``at`` falls on (so that no time is in two splits)."""
    if at <= 0 or at >= len(ordered):
        return min(max(at, 0), len(ordered))
    return int(np.searchsorted(ordered, ordered[at], side="left"))


def _check_classes(index: dict[str, np.ndarray], times: np.ndarray, kind: str, dates_only: bool, y: np.ndarray,
                   class_names: tuple[str, ...], column: str, shown: str) -> None:
    """Every class in every split: a model cannot learn a class train lacks, nor be measured on one test lacks."""
    for split in SPLITS:
        counts = np.bincount(y[index[split]], minlength=len(class_names))
        for label in np.flatnonzero(counts == 0):
            rows = np.flatnonzero(y == label)
            first, last = (time_text(float(f(times[rows])), kind, dates_only) for f in (np.min, np.max))
            raise DataError(
                f"{shown}: class {class_names[label]!r} has no rows in the {split} split of a split in time order "
                f"(prepare.csv_time_column {column!r}: its {len(rows)} rows are from {first} to {last}; the {split} "
                f"split holds {time_text(float(times[index[split]].min()), kind, dates_only)} to "
                f"{time_text(float(times[index[split]].max()), kind, dates_only)}); every class needs rows in train, "
                "val and test: other fractions, or rows of that class in every period")


def time_line(entry: dict) -> str:
    """The prepare stage's log line for the card's ``time``."""
    column, parts = entry["column"], entry["splits"]
    spans = " / ".join(f"{split} {parts[split]['first']} to {parts[split]['last']} ({parts[split]['rows']:,} rows)"
                       for split in SPLITS)
    return (f"time: {entry['rows']:,} rows split in {column!r} order (prepare.csv_time_column): {spans}; test holds "
            f"only rows later than every training row; a random split would have trained on "
            f"{entry['train_rows_from_test_period']['random']:,} rows from the test period")
