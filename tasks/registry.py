"""The quality gate, the champion, and the model people load from the MLflow registry.

- :func:`select_champion` is a pure function of measured metrics: every model (the
  baseline included) that keeps within the gate (accuracy drop vs. the baseline, and
  optionally p95 latency and size on disk) is a candidate; the objective (``smallest`` or
  ``fastest``) picks one. Impossible thresholds give no champion.
- :func:`promote` logs the winner as an MLflow pyfunc model (:class:`SlimflowClassifier`),
  registers it under ``evaluate.registered_model``, moves the ``champion`` alias to the new
  version (earlier versions stay) and tags the version with its evidence.
- :class:`SlimflowClassifier` predicts class indices from RAW inputs (flat or shaped):
  it applies the train-split normalization from ``preprocess.json`` and runs the model
  folder through :func:`tasks.compression.loading.load_model_dir`, so
  ``mlflow.pyfunc.load_model("models:/<name>@champion")`` and ``mlflow models serve``
  answer with exactly what the evaluate stage measured.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np

from tasks.core.config import GateParams

log = logging.getLogger("slimflow.registry")

CHAMPION_ALIAS = "champion"
CODE_ROOT = Path(__file__).resolve().parent.parent  # holds the `tasks` and `models` packages
_EPS = 1e-9  # accuracies are ratios of integers: forgive float round-off at the threshold

# Metric each objective minimises, and the tie-breakers after it.
OBJECTIVES: dict[str, tuple[str, ...]] = {
    "smallest": ("size_bytes", "latency_p50_ms"),
    "fastest": ("latency_p50_ms", "size_bytes"),
}


# ---------------------------------------------------------------------------- the gate
def _number(metrics: Mapping[str, Any], key: str) -> float | None:
    value = metrics.get(key)
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def gate_problems(metrics: Mapping[str, Any], baseline_accuracy: float, gate: GateParams) -> list[str]:
    """Why a model fails the gate (empty when it passes)."""
    problems = []
    accuracy = _number(metrics, "accuracy")
    if accuracy is None:
        problems.append("accuracy not measured")
    else:
        drop = baseline_accuracy - accuracy
        if drop > gate.max_accuracy_drop + _EPS:
            problems.append(f"accuracy drop {drop:.4f} > max_accuracy_drop {gate.max_accuracy_drop:.4f}")
    if gate.max_latency_p95_ms is not None:
        p95 = _number(metrics, "latency_p95_ms")
        if p95 is None:
            problems.append("latency_p95_ms not measured")
        elif p95 > gate.max_latency_p95_ms:
            problems.append(f"latency p95 {p95:.3f} ms > max_latency_p95_ms {gate.max_latency_p95_ms:g}")
    if gate.max_size_bytes is not None:
        size = _number(metrics, "size_bytes")
        if size is None:
            problems.append("size_bytes not measured")
        elif size > gate.max_size_bytes:
            problems.append(f"size {size:.0f} B > max_size_bytes {gate.max_size_bytes}")
    return problems


def select_champion(
    metrics: Mapping[str, Mapping[str, Any]],
    gate: GateParams,
    objective: str,
    baseline: str = "baseline",
) -> tuple[str | None, dict[str, str]]:
    """Pick the champion among every model that passes the gate; None when none does.

    ``metrics`` maps a model name to its metrics (``accuracy``, ``size_bytes``,
    ``latency_p50_ms``, ``latency_p95_ms``); the accuracy drop is measured against
    ``metrics[baseline]``. Among the models that pass, ``objective`` ``smallest`` takes
    the least ``size_bytes``, ``fastest`` the least ``latency_p50_ms``; ties go to the
    higher accuracy, then the other measure, then the name. Returns the champion's name
    (or None) and a one-line reason for every model.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; expected one of {sorted(OBJECTIVES)}")
    if baseline not in metrics:
        raise ValueError(f"no metrics for the baseline {baseline!r}: the accuracy drop has no reference")
    baseline_accuracy = _number(metrics[baseline], "accuracy")
    if baseline_accuracy is None:
        raise ValueError(f"the baseline {baseline!r} has no accuracy")
    primary, secondary = OBJECTIVES[objective]

    reasons: dict[str, str] = {}
    passing: list[tuple[float, float, float, str]] = []
    for name, values in metrics.items():
        problems = gate_problems(values, baseline_accuracy, gate)
        measure = _number(values, primary)
        if measure is None and not problems:
            problems.append(f"{primary} not measured (objective {objective})")
        if problems:
            reasons[name] = "fails the gate: " + "; ".join(problems)
            continue
        other = _number(values, secondary)
        passing.append((measure, -float(values["accuracy"]), math.inf if other is None else other, name))

    if not passing:
        return None, {name: reasons[name] for name in metrics}
    passing.sort()
    winner = passing[0][3]
    label = {"smallest": "smallest", "fastest": "fastest"}[objective]
    for measure, _, _, name in passing:
        shown = f"{measure:.0f} B" if primary == "size_bytes" else f"{measure:.3f} ms p50"
        if name == winner:
            reasons[name] = f"champion: passes the gate and is the {label} of {len(passing)} passing ({shown})"
        else:
            reasons[name] = f"passes the gate; not the {label} ({shown})"
    return winner, {name: reasons[name] for name in metrics}


