"""Readers for the raw data formats users bring, and the checks made before anything is written.

Every reader is a pure function that returns :class:`RawData` - ``x`` float32 of shape
``(N, features)`` or ``(N, C, H, W)``, ``y`` int64 class indices and the class names -
or raises :class:`DataError` with one message naming the file (and the line, column or
index where it applies) and the problem. Nothing here writes files.

Heavy imports (scikit-learn, Pillow, dvc-data) happen inside the functions that need
them so that ``python -m tasks.prepare`` starts quickly.
"""

from __future__ import annotations

import csv
import gzip
import io
import logging
import math
import os
import zipfile
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np

logger = logging.getLogger(__name__)

IDX_IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions (N, H, W)
IDX_LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension (N,)
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg"})
_GZIP_MAGIC = b"\x1f\x8b"
_CHUNK = 1 << 20


class DataError(ValueError):
    """Raw data is missing or invalid; the message names the file and the problem."""


class RawData(NamedTuple):
    """What every reader returns; unpacks as ``x, y, class_names``."""

    x: np.ndarray  # float32, (N, features) or (N, C, H, W), raw values
    y: np.ndarray  # int64 class indices 0..K-1
    class_names: tuple[str, ...]


# --------------------------------------------------------------------------- helpers


def _check_file(path: Path, shown: str) -> None:
    if not path.exists():
        raise DataError(f"{shown}: file not found")
    if not path.is_file():
        raise DataError(f"{shown}: not a file")
    if not os.access(path, os.R_OK):
        raise DataError(f"{shown}: file is not readable (permission denied)")


