"""NumPy ``.npz`` archives and CSV files with a label column."""

from __future__ import annotations

import csv
import logging
import math
import re
import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tasks.core.categories import CategoricalColumn, category_text
from tasks.sources.common import (
    MISSING_HINT, MISSING_MARKERS, DataError, RawData, check_dataset, column_labels, csv_records, integer_labels,
    require_file, require_finite, string_labels,
)
from tasks.sources.time_split import time_value


logger = logging.getLogger(__name__)

_INTEGER = re.compile(r"\s*[+-]?\d+\s*")  # a value written as an integer (pandas: int64)


# A 4-D npz keeps its channels first (N, C, H, W: torch) or last (N, H, W, C: PIL, Keras,
# TensorFlow Datasets). prepare.npz_channels auto takes them last where the last axis has at
# most this many entries and the second more (RGB, RGBA, grey); any other shape stays first.
MAX_CHANNELS = 4


def channels_last(shape: Sequence[int], setting: str) -> bool:
    """Whether a 4-D array of ``shape`` (N, A, B, C) keeps its channels last, by ``setting``
    (``prepare.npz_channels``: ``first``, ``last``, or ``auto``: C at most :data:`MAX_CHANNELS`
    and A more). Any other number of axes has no channels to move."""
    if len(shape) != 4 or setting == "first":
        return False
    return setting == "last" or shape[3] <= MAX_CHANNELS < shape[1]


def npz_channels_line(channels: dict[str, Any]) -> str:
    """The prepare stage's line for the data card's ``npz_channels``: what the 4-D array's
    samples were read as and why, and the setting that reads them the other way."""
    a, b, c = channels["file_shape"]
    setting = channels["setting"]
    if channels["channels"] == "last":
        why = f": its last axis has at most {MAX_CHANNELS} entries, its second more" if setting == "auto" else ""
        return (f"channels last: the file's ({a}, {b}, {c}) samples are {c}-channel {a}x{b} images (prepare.npz_channels "
                f"{setting}{why}); the registered model takes them as the file holds them; "
                f"prepare.npz_channels=first reads them as {a} channels of {b}x{c}")
    why = ""
    if setting == "auto":
        why = (f": its last axis has more than {MAX_CHANNELS} entries" if c > MAX_CHANNELS else
               f": its second axis has at most {MAX_CHANNELS} entries too")
    return (f"channels first: the file's ({a}, {b}, {c}) samples are {a}-channel {b}x{c} images (prepare.npz_channels "
            f"{setting}{why}); prepare.npz_channels=last reads them as {c} channels of {a}x{b}")


