"""The train/val/test split, and the copies of one record that it keeps together.

A data set often holds the same record more than once: a join that fanned out, an export
appended twice, an image saved under two names. Split as separate samples, a record's
copies land in train and in test, and the test split scores what the model memorized as
if it were unseen. Measured on a generated 20-class table of 2,500 records, each written
1 to 5 times (7,634 rows): the champion read 90.9% on such a test split and 59.3% on 3,000
new records; the gate passed variants on what they memorized, and the baseline's
validation accuracy, climbing on copies of its training rows, read as under-training.

:func:`find_duplicates` finds identical samples (the same raw values, or the same text);
:func:`copies_kept_together` decides, for ``prepare.duplicates`` ``auto``, whether they are
copies of one record (kept in one split) or the natural repeats of a table with few
possible rows (split as any other samples); :func:`split_samples` makes the split and the
data card's ``duplicates``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from tasks.sources.common import DataError, min_samples_per_class

SPLITS = ("train", "val", "test")
# prepare.duplicates auto: a table whose possible rows (the product of each column's number
# of distinct values) are at most this many per sample repeats rows by nature.
ROWS_PER_SAMPLE = 10


def stratified_split(
    y: np.ndarray, num_classes: int, val_fraction: float, test_fraction: float, seed: int
) -> dict[str, np.ndarray]:
    """Seeded, stratified train/val/test indices.

    Each class gives ``floor(count * fraction)`` samples to val and to test and the rest
    to train, so the per-class counts depend only on the class sizes (a new seed changes
    which samples, never the proportions). Within a split the order is shuffled.
    """
    rng = np.random.default_rng(seed)
    order = np.argsort(y, kind="stable")
    counts = np.bincount(y, minlength=num_classes)
    starts = np.concatenate([[0], np.cumsum(counts)])
    parts: dict[str, list[np.ndarray]] = {split: [] for split in SPLITS}
    for label in range(num_classes):
        members = rng.permutation(order[starts[label] : starts[label + 1]])
        # 1e-9: 20 * 0.15 must give 3, not floor(2.9999999999999996) = 2.
        n_test = math.floor(counts[label] * test_fraction + 1e-9)
        n_val = math.floor(counts[label] * val_fraction + 1e-9)
        parts["test"].append(members[:n_test])
        parts["val"].append(members[n_test : n_test + n_val])
        parts["train"].append(members[n_test + n_val :])
    return {split: rng.permutation(np.concatenate(parts[split])) for split in SPLITS}


@dataclass(frozen=True)
class Duplicates:
    """Which samples are the same record: ``record[i]`` is sample i's record (0..distinct-1)."""

    record: np.ndarray  # int64, one per sample
    distinct: int
    record_label: np.ndarray  # int64, one per record: its copies' most frequent label
    with_copies: int  # records that appear more than once
    most_copies: int
    conflicting: int  # records whose copies carry different labels
    conflict_example: tuple[int, int] | None  # two samples of one record, labelled differently

    @property
    def copies(self) -> int:
        """Samples beyond each record's first."""
        return len(self.record) - self.distinct


def find_duplicates(samples: np.ndarray | list[str], y: np.ndarray) -> Duplicates:
    """The records among ``samples`` (an array of raw values, one sample per row, or texts):
    samples are one record when their raw values are equal (every gap alike, -0.0 as 0.0)
    or their texts are."""
    if isinstance(samples, list):
        keys = np.asarray(samples, dtype=object)
    else:
        rows = np.ascontiguousarray(samples.reshape(len(samples), -1), dtype=np.float32) + np.float32(0.0)
        rows[np.isnan(rows)] = np.float32(np.nan)
        keys = rows.view(np.dtype((np.void, rows.shape[1] * 4))).ravel()
    _, record, counts = np.unique(keys, return_inverse=True, return_counts=True)
    record = record.reshape(-1).astype(np.int64)
    # Each record's (label, copies) pairs; its label: the most frequent (ties: the lower).
    width = int(y.max()) + 1
    pairs, pair_counts = np.unique(record * width + y, return_counts=True)
    pair_record, pair_label = pairs // width, pairs % width
    first = np.lexsort((pair_label, -pair_counts, pair_record))
    starts = np.flatnonzero(np.r_[True, np.diff(pair_record[first]) != 0])
    record_label = pair_label[first][starts]
    conflicting = np.flatnonzero(np.bincount(pair_record, minlength=len(counts)) > 1)
    example = None
    if len(conflicting):
        members = np.flatnonzero(record == conflicting[0])
        labels = y[members]
        first, other = int(members[labels == labels.min()][0]), int(members[labels == labels.max()][0])
        example = (min(first, other), max(first, other))
    return Duplicates(record=record, distinct=len(counts), record_label=record_label,
                      with_copies=int((counts > 1).sum()), most_copies=int(counts.max()),
                      conflicting=len(conflicting), conflict_example=example)


