"""The model between steps, and the training data the steps share."""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from models.factory import build_model
from models.spec import ModelSpec
from tasks.compression.weights import map_state_dict


@dataclass(frozen=True)
class Candidate:
    """An eager fp32 model between two steps of a recipe.

    ``spec`` always rebuilds ``module``'s architecture (structured pruning rewrites it), so
    any candidate can be saved as a state_dict, serve as a teacher, or be quantized.
    """

    module: nn.Module
    spec: ModelSpec
    input_shape: tuple[int, ...]
    num_classes: int
    sparse: bool = False  # holds unstructured zeros: stored compressed so its size shows them
    # The saved model this is an unchanged copy of ("baseline" or a variant) and its
    # torch-state-dict folder; None once a step has changed it.
    origin: str | None = None
    origin_folder: Path | None = None

    def fresh_module(self) -> nn.Module:
        """A private copy of the module for a step to change."""
        return copy.deepcopy(self.module).eval()

    def changed(self, module: nn.Module, **fields: object) -> Candidate:
        """The candidate a step made: no longer a copy of a saved model."""
        return replace(self, module=module.eval(), origin=None, origin_folder=None, **fields)

    @property
    def family(self) -> str:
        return self.spec.family


def rebuild(spec: ModelSpec, input_shape: tuple[int, ...], num_classes: int, state_dict: dict) -> nn.Module:
    """``build_model(spec)`` with ``state_dict`` loaded strictly (floats cast to fp32)."""
    model = build_model(spec, input_shape, num_classes)
    model.load_state_dict(map_state_dict(state_dict, torch.Tensor.float))
    return model.eval()


@dataclass(frozen=True)
class TrainingData:
    """The normalized splits compression uses: train to fine-tune and calibrate, val to report."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray

    def example(self, count: int = 2) -> torch.Tensor:
        """A small batch for tracing/export: >= 2 rows so the batch dim stays dynamic, a copy not a view."""
        return torch.from_numpy(self.x_train[:count]).clone()

    def calibration(self, samples: int, seed: int) -> np.ndarray:
        """A seeded random subset of the train split (never val/test) for int8 calibration."""
        rng = np.random.default_rng(seed)
        count = min(samples, len(self.x_train))
        return np.ascontiguousarray(self.x_train[np.sort(rng.choice(len(self.x_train), count, replace=False))])


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((np.asarray(logits).argmax(1) == labels).mean())
