"""Pruning: unstructured (zeros, ``torch.nn.utils.prune``) and structured (channels removed, torch-pruning).

Unstructured pruning only writes zeros: the dense model keeps its shape and speed, and
its size falls only when stored compressed, so a pruned variant is reported by its
non-zeros and stored gzip-compressed. Structured pruning removes whole channels / units
so the dense model is genuinely smaller and faster; the new widths are read back into a
:class:`~models.spec.ModelSpec`, so the pruned model is an ordinary model of its family.
An lstm/gru is narrowed here without torch-pruning (:func:`narrow_recurrent`): a hidden
unit is a row in every gate block of its layer's stacked weights; structured pruning
removes units of every layer, and a distillation student starts from the teacher's
strongest units.

Both prune in this process (seconds); their fine-tuning runs on the Horovod loop
(:mod:`tasks.compression.fine_tuning`): unstructured with the masks returned here, held
after every optimizer step; structured on the physically smaller model.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn
from torch.nn.utils import prune

from models.factory import build_model
from models.spec import RECURRENT_FAMILIES, ModelSpec
from tasks.compression.candidate import Candidate, rebuild
from tasks.compression.weights import prunable_weights, weight_sparsity

log = logging.getLogger("slimflow.compress")


def prune_unstructured(candidate: Candidate, sparsity: float) -> tuple[Candidate, dict[str, torch.Tensor]]:
    """Global L1-magnitude pruning of ``sparsity`` of all prunable weights.

    Returns the pruned candidate (zeros in place) and its masks, {parameter name: bool
    tensor, False where pruned}, which fine-tuning holds.
    """
    module = candidate.fresh_module()
    targets = _named_targets(module)
    prune.global_unstructured([(owner, name) for _, owner, name in targets], pruning_method=prune.L1Unstructured,
                              amount=sparsity)
    masks = {}
    for full_name, owner, name in targets:
        masks[full_name] = getattr(owner, f"{name}_mask").detach().bool().clone()
        prune.remove(owner, name)  # make the zeros permanent, drop weight_orig and the mask
    log.info("unstructured pruning: %.1f%% of the weights are zero", 100 * weight_sparsity(module))
    return candidate.changed(module, sparse=True), masks


def zero_masks(module: nn.Module) -> dict[str, torch.Tensor]:
    """Masks that keep a sparse module's zeros (False where a prunable weight is zero)."""
    return {full_name: getattr(owner, name).detach() != 0 for full_name, owner, name in _named_targets(module)}


