"""The one place ``params.yaml`` is loaded and validated.

Every section is a frozen, strict pydantic model (unknown keys rejected, ranges
checked). Overrides (``--set train.epochs=3``, deployment parameters, ``dvc exp run
-S``) go through :func:`load_params` too, so they are validated exactly like the file.
``train.model`` is :class:`models.spec.ModelSpec`; the ``compress`` section (variants and
their typed steps) is in :mod:`tasks.core.compress_params`. A refused file gets one line
per problem, ``<file>: <key>: <what is wrong>``, a step named by its variant and method:
``params.yaml: compress.variants.6(pruned-l1-auto).steps.1(prune).sparsity: ...``.

Torch-free: the CLI and every stage load params before anything heavy.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from models.spec import ModelSpec
from tasks.core.compress_params import (
    BASELINE, FINAL_METHODS, STEP_MODELS, CompressParams, CompressStep, DistillStep, ExportStep, HalfStep, PruneStep,
    QuantizeStep, Variant, step_key,
)

__all__ = [
    "BASELINE", "BUILTIN_SOURCES", "FINAL_METHODS", "FOLDER_SOURCES", "STEP_MODELS", "CompressParams", "CompressStep",
    "DistillStep", "ExportStep", "HalfStep", "Params", "ParamsError", "PruneStep", "QuantizeStep", "TABULAR_SOURCES",
    "TEXT_SOURCES", "Variant", "load_params", "params_schema", "registered_model_for", "step_key", "validate_params",
    "write_overrides",
]


AUTO = "auto"  # evaluate.registered_model: named after the data (registered_model_for)
_DATA_SUFFIXES = {".csv", ".tsv", ".txt", ".npz", ".npy", ".idx", ".gz", ".zip"}  # left out of that name


class ParamsError(ValueError):
    """A parameter file or override is invalid; the message names the key and the problem."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


Fraction = Annotated[float, Field(gt=0.0, lt=1.0)]