def copies_kept_together(
    setting: str, samples: np.ndarray | list[str], column_widths: Sequence[int] = ()
) -> tuple[bool, str]:
    """Whether ``prepare.duplicates`` (``setting``) keeps each record's copies in one split,
    and why, in words. ``auto``: yes, unless the samples are rows of a table with few possible
    rows (at most :data:`ROWS_PER_SAMPLE` per sample: the product of each column's number of
    distinct values), where identical rows are natural repeats (a survey's answers, a few
    coded fields), not copies. ``column_widths``: how many features each raw column is (a
    column of categories is one 0/1 feature per category); by default one each."""
    if setting != "auto":
        return setting == "together", f"prepare.duplicates {setting}"
    if isinstance(samples, list):
        return True, "prepare.duplicates auto: identical texts are copies of one text"
    if samples.ndim > 2:
        return True, "prepare.duplicates auto: identical arrays are copies of one sample"
    widths = list(column_widths) or [1] * samples.shape[1]
    limit = math.log(ROWS_PER_SAMPLE * len(samples))
    log_rows, at = 0.0, 0
    for width in widths:
        log_rows += math.log(len(np.unique(samples[:, at : at + width], axis=0)))
        at += width
        if log_rows > limit:
            return True, (f"prepare.duplicates auto: the values of its {len(widths)} columns make far more "
                          f"possible rows than its {len(samples):,} samples, so identical rows are copies of one "
                          "record")
    return False, (f"prepare.duplicates auto: the table's columns take few values (about {math.exp(log_rows):,.0f} "
                   f"possible rows for {len(samples):,} samples), so identical rows are natural repeats")


def split_records(
    duplicates: Duplicates, num_classes: int, val_fraction: float, test_fraction: float, seed: int
) -> dict[str, np.ndarray]:
    """:func:`stratified_split` of the records, each record's copies all in its split
    (stratified by each record's label; within a split the order is shuffled)."""
    by_record = stratified_split(duplicates.record_label, num_classes, val_fraction, test_fraction, seed)
    rng = np.random.default_rng(seed)
    return {split: rng.permutation(np.flatnonzero(np.isin(duplicates.record, by_record[split]))) for split in SPLITS}


def inputs_seen_in_train(index: dict[str, np.ndarray], duplicates: Duplicates) -> int:
    """How many test samples are copies of a train sample under the split ``index``."""
    return int(np.isin(duplicates.record[index["test"]], duplicates.record[index["train"]]).sum())


def check_records_splittable(
    duplicates: Duplicates, y: np.ndarray, class_names: tuple[str, ...], val_fraction: float, test_fraction: float,
    shown: str,
) -> None:
    """Every class must have enough distinct records for a split that keeps copies together."""
    if (short := _short_class(duplicates, y, len(class_names), val_fraction, test_fraction)) is not None:
        index, samples, records, need = short
        raise DataError(
            f"{shown}: class {class_names[index]!r} has {samples} samples but {records} "
            f"distinct ones (the others are copies); a split that keeps each record's copies in one split "
            f"(prepare.duplicates) with val_fraction={val_fraction} and test_fraction={test_fraction} needs at "
            f"least {need} distinct samples per class; prepare.duplicates=apart splits the copies as separate "
            "samples (test then scores copies of training samples as unseen)"
        )


def _short_class(records: Duplicates, y: np.ndarray, num_classes: int, val_fraction: float,
                 test_fraction: float) -> tuple[int, int, int, int] | None:
    """The first class with fewer records (a record counts for its most frequent label) than
    a stratified split needs: (its index, its samples, its records, the records needed)."""
    need = min_samples_per_class(val_fraction, test_fraction)
    counts = np.bincount(records.record_label, minlength=num_classes)
    for index in np.flatnonzero(counts < need):
        return int(index), int(np.count_nonzero(y == index)), int(counts[index]), need
    return None


