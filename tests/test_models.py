"""The model registry and the distillation loss (fast: no Horovod, no files)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models import MODEL_FAMILIES, ModelSpec, build_model, count_parameters
from tasks.fit import distillation_loss

IMAGE = (1, 8, 8)
FAMILIES = ("mlp", "cnn", "lstm", "gru")


def test_every_family_is_registered() -> None:
    assert set(MODEL_FAMILIES) == set(FAMILIES)


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


def test_unknown_family_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match="unknown model family 'transformer'; known: cnn, gru, lstm, mlp"):
        build_model(ModelSpec(family="transformer"), IMAGE, num_classes=10)


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