def read_npz(path: Path, shown: str, inputs: str, labels: str, missing: bool = False,
             channels: str = "auto") -> RawData:
    """NPZ arrays: 2-D inputs are tabular, 3-D become (N, 1, H, W), 4-D become NCHW (channels
    moved first where :func:`channels_last` says, by ``channels``: ``prepare.npz_channels``).
    ``missing``: NaN in rows of features is a missing value (the prepare stage fills it)."""
    require_file(path, shown)
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zlib.error, zipfile.BadZipFile) as err:
        # np.load raises ValueError for bytes that are neither .npy nor .npz (pickle refused).
        raise DataError(f"{shown}: cannot read as NPZ: {err}") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DataError(f"{shown}: a single .npy array, not an NPZ archive of {inputs!r} and {labels!r}")
    with archive:
        for key in (inputs, labels):
            if key not in archive.files:
                found = ", ".join(sorted(archive.files)) or "none"
                raise DataError(f"{shown}: no array named {key!r} (arrays: {found})")
        try:
            x_raw = archive[inputs]
            y_raw = archive[labels]
        except (OSError, ValueError, EOFError, zlib.error, zipfile.BadZipFile) as err:
            raise DataError(f"{shown}: cannot read as NPZ: {err}") from None
    if x_raw.dtype.kind not in "biuf":
        raise DataError(f"{shown}: array {inputs!r} has dtype {x_raw.dtype}; expected numbers")
    if x_raw.dtype.kind == "f" and x_raw.ndim >= 1:
        require_finite(x_raw, shown, f"array {inputs!r}", missing and x_raw.ndim == 2)  # the index is the file's
    channel_added = x_raw.ndim == 3
    if channel_added:
        x_raw = x_raw[:, None, :, :]
    elif x_raw.ndim not in (2, 4):
        raise DataError(
            f"{shown}: array {inputs!r} has shape {x_raw.shape}; expected 2-D (N, features), "
            "3-D (N, H, W) or 4-D (N, C, H, W) / (N, H, W, C)"
        )
    moved = not channel_added and channels_last(x_raw.shape, channels)
    if moved:
        x_raw = x_raw.transpose(0, 3, 1, 2)  # made contiguous with the float32 copy below
    if y_raw.ndim == 2 and y_raw.shape[1] == 1:
        y_raw = y_raw[:, 0]
    elif y_raw.ndim == 2 and y_raw.dtype.kind in "biuf":
        y_raw = one_hot_indices(y_raw, shown, labels)
    if y_raw.ndim != 1:
        raise DataError(f"{shown}: array {labels!r} has shape {y_raw.shape}; expected 1-D labels")
    if len(x_raw) != len(y_raw):
        raise DataError(f"{shown}: array {inputs!r} has {len(x_raw)} samples but {labels!r} has {len(y_raw)} labels")
    if y_raw.dtype.kind in "US":
        y, class_names = string_labels(y_raw)
    else:
        y, class_names = integer_labels(y_raw, shown, f"array {labels!r}")
    integer_features = tuple(range(x_raw.shape[1])) if x_raw.ndim == 2 and x_raw.dtype.kind in "biu" else ()
    x = np.ascontiguousarray(x_raw, dtype=np.float32)
    # Checked again only where the conversion can overflow: float64 beyond float32's range -> inf.
    overflow = x_raw.dtype.kind == "f" and x_raw.dtype.itemsize > 4
    return check_dataset(RawData(x, y, class_names, integer_features=integer_features, channel_added=channel_added,
                                 channels_last=moved), shown, check_finite=overflow, missing=missing and x.ndim == 2)


def one_hot_indices(labels: np.ndarray, shown: str, name: str) -> np.ndarray:
    """One-hot label rows ``(N, K)`` (what ``keras.utils.to_categorical`` writes) -> the class
    index of each row, 0..K-1. Refused, naming the first row that is not one-hot: values other
    than 0 and 1 (soft labels), a row with no class or with several (multi-label)."""
    values = labels.astype(np.float64, copy=False)
    if not ((values == 0) | (values == 1)).all():
        row, column = (int(i) for i in np.argwhere((values != 0) & (values != 1))[0])
        raise DataError(f"{shown}: array {name!r} has shape {labels.shape} and {name}[{row}, {column}] = "
                        f"{labels[row, column]}; expected 1-D labels or one-hot rows (one 1, the rest 0)")
    counts = (values == 1).sum(axis=1)
    if (counts != 1).any():
        row = int(np.flatnonzero(counts != 1)[0])
        what = "no class" if counts[row] == 0 else f"{int(counts[row])} classes (multi-label)"
        raise DataError(f"{shown}: array {name!r}: one-hot row {row} has {what}; a model here predicts one "
                        "class per sample: expected one 1 per row")
    logger.info("%s: array %r %s: one-hot rows, each read as the index of its 1 (a label 0..%d)", shown, name,
                labels.shape, labels.shape[1] - 1)
    return values.argmax(axis=1)


def npz_input_shape(path: Path, inputs: str, channels: str = "auto") -> tuple[int, ...] | None:
    """The shape one sample of ``path``'s ``inputs`` array will have once prepared (3-D
    arrays gain a channel, 4-D ones have their channels first: ``channels``, as
    :func:`read_npz`), from the array's header alone: what a pipeline can check before any
    stage runs. None when the file or the array cannot be read (``prepare`` says why)."""
    from numpy.lib import format as npy

    try:
        with zipfile.ZipFile(path) as archive, archive.open(f"{inputs}.npy") as member:
            version = npy.read_magic(member)
            shape, _, _ = npy.read_array_header_2_0(member) if version == (2, 0) else npy.read_array_header_1_0(member)
    except (OSError, KeyError, ValueError, EOFError, zlib.error, zipfile.BadZipFile):
        return None
    if channels_last(shape, channels):
        return (shape[3], shape[1], shape[2])
    return {2: shape[1:], 3: (1, *shape[1:]), 4: shape[1:]}.get(len(shape))


