"""A small baseline trained in-process on a project's prepared train split (for tests that
compress it; the train stage's Horovod run is tested elsewhere)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from models.factory import build_model
from models.spec import ModelSpec
from tasks.core.model_files import save_state_dict_model
from tasks.core.paths import ProjectPaths
from tasks.data import load_preprocessing, load_split


def train_baseline(root: Path, spec_raw: dict[str, Any], epochs: int, lr: float) -> None:
    """``spec_raw`` trained (seed 0, AdamW, batches of 32, one thread) on ``root``'s prepared
    train split and saved where the train stage saves its model."""
    paths = ProjectPaths(root)
    preprocessing = load_preprocessing(paths.prepared)
    shape, classes = tuple(preprocessing.input_shape), preprocessing.num_classes
    train = load_split(paths.prepared, "train", preprocessing)
    spec = ModelSpec.from_dict(spec_raw)
    torch.manual_seed(0)
    model = build_model(spec, shape, classes)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    x, y = torch.from_numpy(train.x), torch.from_numpy(train.y)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only add overhead (and contention)
    try:
        for _ in range(epochs):
            model.train()
            for batch in torch.randperm(len(x)).split(32):
                loss = F.cross_entropy(model(x[batch]), y[batch])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
    finally:
        torch.set_num_threads(threads)
    save_state_dict_model(model.eval(), spec, shape, classes, paths.model,
                          {"name": "baseline", "method": "baseline", "recipe": [], "parent": None})
