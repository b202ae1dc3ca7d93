"""What every reader returns (:class:`RawData`), the error it raises (:class:`DataError`),
and the checks made on any data set before anything is written."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from tasks.core.categories import CategoricalColumn


class DataError(ValueError):
    """Raw data is missing or invalid; the message names the file and the problem."""


def csv_records(reader: Any, width: int, shown: str) -> Iterator[tuple[int, list[str]]]:
    """The rows of a ``csv.reader`` past its header, with their line numbers: blank lines are
    skipped, a row of another number of fields than ``width`` is refused naming its line."""
    for fields in reader:
        line = reader.line_num
        if not fields or (len(fields) == 1 and not fields[0].strip()):
            continue  # blank line
        if len(fields) != width:
            raise DataError(f"{shown}: line {line}: expected {width} fields, found {len(fields)}")
        yield line, fields


def class_folders(folder: Path, shown: str, source: str) -> list[Path]:
    """The class sub-folders of ``folder`` (hidden ones left out), sorted; refused in one line
    when the folder is missing, is a file, or holds none."""
    if not folder.exists():
        raise DataError(f"{shown}: folder not found")
    if not folder.is_dir():
        raise DataError(f"{shown}: not a folder; source {source} expects one sub-folder per class")
    class_dirs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise DataError(f"{shown}: no class sub-folders")
    return class_dirs


@dataclass(frozen=True)
class RawData:
    """What every reader returns; unpacks as ``x, y, class_names``."""

    x: np.ndarray  # float32, (N, features) or (N, C, H, W), raw values
    y: np.ndarray  # int64 class indices 0..K-1
    class_names: tuple[str, ...]
    # Rows of features whose file names its columns (a CSV's header): one name per feature.
    feature_names: tuple[str, ...] = ()
    # Rows of features: those whose every value is written as an integer (what pandas reads
    # as int64, and so a client's DataFrame of the same file brings).
    integer_features: tuple[int, ...] = ()
    # Rows with categorical columns: the raw columns in order, and those of categories (each
    # stored as one 0/1 feature per category; feature_names then names the features).
    columns: tuple[str, ...] = ()
    categorical: tuple[CategoricalColumn, ...] = ()
    # x gained a channel the file's samples lack: an IDX's or a 3-D npz's (A, B) are (1, A, B)
    # here; the registered model takes them as the file holds them. A 3-D npz holds images
    # (H, W) or sequences (T, F) (prepare.npz_layout decides).
    channel_added: bool = False
    # x's channels were the file's last axis: a 4-D npz's (H, W, C) are (C, H, W) here
    # (prepare.npz_channels); the registered model takes them as the file holds them.
    channels_last: bool = False
    # A CSV's group column (prepare.csv_group_column): each row's group, as written; None: none.
    groups: np.ndarray | None = None
    # A CSV's time column (prepare.csv_time_column): when each row was observed (float64:
    # seconds since 1970 for dates, else the numbers), and time_kind "date" or "number"; None: none.
    times: np.ndarray | None = None
    time_kind: str = ""

    @property
    def file_shape(self) -> tuple[int, ...]:
        """One sample's shape as the file holds it (what the registered model takes)."""
        shape = tuple(int(d) for d in self.x.shape[1:])
        if self.channel_added:
            return shape[1:]
        return (*shape[1:], shape[0]) if self.channels_last else shape

    def __iter__(self) -> Iterator[Any]:
        return iter((self.x, self.y, self.class_names))


def require_file(path: Path, shown: str) -> None:
    if not path.exists():
        raise DataError(f"{shown}: file not found")
    if not path.is_file():
        raise DataError(f"{shown}: not a file")
    if not os.access(path, os.R_OK):
        raise DataError(f"{shown}: file is not readable (permission denied)")


# What pandas reads as a missing value by default (``read_csv``'s ``na_values``), so a model
# reads a CSV's gaps as its clients' DataFrames of the same file hold them.
MISSING_MARKERS = frozenset({"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN",
                             "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"})
MISSING_HINT = "prepare.missing_values=median fills missing values with the train split's median"


