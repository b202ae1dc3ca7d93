"""The prepare stage: every raw format, the checks on bad data, the outputs and their determinism.

Each test writes its own small raw files under ``tmp_path``. The MLflow and DVC tests
are marked ``integration``.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import yaml

from tasks.core.config import PrepareParams
from tasks.data import SPLITS, Preprocessing, load_preprocessing, load_split
from tasks.prepare import main, prepare_data, stratified_split, write_prepared
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

REPO = Path(__file__).resolve().parents[1]
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


def make_project(root: Path, prepare: dict, seed: int = 42) -> Path:
    """The least a project needs: params.yaml, an empty dvc.yaml and data/raw."""
    (root / "data" / "raw").mkdir(parents=True, exist_ok=True)
    (root / "dvc.yaml").write_text("stages: {}\n")
    (root / "params.yaml").write_text(yaml.safe_dump({"base": {"seed": seed}, "prepare": prepare}))
    return root


def read_outputs(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


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
        ([["1.0", "nan", "a"]], r"line 3, column 'f2': 'nan' is not a finite number"),
        ([["1.0", "inf", "a"]], r"line 3, column 'f2': 'inf' is not a finite number"),
        ([["x1", "2", "a"]], r"line 3, column 'f1': not a number: 'x1'"),
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
    path = write_csv(tmp_path / "neg.csv", [["1", "0"], ["2", "-1"]], ["f1", "label"])
    with pytest.raises(DataError, match=r"^neg.csv: line 3, column 'label': label -1 is out of range"):
        read_csv(path, "neg.csv", "label")
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
    with pytest.raises(DataError, match=r"^b.npz: array 'x' has a non-finite value \(nan\) at index \[7, 2\]$"):
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


# --------------------------------------------------------------------------- prepare_data / write_prepared


def csv_params(**changes: object) -> PrepareParams:
    return PrepareParams(source="csv", path="data/raw/iris.csv", csv_label_column="species", **changes)


@pytest.fixture
def csv_root(tmp_path: Path) -> Path:
    rows = [r[:3] for r in tabular_rows(per_class=20)]
    write_csv(tmp_path / "data" / "raw" / "iris.csv", rows, ["a", "b", "species"])
    return tmp_path


def test_prepare_writes_the_contract(csv_root: Path, tmp_path: Path) -> None:
    prepared = prepare_data(csv_params(), 42, csv_root)
    out = tmp_path / "data" / "prepared"
    write_prepared(prepared, out)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["card.json", "preprocess.json", *(f"{s}_{a}.npy" for s in SPLITS for a in "xy")]
    )
    train_x = np.load(out / "train_x.npy")
    assert train_x.dtype == np.float32 and np.load(out / "train_y.npy").dtype == np.int64
    # Statistics come from the train split only.
    assert load_preprocessing(out) == Preprocessing.fit(train_x, 3, ["setosa", "versicolor", "virginica"])
    assert load_split(out, "test").x.shape[1:] == (2,)

    card = json.loads((out / "card.json").read_text())
    raw_file = csv_root / "data" / "raw" / "iris.csv"
    assert card["source"] == "csv" and card["path"] == "data/raw/iris.csv"
    assert card["digest"] == hashlib.md5(raw_file.read_bytes()).hexdigest()
    assert card["num_samples"] == 60 and card["input_shape"] == [2] and card["dtype"] == "float32"
    assert card["class_names"] == ["setosa", "versicolor", "virginica"] and card["seed"] == 42
    assert card["split_sizes"] == {"train": 36, "val": 9, "test": 15}
    assert card["counts"]["test"] == {"setosa": 5, "versicolor": 5, "virginica": 5}
    assert card["fractions"] == {"train": 0.6, "val": 0.15, "test": 0.25}
    all_x = np.concatenate([np.load(out / f"{s}_x.npy") for s in SPLITS])
    assert card["value_range"] == {"min": float(all_x.min()), "max": float(all_x.max())}
    assert (out / "card.json").read_text() == json.dumps(card, indent=2, sort_keys=True) + "\n"


def test_prepare_image_sources(tmp_path: Path) -> None:
    images, labels = sample_images()
    write_idx(tmp_path / "data/raw/img.idx.gz", images, gz=True)
    write_idx(tmp_path / "data/raw/lbl.idx", labels)
    params = PrepareParams(source="idx", path="data/raw/img.idx.gz", labels_path="data/raw/lbl.idx", val_fraction=0.2, test_fraction=0.2)
    prepared = prepare_data(params, 0, tmp_path)
    assert prepared.preprocessing.input_shape == (1, HEIGHT, WIDTH) and len(prepared.preprocessing.mean) == 1
    assert prepared.card["labels_digest"] == hashlib.md5((tmp_path / "data/raw/lbl.idx").read_bytes()).hexdigest()
    assert sum(prepared.card["split_sizes"].values()) == 30

    write_image_folder(tmp_path / "data/raw/pets")
    params = PrepareParams(source="image_folder", path="data/raw/pets", image_size=(4, 3), image_mode="RGB", val_fraction=0.2, test_fraction=0.2)
    prepared = prepare_data(params, 0, tmp_path)
    assert prepared.splits["train"][0].shape[1:] == (3, 4, 3) and len(prepared.preprocessing.mean) == 3
    assert prepared.card["digest"].endswith(".dir") and prepared.card["class_names"] == ["cat", "dog", "owl"]


def test_prepare_digits_default() -> None:
    prepared = prepare_data(PrepareParams(), 42, REPO)
    assert prepared.card["source"] == "digits" and prepared.card["path"] is None
    assert prepared.source_uri == "sklearn:digits" and len(prepared.digest) == 32
    assert prepared.card["input_shape"] == [1, 8, 8] and prepared.card["value_range"] == {"min": 0.0, "max": 16.0}
    sizes = prepared.card["split_sizes"]
    assert sum(sizes.values()) == 1797 and 440 <= sizes["test"] <= 450


def test_same_params_give_byte_identical_outputs(csv_root: Path, tmp_path: Path) -> None:
    write_prepared(prepare_data(csv_params(), 7, csv_root), tmp_path / "one")
    write_prepared(prepare_data(csv_params(), 7, csv_root), tmp_path / "two")
    assert read_outputs(tmp_path / "one") == read_outputs(tmp_path / "two")


def test_new_seed_new_split_same_proportions(csv_root: Path) -> None:
    first, second = (prepare_data(csv_params(), seed, csv_root) for seed in (1, 2))
    assert first.card["counts"] == second.card["counts"]
    assert not np.array_equal(first.splits["train"][0], second.splits["train"][0])
    assert first.digest == second.digest


def test_stratified_split_partitions_every_class() -> None:
    y = np.repeat(np.arange(4), [7, 20, 33, 100])
    index = stratified_split(y, 4, 0.15, 0.25, seed=3)
    together = np.concatenate([index[s] for s in SPLITS])
    assert sorted(together.tolist()) == list(range(len(y)))  # a partition
    for split in SPLITS:
        assert set(np.bincount(y[index[split]], minlength=4).tolist()).isdisjoint({0})
    assert np.bincount(y[index["test"]]).tolist() == [1, 5, 8, 25]


def test_write_failure_keeps_the_earlier_outputs(csv_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "data" / "prepared"
    write_prepared(prepare_data(csv_params(), 1, csv_root), out)
    before = read_outputs(out)
    prepared = prepare_data(csv_params(), 2, csv_root)
    calls = []

    def failing_save(*args: object, **kwargs: object) -> None:
        calls.append(args)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        with open(args[0], "wb") as handle:  # type: ignore[call-overload]
            np.lib.format.write_array(handle, args[1])  # type: ignore[arg-type]

    monkeypatch.setattr(np, "save", failing_save)
    with pytest.raises(OSError, match="No space left"):
        write_prepared(prepared, out)
    monkeypatch.undo()
    assert read_outputs(out) == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["prepared", "raw"]  # no temp folder left
    write_prepared(prepared, out)  # and a later write replaces it whole
    assert read_outputs(out) != before
    assert sorted(p.name for p in out.parent.iterdir()) == ["prepared", "raw"]


# --------------------------------------------------------------------------- the command line


def _truncated_idx(raw: Path) -> dict:
    images, labels = sample_images()
    path = write_idx(raw / "img.idx", images)
    path.write_bytes(path.read_bytes()[:100])
    write_idx(raw / "lbl.idx", labels)
    return {"source": "idx", "path": "data/raw/img.idx", "labels_path": "data/raw/lbl.idx"}


def _wrong_magic(raw: Path) -> dict:
    images, labels = sample_images()
    write_idx(raw / "img.idx", images, magic=0x00000802)
    write_idx(raw / "lbl.idx", labels)
    return {"source": "idx", "path": "data/raw/img.idx", "labels_path": "data/raw/lbl.idx"}


def _count_mismatch(raw: Path) -> dict:
    images, labels = sample_images()
    write_idx(raw / "img.idx.gz", images, gz=True)
    write_idx(raw / "lbl.idx.gz", labels[:20], gz=True)
    return {"source": "idx", "path": "data/raw/img.idx.gz", "labels_path": "data/raw/lbl.idx.gz"}


def _nan_csv(raw: Path) -> dict:
    rows = [r[:3] for r in tabular_rows()]
    rows[4][1] = "NaN"
    write_csv(raw / "t.csv", rows, ["a", "b", "label"])
    return {"source": "csv", "path": "data/raw/t.csv"}


def _no_label_column(raw: Path) -> dict:
    write_csv(raw / "t.csv", [r[:3] for r in tabular_rows()], ["a", "b", "species"])
    return {"source": "csv", "path": "data/raw/t.csv"}


def _bad_image(raw: Path) -> dict:
    write_image_folder(raw / "pets")
    (raw / "pets" / "owl" / "03.png").write_bytes(b"truncated")
    return {"source": "image_folder", "path": "data/raw/pets"}


def _single_class(raw: Path) -> dict:
    np.savez(raw / "d.npz", x=np.ones((30, 3)), y=np.zeros(30, dtype=np.int64))
    return {"source": "npz", "path": "data/raw/d.npz"}


def _small_class(raw: Path) -> dict:
    rows = [r[:3] for r in tabular_rows() if r[2] != "versicolor"] + [[0.1, 0.2, "versicolor"]] * 4
    write_csv(raw / "t.csv", rows, ["a", "b", "label"])
    return {"source": "csv", "path": "data/raw/t.csv"}


BAD_DATA: dict[str, tuple[Callable[[Path], dict], str]] = {
    "truncated idx": (_truncated_idx, r"data/raw/img.idx: truncated: .*expected 916 bytes .*found 100"),
    "wrong magic": (_wrong_magic, r"data/raw/img.idx: not an IDX image file: magic number 0x00000802"),
    "count mismatch": (_count_mismatch, r"data/raw/lbl.idx.gz: has 20 labels but data/raw/img.idx.gz has 30 images"),
    "nan in csv": (_nan_csv, r"data/raw/t.csv: line 6, column 'b': 'NaN' is not a finite number"),
    "no label column": (_no_label_column, r"data/raw/t.csv: no label column 'label'"),
    "unreadable image": (_bad_image, r"data/raw/pets/owl/03.png: cannot read image"),
    "single class": (_single_class, r"data/raw/d.npz: all 30 samples belong to one class \('0'\)"),
    "class too small": (_small_class, r"data/raw/t.csv: class 'versicolor' has 4 samples; .* at least 7"),
}


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_cli_bad_data_one_message_no_outputs(
    case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    writer, pattern = BAD_DATA[case]
    raw = tmp_path / "project" / "data" / "raw"
    raw.mkdir(parents=True)
    root = make_project(tmp_path / "project", writer(raw))
    monkeypatch.delenv("SLIMFLOW_ROOT", raising=False)
    monkeypatch.delenv("SLIMFLOW_RUN_CONTEXT", raising=False)
    monkeypatch.chdir(root)
    assert main([]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert re.fullmatch(rf"error: prepare: {pattern}.*\n", err), err
    assert sorted(p.name for p in (root / "data").iterdir()) == ["raw"]  # nothing prepared, no temp folder


def test_cli_failure_keeps_earlier_good_outputs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    root = make_project(tmp_path, _nan_csv(tmp_path / "data" / "raw"))
    good = csv_params()
    write_csv(tmp_path / "data" / "raw" / "iris.csv", [r[:3] for r in tabular_rows()], ["a", "b", "species"])
    write_prepared(prepare_data(good, 42, root), root / "data" / "prepared")
    before = read_outputs(root / "data" / "prepared")
    monkeypatch.setenv("SLIMFLOW_ROOT", str(root))
    assert main([]) == 2
    assert read_outputs(root / "data" / "prepared") == before
    assert main(["--set", "prepare.val_fraction=0.9"]) == 2
    assert capsys.readouterr().err.splitlines()[-1].startswith("error: prepare: params.yaml: prepare: ")


def test_cli_subprocess_exit_code_and_stderr(tmp_path: Path) -> None:
    root = make_project(tmp_path, _no_label_column(tmp_path / "data" / "raw"))
    from tasks.core.run_context import RunContext

    context = RunContext(error_file=str(tmp_path / "stage.error"))
    env = {**os.environ, "PYTHONPATH": str(REPO), **context.as_env()}
    env.pop("SLIMFLOW_ROOT", None)
    done = subprocess.run([sys.executable, "-m", "tasks.prepare"], cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    message = "prepare: data/raw/t.csv: no label column 'label' in the header (columns: a, b, species)"
    assert done.stderr == f"error: {message}\n"
    assert (tmp_path / "stage.error").read_text() == message + "\n"  # handed to the flow
    assert not (root / "data" / "prepared").exists()


@pytest.mark.integration
def test_cli_logs_dataset_digest_to_mlflow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mlflow_uri: str) -> None:
    import mlflow

    root = make_project(tmp_path / "project", {"source": "csv", "path": "data/raw/iris.csv", "csv_label_column": "species"})
    raw_file = write_csv(root / "data" / "raw" / "iris.csv", [r[:3] for r in tabular_rows()], ["a", "b", "species"])
    expected = hashlib.md5(raw_file.read_bytes()).hexdigest()  # what `dvc add` records for a file
    monkeypatch.setenv("SLIMFLOW_ROOT", str(root))
    assert main([]) == 0

    runs = mlflow.search_runs(experiment_names=["slimflow"], output_format="list")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.tags["data_digest"] == expected
    (dataset_input,) = run.inputs.dataset_inputs
    assert dataset_input.dataset.digest == expected
    assert json.loads(dataset_input.dataset.source) == {"uri": "data/raw/iris.csv"}
    assert {t.key: t.value for t in dataset_input.tags}["mlflow.data.context"] == "training"
    assert run.data.metrics["num_samples"] == 30 and run.data.metrics["num_train"] == 21
    card = mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/data_card.json")
    assert card == json.loads((root / "data" / "prepared" / "card.json").read_text())
    assert card["digest"] == expected

    # A built-in set is logged with an `sklearn:` source and the digest of its canonical bytes.
    assert main(["--set", "prepare.source=digits", "--set", "prepare.path=null"]) == 0
    latest = mlflow.search_runs(experiment_names=["slimflow"], output_format="list", order_by=["start_time DESC"])[0]
    (dataset_input,) = latest.inputs.dataset_inputs
    assert dataset_input.dataset.source_type == "sklearn" and dataset_input.dataset.name == "digits"
    assert json.loads(dataset_input.dataset.source) == {"uri": "sklearn:digits"}
    assert dataset_input.dataset.digest == sklearn_digest(load_sklearn("digits"))
