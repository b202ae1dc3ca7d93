"""Every model format compression writes: saved by its Artifact, loaded back by
``tasks.compression.loading.load_model_dir``, predicting what the in-memory model predicted.

Fast and in-process: tiny untrained models on random inputs (the compress stage's own
tests run the formats on trained models and real data).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from models.factory import build_model
from models.spec import ModelSpec
from tasks.compression import formats, quantization
from tasks.compression.candidate import Candidate
from tasks.compression.formats import Artifact
from tasks.compression.loading import LOADERS, load_model_dir
from tasks.compression.onnx import export_onnx
from tasks.compression.weights import map_state_dict, parameters_and_nonzeros
from tasks.core.model_files import read_manifest, write_manifest

INPUT_SHAPE = (1, 8, 8)
CLASSES = 10
SPECS = {
    "cnn": ModelSpec(family="cnn", channels=(4, 8)),
    "mlp": ModelSpec(family="mlp", hidden_sizes=(16,)),
    "lstm": ModelSpec(family="lstm", rnn_hidden=8),
}


def _candidate(family: str, sparse: bool = False) -> Candidate:
    torch.manual_seed(0)
    module = build_model(SPECS[family], INPUT_SHAPE, CLASSES).eval()
    if sparse:  # zeros, as unstructured pruning leaves them
        with torch.no_grad():
            for parameter in module.parameters():
                parameter.mul_((torch.rand_like(parameter) > 0.7).float())
    return Candidate(module, SPECS[family], INPUT_SHAPE, CLASSES, sparse=sparse)


def _inputs(count: int = 24, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, *INPUT_SHAPE)).astype(np.float32)


def _observe(module: nn.Module) -> nn.Module:
    """QAT's fine-tuning stand-in: forward passes in train mode set the fake-quant observers."""
    module.train()
    with torch.no_grad():
        for _ in range(3):
            module(torch.from_numpy(_inputs(32, seed=2)))
    return module


# (format, runtime, how to make the artifact from a fresh candidate)
MAKERS: dict[str, tuple[str, str, Callable[[], Artifact]]] = {
    "state-dict": ("torch-state-dict", "pytorch", lambda: formats.state_dict_artifact(_candidate("cnn"))),
    "state-dict-gzip": ("torch-state-dict-gzip", "pytorch",
                        lambda: formats.state_dict_artifact(_candidate("cnn", sparse=True))),
    "fp16": ("torch-state-dict-fp16", "pytorch", lambda: formats.half_artifact(_candidate("cnn"))),
    "int8-dynamic-torch-lstm": ("torch-quantized", "pytorch", lambda: formats.torch_quantized_artifact(
        _candidate("lstm"), quantization.torch_dynamic_int8(_candidate("lstm").fresh_module()), "dynamic",
        quantization.quantized_engine())),
    "int8-static-torch": ("torch-quantized", "pytorch", lambda: formats.torch_quantized_artifact(
        _candidate("cnn"), quantization.torch_static_int8(_candidate("cnn").fresh_module(), _inputs(32, seed=2)),
        "static", quantization.quantized_engine())),
    "int8-qat-torch-mlp": ("torch-quantized", "pytorch", lambda: formats.torch_quantized_artifact(
        _candidate("mlp"), quantization.torch_qat_int8(_candidate("mlp").fresh_module(), _observe), "qat",
        quantization.quantized_engine())),
    "pt2": ("torch-export", "pytorch",
            lambda: formats.export_artifact(_candidate("cnn"), torch.from_numpy(_inputs(2)))),
    "onnx": ("onnx", "onnxruntime", lambda: formats.onnx_artifact(
        export_onnx(_candidate("mlp").module, torch.from_numpy(_inputs(2))), False, {})),
    "onnx-gzip-int8-static": ("onnx-gzip", "onnxruntime", lambda: formats.onnx_artifact(
        quantization.ort_static_int8(export_onnx(_candidate("cnn").module, torch.from_numpy(_inputs(2))),
                                     _inputs(32, seed=2)), True, {"quantization": {"scheme": "static"}})),
}


@pytest.mark.parametrize("name", list(MAKERS))
def test_each_format_saves_and_loads_back_predicting_the_same(name: str, tmp_path: Path) -> None:
    fmt, runtime, make = MAKERS[name]
    artifact = make()
    folder = tmp_path / name
    folder.mkdir()
    written = write_manifest(folder, {"name": name, **artifact.write(folder)})
    assert (written["format"], written["runtime"]) == (fmt, runtime)
    assert sorted(p.name for p in folder.iterdir()) == sorted(["manifest.json", written["file"]])
    assert written["size_bytes"] == (folder / written["file"]).stat().st_size
    assert written["file"].endswith(".gz") == fmt.endswith("gzip") or fmt == "torch-state-dict-fp16"

    loaded = load_model_dir(folder)
    assert loaded.name == name and loaded.runtime == runtime and loaded.manifest == read_manifest(folder)
    x = _inputs()
    expected, got = artifact.predict(x), loaded.predict(x)
    assert got.shape == (len(x), CLASSES) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    if runtime == "pytorch":
        assert loaded.module is not None


def test_gzip_storage_shows_the_zeros_on_disk(tmp_path: Path) -> None:
    sizes = {}
    for sparse in (False, True):
        folder = tmp_path / str(sparse)
        folder.mkdir()
        sizes[sparse] = write_manifest(folder, formats.state_dict_artifact(_candidate("cnn", sparse)).write(folder))["size_bytes"]
    assert sizes[True] < 0.7 * sizes[False]


