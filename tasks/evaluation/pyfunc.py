"""The model people load from the MLflow registry.

:class:`SlimflowClassifier` predicts class indices from RAW inputs (flat or shaped): it
applies the train-split normalization from ``preprocess.json`` and runs the model folder
through :func:`tasks.compression.loading.load_model_dir`, so
``mlflow.pyfunc.load_model("models:/<name>@champion")`` and ``mlflow models serve``
answer with exactly what the evaluate stage measured.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow
import numpy as np


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
        from tasks.compression.loading import load_model_dir
        from tasks.data import Preprocessing

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
