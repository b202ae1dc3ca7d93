"""The prepare stage: read the raw data, validate it, split it, and write ``data/prepared``.

:func:`prepare_data` is a pure function of the parameters and the raw files (it writes
nothing); :func:`write_prepared` writes its result atomically; :func:`main` is the
command-line entry the DVC stage runs (``python -m tasks.prepare``). The layout of the
output is the contract in :mod:`tasks.data`.
"""

from __future__ import annotations

# In a pipeline run or a `dvc repro` this process becomes a child of a fork server (tasks.core.fork_server)
# before it imports anything else: the imports below took the entry 0.1-0.3 s for nothing.
if __name__ == "__main__":
    from tasks.core.dvc_fork_server import run_stage_forked

    run_stage_forked("tasks.prepare", light=True)  # numpy and MLflow: it runs while the server loads

import dataclasses
import json
import logging
import os
import secrets
import shutil
import warnings
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tasks.data import GROUPS_FILE, ROWS_FILE, SPLITS, Preprocessing, decode_table, row_fingerprints, text_fingerprints
from tasks.core.classification import index_names
from tasks.core.config import BUILTIN_SOURCES
from tasks.core.errors import disk_full_message, report_stage_error, stage_main
from tasks.core.processes import die_with_parent, exit_process
from tasks.core.stage_cli import parse_stage_args
from tasks.core.paths import ProjectPaths
from tasks.sources.rows import (
    HEAVY_TAIL_SKEWNESS, chosen_log_features, chosen_npz_layout, feature_list, fill_values_from_train,
    heavy_tailed_features, missing_counts, missing_line, npz_layout_line,
)
from tasks.sources.splits import duplicates_lines, groups_line, split_groups, split_samples
from tasks.sources.time_split import split_by_time, time_line
from tasks.sources import (
    DataError,
    RawData,
    RawText,
    check_splittable,
    dvc_digest,
    encode,
    load_sklearn,
    npz_channels_line,
    read_csv,
    read_idx,
    read_image_folder,
    read_npz,
    read_text_folder,
    read_text_table,
    sklearn_digest,
    tokenizer_card,
    train_tokenizer,
)

if TYPE_CHECKING:
    from tasks.core.config import PrepareParams

logger = logging.getLogger("slimflow.prepare")

TOKENIZER_FILE = "tokenizer.json"


@dataclass(frozen=True)
class PreparedData:
    """The result of :func:`prepare_data`: raw float32 splits, train-split statistics, data card."""

    splits: dict[str, tuple[np.ndarray, np.ndarray]]  # split -> (x float32 raw, y int64)
    preprocessing: Preprocessing
    card: dict[str, Any]
    tokenizer_json: str | None = None  # text: the tokenizer trained on the train split
    rows: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # split -> each sample's fingerprint
    # prepare.csv_group_column: split -> each sample's group (0..G-1, the same in every split)
    groups: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

    @property
    def digest(self) -> str:
        return str(self.card["digest"])

    @property
    def source_uri(self) -> str:
        """Where the data came from: the raw path, or ``sklearn:<name>`` for a built-in set."""
        return self.card["path"] or f"sklearn:{self.card['source']}"


