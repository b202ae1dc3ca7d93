"""Text: a CSV/TSV with a text column and a label column, or a folder of ``.txt`` files per
class; and the tokenizer trained on the train split (Hugging Face ``tokenizers``).

The readers return :class:`RawText` (the texts, int64 labels, class names) or raise
:class:`~tasks.sources.common.DataError` naming the file and line: empty text, a missing
label, bytes that are not UTF-8, a row with the wrong number of fields. The prepare stage
splits the texts, trains a WordPiece tokenizer on the train split only
(:func:`train_tokenizer`), and stores every split as token ids of a fixed length
(:func:`encode`: id 0 pads, so the mask is ``ids != 0``); ``tokenizer.json`` is written
with the prepared data, so DVC versions it and the served model tokenizes exactly alike.
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from tasks.sources.common import DataError, class_folders, column_labels, csv_records, require_file

if TYPE_CHECKING:
    from tokenizers import Tokenizer

logger = logging.getLogger(__name__)

PAD_TOKEN, UNK_TOKEN = "[PAD]", "[UNK]"
PAD_ID, UNK_ID = 0, 1  # models.transformer.PAD_ID: models mask id 0
TEXT_SUFFIX = ".txt"


class RawText(NamedTuple):
    """What the text readers return; unpacks as ``texts, y, class_names``."""

    texts: list[str]
    y: np.ndarray  # int64 class indices 0..K-1
    class_names: tuple[str, ...]


def _decode(data: bytes, shown: str) -> str:
    """UTF-8 (a BOM allowed); a bad byte is named by its line and column."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        raise DataError(
            f"{shown}: line {line}, column {column}: not UTF-8 text (byte 0x{data[err.start]:02x})"
        ) from None


def read_text_table(path: Path, shown: str, text_column: str, label_column: str) -> RawText:
    """A CSV (``.tsv``: tab-separated) with a header row naming ``text_column`` and ``label_column``."""
    require_file(path, shown)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise DataError(f"{shown}: cannot read: {err.strerror}") from None
    text = _decode(data, shown)
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    texts: list[str] = []
    labels: list[str] = []
    try:
        header = next(reader, None)
        if header is None:
            raise DataError(f"{shown}: empty file; expected a header row")
        header = [name.strip() for name in header]
        for column in (text_column, label_column):
            if column not in header:
                raise DataError(f"{shown}: no column {column!r} in the header (columns: {', '.join(header)})")
        text_at, label_at = header.index(text_column), header.index(label_column)
        for line, fields in csv_records(reader, len(header), shown):
            label = fields[label_at].strip()
            if not label:
                raise DataError(f"{shown}: line {line}, column {label_column!r}: missing label")
            sample = fields[text_at].strip()
            if not sample:
                raise DataError(f"{shown}: line {line}, column {text_column!r}: empty text")
            texts.append(sample)
            labels.append(label)
    except csv.Error as err:
        raise DataError(f"{shown}: line {reader.line_num}: cannot read as CSV: {err}") from None
    if not texts:
        raise DataError(f"{shown}: header only; no data rows")
    y, class_names = column_labels(labels)
    return _checked(RawText(texts, y, class_names), shown)


def read_text_folder(folder: Path, shown: str) -> RawText:
    """One sub-folder per class of ``.txt`` files, one sample per file (UTF-8)."""
    class_dirs = class_folders(folder, shown, "text_folder")
    texts: list[str] = []
    labels: list[int] = []
    for index, class_dir in enumerate(class_dirs):
        for item in sorted(class_dir.iterdir()):
            if item.name.startswith("."):
                continue
            item_shown = f"{shown}/{class_dir.name}/{item.name}"
            if not (item.is_file() and item.suffix.lower() == TEXT_SUFFIX):
                logger.warning("%s: skipped: not a .txt file", item_shown)
                continue
            try:
                data = item.read_bytes()
            except OSError as err:
                raise DataError(f"{item_shown}: cannot read: {err.strerror}") from None
            sample = _decode(data, item_shown).strip()
            if not sample:
                raise DataError(f"{item_shown}: line 1: empty text")
            texts.append(sample)
            labels.append(index)
    if not texts:
        raise DataError(f"{shown}: no .txt files in its class sub-folders")
    return _checked(RawText(texts, np.array(labels, dtype=np.int64), tuple(p.name for p in class_dirs)), shown)


def _checked(raw: RawText, shown: str) -> RawText:
    present = np.unique(raw.y)
    if len(present) < 2:
        raise DataError(
            f"{shown}: all {len(raw.y)} samples belong to one class ({raw.class_names[int(present[0])]!r}); "
            "need at least 2 classes"
        )
    return raw


# --------------------------------------------------------------------------- tokenizer


def train_tokenizer(texts: Sequence[str], vocab_size: int, max_length: int, lowercase: bool = True) -> Tokenizer:
    """A word-level tokenizer trained on ``texts`` (the train split): BERT's normalization and
    pre-tokenization (words and punctuation), the ``vocab_size`` most frequent words seen at
    least twice, ``[PAD]`` = 0 and ``[UNK]`` = 1, truncation and padding to ``max_length``.

    Word level, not WordPiece or BPE: their trainers break ties between equally frequent
    merges in hash order (``tokenizers`` 0.23), so the same train split could give a
    different ``tokenizer.json`` and DVC would see changed data; this one is byte-identical.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.WordLevel(unk_token=UNK_TOKEN))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordLevelTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=[PAD_TOKEN, UNK_TOKEN], show_progress=False
    )
    tokenizer.train_from_iterator(list(texts), trainer=trainer)
    assert tokenizer.token_to_id(PAD_TOKEN) == PAD_ID and tokenizer.token_to_id(UNK_TOKEN) == UNK_ID
    tokenizer.enable_truncation(max_length=max_length)
    tokenizer.enable_padding(pad_id=PAD_ID, pad_token=PAD_TOKEN, length=max_length)
    return tokenizer


def load_tokenizer(path: Path) -> Tokenizer:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path))


def encode(tokenizer: Tokenizer, texts: Sequence[str]) -> np.ndarray:
    """Token ids ``(N, max_length)`` as float32 (the prepared-data dtype; ids are exact), 0-padded."""
    encodings = tokenizer.encode_batch(list(texts))
    return np.array([e.ids for e in encodings], dtype=np.float32).reshape(len(texts), -1)


def tokenizer_card(tokenizer: Tokenizer, splits: dict[str, np.ndarray], texts: dict[str, Sequence[str]]) -> dict[str, Any]:
    """What the data card says about the tokenizer and how the texts fit the fixed length."""
    from importlib.metadata import version

    truncation = tokenizer.truncation or {}
    card: dict[str, Any] = {
        "library": f"tokenizers {version('tokenizers')}",
        "model": "WordLevel",
        "file": "tokenizer.json",
        "trained_on": "train split",
        "vocab_size": tokenizer.get_vocab_size(),
        "max_length": int(truncation.get("max_length", 0)),
        "pad_id": PAD_ID,
        "unk_id": UNK_ID,
        "mask": "ids != pad_id",
    }
    for split, ids in splits.items():
        real = (ids != PAD_ID).sum(axis=1)
        full = tokenizer.encode_batch(list(texts[split]))
        card.setdefault("truncated", {})[split] = int(sum(len(e.overflowing) > 0 for e in full))
        card.setdefault("mean_tokens", {})[split] = round(float(real.mean()), 2)
        card.setdefault("unknown_share", {})[split] = round(float((ids == UNK_ID).sum() / max(1, real.sum())), 4)
    return card
