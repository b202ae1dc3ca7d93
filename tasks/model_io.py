"""Saving and loading every model the pipeline makes, baseline and variants alike.

A model lives in a folder with ``manifest.json`` (how it was made, its file, format and
runtime, parameters, non-zeros, size on disk) beside the model file. ``load_model_dir``
reads the manifest and returns a :class:`LoadedModel` whose ``predict`` takes
normalized float32 inputs ``(N, *input_shape)`` and returns logits, whatever the format.
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

from models import ModelSpec, build_model

MANIFEST = "manifest.json"


def file_digest(path: Path) -> str:
    digest = hashlib.md5()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def count_nonzeros(model: nn.Module) -> int:
    return int(sum(int(torch.count_nonzero(p)) for p in model.state_dict().values() if p.is_floating_point()))


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
) -> dict[str, Any]:
    """Save an eager model as its architecture plus state_dict (``model.pt``)."""
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
            "format": "torch-state-dict",
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


def onnx_predictor(path: Path, threads: int = 1) -> Callable[[np.ndarray], np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name

    def predict(x: np.ndarray) -> np.ndarray:
        return session.run(None, {input_name: x})[0]

    return predict


def _load_state_dict_format(folder: Path, manifest: dict[str, Any]) -> LoadedModel:
    module = load_eager_model(folder)
    return LoadedModel(folder.name, manifest, torch_predictor(module), module)


def _load_onnx_format(folder: Path, manifest: dict[str, Any]) -> LoadedModel:
    return LoadedModel(folder.name, manifest, onnx_predictor(folder / manifest["file"]))


# format name -> loader; compression registers the formats it writes.
LOADERS: dict[str, Callable[[Path, dict[str, Any]], LoadedModel]] = {
    "torch-state-dict": _load_state_dict_format,
    "onnx": _load_onnx_format,
}


def _load_compressed_format(folder: Path, manifest: dict[str, Any]) -> LoadedModel:
    # The formats compressed variants ship as are written and read in one place.
    from tasks.compression.formats import load_variant

    return load_variant(folder, manifest)


for _format in ("torch-state-dict-gzip", "torch-state-dict-fp16", "torch-quantized", "torch-export", "onnx-gzip"):
    LOADERS[_format] = _load_compressed_format


def load_model_dir(folder: Path) -> LoadedModel:
    manifest = read_manifest(folder)
    try:
        loader = LOADERS[manifest["format"]]
    except KeyError:
        raise ValueError(f"{folder / MANIFEST}: unknown model format {manifest.get('format')!r}") from None
    loaded = loader(folder, manifest)
    loaded.name = manifest.get("name", folder.name)
    return loaded
