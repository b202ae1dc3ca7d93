"""Readers for the raw data formats users bring, and the checks made before anything is written.

Every reader is a pure function that returns :class:`RawData` (text: :class:`RawText`) - ``x`` float32 of shape
``(N, features)`` or ``(N, C, H, W)``, ``y`` int64 class indices and the class names -
or raises :class:`DataError` with one message naming the file (and the line, column or
index where it applies) and the problem. Nothing here writes files.

Heavy imports (scikit-learn, Pillow, dvc-data) happen inside the functions that need
them so that ``python -m tasks.prepare`` starts quickly.
"""

from tasks.sources.builtin import load_sklearn, sklearn_digest
from tasks.sources.common import DataError, RawData, check_dataset, check_splittable, min_samples_per_class
from tasks.sources.declared import check_raw_data
from tasks.sources.digest import dvc_digest
from tasks.sources.idx import IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC, read_idx
from tasks.sources.images import IMAGE_SUFFIXES, read_image_folder
from tasks.sources.tabular import npz_channels_line, npz_input_shape, read_csv, read_npz
from tasks.sources.text import RawText, encode, read_text_folder, read_text_table, tokenizer_card, train_tokenizer

__all__ = [
    "IDX_IMAGES_MAGIC", "IDX_LABELS_MAGIC", "IMAGE_SUFFIXES", "DataError", "RawData", "RawText", "check_dataset",
    "check_raw_data", "check_splittable", "dvc_digest", "encode", "load_sklearn", "min_samples_per_class",
    "npz_channels_line", "npz_input_shape", "read_csv", "read_idx", "read_image_folder", "read_npz", "read_text_folder",
    "read_text_table", "sklearn_digest", "tokenizer_card", "train_tokenizer",
]