def read_raw(params: PrepareParams, root: Path) -> tuple[RawData | RawText, dict[str, Any]]:
    """Read and validate the configured source; returns the data and its provenance for the card."""
    if params.source in BUILTIN_SOURCES:
        raw = load_sklearn(params.source)
        return raw, {"source": params.source, "path": None, "digest": sklearn_digest(raw)}
    assert params.path is not None  # PrepareParams guarantees it for file sources
    path = root / params.path
    if params.source == "idx":
        assert params.labels_path is not None
        labels = root / params.labels_path
        raw = read_idx(path, labels, params.path, params.labels_path)
        extra = {"labels_path": params.labels_path, "labels_digest": dvc_digest(labels)}
    elif params.source == "npz":
        missing = params.missing_values == "median"
        raw, extra = read_npz(path, params.path, params.npz_inputs, params.npz_labels, missing,
                              params.npz_channels), {}
    elif params.source == "csv":
        raw = read_csv(path, params.path, params.csv_label_column, params.csv_ignore_columns,
                       params.missing_values == "median", params.csv_categorical_columns, params.csv_group_column,
                       params.csv_time_column, params.csv_time_format)
        extra = {"label_column": params.csv_label_column,
                 **({"ignored_columns": list(params.csv_ignore_columns)} if params.csv_ignore_columns else {})}
    elif params.source == "image_folder":
        raw = read_image_folder(path, params.path, tuple(params.image_size), params.image_mode)
        extra = {"image_mode": params.image_mode, "image_size": list(params.image_size)}
    elif params.source == "text_table":
        raw = read_text_table(path, params.path, params.text_column, params.csv_label_column)
        extra = {"text_column": params.text_column, "label_column": params.csv_label_column}
    elif params.source == "text_folder":
        raw, extra = read_text_folder(path, params.path), {}
    else:
        raise DataError(f"prepare.source: unknown source {params.source!r}")
    return raw, {"source": params.source, "path": params.path, "digest": dvc_digest(path), **extra}


