"""Builds every model family: ``build_model(spec, input_shape, num_classes)``."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import nn

from models.cnn import SmallCNN
from models.mlp import MLP
from models.rnn import RecurrentClassifier
from models.spec import ModelSpec


def _scaled(size: int, width: float) -> int:
    return max(1, round(size * width))


def _build_mlp(spec: ModelSpec, input_shape: Sequence[int], num_classes: int) -> nn.Module:
    in_features = 1
    for dim in input_shape:
        in_features *= dim
    hidden = [_scaled(h, spec.width) for h in spec.hidden_sizes]
    return MLP(in_features, hidden, num_classes, spec.dropout)


def _build_cnn(spec: ModelSpec, input_shape: Sequence[int], num_classes: int) -> nn.Module:
    if len(input_shape) != 3:
        raise ValueError(f"cnn needs image inputs (C, H, W), got input shape {tuple(input_shape)}")
    channels = [_scaled(c, spec.width) for c in spec.channels]
    return SmallCNN(input_shape[0], channels, num_classes, spec.dropout)


def _build_rnn(cell: str) -> Callable[[ModelSpec, Sequence[int], int], nn.Module]:
    def build(spec: ModelSpec, input_shape: Sequence[int], num_classes: int) -> nn.Module:
        # Images are read one row per time step: (C, H, W) -> H steps of C*W features.
        if len(input_shape) == 3:
            steps_features = input_shape[0] * input_shape[2]
        elif len(input_shape) == 2:
            steps_features = input_shape[1]
        else:  # tabular: one feature per step
            steps_features = 1
        return RecurrentClassifier(
            cell, steps_features, _scaled(spec.rnn_hidden, spec.width), spec.rnn_layers,
            num_classes, spec.dropout,
        )

    return build


# One builder per name of models.spec.MODEL_FAMILIES (a test checks they match).
BUILDERS: dict[str, Callable[[ModelSpec, Sequence[int], int], nn.Module]] = {
    "mlp": _build_mlp,
    "cnn": _build_cnn,
    "lstm": _build_rnn("lstm"),
    "gru": _build_rnn("gru"),
}


def build_model(spec: ModelSpec, input_shape: Sequence[int], num_classes: int) -> nn.Module:
    """Build an untrained model of ``spec.family`` for inputs of ``input_shape`` (no batch dim)."""
    try:
        builder = BUILDERS[spec.family]
    except KeyError:  # a spec made without validation (ModelSpec.model_construct)
        known = ", ".join(sorted(BUILDERS))
        raise ValueError(f"unknown model family {spec.family!r}; known: {known}") from None
    return builder(spec, tuple(input_shape), num_classes)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["BUILDERS", "build_model", "count_parameters"]
