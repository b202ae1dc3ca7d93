"""The ``compress`` section of ``params.yaml``: variants, each a list of typed steps.

A step is one model per method (``prune``, ``quantize``, ``distill``, ``half``,
``export``), chosen by its ``method`` (a discriminated union), each with its own
settings, defaults and rules, so ``slimflow params --schema`` shows each method's
fields. The rules that need no model are checked here, when ``params.yaml`` is loaded:
each step's settings, the step order (quantize, half and export come last), parents
defined earlier, unique names. The rules that depend on the model family live in
``tasks.compression.recipes``. :mod:`tasks.core.config` loads this section with the others.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from models.spec import ModelFamily


class _Strict(BaseModel):
    """Like every section of params.yaml: unknown keys refused, values frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


BASELINE = "baseline"  # the trained model: every variant's parent by default
# Steps that write the model's shipping format: nothing can follow them.
FINAL_METHODS = frozenset({"quantize", "half", "export"})

LearningRate = Annotated[float, Field(gt=0.0, le=10.0)]


def _problem(message: str, *key: str | int) -> PydanticCustomError:
    """A problem at ``key`` below the model whose validator raises it: pydantic places a
    model validator's errors at the model itself; ``tasks.core.config`` appends ``key``."""
    return PydanticCustomError("params", "{message}", {"message": message, "key": key})


class PruneStep(_Strict):
    """Unstructured (zeros, torch.nn.utils.prune) or structured (channels removed, torch-pruning)."""

    method: Literal["prune"]
    kind: Literal["unstructured", "structured"] = Field(
        description="unstructured (zeros in place) or structured (whole channels / units removed: mlp, cnn; "
        "attention heads and FFN units: transformer; hidden units of every layer: lstm, gru)"
    )
    sparsity: Annotated[float, Field(gt=0.0, lt=1.0)] | Literal["auto"] = Field(
        description="the share of weights (unstructured) or of channels per layer (structured) to remove, "
        "above 0 and below 1; auto: a search for the highest within compress.budget (unstructured: gradual "
        "pruning, bisected; structured mlp/cnn: per-layer ratios from each layer's measured sensitivity, the "
        "least sensitive pruned most; transformer, lstm, gru: 0.75, 0.5, 0.25 of heads and FFN units / hidden "
        "units, the first that fits)",
    )
    fine_tune_epochs: int = Field(0, ge=0, description="epochs fine-tuned under the pruning mask")
    lr: LearningRate | None = Field(None, description="the fine-tuning learning rate (default: compress.fine_tune_lr)")

    @field_validator("sparsity", mode="before")
    @classmethod
    def _share_or_auto(cls, value: object) -> object:
        """One clear message, not one per member of the union."""
        if value == "auto":
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise PydanticCustomError("sparsity", "expected a share above 0 and below 1, or auto")
        if not 0 < value < 1:
            rule = "greater than 0" if value <= 0 else "less than 1"
            raise PydanticCustomError("sparsity", "Input should be {rule}", {"rule": rule})
        return float(value)

    @model_validator(mode="after")
    def _lr_needs_fine_tuning(self) -> PruneStep:
        if "lr" in self.model_fields_set and self.fine_tune_epochs < 1:
            raise _problem("lr is the fine-tuning learning rate: set fine_tune_epochs >= 1 too", "lr")
        if self.sparsity == "auto":
            if self.fine_tune_epochs < 1:
                why = "prunes gradually while fine-tuning" if self.kind == "unstructured" else "fine-tunes every trial"
                raise _problem(f"sparsity auto {why}: set fine_tune_epochs >= 1", "fine_tune_epochs")
        return self

    @property
    def searched(self) -> bool:
        return self.sparsity == "auto"