# ---------------------------------------------------------------------------- the pyfunc model
def _as_array(model_input: Any) -> np.ndarray:
    """Whatever pyfunc hands over (array, list, DataFrame, {"inputs": ...}) as float32 rows."""
    if isinstance(model_input, Mapping):
        model_input = model_input.get("inputs", model_input.get("instances"))
    if hasattr(model_input, "to_numpy"):  # pandas DataFrame / Series
        values = model_input.to_numpy()
        if values.dtype == object:  # one column of per-row lists
            rows = values.reshape(len(values), -1)[:, 0]
            values = np.stack([np.asarray(row, dtype=np.float32).ravel() for row in rows])
        model_input = values
    x = np.asarray(model_input, dtype=np.float32)
    if x.ndim == 1:  # one sample, flat
        x = x[None, :]
    return x


class SlimflowClassifier(mlflow.pyfunc.PythonModel):
    """RAW inputs ``(N, *input_shape)`` or flat ``(N, prod(input_shape))`` -> class indices.

    Artifacts: ``model`` (a model folder with ``manifest.json``, any format
    :func:`tasks.compression.loading.load_model_dir` reads) and ``preprocess`` (``preprocess.json``).
    """

    # The input is raw and either flat or shaped, so there is no type-hint schema to
    # validate against; this also stops MLflow warning that predict() has no type hints.
    _skip_type_hint_validation = True

    def load_context(self, context: Any) -> None:
        from tasks.data import Preprocessing
        from tasks.compression.loading import load_model_dir

        self._preprocessing = Preprocessing.from_json(Path(context.artifacts["preprocess"]).read_text())
        self._model = load_model_dir(Path(context.artifacts["model"]))

    def predict(self, context, model_input, params=None):  # noqa: ANN001, ANN201 - see above
        """Class indices (int64) for raw inputs."""
        x = self._preprocessing.apply(_as_array(model_input))
        return np.asarray(self._model.predict(x)).argmax(axis=1).astype(np.int64)


def pip_requirements(manifest: Mapping[str, Any]) -> list[str]:
    """Explicit requirements (inferring them costs ~11 s and guesses)."""
    from importlib.metadata import version

    def pinned(package: str) -> str:
        return f"{package}=={version(package).split('+')[0]}"

    requirements = [pinned("mlflow"), pinned("torch"), pinned("numpy"), pinned("onnxruntime")]
    if "torchao" in json.dumps(manifest):
        requirements.append(pinned("torchao"))
    return requirements


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


# ---------------------------------------------------------------------------- promotion
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
) -> Promotion:
    """Register ``model_dir`` from the active run and point the ``champion`` alias at it.

    ``evidence`` (metrics, recipe, data digest, git commit...) becomes version tags. When the
    champion already is this very model file on this very data, no new version is made.
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
    info = log_pyfunc_model(model_dir, preprocess_json, registered_model)
    version = str(info.registered_model_version)
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