# A categorical column with more values than this is refused (an id, a free-text field).
MAX_CATEGORIES = 256


def read_csv(path: Path, shown: str, label_column: str, ignore_columns: Sequence[str] = (),
             missing: bool = False, categorical_columns: Sequence[str] = (), group_column: str | None = None,
             time_column: str | None = None, time_format: str | None = None) -> RawData:
    """A CSV with a header row: every column but ``label_column`` and ``ignore_columns`` (an
    id, a free-text note) is a numeric feature, named as in the header (the registered
    model's column names); a column of ``categorical_columns`` holds categories instead
    (words or codes), one 0/1 feature per category. An empty cell or ``NA``, ``NaN``,
    ``null``... (what pandas reads as missing: :data:`MISSING_MARKERS`) is a missing value:
    NaN with ``missing`` (in a categorical column: no category), else refused.

    Labels that are exactly the integers 0..K-1 are class indices (names '0'..'K-1'); other
    integers (1..K, -1/1) are class names in numeric order; any other labels are class names,
    sorted. ``group_column`` (not a feature): each row's group, kept as ``groups``;
    ``time_column`` (not a feature): when each row was observed, kept as ``times``
    (:func:`tasks.sources.time_split.time_value`, every cell as ``time_format`` where it is
    given; one kind, dates or numbers, in a column).
    """
    require_file(path, shown)
    rows: list[list[float]] = []
    labels: list[str] = []
    groups: list[str] = []
    times: list[float] = []
    time_kind = ""
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            if header is None:
                raise DataError(f"{shown}: empty file; expected a header row")
            header = [name.strip() for name in header]
            group_at = None if group_column is None else _column_no_feature(
                header, group_column, "csv_group_column", "group", label_column, categorical_columns, shown)
            time_at = None if time_column is None else _column_no_feature(
                header, time_column, "csv_time_column", "time", label_column, categorical_columns, shown)
            left_out = [*ignore_columns, *(column for column in (group_column, time_column)
                                           if column and column not in ignore_columns)]
            label_at, features = _feature_columns(header, label_column, left_out, shown, categorical_columns)
            numeric = [i for i in features if header[i] not in categorical_columns]
            numeric_names = tuple(header[i] for i in numeric)
            cells: dict[str, list[str | None]] = {name: [] for name in categorical_columns}
            categorical_at = [(header.index(name), cells[name]) for name in categorical_columns]
            integers = set(range(len(numeric)))  # the features every value so far was written as an integer
            for line, fields in csv_records(reader, len(header), shown):
                label = fields[label_at].strip()
                if not label:
                    raise DataError(f"{shown}: line {line}, column {label_column!r}: empty label")
                values = [fields[i] for i in numeric]
                rows.append(_parse_floats(values, numeric_names, shown, line, missing))
                labels.append(label)
                if group_at is not None:
                    if not (group := fields[group_at].strip()):
                        raise DataError(f"{shown}: line {line}, column {group_column!r}: empty group "
                                        "(prepare.csv_group_column: every row names its group)")
                    groups.append(group)
                if time_at is not None:
                    value, kind = time_value(fields[time_at], header[time_at], shown, line, time_format)
                    if time_kind and kind != time_kind:
                        raise DataError(f"{shown}: line {line}, column {time_column!r}: {fields[time_at].strip()!r} is "
                                        f"a {kind}, but the rows before hold {time_kind}s (prepare.csv_time_column: "
                                        "one kind of time in a column)")
                    times.append(value)
                    time_kind = kind
                integers.difference_update([j for j in integers if not _INTEGER.fullmatch(values[j])])
                for at, column in categorical_at:
                    column.append(_category_cell(fields[at], header[at], shown, line, missing))
    except DataError:
        raise
    except UnicodeDecodeError as err:
        raise DataError(f"{shown}: not UTF-8 text: {err}") from None
    except (OSError, csv.Error) as err:
        raise DataError(f"{shown}: cannot read as CSV: {err}") from None
    if not rows:
        raise DataError(f"{shown}: header only; no data rows")
    y, class_names = column_labels(labels)
    numbers = np.array(rows, dtype=np.float32).reshape(len(rows), len(numeric))
    kept = {"groups": None if group_at is None else np.array(groups, dtype=object),
            "times": None if time_at is None else np.array(times, dtype=np.float64), "time_kind": time_kind}
    if not categorical_columns:
        return check_dataset(RawData(numbers, y, class_names, numeric_names, tuple(sorted(integers)), **kept),
                             shown, missing=missing)
    x, *columns = _with_categories(header, features, numbers, tuple(numeric[j] for j in sorted(integers)), cells, shown)
    return check_dataset(RawData(x, y, class_names, *columns, **kept), shown, missing=missing)