def _check_finite(x: np.ndarray, shown: str, what: str) -> None:
    """Raise on the first NaN/inf; chunked so a large array needs no full-size bool copy."""
    rows = max(1, (1 << 22) // max(1, int(np.prod(x.shape[1:], dtype=np.int64))))
    for start in range(0, len(x), rows):
        block = x[start : start + rows]
        if not np.isfinite(block).all():
            where = np.argwhere(~np.isfinite(block))[0]
            index = (start + int(where[0]), *(int(i) for i in where[1:]))
            value = block[tuple(where)]
            raise DataError(f"{shown}: {what} has a non-finite value ({value}) at index {list(index)}")


def _integer_labels(labels: np.ndarray, shown: str, what: str) -> tuple[np.ndarray, tuple[str, ...]]:
    """Integer class indices -> (int64 labels, names '0'..'K-1'); rejects negatives and fractions."""
    if labels.dtype.kind == "b":
        labels = labels.astype(np.int64)
    if labels.dtype.kind == "f":
        bad = ~np.isfinite(labels) | (labels != np.round(labels))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise DataError(f"{shown}: {what}[{i}] = {labels[i]} is not an integer class index")
    elif labels.dtype.kind not in "iu":
        raise DataError(f"{shown}: {what} has dtype {labels.dtype}; expected integer class indices or strings")
    if labels.size == 0:
        raise DataError(f"{shown}: {what} is empty")
    low, high = labels.min(), labels.max()
    if low < 0:
        i = int(np.argmin(labels))
        raise DataError(f"{shown}: {what}[{i}] = {labels[i]} is out of range; labels must be class indices >= 0")
    # Indices must be dense 0..K-1; a label beyond the sample count means most classes are empty.
    if high >= len(labels):
        i = int(np.argmax(labels))
        raise DataError(
            f"{shown}: {what}[{i}] = {labels[i]} is out of range; labels must be class indices "
            f"0..K-1 and there are only {len(labels)} samples"
        )
    return labels.astype(np.int64), tuple(str(i) for i in range(int(high) + 1))


def _string_labels(labels: np.ndarray) -> tuple[np.ndarray, tuple[str, ...]]:
    """String labels -> (int64 indices into the sorted names, sorted names)."""
    names, y = np.unique(labels.astype(str), return_inverse=True)
    return y.astype(np.int64).ravel(), tuple(str(n) for n in names)


def check_dataset(raw: RawData, shown: str, check_finite: bool = True, labels_shown: str | None = None) -> RawData:
    """Checks every reader's result: dtypes, shapes, counts, finite values, label range, >= 2 classes.

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
        _check_finite(x, shown, "inputs")
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


def check_splittable(
    y: np.ndarray, class_names: tuple[str, ...], val_fraction: float, test_fraction: float, shown: str
) -> None:
    """Every class must be large enough for a stratified train/val/test split."""
    need = min_samples_per_class(val_fraction, test_fraction)
    counts = np.bincount(y, minlength=len(class_names))
    for index in np.flatnonzero(counts < need):
        raise DataError(
            f"{shown}: class {class_names[index]!r} has {int(counts[index])} samples; a stratified "
            f"train/val/test split with val_fraction={val_fraction} and test_fraction={test_fraction} "
            f"needs at least {need} per class"
        )


# --------------------------------------------------------------------------- built-in


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


# --------------------------------------------------------------------------- IDX


def _is_gzip(path: Path) -> bool:
    if path.suffix == ".gz":
        return True
    with open(path, "rb") as handle:
        return handle.read(2) == _GZIP_MAGIC


def _parse_idx_header(head: bytes, shown: str, magic: int, what: str) -> tuple[int, ...]:
    ndim = magic & 0xFF
    size = 4 + 4 * ndim
    if len(head) < 4:
        raise DataError(f"{shown}: too short for an IDX header ({len(head)} bytes)")
    found = int.from_bytes(head[:4], "big")
    if head[:2] != b"\x00\x00" or head[3] != ndim:
        raise DataError(
            f"{shown}: not an IDX {what} file: magic number 0x{found:08x}, expected 0x{magic:08x}"
        )
    if head[2] != 0x08:
        raise DataError(
            f"{shown}: IDX data type 0x{head[2]:02x} is not supported; expected 0x08 (unsigned byte), "
            f"magic number 0x{found:08x}"
        )
    if len(head) < size:
        raise DataError(f"{shown}: truncated IDX header: expected {size} bytes, found {len(head)}")
    dims = tuple(int.from_bytes(head[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if 0 in dims:
        raise DataError(f"{shown}: IDX header has an empty dimension: {'x'.join(map(str, dims))}")
    return dims


def _open_idx(path: Path, shown: str, magic: int, what: str) -> tuple[tuple[int, ...], bool]:
    """Validate the file and its header; returns (dims, gzipped) without reading the data."""
    _check_file(path, shown)
    ndim = magic & 0xFF
    try:
        gzipped = _is_gzip(path)
        opener = gzip.open if gzipped else open
        with opener(path, "rb") as handle:
            head = handle.read(4 + 4 * ndim)
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"{shown}: cannot read: {err}") from None
    return _parse_idx_header(head, shown, magic, what), gzipped


def _read_idx_data(path: Path, shown: str, dims: tuple[int, ...], gzipped: bool) -> np.ndarray:
    """The uint8 payload: a memmap of a plain file, or one bytearray for a gzipped one."""
    header = 4 + 4 * len(dims)
    expected = int(np.prod(dims, dtype=np.int64))
    shape_text = "x".join(map(str, dims))
    if not gzipped:
        actual = path.stat().st_size
        if actual != header + expected:
            problem = "truncated" if actual < header + expected else "has trailing bytes"
            raise DataError(
                f"{shown}: {problem}: header says {shape_text}, so expected {header + expected} bytes "
                f"({header} header + {expected} data), found {actual}"
            )
        return np.memmap(path, dtype=np.uint8, mode="r", offset=header, shape=dims)
    buffer = bytearray(expected)
    view = memoryview(buffer)
    filled = 0
    try:
        with gzip.open(path, "rb") as handle:
            handle.seek(header)
            # Chunked readinto: the decompressed data is held once, never as bytes + copy.
            while filled < expected:
                got = handle.readinto(view[filled : filled + _CHUNK])
                if not got:
                    break
                filled += got
            extra = len(handle.read(1)) if filled == expected else 0
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(
            f"{shown}: truncated or corrupt gzip stream after {header + filled} decompressed bytes "
            f"(header says {shape_text}, so expected {header + expected}): {err}"
        ) from None
    if filled < expected or extra:
        problem = "truncated" if filled < expected else "has trailing bytes"
        found = f"{header + filled}" if filled < expected else f"more than {header + expected}"
        raise DataError(
            f"{shown}: {problem}: header says {shape_text}, so expected {header + expected} "
            f"decompressed bytes ({header} header + {expected} data), found {found}"
        )
    return np.frombuffer(buffer, dtype=np.uint8).reshape(dims)


def read_idx(images: Path, labels: Path, images_shown: str, labels_shown: str) -> RawData:
    """MNIST-style IDX image + label files (plain or gzipped) -> images (N, 1, H, W)."""
    image_dims, images_gz = _open_idx(images, images_shown, IDX_IMAGES_MAGIC, "image")
    label_dims, labels_gz = _open_idx(labels, labels_shown, IDX_LABELS_MAGIC, "label")
    # Counts are compared from the headers, before the (large) payload is read.
    if image_dims[0] != label_dims[0]:
        raise DataError(
            f"{labels_shown}: has {label_dims[0]} labels but {images_shown} has {image_dims[0]} images"
        )
    y_raw = _read_idx_data(labels, labels_shown, label_dims, labels_gz)
    y, names = _integer_labels(np.asarray(y_raw), labels_shown, "labels")
    pixels = _read_idx_data(images, images_shown, image_dims, images_gz)
    x = np.empty((image_dims[0], 1, *image_dims[1:]), dtype=np.float32)
    x[:, 0] = pixels  # the one uint8 -> float32 conversion, straight from the map/buffer
    del pixels
    return check_dataset(RawData(x, y, names), images_shown, check_finite=False, labels_shown=labels_shown)


# --------------------------------------------------------------------------- NPZ


def read_npz(path: Path, shown: str, inputs: str, labels: str) -> RawData:
    """NPZ arrays: 2-D inputs are tabular, 3-D become (N, 1, H, W), 4-D NCHW stay as they are."""
    _check_file(path, shown)
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
        _check_finite(x_raw, shown, f"array {inputs!r}")  # before reshaping: the index is the file's
    if x_raw.ndim == 3:
        x_raw = x_raw[:, None, :, :]
    elif x_raw.ndim not in (2, 4):
        raise DataError(
            f"{shown}: array {inputs!r} has shape {x_raw.shape}; expected 2-D (N, features), "
            "3-D (N, H, W) or 4-D (N, C, H, W)"
        )
    if y_raw.ndim == 2 and y_raw.shape[1] == 1:
        y_raw = y_raw[:, 0]
    if y_raw.ndim != 1:
        raise DataError(f"{shown}: array {labels!r} has shape {y_raw.shape}; expected 1-D labels")
    if len(x_raw) != len(y_raw):
        raise DataError(f"{shown}: array {inputs!r} has {len(x_raw)} samples but {labels!r} has {len(y_raw)} labels")
    if y_raw.dtype.kind in "US":
        y, class_names = _string_labels(y_raw)
    else:
        y, class_names = _integer_labels(y_raw, shown, f"array {labels!r}")
    x = np.ascontiguousarray(x_raw, dtype=np.float32)
    # Checked again only where the conversion can overflow: float64 beyond float32's range -> inf.
    overflow = x_raw.dtype.kind == "f" and x_raw.dtype.itemsize > 4
    return check_dataset(RawData(x, y, class_names), shown, check_finite=overflow)


# --------------------------------------------------------------------------- CSV


def read_csv(path: Path, shown: str, label_column: str) -> RawData:
    """A CSV with a header row: every column but ``label_column`` is a numeric feature.

    Labels that are all integers are class indices (names '0'..'K-1'); otherwise they are
    class names, sorted.
    """
    _check_file(path, shown)
    rows: list[list[float]] = []
    labels: list[str] = []
    lines: list[int] = []
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            if header is None:
                raise DataError(f"{shown}: empty file; expected a header row")
            header = [name.strip() for name in header]
            if label_column not in header:
                raise DataError(
                    f"{shown}: no label column {label_column!r} in the header (columns: {', '.join(header)})"
                )
            if len(header) < 2:
                raise DataError(f"{shown}: only the label column {label_column!r}; no feature columns")
            label_at = header.index(label_column)
            feature_names = [n for i, n in enumerate(header) if i != label_at]
            for fields in reader:
                line = reader.line_num
                if not fields or (len(fields) == 1 and not fields[0].strip()):
                    continue  # blank line
                if len(fields) != len(header):
                    raise DataError(f"{shown}: line {line}: expected {len(header)} fields, found {len(fields)}")
                label = fields.pop(label_at).strip()
                if not label:
                    raise DataError(f"{shown}: line {line}, column {label_column!r}: empty label")
                values = _parse_floats(fields, feature_names, shown, line)
                rows.append(values)
                labels.append(label)
                lines.append(line)
    except DataError:
        raise
    except UnicodeDecodeError as err:
        raise DataError(f"{shown}: not UTF-8 text: {err}") from None
    except (OSError, csv.Error) as err:
        raise DataError(f"{shown}: cannot read as CSV: {err}") from None
    if not rows:
        raise DataError(f"{shown}: header only; no data rows")
    try:
        indices = [int(v) for v in labels]
    except ValueError:
        y, class_names = _string_labels(np.array(labels))
    else:
        for i, value in enumerate(indices):
            # Integer labels are class indices; name the line of the first impossible one.
            if value < 0 or value >= len(indices):
                raise DataError(
                    f"{shown}: line {lines[i]}, column {label_column!r}: label {value} is out of range; "
                    f"integer labels are class indices 0..K-1 (and there are {len(indices)} rows)"
                )
        y, class_names = _integer_labels(np.array(indices, dtype=np.int64), shown, "labels")
    x = np.array(rows, dtype=np.float32)
    return check_dataset(RawData(x, y, class_names), shown)


def _parse_floats(fields: list[str], names: list[str], shown: str, line: int) -> list[float]:
    try:
        values = [float(f) for f in fields]
        if all(math.isfinite(v) for v in values):
            return values
    except ValueError:
        pass
    # Slow path only on a bad row: find the column to name.
    for name, field in zip(names, fields):
        try:
            value = float(field)
        except ValueError:
            raise DataError(f"{shown}: line {line}, column {name!r}: not a number: {field.strip()!r}") from None
        if not math.isfinite(value):
            raise DataError(f"{shown}: line {line}, column {name!r}: {field.strip()!r} is not a finite number")
    raise AssertionError("unreachable")


# --------------------------------------------------------------------------- image folder


def read_image_folder(folder: Path, shown: str, size: tuple[int, int], mode: str) -> RawData:
    """One sub-folder per class of PNG/JPEG files -> (N, C, H, W), converted to ``mode`` and resized."""
    from PIL import Image

    if not folder.exists():
        raise DataError(f"{shown}: folder not found")
    if not folder.is_dir():
        raise DataError(f"{shown}: not a folder; source image_folder expects one sub-folder per class")
    class_dirs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise DataError(f"{shown}: no class sub-folders")
    files: list[tuple[Path, int]] = []
    for index, class_dir in enumerate(class_dirs):
        for item in sorted(class_dir.iterdir()):
            if item.name.startswith("."):
                continue
            if item.is_file() and item.suffix.lower() in IMAGE_SUFFIXES:
                files.append((item, index))
            else:
                logger.warning("%s/%s/%s: skipped: not a PNG/JPEG file", shown, class_dir.name, item.name)
    if not files:
        raise DataError(f"{shown}: no PNG/JPEG images in its class sub-folders")

    height, width = size
    channels = 3 if mode == "RGB" else 1
    pixels = np.empty((len(files), height, width, channels), dtype=np.uint8)
    for i, (item, index) in enumerate(files):
        item_shown = f"{shown}/{class_dirs[index].name}/{item.name}"
        try:
            with Image.open(item) as image:
                image = image.convert(mode).resize((width, height), Image.Resampling.BILINEAR)
                pixels[i] = np.asarray(image, dtype=np.uint8).reshape(height, width, channels)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
            raise DataError(f"{item_shown}: cannot read image: {err}") from None
    x = np.ascontiguousarray(pixels.transpose(0, 3, 1, 2), dtype=np.float32)
    y = np.array([index for _, index in files], dtype=np.int64)
    return check_dataset(RawData(x, y, tuple(p.name for p in class_dirs)), shown, check_finite=False)


# --------------------------------------------------------------------------- digest


def dvc_digest(path: Path) -> str:
    """The DVC 3 content hash of a raw file or folder.

    The md5 recorded by ``dvc add`` in ``<path>.dvc`` (``outs[0].md5``) when that file is
    there; otherwise computed with dvc-data exactly as ``dvc add`` would: md5 of the
    bytes for a file, the ``<md5>.dir`` tree hash for a folder.
    """
    recorded = _recorded_md5(path)
    if recorded:
        return recorded
    from dvc_data.hashfile.build import build
    from dvc_data.hashfile.db import HashFileDB
    from dvc_objects.fs import MemoryFileSystem, localfs

    # dry_run: hash only; the staging object store is in memory and nothing is cached.
    odb = HashFileDB(MemoryFileSystem(), "memory://slimflow-digest")
    _, _, obj = build(odb, os.fspath(path), localfs, "md5", dry_run=True)
    return str(obj.hash_info.value)


def _recorded_md5(path: Path) -> str | None:
    dvc_file = path.with_name(path.name + ".dvc")
    if not dvc_file.is_file():
        return None
    import yaml

    try:
        outs = yaml.safe_load(dvc_file.read_text())["outs"]
        out = outs[0]
        if out.get("path") not in (None, path.name):
            return None
        return str(out["md5"])
    except (OSError, yaml.YAMLError, KeyError, IndexError, TypeError, AttributeError):
        logger.warning("%s: unreadable .dvc file; computing the digest instead", dvc_file)
        return None
