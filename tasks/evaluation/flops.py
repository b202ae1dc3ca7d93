"""FLOPs per sample: counted on a torch module, or taken from the parent a variant was made from.

Counts come from ``torch.utils.flop_counter.FlopCounterMode`` on a torch module at batch 1
(one multiply-add = 2 FLOPs; CPU LSTMs, a fused kernel the counter does not see, are added
from their shapes). A quantized or exported (ONNX) copy of the same layers does its fp32
parent's multiply-adds (in int8 or another runtime), so it reports the parent's count - the
counter cannot see quantized kernels or ONNX - or NaN when there is none.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from tasks.evaluation.results import BASELINE

log = logging.getLogger("slimflow.measure")

# Recipe steps after which the parent's FLOPs no longer describe the model.
_ARCHITECTURE_CHANGING = {"distill"}


# ---------------------------------------------------------------------------- counting
def _recurrent_flops(rnn: Any, x: Any) -> float:
    """Matrix-multiply FLOPs of an nn.LSTM/GRU/RNN over input ``x`` (what GRU's decomposition counts)."""
    gates = {"LSTM": 4, "GRU": 3}.get(type(rnn).__name__, 1)
    if x.dim() == 2:  # unbatched (T, F)
        steps, batch = x.shape[0], 1
    else:
        steps, batch = (x.shape[1], x.shape[0]) if rnn.batch_first else (x.shape[0], x.shape[1])
    directions = 2 if rnn.bidirectional else 1
    total = 0.0
    for layer in range(rnn.num_layers):
        inputs = rnn.input_size if layer == 0 else rnn.hidden_size * directions
        total += 2.0 * steps * batch * directions * gates * rnn.hidden_size * (inputs + rnn.hidden_size)
    return total


def count_flops(module: Any, example: np.ndarray) -> float | None:
    """FLOPs of one forward pass on ``example`` (None when nothing countable ran).

    FlopCounterMode counts the matrix multiplies torch dispatches; CPU LSTMs run as one
    fused kernel it does not see, so recurrent layers it counted nothing for are added
    from their shapes (the same matrix-multiply count it gives a GRU).
    """
    import torch
    from torch import nn
    from torch.utils.flop_counter import FlopCounterMode

    if module is None:
        return None
    recurrent_inputs: dict[str, Any] = {}

    def remember(name: str) -> Callable[..., None]:
        def hook(rnn: Any, args: tuple[Any, ...], output: Any) -> None:  # returns None: output unchanged
            recurrent_inputs.setdefault(name, (rnn, args[0]))
        return hook

    hooks = []
    if isinstance(module, nn.Module):
        for name, child in module.named_modules():
            if isinstance(child, nn.RNNBase):
                hooks.append(child.register_forward_hook(remember(name)))
    try:
        counter = FlopCounterMode(display=False)
        with torch.inference_mode(), counter:
            module(torch.from_numpy(np.ascontiguousarray(example, dtype=np.float32)))
        total = float(counter.get_total_flops())
        counts = counter.get_flop_counts()
    except Exception as err:  # an exotic program the counter cannot follow
        log.warning("FLOPs not counted: %s", err)
        return None
    finally:
        for hook in hooks:
            hook.remove()
    root = type(module).__name__
    for name, (rnn, x) in recurrent_inputs.items():
        if not sum(counts.get(f"{root}.{name}" if name else root, {}).values()):
            total += _recurrent_flops(rnn, x)
    return total if total > 0 else None


# ---------------------------------------------------------------------------- variants
def _recipe_methods(manifest: Mapping[str, Any]) -> list[dict[str, Any]]:
    recipe = manifest.get("recipe") or []
    steps = [step for step in recipe if isinstance(step, Mapping)]
    if not steps and manifest.get("method") not in (None, BASELINE):  # "distill+quantize"
        steps = [{"method": method} for method in str(manifest["method"]).split("+")]
    return steps


def _keeps_architecture(manifest: Mapping[str, Any]) -> bool:
    """True when the recipe changes only storage/runtime/numerics, not the layers."""
    for step in _recipe_methods(manifest):
        if step.get("method") in _ARCHITECTURE_CHANGING:
            return False
        if step.get("method") == "prune" and step.get("kind") == "structured":
            return False
    return True


def _is_quantized(manifest: Mapping[str, Any]) -> bool:
    return any(step.get("method") in {"quantize", "half"} for step in _recipe_methods(manifest))


def model_flops(
    module: Any, manifest: Mapping[str, Any], example: np.ndarray, parent_flops: float | None
) -> tuple[float, str]:
    """FLOPs per sample of one model and where the figure comes from (see the module docstring)."""
    same_layers = _keeps_architecture(manifest)
    if parent_flops is not None and same_layers and (_is_quantized(manifest) or module is None):
        return parent_flops, "parent (same layers)"
    counted = count_flops(module, example) if module is not None else None
    if counted is not None:
        return counted, "counted (FlopCounterMode)"
    if parent_flops is not None and same_layers:
        return parent_flops, "parent (same layers)"
    return math.nan, "not countable for this runtime"


def all_models_flops(
    manifests: Mapping[str, Mapping[str, Any]], modules: Mapping[str, Any], example: np.ndarray
) -> dict[str, tuple[float, str]]:
    """``{name: (flops, source)}`` for every model; a variant's parent is resolved before it."""
    found: dict[str, tuple[float, str]] = {}

    def resolve(name: str, seen: tuple[str, ...] = ()) -> None:
        if name in found:
            return
        manifest = manifests[name]
        parent = str(manifest.get("parent") or BASELINE)
        parent_flops = None
        if parent in manifests and parent != name and parent not in seen:
            resolve(parent, (*seen, name))
            parent_flops = found[parent][0]
            parent_flops = None if math.isnan(parent_flops) else parent_flops
        found[name] = model_flops(modules[name], manifest, example, parent_flops)

    for name in manifests:
        resolve(name)
    return {name: found[name] for name in manifests}
