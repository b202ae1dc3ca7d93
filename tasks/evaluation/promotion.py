"""The MLflow Model Registry: versions, the ``champion`` alias, rollback.

:func:`promote` logs a model as a :class:`~tasks.evaluation.pyfunc.SlimflowClassifier`
("models from code", with a signature and an input example), creates the registered
version WITH its evidence tags and description in one call, and moves the ``champion``
alias last, so a crash leaves either nothing or a complete version that no alias points
at. :func:`keep_champion` leaves the alias where it is. :func:`rollback_champion` points it
back at the champion before (the ``previous_champion`` tag each promotion records), with
the reason as a tag. Whether a challenger may be promoted at all is decided in
:mod:`tasks.evaluation.challenge`.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import hashlib
import json
import logging
import os
import signal
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import mlflow

from tasks.core.classification import index_names
from tasks.core.paths import CODE_ROOT
from tasks.evaluation.pyfunc import pip_requirements
from tasks.evaluation.signature import (
    TOKENIZER_FILE, column_difference, describe, input_example, input_schema, model_signature, same_input,
)

log = logging.getLogger("slimflow.registry")

CHAMPION_ALIAS = "champion"
# Tests only: SIGKILL this process between creating a version and moving the alias, the
# moment a crash could leave the registry half-changed (tests/test_champion.py).
FAULT_BEFORE_ALIAS_ENV = "SLIMFLOW_FAULT_BEFORE_ALIAS"
MODEL_CODE = Path(__file__).with_name("champion_model.py")  # logged as the model's code


class RegistryError(RuntimeError):
    """A registry request that cannot be done; the message says why in one line."""


@dataclass(frozen=True)
class Promotion:
    """What happened in the registry."""

    promoted: bool  # the gate's winner holds the alias after this run
    registered_model: str
    champion: str | None  # the model (baseline / variant) behind the alias after this run
    version: str | None  # the version the alias points at after this run
    previous_version: str | None
    reason: str
    new_version: bool = False  # a version was registered by this run
    decision: dict[str, Any] = field(default_factory=dict)  # the evidence: promotion.json


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


# What the registry keeps of a version tag (MLflow's limit for model version tags): a data
# set's column or class names as JSON fit whole; truncated JSON would not read back.
TAG_VALUE_LIMIT = 100_000


def tag_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return text[:TAG_VALUE_LIMIT]


@functools.cache
def _code_digest() -> str:
    """SHA-256 of the Python code a logged model carries (``tasks`` and ``models``, as
    :func:`log_pyfunc_model` copies them), by relative path."""
    digest = hashlib.sha256()
    for package in ("tasks", "models"):
        for path in sorted((CODE_ROOT / package).rglob("*.py")):
            digest.update(str(path.relative_to(CODE_ROOT)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def serving_digest(prepared: Path) -> str:
    """What a logged model serves with besides its model file: the code it carries, its
    signature's source (``preprocess.json``) and a text model's tokenizer. A logged model is
    reused for the same model file only where this is the same too, so a changed slimflow or
    data contract never reaches the registry in an older logged model."""
    digest = hashlib.sha256(_code_digest().encode())
    for name in ("preprocess.json", TOKENIZER_FILE):
        if (prepared / name).is_file():
            digest.update(name.encode() + b"\0" + (prepared / name).read_bytes())
    return digest.hexdigest()


def log_pyfunc_model(model_dir: Path, prepared: Path, name: str = "champion_model", model_id: str | None = None) -> Any:
    """Log ``model_dir`` as models-from-code to the active run, with signature and input example
    (into the logged model ``model_id``, if given: one made by ``mlflow.initialize_logged_model``)."""
    from tasks.core.model_files import read_manifest
    from tasks.data import load_preprocessing

    manifest = read_manifest(model_dir)
    preprocessing = load_preprocessing(prepared)
    with _quiet_signature_check():
        return mlflow.pyfunc.log_model(
            name=name,
            python_model=str(MODEL_CODE),
            artifacts={
                "model": str(model_dir), "preprocess": str(prepared / "preprocess.json"),
                # Text: the tokenizer trained in prepare, so the served model takes raw text.
                **({"tokenizer": str(prepared / TOKENIZER_FILE)} if preprocessing.is_text else {}),
            },
            code_paths=[str(CODE_ROOT / "tasks"), str(CODE_ROOT / "models")],
            pip_requirements=pip_requirements(manifest),
            signature=model_signature(preprocessing),
            input_example=input_example(prepared, preprocessing),
            metadata={"slimflow_model": manifest.get("name", model_dir.name),
                      "input": describe(input_schema(preprocessing)) + ", raw values"},
            model_id=model_id,
        )


@contextlib.contextmanager
def _quiet_signature_check() -> Iterator[None]:
    """MLflow says "Validating input example against model signature" at INFO for every
    model it logs: twelve lines in a default run's output, each saying nothing. The check
    still runs, and an example that does not fit still raises."""
    logger = logging.getLogger("mlflow.pyfunc")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def current_champion(registered_model: str) -> Any | None:
    """The model version the ``champion`` alias points at, or None."""
    from mlflow.exceptions import MlflowException

    try:
        return mlflow.MlflowClient().get_model_version_by_alias(registered_model, CHAMPION_ALIAS)
    except MlflowException:
        return None


def version_input_schema(version: Any) -> dict[str, Any] | None:
    """A registered version's input contract: its ``input_schema`` tag, else its ``preprocess.json``."""
    try:
        return json.loads(version.tags["input_schema"])
    except (KeyError, ValueError):
        pass
    try:  # a version registered before the tag existed: read the preprocessing it ships with
        from tasks.data import Preprocessing

        uri = mlflow.MlflowClient().get_model_version_download_uri(version.name, version.version)
        local = mlflow.artifacts.download_artifacts(artifact_uri=f"{uri}/artifacts/preprocess.json")
        return input_schema(Preprocessing.from_json(Path(local).read_text()))
    except Exception as err:  # noqa: BLE001 - an unreadable contract is "unknown", decided by the caller
        log.warning("version %s of %s: input schema unknown (%s)", version.version, version.name, err)
        return None