def _column_no_feature(header: list[str], column: str, key: str, what: str, label_column: str,
                       categorical_columns: Sequence[str], shown: str) -> int:
    """The position in ``header`` of a column that is no feature (``prepare.<key>``: the
    group or the time column); refused where it is missing, the label or a feature of categories."""
    _require_column(header, column, key, shown)
    if column == label_column or column in categorical_columns:
        raise DataError(f"{shown}: prepare.{key}: {column!r} is the label column or a categorical feature "
                        f"(csv_label_column, csv_categorical_columns); a {what} column is no feature")
    return header.index(column)


def _with_categories(header: list[str], features: list[int], numbers: np.ndarray, integer_columns: tuple[int, ...],
                     cells: dict[str, list[str | None]], shown: str) -> tuple[Any, ...]:
    """The model's features of a CSV with categorical columns (``cells``: their text by
    column): the raw columns in the file's order, a number column as it is (``numbers``:
    those columns' values; ``integer_columns``: the header positions written as integers),
    a categorical column as one 0/1 feature per category. Returns ``x``, then what
    :class:`RawData` holds after the labels: feature names, integer features, the raw
    columns, the categorical columns."""
    columns = {}
    for name in cells:
        columns[name], cells[name] = _categorical_column(name, cells[name], shown)
    parts, feature_names, integer_features = [], [], []
    numeric = [i for i in features if header[i] not in columns]
    for i in features:  # the raw columns in the file's order, each as its model features
        name = header[i]
        if name in columns:
            parts.append(columns[name].one_hot(cells[name]))
            feature_names += columns[name].features()
        else:
            if i in integer_columns:
                integer_features.append(len(feature_names))
            j = numeric.index(i)
            parts.append(numbers[:, j : j + 1])
            feature_names.append(name)
    x = np.ascontiguousarray(np.hstack(parts), dtype=np.float32)
    return (x, tuple(feature_names), tuple(integer_features), tuple(header[i] for i in features),
            tuple(columns.values()))


def _category_cell(field: str, name: str, shown: str, line: int, missing: bool) -> str | None:
    text = field.strip()
    return None if _is_gap(text, name, shown, line, missing) else text


def _is_gap(text: str, name: str, shown: str, line: int, missing: bool) -> bool:
    """Whether a cell's (stripped) ``text`` is a missing value; refused, naming its place and
    the setting, unless ``missing`` allows gaps."""
    if text not in MISSING_MARKERS:
        return False
    if not missing:
        raise DataError(f"{shown}: line {line}, column {name!r}: a missing value ({text!r}); {MISSING_HINT}")
    return True


def _categorical_column(name: str, cells: list[str | None], shown: str) -> tuple[CategoricalColumn, list[str | None]]:
    """A categorical column's values, sorted (numeric codes in numeric order), the type pandas
    reads it as (long: integer codes, no gap; double: numbers with a gap or a fraction;
    else string), and its cells as those values (``03`` and ``3.0`` are the code ``3``)."""
    present = {v for v in cells if v is not None}
    if not present:
        raise DataError(f"{shown}: categorical column {name!r} has no value")
    try:
        numbers = {v: float(v) for v in present}
    except ValueError:
        numbers = None
    if numbers is not None and all(math.isfinite(n) for n in numbers.values()):
        dtype = "long" if all(_INTEGER.fullmatch(v) for v in present) and None not in cells else "double"
        as_text = {v: category_text(n) for v, n in numbers.items()}
        values = [category_text(n) for n in sorted(set(numbers.values()))]
        cells = [as_text[v] if v is not None else None for v in cells]
    else:
        dtype, values = "string", sorted(present)
    if len(values) > MAX_CATEGORIES:
        raise DataError(f"{shown}: categorical column {name!r} has {len(values)} categories (at most {MAX_CATEGORIES}: "
                        "one feature each); an id or free text? leave it out with prepare.csv_ignore_columns")
    return CategoricalColumn(name, tuple(values), dtype), cells


