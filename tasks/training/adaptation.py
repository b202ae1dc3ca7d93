"""What a fit job may do to the model besides training it, generic hooks the loop applies
without knowing compression: start from saved weights, hold pruned weights at zero, train
with fake quantization.

Pruning masks are re-applied after every optimizer step: each rank's step is computed
from the same averaged gradients, so the weights the masks zero are zero, and identical,
on every rank after each step. (A gradient step moves the pruned entries off zero and the
mask puts them back; the entries the mask keeps take exactly the step they would take
under ``torch.nn.utils.prune``'s re-parametrisation, weight = weight_orig * mask, since
the forward pass saw zeros there and AdamW updates each entry on its own.) Keeping plain
parameters keeps the state_dict, checkpoints, broadcasts and QAT fusion as they are.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tasks.training import qat
from tasks.training.job import FitJob


def load_initial_weights(model: nn.Module, folder: Path) -> None:
    """Load a torch-state-dict model folder's weights into ``model`` (same spec, strictly)."""
    payload = torch.load(folder / "model.pt", map_location="cpu", weights_only=True)
    model.load_state_dict(payload["state_dict"])


@dataclass(frozen=True)
class PruneMasks:
    """Parameters and the masks that hold their pruned entries at zero."""

    pairs: tuple[tuple[str, nn.Parameter, torch.Tensor], ...]

    @classmethod
    def load(cls, path: Path, model: nn.Module, prefix: str = "") -> PruneMasks:
        """Masks saved as {parameter name: bool tensor}, matched to ``model``'s parameters
        (named ``prefix + name`` there, e.g. in a QAT-prepared model)."""
        masks = torch.load(path, map_location="cpu", weights_only=True)
        parameters = dict(model.named_parameters())
        pairs = []
        for name, mask in masks.items():
            parameter = parameters.get(prefix + name)
            if parameter is None or parameter.shape != mask.shape:
                raise ValueError(f"{path}: mask {name!r} matches no parameter of that shape in the model")
            pairs.append((name, parameter, mask.to(parameter.device, torch.bool)))
        return cls(tuple(pairs))

    def apply(self) -> None:
        """Zero every pruned entry (in place, no autograd)."""
        with torch.no_grad():
            for _, parameter, mask in self.pairs:
                parameter.masked_fill_(~mask, 0.0)

    def raise_to(self, sparsity: float) -> None:
        """Global magnitude pruning: extend the masks so that ``sparsity`` of all the masked
        parameters' entries are pruned (already pruned entries stay pruned). Every rank holds
        the same weights, so every rank computes the same masks."""
        with torch.no_grad():
            flat = torch.cat([parameter.detach().abs().reshape(-1).cpu() for _, parameter, _ in self.pairs])
            kept = torch.cat([mask.reshape(-1).cpu() for _, _, mask in self.pairs])
            target = int(round(sparsity * flat.numel()))
            if target <= int((~kept).sum()):
                return
            # pruned entries first (they are zero anyway), then by magnitude; stable: ties by position
            order = torch.argsort(torch.where(kept, flat, torch.full_like(flat, -1.0)), stable=True)
            keep = torch.ones_like(kept)
            keep[order[:target]] = False
            start, pairs = 0, []
            for name, parameter, mask in self.pairs:
                count = mask.numel()
                pairs.append((name, parameter, keep[start : start + count].reshape(mask.shape).to(mask.device)))
                start += count
            object.__setattr__(self, "pairs", tuple(pairs))
        self.apply()

    def sparsity(self) -> float:
        total = sum(mask.numel() for _, _, mask in self.pairs)
        return sum(int((~mask).sum()) for _, _, mask in self.pairs) / total if total else 0.0

    def violations(self) -> int:
        """Pruned entries that are not zero (0 whenever the masks hold)."""
        return sum(int((parameter.detach()[~mask] != 0).sum()) for _, parameter, mask in self.pairs)


class Adaptation:
    """The job's hooks on the model: built once per worker, applied by the loop."""

    def __init__(self, job: FitJob) -> None:
        self.job = job
        self.masks: PruneMasks | None = None

    @property
    def qat(self) -> bool:
        return self.job.qat is not None

    def prepare(self, model: nn.Module, device: torch.device) -> nn.Module:
        """Initial weights, QAT preparation, masks: the model training starts from, on ``device``."""
        if self.job.init_from:
            load_initial_weights(model, Path(self.job.init_from))
        if self.qat:
            model = qat.prepare_qat_model(model, self.job.qat)
        model = model.to(device)
        if self.job.prune_masks:  # on the parameters' device
            self.masks = PruneMasks.load(Path(self.job.prune_masks), model, qat.MODEL_PREFIX if self.qat else "")
            self.masks.apply()
        return model

    def before_epoch(self, epoch: int) -> None:
        """At the start of epoch ``epoch`` (from 0): gradual pruning raises the masks to the
        schedule's sparsity (after a resume, the zeros already there count as pruned)."""
        if self.masks is not None and self.job.prune_schedule:
            self.masks.raise_to(self.job.prune_schedule[epoch])

    def after_step(self) -> None:
        """After every optimizer step: the pruned weights back to exactly zero."""
        if self.masks is not None:
            self.masks.apply()

    def after_buffer_sync(self, hvd: Any, model: nn.Module) -> None:
        """After the epoch's buffer averaging: fake-quantization parameters from the averaged observers."""
        if self.qat:
            qat.average_observers(hvd, model)

    def evaluating(self, model: nn.Module) -> contextlib.AbstractContextManager:
        """Around validation: QAT observers must not learn from the validation split."""
        return qat.observers_paused(model) if self.qat else contextlib.nullcontext()

    @contextlib.contextmanager
    def as_started(self, model: nn.Module) -> Iterator[None]:
        """The model as training starts from it, to validate once before the first epoch:
        for QAT, the fp32 model (nothing observed yet), otherwise the model itself (masked)."""
        with qat.fake_quant_off(model) if self.qat else contextlib.nullcontext():
            yield

    def check(self, model: nn.Module) -> dict[str, Any]:
        """This rank's evidence at the end: a digest of its weights and the masks' violations."""
        digest = hashlib.sha256()
        for name, tensor in model.state_dict().items():
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return {"weights_sha256": digest.hexdigest(), "masked_nonzeros": self.masks.violations() if self.masks else None}
