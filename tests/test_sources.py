"""The raw-data readers (tasks/sources/): every format, and bad data named by file and place.

Each test writes its own small raw files under ``tmp_path`` (tests/raw_files.py).
"""

from __future__ import annotations

import gzip
import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from tasks.sources import (
    DataError,
    check_splittable,
    dvc_digest,
    load_sklearn,
    min_samples_per_class,
    read_csv,
    read_idx,
    read_image_folder,
    read_npz,
    sklearn_digest,
)

from raw_files import HEIGHT, PER_CLASS, WIDTH, sample_images, tabular_rows, write_csv, write_idx, write_image_folder

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- readers: good data


@pytest.mark.parametrize("gz", [False, True])
def test_idx_images_become_nchw_float32(tmp_path: Path, gz: bool) -> None:
    images, labels = sample_images()
    suffix = ".gz" if gz else ""
    x, y, names = read_idx(
        write_idx(tmp_path / f"img.idx{suffix}", images, gz=gz), write_idx(tmp_path / f"lbl.idx{suffix}", labels, gz=gz),
        "img", "lbl",
    )
    assert x.dtype == np.float32 and x.shape == (len(labels), 1, HEIGHT, WIDTH)
    np.testing.assert_array_equal(x[:, 0], images)
    assert y.dtype == np.int64 and list(y) == list(labels)
    assert names == ("0", "1", "2")


def test_idx_gzip_detected_by_magic_without_suffix(tmp_path: Path) -> None:
    images, labels = sample_images()
    x, _, _ = read_idx(write_idx(tmp_path / "img", images, gz=True), write_idx(tmp_path / "lbl", labels), "img", "lbl")
    np.testing.assert_array_equal(x[:, 0], images)


