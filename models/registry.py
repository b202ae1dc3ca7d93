"""One registry for every model family: ``build_model(spec, input_shape, num_classes)``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from torch import nn

from models.cnn import SmallCNN
from models.mlp import MLP
from models.rnn import RecurrentClassifier


@dataclass(frozen=True)
class ModelSpec:
    """Architecture settings. ``width`` multiplies every hidden size (students use < 1)."""

    family: str = "cnn"
    width: float = 1.0
    hidden_sizes: tuple[int, ...] = (256, 128)  # mlp
    channels: tuple[int, ...] = (32, 64)  # cnn
    rnn_hidden: int = 64  # lstm / gru
    rnn_layers: int = 1
    dropout: float = 0.1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        data = dict(data)
        for key in ("hidden_sizes", "channels"):
            if key in data:
                data[key] = tuple(data[key])
        return cls(**data)


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


MODEL_FAMILIES: dict[str, Callable[[ModelSpec, Sequence[int], int], nn.Module]] = {
    "mlp": _build_mlp,
    "cnn": _build_cnn,
    "lstm": _build_rnn("lstm"),
    "gru": _build_rnn("gru"),
}


def build_model(spec: ModelSpec, input_shape: Sequence[int], num_classes: int) -> nn.Module:
    """Build an untrained model of ``spec.family`` for inputs of ``input_shape`` (no batch dim)."""
    try:
        builder = MODEL_FAMILIES[spec.family]
    except KeyError:
        known = ", ".join(sorted(MODEL_FAMILIES))
        raise ValueError(f"unknown model family {spec.family!r}; known: {known}") from None
    return builder(spec, tuple(input_shape), num_classes)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["MODEL_FAMILIES", "ModelSpec", "build_model", "count_parameters"]