def _named_targets(module: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """The prunable weights as (parameter name in ``module``, owner, attribute)."""
    owners = {id(owner): name for name, owner in module.named_modules()}
    return [
        (f"{owners[id(owner)]}.{name}" if owners[id(owner)] else name, owner, name)
        for owner, name in prunable_weights(module)
    ]


def _classifier(module: nn.Module) -> nn.Module:
    linears = [child for child in module.modules() if isinstance(child, nn.Linear)]
    if not linears:
        raise ValueError("structured pruning: the model has no linear classifier layer")
    return linears[-1]


def spec_of(module: nn.Module, spec: ModelSpec) -> ModelSpec:
    """The spec that builds ``module``'s (pruned) architecture: its actual widths, width 1."""
    if spec.family == "transformer":
        layers = list(module.layers)
        head_dim = layers[0].attention.head_dim
        heads = {layer.attention.query.out_features // head_dim for layer in layers}
        ffn = {layer.ffn[0].out_features for layer in layers}
        if len(heads) != 1 or len(ffn) != 1:  # the spec describes layers of one width
            raise ValueError(f"structured pruning left layers of different widths (heads {heads}, FFN {ffn})")
        return spec.spec(
            embed_dim=module.head.in_features, heads=heads.pop(), head_dim=head_dim, ffn_dim=ffn.pop(), width=1.0,
        )
    if spec.family == "cnn":
        channels = tuple(c.out_channels for c in module.modules() if isinstance(c, nn.Conv2d))
        return spec.spec(channels=channels, width=1.0)
    if spec.family == "mlp":
        hidden = tuple(c.out_features for c in module.modules() if isinstance(c, nn.Linear))[:-1]
        return spec.spec(hidden_sizes=hidden, width=1.0)
    raise ValueError(f"structured pruning does not support {spec.family} models")


def structured_layers(module: nn.Module) -> dict[str, nn.Module]:
    """The layers structured pruning can narrow, by name: every convolution and linear layer
    but the classifier (which keeps its outputs), in the model's order."""
    classifier = _classifier(module)
    return {name: child for name, child in module.named_modules()
            if isinstance(child, (nn.Conv2d, nn.Linear)) and child is not classifier}


def layer_widths(module: nn.Module) -> dict[str, int]:
    """Each structured layer's output channels / units."""
    return {name: _width(layer) for name, layer in structured_layers(module).items()}


def _width(layer: nn.Module) -> int:
    return layer.out_channels if isinstance(layer, nn.Conv2d) else layer.out_features


def prune_structured(
    candidate: Candidate, sparsity: float, example: torch.Tensor, widths: dict[str, int] | None = None
) -> Candidate:
    """Remove ``sparsity`` of the channels / hidden units of every layer by L1 magnitude (torch-pruning),
    or, with ``widths`` ({layer name: channels to keep}), prune each named layer to its width
    (the others keep theirs; ``sparsity`` is then ignored).

    The classifier keeps its outputs; torch-pruning follows the dependencies (batch norm,
    the next layer's inputs) so the result is a smaller dense model. An lstm/gru loses
    ``sparsity`` of the hidden units of every layer (:func:`narrow_recurrent`; ``widths``
    does not apply to it).
    """
    if candidate.spec.family in RECURRENT_FAMILIES:
        return _prune_recurrent_units(candidate, sparsity)
    import torch_pruning as tp

    module = candidate.fresh_module()
    before = sum(p.numel() for p in module.parameters())
    ratios = None
    if widths is not None:
        layers = structured_layers(module)
        # torch-pruning keeps int(channels x (1 - ratio)): just under the exact share keeps exactly the width
        ratios = {layers[name]: max(0.0, (_width(layers[name]) - keep) / _width(layers[name]) - 1e-9)
                  for name, keep in widths.items() if keep < _width(layers[name])}
        if not ratios:
            return candidate.changed(module)
    if candidate.spec.family == "transformer" and ratios is None:
        pruner = _transformer_pruner(module, example, sparsity)
    else:
        pruner = tp.pruner.MagnitudePruner(
            module, example, importance=tp.importance.MagnitudeImportance(p=1),
            pruning_ratio=0.0 if ratios is not None else sparsity, pruning_ratio_dict=ratios,
            ignored_layers=[_classifier(module)],
        )
    pruner.step()
    # Read the new widths back into a spec and rebuild: the pruned model is then an
    # ordinary model of its family (saved as a state_dict, usable as a teacher).
    spec = spec_of(module, candidate.spec)
    module = rebuild(spec, candidate.input_shape, candidate.num_classes, module.state_dict())
    after = sum(p.numel() for p in module.parameters())
    log.info("structured pruning: %d -> %d parameters (%s)", before, after, _widths(spec))
    return candidate.changed(module, spec=spec)


def _prune_recurrent_units(candidate: Candidate, sparsity: float) -> Candidate:
    rnn = candidate.module.rnn
    keep = max(1, round(rnn.hidden_size * (1.0 - sparsity)))
    # width 1: the spec states the actual sizes (a token model's embedding keeps its width).
    spec = candidate.spec.spec(rnn_hidden=keep, embed_dim=rnn.input_size, width=1.0) \
        if candidate.module.embedding is not None else candidate.spec.spec(rnn_hidden=keep, width=1.0)
    pruned = narrow_recurrent(candidate, spec)
    if pruned is None:  # cannot happen: the same family and depth, no wider
        raise ValueError(f"structured pruning: cannot narrow the {candidate.spec.family} to {keep} hidden units")
    log.info("structured pruning: %d -> %d parameters (hidden units %d -> %d per layer)",
             sum(p.numel() for p in candidate.module.parameters()), sum(p.numel() for p in pruned.module.parameters()),
             rnn.hidden_size, keep)
    return pruned


# Gate blocks stacked in a recurrent layer's weights (rows of weight_ih/weight_hh, biases).
RECURRENT_GATES = {nn.LSTM: 4, nn.GRU: 3}


def narrow_recurrent(candidate: Candidate, spec: ModelSpec) -> Candidate | None:
    """An lstm/gru ``candidate`` narrowed to ``spec``'s hidden size (and, with token inputs, its
    embedding width): in every layer the hidden units of least L1 weight are removed (each
    unit's rows in every gate, input and recurrent, and the columns that read it: the
    recurrent weights, the next layer's, the head's), and the embedding dimensions the
    first layer uses least. The kept units keep their order, so the result computes what
    the candidate's strongest units compute. None where ``spec`` is not a narrower model of
    the candidate's family and depth."""
    teacher = candidate.module
    student = build_model(spec, candidate.input_shape, candidate.num_classes)
    if type(student.rnn) is not type(teacher.rnn) or student.rnn.num_layers != teacher.rnn.num_layers \
            or (student.embedding is None) != (teacher.embedding is None) \
            or student.rnn.hidden_size > teacher.rnn.hidden_size or student.rnn.input_size > teacher.rnn.input_size:
        return None
    gates, hidden = RECURRENT_GATES[type(teacher.rnn)], teacher.rnn.hidden_size
    weights = {name: value.detach() for name, value in teacher.state_dict().items()}

    def rows(units: torch.Tensor) -> torch.Tensor:  # a unit's row in every gate block
        return torch.cat([gate * hidden + units for gate in range(gates)])

    def strongest(importance: torch.Tensor, keep: int) -> torch.Tensor:
        return importance.topk(keep).indices.sort().values

    def by_unit(weight: torch.Tensor) -> torch.Tensor:  # the L1 of each unit's rows, all gates
        return weight.abs().sum(1).reshape(gates, hidden).sum(0)

    kept: dict[str, torch.Tensor] = {}
    inputs = None  # the input features the layer reads (None: all of them)
    if teacher.embedding is not None:
        embedding, first = weights["embedding.weight"], weights["rnn.weight_ih_l0"]
        inputs = strongest(embedding.abs().sum(0) + first.abs().sum(0), student.rnn.input_size)
        kept["embedding.weight"] = embedding[:, inputs]
    for layer in range(teacher.rnn.num_layers):
        w_ih, w_hh = weights[f"rnn.weight_ih_l{layer}"], weights[f"rnn.weight_hh_l{layer}"]
        reader = weights[f"rnn.weight_ih_l{layer + 1}"] if layer + 1 < teacher.rnn.num_layers else weights["head.weight"]
        importance = by_unit(w_ih) + by_unit(w_hh) + w_hh.abs().sum(0) + reader.abs().sum(0)
        units = strongest(importance, student.rnn.hidden_size)
        kept[f"rnn.weight_ih_l{layer}"] = w_ih[rows(units)] if inputs is None else w_ih[rows(units)][:, inputs]
        kept[f"rnn.weight_hh_l{layer}"] = w_hh[rows(units)][:, units]
        for bias in (f"rnn.bias_ih_l{layer}", f"rnn.bias_hh_l{layer}"):
            kept[bias] = weights[bias][rows(units)]
        inputs = units
    kept["head.weight"], kept["head.bias"] = weights["head.weight"][:, inputs], weights["head.bias"]
    student.load_state_dict(kept)
    return candidate.changed(student, spec=spec)


def _transformer_pruner(module: nn.Module, example: torch.Tensor, sparsity: float):  # noqa: ANN202 - tp.pruner.MetaPruner
    """torch-pruning on a transformer: ``sparsity`` of the attention heads (whole heads: their
    query, key and value rows and the output projection's columns) and of the FFN units of
    every layer, by L1 magnitude; the residual width (embeddings, norms, positions) stays."""
    import torch_pruning as tp

    num_heads: dict[nn.Module, int] = {}
    ignored: list[nn.Module] = [module.head, module.embed]
    for layer in module.layers:
        attention = layer.attention
        num_heads.update({attention.query: attention.heads, attention.key: attention.heads, attention.value: attention.heads})
        ignored += [attention.out, layer.ffn[3]]  # their outputs are the residual stream
    return tp.pruner.MetaPruner(
        module, example, importance=tp.importance.MagnitudeImportance(p=1), pruning_ratio=sparsity,
        num_heads=num_heads, prune_num_heads=True, prune_head_dims=False, head_pruning_ratio=sparsity,
        ignored_layers=ignored, unwrapped_parameters=[(module.position, 2)],
    )


def structured_sensitivity(
    candidate: Candidate, example: torch.Tensor, ratios: tuple[float, ...], measure: Callable[[Candidate], float]
) -> dict[str, dict[float, float]]:
    """Per-layer sensitivity: each structured layer pruned alone, at each of ``ratios``, without
    fine-tuning, measured by ``measure`` (e.g. validation accuracy); {layer: {ratio: figure}}."""
    widths = layer_widths(candidate.module)
    figures: dict[str, dict[float, float]] = {}
    for name, width in widths.items():
        figures[name] = {}
        for ratio in ratios:
            keep = max(1, round(width * (1.0 - ratio)))
            figures[name][ratio] = measure(prune_structured(candidate, 0.0, example, {name: keep}))
    return figures


def _widths(spec: ModelSpec) -> str:
    if spec.family == "transformer":
        return f"{spec.heads} heads of {spec.head_dim}, FFN {spec.ffn_dim}"
    return f"channels {list(spec.channels)}" if spec.family == "cnn" else f"hidden {list(spec.hidden_sizes)}"