def prepare_data(params: PrepareParams, seed: int, root: Path) -> PreparedData:
    """Read, validate and split the raw data; fit the normalization on the train split. Writes nothing."""
    raw, provenance = read_raw(params, root)
    # Class sizes are a property of the labels: for IDX, name the label file.
    shown = (params.labels_path if params.source == "idx" else params.path) or f"sklearn:{params.source}"
    check_splittable(raw.y, raw.class_names, params.val_fraction, params.test_fraction, shown)
    if isinstance(raw, RawText):
        return _prepare_text(raw, provenance, params, seed, shown)
    if params.npz_layout == "sequences" and not raw.channel_added:
        raise DataError(f"params.yaml: prepare.npz_layout: sequences: {shown}'s array {params.npz_inputs!r} is not 3-D "
                        f"(one sample: {tuple(raw.x.shape[1:])}); sequences are an (N, T, F) array")
    if params.npz_channels != "auto" and (raw.x.ndim != 4 or raw.channel_added):
        raise DataError(f"params.yaml: prepare.npz_channels: {params.npz_channels}: {shown}'s array "
                        f"{params.npz_inputs!r} is not 4-D (one sample: {raw.file_shape}); channels are the second "
                        "or the last axis of an (N, C, H, W) or (N, H, W, C) array")
    file_shape = raw.file_shape
    x, y, class_names = raw
    feature_names, integer_features = raw.feature_names, raw.integer_features
    columns, categorical, channel_added, moved = raw.columns, raw.categorical, raw.channel_added, raw.channels_last
    group_names, groups, times, time_kind = raw.groups, None, raw.times, raw.time_kind
    del raw
    value_range = {"min": float(np.nanmin(x)), "max": float(np.nanmax(x))}
    widths = {c.name: len(c.values) for c in categorical}  # a column of categories: one feature per category
    grouped = timed = duplicates = None
    if times is not None:  # prepare.csv_time_column: the earliest rows train, the latest test
        index, timed = split_by_time(times, time_kind, y, class_names, str(params.csv_time_column),
                                     params.val_fraction, params.test_fraction, seed, shown)
    elif group_names is not None:  # prepare.csv_group_column: a group's rows are the records, kept in one split
        index, grouped, groups = split_groups(group_names, y, class_names, str(params.csv_group_column),
                                              params.val_fraction, params.test_fraction, seed, shown)
    else:
        index, duplicates = split_samples(x, y, class_names, params.duplicates, params.val_fraction,
                                          params.test_fraction, seed, shown, [widths.get(c, 1) for c in columns])
    splits = {split: (x[index[split]], y[index[split]]) for split in SPLITS}
    missing = missing_counts(x) if params.missing_values == "median" else {}
    fill_values = fill_values_from_train(splits, feature_names, shown) if params.missing_values == "median" else ()
    num_samples, input_shape = len(x), [int(d) for d in x.shape[1:]]
    # Drop the full array before the statistics: fit() needs a float64 temporary of the train split.
    del x
    log_features = chosen_log_features(params.log_features, splits["train"][0], feature_names, categorical)
    preprocessing = Preprocessing.fit(splits["train"][0], len(class_names), list(class_names), log_features,
                                      feature_names, integer_features, fill_values)
    npz_layout = (chosen_npz_layout(params.npz_layout, splits["train"][0], preprocessing.std[0])
                  if channel_added and params.source == "npz" else None)
    if npz_layout and npz_layout["layout"] == "sequences":  # fitted again: a mean and std per feature
        preprocessing = Preprocessing.fit(splits["train"][0], len(class_names), list(class_names), log_features,
                                          feature_names, integer_features, fill_values, sequence_features=True)
    if categorical:
        preprocessing = dataclasses.replace(preprocessing, columns=columns, categorical=categorical)
    if channel_added or moved:  # the registered model takes samples as the file holds them
        preprocessing = dataclasses.replace(preprocessing, raw_shape=file_shape, channels_last=moved)
    card = _card(provenance, num_samples, input_shape, value_range, class_names, splits, params, seed)
    if duplicates:
        card["duplicates"] = duplicates
    if grouped:
        card["groups"] = grouped
    if timed:
        card["time"] = timed
    if npz_layout:
        card["npz_layout"] = npz_layout
    if params.source == "npz" and len(input_shape) == 3 and not channel_added:
        card["npz_channels"] = {"channels": "last" if moved else "first", "setting": params.npz_channels,
                                "file_shape": list(file_shape)}
    if log_features:
        card["log_features"] = list(log_features)
    if feature_names:
        card["feature_names"] = list(feature_names)
    if integer_features:
        card["integer_features"] = list(integer_features)
    if categorical:
        card["columns"] = list(columns)
        card["categorical"] = {c.name: {"dtype": c.dtype, "values": list(c.values)} for c in categorical}
    if fill_values:  # the raw data's gaps per feature, and what the train split filled them with
        names = feature_names or tuple(f"x{i}" for i in range(len(fill_values)))
        card["missing_values"] = {"filled_with": "train-split median",
                                  "counts": {names[i]: n for i, n in missing.items()},
                                  "fill_values": {names[i]: fill_values[i] for i in missing}}
    rows = {split: row_fingerprints(preprocessing, splits[split][0]) for split in SPLITS}
    return PreparedData(splits=splits, preprocessing=preprocessing, card=card, rows=rows,
                        groups={} if groups is None else {split: groups[index[split]] for split in SPLITS})


def _prepare_text(
    raw: RawText, provenance: dict[str, Any], params: PrepareParams, seed: int, shown: str
) -> PreparedData:
    """Split the texts, train the tokenizer on the train split only, store every split as token ids."""
    texts, y, class_names = raw
    index, duplicates = split_samples(texts, y, class_names, params.duplicates, params.val_fraction,
                                      params.test_fraction, seed, shown)
    split_texts = {split: [texts[i] for i in index[split]] for split in SPLITS}
    tokenizer = train_tokenizer(split_texts["train"], params.text_vocab_size, params.text_max_length, params.text_lowercase)
    ids = {split: encode(tokenizer, split_texts[split]) for split in SPLITS}
    splits = {split: (ids[split], y[index[split]]) for split in SPLITS}
    preprocessing = Preprocessing.for_tokens(params.text_max_length, tokenizer.get_vocab_size(), list(class_names))
    value_range = {"min": float(min(a.min() for a in ids.values())), "max": float(max(a.max() for a in ids.values()))}
    card = _card(provenance, len(texts), [params.text_max_length], value_range, class_names, splits, params, seed)
    card.update(dtype="float32 token ids (0 = padding)", tokenizer=tokenizer_card(tokenizer, ids, split_texts))
    if duplicates:
        card["duplicates"] = duplicates
    rows = {split: text_fingerprints(split_texts[split]) for split in SPLITS}
    return PreparedData(splits=splits, preprocessing=preprocessing, card=card, tokenizer_json=tokenizer.to_str(),
                        rows=rows)


