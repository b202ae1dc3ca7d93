"""The MLflow Model Registry: the gate's winner logged as a pyfunc model, registered, and
given the ``champion`` alias.

:func:`promote` logs the winner as a :class:`~tasks.evaluation.pyfunc.SlimflowClassifier`,
registers it under ``evaluate.registered_model``, moves the ``champion`` alias to the new
version (earlier versions stay) and tags the version with its evidence;
:func:`keep_champion` leaves the alias where it is and says why.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow

from tasks.evaluation.pyfunc import SlimflowClassifier, pip_requirements

log = logging.getLogger("slimflow.registry")

CHAMPION_ALIAS = "champion"
CODE_ROOT = Path(__file__).resolve().parents[2]  # holds the `tasks` and `models` packages


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


def log_pyfunc_model(
    model_dir: Path,
    preprocess_json: Path,
    registered_model: str | None = None,
    name: str = "champion_model",
) -> Any:
    """Log ``model_dir`` as a :class:`SlimflowClassifier` to the active run (and register it)."""
    from tasks.core.model_files import read_manifest

    manifest = read_manifest(model_dir)
    return mlflow.pyfunc.log_model(
        name=name,
        python_model=SlimflowClassifier(),
        artifacts={"model": str(model_dir), "preprocess": str(preprocess_json)},
        code_paths=[str(CODE_ROOT / "tasks"), str(CODE_ROOT / "models")],
        pip_requirements=pip_requirements(manifest),
        registered_model_name=registered_model,
        metadata={"slimflow_model": manifest.get("name", model_dir.name), "input": "raw, flat or shaped"},
    )


def current_champion(registered_model: str) -> Any | None:
    """The model version the ``champion`` alias points at, or None."""
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient()
    try:
        return client.get_model_version_by_alias(registered_model, CHAMPION_ALIAS)
    except MlflowException:
        return None


def _tag_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return text[:5000]


def promote(
    model_name: str,
    model_dir: Path,
    preprocess_json: Path,
    registered_model: str,
    evidence: Mapping[str, Any],
    model_uri: str | None = None,
) -> Promotion:
    """Register ``model_dir`` from the active run and point the ``champion`` alias at it.

    ``evidence`` (metrics, recipe, data digest, git commit...) becomes version tags. When the
    champion already is this very model file on this very data, no new version is made.
    ``model_uri`` (``models:/<model_id>``) registers that already logged model instead of
    logging the model again.
    """
    from tasks.core.model_files import read_manifest

    client = mlflow.MlflowClient()
    manifest = read_manifest(model_dir)
    previous = current_champion(registered_model)
    previous_version = str(previous.version) if previous else None
    if previous is not None and previous.tags.get("model_digest") == manifest.get("digest") and previous.tags.get(
        "data_digest"
    ) == str(evidence.get("data_digest")):
        return Promotion(
            True, registered_model, model_name, previous_version, previous_version,
            f"{model_name} is already the champion (version {previous_version}, same model file and data); "
            "no new version",
        )
    if model_uri:
        version = str(mlflow.register_model(model_uri, registered_model).version)
    else:
        version = str(log_pyfunc_model(model_dir, preprocess_json, registered_model).registered_model_version)
    tags = {"model_digest": manifest.get("digest"), "variant": model_name, **evidence}
    for key, value in tags.items():
        if value is not None:
            client.set_model_version_tag(registered_model, version, key, _tag_value(value))
    client.update_model_version(
        registered_model, version,
        description=f"slimflow {model_name} ({manifest.get('method', 'baseline')}, {manifest.get('runtime')}): "
        "predicts class indices from raw inputs, flat or shaped.",
    )
    client.set_registered_model_alias(registered_model, CHAMPION_ALIAS, version)
    log.info("registered %s as %s version %s, alias @%s", model_name, registered_model, version, CHAMPION_ALIAS)
    return Promotion(
        True, registered_model, model_name, version, previous_version,
        f"{model_name} registered as version {version}; @{CHAMPION_ALIAS} moved"
        + (f" from version {previous_version}" if previous_version else ""),
        new_version=True,
    )


def keep_champion(registered_model: str, why: str) -> Promotion:
    """Nothing passed: leave the alias where it is and say why."""
    previous = current_champion(registered_model)
    version = str(previous.version) if previous else None
    holder = previous.tags.get("variant") if previous else None
    where = f"version {version} ({holder}) stays @{CHAMPION_ALIAS}" if previous else "no champion yet"
    log.warning("no model promoted: %s; %s", why, where)
    return Promotion(False, registered_model, holder, version, version, f"nothing promoted: {why}; {where}")
