"""A challenger against the current champion: may it take ``@champion``?

The gate (:mod:`tasks.evaluation.gate`) compares the models of ONE run with that run's
baseline. Before its winner (the challenger) takes the alias, :func:`decide` compares it
with the version the alias points at now:

1. another input contract (tensor shape and dtype, or columns; or other classes: their
   number, or the names an index stands for): never - the run says which
   ``evaluate.registered_model`` to set instead;
2. the same model file on the same data: it already is the champion (no new version);
3. the same data digest split the same way (seed and fractions), git commit and runtime
   (package versions): the champion's recorded figures are compared;
4. otherwise (other data or another split of it, other code or runtime, no recorded
   figures): the champion is
   re-measured on THIS run's test split, in a fresh process through its own pyfunc code,
   side by side with the challenger. Both are compared on the test rows the champion never
   trained on: a version keeps the fingerprints of its train and validation rows
   (``seen_rows``), and this run's test rows among them (the same data split with another
   seed, or a data set that grew) are left out, since a model is flattered on rows it
   learned. Too few left (:data:`MIN_UNSEEN_ROWS`), or a champion that kept none: the whole
   split, and the decision says the figures flatter the champion where they do.

In 3 and 4 the challenger may not be worse than the champion by more than the gate's
``max_accuracy_drop`` on accuracy, nor lose more than its ``max_class_recall_drop`` of any
class's recall (counted as the gate counts it: both models' predictions on the same test
samples leave out a class loss chance explains; recorded figures that would refuse the
challenger on a class have the champion re-measured for its predictions; against a champion
that records no per-class recall, accuracy alone is compared, and the decision says so). The
:class:`Decision` and both models' figures become ``promotion.json``, a tag of the
evaluate run and a tag of the version.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from tasks.core.classification import (
    class_disagreements, class_recall_problem, class_recall_within_chance, classification_metrics, index_names,
    paired_change_noise,
)
from tasks.evaluation.gate import BEYOND_CHANCE
from tasks.evaluation.signature import column_difference, describe, same_input

_EPS = 1e-9
# The figures a version keeps as tags (``metric.<key>``) and a decision shows side by side.
HEADLINE = ("accuracy", "macro_f1", "accuracy_delta", "size_bytes", "latency_p50_ms", "latency_p95_ms",
            "throughput_sps")
QUALITY = ("accuracy", "macro_f1")  # what a re-measurement on another split gives
CLASS_RECALL = "class_recall"  # a version's tag (and a re-measurement's key): {class: test recall}
PREDICTIONS = "predictions"  # a re-measurement's key: the champion's test predictions (not kept)
SEEN_ROWS = "seen_rows"  # a version's tag: its run's artifact of the fingerprints of the rows it trained on
SEEN_ROWS_SCHEME = "seen_rows_scheme"  # ...and a tag naming how they were computed
MIN_UNSEEN_ROWS = 50  # fewer test rows the champion never saw than this: compared on the whole split

# Runs in a fresh interpreter outside the project, so the champion's own logged code
# (not this checkout's `tasks`) loads it, as `mlflow models serve` would.
_PREDICT = """
import sys
import numpy as np
import mlflow
uri, x_path, out = sys.argv[1:4]
model = mlflow.pyfunc.load_model(uri)
schema = model.metadata.get_input_schema()
if x_path.endswith(".json"):  # rows of features: a table of the raw columns, typed as the champion's signature says
    import pandas as pd
    x = pd.read_json(x_path, orient="split", dtype=False, convert_dates=False)
    x = x.astype(dict(zip(schema.input_names(), schema.pandas_types())))
    rows = lambda chunk: chunk
else:
    x = np.load(x_path)
    def rows(chunk):
        if schema is not None and not schema.is_tensor_spec():
            import pandas as pd
            frame = pd.DataFrame(chunk.reshape(len(chunk), -1).astype("float64"), columns=schema.input_names())
            return frame.astype(dict(zip(schema.input_names(), schema.pandas_types())))  # long columns: int64
        return np.ascontiguousarray(chunk, dtype=np.float32)
