"""The evaluate stage's registry step: the gate's winner challenges the current champion
(:mod:`tasks.evaluation.challenge`) and is registered with its evidence, or the alias stays
(:mod:`tasks.evaluation.promotion`); either way the decision and both models' figures
become ``promotion.json``."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import tempfile
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import mlflow
import numpy as np

from tasks.core import tracking
from tasks.core.config import EvaluateParams
from tasks.core.paths import ProjectPaths
from tasks.core.run_context import RunContext
from tasks.evaluation.challenge import HEADLINE, SEEN_ROWS, SEEN_ROWS_SCHEME, Challenger, Decision, decide, remeasure
from tasks.evaluation.gate import no_skill_problem
from tasks.evaluation.promotion import (
    CHAMPION_ALIAS, Promotion, RegistryError, current_champion, keep_champion, promote, tag_value,
    version_input_schema,
)
from tasks.evaluation.pyfunc import runtime_versions
from tasks.evaluation.results import Evaluation, ModelResult, json_number
from tasks.evaluation.signature import input_schema

log = logging.getLogger("slimflow.registry")


def data_digest_or_none(paths: ProjectPaths) -> str | None:
    """The prepared data's digest, or None when it cannot be read."""
    from tasks.data import data_digest

    try:
        return data_digest(paths.prepared)
    except (OSError, KeyError, ValueError):
        return None


def _lock_md5(paths: ProjectPaths) -> str | None:
    lock = paths.root / "dvc.lock"
    return hashlib.md5(lock.read_bytes()).hexdigest() if lock.is_file() else None


def challenger_of(result: ModelResult, paths: ProjectPaths, labels: Any = None, records: Any = None) -> Challenger:
    """``records``: each test row's record, where the split holds more than one of one (Evaluation.records)."""
    from tasks.data import data_split, load_preprocessing, load_row_fingerprints

    preprocessing = load_preprocessing(paths.prepared)
    return Challenger(
        name=result.name,
        figures={key: json_number(result.metrics[key]) for key in HEADLINE if key in result.metrics},
        input_schema=input_schema(preprocessing),
        num_classes=preprocessing.num_classes,
        class_names=tuple(preprocessing.class_names),
        data_digest=data_digest_or_none(paths),
        data_split=data_split(paths.prepared),
        model_digest=result.manifest.get("digest"),
        git_commit=tracking.git_commit(paths.root),
        runtime_versions=runtime_versions(),
        per_class={name: dict(row) for name, row in result.per_class.items()},
        labels=labels, predictions=None if labels is None else result.predictions,
        test_rows=load_row_fingerprints(paths.prepared, "test"), test_records=records,
    )


def log_seen_rows(paths: ProjectPaths) -> dict[str, str]:
    """Log the fingerprints of the train and validation rows (what a model of this run
    learned from or was chosen on) into the active run; the version tags that find them
    (none where the prepared data has no fingerprints)."""
    from tasks.data import ROW_FINGERPRINT_SCHEME, load_row_fingerprints

    seen = load_row_fingerprints(paths.prepared, "train", "val")
    if seen is None:
        return {}
    with tempfile.TemporaryDirectory(prefix="slimflow-seen-") as tmp:
        path = f"{tmp}/{SEEN_ROWS}.npy"
        np.save(path, np.unique(seen), allow_pickle=False)
        mlflow.log_artifact(path)
    return {SEEN_ROWS: f"{SEEN_ROWS}.npy", SEEN_ROWS_SCHEME: ROW_FINGERPRINT_SCHEME}