class QuantizeStep(_Strict):
    """int8 weights: ONNX Runtime (dynamic, static) or torch.ao (dynamic, static, qat)."""

    method: Literal["quantize"]
    mode: Literal["dynamic", "static", "qat"] = Field(
        description="dynamic, static (activations calibrated on the train split) or qat (quantization-aware "
        "fine-tuning; runtime: torch)"
    )
    runtime: Literal["onnxruntime", "torch"] = Field("onnxruntime", description="the runtime the model ships in")
    fine_tune_epochs: int = Field(0, ge=0, description="qat: the epochs trained with fake quantization")
    lr: LearningRate | None = Field(None, description="qat: the fine-tuning learning rate (default: compress.fine_tune_lr)")
    fallback: Literal["auto"] | None = Field(
        None,
        description="static onnxruntime: auto keeps the layers that cost the most accuracy in fp32, the worst first, "
        "until the validation drop fits compress.budget (null: every layer int8)",
    )

    @property
    def searched(self) -> bool:
        return self.fallback == "auto"

    @model_validator(mode="after")
    def _check_qat(self) -> QuantizeStep:
        if self.fallback is not None and (self.mode, self.runtime) != ("static", "onnxruntime"):
            raise _problem("fallback applies to mode static, runtime onnxruntime only", "fallback")
        if self.mode == "qat":
            if self.runtime != "torch":
                raise _problem("mode qat trains and runs in PyTorch: set runtime: torch", "runtime")
            if self.fine_tune_epochs < 1:
                raise _problem(
                    "mode qat needs fine_tune_epochs >= 1 (the epochs trained with fake quantization)", "fine_tune_epochs"
                )
        elif tuned := sorted(self.model_fields_set & {"fine_tune_epochs", "lr"}):
            raise _problem(f"applies to mode qat only, not {self.mode}", tuned[0])
        return self


class DistillStep(_Strict):
    """A smaller student trained from the model's soft targets, with Horovod like the baseline."""

    method: Literal["distill"]
    student_family: ModelFamily | None = Field(None, description="the student's model family (default: the teacher's)")
    student_width: Annotated[float, Field(gt=0.0, le=8.0)] | Literal["auto"] | None = Field(
        None, description="the student's model width (default: the teacher's); auto: the smallest of 0.25, 0.5, "
        "0.75 x the teacher's width whose student fits compress.budget (smallest first, one training each)"
    )

    student_layers: int | None = Field(
        None, ge=1, description="transformer students: the encoder layers (default: the teacher's), e.g. fewer"
    )

    @field_validator("student_width", mode="before")
    @classmethod
    def _width_or_auto(cls, value: object) -> object:
        """One clear message, not one per member of the union."""
        if value is None or value == "auto":
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise PydanticCustomError("student_width", "expected a width above 0 and at most 8, or auto")
        if not 0 < value <= 8:
            rule = "greater than 0" if value <= 0 else "less than or equal to 8"
            raise PydanticCustomError("student_width", "Input should be {rule}", {"rule": rule})
        return float(value)

    @property
    def searched(self) -> bool:
        return self.student_width == "auto"

    student_init: Literal["auto", "random"] = Field(
        "auto", description="auto: a narrower cnn, mlp, lstm or gru of the teacher's family starts from the teacher's own "
        "weights, its least important channels / units (L1) removed down to the student's widths; other "
        "students, and random, start from random weights"
    )
    temperature: float = Field(4.0, gt=0.0, description="softens both models' outputs for the soft-target loss")
    alpha: float = Field(0.7, ge=0.0, le=1.0, description="the soft-target loss's weight (the labels': 1 - alpha)")
    epochs: int = Field(10, ge=1)
    lr: LearningRate | None = Field(None, description="per worker (default: train.lr), scaled by the world size")

    @model_validator(mode="after")
    def _needs_a_student(self) -> DistillStep:
        if self.student_width is None and self.student_family is None and self.student_layers is None:
            raise _problem(
                "distill needs student_width, student_family and/or student_layers (the student's architecture)"
            )
        return self


class HalfStep(_Strict):
    """fp16 weights for storage, computed in fp32 at load."""

    method: Literal["half"]


class ExportStep(_Strict):
    """The model as it stands in a portable format for ``runtime``, e.g. the fp32 ONNX reference."""

    method: Literal["export"]
    runtime: Literal["onnxruntime", "torch"] = Field(
        "onnxruntime", description="onnxruntime (an ONNX file) or torch (a torch.export .pt2 program)"
    )