def require_finite(x: np.ndarray, shown: str, what: str, missing: bool = False) -> None:
    """Raise on the first NaN/inf (``missing``: on the first inf, NaN is a missing value);
    chunked so a large array needs no full-size bool copy."""
    rows = max(1, (1 << 22) // max(1, int(np.prod(x.shape[1:], dtype=np.int64))))
    for start in range(0, len(x), rows):
        block = x[start : start + rows]
        bad = np.isinf(block) if missing else ~np.isfinite(block)
        if bad.any():
            where = np.argwhere(bad)[0]
            index = (start + int(where[0]), *(int(i) for i in where[1:]))
            value = block[tuple(where)]
            hint = f" ({MISSING_HINT})" if np.isnan(value) and x.ndim == 2 else ""  # rows of features only
            raise DataError(f"{shown}: {what} has a non-finite value ({value}) at index {list(index)}{hint}")


def integer_labels(labels: np.ndarray, shown: str, what: str) -> tuple[np.ndarray, tuple[str, ...]]:
    """Integer labels -> (int64 class indices, class names); rejects fractions.

    Labels that are exactly 0..K-1 are the indices themselves (names '0'..'K-1'). Any other
    integers - 1..K, -1/1, codes with gaps - are class names in numeric order ('-1', '1'), as
    strings are: the model predicts the index of a name (``preprocess.json``'s ``class_names``).
    """
    if labels.dtype.kind == "b":
        labels = labels.astype(np.int64)
    if labels.dtype.kind == "f":
        bad = ~np.isfinite(labels) | (labels != np.round(labels))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise DataError(f"{shown}: {what}[{i}] = {labels[i]} is not an integer class label")
    elif labels.dtype.kind not in "iu":
        raise DataError(f"{shown}: {what} has dtype {labels.dtype}; expected integer class labels or strings")
    if labels.size == 0:
        raise DataError(f"{shown}: {what} is empty")
    return _numbered(labels.astype(np.int64))


def column_labels(labels: list[str]) -> tuple[np.ndarray, tuple[str, ...]]:
    """A text column's labels: all integers are read as :func:`integer_labels` reads them;
    otherwise they are class names, sorted."""
    try:
        values = np.array([int(v) for v in labels], dtype=np.int64)
    except (ValueError, OverflowError):
        return string_labels(np.array(labels))
    return _numbered(values)


def _numbered(values: np.ndarray) -> tuple[np.ndarray, tuple[str, ...]]:
    """int64 labels -> (indices into their distinct values in numeric order, those values as names)."""
    distinct, indices = np.unique(values, return_inverse=True)
    return indices.astype(np.int64).ravel(), tuple(str(int(v)) for v in distinct)


def string_labels(labels: np.ndarray) -> tuple[np.ndarray, tuple[str, ...]]:
    """String labels -> (int64 indices into the sorted names, sorted names)."""
    names, y = np.unique(labels.astype(str), return_inverse=True)
    return y.astype(np.int64).ravel(), tuple(str(n) for n in names)


def check_dataset(raw: RawData, shown: str, check_finite: bool = True, labels_shown: str | None = None,
                  missing: bool = False) -> RawData:
    """Checks every reader's result: dtypes, shapes, counts, finite values (``missing``: NaN
    is a missing value, allowed), label range, >= 2 classes.

    ``labels_shown`` names the label file in label messages where labels have a file of their own.
    """
    x, y, names = raw
    if x.dtype != np.float32 or y.dtype != np.int64:
        raise TypeError(f"reader returned x {x.dtype} / y {y.dtype}; expected float32 / int64")
    if x.ndim not in (2, 4):
        raise DataError(f"{shown}: inputs have shape {x.shape}; expected (N, features) or (N, C, H, W)")
    if len(x) == 0:
        raise DataError(f"{shown}: contains no samples")
    if y.shape != (len(x),):
        raise DataError(f"{shown}: {len(x)} inputs but {len(y)} labels")
    if min(x.shape[1:]) == 0:
        raise DataError(f"{shown}: inputs have an empty dimension: shape {x.shape}")
    if check_finite:
        require_finite(x, shown, "inputs", missing)
    labels_shown = labels_shown or shown
    if y.min() < 0 or y.max() >= len(names):
        i = int(np.flatnonzero((y < 0) | (y >= len(names)))[0])
        raise DataError(f"{labels_shown}: label {y[i]} at index {i} is out of range 0..{len(names) - 1}")
    present = np.unique(y)
    if len(present) < 2:
        raise DataError(
            f"{labels_shown}: all {len(y)} samples belong to one class ({names[int(present[0])]!r}); "
            "need at least 2 classes"
        )
    return raw


def min_samples_per_class(val_fraction: float, test_fraction: float) -> int:
    """The smallest class that can give every split (train, val, test) at least one sample."""
    fractions = (1.0 - val_fraction - test_fraction, val_fraction, test_fraction)
    # 1e-9: 1 / 0.25 must be 4, not 4.000000000000001 -> 5.
    return max(3, *(math.ceil(1.0 / f - 1e-9) for f in fractions))


def _measured_quantity(class_names: tuple[str, ...]) -> str | None:
    """``e.g. '100240.55', '100871.2'`` where every class name is a number and some have a
    fraction (a price, a temperature read as labels), else None."""
    try:
        values = [float(name) for name in class_names]
    except ValueError:
        return None
    if all(math.isfinite(v) and v == round(v) for v in values) or not all(map(math.isfinite, values)):
        return None
    return "e.g. " + ", ".join(repr(name) for name in class_names[:2])


def check_splittable(
    y: np.ndarray, class_names: tuple[str, ...], val_fraction: float, test_fraction: float, shown: str
) -> None:
    """Every class must be large enough for a stratified train/val/test split."""
    need = min_samples_per_class(val_fraction, test_fraction)
    counts = np.bincount(y, minlength=len(class_names))
    small = np.flatnonzero(counts < need)
    if len(small) and (measured := _measured_quantity(class_names)):
        raise DataError(
            f"{shown}: the labels are {len(class_names)} distinct numbers with fractions ({measured}), "
            f"{len(small)} of them too rare to split: a quantity to predict (regression), not classes; slimflow "
            "trains classifiers: bin it into classes in the file (low / mid / high), or name the class column "
            "(prepare.csv_label_column)"
        )
    for index in small:
        raise DataError(
            f"{shown}: class {class_names[index]!r} has {int(counts[index])} samples; a stratified "
            f"train/val/test split with val_fraction={val_fraction} and test_fraction={test_fraction} "
            f"needs at least {need} per class"
        )