def champion_seen_rows(version: Any) -> np.ndarray | None:
    """The fingerprints of the rows a registered version trained on (None: it kept none, or
    they cannot be read, which the decision then says)."""
    from mlflow.exceptions import MlflowException

    from tasks.data import ROW_FINGERPRINT_SCHEME

    tags = version.tags or {}
    path = tags.get(SEEN_ROWS)
    if not path or not version.run_id:
        return None
    if tags.get(SEEN_ROWS_SCHEME) != ROW_FINGERPRINT_SCHEME:  # another way of computing them: never equal
        log.info("promotion: version %s kept its rows' fingerprints as %r, this run as %r: compared on the whole "
                 "test split", version.version, tags.get(SEEN_ROWS_SCHEME), ROW_FINGERPRINT_SCHEME)
        return None
    try:
        with tempfile.TemporaryDirectory(prefix="slimflow-seen-") as tmp:
            local = mlflow.artifacts.download_artifacts(run_id=version.run_id, artifact_path=path, dst_path=tmp)
            return np.load(local, allow_pickle=False)
    except (MlflowException, OSError, ValueError) as err:
        log.warning("promotion: the rows version %s trained on could not be read (%s): compared on the whole "
                    "test split", version.version, err)
        return None


def evidence(
    result: ModelResult, challenger: Challenger, evaluation: Evaluation, paths: ProjectPaths,
    params: EvaluateParams, decision: Decision,
) -> dict[str, Any]:
    """Version tags: what a reviewer needs (the full metrics stay on the model's run)."""
    context = RunContext.current()
    found: dict[str, Any] = {f"metric.{key}": value for key, value in challenger.figures.items()}
    found.update(
        method=result.method,
        runtime=result.runtime,
        recipe=result.manifest.get("recipe") or [],
        data_digest=challenger.data_digest,
        data_split=challenger.data_split,
        dvc_lock_md5_at_evaluate=_lock_md5(paths),  # prepare/train/compress as this run left them
        git_commit=challenger.git_commit,
        runtime_versions=challenger.runtime_versions,
        input_schema=challenger.input_schema,
        num_classes=challenger.num_classes,
        class_names=list(challenger.class_names),
        class_recall={name: json_number(row["recall"]) for name, row in challenger.per_class.items()},
        gate=params.gate.model_dump(),
        objective=params.objective,
        gate_decision=evaluation.reasons.get(result.name),
        promotion_decision=decision.reason,
        source_run_id=evaluation.run_ids.get(result.name),
        evaluate_run_id=evaluation.stage_run_id,
        pipeline_run_id=context.parent_run_id or evaluation.stage_run_id,
        prefect_flow_run_id=context.flow_run_id,
    )
    return found


def register_champion(evaluation: Evaluation, paths: ProjectPaths, params: EvaluateParams) -> Promotion:
    """Challenge the champion with the gate's winner; register it or keep the alias, and say why."""
    name = params.registered_model
    if not evaluation.champion:
        why = "no model passes the gate (see the reasons per model)"
        promotion = keep_champion(name, why, {"registered_model": name, "verdict": "no_candidate",
                                              "allowed": False, "reason": why})
        return _settled(promotion, evaluation)
    if why := no_skill_problem(evaluation, evaluation.champion):
        promotion = keep_champion(name, why, {"registered_model": name, "verdict": "no_skill", "allowed": False,
                                              "reason": why})
        return _settled(promotion, evaluation)
    result = evaluation.models[evaluation.champion]
    challenger = challenger_of(result, paths, evaluation.y_true, evaluation.records)
    with registry_lock(paths):  # the champion read here is the one challenged and replaced
        return _settled(_challenge(evaluation, result, challenger, paths, params), evaluation)


# How long a promotion waits for another run's (a re-measurement of the champion takes seconds).
REGISTRY_WAIT_S = 600.0