def _require_column(header: list[str], name: str, key: str, shown: str) -> None:
    """Refuse the setting ``prepare.<key>`` naming a column ``name`` the header lacks."""
    if name not in header:
        raise DataError(f"{shown}: prepare.{key}: no column {name!r} in the header (columns: {', '.join(header)})")


def _feature_columns(header: list[str], label_column: str, ignore_columns: Sequence[str],
                     shown: str, categorical_columns: Sequence[str] = ()) -> tuple[int, list[int]]:
    """The label's position and the features' positions in ``header``; refused in one line:
    a missing label column, an ignored or categorical column not in the header (or the
    label, or both), a feature column with no name or the name of another (a model's column
    names are its contract)."""
    for name in categorical_columns:
        _require_column(header, name, "csv_categorical_columns", shown)
        if name == label_column or name in ignore_columns:
            raise DataError(f"{shown}: prepare.csv_categorical_columns: {name!r} is the label column or left out "
                            "(csv_label_column, csv_ignore_columns)")
    if label_column not in header:
        separator = next((mark for mark in (";", "\t", "|") if len(header) == 1 and mark in header[0]), None)
        hint = (f"; the header is one column holding {separator!r}: the file is separated by {separator!r}, and a csv "
                "here is comma-separated (save it as CSV with commas and '.' decimals)" if separator else "")
        raise DataError(f"{shown}: no label column {label_column!r} in the header (columns: {', '.join(header)}){hint}")
    for name in ignore_columns:
        _require_column(header, name, "csv_ignore_columns", shown)
    if label_column in ignore_columns:
        raise DataError(f"{shown}: prepare.csv_ignore_columns: {label_column!r} is the label column (csv_label_column)")
    label_at = header.index(label_column)
    features = [i for i, name in enumerate(header) if i != label_at and name not in ignore_columns]
    if not features:
        raise DataError(f"{shown}: no feature columns besides the label column {label_column!r}"
                        + (" and the ignored ones" if ignore_columns else ""))
    seen: dict[str, int] = {}
    for i in features:
        name = header[i]
        if not name:
            raise DataError(f"{shown}: column {i + 1} of the header has no name (a DataFrame's index, written by "
                            "to_csv()?): name it, or write the file with index=False; the registered model takes "
                            "its columns by name")
        if name in seen:
            raise DataError(f"{shown}: the header names {name!r} twice (columns {seen[name] + 1} and {i + 1}); the "
                            "registered model takes its columns by name")
        seen[name] = i
    return label_at, features


def _parse_floats(fields: list[str], names: Sequence[str], shown: str, line: int, missing: bool) -> list[float]:
    try:
        values = [float(f) for f in fields]
        if all(math.isfinite(v) for v in values):
            return values
    except ValueError:
        pass
    # Slow path only on a row with a gap or a bad value: fill the gaps, or find the column to name.
    values = []
    for name, field in zip(names, fields):
        if _is_gap(field.strip(), name, shown, line, missing):
            values.append(math.nan)
            continue
        try:
            value = float(field)
        except ValueError:
            raise DataError(f"{shown}: line {line}, column {name!r}: not a number: {field.strip()!r} "
                            f"({_not_a_number_hint(field, name)})") from None
        if not math.isfinite(value):
            raise DataError(f"{shown}: line {line}, column {name!r}: {field.strip()!r} is not a finite number")
        values.append(value)
    return values


def _not_a_number_hint(field: str, column: str) -> str:
    """What to do with a feature column whose ``field`` is not a number: a date or time has a
    setting of its own; any other text is a category, or no feature."""
    try:
        time_value(field, column, "", 0)
    except DataError:
        return ("a column of categories goes in prepare.csv_categorical_columns; prepare.csv_ignore_columns leaves "
                "one out; prepare.csv_group_column names whom each row belongs to")
    return (f"a date or time: prepare.csv_time_column: {column} splits the rows in its order, the latest rows the "
            "test split; prepare.csv_ignore_columns leaves it out")
