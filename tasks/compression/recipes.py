"""Compression recipes: each variant's full recipe, and the rules that depend on the model family.

A variant is a sequence of steps applied in order to its parent (the trained baseline,
or a variant defined earlier in the list), so its full recipe is its parent's recipe
followed by its own steps. What a recipe needs regardless of the model (each method's
settings, the step order, parents, unique names) is checked when ``params.yaml`` is
loaded (:mod:`tasks.core.config`). What depends on the model family (no static int8 of
a GRU, no quantization-aware training of an LSTM...) is checked here, once the family is
known: the compress stage passes the baseline's, :func:`check_pipeline` passes
``train.model.family`` to fail before training.

This module imports no torch: the CLI and the flow check recipes before any stage runs.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from models.spec import RECURRENT_FAMILIES, TOKEN_FAMILIES, ModelSpec, families_reading, input_problem
from tasks.core.config import (
    BASELINE, TABULAR_SOURCES, TEXT_SOURCES, CompressParams, CompressStep, DistillStep, Params, ParamsError,
    QuantizeStep, Variant, step_key,
)

ANY_ROW = (2,)  # a row of features, as a tabular source gives (what reads it does not depend on its length)


class RecipeError(ValueError):
    """A recipe does not suit the model's family; the message names the variant and the step."""


@dataclass(frozen=True)
class ChainStep:
    """One step of a variant's full recipe: which variant wrote it and where."""

    variant: str
    number: int  # 1-based, within that variant's own steps
    step: CompressStep


def method_name(chain: list[ChainStep]) -> str:
    """``distill -> prune -> quantize`` -> ``"distill+prune+quantize"``."""
    return "+".join(item.step.method for item in chain)


def lineages(variants: tuple[Variant, ...] | list[Variant]) -> dict[str, list[ChainStep]]:
    """Each variant's full recipe, its ancestors' steps first (config checked that parents come earlier)."""
    chains: dict[str, list[ChainStep]] = {BASELINE: []}
    for variant in variants:
        own = [ChainStep(variant.name, number, step) for number, step in enumerate(variant.steps, start=1)]
        chains[variant.name] = [*chains[variant.parent], *own]
    del chains[BASELINE]
    return chains


def family_problem(step: CompressStep, family: str) -> str | None:
    """Why ``step`` cannot run on a model of ``family`` (None: it can)."""
    if isinstance(step, DistillStep) and step.student_layers is not None and (step.student_family or family) != "transformer":
        return f"student_layers sets a transformer student's encoder layers; the student is {step.student_family or family}"
    if isinstance(step, QuantizeStep) and family in RECURRENT_FAMILIES:
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


def check_recipes(compress: CompressParams, family: str) -> dict[str, list[ChainStep]]:
    """Refuse the first step that does not suit its model's family with a :class:`RecipeError`;
    return each variant's full recipe.

    Only the variants made for a baseline of ``family`` are checked
    (:func:`selected_variants`); a distillation step with a ``student_family`` changes the
    family the steps after it see.
    """
    chains = lineages(compress.variants)
    numbers = {variant.name: number for number, variant in enumerate(compress.variants, start=1)}
    for variant in selected_variants(compress, family):
        current = family
        for item in chains[variant.name]:
            problem = family_problem(item.step, current)
            if problem and item.variant == variant.name:  # an ancestor's steps were checked with it
                key = step_key(numbers[variant.name], variant.name, item.number, item.step.method)
                raise RecipeError(f"{key}: {problem}")
            if isinstance(item.step, DistillStep) and item.step.student_family:
                current = item.step.student_family
    return chains


def check_pipeline(params: Params, source: str = "params.yaml", input_shape: Sequence[int] | None = None) -> None:
    """Rules that span sections, checked before any stage runs: the trained model, and each
    distillation's student, must read what ``prepare.source`` gives (where the source alone
    says it: text, rows of features; else ``input_shape``, one sample's shape where the data
    says it before it is prepared: :func:`tasks.sources.check_raw_data`), and every
    compression recipe must suit the trained model's family. Raises :class:`ParamsError`
    naming the key or the step."""
    family = params.train.model.family
    data = params.prepare.source
    readers, what = ((TOKEN_FAMILIES, "text") if data in TEXT_SOURCES
                     else (families_reading(ANY_ROW), "rows of features") if data in TABULAR_SOURCES else (None, ""))
    if readers is not None and family not in readers:
        raise ParamsError(
            f"{source}: train.model.family: {family} does not read {what} (prepare.source {data}); "
            f"use one of {', '.join(readers)}"
        )
    try:
        check_recipes(params.compress, params.train.model.family)
    except RecipeError as err:
        raise ParamsError(f"{source}: {err}") from None
    for key, student in (students(params.compress, family) if readers is not None else ()):
        if student not in readers:
            raise ParamsError(f"{source}: {key}: student_family: {student} does not read {what} "
                              f"(prepare.source {data}); use one of {', '.join(readers)}")
    if readers is None and input_shape is not None:
        _check_shape_read(params, source, tuple(input_shape))


def _check_shape_read(params: Params, source: str, input_shape: tuple[int, ...]) -> None:
    """The model and each student must read samples of ``input_shape``, as the data will be
    prepared (else ``prepare`` would replace the prepared data before the train stage refused
    the model)."""
    from tasks.data import reading_problem

    spec = params.train.model.spec()
    if spec.vocab_size is not None:
        return  # not token ids: the train stage refuses the setting itself (tasks.data.spec_for_data)
    problem = reading_problem(spec, input_shape, False, f"prepare.path {params.prepare.path}")
    if problem:
        raise ParamsError(f"{source}: {problem}")
    try:
        check_students_read(params.compress, spec, input_shape)
    except RecipeError as err:
        raise ParamsError(f"{source}: {err}") from None


def students(compress: CompressParams, family: str) -> Iterator[tuple[str, str]]:
    """Each distillation step that names its student's family, in the variants made for a
    baseline of ``family``: the step's key (as messages name it) and that family."""
    numbers = {variant.name: number for number, variant in enumerate(compress.variants, start=1)}
    for variant in selected_variants(compress, family):
        for number, step in enumerate(variant.steps, start=1):
            if isinstance(step, DistillStep) and step.student_family:
                yield step_key(numbers[variant.name], variant.name, number, step.method), step.student_family


def check_students_read(compress: CompressParams, teacher: ModelSpec, input_shape: Sequence[int]) -> None:
    """Refuse (:class:`RecipeError`, naming the step) a distillation whose student's family
    does not read the prepared data (inputs of ``input_shape``; ``teacher``: the baseline's
    spec, token ids if it has a vocabulary)."""
    for key, student in students(compress, teacher.family):
        problem = input_problem(teacher.spec(family=student), input_shape, whole_patches=True)
        if problem:
            setting, why = problem  # the student takes every setting but its family from the teacher
            raise RecipeError(f"{key}: student_family: {why}" if setting == "family" else f"{key}: {why} (train.model.{setting})")
