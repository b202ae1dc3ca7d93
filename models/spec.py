"""The one declaration of a model's architecture settings (no torch: the params loader uses it).

``train.model`` in ``params.yaml`` is a :class:`ModelSpec`; checkpoints and manifests
store it as a plain dict (:meth:`ModelSpec.to_dict`) and :meth:`ModelSpec.from_dict`
reads it back. :func:`models.factory.build_model` builds the network it describes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field

ModelFamily = Literal["mlp", "cnn", "lstm", "gru", "transformer"]
# Every family :func:`models.factory.build_model` builds.
MODEL_FAMILIES: tuple[str, ...] = get_args(ModelFamily)
# The families that read token ids (text): lstm/gru through an embedding front end.
TOKEN_FAMILIES: tuple[str, ...] = ("lstm", "gru", "transformer")
# The recurrent families (:class:`models.rnn.RecurrentClassifier`).
RECURRENT_FAMILIES: tuple[str, ...] = ("lstm", "gru")

Size = Annotated[int, Field(ge=1)]


class ModelSpec(BaseModel):
    """Architecture settings. ``width`` multiplies every hidden size (students use < 1)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    family: ModelFamily = "cnn"
    width: float = Field(1.0, gt=0.0, le=8.0)
    hidden_sizes: tuple[Size, ...] = (256, 128)  # mlp
    channels: tuple[Size, ...] = (32, 64)  # cnn
    rnn_hidden: int = Field(64, ge=1)  # lstm / gru
    rnn_layers: int = Field(1, ge=1)
    # Token inputs (text): the tokenizer's vocabulary size. Left null in params.yaml: the
    # training job sets it from the prepared data (tokenizer.json), and saved models keep it.
    vocab_size: int | None = Field(None, ge=2)
    embed_dim: int = Field(64, ge=1)  # lstm / gru token embedding; transformer model width (x width)
    heads: int = Field(4, ge=1)  # transformer attention heads
    head_dim: int | None = Field(None, ge=1)  # per head (null: embed_dim x width / heads)
    ffn_dim: int = Field(128, ge=1)  # transformer feed-forward units (x width)
    layers: int = Field(2, ge=1)  # transformer encoder layers
    patch_size: int = Field(2, ge=1)  # transformer on images: ViT-style square patches
    dropout: float = Field(0.1, ge=0.0, lt=1.0)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        """A spec from a dict (JSON/YAML lists become tuples), validated."""
        return cls.model_validate(data)

    def spec(self, **changes: Any) -> ModelSpec:
        """This spec with ``changes``, validated (``train.model.spec(width=0.5)``)."""
        return self.model_validate({**self.model_dump(), **changes})


def input_problem(spec: ModelSpec, input_shape: Sequence[int], whole_patches: bool = False) -> tuple[str, str] | None:
    """Why a model of ``spec`` cannot read inputs of ``input_shape`` (no batch dimension;
    token ids when ``spec.vocab_size`` is set): the setting at fault (``"family"``,
    ``"vocab_size"`` or ``"patch_size"``) and the problem; None if it can. The one statement
    of what each family reads: :func:`models.factory.build_model` refuses with it, and the
    train stage and the pipeline's checks use it before any worker starts.

    ``whole_patches`` (the checks before training): a transformer's ``patch_size`` must
    divide the image's sides, or its strided patches leave the last rows/columns out (a
    48-step, 3-feature sequence read as a 48x3 image lost its third feature to 2x2 patches).
    Zero-padding them to whole patches instead was measured and lost 5-6 points on test
    there (two seeds); models saved before still build (the default leaves this out)."""
    shape = tuple(int(size) for size in input_shape)
    if spec.vocab_size is not None:
        if spec.family not in TOKEN_FAMILIES:
            return "family", f"{spec.family} does not read token ids (text)"
        if len(shape) != 1:
            return "vocab_size", f"{spec.family} with vocab_size reads token ids (L,), got input shape {shape}"
        return None
    if spec.family == "cnn" and len(shape) != 3:
        return "family", f"cnn needs image inputs (C, H, W), got input shape {shape}"
    if spec.family == "transformer":
        if len(shape) != 3:
            return "family", f"transformer needs token ids (a text source) or image inputs (C, H, W), got input shape {shape}"
        if spec.patch_size > min(shape[1:]):
            return "patch_size", f"transformer: patch_size {spec.patch_size} is larger than the image ({shape[1]}x{shape[2]})"
        if whole_patches and (shape[1] % spec.patch_size or shape[2] % spec.patch_size):
            left = " and ".join(f"{count} {side}{'s' if count > 1 else ''}" for count, side in
                                ((shape[1] % spec.patch_size, "row"), (shape[2] % spec.patch_size, "column")) if count)
            dividing = [size for size in range(1, min(shape[1:]) + 1) if shape[1] % size == 0 == shape[2] % size]
            return "patch_size", (f"transformer: patch_size {spec.patch_size} does not divide the {shape[1]}x{shape[2]} "
                                  f"image: its patches would leave out the last {left}; patch sizes that divide "
                                  f"both sides: {', '.join(map(str, dividing))}")
    return None  # mlp flattens anything; lstm/gru read an image row by row, a row of features one by one


# A transformer on images attends over every patch, at a cost that grows with their square.
# Above this many patches per image (a ViT at 224x224 with 16x16 patches reads 196) the train
# stage says so, and names a patch size that divides both sides and gives no more.
MANY_PATCHES = 256


def patch_count_note(spec: ModelSpec, input_shape: Sequence[int]) -> str | None:
    """What the train stage says where a ``transformer`` cuts each ``(C, H, W)`` image into
    more than :data:`MANY_PATCHES` patches; None otherwise (other families, token ids)."""
    if spec.family != "transformer" or spec.vocab_size is not None or len(input_shape) != 3:
        return None
    _, height, width = (int(d) for d in input_shape)
    size = spec.patch_size
    patches = (height // size) * (width // size)
    if patches <= MANY_PATCHES:
        return None
    fewer = next((p for p in range(size + 1, min(height, width) + 1)
                  if height % p == 0 == width % p and (height // p) * (width // p) <= MANY_PATCHES), None)
    hint = (f"; train.model.patch_size={fewer} gives {(height // fewer) * (width // fewer)}" if fewer else "")
    return (f"transformer: {patches} patches of {size}x{size} per {height}x{width} image, each attending to every "
            f"other: about {(patches / MANY_PATCHES) ** 2:.2g}x the attention cost of {MANY_PATCHES} patches{hint}")


def families_reading(input_shape: Sequence[int], tokens: bool = False) -> tuple[str, ...]:
    """The families that read inputs of ``input_shape`` (token ids if ``tokens``) with their default settings."""
    return tuple(family for family in MODEL_FAMILIES
                 if input_problem(ModelSpec(family=family, vocab_size=2 if tokens else None), input_shape) is None)


__all__ = ["MODEL_FAMILIES", "RECURRENT_FAMILIES", "TOKEN_FAMILIES", "ModelFamily", "ModelSpec", "families_reading", "input_problem"]
