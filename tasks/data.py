"""The prepared-data contract between ``prepare`` and every later stage.

``data/prepared/`` holds, per split (train, val, test), ``{split}_x.npy`` (float32,
raw values, shape ``(N, *input_shape)``) and ``{split}_y.npy`` (int64 class indices),
plus ``preprocess.json`` (input shape, classes and the normalization statistics
computed on the train split only) and ``card.json`` (the data card). Text data stores
token ids ``(N, max_length)`` in ``{split}_x.npy`` (float32, exact; 0 pads), is not
normalized, and adds ``tokenizer.json`` (trained on the train split only). ``{split}_rows.npy``
holds each sample's fingerprint (uint64, :func:`row_fingerprints`): which rows a registered
model trained on, so that a later run measures it only on rows it never saw; with
``prepare.csv_group_column``, ``{split}_groups.npy`` holds each sample's group (int64: a
group's rows are all in one split, and a change is counted over groups). Rows with
categorical columns store each as its 0/1 features (:class:`CategoricalColumn`);
:func:`encode_table` / :func:`decode_table` go between a table of the raw columns and
those features. ``.npy`` files are
written with ``np.save``, which is byte-deterministic, so DVC hashes never drift.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tasks.core.categories import CategoricalColumn

if TYPE_CHECKING:  # the data module stays free of pydantic for the processes that only read data
    from models.spec import ModelSpec

SPLITS = ("train", "val", "test")


def log_columns(x: np.ndarray, columns: tuple[int, ...]) -> np.ndarray:
    """``x`` (rows of features) with ``columns`` taken to ``sign(x) * log(1 + |x|)`` (a copy;
    ``x`` itself where there are none): heavy-tailed amounts and counts brought to a scale
    where their bulk is spread, before standardizing."""
    if not columns:
        return x
    x = np.array(x, dtype=np.float32)
    picked = list(columns)
    x[:, picked] = np.sign(x[:, picked]) * np.log1p(np.abs(x[:, picked]))
    return x


def fill_missing(x: np.ndarray, fill_values: tuple[float, ...]) -> np.ndarray:
    """Rows of features with each missing value (NaN) replaced by its feature's fill value
    (a copy where there is one; ``x`` itself where there is none, or no fill values)."""
    if not fill_values:
        return x
    gaps = np.isnan(x)
    if not gaps.any():
        return x
    return np.where(gaps, np.asarray(fill_values, dtype=np.float32), x).astype(np.float32)


@dataclass(frozen=True)
class Preprocessing:
    """Normalization learnt on the train split; applied identically everywhere."""

    input_shape: tuple[int, ...]
    num_classes: int
    class_names: tuple[str, ...]
    mean: tuple[float, ...]  # per channel (images) or per feature (tabular); empty for token ids
    std: tuple[float, ...]
    vocab_size: int | None = None  # token ids (text): the tokenizer's vocabulary; not normalized
    log_features: tuple[int, ...] = ()  # tabular: features taken to sign(x)*log(1+|x|) before standardizing
    feature_names: tuple[str, ...] = ()  # tabular data whose file names its columns: the model's column names
    integer_features: tuple[int, ...] = ()  # tabular: features written as integers (the model's long columns)
    # tabular, prepare.missing_values median: per feature, the train split's median, which a
    # missing value (NaN) becomes before anything else; empty: missing values are refused
    fill_values: tuple[float, ...] = ()
    # tabular data with categorical columns: the raw columns in order (the registered model's
    # inputs), and those of categories; the model's features are then feature_names
    columns: tuple[str, ...] = ()
    categorical: tuple[CategoricalColumn, ...] = ()
    # sequences (N, 1, T, F) (an npz of (N, T, F), prepare.npz_layout): one mean and std per
    # feature, over samples and steps, where an image has one per channel
    sequence_features: bool = False
    # an IDX file's or a 3-D npz's samples as the file holds them, (H, W) or (T, F), which the
    # registered model takes; prepared (input_shape) with a channel, (1, H, W); a 4-D npz's with
    # its channels last (channels_last), (H, W, C), prepared (C, H, W); empty: input_shape
    raw_shape: tuple[int, ...] = ()
    channels_last: bool = False

    @property
    def shape_taken(self) -> tuple[int, ...]:
        """One sample's shape as the registered model takes it (raw values, shaped as the data
        file holds them; :meth:`apply` reshapes it to ``input_shape``)."""
        return self.raw_shape or self.input_shape

    def from_raw(self, x: np.ndarray) -> np.ndarray:
        """Samples as the registered model takes them, ``(N, *shape_taken)``, in the prepared
        layout ``(N, *input_shape)``: channels moved first, or the channel added."""
        if self.channels_last:
            return np.ascontiguousarray(np.moveaxis(x, -1, 1))
        return x.reshape(len(x), *self.input_shape) if self.raw_shape else x

    def to_raw(self, x: np.ndarray) -> np.ndarray:
        """Prepared samples ``(N, *input_shape)`` as the data file holds them, ``(N, *shape_taken)``
        (what a client sends): :meth:`from_raw` undone."""
        if self.channels_last:
            return np.ascontiguousarray(np.moveaxis(x, 1, -1))
        return x.reshape(len(x), *self.raw_shape) if self.raw_shape else x

    @property
    def raw_columns(self) -> tuple[str, ...]:
        """The columns a tabular model takes: the raw columns, which without categorical ones
        are its features."""
        return self.columns or self.feature_names

    @property
    def is_image(self) -> bool:
        return len(self.input_shape) == 3

    @property
    def is_text(self) -> bool:
        return self.vocab_size is not None

    @classmethod
    def for_tokens(cls, max_length: int, vocab_size: int, class_names: list[str]) -> Preprocessing:
        """Token ids ``(max_length,)``: passed through as they are (an id is not a measurement)."""
        return cls((int(max_length),), len(class_names), tuple(class_names), (), (), int(vocab_size))

    def _stats(self) -> tuple[np.ndarray, np.ndarray]:
        mean = np.asarray(self.mean, dtype=np.float32)
        std = np.asarray(self.std, dtype=np.float32)
        if self.sequence_features:
            return mean.reshape(1, 1, -1), std.reshape(1, 1, -1)
        if self.is_image:
            return mean.reshape(-1, 1, 1), std.reshape(-1, 1, 1)
        return mean.reshape(self.input_shape), std.reshape(self.input_shape)

    def apply(self, x: np.ndarray) -> np.ndarray:
        """Raw inputs ``(N, *input_shape)`` (or flat ``(N, prod(shape))``) -> normalized float32."""
        x = np.asarray(x, dtype=np.float32)
        if x.shape[1:] != tuple(self.input_shape):
            x = x.reshape((x.shape[0], *self.input_shape))
        if self.is_text:
            return x
        mean, std = self._stats()
        return (log_columns(fill_missing(x, self.fill_values), self.log_features) - mean) / std

    @classmethod
    def fit(cls, x_train: np.ndarray, num_classes: int, class_names: list[str],
            log_features: tuple[int, ...] = (), feature_names: tuple[str, ...] = (),
            integer_features: tuple[int, ...] = (), fill_values: tuple[float, ...] = (),
            sequence_features: bool = False) -> Preprocessing:
        """Statistics of the train split (of ``log_features`` after :func:`log_columns`): per
        feature of rows, per channel of images, per feature (last axis) of ``sequence_features``."""
        x_train = log_columns(x_train, log_features)
        axes = (0, 1, 2) if sequence_features else (0, 2, 3) if x_train.ndim == 4 else (0,)
        # Two passes over chunks in float64: exact, without a float64 copy of the split.
        chunk = max(1, (32 << 20) // max(1, x_train[:1].nbytes * 2))
        total = sum(x_train[i : i + chunk].sum(axis=axes, dtype=np.float64) for i in range(0, len(x_train), chunk))
        mean = total / (x_train.size / np.size(total))
        shape = (1, 1, 1, -1) if sequence_features else (1, -1, 1, 1) if x_train.ndim == 4 else (1, -1)
        squares = sum(
            ((x_train[i : i + chunk].astype(np.float64) - mean.reshape(shape)) ** 2).sum(axis=axes)
            for i in range(0, len(x_train), chunk)
        )
        std = np.sqrt(squares / (x_train.size / np.size(total)))
        std = np.where(std < 1e-8, 1.0, std)  # constant features stay as they are
        return cls(
            input_shape=tuple(int(d) for d in x_train.shape[1:]),
            num_classes=int(num_classes),
            class_names=tuple(class_names),
            mean=tuple(float(v) for v in np.ravel(mean)),
            std=tuple(float(v) for v in np.ravel(std)),
            log_features=tuple(int(i) for i in log_features),
            feature_names=tuple(feature_names),
            integer_features=tuple(int(i) for i in integer_features),
            fill_values=tuple(float(v) for v in fill_values),
            sequence_features=sequence_features,
        )

    def to_json(self) -> str:
        data = asdict(self)
        if data["vocab_size"] is None:  # image / tabular files stay as they were
            del data["vocab_size"]
        for key in ("log_features", "feature_names", "integer_features", "fill_values", "columns",
                    "categorical", "sequence_features", "raw_shape", "channels_last"):  # ...and those without them
            if not data[key]:
                del data[key]
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Preprocessing:
        data = json.loads(text)
        return cls(
            input_shape=tuple(data["input_shape"]),
            num_classes=int(data["num_classes"]),
            class_names=tuple(data["class_names"]),
            mean=tuple(data["mean"]),
            std=tuple(data["std"]),
            vocab_size=data.get("vocab_size"),
            log_features=tuple(int(i) for i in data.get("log_features", ())),
            feature_names=tuple(str(name) for name in data.get("feature_names", ())),
            integer_features=tuple(int(i) for i in data.get("integer_features", ())),
            fill_values=tuple(float(v) for v in data.get("fill_values", ())),
            columns=tuple(str(name) for name in data.get("columns", ())),
            categorical=tuple(CategoricalColumn(str(c["name"]), tuple(str(v) for v in c["values"]),
                                                str(c.get("dtype", "string"))) for c in data.get("categorical", ())),
            sequence_features=bool(data.get("sequence_features", False)),
            raw_shape=tuple(int(d) for d in data.get("raw_shape", ())),
            channels_last=bool(data.get("channels_last", False)),
        )


def column_names(preprocessing: Preprocessing) -> list[str]:
    """A tabular model's input columns: the data's own names (its raw columns, where some are
    categorical), else ``x0 .. x{F-1}``."""
    if preprocessing.raw_columns:
        return list(preprocessing.raw_columns)
    return [f"x{i}" for i in range(preprocessing.input_shape[0])]


def column_types(preprocessing: Preprocessing) -> dict[str, str]:
    """Each input column's type, as pandas reads the data's file: ``long`` where every value
    is written as an integer, ``string`` for categories in words, else ``double``."""
    features = list(preprocessing.feature_names) or column_names(preprocessing)
    longs = {features[i] for i in preprocessing.integer_features}
    categorical = {column.name: column.dtype for column in preprocessing.categorical}
    return {name: categorical.get(name) or ("long" if name in longs else "double") for name in column_names(preprocessing)}


def encode_table(preprocessing: Preprocessing, frame: Any) -> np.ndarray:
    """A table of the raw columns (a DataFrame, taken by name) -> the model's features, float32:
    a number column as it is (a gap: NaN), a categorical column as its 0/1 features."""
    import pandas as pd

    categorical = {column.name: column for column in preprocessing.categorical}
    parts = []
    for name in preprocessing.raw_columns:
        values = frame[name]
        if name in categorical:
            parts.append(categorical[name].one_hot(values.tolist()))
        else:
            parts.append(pd.to_numeric(values, errors="raise").to_numpy(dtype=np.float64, na_value=np.nan)[:, None])
    return np.hstack(parts).astype(np.float32) if parts else np.zeros((len(frame), 0), np.float32)


def decode_table(preprocessing: Preprocessing, x: np.ndarray) -> Any:
    """Model features ``x`` (rows of prepared data) -> the raw columns a client sends, each
    typed as the signature says: the inverse of :func:`encode_table` (a row with no category
    set gets a gap, None)."""
    import pandas as pd

    categorical = {column.name: column for column in preprocessing.categorical}
    data: dict[str, Any] = {}
    at = 0
    for name, kind in column_types(preprocessing).items():
        if name in categorical:
            values = categorical[name].values
            group = np.asarray(x[:, at : at + len(values)])
            picked = [values[i] if group[row, i] > 0.5 else None for row, i in enumerate(group.argmax(axis=1))]
            column = (pd.Series(picked, dtype=object) if kind == "string"
                      else pd.Series([float(v) if v is not None else np.nan for v in picked], dtype=np.float64))
            at += len(values)
        else:
            column = pd.Series(np.asarray(x[:, at], dtype=np.float64))
            at += 1
        data[name] = column.astype(np.int64) if kind == "long" else column
    return pd.DataFrame(data)


ROWS_FILE = "{split}_rows.npy"  # per split: each sample's fingerprint (:func:`row_fingerprints`)
GROUPS_FILE = "{split}_groups.npy"  # per split, with prepare.csv_group_column: each sample's group (int64)
# What :func:`row_fingerprints` computes; a new way of computing them gets a new name, and
# fingerprints of another scheme are never compared.
ROW_FINGERPRINT_SCHEME = "blake2b-64/1"


def row_fingerprints(preprocessing: Preprocessing, x: np.ndarray) -> np.ndarray:
    """A 64-bit fingerprint (BLAKE2b) of each sample's input as a client sends it, the label
    aside: what tells whether a model saw a sample in training, across runs and versions of
    the data. Rows of features: the raw columns by name (any order), each number as its
    float32 value (so ``3`` is the same in a long and in a double column; every gap alike),
    each category by its value (not its 0/1 features, which change when the file gains a
    category). Images and other arrays: their raw float32 values. Text: :func:`text_fingerprints`."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or preprocessing.is_text:
        return _hashed_rows(x.reshape(len(x), -1).view(np.uint8), b"")
    categorical = {column.name: column for column in preprocessing.categorical}
    parts: dict[str, np.ndarray] = {}
    at = 0
    for name in column_names(preprocessing):
        if name in categorical:
            values = categorical[name].values
            group = x[:, at : at + len(values)]
            # Each category as its value's fingerprint; none set (a gap, an unknown value): 0.
            codes = np.array([_fingerprint(value.encode("utf-8", "surrogatepass")) for value in values] + [0],
                             dtype=np.uint64)
            picked = np.where(group.max(axis=1, initial=0.0) > 0.5, group.argmax(axis=1), len(values))
            parts[name] = codes[picked].view(np.uint8).reshape(len(x), 8)
            at += len(values)
        else:
            bits = x[:, at].view(np.uint32).copy()
            bits[np.isnan(x[:, at])] = 0x7FC00000  # every NaN (a gap) the same bits
            parts[name] = bits.view(np.uint8).reshape(len(x), 4)
            at += 1
    names = sorted(parts)
    return _hashed_rows(np.concatenate([parts[name] for name in names], axis=1), "\x1f".join(names).encode())


