"""The model people load from the MLflow registry.

:class:`SlimflowClassifier` predicts class indices from RAW, SHAPED inputs ``(N,
*shape_taken)``, a sample as the data holds it (tabular: one column per feature): it applies the train-split
normalization from ``preprocess.json`` and runs the model folder through
:func:`tasks.compression.loading.load_model_dir`, so
``mlflow.pyfunc.load_model("models:/<name>@champion")`` and ``mlflow models serve``
answer with exactly what the evaluate stage measured. It is logged as MLflow "models from
code" (:mod:`tasks.evaluation.champion_model`), never pickled; the signature
(:mod:`tasks.evaluation.signature`) makes MLflow refuse ill-shaped input before
``predict``, and ``predict`` checks the shape again for callers without schema enforcement. A text model
(a ``tokenizer`` artifact) takes RAW TEXT, one string per row in the column ``text``, and
tokenizes it inside with the tokenizer trained in ``prepare``.
"""

from __future__ import annotations

import json
import logging
import platform
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow
import numpy as np

log = logging.getLogger("slimflow.model")


def _as_array(model_input: Any) -> np.ndarray:
    """Whatever pyfunc hands over (array, list, DataFrame, ``{name: array}``) as a float32 array."""
    if isinstance(model_input, Mapping):  # a named tensor: {"raw_shaped_input": array}
        if len(model_input) != 1:
            raise _invalid(f"expected one input tensor, got {sorted(model_input)}")
        model_input = next(iter(model_input.values()))
    if hasattr(model_input, "to_numpy"):  # pandas DataFrame / Series (tabular: the columns in order)
        model_input = model_input.to_numpy()
    try:
        return np.asarray(model_input, dtype=np.float32)
    except (TypeError, ValueError) as err:
        raise _invalid(f"input is not numeric: {err}") from None


def _encoded(model_input: Any, preprocessing: Any) -> np.ndarray:
    """A table with columns of categories (a DataFrame, or ``{column: values}``), taken by
    name, as the model's features."""
    import pandas as pd

    from tasks.data import encode_table

    if isinstance(model_input, Mapping):
        model_input = pd.DataFrame(dict(model_input))
    columns = list(model_input.columns) if hasattr(model_input, "columns") else []
    if missing := [name for name in preprocessing.raw_columns if name not in columns]:
        raise _invalid(f"expected a table of the columns {', '.join(preprocessing.raw_columns)} (some hold "
                       f"categories); missing: {', '.join(missing)}")
    try:
        features = encode_table(preprocessing, model_input)
    except (TypeError, ValueError) as err:
        raise _invalid(f"input is not numeric where the model takes numbers: {err}") from None
    _say_unseen_categories(model_input, preprocessing)
    return features


def _say_unseen_categories(table: Any, preprocessing: Any) -> None:
    """A warning (the serving process's log) for each column with categories the model was
    never trained on: it predicts them with none of the column's features set, and a new
    category in requests is a sign the data has moved on from the champion's."""
    from tasks.core.categories import category_text

    for column in preprocessing.categorical:
        known = set(column.values)
        texts = [category_text(cell) for cell in table[column.name].tolist()]
        unseen = [text for text in texts if text is not None and text not in known]
        if unseen:
            shown = sorted(set(unseen))
            log.warning("column %r: %d of %d rows hold a category the model was not trained on (%s%s): none of its "
                        "features set", column.name, len(unseen), len(texts), ", ".join(map(repr, shown[:5])),
                        f", ... {len(shown)} in all" if len(shown) > 5 else "")


def _as_texts(model_input: Any) -> list[str]:
    """Raw text in any form pyfunc hands over: a DataFrame / dict with a ``text`` column, a list, a string."""
    from tasks.evaluation.signature import TEXT_COLUMN

    if isinstance(model_input, str):
        model_input = [model_input]
    if isinstance(model_input, Mapping) or hasattr(model_input, "columns"):
        columns = list(model_input.keys()) if isinstance(model_input, Mapping) else list(model_input.columns)
        if columns != [TEXT_COLUMN]:
            raise _invalid(f"expected one column {TEXT_COLUMN!r} of raw text, got columns {columns}")
        model_input = model_input[TEXT_COLUMN]
    if hasattr(model_input, "tolist"):
        model_input = model_input.tolist()
    if isinstance(model_input, str):
        model_input = [model_input]
    texts = list(model_input)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise _invalid(f"row {i}: expected raw text (a string), got {type(text).__name__}")
    return texts


