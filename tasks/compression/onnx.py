"""ONNX: the fp32 export every ONNX variant starts from, and the one ONNX Runtime session builder.

The compress stage (export, int8), the loaders and the evaluate stage's measurements all
open sessions through :func:`onnx_session`, so threads and providers are set in one place.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

log = logging.getLogger("slimflow.compress")

ONNX_INPUT = "input"
ONNX_OUTPUT = "logits"


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence the exporters' and torch.ao's deprecation chatter (it is known and harmless here)."""
    noisy = [logging.getLogger(name) for name in ("torch.onnx", "torch._dynamo", "torch.export", "onnxscript", "onnx_ir", "onnxruntime")]
    levels = [logger.level for logger in noisy]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for logger in noisy:
            logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for logger, level in zip(noisy, levels):
                logger.setLevel(level)


# -- ONNX ----------------------------------------------------------------------------------


def export_onnx(module: nn.Module, example: torch.Tensor) -> bytes:
    """The fp32 model as one self-contained ONNX file (weights inside, dynamic batch dim).

    The dynamo exporter (``torch.onnx.export(dynamo=True)``), except for a model with an
    LSTM or GRU layer: there it spends 6-16 s per export (torch.export propagates the
    symbolic batch through aten.gru/lstm's Python decomposition, step by step, on fake
    tensors; measured on torch 2.13 for a 48-step GRU and a 64-token, 2-layer LSTM), where
    the TorchScript exporter takes 0.05-0.4 s for the same ONNX ``GRU``/``LSTM`` operator:
    equal outputs, file size, ONNX Runtime latency, and ``quantize_dynamic`` makes the same
    ``DynamicQuantizeLSTM``. That exporter is deprecated; where it is gone or fails, the
    dynamo one runs.

    The dynamo exporter attaches stack traces and module paths to every node; they are
    debugging aids (8 KB of a 90 KB CNN), so they are dropped from the shipped file.
    """
    import onnx

    module = module.eval()
    proto = _torchscript_export(module, example) if has_recurrent_layer(module) else None
    if proto is None:
        reuse_torchlib_table()
        with quiet():
            program = torch.onnx.export(
                module, (example,), dynamo=True, external_data=False,
                dynamic_shapes=({0: torch.export.Dim("batch")},),
                input_names=[ONNX_INPUT], output_names=[ONNX_OUTPUT], verbose=False,
            )
        proto = program.model_proto
        _strip_debug_metadata(proto.graph)
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


def has_recurrent_layer(module: nn.Module) -> bool:
    """Whether ``module`` holds an LSTM, GRU or plain RNN layer."""
    return any(isinstance(layer, nn.RNNBase) for layer in module.modules())


# The TorchScript exporter's opset: ONNX Runtime's quantizers and every ORT release in use
# support it (the dynamo exporter writes 18 or later as well).
TORCHSCRIPT_OPSET = 18


def _torchscript_export(module: nn.Module, example: torch.Tensor):  # noqa: ANN202 - onnx.ModelProto | None
    """``module`` through the TorchScript exporter (``dynamo=False``), batch dim dynamic;
    None where this torch no longer has it or it cannot trace the model (logged)."""
    import io

    import onnx

    buffer = io.BytesIO()
    try:
        with quiet():
            torch.onnx.export(
                module, (example,), buffer, dynamo=False, opset_version=TORCHSCRIPT_OPSET,
                input_names=[ONNX_INPUT], output_names=[ONNX_OUTPUT],
                dynamic_axes={ONNX_INPUT: {0: "batch"}, ONNX_OUTPUT: {0: "batch"}},
            )
    except Exception as error:  # noqa: BLE001 - removed in a later torch, or a model it cannot trace
        log.info("TorchScript ONNX export failed (%s: %s); using the dynamo exporter", type(error).__name__, error)
        return None
    return onnx.load_from_string(buffer.getvalue())


def reuse_torchlib_table() -> bool:
    """Build the exporter's table of torchlib functions once per process, not per export.

    ``torch.onnx.export(dynamo=True)`` asks onnxscript for that table on every call, and
    onnxscript parses the source of ~500 functions to make it: 0.9 s of a 1.2 s export of
    the default CNN (measured on torch 2.13, onnxscript 0.5), five exports in the default
    run. The table depends only on the installed onnxscript, so its function is wrapped in
    a cache. Where onnxscript no longer has it, exports build the table as before (False).
    """
    import functools

    try:
        from onnxscript._framework_apis import torch_2_5
    except ImportError:
        return False
    build = getattr(torch_2_5, "get_torchlib_ops", None)
    if build is None:
        return False
    if not hasattr(build, "cache_info"):
        torch_2_5.get_torchlib_ops = functools.cache(build)
    return True


def _strip_debug_metadata(graph) -> None:  # noqa: ANN001 - onnx.GraphProto
    for node in graph.node:
        del node.metadata_props[:]
        for attribute in node.attribute:
            if attribute.HasField("g"):
                _strip_debug_metadata(attribute.g)
            for subgraph in attribute.graphs:
                _strip_debug_metadata(subgraph)
    for value in (*graph.value_info, *graph.input, *graph.output):
        del value.metadata_props[:]


def onnx_session(model: bytes | Path, threads: int = 1):  # noqa: ANN201 - onnxruntime.InferenceSession
    """The one way slimflow opens an ONNX Runtime session: CPU provider, ``threads``
    intra-op threads, one inter-op thread (the evaluate stage fixes threads per runtime)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(model) if isinstance(model, Path) else model, options, providers=["CPUExecutionProvider"])


def onnx_predictor(model: bytes | Path, threads: int = 1) -> Callable[[np.ndarray], np.ndarray]:
    """Logits from normalized float32 inputs, through :func:`onnx_session`."""
    session = onnx_session(model, threads)
    input_name = session.get_inputs()[0].name

    def predict(x: np.ndarray) -> np.ndarray:
        return session.run(None, {input_name: np.ascontiguousarray(x, dtype=np.float32)})[0]

    return predict