def class_index_line(class_names: list[str]) -> str | None:
    """What each output index of the models means, where it is not the label itself (None
    for labels 0..K-1): ``classes (a model predicts the index): 0 = '-1', 1 = '1'``."""
    if class_names == [str(i) for i in range(len(class_names))]:
        return None
    return f"classes (a model predicts the index; all in preprocess.json): {index_names(class_names)}"


def _card(
    provenance: dict[str, Any], num_samples: int, input_shape: list[int], value_range: dict[str, float],
    class_names: tuple[str, ...], splits: dict[str, tuple[np.ndarray, np.ndarray]], params: PrepareParams, seed: int,
) -> dict[str, Any]:
    return {
        **provenance,
        "num_samples": num_samples,
        "input_shape": input_shape,
        "dtype": "float32",
        "value_range": value_range,
        "num_classes": len(class_names),
        "class_names": list(class_names),
        "split_sizes": {split: int(len(splits[split][1])) for split in SPLITS},
        "counts": {
            split: {
                name: int(count)
                for name, count in zip(class_names, np.bincount(splits[split][1], minlength=len(class_names)))
            }
            for split in SPLITS
        },
        "fractions": {
            "train": round(1.0 - params.val_fraction - params.test_fraction, 10),
            "val": params.val_fraction,
            "test": params.test_fraction,
        },
        "seed": seed,
    }


def card_json(card: dict[str, Any]) -> str:
    """Deterministic JSON: sorted keys, fixed indentation, no timestamps."""
    return json.dumps(card, indent=2, sort_keys=True) + "\n"


