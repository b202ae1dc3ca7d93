"""Columns of categories in rows of features: what the raw data gives (``tasks.sources``) and
what the prepared data and the registered model keep (``tasks.data``)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class CategoricalColumn:
    """A raw column of categories (a CSV's ``plan``: basic, gold...): one 0/1 model feature
    per value, named ``plan=gold``; a value not among them, or a gap, sets none."""

    name: str
    values: tuple[str, ...]  # sorted; integer codes in numeric order
    dtype: str = "string"  # what pandas reads the column as: string, long (integer codes), double (codes with gaps)

    def features(self) -> list[str]:
        return [f"{self.name}={value}" for value in self.values]

    def one_hot(self, cells: Iterable[Any]) -> np.ndarray:
        """``cells`` (values as a CSV or a DataFrame holds them) as this column's 0/1 features,
        float32 ``(N, len(values))``; a gap or a value not among :attr:`values` sets none."""
        index = {value: i for i, value in enumerate(self.values)}
        codes = np.array([index.get(category_text(cell), -1) for cell in cells], dtype=np.int64)
        return (codes[:, None] == np.arange(len(self.values))[None, :]).astype(np.float32)


def category_text(value: Any) -> str | None:
    """A cell of a categorical column as its category (None: a gap): ``2``, ``2.0`` and ``'2'``
    are the same code, as a CSV wrote it and as pandas may hold it."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, (bool, np.bool_)):
        return str(value)
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    text = str(value).strip()
    return text or None