# method -> the step model that validates it (the discriminated union below, by name).
STEP_MODELS: dict[str, type[_Strict]] = {
    "prune": PruneStep, "quantize": QuantizeStep, "distill": DistillStep, "half": HalfStep, "export": ExportStep,
}
CompressStep = Annotated[
    Union[PruneStep, QuantizeStep, DistillStep, HalfStep, ExportStep], Field(discriminator="method")
]


def _after_final(before: str, method: str, origin: str = "") -> str | None:
    """Why a ``method`` step cannot follow a ``before`` step (None: it can)."""
    if before not in FINAL_METHODS:
        return None
    if before == method == "quantize":
        return f"quantize after quantize{origin}: a model is quantized once"
    return f"{method} after {before}{origin}: {before} writes the final format, so it must be the last step"


class Variant(_Strict):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9._-]+$")
    parent: str = BASELINE
    steps: tuple[CompressStep, ...] = Field(min_length=1)
    # Made only when the baseline's model family is one of these (null: always), so one
    # list of recipes can hold family-specific ones (e.g. structured pruning: mlp, cnn).
    families: tuple[ModelFamily, ...] | None = None

    @model_validator(mode="after")
    def _final_steps_come_last(self) -> Variant:
        for index in range(1, len(self.steps)):
            if problem := _after_final(self.steps[index - 1].method, self.steps[index].method):
                raise _problem(problem, "steps", index)
        return self


class Budget(_Strict):
    """What a searched knob (``auto``) may cost, and how long it may search."""

    max_accuracy_drop: float | None = Field(
        None, ge=0.0, le=100.0,
        description="accuracy points on the validation split a searched variant may lose against the baseline "
        "(default: evaluate.gate.max_accuracy_drop x 100)",
    )
    max_class_recall_drop: float | None = Field(
        None, ge=0.0, le=1.0,
        description="the most any one class's validation recall may fall against the baseline's, a fraction "
        "(default: evaluate.gate.max_class_recall_drop; 1: not applied); a fall of one sample is not counted",
    )
    max_trials: int = Field(6, ge=1, le=100, description="trials per searched variant (each one fine-tune)")
    max_minutes: float = Field(
        10.0, gt=0.0, le=24 * 60,
        description="wall-clock minutes per searched variant: no trial starts that would end past it "
        "(the first trial always runs: a search always returns a model)",
    )


class CompressParams(_Strict):
    calibration_samples: int = Field(256, ge=1)
    fine_tune_lr: float = Field(0.0005, gt=0.0)
    budget: Budget = Budget()
    variants: tuple[Variant, ...] = ()

    @model_validator(mode="after")
    def _check_lineage(self) -> CompressParams:
        """Names are unique, a parent is defined earlier, nothing follows a parent's final step.

        (The rules that depend on the model family: ``tasks.compression.recipes``.)"""
        last_method: dict[str, str | None] = {BASELINE: None}  # variant -> its last step's method
        for index, variant in enumerate(self.variants):
            if variant.name in last_method:
                what = "the trained model's name" if variant.name == BASELINE else "used twice: names must be unique"
                raise _problem(f"{variant.name!r} is {what}", "variants", index, "name")
            if variant.parent not in last_method:
                where = (
                    "is defined after this variant: a parent must come earlier in the list"
                    if any(later.name == variant.parent for later in self.variants[index + 1 :])
                    else f"is not a variant (known: {', '.join(last_method)})"
                )
                raise _problem(f"{variant.parent!r} {where}", "variants", index, "parent")
            before = last_method[variant.parent]
            origin = f" (the last step of parent {variant.parent!r})"
            if before and (problem := _after_final(before, variant.steps[0].method, origin)):
                raise _problem(problem, "variants", index, "steps", 0)
            last_method[variant.name] = variant.steps[-1].method
        return self


def step_key(variant_number: int, variant: str, step_number: int, method: str) -> str:
    """How messages name a step: ``compress.variants.2(int8-static).steps.1(quantize)``.

    Variants and steps are numbered from 1, as people count them (and as MLflow's
    ``steps.1.method`` params do), with the variant's name and the step's method beside.
    """
    return f"compress.variants.{variant_number}({variant}).steps.{step_number}({method})"