def write_prepared(prepared: PreparedData, out_dir: Path) -> None:
    """Write the splits, ``preprocess.json`` and ``card.json`` into ``out_dir``, all or nothing.

    Everything goes into a temporary sibling folder that is then renamed into place; an
    earlier ``out_dir`` is replaced only once the new one is complete.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    token = f"{os.getpid()}-{secrets.token_hex(4)}"
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{token}")
    os.mkdir(tmp)  # not mkdtemp: that makes the folder 0700, and it becomes out_dir
    try:
        for split, (x, y) in prepared.splits.items():
            np.save(tmp / f"{split}_x.npy", np.ascontiguousarray(x, dtype=np.float32), allow_pickle=False)
            np.save(tmp / f"{split}_y.npy", np.ascontiguousarray(y, dtype=np.int64), allow_pickle=False)
            if split in prepared.rows:
                np.save(tmp / ROWS_FILE.format(split=split), prepared.rows[split], allow_pickle=False)
            if split in prepared.groups:
                np.save(tmp / GROUPS_FILE.format(split=split), prepared.groups[split].astype(np.int64), allow_pickle=False)
        (tmp / "preprocess.json").write_text(prepared.preprocessing.to_json(), encoding="utf-8")
        if prepared.tokenizer_json is not None:
            (tmp / TOKENIZER_FILE).write_text(prepared.tokenizer_json, encoding="utf-8")
        (tmp / "card.json").write_text(card_json(prepared.card), encoding="utf-8")
        _swap_in(tmp, out_dir, token)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _swap_in(new: Path, target: Path, token: str) -> None:
    # rename(2) cannot replace a non-empty folder, so the old one steps aside first.
    if not target.exists() and not target.is_symlink():
        os.replace(new, target)
        return
    old = target.with_name(f".{target.name}.old-{token}")
    os.replace(target, old)
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(old, target)
        raise
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink()


# --------------------------------------------------------------------------- MLflow


def log_prepared(prepared: PreparedData) -> None:
    """Log the train split as an MLflow dataset input (digest = the DVC md5), the card and counts."""
    import mlflow

    x_train, y_train = prepared.splits["train"]
    source = prepared.source_uri
    if source.startswith("sklearn:"):
        _register_sklearn_source()
    name = Path(prepared.card["path"]).name if prepared.card["path"] else prepared.card["source"]
    with warnings.catch_warnings():
        # A relative path matches MLflow's "local" source twice (a duplicate registration); harmless.
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
        # MLflow's hint that int64 columns cannot hold gaps: a column with a gap is double here already.
        warnings.filterwarnings("ignore", message="Hint: Inferred schema contains integer column")
        dataset = _training_dataset(prepared, source, name)
        mlflow.log_input(dataset, context="training")  # MLflow infers the table's schema here
    mlflow.log_dict(prepared.card, "data_card.json")
    mlflow.log_text(prepared.preprocessing.to_json(), "preprocess.json")
    if prepared.tokenizer_json is not None:
        mlflow.log_text(prepared.tokenizer_json, TOKENIZER_FILE)
    sizes = prepared.card["split_sizes"]
    copies = prepared.card.get("duplicates")
    mlflow.log_metrics(
        {
            "num_samples": prepared.card["num_samples"],
            "num_classes": prepared.card["num_classes"],
            **{f"num_{split}": sizes[split] for split in SPLITS},
            # where the data holds copies of a record: its distinct records, and the test
            # samples that are copies of a training sample in this split
            **({} if copies is None else {"num_distinct_samples": copies["distinct"],
                                          "num_test_copies_of_train": copies["test_copies_of_train"][copies["copies"]]}),
        }
    )


def _training_dataset(prepared: PreparedData, source: str, name: str) -> Any:
    """The train split as an MLflow dataset: rows whose file names its columns as a table of
    those columns (typed, categories as their values) and the label's class names, so the
    run's Datasets panel shows the columns the registered model takes; anything else as arrays."""
    import mlflow

    x_train, y_train = prepared.splits["train"]
    preprocessing = prepared.preprocessing
    if not preprocessing.feature_names:
        return mlflow.data.from_numpy(x_train, targets=y_train, source=source, name=name, digest=prepared.digest)
    frame = decode_table(preprocessing, x_train)  # the raw columns, typed as the registered model takes them
    label = prepared.card.get("label_column") or "label"
    frame[label] = np.asarray(preprocessing.class_names, dtype=object)[y_train]
    return mlflow.data.from_pandas(frame, targets=label, source=source, name=name, digest=prepared.digest)


@cache
def _register_sklearn_source() -> None:
    """Teach MLflow the ``sklearn:<name>`` URI of the built-in sets (once per process)."""
    from mlflow.data.dataset_source import DatasetSource
    from mlflow.data.dataset_source_registry import register_dataset_source

    class SklearnDatasetSource(DatasetSource):
        """A data set bundled with scikit-learn, e.g. ``sklearn:digits``."""

        def __init__(self, uri: str) -> None:
            self.uri = uri

        @staticmethod
        def _get_source_type() -> str:
            return "sklearn"

        def load(self) -> Any:
            from sklearn import datasets

            return getattr(datasets, f"load_{self.uri.removeprefix('sklearn:')}")()

        @staticmethod
        def _can_resolve(raw_source: Any) -> bool:
            return isinstance(raw_source, str) and raw_source.startswith("sklearn:")

        @classmethod
        def _resolve(cls, raw_source: Any) -> SklearnDatasetSource:
            return cls(str(raw_source))

        def to_dict(self) -> dict[str, Any]:
            return {"uri": self.uri}

        @classmethod
        def from_dict(cls, source_dict: dict[Any, Any]) -> SklearnDatasetSource:
            return cls(str(source_dict["uri"]))

    register_dataset_source(SklearnDatasetSource)


