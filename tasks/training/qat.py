"""Quantization-aware training with torch.ao: the model prepared for fake quantization, and
its observers kept identical on every Horovod rank.

``prepare_qat_model`` wraps a model as torch.ao's eager mode wants it (QuantStub, model,
DeQuantStub), fuses conv-bn(-relu) / linear-relu runs and inserts fake-quantization
modules (:func:`torch.ao.quantization.prepare_qat`). Compression converts the trained
result to int8 (``tasks.compression.quantization``), and also uses :func:`eager_skeleton`
for post-training static int8, so the fused layout is the same in both.

Under Horovod every rank runs its own observers on its own shard, so their activation
ranges drift apart within an epoch (weight observers see identical weights and stay
identical). :func:`average_observers` makes them one again at the end of every epoch:
the observers' min/max are moving averages, linear in the batch statistics, so their
average over the ranks is exactly what one observer would hold that had seen, step by
step, the average of the ranks' batch minima and maxima. The scale and zero point each
fake-quantize module uses are then recomputed from the averaged observer, so validation,
checkpoints and the final conversion see one model on every rank.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

# The model sits at index 1 of the QuantStub / model / DeQuantStub wrapper: its parameter
# "features.0.weight" is "1.features.0.weight" in the prepared model (fusing keeps the
# conv / linear weight's name, so pruning masks map by this prefix).
MODEL_PREFIX = "1."


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """torch.ao warns on every call that it is deprecated (it still works on torch 2.13)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def quantized_engine() -> str:
    """The quantized kernel backend: x86 (fbgemm + onednn) where available."""
    engines = torch.backends.quantized.supported_engines
    for engine in ("x86", "fbgemm", "qnnpack"):
        if engine in engines:
            return engine
    raise RuntimeError(f"this torch build has no quantized engine (supported: {engines})")


def fusion_groups(module: nn.Module, prefix: str) -> list[list[str]]:
    """conv-bn(-relu), conv-relu and linear-relu runs inside Sequentials, fused before quantizing."""
    groups: list[list[str]] = []
    for name, child in module.named_modules():
        if not isinstance(child, nn.Sequential):
            continue
        items = list(child.named_children())
        index = 0
        while index < len(items):
            first, layer = items[index]
            group, index = [first], index + 1
            if isinstance(layer, (nn.Conv2d, nn.Linear)):
                if isinstance(layer, nn.Conv2d) and index < len(items) and isinstance(items[index][1], nn.BatchNorm2d):
                    group.append(items[index][0])
                    index += 1
                if index < len(items) and isinstance(items[index][1], nn.ReLU):
                    group.append(items[index][0])
                    index += 1
            if len(group) > 1:
                groups.append([f"{prefix}{name}.{part}" if name else f"{prefix}{part}" for part in group])
    return groups


def eager_skeleton(module: nn.Module, qat: bool, engine: str | None = None) -> nn.Module:
    """``module`` between a QuantStub and a DeQuantStub, fused, with the engine's qconfig."""
    from torch.ao import quantization as tq

    engine = engine or quantized_engine()
    torch.backends.quantized.engine = engine
    wrapped = nn.Sequential(tq.QuantStub(), module, tq.DeQuantStub())
    groups = fusion_groups(module, MODEL_PREFIX)
    with quiet():
        if qat:
            wrapped.train()
            wrapped = tq.fuse_modules_qat(wrapped, groups)
            wrapped.qconfig = tq.get_default_qat_qconfig(engine)
        else:
            wrapped.eval()
            wrapped = tq.fuse_modules(wrapped, groups)
            wrapped.qconfig = tq.get_default_qconfig(engine)
    return wrapped


def prepare_qat_model(module: nn.Module, engine: str) -> nn.Module:
    """``module`` ready for quantization-aware training on ``engine`` (fake quantization inserted)."""
    from torch.ao import quantization as tq

    with quiet():
        return tq.prepare_qat(eager_skeleton(module, qat=True, engine=engine))


def fake_quantizers(model: nn.Module) -> list[Any]:
    from torch.ao.quantization import FakeQuantizeBase

    return [m for m in model.modules() if isinstance(m, FakeQuantizeBase)]


@contextlib.contextmanager
def observers_paused(model: nn.Module) -> Iterator[None]:
    """Observers off while validating: torch.ao's fake-quantize modules observe in eval mode
    too, which would fit the ranges to (each rank's slice of) the validation split."""
    from torch.ao.quantization import disable_observer, enable_observer

    model.apply(disable_observer)
    try:
        yield
    finally:
        model.apply(enable_observer)


@contextlib.contextmanager
def fake_quant_off(model: nn.Module) -> Iterator[None]:
    """The model as fp32 (observers and fake quantization off): what QAT starts from."""
    from torch.ao.quantization import disable_fake_quant, enable_fake_quant

    model.apply(disable_fake_quant)
    try:
        with observers_paused(model):
            yield
    finally:
        model.apply(enable_fake_quant)


def average_observers(hvd: Any, model: nn.Module) -> None:
    """Horovod: average every observer's min/max over the ranks, then recompute each
    fake-quantize module's scale and zero point from it (identical on every rank after)."""
    quantizers = fake_quantizers(model)
    ranges = [
        buffer for fq in quantizers for buffer in (fq.activation_post_process.min_val, fq.activation_post_process.max_val)
        if buffer.numel()
    ]
    if hvd.size() > 1 and ranges:
        hvd.grouped_allreduce_(ranges, op=hvd.Average, name="observer_ranges")
    refresh_qparams(quantizers)


def refresh_qparams(quantizers: list[Any]) -> None:
    """Each fake-quantize module's scale and zero point, computed from its observer's range."""
    with torch.no_grad():
        for fq in quantizers:
            observer = fq.activation_post_process
            if not observer.min_val.numel() or not torch.isfinite(observer.min_val).all():
                continue  # never observed anything
            scale, zero_point = observer.calculate_qparams()
            fq.scale.resize_(scale.shape).copy_(scale)
            fq.zero_point.resize_(zero_point.shape).copy_(zero_point)
