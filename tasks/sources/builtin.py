"""The data sets that ship with scikit-learn (the embedded default needs no files)."""

from __future__ import annotations

import io

import numpy as np

from tasks.sources.common import DataError, RawData, check_dataset


def load_sklearn(name: str) -> RawData:
    """scikit-learn's bundled ``digits`` (images (1, 8, 8), values 0..16) or ``breast_cancer`` (30 features)."""
    from sklearn import datasets

    if name == "digits":
        bunch = datasets.load_digits()
        x = bunch.images.astype(np.float32)[:, None, :, :]
    elif name == "breast_cancer":
        bunch = datasets.load_breast_cancer()
        x = bunch.data.astype(np.float32)
    else:
        raise DataError(f"sklearn:{name}: unknown built-in data set; expected digits or breast_cancer")
    names = tuple(str(n) for n in bunch.target_names)
    return check_dataset(RawData(np.ascontiguousarray(x), bunch.target.astype(np.int64), names), f"sklearn:{name}")


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
