"""The registered model's contract: what it takes and what it returns.

Every registered version carries an MLflow signature and an input example built here, so
the MLflow UI shows its schema and ``mlflow models serve`` refuses a request that does not
fit it (HTTP 400 naming the expected shape or columns):

- image and sequence data: one tensor named :data:`SHAPED_INPUT` (``raw_shaped_input``),
  float32, shape ``(-1, *shape_taken)``: RAW values (the pyfunc normalizes them itself),
  SHAPED (not flattened) as the data holds one sample: ``(C, H, W)``, or an npz's 3-D array's
  ``(H, W)`` / ``(T, F)`` (prepared with a channel added, which the pyfunc adds too);
- tabular data (``input_shape == (features,)``): one column per feature, raw values,
  named as the data names them (a CSV's header: ``feature_names`` in ``preprocess.json``),
  else ``x0 .. x{F-1}``; ``long`` where the data wrote every value as an integer
  (``integer_features``: what pandas reads from the same file as int64, which MLflow would
  refuse for a ``double`` column), else ``double``;
- text (token ids prepared by a tokenizer): one ``string`` column :data:`TEXT_COLUMN`
  (``text``), raw text: the pyfunc tokenizes it with the tokenizer trained in ``prepare``.

The output is one int64 class index per row; with the parameter :data:`OUTPUT_PARAM` =
``"name"`` (``params={"output": "name"}``, or ``"params"`` in a served request's JSON), the
class name each index stands for (``preprocess.json``'s ``class_names``).
:func:`input_schema` is the same contract as
a small JSON-able dict (a version tag, compared before a challenger may take
``@champion``: a model for another input never replaces a champion).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from tasks.data import Preprocessing, column_names, column_types, decode_table

TOKENIZER_FILE = "tokenizer.json"  # beside preprocess.json in the prepared data (text)
SHAPED_INPUT = "raw_shaped_input"  # the tensor's name says what it takes: raw values, shaped
TEXT_COLUMN = "text"  # text models take raw text in this column
EXAMPLE_ROWS = 2
OUTPUT_PARAM = "output"  # predict(..., params={"output": ...}): one of OUTPUTS, the first by default
OUTPUTS = ("index", "name")
NAMES_SHOWN = 8  # named columns listed in a message, then the count


def is_tabular(preprocessing: Preprocessing) -> bool:
    return len(preprocessing.input_shape) == 1 and not preprocessing.is_text


def input_schema(preprocessing: Preprocessing) -> dict[str, Any]:
    """The input contract as plain data: ``{"type": "tensor", "dtype", "shape"}`` or ``{"type": "columns", ...}``
    (``names``: the columns' names where the data names them; ``long`` and ``string``: the
    columns of those types, if any; the others are ``dtype``, double)."""
    shape = [int(d) for d in preprocessing.input_shape]
    if preprocessing.is_text:
        return {"type": "text", "dtype": "string", "columns": [TEXT_COLUMN],
                "layout": f"raw text, tokenized inside to {shape[0]} token ids"}
    if len(shape) == 1:
        names = column_names(preprocessing)
        schema = {"type": "columns", "dtype": "double", "columns": len(names), "layout": "raw, one column per feature"}
        if preprocessing.raw_columns:  # absent: x0 .. x{F-1}, as every contract before names
            schema["names"] = names
        types = column_types(preprocessing)
        for kind in ("long", "string"):  # absent: every column double, as before
            if of_kind := [name for name in names if types[name] == kind]:
                schema[kind] = of_kind
        return schema
    layout = "raw, shaped, channels last (H, W, C)" if preprocessing.channels_last else "raw, shaped"
    return {"type": "tensor", "dtype": "float32", "shape": [-1, *preprocessing.shape_taken], "layout": layout}


def same_input(a: dict[str, Any] | None, b: dict[str, Any] | None) -> bool:
    """Whether two contracts accept the same requests (the ``layout`` prose aside)."""
    if a is None or b is None:
        return False

    def key(schema: dict[str, Any]) -> tuple[Any, ...]:
        # Named columns are taken by name (MLflow orders a request's columns as the signature
        # does): the same names in another order are the same input.
        return (schema.get("type"), schema.get("dtype"), tuple(schema.get("shape") or ()), schema.get("columns"),
                tuple(sorted(schema.get("names") or ())), tuple(sorted(schema.get("long") or ())),
                tuple(sorted(schema.get("string") or ())))

    return key(a) == key(b)


def column_difference(a: dict[str, Any] | None, b: dict[str, Any] | None, a_name: str, b_name: str) -> str | None:
    """How two column contracts of the same width differ, for messages (None: the same
    columns, in any order, or not both columns): ``columns only the champion takes: 'ash';
    only pruned-l1 takes: 'magnesium'``, or ``column 'age' is long for the champion, double
    for pruned-l1``."""
    if not a or not b or a.get("type") != "columns" or b.get("type") != "columns":
        return None
    if a.get("columns") != b.get("columns"):
        return None

    def names(schema: dict[str, Any]) -> list[str]:
        return list(schema.get("names") or (f"x{i}" for i in range(int(schema["columns"]))))

    ours, theirs = names(a), names(b)
    if sorted(ours) == sorted(theirs):
        retyped = [n for n in ours if _type_of(a, n) != _type_of(b, n)]
        if not retyped:
            return None
        return "; ".join(f"column {n!r} is {_type_of(a, n)} for {a_name}, {_type_of(b, n)} for {b_name}"
                         for n in retyped[:3])
    only_a = ", ".join(repr(n) for n in ours if n not in theirs)
    only_b = ", ".join(repr(n) for n in theirs if n not in ours)
    return f"columns only {a_name} takes: {_clipped(only_a)}; only {b_name} takes: {_clipped(only_b)}"


def _type_of(schema: dict[str, Any], name: str) -> str:
    return next((kind for kind in ("long", "string") if name in (schema.get(kind) or ())), "double")


def _clipped(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def describe(schema: dict[str, Any] | None) -> str:
    """``tensor float32 (-1, 1, 8, 8)`` (``..., channels last`` where the model moves them) /
    ``30 double columns x0..x29`` / ``3 double columns age, income, visits`` (named columns:
    the first :data:`NAMES_SHOWN`), for messages."""
    if not schema:
        return "an unknown input"
    if schema.get("type") == "text":
        return f"raw text (one string column {schema['columns'][0]!r})"
    if schema.get("type") == "columns":
        n, longs, strings = int(schema["columns"]), len(schema.get("long") or ()), len(schema.get("string") or ())
        counts = [f"{count} {kind}" for count, kind in ((n - longs - strings, "double"), (longs, "long"),
                                                        (strings, "string")) if count]
        kinds = f"{schema['dtype']} columns" if not (longs or strings) else f"columns ({', '.join(counts)})"
        if names := schema.get("names"):
            more = f", ... ({n - NAMES_SHOWN} more)" if n > NAMES_SHOWN else ""
            return f"{n} {kinds} {', '.join(names[:NAMES_SHOWN])}{more}"
        return f"{n} {kinds} x0..x{n - 1}"
    last = ", channels last" if "channels last" in str(schema.get("layout", "")) else ""
    return f"tensor {schema['dtype']} {tuple(schema['shape'])}{last}"


def model_signature(preprocessing: Preprocessing) -> Any:
    """The MLflow ``ModelSignature`` of the pyfunc (see the module docstring)."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

    if preprocessing.is_text:
        inputs = Schema([ColSpec("string", TEXT_COLUMN)])
    elif is_tabular(preprocessing):
        inputs = Schema([ColSpec(kind, name) for name, kind in column_types(preprocessing).items()])
    else:
        inputs = Schema([TensorSpec(np.dtype(np.float32), (-1, *preprocessing.shape_taken), name=SHAPED_INPUT)])
    return ModelSignature(inputs=inputs, outputs=Schema([TensorSpec(np.dtype(np.int64), (-1,))]),
                          params=ParamSchema([ParamSpec(OUTPUT_PARAM, "string", OUTPUTS[0])]))


def input_example(prepared: Path, preprocessing: Preprocessing) -> Any:
    """Two raw test rows in exactly the form the signature takes (text: the test rows'
    token ids decoded back to words, the words the tokenizer knows)."""
    x = np.load(prepared / "test_x.npy", mmap_mode="r")[:EXAMPLE_ROWS]
    if preprocessing.is_text:
        import pandas as pd

        from tasks.sources.text import load_tokenizer

        tokenizer = load_tokenizer(prepared / TOKENIZER_FILE)
        texts = tokenizer.decode_batch([[int(i) for i in row] for row in x])
        return pd.DataFrame({TEXT_COLUMN: texts})
    x = np.ascontiguousarray(x, dtype=np.float32)
    if is_tabular(preprocessing):
        return decode_table(preprocessing, x)
    return preprocessing.to_raw(x)