parts = [np.asarray(model.predict(rows(x[i:i + 512]))).reshape(-1) for i in range(0, len(x), 512)]
np.save(out, np.concatenate(parts).astype(np.int64))
"""


class RemeasureError(RuntimeError):
    """The champion could not be run on this run's test split."""


@dataclass(frozen=True)
class Challenger:
    """The gate's winner of this run, as the decision needs it."""

    name: str
    figures: dict[str, float]
    input_schema: dict[str, Any]
    num_classes: int
    data_digest: str | None
    model_digest: str | None
    git_commit: str | None
    runtime_versions: dict[str, str]
    per_class: dict[str, dict[str, float]] = field(default_factory=dict)  # {class: {recall, support, ...}}
    class_names: tuple[str, ...] = ()  # what each predicted index means (preprocess.json)
    data_split: dict[str, Any] | None = None  # how prepare split the data: seed, val_fraction, test_fraction
    labels: np.ndarray | None = field(default=None, compare=False, repr=False)  # this run's test labels
    predictions: np.ndarray | None = field(default=None, compare=False, repr=False)  # ...and its predictions
    test_rows: np.ndarray | None = field(default=None, compare=False, repr=False)  # ...and their fingerprints
    # ...and their records (tasks.data.record_ids: copies of one, or a group's rows; None: each its own)
    test_records: np.ndarray | None = field(default=None, compare=False, repr=False)


@dataclass
class Decision:
    """May the challenger take ``@champion``, and on what evidence."""

    allowed: bool
    verdict: str  # first_champion | already_champion | other_input | not_worse | worse | unmeasured
    reason: str
    basis: str | None = None  # "recorded evidence" | "re-measured on this run's test split"
    champion: dict[str, Any] | None = None  # the current champion's version, contract and figures
    suggested_name: str | None = None
    compared_on: dict[str, Any] | None = None  # the test rows both were compared on, where not the whole split

    def document(self, challenger: Challenger, registered_model: str, tolerance: float,
                 test_samples: int, class_tolerance: float | None = None) -> dict[str, Any]:
        """``promotion.json``: the decision and both models' figures on the same split."""
        return {
            "registered_model": registered_model,
            "verdict": self.verdict,
            "allowed": self.allowed,
            "reason": self.reason,
            "basis": self.basis,
            "tolerance": {"max_accuracy_drop": tolerance, "on": "accuracy",
                          "max_class_recall_drop": class_tolerance},
            "split": {"data_digest": challenger.data_digest, "test_samples": test_samples},
            "challenger": {
                "model": challenger.name, "figures": challenger.figures, "input_schema": challenger.input_schema,
                "num_classes": challenger.num_classes, "data_digest": challenger.data_digest,
                "git_commit": challenger.git_commit,
            },
            "champion": self.champion,
            "compared_on": self.compared_on,
            "suggested_registered_model": self.suggested_name,
        }


def suggested_name(registered_model: str, schema: dict[str, Any]) -> str:
    """A registered name for another input: ``slimflow-digits-28x28`` / ``...-30cols``."""
    if schema.get("type") == "columns":
        return f"{registered_model}-{schema['columns']}cols"
    return f"{registered_model}-{'x'.join(str(d) for d in schema['shape'][1:])}"


def recorded_figures(tags: dict[str, str]) -> dict[str, float]:
    found = {}
    for key in HEADLINE:
        try:
            found[key] = float(json.loads(tags[f"metric.{key}"]))
        except (KeyError, TypeError, ValueError):
            continue
    return found