def test_fp16_storage_is_evaluated_as_rounded_and_counts_its_weights(tmp_path: Path) -> None:
    candidate = _candidate("mlp")
    artifact = formats.half_artifact(candidate)
    assert artifact.measured is not None
    rounded = map_state_dict(candidate.module.state_dict(), lambda t: t.half().float())
    assert all(torch.equal(artifact.measured.state_dict()[k], v) for k, v in rounded.items())
    assert parameters_and_nonzeros(artifact.measured)[0] == sum(p.numel() for p in candidate.module.parameters())


def test_every_format_compression_writes_has_a_loader() -> None:
    assert {"torch-state-dict", "onnx", *formats.FORMATS} <= set(LOADERS)
    assert {fmt for fmt, _, _ in MAKERS.values()} == {"torch-state-dict", "onnx", *formats.FORMATS}


def test_an_unknown_format_is_refused_naming_the_manifest(tmp_path: Path) -> None:
    (tmp_path / "model.bin").write_bytes(b"x")
    write_manifest(tmp_path, {"file": "model.bin", "format": "tflite", "runtime": "tflite"})
    with pytest.raises(ValueError, match=r"manifest.json: unknown model format 'tflite'"):
        load_model_dir(tmp_path)


def test_onnx_exports_reuse_the_torchlib_table_and_export_the_same() -> None:
    """The exporter's table of torchlib functions is built once per process (0.9 s a call
    otherwise); an export made with the reused table is the same file, and runs."""
    from onnxscript._framework_apis import torch_2_5

    from tasks.compression.onnx import onnx_predictor, reuse_torchlib_table

    assert reuse_torchlib_table()
    example = torch.from_numpy(_inputs(2))
    first = export_onnx(_candidate("cnn").module, example)
    hits = torch_2_5.get_torchlib_ops.cache_info().hits
    again = export_onnx(_candidate("cnn").module, example)
    mlp = _candidate("mlp").module
    other = export_onnx(mlp, example)
    assert torch_2_5.get_torchlib_ops.cache_info().hits == hits + 2
    assert again == first
    x = _inputs(5)
    np.testing.assert_allclose(onnx_predictor(other)(x), mlp(torch.from_numpy(x)).detach().numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ["gru", "lstm-tokens"])
def test_a_recurrent_model_exports_onnx_recurrent_operators_with_a_dynamic_batch(
    family: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An LSTM/GRU model goes through the TorchScript exporter (the dynamo one spends 6-16 s
    per export tracing the layer's decomposition): an ONNX GRU/LSTM operator per layer, the outputs of
    the torch model at any batch size, dynamic int8 of it in ONNX Runtime (DynamicQuantizeLSTM
    for an LSTM). Where that exporter fails, the dynamo exporter makes the same model."""
    import onnx

    from tasks.compression import onnx as onnx_module
    from tasks.compression.onnx import onnx_predictor

    torch.manual_seed(0)
    if family == "gru":  # sensor sequences (N, T, F), a 2-layer GRU
        spec, shape = ModelSpec(family="gru", rnn_hidden=8, rnn_layers=2), (6, 3)
        x = np.random.default_rng(1).standard_normal((17, *shape)).astype(np.float32)
    else:  # token ids with padding at the end, read at each text's last token
        spec, shape = ModelSpec(family="lstm", rnn_hidden=8, vocab_size=40, embed_dim=8), (9,)
        x = np.random.default_rng(1).integers(2, 40, (17, 9)).astype(np.float32)
        for row, length in enumerate(np.arange(17) % 9 + 1):
            x[row, length:] = 0
    module = build_model(spec, shape, 3).eval()
    expected = module(torch.from_numpy(x)).detach().numpy()
    operator = "GRU" if family == "gru" else "LSTM"

    original, exporters_called = torch.onnx.export, []

    def recorded(*args, **kwargs):
        exporters_called.append("dynamo" if kwargs.get("dynamo", True) else "torchscript")
        return original(*args, **kwargs)

    def without_torchscript(*args, **kwargs):  # a torch whose TorchScript exporter is gone
        if kwargs.get("dynamo") is False:
            raise RuntimeError("the TorchScript exporter was removed")
        return recorded(*args, **kwargs)

    exported = {}
    monkeypatch.setattr(torch.onnx, "export", recorded)
    exported["torchscript"] = export_onnx(module, torch.from_numpy(x[:2]).clone())
    assert exporters_called == ["torchscript"]
    monkeypatch.setattr(torch.onnx, "export", without_torchscript)
    exported["dynamo"] = export_onnx(module, torch.from_numpy(x[:2]).clone())
    assert exporters_called == ["torchscript", "dynamo"]
    monkeypatch.undo()
    for exporter, model in exported.items():
        graph = onnx.load_from_string(model).graph
        assert [node.op_type for node in graph.node].count(operator) == spec.rnn_layers, exporter
        # the dynamo exporter writes its trace's metadata, dropped; the TorchScript one none
        assert not any(node.metadata_props for node in graph.node), exporter
        for batch in (1, 3, 17):
            np.testing.assert_allclose(onnx_predictor(model)(x[:batch]), expected[:batch], rtol=1e-4, atol=1e-5)
        int8 = quantization.ort_dynamic_int8(model)
        quantized = {node.op_type for node in onnx.load_from_string(int8).graph.node}
        assert ("DynamicQuantizeLSTM" in quantized) == (operator == "LSTM"), (exporter, quantized)
        assert np.abs(onnx_predictor(int8)(x) - expected).max() < 0.05, exporter
