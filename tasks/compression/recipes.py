"""Compression recipes: the rules a variant's steps must follow, checked before any work.

A variant is a sequence of steps applied in order to its parent (the trained baseline,
or a variant defined earlier in the list), so its full recipe is its parent's recipe
followed by its own steps. :func:`check_recipes` refuses a bad recipe with one message
naming the variant, the step number and its method. The rules that do not depend on the
model run when ``params.yaml`` is loaded (``CompressParams`` calls this module); the
model-family rules run when the family is known (the compress stage passes the
baseline's, a flow may pass ``params.train.model.family`` to fail before training).

This module imports no torch: the params loader uses it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tasks.core.config import CompressParams, CompressStep, Variant

BASELINE = "baseline"

# The settings each method reads; any other setting written on a step is refused, so a
# misplaced key (``mode`` on a prune step) does not pass silently.
SETTINGS: dict[str, tuple[str, ...]] = {
    "prune": ("kind", "sparsity", "fine_tune_epochs", "lr"),
    "quantize": ("mode", "runtime", "fine_tune_epochs", "lr"),
    "distill": ("student_family", "student_width", "temperature", "alpha", "epochs", "lr"),
    "half": (),
    "export": ("runtime",),
}
# Steps that turn the model into its shipping format: nothing can follow them.
FINAL_METHODS = frozenset({"quantize", "half", "export"})
RECURRENT = frozenset({"lstm", "gru"})
FAMILIES_WITH_CHANNELS = frozenset({"mlp", "cnn"})


class RecipeError(ValueError):
    """A compression recipe cannot be run; the message names the variant and the step."""


@dataclass(frozen=True)
class ChainStep:
    """One step of a variant's full recipe: which variant wrote it and where."""

    variant: str
    number: int  # 1-based, within that variant's own steps
    step: CompressStep


def step_settings(step: CompressStep) -> dict[str, Any]:
    """The step as a dict of the settings its method reads (what manifests and MLflow record)."""
    values = step.model_dump()
    return {"method": step.method, **{key: values[key] for key in SETTINGS[step.method]}}


def method_name(chain: list[ChainStep]) -> str:
    """``distill -> prune -> quantize`` -> ``"distill+prune+quantize"``."""
    return "+".join(item.step.method for item in chain)


def lineages(variants: tuple[Variant, ...] | list[Variant]) -> dict[str, list[ChainStep]]:
    """Each variant's full recipe, its ancestors' steps first. Parents must come earlier."""
    chains: dict[str, list[ChainStep]] = {}
    for variant in variants:
        if variant.parent == BASELINE:
            inherited: list[ChainStep] = []
        elif variant.parent in chains:
            inherited = chains[variant.parent]
        else:
            names = [v.name for v in variants]
            where = (
                "is defined after it: a parent must come earlier in the list"
                if variant.parent in names
                else f"is not a variant (known: {', '.join([BASELINE, *chains]) })"
            )
            raise RecipeError(f"variant {variant.name!r}: parent {variant.parent!r} {where}")
        own = [ChainStep(variant.name, number, step) for number, step in enumerate(variant.steps, start=1)]
        chains[variant.name] = [*inherited, *own]
    return chains


def _where(item: ChainStep) -> str:
    return f"variant {item.variant!r} step {item.number} ({item.step.method})"


def _check_settings(item: ChainStep) -> str | None:
    """What is missing or wrong in one step's own settings, whatever comes before it."""
    step = item.step
    stray = sorted(step.model_fields_set - {"method", *SETTINGS[step.method]})
    if stray:
        return f"{', '.join(stray)} does not apply to {step.method} (it reads: {', '.join(SETTINGS[step.method]) or 'nothing'})"
    if step.method == "prune":
        if "lr" in step.model_fields_set and step.fine_tune_epochs < 1:
            return "lr is the fine-tuning learning rate: set fine_tune_epochs >= 1 too"
        if step.kind is None:
            return "prune needs kind: unstructured or structured"
        if step.sparsity is None:
            return "prune needs sparsity (the share of weights, or of channels when structured, to remove)"
        if not 0.0 < step.sparsity < 1.0:
            return f"sparsity must be above 0 and below 1, got {step.sparsity}"
    elif step.method == "quantize":
        if step.mode is None:
            return "quantize needs mode: dynamic, static or qat"
        if step.mode == "qat" and step.runtime != "torch":
            return "mode qat trains and runs in PyTorch: set runtime: torch"
        if step.mode == "qat" and step.fine_tune_epochs < 1:
            return "mode qat needs fine_tune_epochs >= 1 (the epochs trained with fake quantization)"
        if step.mode != "qat" and step.model_fields_set & {"fine_tune_epochs", "lr"}:
            return "fine_tune_epochs and lr apply to mode qat only"
    elif step.method == "distill":
        if step.student_width is None and step.student_family is None:
            return "distill needs student_width and/or student_family (the student's architecture)"
    return None


def _check_family(item: ChainStep, family: str) -> str | None:
    """Whether the step's method supports the family the model has at that point."""
    step = item.step
    if step.method == "prune" and step.kind == "structured" and family not in FAMILIES_WITH_CHANNELS:
        return (
            f"structured pruning supports mlp and cnn models, not {family} "
            "(torch-pruning cannot remove LSTM/GRU units); use kind: unstructured"
        )
    if step.method == "quantize" and family in RECURRENT:
        if step.mode == "static":
            return (
                f"static int8 does not support {family} models; use mode: dynamic "
                f"(runtime: torch{', or onnxruntime' if family == 'lstm' else ''})"
            )
        if step.mode == "qat":
            return f"quantization-aware training supports mlp and cnn models, not {family}; use mode: dynamic"
        if step.mode == "dynamic" and step.runtime == "onnxruntime" and family == "gru":
            return "ONNX Runtime has no int8 GRU (its weights would stay fp32); use runtime: torch"
    return None


def selected_variants(compress: CompressParams, family: str) -> list[Variant]:
    """The variants made for a baseline of ``family``: those whose ``families`` admit it,
    and whose parent is made too."""
    made: set[str] = {BASELINE}
    selected = []
    for variant in compress.variants:
        if (variant.families is None or family in variant.families) and variant.parent in made:
            made.add(variant.name)
            selected.append(variant)
    return selected


def check_recipes(compress: CompressParams, family: str | None = None) -> dict[str, list[ChainStep]]:
    """Refuse the first bad recipe with a :class:`RecipeError`; return each variant's full recipe.

    ``family`` is the baseline's model family: the family rules then check the variants
    made for it (:func:`selected_variants`); without it they are skipped.
    """
    chains = lineages(compress.variants)
    for variant in selected_variants(compress, family) if family else compress.variants:
        chain = chains[variant.name]
        current = family
        for position, item in enumerate(chain):
            if position > 0 and chain[position - 1].step.method in FINAL_METHODS and item.variant == variant.name:
                before = chain[position - 1]
                origin = "" if before.variant == variant.name else f" (the last step of parent {before.variant!r})"
                if before.step.method == item.step.method == "quantize":
                    problem = f"quantize after quantize{origin}: a model is quantized once"
                else:
                    problem = (
                        f"{item.step.method} after {before.step.method}{origin}: "
                        f"{before.step.method} writes the final format, so it must be the last step"
                    )
                raise RecipeError(f"{_where(item)}: {problem}")
            if item.variant == variant.name:
                problem = _check_settings(item) or (_check_family(item, current) if current else None)
                if problem:
                    raise RecipeError(f"{_where(item)}: {problem}")
            if item.step.method == "distill" and item.step.student_family:
                current = item.step.student_family
    return chains
