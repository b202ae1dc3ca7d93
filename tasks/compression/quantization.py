"""int8 quantization with the libraries made for it (the ONNX export it starts from: ``onnx.py``).

- ``onnxruntime`` runtime: ONNX Runtime's ``quantize_static`` (QOperator, per-channel,
  QUInt8 activations, QInt8 weights, calibrated on the train split) or ``quantize_dynamic``
  (after ``quant_pre_process``, without which an LSTM stays fp32). One self-contained file.
- ``torch`` runtime: ``torch.ao.quantization`` - ``quantize_dynamic`` (the only torch path
  that quantizes LSTM/GRU weights), eager-mode static post-training quantization, and
  quantization-aware training (``prepare_qat``: fine-tuning with fake quantization on the
  Horovod loop, then ``convert`` here). torch.ao warns that it is deprecated; on torch 2.13
  it works, and torchao's replacements either cover only linear layers or need
  torch.compile to be fast. The eager-mode wrapping and fusing that static int8 and QAT
  share lives with the training loop (:mod:`tasks.training.qat`), which trains QAT.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from models.factory import build_model
from models.spec import ModelSpec
from tasks.compression.onnx import ONNX_INPUT, quiet as _quiet
from tasks.compression.weights import prunable_weights
from tasks.core.model_files import read_manifest
from tasks.training.qat import eager_skeleton, prepare_qat_model, quantized_engine

log = logging.getLogger("slimflow.compress")

# Layers torch's dynamic quantization covers (weights int8, activations quantized per batch).
DYNAMIC_LAYERS = (nn.Linear, nn.LSTM, nn.GRU)
# ONNX Runtime static int8 settings (recorded in each variant's manifest as they are).
# reduce_range keeps weights to 7 bits: without VNNI (AVX2 only, as here) the u8 x s8
# kernels can saturate, which cost 1.8 accuracy points on digits; with it, 0.2.
ORT_STATIC = {
    "quant_format": "QOperator", "per_channel": True, "activation_type": "QUInt8", "weight_type": "QInt8",
    "reduce_range": True,
}
# reduce_range: 7-bit weights. ONNX Runtime's u8s8 kernels on x86 without VNNI (AVX2, AVX-512 before it)
# multiply through VPMADDUBSW, whose 16-bit sums saturate with full-range weights: a small
# token LSTM's dynamic int8 outputs were 0.108 off its fp32 ones on an AVX2-only host, 0.004
# with reduce_range (session 40). The file may be served on such a host, whatever built it.
ORT_DYNAMIC = {"weight_type": "QInt8", "reduce_range": True}


def _preprocessed(model: bytes, folder: Path) -> Path:
    """ONNX Runtime's recommended pre-processing (shape inference, graph optimization)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    source, target = folder / "fp32.onnx", folder / "pre.onnx"
    source.write_bytes(model)
    quant_pre_process(str(source), str(target))
    return target


# The ONNX operators whose weights static int8 quantizes: the layers a fallback can keep in fp32.
ORT_WEIGHTED_OPS = ("Conv", "Gemm", "MatMul")


def ort_weighted_nodes(model: bytes) -> list[str]:
    """The names of the weighted layers (:data:`ORT_WEIGHTED_OPS`) in ``model`` as
    :func:`ort_static_int8` sees it (after ONNX Runtime's pre-processing), in graph order:
    what ``nodes_to_exclude`` can name."""
    import onnx

    with tempfile.TemporaryDirectory(prefix="slimflow-ort-") as tmp, _quiet():
        graph = onnx.load(str(_preprocessed(model, Path(tmp)))).graph
    return [node.name for node in graph.node if node.op_type in ORT_WEIGHTED_OPS and node.name]