def _whole_number(value: Any) -> bool:
    """An int >= 0 as YAML gives it (``true`` is not 1)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


# What the model reads, for the sources where the source alone says it (npz: its arrays'
# shape does; the train stage checks the prepared data itself).
TEXT_SOURCES = frozenset({"text_table", "text_folder"})  # token ids
TABULAR_SOURCES = frozenset({"breast_cancer", "csv"})  # rows of features
_GIVES_NO_ROWS = {"digits": "images", "idx": "images", "image_folder": "images",
                  **{source: "text" for source in TEXT_SOURCES}}
# Where the data is: shipped with scikit-learn (no prepare.path), or prepare.path a folder
# of one sub-folder per class; the other sources read a file.
BUILTIN_SOURCES = frozenset({"digits", "breast_cancer"})
FOLDER_SOURCES = frozenset({"image_folder", "text_folder"})


class BaseParams(_Strict):
    seed: int = Field(42, ge=0)
    experiment: str = Field("slimflow", min_length=1)


class PrepareParams(_Strict):
    source: Literal["digits", "breast_cancer", "idx", "npz", "csv", "image_folder", "text_table", "text_folder"] = "digits"
    # Path of the raw data, relative to the project root (a file or a folder, by source).
    path: str | None = None
    # idx: the label file beside the image file `path`.
    labels_path: str | None = None
    # npz: the names of the input and label arrays.
    npz_inputs: str = "x"
    npz_labels: str = "y"
    # npz: what a 3-D array (N, A, B) holds: images (N, H, W), one channel standardized by one
    # mean and std; sequences (N, T, F), T steps of F features, each feature standardized on
    # its own; auto: sequences where, as one channel, some feature would vary over less than
    # a tenth of a unit (features on other scales: a pressure beside a vibration).
    npz_layout: Literal["auto", "images", "sequences"] = "auto"
    # npz: where a 4-D array keeps its channels: first (N, C, H, W), as torch; last (N, H, W, C),
    # as PIL, Keras and TensorFlow Datasets hand images; auto: last where the last axis has at
    # most 4 entries and the second more, else first. The registered model takes the file's shape.
    npz_channels: Literal["auto", "first", "last"] = "auto"
    # csv: the label column (every other column is a feature, named as in the header: the
    # registered model's column names); text_table: the label column.
    csv_label_column: str = "label"
    # csv: columns that are no features (an id, a date, free text), left out by name.
    csv_ignore_columns: list[str] = []
    # csv: columns of categories (words or codes: plan, region): one 0/1 feature per category;
    # a category the data never had sets none where the registered model meets it.
    csv_categorical_columns: list[str] = []
    # csv: a column naming whom each row belongs to (a patient, a customer, a device): every
    # row of a group goes to one split, so the test split holds only groups no model trained
    # on; not a feature.
    csv_group_column: str | None = None
    # csv: a column saying when each row was observed (an ISO 8601 date or time, or a number
    # such as a day index): the earliest rows train, the next validate, the latest test, so
    # the test split measures what a model does on rows after the ones it learned from; not a
    # feature. Not with csv_group_column.
    csv_time_column: str | None = None
    # csv: how csv_time_column's cells are written where they are no ISO 8601 dates or
    # numbers: a strptime format, e.g. '%d/%m/%Y' or '%m/%d/%Y %H:%M' (no layout is guessed).
    csv_time_format: str | None = None
    # text_table (a .csv, or .tsv tab-separated) / text_folder (one sub-folder of .txt per
    # class): a word-level tokenizer trained on the train split, text_vocab_size words at
    # most; every text becomes text_max_length token ids (truncated, or padded with id 0).
    text_column: str = "text"
    text_max_length: int = Field(64, ge=2, le=4096)
    text_vocab_size: int = Field(8000, ge=3, le=1_000_000)
    text_lowercase: bool = True
    # image_folder: every image is converted to `image_mode` and resized to image_size.
    image_size: tuple[Annotated[int, Field(ge=1)], Annotated[int, Field(ge=1)]] = (28, 28)
    image_mode: Literal["L", "RGB"] = "L"
    # Rows of features: features taken to sign(x)*log(1+|x|) before standardizing (fitted on
    # the train split; the registered model does the same to raw inputs). none | auto (the
    # non-negative features skewed beyond 2 on the train split: amounts, counts) | a list of
    # feature indices, e.g. [0, 3] (the model's columns x0, x3), or a CSV's column names.
    log_features: Literal["none", "auto"] | list[Annotated[int, Field(ge=0)] | str] = "none"
    # Rows of features: a missing value (an empty cell, NA, NaN, null: what pandas reads as
    # missing) is refused, naming its line and column (refuse), or becomes its feature's
    # median on the train split (median; the registered model fills a request's gaps alike).
    missing_values: Literal["refuse", "median"] = "refuse"
    # Samples with identical inputs (the same values, the same text): together keeps each
    # record's copies in one split, so that test never scores a copy of a training sample as
    # unseen; apart splits them as separate samples; auto: together, except in a table whose
    # columns take so few values that identical rows repeat by nature (README: Your own data).
    duplicates: Literal["auto", "together", "apart"] = "auto"
    val_fraction: Fraction = 0.15
    test_fraction: Fraction = 0.25

    @field_validator("log_features", mode="before")
    @classmethod
    def _check_log_features(cls, value: Any) -> str | list[int]:
        if value in ("none", "auto") or (
                isinstance(value, list) and all(_whole_number(v) or (isinstance(v, str) and v) for v in value)):
            return value
        raise PydanticCustomError(
            "log_features", "expected none, auto or a list of feature indices >= 0 or column names such as [0, 3] "
            "or [amount, visits], got {value}",
            {"value": repr(value)},
        )

    @model_validator(mode="after")
    def _check(self) -> PrepareParams:
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError("val_fraction + test_fraction must be below 1")
        if self.source in {"idx", "npz", "csv", "image_folder", "text_table", "text_folder"} and not self.path:
            raise ValueError(f"source {self.source!r} needs prepare.path")
        if self.source == "idx" and not self.labels_path:
            raise ValueError("source 'idx' needs prepare.labels_path (the IDX label file)")
        for key in ("npz_layout", "npz_channels"):
            if getattr(self, key) != "auto" and self.source != "npz":
                raise ValueError(f"{key} {getattr(self, key)}: source {self.source!r} is not an npz; only npz reads it")
        for key in ("csv_ignore_columns", "csv_categorical_columns", "csv_group_column", "csv_time_column"):
            if getattr(self, key) and self.source != "csv":
                raise ValueError(f"{key} {getattr(self, key)}: source {self.source!r} has no named columns; only csv "
                                 "reads it")
        if self.csv_time_format is not None and (not self.csv_time_column or "%" not in self.csv_time_format):
            raise ValueError(f"csv_time_format {self.csv_time_format!r}: a strptime format such as '%d/%m/%Y' for "
                             "the cells of csv_time_column" + ("" if self.csv_time_column else ", which is not set"))
        if self.csv_group_column and self.csv_time_column:
            raise ValueError(f"csv_group_column {self.csv_group_column} and csv_time_column {self.csv_time_column}: "
                             "a split keeps each group together or splits in time order, not both; set one")
        if self.duplicates != "auto" and (column := self.csv_group_column or self.csv_time_column):
            key, why = (("csv_group_column", "a record's copies are rows of its group") if self.csv_group_column else
                        ("csv_time_column", "copies observed at one time fall in one split, and a copy observed "
                         "later is a new observation"))
            raise ValueError(f"duplicates {self.duplicates}: {key} {column} decides the split ({why}); leave "
                             "duplicates at auto")
        if self.missing_values == "median" and (gives := _GIVES_NO_ROWS.get(self.source)):
            raise ValueError(f"missing_values median: source {self.source!r} gives {gives}, not rows of features; "
                             "only rows have missing values to fill (refuse)")
        if isinstance(self.log_features, list) and (gives := _GIVES_NO_ROWS.get(self.source)):
            raise ValueError(f"log_features {self.log_features}: source {self.source!r} gives {gives}, not rows of "
                             "features; only rows have features to log (none or auto)")
        return self


class TrainParams(_Strict):
    model: ModelSpec = ModelSpec()
    epochs: int = Field(15, ge=1, le=10_000)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(0.002, gt=0.0, le=10.0)
    weight_decay: float = Field(0.0, ge=0.0)
    warmup_epochs: int = Field(1, ge=0)
    # The warm-up's first learning rate as a share of lr (null: 0.05 for transformers, else 1:
    # the warm-up then only ramps up to the world-size-scaled rate).
    warmup_start: float | None = Field(None, gt=0.0, le=1.0)
    patience: int = Field(5, ge=1)
    # What early stopping and the best epoch follow: val_loss, or val_accuracy (ties broken
    # by val_loss), the measure the compressed variants' fine-tuning follows.
    monitor: Literal["val_loss", "val_accuracy"] = "val_loss"
    # Horovod: local worker processes, or hosts "hostA:4,hostB:4" (overrides workers).
    workers: int = Field(2, ge=1, le=256)
    hosts: str | None = None
    network_interface: str | None = None
    fp16_allreduce: bool = False
    backward_passes_per_step: int = Field(1, ge=1)
    # How gradients are allreduced (Horovod's DistributedOptimizer `groups`): "auto" is one
    # fused allreduce per step on CPU workers and one per gradient as it is ready (overlapped
    # with the backward pass) on GPUs; a number N >= 1 makes N explicit groups, 0 one per
    # gradient everywhere.
    allreduce_groups: Literal["auto"] | Annotated[int, Field(ge=0)] = "auto"
    # Threads per worker; null = usable cores // local workers.
    threads_per_worker: int | None = Field(None, ge=1)
    # Hardware acceleration: "auto" turns bf16 autocast / channels_last on for GPUs only.
    mixed_precision: Literal["auto", "off", "bf16"] = "auto"
    channels_last: Literal["auto", "off", "on"] = "auto"

    @field_validator("allreduce_groups", mode="before")
    @classmethod
    def _check_allreduce_groups(cls, value: Any) -> int | str:
        if value == "auto" or _whole_number(value):
            return value
        raise PydanticCustomError(
            "allreduce_groups", "expected 'auto' or a whole number >= 0, got {value}", {"value": repr(value)}
        )

    @field_validator("hosts")
    @classmethod
    def _check_hosts(cls, value: str | None) -> str | None:
        if value is None:
            return value
        for entry in value.split(","):
            host, _, slots = entry.strip().partition(":")
            if not host or (slots and not slots.isdigit()) or (slots and int(slots) < 1):
                raise ValueError(f"expected 'host:slots,host:slots', got {value!r}")
        return value


class GateParams(_Strict):
    max_accuracy_drop: float = Field(0.01, ge=0.0, le=1.0)
    # The most any one class's test recall may fall below the baseline's (a fraction, like
    # max_accuracy_drop); a fall of one test sample is never counted. None: not gated.
    max_class_recall_drop: float | None = Field(0.10, ge=0.0, le=1.0)
    max_latency_p95_ms: float | None = Field(None, gt=0.0)
    max_size_bytes: int | None = Field(None, gt=0)
    max_energy_per_1k_j: float | None = Field(None, gt=0.0)  # energy per 1,000 predictions (throughput batch)

    @property
    def max_accuracy_drop_pts(self) -> float:
        """``max_accuracy_drop`` in percentage points, the unit of every accuracy change."""
        return 100.0 * self.max_accuracy_drop


class EvaluateParams(_Strict):
    latency_repeats: int = Field(30, ge=3)
    warmup: int = Field(5, ge=0)
    throughput_batch: int = Field(256, ge=1)
    threads: int = Field(1, ge=1)
    gate: GateParams = GateParams()
    objective: Literal["smallest", "fastest", "lowest_energy"] = "smallest"
    # The MLflow registry name the champion is registered under; `auto`: named after the
    # data (:func:`registered_model_for`), so another data set gets its own name and champion.
    registered_model: str = Field(AUTO, min_length=1)
    # Seconds of back-to-back calls per model whose energy is read (batch 1, then the throughput
    # batch), read in `energy_readings` interleaved parts: their spread is the noise of an energy
    # saving, and a saving whose 95% interval (Student's t over the parts) reaches zero has no payback.
    energy_window_s: float = Field(0.5, gt=0.0, le=60.0)
    energy_readings: int = Field(5, ge=1, le=100)
    # Grid carbon intensity (g CO2e per kWh) for the CO2e beside every energy figure. 475: the
    # world average of electricity generation (IEA); set your grid's.
    grid_co2e_g_per_kwh: float = Field(475.0, ge=0.0)


class Params(_Strict):
    base: BaseParams = BaseParams()
    prepare: PrepareParams = PrepareParams()
    train: TrainParams = TrainParams()
    compress: CompressParams = CompressParams()
    evaluate: EvaluateParams = EvaluateParams()

    @model_validator(mode="before")
    @classmethod
    def _name_the_registered_model(cls, data: Any) -> Any:
        """``evaluate.registered_model: auto`` (the default) becomes the data's name here, so
        every reader of the params (the registry step, ``slimflow champion``, MLflow's params)
        sees the one concrete name."""
        if not isinstance(data, dict):
            return data
        evaluate = data.get("evaluate")
        evaluate = {} if evaluate is None else evaluate
        prepare = data.get("prepare")
        if not isinstance(evaluate, dict) or evaluate.get("registered_model", AUTO) != AUTO:
            return data
        if prepare is not None and not isinstance(prepare, dict):
            return data  # refused with its own message by the prepare section's validation
        return {**data, "evaluate": {**evaluate, "registered_model": registered_model_for(prepare or {})}}


def registered_model_for(prepare: dict[str, Any]) -> str:
    """``slimflow-<data>``: the source for the bundled sets (``slimflow-digits``), else the
    raw file's or folder's name without its data suffixes (``data/raw/news.csv`` ->
    ``slimflow-news``, ``news.v2.csv`` -> ``slimflow-news-v2``); any other character but
    letters, digits, ``_`` and ``-`` becomes ``-``."""
    source = str(prepare.get("source") or PrepareParams.model_fields["source"].default)
    path = prepare.get("path")
    name = source
    if path and source not in ("digits", "breast_cancer"):
        name = PurePosixPath(str(path).rstrip("/")).name
        while (suffix := PurePosixPath(name).suffix.lower()) in _DATA_SUFFIXES:
            name = name[: -len(suffix)]
    return "slimflow-" + (re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-") or source)


def _key(problem: dict[str, Any], raw: Any) -> tuple[str, str | None]:
    """The dotted key a problem is at, and the method of the step it is in (None: not in a step).

    Variants and steps are named as :func:`step_key` names them; the union's tag that
    pydantic puts after a step's index is left out (the step's method is beside it).
    """
    loc = [*problem["loc"], *(problem.get("ctx") or {}).get("key", ())]
    if problem["type"] in {"union_tag_invalid", "union_tag_not_found"}:
        loc.append("method")
    parts: list[str] = []
    node, method, container, after_step = raw, None, None, False
    for part in loc:
        if after_step and part == method:
            after_step = False
            continue
        after_step = False
        if isinstance(part, int) and container in {"variants", "steps"}:
            node = node[part] if isinstance(node, (list, tuple)) and 0 <= part < len(node) else None
            label = node.get("name" if container == "variants" else "method") if isinstance(node, dict) else None
            parts.append(f"{part + 1}({label})" if label is not None else str(part + 1))
            if container == "steps":
                method, after_step = (str(label) if label is not None else None), True
        else:
            parts.append(str(part))
            node = node.get(part) if isinstance(node, dict) else None
        container = part
    return ".".join(parts) or "(top level)", method


def _message(problem: dict[str, Any], method: str | None) -> str:
    """pydantic's message, said in the terms of params.yaml where pydantic's are vague."""
    kind, field = problem["type"], str(problem["loc"][-1]) if problem["loc"] else ""
    step = STEP_MODELS.get(method or "")
    if kind == "union_tag_invalid":
        return f"unknown method {problem['ctx']['tag']!r}; expected one of {', '.join(STEP_MODELS)}"
    if kind == "union_tag_not_found":
        return f"every step needs a method: {', '.join(STEP_MODELS)}"
    if kind == "extra_forbidden":
        if step is None:
            return "unknown key"
        reads = [name for name in step.model_fields if name != "method"]
        return f"unknown key for {method} (it reads: {', '.join(reads) or 'nothing'})"
    if kind == "missing" and step is not None and (info := step.model_fields.get(field)) and info.description:
        return f"{method} needs {field}: {info.description}"
    message = problem["msg"].removeprefix("Value error, ")
    value = problem.get("input")
    if kind != "missing" and isinstance(value, (str, int, float, bool)) and "got" not in message:
        message += f", got {value!r}"
    return message


def _format_error(err: ValidationError, source: str, raw: Any) -> str:
    """One line per problem: ``<file>: <key>: <what is wrong>``."""
    problems = err.errors()
    above = {problem["loc"][:end] for problem in problems for end in range(len(problem["loc"]))}
    lines = []
    for problem in problems:
        if problem["type"] == "too_short" and problem["loc"] in above:
            continue  # "steps: at least 1 item" because every step was refused: the steps' own errors say why
        key, method = _key(problem, raw)
        lines.append(f"{source}: {key}: {_message(problem, method)}")
    return "\n".join(lines)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``train.epochs=3`` -> (["train", "epochs"], 3). Values are parsed as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ParamsError(f"override {text!r}: expected key=value, e.g. train.epochs=3")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or "cannot be parsed"
        raise ParamsError(f"override {text}: not valid YAML ({problem}); quote lists, e.g. 'train.model.channels=[32, 64]'") from None
    return key.strip().split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``raw`` with each ``key=value`` set; unknown keys are caught by validation."""
    merged = copy.deepcopy(raw)
    for text in overrides:
        path, value = parse_override(text)
        node = merged
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ParamsError(f"override {text!r}: {part!r} is not a section")
            node = child
        node[path[-1]] = value
    return merged