def remeasure(model_uri: str, prepared: Path, class_names: Sequence[str], threads: int = 1) -> dict[str, Any]:
    """Accuracy and macro F1 of a registered model on ``prepared``'s test split (raw inputs),
    under :data:`CLASS_RECALL` each class's recall, and under :data:`PREDICTIONS` its
    predictions (for the class comparison; not a figure to keep)."""
    with tempfile.TemporaryDirectory(prefix="slimflow-remeasure-") as tmp:
        out = Path(tmp) / "predictions.npy"
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
        done = subprocess.run(
            [sys.executable, "-c", _PREDICT, model_uri, str(_raw_test_rows(prepared, Path(tmp))), str(out)],
            cwd=tmp, env=env, capture_output=True, text=True, timeout=900,
        )
        if done.returncode != 0:
            lines = [line for line in done.stderr.splitlines() if line.strip()]
            raise RemeasureError(f"{model_uri}: {lines[-1] if lines else f'exited with {done.returncode}'}")
        predictions = np.load(out)
    y = np.load(prepared / "test_y.npy")
    if predictions.shape != y.shape:
        raise RemeasureError(f"{model_uri}: {predictions.shape[0]} predictions for {y.shape[0]} test rows")
    quality, per_class, _ = classification_metrics(y, predictions, class_names)
    return {**{key: quality[key] for key in QUALITY},
            CLASS_RECALL: {name: float(row["recall"]) for name, row in per_class.items()}, PREDICTIONS: predictions}


def _raw_test_rows(prepared: Path, folder: Path) -> Path:
    """This run's test inputs as a client sends them: rows of features as a table of the raw
    columns (``.json``, categories as their values), an IDX's or an npz's samples as the file
    holds them (``raw_shape``: without the channel the prepared split adds, or with their
    channels last), anything else ``test_x.npy`` itself."""
    from tasks.data import decode_table, load_preprocessing
    from tasks.evaluation.signature import is_tabular

    preprocessing = load_preprocessing(prepared)
    if preprocessing.raw_shape:
        x = np.load(prepared / "test_x.npy", mmap_mode="r")
        np.save(folder / "test_x.npy", preprocessing.to_raw(x))
        return folder / "test_x.npy"
    if not is_tabular(preprocessing):
        return prepared.resolve() / "test_x.npy"
    table = folder / "test_rows.json"
    decode_table(preprocessing, np.load(prepared / "test_x.npy")).to_json(table, orient="split", index=False,
                                                                          double_precision=15)
    return table


def recorded_class_recall(tags: dict[str, str]) -> dict[str, float] | None:
    """A version's per-class recall as registered (None: a version registered without it)."""
    try:
        return {str(name): float(recall) for name, recall in json.loads(tags[CLASS_RECALL]).items()}
    except (KeyError, TypeError, ValueError, AttributeError):
        return None


def _champion_card(version: Any, schema: dict[str, Any] | None) -> dict[str, Any]:
    tags = version.tags
    runtime = tags.get("runtime_versions")
    class_names = _recorded_class_names(tags)
    return {
        "version": str(version.version), "variant": tags.get("variant"), "input_schema": schema,
        "num_classes": int(tags["num_classes"]) if tags.get("num_classes") else None,
        "class_names": class_names if isinstance(class_names, list) else None,  # the order known (JSON: a list)
        "data_digest": tags.get("data_digest"), "data_split": _recorded_split(tags),
        "git_commit": tags.get("git_commit"),
        "runtime_versions": json.loads(runtime) if runtime else None,
        "recorded": recorded_figures(tags), "remeasured": None,
    }


def _recorded_split(tags: dict[str, str]) -> dict[str, Any] | None:
    try:
        split = json.loads(tags["data_split"])
    except (KeyError, TypeError, ValueError):
        return None
    return split if isinstance(split, dict) and {"seed", "val_fraction", "test_fraction"} <= set(split) else None