def test_npz_shapes_and_string_labels(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    words = np.array(["zebra", "ant", "moth"] * PER_CLASS)
    np.savez(tmp_path / "tab.npz", x=rng.normal(size=(30, 4)), y=words)
    x, y, names = read_npz(tmp_path / "tab.npz", "tab.npz", "x", "y")
    assert x.dtype == np.float32 and x.shape == (30, 4)
    assert names == ("ant", "moth", "zebra") and list(y[:3]) == [2, 0, 1]

    np.savez(tmp_path / "img3.npz", inputs=rng.normal(size=(30, 6, 5)), targets=np.arange(30) % 3)
    assert read_npz(tmp_path / "img3.npz", "img3.npz", "inputs", "targets").x.shape == (30, 1, 6, 5)
    np.savez(tmp_path / "img4.npz", x=rng.normal(size=(30, 3, 6, 5)).astype(np.float32), y=np.arange(30) % 3)
    raw = read_npz(tmp_path / "img4.npz", "img4.npz", "x", "y")
    assert raw.x.shape == (30, 3, 6, 5) and raw.class_names == ("0", "1", "2")


def test_csv_string_and_integer_labels(tmp_path: Path) -> None:
    rows = tabular_rows()
    path = write_csv(tmp_path / "iris.csv", [r[:3] for r in rows], ["a", "b", "species"])
    x, y, names = read_csv(path, "iris.csv", "species")
    assert x.dtype == np.float32 and x.shape == (30, 2)
    assert names == ("setosa", "versicolor", "virginica")  # sorted
    assert [names[i] for i in y[:3]] == ["setosa", "virginica", "versicolor"]

    # Integer labels are class indices, and the label column may sit anywhere.
    path = write_csv(tmp_path / "ints.csv", [[r[3] % 3, r[0], r[1]] for r in rows], ["label", "a", "b"])
    x, y, names = read_csv(path, "ints.csv", "label")
    assert names == ("0", "1", "2") and list(y[:4]) == [0, 1, 2, 0]
    assert x[0, 0] == np.float32(float(rows[0][0]))


def test_csv_columns_keep_their_names_and_ignored_columns_are_left_out(tmp_path: Path) -> None:
    # The header's names are the registered model's column names: a file whose columns come
    # in another order, or another file of as many columns, must not read as the same model input.
    path = write_csv(tmp_path / "t.csv", [[i, 0.5 * i, "a" if i % 2 else "b", 3.0 - i, f"note {i}"] for i in range(8)],
                     ["id", "age", "label", "income", "note"])
    raw = read_csv(path, "t.csv", "label", ["id", "note"])
    assert raw.feature_names == ("age", "income") and raw.x.shape == (8, 2)
    assert list(raw.x[3]) == [1.5, 0.0]  # age, income of the row whose id is 3
    x, y, names = raw  # still unpacks as before
    assert names == ("a", "b") and list(y[:2]) == [1, 0]
    assert raw.integer_features == ()  # age has halves, income is 3.0 (written as a float)
    path = write_csv(tmp_path / "n.csv", [[i, f"{i}.5", -i, " +7 ", "b" if i % 2 else "a"] for i in range(6)],
                     ["visits", "amount", "change", "calls", "label"])
    assert read_csv(path, "n.csv", "label").integer_features == (0, 2, 3)  # what pandas reads as int64
    np.savez(tmp_path / "i.npz", x=np.arange(12).reshape(6, 2), y=np.arange(6) % 2)
    assert read_npz(tmp_path / "i.npz", "i.npz", "x", "y").integer_features == (0, 1)
    np.savez(tmp_path / "f.npz", x=np.arange(12.0).reshape(6, 2), y=np.arange(6) % 2)
    assert read_npz(tmp_path / "f.npz", "f.npz", "x", "y").integer_features == ()


@pytest.mark.parametrize(
    "header,ignored,message",
    [
        (["f1", "f1", "label"], [], r"the header names 'f1' twice \(columns 1 and 2\)"),
        (["", "f1", "label"], [], r"column 1 of the header has no name \(a DataFrame's index, written by to_csv\(\)\?\): "
                                  r"name it, or write the file with index=False"),
        (["f1", "f2", "label"], ["id"], r"prepare.csv_ignore_columns: no column 'id' in the header \(columns: f1, f2, label\)"),
        (["f1", "f2", "label"], ["label"], r"prepare.csv_ignore_columns: 'label' is the label column"),
        (["f1", "f2", "label"], ["f1", "f2"], r"no feature columns besides the label column 'label' and the ignored ones"),
    ],
)
def test_csv_header_problems_are_named(tmp_path: Path, header: list[str], ignored: list[str], message: str) -> None:
    path = write_csv(tmp_path / "t.csv", [["0.5", "0.5", "b"], ["1", "2", "a"]], header)
    with pytest.raises(DataError, match=rf"^t.csv: {message}"):
        read_csv(path, "t.csv", "label", ignored)


def test_csv_categorical_columns_become_one_feature_per_category(tmp_path: Path) -> None:
    rows = [["gold", 10, 1.5, "03", "a"], ["basic", 2, 2.5, "7", "b"], ["silver", 2, 0.5, "3", "a"],
            ["basic", 10, 1.0, "7", "b"]]
    path = write_csv(tmp_path / "c.csv", rows, ["plan", "region", "spend", "code", "label"])
    raw = read_csv(path, "c.csv", "label", categorical_columns=["plan", "region", "code"])
    # Words sorted, integer codes in numeric order ('03' is the code 3); the file's column order kept.
    assert raw.columns == ("plan", "region", "spend", "code")
    assert [(c.name, c.values, c.dtype) for c in raw.categorical] == [
        ("plan", ("basic", "gold", "silver"), "string"), ("region", ("2", "10"), "long"), ("code", ("3", "7"), "long")]
    assert raw.feature_names == ("plan=basic", "plan=gold", "plan=silver", "region=2", "region=10", "spend",
                                 "code=3", "code=7")
    assert raw.x.tolist()[0] == [0, 1, 0, 0, 1, 1.5, 1, 0] and raw.x.shape == (4, 8)
    assert raw.integer_features == ()  # spend has fractions; the codes are categories, not numbers

    gap = write_csv(tmp_path / "g.csv", [*rows, ["", "", 1.0, "3", "b"]], ["plan", "region", "spend", "code", "label"])
    with pytest.raises(DataError, match=r"^g.csv: line 6, column 'plan': a missing value \(''\); prepare.missing_values"):
        read_csv(gap, "g.csv", "label", categorical_columns=["plan", "region"])
    raw = read_csv(gap, "g.csv", "label", missing=True, categorical_columns=["plan", "region"])
    assert raw.x[4, :5].tolist() == [0, 0, 0, 0, 0]  # a gap sets no category
    assert raw.categorical[1].dtype == "double"  # codes with a gap: float64 in pandas

    for columns, message in (
        (["tier"], r"prepare.csv_categorical_columns: no column 'tier' in the header"),
        (["label"], r"prepare.csv_categorical_columns: 'label' is the label column or left out"),
    ):
        with pytest.raises(DataError, match=rf"^c.csv: {message}"):
            read_csv(path, "c.csv", "label", categorical_columns=columns)
    many = write_csv(tmp_path / "m.csv", [[f"C{i}", i % 2] for i in range(300)], ["customer", "label"])
    with pytest.raises(DataError, match=r"^m.csv: categorical column 'customer' has 300 categories \(at most 256: one "
                                        r"feature each\); an id or free text\? leave it out with prepare.csv_ignore_columns$"):
        read_csv(many, "m.csv", "label", categorical_columns=["customer"])


def test_csv_and_npz_missing_values_are_refused_or_read_as_nan(tmp_path: Path) -> None:
    # pandas reads these cells as missing, so a model's clients hold NaN there: refused by
    # default (naming line and column), NaN with missing=True; an infinity is refused either way.
    rows = [["1", "", "a"], ["2", "NA", "b"], ["3", "4", "a"], [" null ", "5", "b"], ["5", "6", "a"]]
    path = write_csv(tmp_path / "m.csv", rows, ["f1", "f2", "label"])
    with pytest.raises(DataError, match=r"^m.csv: line 2, column 'f2': a missing value \(''\); "
                                        r"prepare.missing_values=median fills missing values with the train split's median$"):
        read_csv(path, "m.csv", "label")
    raw = read_csv(path, "m.csv", "label", missing=True)
    assert np.isnan(raw.x[[0, 1], 1]).all() and np.isnan(raw.x[3, 0]) and raw.x[2, 1] == 4
    assert raw.integer_features == ()  # a column with gaps is float64 in pandas too
    path = write_csv(tmp_path / "i.csv", [*rows, ["inf", "1", "b"]], ["f1", "f2", "label"])
    with pytest.raises(DataError, match=r"line 7, column 'f1': 'inf' is not a finite number$"):
        read_csv(path, "i.csv", "label", missing=True)

    x = np.arange(12.0).reshape(6, 2)
    x[2, 1] = np.nan
    np.savez(tmp_path / "m.npz", x=x, y=np.arange(6) % 2)
    with pytest.raises(DataError, match=r"array 'x' has a non-finite value \(nan\) at index \[2, 1\] "
                                        r"\(prepare.missing_values=median fills"):
        read_npz(tmp_path / "m.npz", "m.npz", "x", "y")
    assert np.isnan(read_npz(tmp_path / "m.npz", "m.npz", "x", "y", missing=True).x[2, 1])
    x[2, 1] = np.inf
    np.savez(tmp_path / "inf.npz", x=x, y=np.arange(6) % 2)
    with pytest.raises(DataError, match=r"non-finite value \(inf\) at index \[2, 1\]$"):
        read_npz(tmp_path / "inf.npz", "inf.npz", "x", "y", missing=True)


LABELS_THAT_ARE_NOT_INDICES = {  # label column -> the class names it gives, in index order
    "1..3 (UCI style)": ([1, 2, 3], ("1", "2", "3")),
    "-1/1 (libsvm style)": ([-1, 1], ("-1", "1")),
    "codes with gaps": ([0, 1, 2, 4], ("0", "1", "2", "4")),
    "large codes": ([1000, 20, 300], ("20", "300", "1000")),  # numeric order, not text order
}


@pytest.mark.parametrize("case", list(LABELS_THAT_ARE_NOT_INDICES))
def test_integer_labels_other_than_0_to_k_are_class_names_in_every_format(case: str, tmp_path: Path) -> None:
    # Such files were refused ("-1 is out of range") or failed the split on an empty class
    # ("class '0' has 0 samples"): 1-based and -1/1 labels are common; read as names, as strings are.
    values, names = LABELS_THAT_ARE_NOT_INDICES[case]
    labels = np.array([values[i % len(values)] for i in range(10 * len(values))])
    expected = np.array([names.index(str(v)) for v in labels])
    rng = np.random.default_rng(0)
    features = rng.normal(size=(len(labels), 2))

    path = write_csv(tmp_path / "t.csv", [[*f, v] for f, v in zip(features, labels)], ["a", "b", "label"])
    raw = read_csv(path, "t.csv", "label")
    assert raw.class_names == names and list(raw.y) == list(expected)

    np.savez(tmp_path / "t.npz", x=features, y=labels)
    raw = read_npz(tmp_path / "t.npz", "t.npz", "x", "y")
    assert raw.class_names == names and list(raw.y) == list(expected)
    np.savez(tmp_path / "f.npz", x=features, y=labels.astype(np.float64))  # 1.0, 2.0: integers stored as floats
    assert read_npz(tmp_path / "f.npz", "f.npz", "x", "y").class_names == names

    from tasks.sources import read_text_table

    table = tmp_path / "t.tsv"
    table.write_text("text\tlabel\n" + "".join(f"sample {i}\t{v}\n" for i, v in enumerate(labels)))
    raw_text = read_text_table(table, "t.tsv", "text", "label")
    assert raw_text.class_names == names and list(raw_text.y) == list(expected)

    if labels.min() >= 0 and labels.max() < 256:  # IDX labels are unsigned bytes (EMNIST letters: 1..26)
        images = np.zeros((len(labels), HEIGHT, WIDTH), dtype=np.uint8)
        raw = read_idx(write_idx(tmp_path / "img", images), write_idx(tmp_path / "lbl", labels.astype(np.uint8)), "img", "lbl")
        assert raw.class_names == names and list(raw.y) == list(expected)
    check_splittable(raw.y, raw.class_names, 0.15, 0.25, "t")  # no empty class in between


def test_labels_0_to_k_stay_the_indices_and_fractions_are_refused(tmp_path: Path) -> None:
    labels = np.arange(30) % 3
    np.savez(tmp_path / "a.npz", x=np.ones((30, 2)), y=labels)
    raw = read_npz(tmp_path / "a.npz", "a.npz", "x", "y")
    assert raw.class_names == ("0", "1", "2") and list(raw.y) == list(labels)
    np.savez(tmp_path / "b.npz", x=np.ones((30, 2)), y=labels + 0.5)
    with pytest.raises(DataError, match=r"^b.npz: array 'y'\[0\] = 0.5 is not an integer class label$"):
        read_npz(tmp_path / "b.npz", "b.npz", "x", "y")


@pytest.mark.parametrize("mode,channels", [("L", 1), ("RGB", 3)])
def test_image_folder_converted_and_resized(tmp_path: Path, mode: str, channels: int) -> None:
    folder = write_image_folder(tmp_path / "pets")
    (folder / "cat" / "notes.txt").write_text("not an image, skipped\n")
    x, y, names = read_image_folder(folder, "pets", (4, 3), mode)
    assert names == ("cat", "dog", "owl")
    assert x.dtype == np.float32 and x.shape == (30, channels, 4, 3)
    assert np.bincount(y).tolist() == [10, 10, 10]
    assert 0.0 <= x.min() and x.max() <= 255.0


def test_builtin_sklearn_sets() -> None:
    x, y, names = load_sklearn("digits")
    assert x.shape == (1797, 1, 8, 8) and x.dtype == np.float32
    assert (x.min(), x.max()) == (0.0, 16.0) and names == tuple(str(i) for i in range(10))
    x, y, names = load_sklearn("breast_cancer")
    assert x.shape == (569, 30) and names == ("malignant", "benign") and set(y) == {0, 1}


@pytest.mark.parametrize("name", ["digits", "breast_cancer"])
def test_builtin_sets_read_from_sklearns_files_equal_its_loaders_without_importing_it(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The files are read as scikit-learn's loaders read them (the same bytes, so the same
    digest in MLflow and DVC), and scikit-learn is not imported: the fork server no longer
    loads it; a scikit-learn without the files falls back to its loaders."""
    from tasks.sources import builtin

    probe = (f"import sys; from tasks.sources import load_sklearn; load_sklearn({name!r}); "
             "print(sorted(m for m in ('sklearn', 'scipy') if m in sys.modules))")
    imported = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert imported.stdout.strip() == "[]"

    read = load_sklearn(name)
    monkeypatch.setattr(builtin, "_sklearn_data_folder", lambda: None)
    loaded = load_sklearn(name)
    assert read.x.dtype == loaded.x.dtype and read.y.dtype == loaded.y.dtype
    np.testing.assert_array_equal(read.x, loaded.x)
    np.testing.assert_array_equal(read.y, loaded.y)
    assert read.class_names == loaded.class_names
    assert sklearn_digest(read) == sklearn_digest(loaded)


# --------------------------------------------------------------------------- readers: bad data


def test_truncated_idx_names_file_and_byte_counts(tmp_path: Path) -> None:
    images, labels = sample_images()
    path = write_idx(tmp_path / "img.idx", images)
    path.write_bytes(path.read_bytes()[:-7])
    expected = 16 + images.size
    with pytest.raises(DataError) as err:
        read_idx(path, write_idx(tmp_path / "lbl.idx", labels), "data/raw/img.idx", "lbl")
    message = str(err.value)
    assert message.startswith("data/raw/img.idx: truncated")
    assert f"expected {expected} bytes" in message and f"found {expected - 7}" in message


def test_truncated_gzipped_idx(tmp_path: Path) -> None:
    images, labels = sample_images()
    raw = write_idx(tmp_path / "img.idx", images).read_bytes()
    path = tmp_path / "img.idx.gz"
    path.write_bytes(gzip.compress(raw[:-10], mtime=0))  # a valid gzip of a short payload
    with pytest.raises(DataError, match=rf"img.idx.gz: truncated: .* expected {len(raw)} .* found {len(raw) - 10}"):
        read_idx(path, write_idx(tmp_path / "lbl.idx", labels), "img.idx.gz", "lbl")
    path.write_bytes(gzip.compress(raw, mtime=0)[:-30])  # the gzip stream itself cut short
    with pytest.raises(DataError, match="img.idx.gz: truncated or corrupt gzip stream"):
        read_idx(path, write_idx(tmp_path / "lbl.idx", labels), "img.idx.gz", "lbl")


def test_wrong_idx_magic(tmp_path: Path) -> None:
    images, labels = sample_images()
    label_file = write_idx(tmp_path / "lbl.idx", labels)
    with pytest.raises(DataError, match=r"lbl.idx: not an IDX image file: magic number 0x00000801, expected 0x00000803"):
        read_idx(label_file, label_file, "lbl.idx", "lbl.idx")
    bad = write_idx(tmp_path / "img.idx", images, magic=0x0D03)  # float32 data type
    with pytest.raises(DataError, match=r"img.idx: IDX data type 0x0d is not supported"):
        read_idx(bad, label_file, "img.idx", "lbl.idx")
    (tmp_path / "empty").write_bytes(b"")
    with pytest.raises(DataError, match="empty: too short for an IDX header"):
        read_idx(tmp_path / "empty", label_file, "empty", "lbl.idx")


def test_idx_count_mismatch(tmp_path: Path) -> None:
    images, labels = sample_images()
    with pytest.raises(DataError, match=r"lbl.idx: has 29 labels but img.idx has 30 images"):
        read_idx(write_idx(tmp_path / "i", images), write_idx(tmp_path / "l", labels[:-1]), "img.idx", "lbl.idx")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"^data/raw/nope.csv: file not found$"):
        read_csv(tmp_path / "nope.csv", "data/raw/nope.csv", "label")


@pytest.mark.parametrize(
    "rows,message",
    [
        ([["1.0", "nan", "a"]], r"line 3, column 'f2': a missing value \('nan'\); prepare.missing_values=median "
                                r"fills missing values with the train split's median$"),
        ([["1.0", "inf", "a"]], r"line 3, column 'f2': 'inf' is not a finite number"),
        ([["x1", "2", "a"]], r"line 3, column 'f1': not a number: 'x1' \(a column of categories goes in "
                             r"prepare.csv_categorical_columns; prepare.csv_ignore_columns leaves one out; "
                             r"prepare.csv_group_column names whom each row belongs to\)$"),
        ([["2024-03-04", "2", "a"]], r"line 3, column 'f1': not a number: '2024-03-04' \(a date or time: "
                                     r"prepare.csv_time_column: f1 splits the rows in its order, the latest rows the "
                                     r"test split; prepare.csv_ignore_columns leaves it out\)$"),
        ([["1.0", "2"]], r"line 3: expected 3 fields, found 2"),
        ([["1.0", "2", ""]], r"line 3, column 'label': empty label"),
    ],
)
def test_csv_bad_values_name_line_and_column(tmp_path: Path, rows: list[list[str]], message: str) -> None:
    path = write_csv(tmp_path / "t.csv", [["0.5", "0.5", "b"], *rows], ["f1", "f2", "label"])
    with pytest.raises(DataError, match=rf"^t.csv: {message}"):
        read_csv(path, "t.csv", "label")


def test_csv_bad_structure(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "t.csv", [["1", "2", "0"]], ["f1", "f2", "target"])
    with pytest.raises(DataError, match=r"^t.csv: no label column 'label' in the header \(columns: f1, f2, target\)$"):
        read_csv(path, "t.csv", "label")
    (tmp_path / "semi.csv").write_text("amount;visits;label\n0,5;3;1\n1,25;0;0\n")  # a European spreadsheet's CSV
    with pytest.raises(DataError, match=r"^semi.csv: no label column 'label' in the header \(columns: amount;visits;label\); "
                                        r"the header is one column holding ';': the file is separated by ';', and a csv "
                                        r"here is comma-separated"):
        read_csv(tmp_path / "semi.csv", "semi.csv", "label")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(DataError, match="empty.csv: empty file"):
        read_csv(tmp_path / "empty.csv", "empty.csv", "label")


def test_npz_bad_content(tmp_path: Path) -> None:
    x = np.ones((30, 4))
    np.savez(tmp_path / "a.npz", inputs=x, y=np.arange(30) % 3)
    with pytest.raises(DataError, match=r"^a.npz: no array named 'x' \(arrays: inputs, y\)$"):
        read_npz(tmp_path / "a.npz", "a.npz", "x", "y")
    x[7, 2] = np.nan
    np.savez(tmp_path / "b.npz", x=x, y=np.arange(30) % 3)
    with pytest.raises(DataError, match=r"^b.npz: array 'x' has a non-finite value \(nan\) at index \[7, 2\] "
                                        r"\(prepare.missing_values=median fills missing values with the train split's median\)$"):
        read_npz(tmp_path / "b.npz", "b.npz", "x", "y")
    np.savez(tmp_path / "c.npz", x=np.ones((30, 2, 2, 2, 2)), y=np.arange(30) % 3)
    with pytest.raises(DataError, match=r"c.npz: array 'x' has shape \(30, 2, 2, 2, 2\)"):
        read_npz(tmp_path / "c.npz", "c.npz", "x", "y")
    np.savez(tmp_path / "d.npz", x=np.ones((30, 2)), y=np.arange(29) % 3)
    with pytest.raises(DataError, match=r"d.npz: array 'x' has 30 samples but 'y' has 29 labels"):
        read_npz(tmp_path / "d.npz", "d.npz", "x", "y")
    (tmp_path / "e.npz").write_bytes(b"not a zip file at all")
    with pytest.raises(DataError, match=r"^e.npz: cannot read as NPZ"):
        read_npz(tmp_path / "e.npz", "e.npz", "x", "y")


def test_npz_one_hot_labels_are_read_as_class_indices(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Labels as ``keras.utils.to_categorical`` writes them, ``(N, K)`` of 0/1 (any dtype):
    before, refused as "expected 1-D labels"; now each row's 1 is its class, as the same
    labels 1-D give. Soft labels, an empty row and a multi-label row are refused naming it."""
    import logging

    rng = np.random.default_rng(0)
    x, labels = rng.normal(size=(30, 4)), np.arange(30) % 3
    np.savez(tmp_path / "plain.npz", x=x, y=labels)
    for dtype in (np.float32, np.uint8, np.bool_):
        np.savez(tmp_path / "hot.npz", x=x, y=np.eye(3, dtype=dtype)[labels])
        caplog.clear()
        with caplog.at_level(logging.INFO):
            hot = read_npz(tmp_path / "hot.npz", "hot.npz", "x", "y")
        plain = read_npz(tmp_path / "plain.npz", "plain.npz", "x", "y")
        np.testing.assert_array_equal(hot.y, plain.y)
        assert hot.class_names == plain.class_names == ("0", "1", "2")
        assert "hot.npz: array 'y' (30, 3): one-hot rows, each read as the index of its 1 (a label 0..2)" in caplog.text
    bad = {
        "soft": (np.where(np.eye(3)[labels] == 1, 0.8, 0.1), r"^s.npz: array 'y' has shape \(30, 3\) and y\[0, 0\] = "
                                                               r"0.8; expected 1-D labels or one-hot rows"),
        "empty": (np.eye(3)[labels] * (np.arange(30) != 4)[:, None], r"^s.npz: array 'y': one-hot row 4 has no class;"),
        "multi": (np.eye(3)[labels] + np.eye(3)[(labels + 1) % 3] * (np.arange(30) == 5)[:, None],
                  r"^s.npz: array 'y': one-hot row 5 has 2 classes \(multi-label\); a model here predicts one class"),
    }
    for y, message in bad.values():
        np.savez(tmp_path / "s.npz", x=x, y=y)
        with pytest.raises(DataError, match=message):
            read_npz(tmp_path / "s.npz", "s.npz", "x", "y")


def test_unreadable_image_is_named(tmp_path: Path) -> None:
    folder = write_image_folder(tmp_path / "pets")
    (folder / "dog" / "05.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(DataError, match=r"^data/raw/pets/dog/05.png: cannot read image"):
        read_image_folder(folder, "data/raw/pets", (4, 4), "L")


def test_single_class_and_small_class(tmp_path: Path) -> None:
    images, labels = sample_images()
    with pytest.raises(DataError, match=r"^lbl: all 30 samples belong to one class \('0'\); need at least 2 classes$"):
        read_idx(write_idx(tmp_path / "i", images), write_idx(tmp_path / "l", labels * 0), "img", "lbl")
    y = np.array([0] * 10 + [1] * 10 + [2] * 6)
    need = min_samples_per_class(0.15, 0.25)
    assert need == 7  # ceil(1 / 0.15): one sample in val needs 7
    with pytest.raises(DataError, match=r"^f.csv: class 'c' has 6 samples; .* needs at least 7 per class$"):
        check_splittable(y, ("a", "b", "c"), 0.15, 0.25, "f.csv")
    check_splittable(y, ("a", "b", "c"), 0.2, 0.2, "f.csv")  # 6 * 0.2 >= 1: enough


# --------------------------------------------------------------------------- digest


def test_digest_of_a_file_is_its_md5_unless_a_dvc_file_says_otherwise(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "t.csv", tabular_rows(), ["a", "b", "label", "i"])
    assert dvc_digest(path) == hashlib.md5(path.read_bytes()).hexdigest()
    (tmp_path / "t.csv.dvc").write_text("outs:\n- md5: 0123456789abcdef0123456789abcdef\n  path: t.csv\n")
    assert dvc_digest(path) == "0123456789abcdef0123456789abcdef"


@pytest.mark.integration
def test_digest_matches_dvc_add(tmp_path: Path) -> None:
    """Files and folders hash exactly as ``dvc add`` records them (computed before it runs)."""
    dvc = str(Path(sys.executable).parent / "dvc")
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([dvc, "init", "-q"], cwd=tmp_path, check=True)
    folder = write_image_folder(tmp_path / "data" / "raw" / "pets", per_class=2)
    (folder / "cat" / "crlf.txt").write_bytes(b"a\r\nb\r\n")  # DVC 3 hashes text as is
    csv_file = write_csv(tmp_path / "data" / "raw" / "t.csv", tabular_rows(), ["a", "b", "label", "i"])
    computed = {p: dvc_digest(p) for p in (folder, csv_file)}
    subprocess.run([dvc, "add", "-q", str(folder), str(csv_file)], cwd=tmp_path, check=True)
    for path, digest in computed.items():
        recorded = yaml.safe_load(path.with_name(path.name + ".dvc").read_text())["outs"][0]["md5"]
        assert digest == recorded
        assert dvc_digest(path) == recorded  # now read back from the .dvc file
    assert computed[folder].endswith(".dir")


def test_the_paths_prepare_names_are_checked_before_a_run(tmp_path: Path) -> None:
    """`slimflow run` refuses a raw path that is not there (or of the wrong kind) in one line
    before anything starts; a path DVC tracks but the workspace lacks says how to fetch it."""
    from tasks.core.config import ParamsError, PrepareParams
    from tasks.sources import check_raw_data

    (tmp_path / "data" / "images" / "cat").mkdir(parents=True)
    (tmp_path / "data" / "rows.csv").write_text("a,label\n1,0\n")
    (tmp_path / "data" / "pulled.npz.dvc").write_text("outs:\n- md5: 0\n  path: pulled.npz\n")

    def refusal(**prepare: str) -> str:
        with pytest.raises(ParamsError) as caught:
            check_raw_data(PrepareParams(**prepare), tmp_path)
        return str(caught.value)

    assert refusal(source="csv", path="data/nope.csv") == "params.yaml: prepare.path: data/nope.csv: not found"
    assert refusal(source="npz", path="data/pulled.npz") == (
        "params.yaml: prepare.path: data/pulled.npz: not found (tracked by DVC: `dvc pull data/pulled.npz.dvc` fetches it)")
    assert refusal(source="csv", path="data/images") == (
        "params.yaml: prepare.path: data/images: not a file (source csv reads one)")
    assert refusal(source="image_folder", path="data/rows.csv").startswith(
        "params.yaml: prepare.path: data/rows.csv: not a folder (source image_folder reads one sub-folder per class)")
    assert refusal(source="idx", path="data/rows.csv", labels_path="data/labels.idx").startswith(
        "params.yaml: prepare.labels_path: data/labels.idx: not found")
    assert check_raw_data(PrepareParams(source="csv", path="data/rows.csv"), tmp_path) is None
    assert check_raw_data(PrepareParams(source="image_folder", path="data/images"), tmp_path) is None
    assert check_raw_data(PrepareParams(source="digits", path="data/ignored"), tmp_path) is None
