"""The training losses: cross-entropy, or knowledge distillation from a teacher."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def distillation_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, temperature: float, alpha: float
) -> torch.Tensor:
    """Hinton et al.: alpha * T^2 * KL(soft teacher || soft student) + (1 - alpha) * CE."""
    soft = F.kl_div(
        F.log_softmax(student_logits / temperature, dim=1),
        F.softmax(teacher_logits / temperature, dim=1),
        reduction="batchmean",
    ) * temperature**2
    return alpha * soft + (1.0 - alpha) * F.cross_entropy(student_logits, labels)


def training_loss(teacher: nn.Module | None, temperature: float, alpha: float) -> LossFn:
    """``loss(logits, inputs, labels)``: cross-entropy, or distillation when there is a teacher."""

    def loss_of(logits: torch.Tensor, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        if teacher is None:
            return F.cross_entropy(logits, yb)
        with torch.no_grad():
            teacher_logits = teacher(xb).float()
        return distillation_loss(logits, teacher_logits, yb, temperature, alpha)

    return loss_of
