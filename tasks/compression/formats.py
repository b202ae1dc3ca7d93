"""The files compressed variants ship as: for each format, its writer and its loader.

Every variant is written by an :class:`Artifact` (the in-memory compressed model that
was evaluated, which also writes itself) and read back by :func:`load_variant`, which
``tasks.compression.loading.LOADERS`` calls for these formats. Sizes are honest: the file written is
the file a user ships, one self-contained file per variant.

| format | file | runtime | what |
|---|---|---|---|
| torch-state-dict | model.pt | pytorch | spec + fp32 state_dict (the baseline's format) |
| torch-state-dict-gzip | model.pt.gz | pytorch | the same, gzip-compressed: unstructured zeros shrink the file |
| torch-state-dict-fp16 | model.fp16.pt[.gz] | pytorch | fp16 weights for storage, ``.float()`` at load |
| torch-quantized | model.int8.pt[.gz] | pytorch | spec + torch.ao int8 state_dict, rebuilt at load |
| torch-export | model.pt2 | pytorch | a ``torch.export`` program (no model code needed) |
| onnx / onnx-gzip | model.onnx[.gz] | onnxruntime | one ONNX file, weights inside (external_data=False) |
"""

from __future__ import annotations

import gzip
import io
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from models.factory import build_model
from models.spec import ModelSpec
from tasks.compression import quantization
from tasks.compression.candidate import Candidate, rebuild
from tasks.compression.onnx import onnx_predictor, quiet
from tasks.compression.weights import map_state_dict
from tasks.core.model_files import LoadedModel, torch_predictor

# Formats this module writes besides the baseline's "torch-state-dict" and plain "onnx".
FORMATS = ("torch-state-dict-gzip", "torch-state-dict-fp16", "torch-quantized", "torch-export", "onnx-gzip")
GZIP = ".gz"


def write_file(path: Path, data: bytes, compress: bool) -> Path:
    """Write ``data`` to ``path`` (``path.gz`` when compressed; deterministic: no timestamp)."""
    if compress:
        path = path.with_name(path.name + GZIP)
        data = gzip.compress(data, compresslevel=9, mtime=0)
    path.write_bytes(data)
    return path


def read_file(path: Path) -> bytes:
    data = path.read_bytes()
    return gzip.decompress(data) if path.name.endswith(GZIP) else data


