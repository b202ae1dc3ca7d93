"""Model folders: the manifest, the baseline's state-dict file, and the loaded-model handle.

A model lives in a folder with ``manifest.json`` (how it was made, its file, format and
runtime, parameters, non-zeros, size on disk) beside the model file.
:func:`tasks.compression.loading.load_model_dir` reads any such folder into a
:class:`LoadedModel` whose ``predict`` takes normalized float32 inputs ``(N, *input_shape)``
and returns logits, whatever the format.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from models.factory import build_model
from models.spec import ModelSpec

MANIFEST = "manifest.json"


def file_digest(path: Path) -> str:
    digest = hashlib.md5()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def count_nonzeros(model: nn.Module) -> int:
    """Non-zero parameters: buffers (BatchNorm running statistics...) are not parameters, so
    this never exceeds the parameter count."""
    return int(sum(int(torch.count_nonzero(p.detach())) for p in model.parameters()))


def write_manifest(folder: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Complete ``manifest`` with the model file's size and digest and write it."""
    model_file = folder / manifest["file"]
    manifest = {**manifest, "size_bytes": model_file.stat().st_size, "digest": file_digest(model_file)}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def read_manifest(folder: Path) -> dict[str, Any]:
    return json.loads((folder / MANIFEST).read_text())


def save_state_dict_model(
    model: nn.Module,
    spec: ModelSpec,
    input_shape: tuple[int, ...],
    num_classes: int,
    folder: Path,
    manifest: dict[str, Any],
    format_name: str = "torch-state-dict",
) -> dict[str, Any]:
    """Save an eager model as its architecture plus state_dict (``model.pt``).

    ``format_name`` names what the state_dict fits: ``torch-state-dict`` is ``build_model(spec)``
    itself (:func:`load_eager_model`); ``torch-qat-state-dict`` the model prepared for
    quantization-aware training (``tasks.compression.quantization`` loads it and converts).
    """
    folder.mkdir(parents=True, exist_ok=True)
    payload = {
        "spec": spec.to_dict(),
        "input_shape": list(input_shape),
        "num_classes": num_classes,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    torch.save(payload, folder / "model.pt")
    return write_manifest(
        folder,
        {
            **manifest,
            "file": "model.pt",
            "format": format_name,
            "runtime": "pytorch",
            "parameters": sum(p.numel() for p in model.parameters()),
            "nonzeros": count_nonzeros(model),
            "model_spec": spec.to_dict(),
            "input_shape": list(input_shape),
            "num_classes": num_classes,
        },
    )


def load_eager_model(folder: Path) -> nn.Module:
    """The baseline (or any ``torch-state-dict`` model) as an eval-mode ``nn.Module``."""
    payload = torch.load(folder / "model.pt", map_location="cpu", weights_only=True)
    model = build_model(ModelSpec.from_dict(payload["spec"]), payload["input_shape"], payload["num_classes"])
    model.load_state_dict(payload["state_dict"])
    return model.eval()


@dataclass
class LoadedModel:
    """A model ready for inference in the runtime it ships in."""

    name: str
    manifest: dict[str, Any]
    predict_fn: Callable[[np.ndarray], np.ndarray]
    module: nn.Module | None = None  # the eager module, when there is one

    @property
    def runtime(self) -> str:
        return str(self.manifest["runtime"])

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Logits for normalized float32 inputs."""
        return self.predict_fn(np.ascontiguousarray(x, dtype=np.float32))


def torch_predictor(module: nn.Module) -> Callable[[np.ndarray], np.ndarray]:
    module.eval()

    def predict(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return module(torch.from_numpy(x)).float().numpy()

    return predict