def split_samples(
    samples: np.ndarray | list[str], y: np.ndarray, class_names: tuple[str, ...], setting: str, val_fraction: float,
    test_fraction: float, seed: int, shown: str, column_widths: Sequence[int] = (),
) -> tuple[dict[str, np.ndarray], dict | None]:
    """The prepare stage's split of ``samples`` (raw values or texts; ``column_widths``: as
    :func:`copies_kept_together` takes them) and the data card's ``duplicates`` (None where
    every sample is distinct: then the split is :func:`stratified_split`'s, as before copies
    were looked for)."""
    duplicates = find_duplicates(samples, y)
    apart = stratified_split(y, len(class_names), val_fraction, test_fraction, seed)
    if duplicates.copies == 0:
        return apart, None
    together, reason = copies_kept_together(setting, samples, column_widths)
    if together:
        check_records_splittable(duplicates, y, class_names, val_fraction, test_fraction, shown)
    index = split_records(duplicates, len(class_names), val_fraction, test_fraction, seed) if together else apart
    card = {"samples": len(y), "distinct": duplicates.distinct, "records_with_copies": duplicates.with_copies,
            "most_copies": duplicates.most_copies, "conflicting_labels": duplicates.conflicting,
            "setting": setting, "copies": "together" if together else "apart", "reason": reason,
            # test samples that are copies of a train sample, with each record's copies in one split
            # (none, by construction) and with the copies split as separate samples
            "test_copies_of_train": {"together": 0, "apart": inputs_seen_in_train(apart, duplicates)}}
    if duplicates.conflict_example is not None:
        card["conflict_example"] = {"samples": list(duplicates.conflict_example),
                                    "labels": [class_names[y[i]] for i in duplicates.conflict_example]}
    return index, card


def split_groups(
    groups: np.ndarray, y: np.ndarray, class_names: tuple[str, ...], column: str, val_fraction: float,
    test_fraction: float, seed: int, shown: str,
) -> tuple[dict[str, np.ndarray], dict, np.ndarray]:
    """The prepare stage's split where a column names each row's group
    (``prepare.csv_group_column``): every group's rows in one split, stratified by each
    group's most frequent label; the data card's ``groups``; each row's group (0..G-1)."""
    by_group = find_duplicates([str(group) for group in groups], y)
    if (short := _short_class(by_group, y, len(class_names), val_fraction, test_fraction)) is not None:
        index, rows, counted, need = short
        raise DataError(
            f"{shown}: class {class_names[index]!r} has {rows} rows but {counted} groups "
            f"(prepare.csv_group_column {column!r}: a group counts for its most frequent label); a split that keeps "
            f"each group's rows in one split with val_fraction={val_fraction} and test_fraction={test_fraction} "
            f"needs at least {need} groups per class"
        )
    index = split_records(by_group, len(class_names), val_fraction, test_fraction, seed)
    apart = stratified_split(y, len(class_names), val_fraction, test_fraction, seed)
    return index, {"column": column, "groups": by_group.distinct, "samples": len(y), "most_rows": by_group.most_copies,
                   "mixed_labels": by_group.conflicting, "split_groups": {
                       split: int(len(np.unique(by_group.record[index[split]]))) for split in SPLITS},
                   # test rows whose group has rows in train: none, and what a split by rows would give
                   "test_rows_of_train_groups": {"together": 0, "apart": inputs_seen_in_train(apart, by_group)}}, \
        by_group.record


def groups_line(entry: dict) -> str:
    """The prepare stage's log line for the card's ``groups``."""
    column, sizes = entry["column"], entry["split_groups"]
    return (f"groups: {entry['samples']:,} rows of {entry['groups']:,} {column!r} groups (up to {entry['most_rows']} "
            f"rows each; prepare.csv_group_column): each group's rows kept in one split (train {sizes['train']:,} / "
            f"val {sizes['val']:,} / test {sizes['test']:,} groups), so test holds only groups no model trained on; "
            f"a split by rows would have given {entry['test_rows_of_train_groups']['apart']:,} test rows whose "
            f"{column!r} has rows in train")


def duplicates_lines(entry: dict, test_samples: int) -> list[tuple[int, str]]:
    """The prepare stage's log lines (level, message) for the card's ``duplicates``."""
    most = entry["most_copies"]
    found = (f"{entry['samples']:,} samples are {entry['distinct']:,} distinct records "
             f"({entry['records_with_copies']:,} of them {'twice' if most == 2 else f'2 to {most} times'})")
    apart = entry["test_copies_of_train"]["apart"]
    if entry["copies"] == "together":
        line = (f"duplicates: {found}; each record's copies kept in one split ({entry['reason']}); "
                f"prepare.duplicates=apart would split them as separate samples: {apart:,} test samples would be "
                "copies of training samples, scored as unseen")
    else:
        line = (f"duplicates: {found}; split as separate samples ({entry['reason']}): {apart:,} of the "
                f"{test_samples:,} test samples are copies of training samples; prepare.duplicates=together keeps "
                "each record's copies in one split")
    lines = [(logging.INFO, line)]
    if entry["conflicting_labels"]:
        (a, b), (label_a, label_b) = entry["conflict_example"]["samples"], entry["conflict_example"]["labels"]
        lines.append((logging.WARNING, (
            f"duplicates: {entry['conflicting_labels']:,} records appear with different labels (e.g. samples {a} "
            f"and {b}, counting from 0 in the order read: the same input labelled {label_a!r} and {label_b!r}); "
            "no model is right on every copy: check the labels")))
    return lines
