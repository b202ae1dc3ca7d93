"""The one vocabulary of figures: every metric slimflow logs to MLflow or writes to a DVC
metrics file has one name, defined here once, with its unit and what it means.

Rules the names follow:

- the unit is in the name: ``_bytes``, ``_ms``, ``_s``, ``_mb``, ``_j``, ``_g`` (grams CO2e); ``_pts`` for
  percentage points; ``_x`` for a ratio to the baseline;
- every ratio to the baseline reads "times better", so above 1 is always better:
  ``size_reduction_x`` = baseline size / this size, ``speedup_x`` = baseline latency / this
  latency, ``throughput_gain_x`` = this throughput / the baseline's;
- accuracies are fractions (0-1); their changes are percentage points (``accuracy_change_pts``);
- a decision that is a word (the champion, the gate verdict) is a tag, never a 0/1 metric;
  per-class figures are a table artifact (``per_class.json``), not one metric per class.

The stages import the names from here, and a test checks that every metric the pipeline
logs is in :data:`VOCABULARY`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Figure:
    """One figure: its metric name, its unit and what it measures."""

    name: str
    unit: str
    meaning: str


_ALL: dict[str, Figure] = {}


def _figure(name: str, unit: str, meaning: str) -> str:
    if name in _ALL:
        raise ValueError(f"metric name {name!r} is defined twice")
    _ALL[name] = Figure(name, unit, meaning)
    return name


# ---------------------------------------------------------------- the data, as `prepare` splits it
NUM_SAMPLES = _figure("num_samples", "count", "samples in the raw data set")
NUM_CLASSES = _figure("num_classes", "count", "classes in the data set")
NUM_TRAIN = _figure("num_train", "count", "samples in the train split")
NUM_VAL = _figure("num_val", "count", "samples in the validation split")
NUM_TEST = _figure("num_test", "count", "samples in the test split")
PREPARE_FIGURES = (NUM_SAMPLES, NUM_CLASSES, NUM_TRAIN, NUM_VAL, NUM_TEST)

# ---------------------------------------------------------------- every model, measured by `evaluate`
# The same keys for the baseline and every variant, in the model's own MLflow run and in
# metrics/evaluate.json. Headline first: what a person compares.
ACCURACY = _figure("accuracy", "fraction", "test-split accuracy")
ACCURACY_CHANGE_PTS = _figure("accuracy_change_pts", "percentage points", "test accuracy minus the baseline's")
ACCURACY_CHANGE_NOISE_PTS = _figure(
    "accuracy_change_noise_pts", "percentage points",
    "one standard error of accuracy_change_pts: the paired comparison with the baseline on the same test samples",
)
SIZE_BYTES = _figure("size_bytes", "bytes", "size of the model file on disk")
SIZE_REDUCTION_X = _figure("size_reduction_x", "times", "baseline size / this size (> 1: smaller)")
LATENCY_P50_MS = _figure("latency_p50_ms", "ms", "median wall-clock latency at batch 1")
SPEEDUP_X = _figure("speedup_x", "times", "baseline latency p50 / this latency p50 (> 1: faster)")

MACRO_F1 = _figure("macro_f1", "fraction", "test-split F1, unweighted mean over classes")
WORST_CLASS_RECALL_CHANGE_PTS = _figure(
    "worst_class_recall_change_pts", "percentage points",
    "the lowest, over the classes, of a class's test recall minus the baseline's (< 0: a class lost recall)",
)
LATENCY_P95_MS = _figure("latency_p95_ms", "ms", "95th percentile wall-clock latency at batch 1")
LATENCY_MEAN_MS = _figure("latency_mean_ms", "ms", "mean wall-clock latency at batch 1")
CPU_TIME_P50_MS = _figure("cpu_time_p50_ms", "ms", "median process CPU time of a batch-1 call")
THROUGHPUT_SPS = _figure("throughput_sps", "samples/s", "inference samples per second at the throughput batch")
THROUGHPUT_GAIN_X = _figure("throughput_gain_x", "times", "this throughput / the baseline's (> 1: more)")
PARAMETERS = _figure("parameters", "count", "trainable parameters (buffers such as BatchNorm statistics excluded)")
NONZEROS = _figure("nonzeros", "count", "parameters that are not zero (<= parameters)")
SPARSITY = _figure("sparsity", "fraction", "share of zeros among the prunable weights")
FLOPS = _figure("flops", "count", "floating-point operations of one prediction")
PEAK_MEMORY_MB = _figure("peak_memory_mb", "MB", "peak resident memory rise of one call at the throughput batch")
LOAD_MEMORY_MB = _figure("load_memory_mb", "MB", "resident memory rise of loading the model")
ENERGY_PER_1K_J = _figure("energy_per_1k_j", "J", "energy per 1,000 predictions at the throughput batch")
ENERGY_PER_1K_BATCH1_J = _figure("energy_per_1k_batch1_j", "J", "energy per 1,000 predictions made one at a time")
CO2E_PER_1K_G = _figure("co2e_per_1k_g", "g", "CO2-equivalent of 1,000 predictions at the throughput batch")
ENERGY_SAVED_PER_1K_J = _figure(
    "energy_saved_per_1k_j", "J", "the baseline's energy_per_1k_j minus this model's (> 0: it saves energy)"
)
ENERGY_SAVED_PER_1K_NOISE_J = _figure(
    "energy_saved_per_1k_noise_j", "J",
    "one standard error of energy_saved_per_1k_j: this model's and the baseline's energy readings paired "
    "(read in the same interleaved passes), never below what the meter's step allows",
)
MAKE_ENERGY_J = _figure(
    "make_energy_j", "J",
    "energy spent making the model: the baseline's training; a variant's steps from the baseline "
    "(its parent's included): training, calibration, quantization, export",
)
MAKE_CO2E_G = _figure("make_co2e_g", "g", "CO2-equivalent of make_energy_j")
PAYBACK_PREDICTIONS = _figure(
    "payback_predictions", "predictions",
    "predictions after which a variant's energy saved per prediction has repaid make_energy_j "
    "(inf: it saves nothing measurable: the saving's 95% interval, Student's t over its readings, reaches zero)",
)
PASSED_GATE = _figure("passed_gate", "0/1", "1 when the model passes the evaluate gate")

MODEL_HEADLINE = (ACCURACY, ACCURACY_CHANGE_PTS, SIZE_BYTES, SIZE_REDUCTION_X, LATENCY_P50_MS, SPEEDUP_X)
MODEL_DETAILS = (
    ACCURACY_CHANGE_NOISE_PTS, MACRO_F1, WORST_CLASS_RECALL_CHANGE_PTS, LATENCY_P95_MS, LATENCY_MEAN_MS, CPU_TIME_P50_MS, THROUGHPUT_SPS,
    THROUGHPUT_GAIN_X, PARAMETERS, NONZEROS, SPARSITY, FLOPS, PEAK_MEMORY_MB, LOAD_MEMORY_MB, ENERGY_PER_1K_J, ENERGY_PER_1K_BATCH1_J,
    CO2E_PER_1K_G, ENERGY_SAVED_PER_1K_J, ENERGY_SAVED_PER_1K_NOISE_J, MAKE_ENERGY_J, MAKE_CO2E_G, PAYBACK_PREDICTIONS, PASSED_GATE,
)
MODEL_FIGURES = MODEL_HEADLINE + MODEL_DETAILS  # in the order runs, files and tables show them

# Columns of the per-class table (per_class.json; metrics/evaluate.json: <model>.per_class.<class>).
PER_CLASS_COLUMNS = ("precision", "recall", "f1", "support")

# ---------------------------------------------------------------- a variant, when `compress` makes it
VAL_ACCURACY = _figure("val_accuracy", "fraction", "validation-split accuracy (per epoch while training)")
VAL_ACCURACY_CHANGE_PTS = _figure(
    "val_accuracy_change_pts", "percentage points", "validation accuracy minus the baseline's"
)
COMPRESS_TIME_S = _figure("compress_time_s", "s", "wall-clock time to make the variant")
TRAIN_ENERGY_J = _figure(
    "train_energy_j", "J",
    "energy of the model's training on the Horovod loop, every worker summed (a variant: all its "
    "training steps and search trials)",
)
# A variant's run also gets, from `compress`: size_bytes, size_reduction_x, parameters,
# nonzeros, sparsity (the figures above, the same values `evaluate` logs again) and make_energy_j.
COMPRESS_FIGURES = (
    SIZE_BYTES, SIZE_REDUCTION_X, PARAMETERS, NONZEROS, SPARSITY, VAL_ACCURACY, VAL_ACCURACY_CHANGE_PTS,
    COMPRESS_TIME_S, TRAIN_ENERGY_J, MAKE_ENERGY_J,
)

# ---------------------------------------------------------------- training (the baseline, distilled students)
TRAIN_LOSS = _figure("train_loss", "nats", "mean training loss of the epoch")
VAL_LOSS = _figure("val_loss", "nats", "validation loss of the epoch")
TRAIN_ACCURACY = _figure("train_accuracy", "fraction", "training accuracy of the epoch")
SAMPLES_PER_S = _figure("samples_per_s", "samples/s", "training samples per second, all workers")
EPOCH_TIME_S = _figure("epoch_time_s", "s", "wall-clock time of the epoch (slowest worker)")
LR = _figure("lr", "learning rate", "learning rate at the end of the epoch")
EPOCH_ENERGY_J = _figure("epoch_energy_j", "J", "energy of the epoch (training and validation), every worker summed")
EPOCH_FIGURES = (TRAIN_LOSS, VAL_LOSS, TRAIN_ACCURACY, VAL_ACCURACY, SAMPLES_PER_S, EPOCH_TIME_S, LR, EPOCH_ENERGY_J)
BEST_EPOCH = _figure("best_epoch", "epoch", "the epoch whose model was kept (best by train.monitor)")
EPOCHS_RUN = _figure("epochs_run", "epochs", "epochs trained (early stopping may end sooner)")
BEST_VAL_LOSS = _figure("best_val_loss", "nats", "val_loss of the kept epoch")
BEST_VAL_ACCURACY = _figure("best_val_accuracy", "fraction", "val_accuracy of the kept epoch")
VAL_ACCURACY_LATE_GAIN_PTS = _figure(
    "val_accuracy_late_gain_pts", "percentage points",
    "val_accuracy of the kept epoch minus the best before the last train.patience epochs, when training used "
    "all its epochs (0 when early stopping ended it): above the gate's tolerance, it was still improving",
)
VAL_ACCURACY_MISSED_PTS = _figure(
    "val_accuracy_missed_pts", "percentage points",
    "val_accuracy of the most accurate epoch minus the kept epoch's: above 0, train.monitor val_loss kept a less "
    "accurate epoch",
)
TRAIN_FIGURES = (BEST_EPOCH, EPOCHS_RUN, BEST_VAL_LOSS, BEST_VAL_ACCURACY, VAL_ACCURACY_LATE_GAIN_PTS,
                 VAL_ACCURACY_MISSED_PTS, TRAIN_ENERGY_J)

# ---------------------------------------------------------------- what a stage's computation cost
# On each stage's run (train, compress, evaluate) and, summed, on the pipeline run.
ENERGY_J = _figure("energy_j", "J", "energy of the run's computation, every process that computed summed")
CO2E_G = _figure("co2e_g", "g", "CO2-equivalent of energy_j at evaluate.grid_co2e_g_per_kwh")
STAGE_ENERGY_FIGURES = (ENERGY_J, CO2E_G)

# ---------------------------------------------------------------- the evaluate stage's decision
PROMOTED = _figure("promoted", "0/1", "1 when the gate's winner holds @champion after the run")
REGISTERED_NEW_VERSION = _figure("registered_new_version", "0/1", "1 when the run registered a new version")
MODELS_EVALUATED = _figure("models_evaluated", "count", "models measured (baseline and variants)")
MODELS_PASSING = _figure("models_passing", "count", "models that pass the gate")
EVALUATE_FIGURES = (PROMOTED, REGISTERED_NEW_VERSION, MODELS_EVALUATED, MODELS_PASSING)

# The current champion's figures beside the challenger's, on the evaluate stage's run:
# as its version recorded them and as measured again on this run's test split.
CURRENT_CHAMPION_FIGURES = tuple(
    _figure(f"current_champion_{source}_{key}", "fraction", f"the current @champion's {key}, {how}")
    for source, how in (("recorded", "as its version recorded it"), ("remeasured", "on this run's test split"))
    for key in (ACCURACY, MACRO_F1)
)
# Where the champion was re-measured: both models on the test rows it never trained on.
UNSEEN_TEST_ROWS = _figure("unseen_test_rows", "count",
                           "this run's test rows the current @champion never trained on: what both were compared on")
UNSEEN_ROWS_FIGURES = tuple(
    _figure(f"{who}_unseen_{key}", "fraction", f"the {what}'s {key} on the test rows the current @champion never trained on")
    for who, what in (("current_champion", "current @champion"), ("challenger", "challenger"))
    for key in (ACCURACY, MACRO_F1)
)

# ---------------------------------------------------------------- a searched variant (compress.budget), per trial
# Step-indexed by trial number in the variant's run.
SEARCH_SETTING = _figure("search/setting", "knob value", "the searched knob's setting of the trial")
SEARCH_VAL_ACCURACY = _figure("search/val_accuracy", "fraction", "validation accuracy of the trial's model")
SEARCH_ACCURACY_DROP_PTS = _figure(
    "search/accuracy_drop_pts", "percentage points", "the baseline's validation accuracy minus the trial's"
)
SEARCH_ACCURACY_DROP_NOISE_PTS = _figure(
    "search/accuracy_drop_noise_pts", "percentage points",
    "one standard error of the trial's accuracy drop on the validation split (paired with the baseline)"
)
SEARCH_SIZE_BYTES = _figure("search/size_bytes", "bytes", "size of the trial's model")
SEARCH_NONZEROS = _figure("search/nonzeros", "count", "non-zero parameters of the trial's model")
SEARCH_SPARSITY = _figure("search/sparsity", "fraction", "share of zeros among the trial's prunable weights")
SEARCH_TRIAL_TIME_S = _figure("search/trial_time_s", "s", "wall-clock time of the trial")
SEARCH_WITHIN_BUDGET = _figure("search/within_budget", "0/1", "1 when the trial's accuracy drop fits the budget")
# The search-trial key each figure is logged from (tasks/compression/search.py's trial rows).
SEARCH_TRIAL_KEYS = {
    SEARCH_SETTING: "setting", SEARCH_VAL_ACCURACY: "val_accuracy", SEARCH_ACCURACY_DROP_PTS: "drop_points",
    SEARCH_ACCURACY_DROP_NOISE_PTS: "noise_points", SEARCH_SIZE_BYTES: "size_bytes", SEARCH_NONZEROS: "nonzeros", SEARCH_SPARSITY: "sparsity",
    SEARCH_TRIAL_TIME_S: "seconds", SEARCH_WITHIN_BUDGET: "within_budget",
}

# ---------------------------------------------------------------- the pipeline run
# The champion's figures under their model names (the run's `champion` tag says which model).
PIPELINE_RESULT_FIGURES = MODEL_HEADLINE + (LATENCY_P95_MS, THROUGHPUT_GAIN_X)
STAGE_TIME_S = "stage_time_s.{stage}"  # wall-clock time of one stage in the flow (skipped: ~0)
STAGE_ENERGY_J = "stage_energy_j.{stage}"  # energy_j of one stage's run (skipped: not counted again)
_TEMPLATES = {
    STAGE_TIME_S: Figure(STAGE_TIME_S, "s", "wall-clock time of the stage in the flow run"),
    STAGE_ENERGY_J: Figure(STAGE_ENERGY_J, "J", "energy_j of the stage in the flow run"),
}

# A variant's fine-tuning curve, in its own run: the training figures under ``fine_tune/``
# (``fine_tune/step<N>/`` when the recipe trains in several steps); the step is the epoch.
FINE_TUNE_PREFIX = "fine_tune/"
_FINE_TUNE = re.compile(r"fine_tune/(?:step[0-9]+/)?(?P<figure>[a-z0-9_]+)")
_FINE_TUNE_FIGURES = frozenset(EPOCH_FIGURES + TRAIN_FIGURES + (
    _figure("world_size", "workers", "training processes (Horovod ranks)"),
    _figure("threads_per_worker", "threads", "torch intra-op threads of each training process"),
    PARAMETERS,
))

VOCABULARY: dict[str, Figure] = {**_ALL, **_TEMPLATES}


def stage_time_s(stage: str) -> str:
    return STAGE_TIME_S.format(stage=stage)


def stage_energy_j(stage: str) -> str:
    return STAGE_ENERGY_J.format(stage=stage)


def figure(name: str) -> Figure | None:
    """The figure ``name`` stands for (templates such as ``stage_time_s.train`` included), or None."""
    if name in _ALL:
        return _ALL[name]
    if (match := _FINE_TUNE.fullmatch(name)) and match["figure"] in _FINE_TUNE_FIGURES:
        return _ALL[match["figure"]]
    for template, known in _TEMPLATES.items():
        prefix, _, suffix = template.partition("{stage}")
        if re.fullmatch(re.escape(prefix) + r"[A-Za-z0-9_-]+" + re.escape(suffix), name):
            return known
    return None


def is_known(name: str) -> bool:
    return figure(name) is not None