def _register_version(registered_model: str, info: Any, run_id: str | None, tags: Mapping[str, Any],
                      description: str) -> str:
    """One ``create_model_version`` call carries the tags and the description: no half-tagged version."""
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient()
    try:
        client.create_registered_model(registered_model)
    except MlflowException as err:
        if err.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise
    version = client.create_model_version(
        registered_model, source=info.model_uri, run_id=run_id, description=description,
        tags={key: tag_value(value) for key, value in tags.items() if value is not None},
        model_id=getattr(info, "model_id", None),
    )
    if model_id := getattr(info, "model_id", None):
        _link_logged_model(client, model_id, registered_model, str(version.version))
    return str(version.version)


def _link_logged_model(client: Any, model_id: str, registered_model: str, version: str) -> None:
    """What ``mlflow.register_model`` records: the logged model lists the versions made from it
    (the UI shows them in the run's Models column and on the logged model's page)."""
    from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

    known = client.get_logged_model(model_id).tags.get(MLFLOW_MODEL_VERSIONS)
    versions = [*json.loads(known or "[]"), {"name": registered_model, "version": int(version)}]
    client.set_logged_model_tags(model_id, {MLFLOW_MODEL_VERSIONS: json.dumps(versions)})


def promote(
    model_name: str, model_dir: Path, prepared: Path, registered_model: str, evidence: Mapping[str, Any],
    decision: Mapping[str, Any] | None = None, model_uri: str | None = None,
) -> Promotion:
    """Register ``model_dir`` from the active run and point the ``champion`` alias at it (last).

    ``evidence`` (figures, recipe, data digest, git commit...) becomes version tags, with
    ``previous_champion`` (the version the alias leaves) and ``promoted_at``.
    ``model_uri`` (``models:/<model_id>``) registers that already logged model (the model's own
    run logged it) instead of logging the model again.
    """
    from tasks.core.model_files import read_manifest

    manifest = read_manifest(model_dir)
    previous = current_champion(registered_model)
    previous_version = str(previous.version) if previous else None
    if model_uri:
        info = SimpleNamespace(model_uri=model_uri, model_id=model_uri.removeprefix("models:/"))
    else:
        info = log_pyfunc_model(model_dir, prepared)
    run = mlflow.active_run()
    tags = {"model_digest": manifest.get("digest"), "variant": model_name, **evidence,
            "previous_champion": previous_version, "promoted_at": now()}
    schema = evidence.get("input_schema")
    description = (
        f"slimflow {model_name} ({manifest.get('method', 'baseline')}, {manifest.get('runtime')}): predicts "
        f"class indices from raw inputs, {describe(schema) if schema else 'shaped (N, *input_shape)'}"
    )
    if class_names := evidence.get("class_names"):
        description += f"; with params {{\"output\": \"name\"}} the class names ({index_names(class_names)})"
    description += "."
    version = _register_version(registered_model, info, run.info.run_id if run else None, tags, description)
    # The alias moves last: until here a crash leaves the old champion serving.
    if os.environ.get(FAULT_BEFORE_ALIAS_ENV):  # tests only
        os.kill(os.getpid(), signal.SIGKILL)
    mlflow.MlflowClient().set_registered_model_alias(registered_model, CHAMPION_ALIAS, version)
    log.info("registered %s as %s version %s, alias @%s", model_name, registered_model, version, CHAMPION_ALIAS)
    return Promotion(
        True, registered_model, model_name, version, previous_version,
        f"{model_name} registered as version {version}; @{CHAMPION_ALIAS} moved"
        + (f" from version {previous_version}" if previous_version else ""),
        new_version=True, decision=dict(decision or {}),
    )


