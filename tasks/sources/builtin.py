"""The data sets that ship with scikit-learn (the embedded default needs no files).

They are read from the files scikit-learn ships them in (``sklearn/datasets/data/``), the
way its ``load_digits`` and ``load_breast_cancer`` read them, without importing
scikit-learn: that import (SciPy among it) was 1.0-1.2 CPU-s of the run's fork server, on
the critical path before torch (measured). Where the files are not where this version
of scikit-learn keeps them, its loaders are used.
"""

from __future__ import annotations

import csv
import gzip
import importlib.util
import io
from pathlib import Path

import numpy as np

from tasks.sources.common import DataError, RawData, check_dataset

BUILTIN = ("digits", "breast_cancer")


def load_sklearn(name: str) -> RawData:
    """scikit-learn's bundled ``digits`` (images (1, 8, 8), values 0..16) or ``breast_cancer`` (30 features)."""
    if name not in BUILTIN:
        raise DataError(f"sklearn:{name}: unknown built-in data set; expected digits or breast_cancer")
    folder = _sklearn_data_folder()
    if name == "digits" and folder and (folder / "digits.csv.gz").is_file():
        x, y, names = _read_digits(folder / "digits.csv.gz")
    elif name == "breast_cancer" and folder and (folder / "breast_cancer.csv").is_file():
        x, y, names = _read_breast_cancer(folder / "breast_cancer.csv")
    else:
        x, y, names = _load_with_sklearn(name)
    return check_dataset(RawData(np.ascontiguousarray(x), y, names), f"sklearn:{name}")


def _sklearn_data_folder() -> Path | None:
    """``sklearn/datasets/data`` of the installed scikit-learn, found without importing it."""
    spec = importlib.util.find_spec("sklearn")
    locations = list(spec.submodule_search_locations or []) if spec else []
    return Path(locations[0]) / "datasets" / "data" if locations else None


def _read_digits(path: Path) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """Rows of 64 pixel values then the label, as ``load_digits`` reads them."""
    with gzip.open(path, "rt") as handle:
        table = np.loadtxt(handle, delimiter=",")
    images = table[:, :-1].reshape(-1, 1, 8, 8).astype(np.float32)
    return images, table[:, -1].astype(np.int64), tuple(str(i) for i in range(10))


def _read_breast_cancer(path: Path) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """A header ``samples,features,<class names>``, then rows of features and the label,
    as ``load_breast_cancer`` reads them."""
    with open(path, newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader)
        samples, features = int(header[0]), int(header[1])
        rows = [row for row in reader if row]
    table = np.asarray(rows, dtype=np.float64)
    if table.shape != (samples, features + 1):
        raise DataError(f"{path}: expected {samples} rows of {features + 1} fields, found {table.shape}")
    return table[:, :-1].astype(np.float32), table[:, -1].astype(np.int64), tuple(header[2:])


def _load_with_sklearn(name: str) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    from sklearn import datasets

    if name == "digits":
        bunch = datasets.load_digits()
        x = bunch.images.astype(np.float32)[:, None, :, :]
    else:
        bunch = datasets.load_breast_cancer()
        x = bunch.data.astype(np.float32)
    return x, bunch.target.astype(np.int64), tuple(str(n) for n in bunch.target_names)


def sklearn_digest(raw: RawData) -> str:
    """Digest of a built-in set: md5 of ``np.save(x)`` followed by ``np.save(y)`` in one buffer.

    Built-in sets have no file to hash, so the canonical bytes are the arrays as
    returned (x float32, y int64) in ``.npy`` format, which is byte-deterministic.
    """
    import hashlib

    buffer = io.BytesIO()
    np.save(buffer, raw.x, allow_pickle=False)
    np.save(buffer, raw.y, allow_pickle=False)
    return hashlib.md5(buffer.getbuffer(), usedforsecurity=False).hexdigest()