def _contract_problem(challenger: Challenger, card: dict[str, Any], tags: dict[str, str],
                      registered_model: str) -> str | None:
    """Why the challenger cannot replace this champion for its clients (None: same contract)."""
    held = f"the champion of {registered_model} (version {card['version']}, {card['variant']})"
    if card["input_schema"] is None:
        return f"{held} records no input schema, so {challenger.name} cannot be shown to take the same input"
    if not same_input(card["input_schema"], challenger.input_schema):
        detail = column_difference(card["input_schema"], challenger.input_schema, "the champion", challenger.name)
        return (f"{held} takes {describe(card['input_schema'])}; {challenger.name} takes "
                f"{describe(challenger.input_schema)}" + (f" ({detail})" if detail else ""))
    if card["num_classes"] is not None and card["num_classes"] != challenger.num_classes:
        return f"{held} predicts {card['num_classes']} classes; {challenger.name} predicts {challenger.num_classes}"
    theirs = _recorded_class_names(tags)  # a set for a version registered before the ordered tag
    if theirs is not None and challenger.class_names and _other_classes(theirs, challenger.class_names):
        return (f"{held} predicts the classes {_listed(theirs)}; {challenger.name} predicts "
                f"{_listed(challenger.class_names)} (an index would name another class)")
    return None


def _recorded_class_names(tags: dict[str, str]) -> list[str] | set[str] | None:
    """A version's classes in index order (its ``class_names`` tag); a version registered
    before that tag: the set of classes its per-class recall names; None: neither."""
    try:
        return [str(name) for name in json.loads(tags["class_names"])]
    except (KeyError, TypeError, ValueError):
        recall = recorded_class_recall(tags)
        return None if recall is None else set(recall)


def described_classes(tags: dict[str, str]) -> str | None:
    """A version's classes as ``slimflow champion show`` says them (None: not recorded)."""
    names = _recorded_class_names(tags)
    if isinstance(names, set):
        return f"{_listed(names)} (the index of each not recorded)"
    return None if names is None else index_names(names)


def other_classes(tags: dict[str, str], other_tags: dict[str, str]) -> tuple[str, str] | None:
    """Two versions' classes, listed, where an index would name another class in one than
    in the other (None: the same classes, or either records none)."""
    ours, theirs = _recorded_class_names(tags), _recorded_class_names(other_tags)
    if ours is None or theirs is None or not _other_classes(theirs, ours):
        return None
    return _listed(ours), _listed(theirs)


def _other_classes(theirs: Sequence[str] | set[str], ours: Sequence[str] | set[str]) -> bool:
    if isinstance(theirs, set) or isinstance(ours, set):  # a version without the ordered tag
        return set(theirs) != set(ours)
    return list(theirs) != list(ours)


def _listed(names: Sequence[str] | set[str], shown: int = 6) -> str:
    names = sorted(names) if isinstance(names, set) else list(names)
    listed = ", ".join(repr(n) for n in names[:shown])
    return listed + (f", ... ({len(names)} in all)" if len(names) > shown else "")