@contextlib.contextmanager
def registry_lock(paths: ProjectPaths, wait_s: float = REGISTRY_WAIT_S) -> Iterator[None]:
    """One promotion at a time among the runs of this project on this host: two evaluate
    stages at once (``dvc queue start -j 2``, which run in copies of the project that log to
    its store) would both challenge the same champion, and the second alias move would undo
    the first whatever the gate said. The lock is ``.slimflow/registry.lock`` of the project
    whose store the runs use (:func:`tasks.core.tracking.store_home`)."""
    from filelock import FileLock, Timeout

    path = tracking.store_home(paths.root) / ".slimflow" / "registry.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info("registry: waiting for another run's promotion to finish (%s)", path)
        try:
            lock.acquire(timeout=wait_s)
        except Timeout:
            raise RegistryError(f"{path}: another run held the registry for {wait_s:.0f} s; "
                                "nothing registered by this run") from None
    try:
        yield
    finally:
        lock.release()


def _challenge(evaluation: Evaluation, result: ModelResult, challenger: Challenger, paths: ProjectPaths,
               params: EvaluateParams) -> Promotion:
    """The gate's winner against the champion: registered (the alias moved) or not, and why."""
    name = params.registered_model
    current = current_champion(name)
    decision = decide(
        challenger, current, version_input_schema(current) if current else None, name,
        params.gate.max_accuracy_drop,
        lambda uri: remeasure(uri, paths.prepared, evaluation.class_names, params.threads),
        params.gate.max_class_recall_drop, champion_seen_rows,
    )
    document = decision.document(challenger, name, params.gate.max_accuracy_drop,
                                 int(evaluation.settings["test_samples"]), params.gate.max_class_recall_drop)
    log.info("promotion: %s", decision.reason)
    if decision.verdict == "already_champion":
        version = str(current.version)
        promotion = Promotion(True, name, result.name, version, version, decision.reason, decision=document)
    elif not decision.allowed:
        promotion = keep_champion(name, decision.reason, document)
        if current is not None:  # the champion that stayed keeps a note of the challenge
            mlflow.MlflowClient().set_model_version_tag(
                name, str(current.version), "last_challenge", tag_value(_compact(document, evaluation)))
    else:
        # Registered from the model its own run logged (not logged twice), inside that run (resumed).
        with mlflow.start_run(run_id=evaluation.run_ids[result.name], nested=True):
            tags = evidence(result, challenger, evaluation, paths, params, decision)
            tags.update(log_seen_rows(paths))
            tags["promotion_evidence"] = _compact(document, evaluation)
            promotion = promote(result.name, result.folder, paths.prepared, name, tags, document,
                                model_uri=evaluation.model_uris.get(result.name))
        promotion = replace(promotion, reason=f"{promotion.reason} ({decision.reason})")
    return promotion


def _compact(document: dict[str, Any], evaluation: Evaluation) -> dict[str, Any]:
    """The decision for a version tag (< 5000 characters): verdict, basis, both models' figures."""
    champion = document.get("champion") or {}
    return {
        "verdict": document.get("verdict"), "basis": document.get("basis"),
        "split": document.get("split"), "compared_on": document.get("compared_on"),
        "evaluate_run_id": evaluation.stage_run_id,
        "challenger": {"model": document["challenger"]["model"], **document["challenger"]["figures"]},
        "champion": {"version": champion.get("version"), "variant": champion.get("variant"),
                     "recorded": champion.get("recorded"), "remeasured": champion.get("remeasured")}
        if champion else None,
    }


def _settled(promotion: Promotion, evaluation: Evaluation) -> Promotion:
    """The registry as it is now: the version ``@champion`` points at goes into the report."""
    holder = current_champion(promotion.registered_model)
    version = str(holder.version) if holder else None
    variant = holder.tags.get("variant") if holder else None
    document = {
        **promotion.decision,
        "outcome": {
            "promoted": promotion.promoted, "new_version": promotion.new_version,
            "alias": CHAMPION_ALIAS, "champion_version": version, "champion_variant": variant,
            "previous_version": promotion.previous_version,
        },
        "evaluate_run_id": evaluation.stage_run_id,
        "pipeline_run_id": RunContext.current().parent_run_id or evaluation.stage_run_id,
    }
    return replace(promotion, version=version, champion=variant, decision=document)
