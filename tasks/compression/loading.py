"""Loading any model folder the pipeline writes, baseline and variants alike.

``load_model_dir`` reads the folder's manifest and returns a
:class:`~tasks.core.model_files.LoadedModel` whose ``predict`` takes normalized float32
inputs ``(N, *input_shape)`` and returns logits, in the runtime the model ships in.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from tasks.compression.formats import FORMATS, load_variant
from tasks.compression.onnx import onnx_predictor
from tasks.core.model_files import MANIFEST, LoadedModel, load_eager_model, read_manifest, torch_predictor


def _load_state_dict_format(folder: Path, manifest: dict[str, Any], threads: int) -> LoadedModel:
    module = load_eager_model(folder)
    return LoadedModel(folder.name, manifest, torch_predictor(module), module)


def _load_onnx_format(folder: Path, manifest: dict[str, Any], threads: int) -> LoadedModel:
    return LoadedModel(folder.name, manifest, onnx_predictor(folder / manifest["file"], threads))


# format name -> loader: the baseline's own format, plain ONNX, and every compression format.
LOADERS: dict[str, Callable[[Path, dict[str, Any], int], LoadedModel]] = {
    "torch-state-dict": _load_state_dict_format,
    "onnx": _load_onnx_format,
    **{name: load_variant for name in FORMATS},
}


def load_model_dir(folder: Path, threads: int = 1) -> LoadedModel:
    """Load ``folder``; ONNX Runtime sessions get ``threads`` intra-op threads."""
    manifest = read_manifest(folder)
    try:
        loader = LOADERS[manifest["format"]]
    except KeyError:
        raise ValueError(f"{folder / MANIFEST}: unknown model format {manifest.get('format')!r}") from None
    loaded = loader(folder, manifest, threads)
    loaded.name = manifest.get("name", folder.name)
    return loaded