def decide(
    challenger: Challenger, current: Any | None, current_schema: dict[str, Any] | None, registered_model: str,
    tolerance: float, remeasure_champion: Any, class_tolerance: float | None = None,
    seen_by_champion: Callable[[Any], np.ndarray | None] | None = None,
) -> Decision:
    """The decision (see the module docstring). ``remeasure_champion(model_uri)`` gives the
    champion's quality figures on this run's test split (each class's recall under
    :data:`CLASS_RECALL`, its predictions under :data:`PREDICTIONS`), or raises
    :class:`RemeasureError`; ``seen_by_champion(version)`` the fingerprints of the rows the
    champion trained on (None: not kept)."""
    if current is None:
        return Decision(True, "first_champion", f"no champion under {registered_model} yet")
    card = _champion_card(current, current_schema)
    if problem := _contract_problem(challenger, card, current.tags, registered_model):
        name = suggested_name(registered_model, challenger.input_schema)
        return Decision(
            False, "other_input",
            f"{problem}: a model for another input or other classes never takes @champion. To register "
            f"{challenger.name}, set evaluate.registered_model to a new name, e.g. "
            f"`slimflow run --set evaluate.registered_model={name}`",
            champion=card, suggested_name=name,
        )
    same_data = card["data_digest"] is not None and card["data_digest"] == challenger.data_digest
    if same_data and current.tags.get("model_digest") == challenger.model_digest:
        return Decision(True, "already_champion",
                        f"{challenger.name} already is the champion (version {card['version']}, same model file "
                        "and data); no new version", basis="same model file", champion=card)
    same_code = (challenger.git_commit is not None and card["git_commit"] == challenger.git_commit
                 and card["runtime_versions"] == challenger.runtime_versions)
    # Figures recorded on another test split (another seed) are no measure of this one's rows.
    same_split = not _other_split_of_the_data(card["data_split"], challenger.data_split)
    recorded = None
    if same_data and same_split and same_code and "accuracy" in card["recorded"]:
        card[CLASS_RECALL] = recorded_class_recall(current.tags)
        recorded, on_class = _versus(challenger, card, "recorded evidence", card["recorded"]["accuracy"], None,
                                     tolerance, class_tolerance)
        # A class loss the sample floor counts may be chance, which only the champion's own
        # predictions can tell: for those, the champion is re-measured (seconds) to pair them.
        if not on_class or challenger.predictions is None:
            return recorded
    try:
        figures = dict(remeasure_champion(f"models:/{registered_model}/{card['version']}"))
    except RemeasureError as err:
        if recorded is not None:
            return recorded
        return Decision(False, "unmeasured", f"the champion (version {card['version']}) could not be "
                        f"re-measured on this run's test split: {err}", champion=card)
    card[CLASS_RECALL] = figures.pop(CLASS_RECALL, None)
    their_predictions = figures.pop(PREDICTIONS, None)
    card["remeasured"] = figures
    basis = "re-measured on this run's test split" + ("" if recorded is None else ", to pair the classes")
    seen = seen_by_champion(current) if seen_by_champion is not None else None
    keep = _unseen_rows(challenger, seen, their_predictions)
    rows = None if keep is None else {"test_rows": int(len(keep)), "compared": int(keep.sum()),
                                      "left_out": int((~keep).sum())}
    contender, caveat = challenger, None
    if rows is not None and rows["left_out"] and rows["compared"] >= MIN_UNSEEN_ROWS:
        contender, their_predictions, card[CLASS_RECALL], figures = _on_rows(challenger, their_predictions, keep)
        card["remeasured"] = {**card["remeasured"], "on_unseen_rows": figures}
        basis += f", on the {rows['compared']} of its {rows['test_rows']} rows the champion never trained on"
    elif rows is not None and rows["left_out"]:
        caveat = (f"{rows['left_out']} of this run's {rows['test_rows']} test rows were in the champion's train or "
                  f"validation split, leaving fewer than {MIN_UNSEEN_ROWS} it never saw to compare on: its "
                  "re-measured figures are optimistic")
    elif rows is None and same_data:
        caveat = _other_split(card, challenger)
    decision = _versus(contender, card, basis, figures["accuracy"], their_predictions, tolerance, class_tolerance)[0]
    if rows is not None and caveat is None:  # compared on the rows the champion never saw (all of them, or some)
        decision.compared_on = {**rows, "challenger": {key: contender.figures[key] for key in QUALITY
                                                       if key in contender.figures},
                                "champion": {key: figures[key] for key in QUALITY if key in figures}}
        if not rows["left_out"]:
            decision.reason += " (none of this run's test rows was among the rows the champion trained on)"
    if caveat:
        decision.reason += f" ({caveat})"
    if same_data and caveat is None and (flattered := _flattered_by_its_split(card, challenger)):
        decision.reason += f" ({flattered})"
    return decision


def _unseen_rows(challenger: Challenger, seen: np.ndarray | None, their_predictions: Any) -> np.ndarray | None:
    """Which of this run's test rows the champion never trained on (a mask; None: the
    champion kept no fingerprints, or this run has none to match)."""
    ours = challenger.test_rows
    if (seen is None or ours is None or challenger.labels is None or challenger.predictions is None
            or their_predictions is None or not (len(ours) == len(challenger.labels) == len(their_predictions))):
        return None
    return ~np.isin(ours, seen)