def _invalid(message: str) -> Exception:
    """An error ``mlflow models serve`` answers with HTTP 400 and this message."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


class SlimflowClassifier(mlflow.pyfunc.PythonModel):
    """RAW inputs ``(N, *shape_taken)`` -> class indices (int64), or their names (``params``).

    Artifacts: ``model`` (a model folder with ``manifest.json``, any format
    :func:`tasks.compression.loading.load_model_dir` reads) and ``preprocess`` (``preprocess.json``).
    """

    # The signature describes the input (a tensor or columns); predict() has no type hints
    # for MLflow to validate against, and this stops it warning that there are none.
    _skip_type_hint_validation = True

    def load_context(self, context: Any) -> None:
        from tasks.compression.loading import load_model_dir
        from tasks.core.telemetry import turn_off_telemetry
        from tasks.data import Preprocessing

        turn_off_telemetry()  # a served model reports nothing either (unless the server's environment says so)

        self._preprocessing = Preprocessing.from_json(Path(context.artifacts["preprocess"]).read_text())
        self._model = load_model_dir(Path(context.artifacts["model"]))
        self._tokenizer = None
        if "tokenizer" in context.artifacts:
            from tasks.sources.text import load_tokenizer

            self._tokenizer = load_tokenizer(Path(context.artifacts["tokenizer"]))

    def predict(self, context, model_input, params=None):  # noqa: ANN001, ANN201 - see above
        """Class indices (int64) for raw inputs of shape ``(N, *shape_taken)`` (text models: raw
        text); with ``params={"output": "name"}`` the class names they stand for."""
        from tasks.evaluation.signature import OUTPUT_PARAM, OUTPUTS

        output = (params or {}).get(OUTPUT_PARAM) or OUTPUTS[0]
        if output not in OUTPUTS:
            raise _invalid(f"params: {OUTPUT_PARAM} {output!r}: expected one of {', '.join(map(repr, OUTPUTS))}")
        indices = self._indices(model_input)
        if output == "name":
            return np.asarray(self._preprocessing.class_names, dtype=object)[indices]
        return indices

    def _indices(self, model_input: Any) -> np.ndarray:
        if self._tokenizer is not None:
            from tasks.sources.text import encode

            ids = encode(self._tokenizer, _as_texts(model_input))
            return np.asarray(self._model.predict(ids)).argmax(axis=1).astype(np.int64)
        if self._preprocessing.categorical:  # columns of categories: each becomes its 0/1 features
            x = _encoded(model_input, self._preprocessing)
        else:
            names = list(self._preprocessing.raw_columns)
            if names and hasattr(model_input, "columns") and set(names) <= set(model_input.columns):
                model_input = model_input[names]  # named columns: taken by name, in the model's order
            x = _as_array(model_input)
        expected = tuple(self._preprocessing.shape_taken)
        if x.shape == expected:  # one sample without its batch axis
            x = x[None]
        if x.shape[1:] != expected:
            raise _invalid(
                f"input of shape {tuple(x.shape)} does not match the expected shape (-1, "
                + ", ".join(str(d) for d in expected) + ") (raw values, float32, shaped as one sample of the data)"
            )
        if not self._preprocessing.fill_values and np.isnan(x).any():
            raise _invalid(_missing_message(x, self._preprocessing))
        x = self._preprocessing.from_raw(x)
        return np.asarray(self._model.predict(self._preprocessing.apply(x))).argmax(axis=1).astype(np.int64)


def _missing_message(x: np.ndarray, preprocessing: Any) -> str:
    """Where the first missing value (NaN) of a request is, for a model that fills none."""
    from tasks.data import column_names
    from tasks.evaluation.signature import is_tabular

    at = [int(i) for i in np.argwhere(np.isnan(x))[0]]
    features = list(preprocessing.feature_names) or column_names(preprocessing)  # a number column's feature is it
    where = f"row {at[0]}, column {features[at[1]]!r}" if is_tabular(preprocessing) else f"index {at}"
    return (f"{where}: a missing value (NaN); this model fills none (its data was prepared with "
            "prepare.missing_values refuse): send a value")


def pip_requirements(manifest: Mapping[str, Any]) -> list[str]:
    """Explicit requirements (inferring them costs ~11 s and guesses)."""
    from importlib.metadata import version

    def pinned(package: str) -> str:
        return f"{package}=={version(package).split('+')[0]}"

    requirements = [pinned("mlflow"), pinned("torch"), pinned("numpy"), pinned("onnxruntime"), pinned("tokenizers")]
    if "torchao" in json.dumps(manifest):
        requirements.append(pinned("torchao"))
    return requirements


def runtime_versions() -> dict[str, str]:
    """The runtime a model was measured in: recorded on each version; a change means re-measuring."""
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for package in ("mlflow", "torch", "onnxruntime", "numpy"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "absent"
    return found