def text_fingerprints(texts: list[str]) -> np.ndarray:
    """:func:`row_fingerprints` of raw texts (the model's input before its tokenizer)."""
    return np.fromiter((_fingerprint(text.encode("utf-8", "surrogatepass")) for text in texts), dtype=np.uint64,
                       count=len(texts))


def _hashed_rows(rows: np.ndarray, prefix: bytes) -> np.ndarray:
    """One fingerprint per row of ``rows`` (uint8, one row per sample), after ``prefix``."""
    rows = np.ascontiguousarray(rows)
    return np.fromiter((_fingerprint(prefix + row.tobytes()) for row in rows), dtype=np.uint64, count=len(rows))


def _fingerprint(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def load_row_fingerprints(prepared: Path, *splits: str) -> np.ndarray | None:
    """The fingerprints of ``splits`` (concatenated in that order); None where ``prepare``
    wrote none (data prepared before they were kept)."""
    try:
        return np.concatenate([np.load(prepared / ROWS_FILE.format(split=split)) for split in splits])
    except (OSError, ValueError):
        return None


@dataclass(frozen=True)
class Split:
    x: np.ndarray  # normalized float32
    y: np.ndarray  # int64


def load_preprocessing(prepared: Path) -> Preprocessing:
    return Preprocessing.from_json((prepared / "preprocess.json").read_text())


def load_split(prepared: Path, split: str, preprocessing: Preprocessing | None = None) -> Split:
    """Read one split and normalize it with the train-split statistics."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    preprocessing = preprocessing or load_preprocessing(prepared)
    x = np.load(prepared / f"{split}_x.npy")
    y = np.load(prepared / f"{split}_y.npy")
    return Split(preprocessing.apply(x), y.astype(np.int64))


def record_ids(prepared: Path, split: str) -> np.ndarray | None:
    """Each sample's record in ``split``: its group where a column names them
    (``prepare.csv_group_column``: a patient's visits, a customer's orders), else equal ids
    for the same input (copies of one record, from the rows' fingerprints), where the split
    holds more than one sample of a record; None where every sample is its own, or no
    fingerprints were kept. A model answers a record's copies alike and a group's rows much
    alike, so a change measured on them counts each record once
    (:func:`tasks.core.classification.paired_change_noise`)."""
    groups = prepared / GROUPS_FILE.format(split=split)
    keys = np.load(groups) if groups.is_file() else load_row_fingerprints(prepared, split)
    if keys is None:
        return None
    distinct, ids = np.unique(keys, return_inverse=True)
    return ids.reshape(-1) if len(distinct) < len(keys) else None


def data_digest(prepared: Path) -> str:
    """The digest of the data a run used, as recorded by ``prepare`` in the data card."""
    card = json.loads((prepared / "card.json").read_text())
    return str(card["digest"])


def data_split(prepared: Path) -> dict[str, Any] | None:
    """How ``prepare`` split the data (``seed``, ``val_fraction``, ``test_fraction``; where
    the data holds copies of a record, ``copies``: ``together`` or ``apart``; where a column
    names each row's group, ``groups``: that column; where a column says when each row was
    observed, ``time``: that column), from the data card; None when the card
    does not say."""
    try:
        card = json.loads((prepared / "card.json").read_text())
        split = {"seed": int(card["seed"]), "val_fraction": float(card["fractions"]["val"]),
                 "test_fraction": float(card["fractions"]["test"])}
        if "duplicates" in card:
            split["copies"] = str(card["duplicates"]["copies"])
        if "groups" in card:
            split["groups"] = str(card["groups"]["column"])
        if "time" in card:
            split["time"] = str(card["time"]["column"])
        return split
    except (OSError, KeyError, TypeError, ValueError):
        return None


def described_test_split(prepared: Path) -> dict[str, str]:
    """What the evaluation's tables and report say about a test split not drawn at random
    from the card: ``test_split`` (in words: the latest rows of a split in time order, the
    groups of a split by group) and ``test_groups`` (the group column, whose groups the
    changes' noise counts); empty for a random split, or a card that does not say."""
    try:
        card = json.loads((prepared / "card.json").read_text())
    except (OSError, ValueError):
        return {}
    if time := card.get("time"):
        test = time["splits"]["test"]
        return {"test_split": f"its latest {test['rows']:,} rows, {test['first']} to {test['last']} in "
                              f"{time['column']!r} order"}
    if groups := card.get("groups"):
        return {"test_split": f"{groups['split_groups']['test']:,} {groups['column']!r} groups no model trained on",
                "test_groups": str(groups["column"])}
    return {}


def spec_for_data(spec: ModelSpec, preprocessing: Preprocessing) -> ModelSpec:
    """``spec`` with the vocabulary of token data (text) filled in from the prepared data."""
    if not preprocessing.is_text:
        if spec.vocab_size is not None:  # its embedding would take the features for token ids
            raise ValueError(f"train.model.vocab_size is {spec.vocab_size} but the prepared data is not token ids "
                             "(text); leave it null")
        return spec
    if spec.vocab_size not in (None, preprocessing.vocab_size):
        raise ValueError(
            f"train.model.vocab_size is {spec.vocab_size} but the prepared data's tokenizer has "
            f"{preprocessing.vocab_size} ids; leave it null (it is set from the data)"
        )
    return spec.spec(vocab_size=preprocessing.vocab_size)


def reading_problem(spec: ModelSpec, input_shape: tuple[int, ...], tokens: bool, where: str) -> str | None:
    """Why a model of ``spec`` cannot read samples of ``input_shape`` (token ids if
    ``tokens``) from ``where``, as one line naming the ``train.model`` key and, for the
    family, the families that can; None if it can."""
    from models.spec import families_reading, input_problem

    problem = input_problem(spec, input_shape, whole_patches=True)
    if problem is None:
        return None
    setting, why = problem
    readers = families_reading(input_shape, tokens)
    advice = "" if setting != "family" else (f"; use one of {', '.join(readers)}" if readers else "; no model family reads it")
    return f"train.model.{setting}: {why} ({where}){advice}"