def ort_static_int8(
    model: bytes, calibration: np.ndarray, batch: int = 32, nodes_to_exclude: list[str] | None = None
) -> bytes:
    """Post-training static int8 (:data:`ORT_STATIC`), activation ranges calibrated on ``calibration``;
    the layers named in ``nodes_to_exclude`` stay fp32."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(calibration[i : i + batch] for i in range(0, len(calibration), batch))

        def get_next(self) -> dict[str, np.ndarray] | None:
            chunk = next(self.batches, None)
            return None if chunk is None else {ONNX_INPUT: chunk}

    with tempfile.TemporaryDirectory(prefix="slimflow-ort-") as tmp, _quiet():
        folder = Path(tmp)
        quantize_static(
            str(_preprocessed(model, folder)), str(folder / "int8.onnx"), Reader(),
            quant_format=QuantFormat[ORT_STATIC["quant_format"]], per_channel=ORT_STATIC["per_channel"],
            reduce_range=ORT_STATIC["reduce_range"], activation_type=QuantType[ORT_STATIC["activation_type"]],
            weight_type=QuantType[ORT_STATIC["weight_type"]], nodes_to_exclude=list(nodes_to_exclude or []),
        )
        return (folder / "int8.onnx").read_bytes()


def ort_dynamic_int8(model: bytes) -> bytes:
    """Dynamic int8 in ONNX Runtime: int8 weights, activations quantized per batch at run time."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory(prefix="slimflow-ort-") as tmp, _quiet():
        folder = Path(tmp)
        quantize_dynamic(str(_preprocessed(model, folder)), str(folder / "int8.onnx"),
                         weight_type=QuantType[ORT_DYNAMIC["weight_type"]], reduce_range=ORT_DYNAMIC["reduce_range"])
        return (folder / "int8.onnx").read_bytes()


# -- torch.ao ------------------------------------------------------------------------------


def torch_dynamic_int8(module: nn.Module) -> nn.Module:
    """``torch.ao.quantization.quantize_dynamic`` on linear and recurrent layers (conv stays fp32)."""
    from torch.ao.quantization import quantize_dynamic

    torch.backends.quantized.engine = quantized_engine()
    with _quiet():
        return quantize_dynamic(module.eval(), set(DYNAMIC_LAYERS), dtype=torch.qint8)


def torch_static_int8(module: nn.Module, calibration: np.ndarray, batch: int = 64) -> nn.Module:
    """Eager-mode post-training static int8 (fused conv/linear, per-channel weights, calibrated observers)."""
    from torch.ao import quantization as tq

    with _quiet():
        wrapped = tq.prepare(eager_skeleton(module.eval(), qat=False))
        with torch.inference_mode():
            for start in range(0, len(calibration), batch):
                wrapped(torch.from_numpy(calibration[start : start + batch]))
        return tq.convert(wrapped.eval())


def torch_qat_int8(module: nn.Module, train: Callable[[nn.Module], nn.Module]) -> nn.Module:
    """QAT in this process: prepare ``module``, let ``train`` train it with fake quantization,
    convert to int8. (The pipeline trains on the Horovod loop instead and converts its
    output with :func:`convert_qat`; this serves tests and interactive use.)"""
    from torch.ao import quantization as tq

    with _quiet():
        return tq.convert(train(prepare_qat_model(module, quantized_engine())).eval())


def convert_qat(folder: Path) -> nn.Module:
    """The int8 model of a quantization-aware training's output folder (``torch-qat-state-dict``):
    the QAT model rebuilt from its spec, its trained weights and observers loaded, converted.

    Conversion runs here, in the compress process, not on the Horovod workers: it is a
    one-off, deterministic transformation of the trained weights and observer ranges, which
    are the same on every rank (``tasks.training.qat.average_observers``); about 50 ms for
    the default CNN on 28x28 inputs, nothing to gain from distributing it.
    """
    from torch.ao import quantization as tq

    payload = torch.load(folder / "model.pt", map_location="cpu", weights_only=True)
    module = build_model(ModelSpec.from_dict(payload["spec"]), payload["input_shape"], payload["num_classes"])
    engine = read_manifest(folder).get("qat_engine") or quantized_engine()
    with _quiet():
        prepared = prepare_qat_model(module, engine)
        prepared.load_state_dict(payload["state_dict"])
        return tq.convert(prepared.eval())


def quantized_skeleton(module: nn.Module, scheme: str) -> nn.Module:
    """An int8 model of ``module``'s architecture with placeholder weights, to load a saved state_dict into."""
    from torch.ao import quantization as tq

    with _quiet():
        if scheme == "dynamic":
            return torch_dynamic_int8(module)
        if scheme in {"static", "qat"}:  # QAT converts to the same modules as static
            return tq.convert(tq.prepare(eager_skeleton(module.eval(), qat=False)))
    raise ValueError(f"unknown torch quantization scheme {scheme!r}")


def quantized_share(module: nn.Module) -> float:
    """The share of the prunable weights that quantize_dynamic turns into int8 (the rest stay fp32)."""
    sizes = [(owner, getattr(owner, name).numel()) for owner, name in prunable_weights(module)]
    total = sum(size for _, size in sizes)
    covered = sum(size for owner, size in sizes if isinstance(owner, DYNAMIC_LAYERS))
    return covered / total if total else 0.0
