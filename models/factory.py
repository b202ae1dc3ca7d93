"""Builds every model family: ``build_model(spec, input_shape, num_classes)``."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import nn

from models.cnn import SmallCNN
from models.mlp import MLP
from models.rnn import RecurrentClassifier
from models.spec import ModelSpec, input_problem
from models.transformer import TransformerClassifier


def _scaled(size: int, width: float) -> int:
    return max(1, round(size * width))


def _build_mlp(spec: ModelSpec, input_shape: Sequence[int], num_classes: int) -> nn.Module:
    in_features = 1
    for dim in input_shape:
        in_features *= dim
    hidden = [_scaled(h, spec.width) for h in spec.hidden_sizes]
    return MLP(in_features, hidden, num_classes, spec.dropout)


def _build_cnn(spec: ModelSpec, input_shape: Sequence[int], num_classes: int) -> nn.Module:
    channels = [_scaled(c, spec.width) for c in spec.channels]
    return SmallCNN(input_shape[0], channels, num_classes, spec.dropout)


def _build_rnn(cell: str) -> Callable[[ModelSpec, Sequence[int], int], nn.Module]:
    def build(spec: ModelSpec, input_shape: Sequence[int], num_classes: int) -> nn.Module:
        if spec.vocab_size is not None:  # token ids (L,) -> embedding -> recurrent -> head
            return RecurrentClassifier(
                cell, _scaled(spec.embed_dim, spec.width), _scaled(spec.rnn_hidden, spec.width), spec.rnn_layers,
                num_classes, spec.dropout, vocab_size=spec.vocab_size,
            )
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


def _build_transformer(spec: ModelSpec, input_shape: Sequence[int], num_classes: int) -> nn.Module:
    """Token ids ``(L,)`` with ``spec.vocab_size``, or images ``(C, H, W)`` as patches."""
    heads = spec.heads
    head_dim = spec.head_dim or max(1, round(spec.embed_dim * spec.width / heads))
    dim = _scaled(spec.embed_dim, spec.width)
    settings = dict(
        dim=dim, heads=heads, head_dim=head_dim, ffn_dim=_scaled(spec.ffn_dim, spec.width), layers=spec.layers,
        num_classes=num_classes, dropout=spec.dropout,
    )
    if spec.vocab_size is not None:
        return TransformerClassifier(positions=int(input_shape[0]), vocab_size=spec.vocab_size, **settings)
    channels, height, width = input_shape
    patch = spec.patch_size
    return TransformerClassifier(
        positions=(height // patch) * (width // patch), in_channels=channels, patch_size=patch, **settings
    )


# One builder per name of models.spec.MODEL_FAMILIES (a test checks they match).
BUILDERS: dict[str, Callable[[ModelSpec, Sequence[int], int], nn.Module]] = {
    "mlp": _build_mlp,
    "cnn": _build_cnn,
    "lstm": _build_rnn("lstm"),
    "gru": _build_rnn("gru"),
    "transformer": _build_transformer,
}


def build_model(spec: ModelSpec, input_shape: Sequence[int], num_classes: int) -> nn.Module:
    """Build an untrained model of ``spec.family`` for inputs of ``input_shape`` (no batch
    dim); a family that does not read them (:func:`models.spec.input_problem`): ValueError."""
    try:
        builder = BUILDERS[spec.family]
    except KeyError:  # a spec made without validation (ModelSpec.model_construct)
        known = ", ".join(sorted(BUILDERS))
        raise ValueError(f"unknown model family {spec.family!r}; known: {known}") from None
    problem = input_problem(spec, input_shape)
    if problem:
        raise ValueError(problem[1])
    return builder(spec, tuple(input_shape), num_classes)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["BUILDERS", "build_model", "count_parameters"]
