"""Builders shared by the evaluation tests (stage, gate, promotion): a tiny prepared data set, a tiny
trained baseline and tiny variants (a narrower torch model and an ONNX export), written
the way the pipeline writes them. No tests live here."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.factory import build_model
from models.spec import ModelSpec
from tasks.core.config import EvaluateParams, GateParams, Params
from tasks.data import ROWS_FILE, Preprocessing, row_fingerprints
from tasks.core.model_files import count_nonzeros, save_state_dict_model, write_manifest

CLASS_NAMES = [str(i) for i in range(10)]
SPEC = ModelSpec(family="mlp", hidden_sizes=(32,), dropout=0.0)
# Fast measurement settings for tests (2-core machine).
FAST_EVALUATE = {"latency_repeats": 3, "warmup": 1, "throughput_batch": 32, "threads": 1}


def write_prepared(folder: Path, test_size: int = 150) -> Preprocessing:
    """digits as (N, 1, 8, 8) raw values, split train/val/test, with preprocess.json and card.json."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = digits.images.astype(np.float32)[:, None]
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(y))
    x, y = x[order], y[order]
    splits = {
        "test": slice(0, test_size), "val": slice(test_size, test_size + 150), "train": slice(test_size + 150, None)
    }
    folder.mkdir(parents=True, exist_ok=True)
    preprocessing = Preprocessing.fit(x[splits["train"]], 10, CLASS_NAMES)
    for split, index in splits.items():
        np.save(folder / f"{split}_x.npy", x[index])
        np.save(folder / f"{split}_y.npy", y[index])
        np.save(folder / ROWS_FILE.format(split=split), row_fingerprints(preprocessing, x[index]))
    (folder / "preprocess.json").write_text(preprocessing.to_json())
    (folder / "card.json").write_text(json.dumps({"digest": "test-digest-0001", "source": "digits", "seed": 0,
                                                  "fractions": {"train": 0.6, "val": 0.15, "test": 0.25}}))
    return preprocessing


def train_tiny(spec: ModelSpec, prepared: Path, steps: int = 60, seed: int = 0) -> torch.nn.Module:
    """Full-batch Adam for a few dozen steps: enough for digits, well under a second (0 steps: untrained)."""
    from tasks.data import load_preprocessing, load_split

    torch.manual_seed(seed)
    preprocessing = load_preprocessing(prepared)
    train = load_split(prepared, "train", preprocessing)
    model = build_model(spec, tuple(preprocessing.input_shape), preprocessing.num_classes)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    x, y = torch.from_numpy(train.x), torch.from_numpy(train.y)
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model.eval()


def save_baseline(
    model: torch.nn.Module, folder: Path, spec: ModelSpec = SPEC, input_shape: tuple[int, ...] = (1, 8, 8)
) -> dict[str, Any]:
    return save_state_dict_model(
        model, spec, input_shape, 10, folder, {"name": "baseline", "method": "baseline", "recipe": [], "parent": None}
    )


def save_narrow_variant(prepared: Path, folder: Path, name: str = "distilled-mlp-w0.5") -> dict[str, Any]:
    spec = ModelSpec(family="mlp", hidden_sizes=(32,), width=0.5, dropout=0.0)
    model = train_tiny(spec, prepared, seed=1)
    return save_state_dict_model(
        model, spec, (1, 8, 8), 10, folder,
        {"name": name, "method": "distill", "parent": "baseline",
         "recipe": [{"method": "distill", "student_family": "mlp", "student_width": 0.5}]},
    )


def save_onnx_variant(model: torch.nn.Module, folder: Path, name: str = "onnx-fp32") -> dict[str, Any]:
    """The baseline exported with the dynamo exporter (dynamic batch, weights inside the file)."""
    folder.mkdir(parents=True, exist_ok=True)
    example = torch.zeros(2, 1, 8, 8)
    torch.onnx.export(
        model, (example,), str(folder / "model.onnx"), dynamo=True, external_data=False,
        dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=4096)}}, verbose=False,
    )
    return write_manifest(folder, {
        "name": name, "method": "export", "parent": "baseline",
        "recipe": [{"method": "export", "runtime": "onnxruntime"}],
        "file": "model.onnx", "format": "onnx", "runtime": "onnxruntime",
        "parameters": sum(p.numel() for p in model.parameters()), "nonzeros": count_nonzeros(model),
        "input_shape": [1, 8, 8], "num_classes": 10,
    })


def build_project(root: Path, onnx: bool = True, params: dict[str, Any] | None = None) -> Path:
    """``root`` laid out like the pipeline leaves it before ``evaluate``; returns root."""
    prepared = root / "data" / "prepared"
    write_prepared(prepared)
    baseline = train_tiny(SPEC, prepared)
    save_baseline(baseline, root / "artifacts" / "model")
    save_narrow_variant(prepared, root / "artifacts" / "compressed" / "distilled-mlp-w0.5")
    if onnx:
        save_onnx_variant(baseline, root / "artifacts" / "compressed" / "onnx-fp32")
    (root / "plots").mkdir(parents=True, exist_ok=True)
    history = [
        {"epoch": e, "train_loss": 2.0 / e, "val_loss": 2.1 / e,
         "train_accuracy": 1 - 0.5 / e, "val_accuracy": 1 - 0.55 / e}
        for e in range(1, 6)
    ]
    (root / "plots" / "train_history.json").write_text(json.dumps(history))
    (root / "dvc.yaml").write_text((Path(__file__).resolve().parents[1] / "dvc.yaml").read_text())
    return root


def make_params(registered_model: str = "tiny-classifier", **evaluate: Any) -> Params:
    settings = {**FAST_EVALUATE, "registered_model": registered_model, **evaluate}
    return Params(base={"seed": 0, "experiment": "tests"}, evaluate=EvaluateParams(**settings))


def gate(**limits: Any) -> GateParams:
    return GateParams(**limits)