def validate_params(raw: Any, source: str = "params.yaml") -> Params:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise ParamsError(_format_error(err, source, raw)) from None


def read_params_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    except OSError as err:
        raise ParamsError(f"{path}: cannot read: {err.strerror}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML: {err}") from None
    return raw or {}


def load_params(path: Path | str = "params.yaml", overrides: list[str] | None = None) -> Params:
    """Load, apply overrides and validate; raises :class:`ParamsError` naming the key."""
    path = Path(path)
    raw = read_params_file(path)
    if overrides:
        raw = apply_overrides(raw, overrides)
    return validate_params(raw, path.name)


def params_schema() -> dict[str, Any]:
    return Params.model_json_schema()


def write_overrides(path: Path | str, overrides: list[str]) -> Params:
    """Validate ``overrides`` and record them in ``params.yaml`` (comments kept).

    This is what ``dvc exp run -S`` does too: the file then says what the run used, so
    ``dvc.lock`` records it and ``dvc repro`` reproduces it. Nothing is written when
    validation fails.
    """
    from ruamel.yaml import YAML

    path = Path(path)
    params = load_params(path, overrides)
    yaml_rt = YAML()
    yaml_rt.preserve_quotes = True
    yaml_rt.indent(mapping=2, sequence=4, offset=2)  # the file's own list style
    yaml_rt.width = 4096
    # Keep `null` written as `null`, not as an empty value.
    yaml_rt.representer.add_representer(
        type(None), lambda rep, _: rep.represent_scalar("tag:yaml.org,2002:null", "null")
    )
    document = yaml_rt.load(path.read_text()) if path.exists() else {}
    document = document if document is not None else {}
    for text in overrides:
        keys, value = parse_override(text)
        node = document
        for part in keys[:-1]:
            if part not in node or node[part] is None:
                node[part] = {}
            node = node[part]
        node[keys[-1]] = value
    tmp = path.with_suffix(".yaml.tmp")
    with tmp.open("w") as handle:
        yaml_rt.dump(document, handle)
    tmp.replace(path)
    return params
