"""Helpers of the split tests: the prepare stage on a CSV (its function and its entry), and a model that memorizes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tasks.core.config import PrepareParams
from tasks.prepare import PreparedData, prepare_data


def prepared_csv(root: Path, path: str, **changes: object) -> PreparedData:
    """``prepare_data`` of the CSV at ``path`` (under ``root``) with seed 42 and ``changes`` to the defaults."""
    return prepare_data(PrepareParams(source="csv", path=path, **changes), 42, root)


def nearest_neighbour_accuracy(train: tuple[np.ndarray, np.ndarray], x: np.ndarray, y: np.ndarray) -> float:
    """The accuracy on ``(x, y)`` of the 1-nearest-neighbour of ``train``: a model that memorizes its training rows."""
    x_train, y_train = train
    distances = ((x[:, None, :] - x_train[None, :, :]) ** 2).sum(axis=2)
    return float((y_train[distances.argmin(axis=1)] == y).mean())


def run_prepare_stage(root: Path, prepare_yaml: str, tracking_db: Path, monkeypatch: pytest.MonkeyPatch) -> int:
    """The prepare stage's entry (``python -m tasks.prepare``) in the project ``root`` with
    ``prepare: {prepare_yaml}`` and seed 42, logging to the MLflow store ``tracking_db``."""
    from tasks.prepare import main

    (root / "dvc.yaml").write_text("stages: {}\n")
    (root / "params.yaml").write_text(f"base: {{seed: 42}}\nprepare: {{{prepare_yaml}}}\n")
    monkeypatch.chdir(root)
    monkeypatch.delenv("SLIMFLOW_ROOT", raising=False)
    monkeypatch.delenv("SLIMFLOW_RUN_CONTEXT", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tracking_db}")
    return main([])
