"""MNIST-style IDX files (gzipped or not), read in chunks and checked against their headers."""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

from tasks.sources.common import DataError, RawData, check_dataset, require_file, integer_labels


IDX_IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions (N, H, W)
IDX_LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension (N,)
_GZIP_MAGIC = b"\x1f\x8b"
_CHUNK = 1 << 20


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
    require_file(path, shown)
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
    y, names = integer_labels(np.asarray(y_raw), labels_shown, "labels")
    pixels = _read_idx_data(images, images_shown, image_dims, images_gz)
    x = np.empty((image_dims[0], 1, *image_dims[1:]), dtype=np.float32)
    x[:, 0] = pixels  # the one uint8 -> float32 conversion, straight from the map/buffer
    del pixels
    return check_dataset(RawData(x, y, names, channel_added=True), images_shown, check_finite=False,
                         labels_shown=labels_shown)