# --------------------------------------------------------------------------- CLI


@stage_main("prepare", lambda: ProjectPaths.discover().prepared)
def main(argv: list[str] | None = None) -> int:
    """``python -m tasks.prepare [--set base.seed=7 ...]``: prepare ``data/prepared`` from params.yaml."""
    args = parse_stage_args("prepare", __doc__.splitlines()[0], argv, "prepare.val_fraction=0.2")
    from tasks.core.config import ParamsError, load_params

    paths = ProjectPaths.discover()
    try:
        params = load_params(paths.params, args.overrides)
        # Everything is read and validated before a run is opened or a file is written.
        prepared = prepare_data(params.prepare, params.base.seed, paths.root)
    except (DataError, ParamsError) as err:
        report_stage_error("prepare", str(err))
        return 2
    card = prepared.card
    logger.info(
        "%s: %d samples, input %s, %d classes -> train %d / val %d / test %d (digest %s)",
        prepared.source_uri, card["num_samples"], tuple(card["input_shape"]), card["num_classes"],
        *(card["split_sizes"][split] for split in SPLITS), prepared.digest,
    )
    if (classes := class_index_line(card["class_names"])) is not None:
        logger.info("%s", classes)
    if duplicates := card.get("duplicates"):
        for level, line in duplicates_lines(duplicates, card["split_sizes"]["test"]):
            logger.log(level, "%s", line)
    if grouped := card.get("groups"):
        logger.info("%s", groups_line(grouped))
    if timed := card.get("time"):
        logger.info("%s", time_line(timed))
    if layout := card.get("npz_layout"):
        logger.info("%s", npz_layout_line(layout, card["input_shape"]))
    if channels := card.get("npz_channels"):
        logger.info("%s", npz_channels_line(channels))
    if categorical := card.get("categorical"):
        logger.info("categorical columns (one 0/1 feature per category; prepare.csv_categorical_columns): %s",
                    "; ".join(f"{name} ({len(c['values'])}: {', '.join(c['values'][:6])}"
                              + (", ..." if len(c["values"]) > 6 else "") + ")" for name, c in categorical.items()))
    if ignored := card.get("ignored_columns"):
        logger.info("columns left out (prepare.csv_ignore_columns): %s", ", ".join(ignored))
    if missing := card.get("missing_values"):
        logger.info("missing values filled with the train split's median (prepare.missing_values median): %s",
                    missing_line(missing, card["num_samples"]))
    if logged := prepared.preprocessing.log_features:
        logger.info("log(1 + x) before standardizing (prepare.log_features %s): %s",
                    params.prepare.log_features, feature_list(logged, prepared.preprocessing.feature_names))
    elif params.prepare.log_features == "none" and (heavy := heavy_tailed_features(
            prepared.splits["train"][0], prepared.preprocessing.categorical, prepared.preprocessing.feature_names)):
        logger.info("heavy-tailed features (non-negative, skewness above %g on the train split): %s; "
                    "prepare.log_features=auto takes them to log(1 + x) before standardizing",
                    HEAVY_TAIL_SKEWNESS, feature_list(heavy, prepared.preprocessing.feature_names))

    from tasks.core import tracking

    try:
        with tracking.stage_run(
            "prepare", paths.root, params.base.experiment,
            params={"prepare": params.prepare.model_dump(), "seed": params.base.seed},
            tags={"data_digest": prepared.digest, "data_source": prepared.source_uri},
        ):
            log_prepared(prepared)
            write_prepared(prepared, paths.prepared)
    except OSError as err:
        report_stage_error("prepare", disk_full_message(err, paths.prepared) or f"{paths.prepared}: cannot write: {err}")
        return 1
    logger.info("wrote %s", paths.prepared)
    return 0


if __name__ == "__main__":
    die_with_parent()  # the stage dies with the run that started it (tasks.core.processes)
    exit_process(main())