def _on_rows(challenger: Challenger, their_predictions: np.ndarray, keep: np.ndarray,
             ) -> tuple[Challenger, np.ndarray, dict[str, float], dict[str, float]]:
    """The challenger and the champion's predictions on the ``keep`` rows only: the
    challenger's figures and per-class rows there, the champion's predictions, class recall
    and figures there."""
    names = list(challenger.class_names) or list(challenger.per_class)
    labels, ours, theirs = challenger.labels[keep], challenger.predictions[keep], np.asarray(their_predictions)[keep]
    our_quality, our_classes, _ = classification_metrics(labels, ours, names)
    their_quality, their_classes, _ = classification_metrics(labels, theirs, names)
    contender = replace(challenger, figures={**challenger.figures, **{key: our_quality[key] for key in QUALITY}},
                        per_class={name: dict(row) for name, row in our_classes.items()},
                        labels=labels, predictions=ours, test_rows=challenger.test_rows[keep],
                        test_records=None if challenger.test_records is None else challenger.test_records[keep])
    return (contender, theirs, {name: float(row["recall"]) for name, row in their_classes.items()},
            {key: float(their_quality[key]) for key in QUALITY})


def split_text(split: dict[str, Any]) -> str:
    """A data split (``data_split``) in words: ``seed 42, val/test 0.15/0.25`` (and where the
    data holds copies of a record, ``, copies together`` or ``, copies apart``; where a column
    names groups or times, how it split them)."""
    said = f"seed {split['seed']}, val/test {float(split['val_fraction']):g}/{float(split['test_fraction']):g}"
    return (said + (f", copies {split['copies']}" if "copies" in split else "")
            + (f", each {split['groups']!r} group in one split" if "groups" in split else "")
            + (f", in {split['time']!r} order" if "time" in split else ""))


def _other_split_of_the_data(theirs: dict[str, Any] | None, ours: dict[str, Any] | None) -> bool:
    """Whether two recorded splits of the same data differ (False where either is unknown).
    A split recorded before copies were looked for split them apart."""
    if not theirs or not ours:
        return False
    return {"copies": "apart", **theirs} != {"copies": "apart", **ours}


def _other_split(card: dict[str, Any], challenger: Challenger) -> str | None:
    """Why a re-measurement flatters the champion, where it does: the same data split
    another way (another ``base.seed`` or other fractions), so some of this run's test
    rows were in the champion's train split (or a copy of them, where it split copies apart)."""
    theirs, ours = card.get("data_split"), challenger.data_split
    if not _other_split_of_the_data(theirs, ours):
        return None
    return (f"the champion was trained on another split of the same data ({split_text(theirs)}; this run "
            f"{split_text(ours)}): "
            "some of this run's test rows were in its train split, so its re-measured figures are optimistic")


def _flattered_by_its_split(card: dict[str, Any], challenger: Challenger) -> str | None:
    """Why a champion measured on the rows it never trained on is still flattered, where this
    run's split keeps what the champion's did not: each group of a column together (a test
    row the champion never saw may be of a patient, a customer, whose other rows it trained
    on), or the rows in time order (it trained on rows of this run's test period). None otherwise."""
    theirs, ours = card.get("data_split") or {}, challenger.data_split or {}
    if (column := ours.get("groups")) and theirs.get("groups") != column:
        kept, why = (f"did not keep each {column!r} group in one split",
                     f"this run's test rows may belong to {column!r} groups it trained on")
    elif (column := ours.get("time")) and theirs.get("time") != column:
        kept, why = (f"was not in {column!r} order", "it trained on rows from this run's test period")
    else:
        return None
    return (f"the champion's split {kept} ({split_text(theirs)}" if theirs else
            f"the champion recorded no split of its data (this run: {split_text(ours)}") + (
        f"): {why}, so its re-measured figures are optimistic")


