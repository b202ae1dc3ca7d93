"""Helpers on a module's weights that the methods and the formats share.

The bottom of the package's imports (torch only), so that ``candidate``, ``pruning``,
``quantization`` and ``formats`` all use them without importing one another in a circle.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import nn

from tasks.core.model_files import count_nonzeros


def prunable_weights(module: nn.Module) -> list[tuple[nn.Module, str]]:
    """The weight matrices pruning acts on: conv / linear weights and recurrent weight matrices.

    Biases and normalization parameters are left alone (few values, large effect).
    """
    targets: list[tuple[nn.Module, str]] = []
    for child in module.modules():
        if isinstance(child, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            targets.append((child, "weight"))
        elif isinstance(child, nn.RNNBase):
            targets += [(child, name) for name, _ in child.named_parameters(recurse=False) if name.startswith("weight_")]
    return targets


def weight_sparsity(module: nn.Module) -> float:
    """The measured share of zeros among the prunable weights."""
    weights = [getattr(owner, name).detach() for owner, name in prunable_weights(module)]
    total = sum(w.numel() for w in weights)
    zeros = sum(int((w == 0).sum()) for w in weights)
    return zeros / total if total else 0.0


def map_state_dict(state_dict: dict, fn: Callable[[torch.Tensor], torch.Tensor]) -> dict:
    """``fn`` applied to the floating tensors; keeps the version metadata modules load by."""
    mapped = OrderedDict(
        (k, fn(v) if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in state_dict.items()
    )
    mapped._metadata = getattr(state_dict, "_metadata", None)  # type: ignore[attr-defined]
    return mapped


def parameters_and_nonzeros(module: nn.Module) -> tuple[int, int]:
    """(parameters, non-zeros) as the baseline's manifest counts them."""
    return sum(p.numel() for p in module.parameters()), count_nonzeros(module)
