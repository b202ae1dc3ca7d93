"""Writers of small raw data files in every format the prepare stage reads (for tests)."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

CLASSES, PER_CLASS, HEIGHT, WIDTH = 3, 10, 6, 5


# --------------------------------------------------------------------------- writers


def sample_images(per_class: int = PER_CLASS, classes: int = CLASSES, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images (N, HEIGHT, WIDTH) and uint8 labels, classes interleaved."""
    rng = np.random.default_rng(seed)
    labels = np.tile(np.arange(classes, dtype=np.uint8), per_class)
    return rng.integers(0, 256, size=(len(labels), HEIGHT, WIDTH), dtype=np.uint8), labels


def write_idx(path: Path, array: np.ndarray, magic: int | None = None, gz: bool = False) -> Path:
    magic = (0x0800 | array.ndim) if magic is None else magic
    data = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data += np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data, mtime=0) if gz else data)
    return path


def write_csv(path: Path, rows: list[list[object]], header: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(",".join(str(v) for v in row) for row in [header, *rows]) + "\n")
    return path


def tabular_rows(per_class: int = PER_CLASS, names: tuple[str, ...] = ("setosa", "virginica", "versicolor")) -> list[list[object]]:
    rng = np.random.default_rng(1)
    return [[f"{rng.normal():.4f}", f"{rng.normal():.4f}", names[i % len(names)], i] for i in range(per_class * len(names))]


def write_image_folder(folder: Path, per_class: int = PER_CLASS, classes: tuple[str, ...] = ("cat", "dog", "owl")) -> Path:
    from PIL import Image

    rng = np.random.default_rng(2)
    for c, name in enumerate(classes):
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, size=(9 + c, 7, 3), dtype=np.uint8)  # sizes differ: resized
            Image.fromarray(pixels, "RGB").save(folder / name / f"{i:02d}.{'png' if i % 2 else 'jpg'}")
    return folder