def _versus(challenger: Challenger, card: dict[str, Any], basis: str, theirs: float, their_predictions: Any,
            tolerance: float, class_tolerance: float | None) -> tuple[Decision, bool]:
    """The challenger against the champion's figures (``card``); True beside a refusal for a
    class's recall that the sample floor alone decided (no predictions to pair)."""
    ours = challenger.figures["accuracy"]
    versus = (f"{challenger.name} accuracy {ours:.4f} vs the champion's (version {card['version']}, "
              f"{card['variant']}) {theirs:.4f}, {basis}")
    if ours + tolerance + _EPS < theirs:
        noise = _difference_noise(challenger, their_predictions)
        return Decision(False, "worse", f"{versus}: {theirs - ours:.4f} worse{noise}, more than max_accuracy_drop "
                        f"{tolerance:g}", basis=basis, champion=card), False
    within = f"{versus}: within max_accuracy_drop {tolerance:g}"
    if class_tolerance is not None and challenger.per_class:
        theirs_by_class = _as_rows(card[CLASS_RECALL] or {}, challenger)
        pairs = _paired(challenger, their_predictions)
        if not card[CLASS_RECALL]:
            within += "; the champion records no per-class recall, so no class was compared"
        elif problem := class_recall_problem(challenger.per_class, theirs_by_class, class_tolerance, pairs):
            return Decision(False, "worse", f"{within}, but against the champion its {problem}", basis=basis,
                            champion=card), pairs is None
        else:
            within += f" and each class within max_class_recall_drop {class_tolerance:g}"
            if pairs and (note := class_recall_within_chance(challenger.per_class, theirs_by_class, class_tolerance,
                                                             pairs)):
                within += f" ({note})"
    return Decision(True, "not_worse", within, basis=basis, champion=card), False


def _difference_noise(challenger: Challenger, their_predictions: Any) -> str:
    """`` (±0.0180, one standard error paired on the same 267 test rows: beyond chance)``:
    how finely this run's test rows measure the accuracy difference, where the champion was
    re-measured on them (copies of one record, or a group's rows, counted once); empty
    otherwise. The verdict stays max_accuracy_drop's: the champion keeps the alias unless the
    challenger is within it."""
    labels, ours = challenger.labels, challenger.predictions
    if their_predictions is None or ours is None or labels is None or np.shape(their_predictions) != np.shape(labels):
        return ""
    theirs_right, ours_right = np.asarray(their_predictions) == labels, np.asarray(ours) == labels
    noise, _ = paired_change_noise(theirs_right, ours_right, _test_records(challenger))
    if math.isnan(noise):  # fewer than two rows
        return ""
    difference = float(theirs_right.mean() - ours_right.mean())
    chance = "within chance" if difference <= BEYOND_CHANCE * noise + _EPS else "beyond chance"
    return f" (±{noise:.4f}, one standard error paired on the same {len(labels)} test rows: {chance})"


def _paired(challenger: Challenger, their_predictions: Any) -> dict[str, tuple[int, int]] | None:
    """Per class, the test samples only the champion gets right and only the challenger does
    (copies of one record counted once), where the champion was re-measured on this run's
    test split (None otherwise)."""
    if their_predictions is None or challenger.predictions is None or challenger.labels is None:
        return None
    if np.shape(their_predictions) != np.shape(challenger.labels):
        return None
    return class_disagreements(challenger.labels, their_predictions, challenger.predictions,
                               list(challenger.per_class), _test_records(challenger))


def _test_records(challenger: Challenger) -> np.ndarray | None:
    """The challenger's test rows' records (copies of one, or a group's rows), where there
    is one for each of its labelled rows; None otherwise (each row its own)."""
    records = challenger.test_records
    return records if records is not None and len(records) == len(challenger.labels) else None


def _as_rows(class_recall: dict[str, float], challenger: Challenger) -> dict[str, dict[str, float]]:
    """The champion's recall per class with the test split's support (the challenger's: the
    same split, recorded on the same data or re-measured on this run's)."""
    return {name: {"recall": recall, "support": challenger.per_class[name].get("support", 0)}
            for name, recall in class_recall.items() if name in challenger.per_class}
