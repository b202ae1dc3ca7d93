"""A folder of images, one sub-folder per class."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from tasks.sources.common import DataError, class_folders, RawData, check_dataset

logger = logging.getLogger(__name__)


IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg"})


def read_image_folder(folder: Path, shown: str, size: tuple[int, int], mode: str) -> RawData:
    """One sub-folder per class of PNG/JPEG files -> (N, C, H, W), converted to ``mode`` and resized."""
    from PIL import Image

    class_dirs = class_folders(folder, shown, "image_folder")
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