def torch_bytes(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _payload(spec: ModelSpec, input_shape: tuple[int, ...], num_classes: int, state_dict: dict, **extra: Any) -> dict:
    return {
        "spec": spec.to_dict(), "input_shape": list(input_shape), "num_classes": num_classes,
        "state_dict": state_dict, **extra,
    }


@dataclass
class Artifact:
    """A compressed model in the form it ships in: it predicts, and writes itself to a folder."""

    format: str
    runtime: str  # "pytorch" | "onnxruntime"
    predict_fn: Callable[[np.ndarray], np.ndarray]
    write_fn: Callable[[Path], Path]  # writes the model file into the folder, returns its path
    extra: dict[str, Any] = field(default_factory=dict)  # format details for the manifest
    # The fp32 module whose weights the file holds, to count parameters and zeros on
    # (None: the candidate's module; fp16 storage: the rounded weights).
    measured: nn.Module | None = None

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Logits for normalized float32 inputs, like :meth:`LoadedModel.predict`."""
        return self.predict_fn(np.ascontiguousarray(x, dtype=np.float32))

    def write(self, folder: Path) -> dict[str, Any]:
        """Write the model file; return the manifest fields that describe it."""
        path = self.write_fn(folder)
        return {"file": path.name, "format": self.format, "runtime": self.runtime, **self.extra}


def state_dict_artifact(candidate: Candidate) -> Artifact:
    """The eager fp32 model as spec + state_dict; gzip-compressed when it holds unstructured zeros."""
    payload = _payload(candidate.spec, candidate.input_shape, candidate.num_classes, candidate.module.state_dict())
    return Artifact(
        format="torch-state-dict-gzip" if candidate.sparse else "torch-state-dict",
        runtime="pytorch",
        predict_fn=torch_predictor(candidate.module),
        write_fn=lambda folder: write_file(folder / "model.pt", torch_bytes(payload), candidate.sparse),
        extra={"storage": {"dtype": "float32", "compression": "gzip" if candidate.sparse else None}},
    )


def half_artifact(candidate: Candidate) -> Artifact:
    """fp16 weights for storage only (computing in half is slow on CPUs without fp16 units)."""
    state_dict = map_state_dict(candidate.module.state_dict(), torch.Tensor.half)
    payload = _payload(candidate.spec, candidate.input_shape, candidate.num_classes, state_dict)
    # Evaluate exactly what a user loads: the fp16-rounded weights, computed in fp32.
    module = rebuild(candidate.spec, candidate.input_shape, candidate.num_classes, state_dict)
    return Artifact(
        format="torch-state-dict-fp16",
        runtime="pytorch",
        predict_fn=torch_predictor(module),
        write_fn=lambda folder: write_file(folder / "model.fp16.pt", torch_bytes(payload), candidate.sparse),
        extra={"storage": {"dtype": "float16", "compression": "gzip" if candidate.sparse else None}},
        measured=module,
    )


def torch_quantized_artifact(candidate: Candidate, quantized: nn.Module, scheme: str, engine: str) -> Artifact:
    """A torch.ao int8 model, saved as its state_dict and rebuilt from the spec at load time.

    (torch.ao's quantized modules cannot be ``torch.export``-ed, and pickling whole modules
    ties the file to the code's import paths.)
    """
    payload = _payload(
        candidate.spec, candidate.input_shape, candidate.num_classes, quantized.state_dict(),
        scheme=scheme, engine=engine,
    )
    return Artifact(
        format="torch-quantized",
        runtime="pytorch",
        predict_fn=torch_predictor(quantized),
        write_fn=lambda folder: write_file(folder / "model.int8.pt", torch_bytes(payload), candidate.sparse),
        extra={"quantization": {"scheme": scheme, "engine": engine, "library": "torch.ao.quantization"},
               "storage": {"dtype": "int8", "compression": "gzip" if candidate.sparse else None}},
    )


def onnx_artifact(model: bytes, compress: bool, details: dict[str, Any]) -> Artifact:
    return Artifact(
        format="onnx-gzip" if compress else "onnx",
        runtime="onnxruntime",
        predict_fn=onnx_predictor(model),
        write_fn=lambda folder: write_file(folder / "model.onnx", model, compress),
        extra={**details, "storage": {"compression": "gzip" if compress else None}},
    )


def export_artifact(candidate: Candidate, example: torch.Tensor) -> Artifact:
    """A ``torch.export`` program (.pt2): graph and weights, loadable without the model code."""
    with quiet():
        program = torch.export.export(
            candidate.module.eval(), (example.clone(),), dynamic_shapes=({0: torch.export.Dim("batch")},)
        )

    def write(folder: Path) -> Path:
        path = folder / "model.pt2"
        torch.export.save(program, path)
        return path

    return Artifact(
        format="torch-export",
        runtime="pytorch",
        predict_fn=program_predictor(program.module()),
        write_fn=write,
        extra={"storage": {"dtype": "float32", "compression": None}},
    )


def program_predictor(module: nn.Module) -> Callable[[np.ndarray], np.ndarray]:
    """Like ``torch_predictor`` for an exported program's module (exported in eval mode; it refuses ``.eval()``)."""

    def predict(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return module(torch.from_numpy(x)).float().numpy()

    return predict


# -- loaders -------------------------------------------------------------------------------


def _torch_payload(path: Path) -> dict[str, Any]:
    # weights_only: no arbitrary code runs at load. torch.ao keeps packed int8 LSTM/GRU
    # weights in ScriptObjects (torch's own C++ classes), which are allowed for that.
    with warnings.catch_warnings(), torch.serialization.safe_globals([torch.ScriptObject]):
        # Quantized tensors are rebuilt through TypedStorage, which warns that it is deprecated.
        warnings.simplefilter("ignore", UserWarning)
        return torch.load(io.BytesIO(read_file(path)), map_location="cpu", weights_only=True)


def load_variant(folder: Path, manifest: dict[str, Any], threads: int = 1) -> LoadedModel:
    """Load a variant written in one of :data:`FORMATS` (:func:`tasks.compression.loading.load_model_dir` calls this)."""
    fmt, path = manifest["format"], folder / manifest["file"]
    if fmt in {"torch-state-dict-gzip", "torch-state-dict-fp16"}:
        payload = _torch_payload(path)
        module = rebuild(ModelSpec.from_dict(payload["spec"]), tuple(payload["input_shape"]),
                         payload["num_classes"], payload["state_dict"])
        return LoadedModel(folder.name, manifest, torch_predictor(module), module)
    if fmt == "torch-quantized":
        payload = _torch_payload(path)
        skeleton = build_model(ModelSpec.from_dict(payload["spec"]), tuple(payload["input_shape"]), payload["num_classes"])
        module = quantization.quantized_skeleton(skeleton.eval(), payload["scheme"])
        module.load_state_dict(payload["state_dict"])
        return LoadedModel(folder.name, manifest, torch_predictor(module.eval()), module)
    if fmt == "torch-export":
        module = torch.export.load(path).module()
        return LoadedModel(folder.name, manifest, program_predictor(module), module)
    if fmt in {"onnx", "onnx-gzip"}:
        return LoadedModel(folder.name, manifest, onnx_predictor(read_file(path), threads))
    raise ValueError(f"{folder}: format {fmt!r} is not a compression format")