def keep_champion(registered_model: str, why: str, decision: Mapping[str, Any] | None = None) -> Promotion:
    """The alias stays where it is; say why and where it points."""
    previous = current_champion(registered_model)
    version = str(previous.version) if previous else None
    holder = previous.tags.get("variant") if previous else None
    where = (f"version {version} ({holder}) stays @{CHAMPION_ALIAS}" if previous
             else f"no version of {registered_model} holds @{CHAMPION_ALIAS}")
    log.warning("no model promoted: %s; %s", why, where)
    return Promotion(False, registered_model, holder, version, version, f"nothing promoted: {why}; {where}",
                     decision=dict(decision or {}))


@dataclass(frozen=True)
class Rollback:
    registered_model: str
    from_version: str
    to_version: str
    reason: str


def rollback_champion(registered_model: str, reason: str, to: str | None = None) -> Rollback:
    """Point ``@champion`` at the champion before (or version ``to``); the reason becomes tags."""
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient()
    current = current_champion(registered_model)
    if current is None:
        raise RegistryError(f"{registered_model}: no version holds @{CHAMPION_ALIAS}; nothing to roll back")
    target = str(to or current.tags.get("previous_champion") or "")
    if not target:
        raise RegistryError(f"{registered_model} version {current.version} records no previous champion; "
                            "name the version with --to VERSION")
    if target == str(current.version):
        raise RegistryError(f"{registered_model} version {target} already holds @{CHAMPION_ALIAS}")
    try:
        wanted = client.get_model_version(registered_model, target)
    except MlflowException:
        raise RegistryError(f"{registered_model} has no version {target}") from None
    ours, theirs = version_input_schema(current), version_input_schema(wanted)
    if not same_input(ours, theirs):
        detail = column_difference(ours, theirs, "the champion", f"version {target}")
        raise RegistryError(f"{registered_model} version {target} takes {describe(theirs)}, the champion "
                            f"(version {current.version}) {describe(ours)}" + (f" ({detail})" if detail else "")
                            + ": a rollback never changes the input")
    from tasks.evaluation.challenge import other_classes

    if classes := other_classes(current.tags, wanted.tags):
        raise RegistryError(f"{registered_model} version {target} predicts the classes {classes[1]}, the champion "
                            f"(version {current.version}) {classes[0]}: a rollback never changes what an index means")
    at = now()
    client.set_model_version_tag(registered_model, target, "rollback_reason", reason[:5000])
    client.set_model_version_tag(registered_model, target, "rolled_back_from", str(current.version))
    client.set_model_version_tag(registered_model, target, "rolled_back_at", at)
    client.set_model_version_tag(registered_model, str(current.version), "rolled_back",
                                 tag_value({"to": target, "reason": reason, "at": at}))
    client.set_registered_model_alias(registered_model, CHAMPION_ALIAS, target)  # last
    log.info("@%s of %s: version %s -> %s (%s)", CHAMPION_ALIAS, registered_model, current.version, target, reason)
    return Rollback(registered_model, str(current.version), target, reason)


def _split_said(tags: dict[str, str]) -> str | None:
    """A version's data split as ``champion show`` says it (None: not recorded)."""
    from tasks.evaluation.challenge import split_text

    try:
        said = split_text(json.loads(tags["data_split"]))
    except (KeyError, TypeError, ValueError):
        return None
    if tags.get("seen_rows"):
        said += f"; the train and validation rows' fingerprints kept ({tags['seen_rows']} of the model run)"
    return said


def describe_champion(registered_model: str) -> dict[str, Any] | None:
    """What ``slimflow champion show`` prints: the version behind the alias and its evidence."""
    from tasks.evaluation.challenge import described_classes, recorded_figures

    current = current_champion(registered_model)
    if current is None:
        return None
    tags = current.tags
    created = dt.datetime.fromtimestamp(current.creation_timestamp / 1000, dt.timezone.utc)
    return {
        "registered_model": registered_model,
        "version": str(current.version),
        "variant": tags.get("variant"),
        "method": tags.get("method"),
        "data_digest": tags.get("data_digest"),
        "data_split": _split_said(tags),
        "input": describe(version_input_schema(current)),
        "classes": described_classes(tags),
        "figures": recorded_figures(tags),
        "promoted_at": tags.get("promoted_at") or created.isoformat(timespec="seconds"),
        "pipeline_run_id": tags.get("pipeline_run_id"),
        "evaluate_run_id": tags.get("evaluate_run_id"),
        "prefect_flow_run_id": tags.get("prefect_flow_run_id"),
        "model_run_id": current.run_id,
        "git_commit": tags.get("git_commit"),
        "previous_champion": tags.get("previous_champion"),
        "rollback": {key: tags[key] for key in ("rolled_back_from", "rolled_back_at", "rollback_reason")
                     if key in tags} or None,
    }
