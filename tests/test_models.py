"""The model spec and factory, and the distillation loss (fast: no Horovod, no files)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from models.factory import build_model, count_parameters
from models.spec import MODEL_FAMILIES, ModelSpec
from models.factory import BUILDERS
from tasks.training.losses import distillation_loss

IMAGE = (1, 8, 8)
FAMILIES = ("mlp", "cnn", "lstm", "gru", "transformer")


def test_every_family_has_a_builder() -> None:
    assert set(MODEL_FAMILIES) == set(FAMILIES) == set(BUILDERS)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("input_shape", [(1, 8, 8), (3, 28, 20)])
def test_each_family_maps_a_batch_of_images_to_logits(family: str, input_shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    model = build_model(ModelSpec(family=family), input_shape, num_classes=10).eval()
    with torch.inference_mode():
        logits = model(torch.randn(5, *input_shape))
    assert logits.shape == (5, 10) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("family", ["mlp", "lstm", "gru"])
def test_tabular_inputs_work_for_the_families_that_take_them(family: str) -> None:
    model = build_model(ModelSpec(family=family), (30,), num_classes=2).eval()
    with torch.inference_mode():
        assert model(torch.randn(4, 30)).shape == (4, 2)


def test_cnn_refuses_non_image_inputs_with_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"cnn needs image inputs \(C, H, W\)"):
        build_model(ModelSpec(family="cnn"), (30,), num_classes=2)


def test_unknown_family_is_refused_naming_the_known_ones() -> None:
    with pytest.raises(ValidationError, match="family") as caught:
        ModelSpec(family="resnet")
    assert "'mlp', 'cnn', 'lstm', 'gru' or 'transformer'" in str(caught.value)
    # A spec made without validation still fails clearly when built.
    with pytest.raises(ValueError, match="unknown model family 'resnet'; known: cnn, gru, lstm, mlp, transformer"):
        build_model(ModelSpec.model_construct(family="resnet"), IMAGE, num_classes=10)


@pytest.mark.parametrize(
    "changes", [{"width": 0.0}, {"width": 9.0}, {"channels": (8, 0)}, {"dropout": 1.0}, {"rnn_layers": 0}, {"depth": 3}]
)
def test_spec_ranges_are_checked(changes: dict) -> None:
    with pytest.raises(ValidationError):
        ModelSpec(**changes)


@pytest.mark.parametrize("family", FAMILIES)
def test_width_multiplier_scales_the_parameter_count(family: str) -> None:
    sizes = [count_parameters(build_model(ModelSpec(family=family, width=w), IMAGE, 10)) for w in (0.25, 0.5, 1.0, 2.0)]
    assert sizes == sorted(sizes) and len(set(sizes)) == 4, sizes
    assert sizes[0] < 0.25 * sizes[2]  # hidden sizes scale, so weights shrink faster than the width


def test_width_keeps_at_least_one_unit() -> None:
    model = build_model(ModelSpec(family="mlp", hidden_sizes=(4,), width=0.01), IMAGE, 10)
    assert model(torch.randn(2, *IMAGE)).shape == (2, 10)


def test_spec_round_trips_through_a_dict() -> None:
    spec = ModelSpec(family="cnn", width=0.5, channels=(8, 16, 32))
    assert ModelSpec.from_dict(spec.to_dict()) == spec
    assert ModelSpec.from_dict({**spec.to_dict(), "channels": [8, 16, 32]}) == spec  # JSON/YAML lists


def test_spec_dicts_saved_by_earlier_versions_still_load() -> None:
    """Checkpoints and manifests hold the spec as a dict (the dataclass's asdict, then JSON)."""
    saved = {"family": "mlp", "width": 0.5, "hidden_sizes": [64, 32], "channels": [32, 64],
             "rnn_hidden": 64, "rnn_layers": 1, "dropout": 0.1}
    spec = ModelSpec.from_dict(saved)
    assert spec == ModelSpec(family="mlp", width=0.5, hidden_sizes=(64, 32))
    # Fields added since take their defaults.
    assert spec.to_dict() == {**ModelSpec().to_dict(), **saved, "hidden_sizes": (64, 32), "channels": (32, 64)}


def test_spec_changes_are_validated_copies() -> None:
    spec = ModelSpec(family="cnn")
    assert spec.spec(width=0.5) == ModelSpec(family="cnn", width=0.5) and spec.width == 1.0
    with pytest.raises(ValidationError):
        spec.spec(family="resnet")
    with pytest.raises(ValidationError):
        spec.width = 2.0  # frozen


def test_the_spec_module_and_the_package_import_no_torch() -> None:
    """The params loader uses models.spec: it must stay light."""
    code = ("import sys, models, models.spec, tasks.core.config; assert 'torch' not in sys.modules;"
            "import models.factory; assert 'torch' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("family", ["lstm", "gru"])
@pytest.mark.parametrize("input_shape", [(1, 8, 8), (3, 5, 4)])
def test_recurrent_models_read_an_image_one_row_per_time_step(family: str, input_shape: tuple[int, ...]) -> None:
    channels, height, width = input_shape
    model = build_model(ModelSpec(family=family, rnn_hidden=16), input_shape, num_classes=10).eval()
    seen: list[torch.Tensor] = []
    model.rnn.register_forward_hook(lambda module, args, output: seen.append(args[0]))
    x = torch.randn(2, *input_shape)
    with torch.inference_mode():
        model(x)
    (sequence,) = seen
    assert sequence.shape == (2, height, channels * width)  # H steps of C*W features
    for row in range(height):
        assert torch.equal(sequence[:, row], x[:, :, row, :].reshape(2, channels * width))


def test_recurrent_model_output_depends_on_the_row_order() -> None:
    torch.manual_seed(0)
    model = build_model(ModelSpec(family="gru"), IMAGE, num_classes=10).eval()
    x = torch.randn(3, *IMAGE)
    with torch.inference_mode():
        assert not torch.allclose(model(x), model(x.flip(2)))


def test_a_transformer_whose_patches_leave_pixels_out_is_refused_before_training() -> None:
    """A 48-step, 3-feature sequence (an ``npz`` of ``(N, T, F)``) read as a 48x3 image by
    2x2 patches lost its third feature without a word; the checks before training refuse
    it, naming the key and the patch sizes that divide both sides. A model saved before
    still builds (it read what it read)."""
    from tasks.data import reading_problem

    spec = ModelSpec(family="transformer", embed_dim=16, heads=2, ffn_dim=16, layers=1)
    message = reading_problem(spec, (1, 48, 3), False, "prepare.path data/raw/sensors.npz")
    assert message == ("train.model.patch_size: transformer: patch_size 2 does not divide the 48x3 image: its "
                       "patches would leave out the last 1 column; patch sizes that divide both "
                       "sides: 1, 3 (prepare.path data/raw/sensors.npz)")
    assert reading_problem(spec.spec(patch_size=3), (1, 48, 3), False, "x") is None
    assert reading_problem(spec, (1, 28, 28), False, "x") is None
    assert "the last 1 row and 1 column;" in reading_problem(spec, (3, 7, 9), False, "x")
    assert "the last 2 rows;" in reading_problem(spec.spec(patch_size=3), (1, 8, 6), False, "x")
    model = build_model(spec, (1, 48, 3), 4)  # what was saved before this check still loads
    assert model.position.shape[1] == 24


def test_distillation_loss_vanishes_when_the_student_matches_the_teacher() -> None:
    logits = torch.randn(16, 10)
    labels = torch.randint(0, 10, (16,))
    loss = distillation_loss(logits, logits.clone(), labels, temperature=4.0, alpha=1.0)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)


def test_distillation_loss_is_plain_cross_entropy_when_alpha_is_zero() -> None:
    student, teacher = torch.randn(16, 10), torch.randn(16, 10)
    labels = torch.randint(0, 10, (16,))
    loss = distillation_loss(student, teacher, labels, temperature=4.0, alpha=0.0)
    assert loss.item() == pytest.approx(F.cross_entropy(student, labels).item(), rel=1e-6)


def test_distillation_loss_pulls_the_student_towards_the_teacher() -> None:
    torch.manual_seed(0)
    teacher = torch.randn(16, 10)
    labels = teacher.argmax(1)
    student = torch.zeros(16, 10, requires_grad=True)
    distillation_loss(student, teacher, labels, temperature=2.0, alpha=1.0).backward()
    # A step against the gradient moves the student's soft predictions towards the teacher's.
    with torch.no_grad():
        moved = student - 1.0 * student.grad
    before = F.kl_div(F.log_softmax(student.detach() / 2, 1), F.softmax(teacher / 2, 1), reduction="batchmean")
    after = F.kl_div(F.log_softmax(moved / 2, 1), F.softmax(teacher / 2, 1), reduction="batchmean")
    assert after < before
    assert distillation_loss(student, teacher, labels, temperature=2.0, alpha=1.0).item() > 0


def test_a_transformer_on_large_images_is_told_how_many_patches_it_attends_over() -> None:
    """64x64 colour images with the default 2x2 patches are 1,024 tokens an image, each
    attending to every other: a run that trains 16 times slower than 256 would, without a
    word. The train stage says so and names a patch size that divides both sides."""
    from models.spec import MANY_PATCHES, patch_count_note

    assert patch_count_note(ModelSpec(family="transformer"), (3, 64, 64)) == (
        "transformer: 1024 patches of 2x2 per 64x64 image, each attending to every other: about 16x the attention "
        "cost of 256 patches; train.model.patch_size=4 gives 256")
    assert patch_count_note(ModelSpec(family="transformer"), (3, 32, 32)) is None  # 256: at the line
    assert patch_count_note(ModelSpec(family="transformer", patch_size=4), (3, 64, 64)) is None
    assert patch_count_note(ModelSpec(family="transformer"), (1, 34, 34)).startswith(
        "transformer: 289 patches of 2x2 per 34x34 image, each attending to every other: about 1.3x")
    assert patch_count_note(ModelSpec(family="cnn"), (3, 64, 64)) is None
    assert patch_count_note(ModelSpec(family="transformer", vocab_size=100), (512,)) is None
    assert MANY_PATCHES == 256
