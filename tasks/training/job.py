"""The fit job: everything a worker needs, written to JSON by the launching stage.

One job type runs every training of the pipeline: the baseline, and the compression
methods that train (distillation, pruning and quantization-aware fine-tuning). What sets
those apart are generic hooks the loop applies without knowing compression: start from
saved weights (``init_from``), hold pruned weights at zero (``prune_masks``), train with
fake quantization (``qat``), learn from a ``teacher``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tasks.core.config import TrainParams

_PACKAGE = Path(__file__).resolve().parent
# The code whose change makes a checkpoint stale (resuming it would mix two programs): the
# worker's modules and the models. The launcher only starts workers, so it is left out.
_CODE_FILES = (
    *sorted(p for p in _PACKAGE.glob("*.py") if p.name not in {"__init__.py", "launcher.py"}),
    *sorted((_PACKAGE.parents[1] / "models").glob("*.py")),
)

MONITORS = ("val_loss", "val_accuracy")


@dataclass(frozen=True)
class FitJob:
    """Everything a worker needs; written to JSON by the launching stage."""

    spec: dict[str, Any]
    prepared: str
    output: str  # model folder written by rank 0 from the best checkpoint
    checkpoints: str
    epochs: int
    batch_size: int  # per worker: the global batch is batch_size x world size
    lr: float  # per worker: scaled by the world size after the warm-up
    seed: int
    weight_decay: float = 0.0
    warmup_epochs: int = 1
    # The warm-up's first learning rate as a share of ``lr`` (None: by model family,
    # tasks.training.loop.WARMUP_START).
    warmup_start: float | None = None
    patience: int = 5
    fp16_allreduce: bool = False
    backward_passes_per_step: int = 1
    allreduce_groups: int | str = "auto"  # see tasks.training.distributed.allreduce_groups()
    mixed_precision: str = "auto"  # auto (bf16 on GPUs) | off | bf16
    channels_last: str = "auto"  # auto (on for GPUs) | off | on
    teacher: str | None = None  # model folder of the teacher (distillation)
    temperature: float = 4.0
    alpha: float = 0.7  # weight of the soft-target loss
    # A torch-state-dict model folder whose weights training starts from (its spec is ``spec``).
    init_from: str | None = None
    # A file of {parameter name: bool mask} (torch.save): the weights where the mask is False
    # are zero from the start and set to zero again after every optimizer step, on every rank.
    prune_masks: str | None = None
    # Gradual pruning (needs ``prune_masks``): the global sparsity of the masked parameters
    # at the start of each epoch (one entry per epoch, non-decreasing); at each epoch start
    # the smallest-magnitude weights are added to the masks up to that share. Epochs before
    # the last entry's sparsity is reached cannot be the best epoch (the output must have it).
    prune_schedule: list[float] | None = None
    # A torch.ao quantized engine (x86, fbgemm, qnnpack): train with fake quantization
    # (prepare_qat) for it; the output is the QAT model's state (format torch-qat-state-dict).
    qat: str | None = None
    monitor: str = "val_loss"  # val_loss | val_accuracy: what early stopping and the best checkpoint follow
    run_id: str | None = None  # MLflow run that rank 0's params and metrics go into
    metric_prefix: str = ""  # prefix of rank 0's MLflow params and metrics (e.g. "fine_tune/")
    # Where rank 0 appends them (JSON lines) for the launching stage to log: set by the
    # launcher (tasks.training.pool) when there is a run_id.
    events_path: str | None = None
    metrics_path: str | None = None  # summary metrics (JSON) written by rank 0
    history_path: str | None = None  # per-epoch history (JSON list) written by rank 0
    manifest: dict[str, Any] = field(default_factory=dict)
    fault_after_epoch: int | None = None  # tests only: see tasks.training.fault

    def fingerprint(self, world_size: int) -> str:
        """What must match for a checkpoint to be resumed: settings, world size, data and code.

        The files a job starts from (initial weights, masks, teacher) count by their
        content, not their path: a stage that writes them again, identically, resumes.
        """
        ignored = {"run_id", "fault_after_epoch", "metrics_path", "history_path", "metric_prefix", "events_path"}
        keys: dict[str, Any] = {k: v for k, v in asdict(self).items() if k not in ignored}
        for name in ("init_from", "prune_masks", "teacher"):
            if keys[name]:
                keys[name] = _content_digest(Path(keys[name]))
        keys["world_size"] = world_size
        card = Path(self.prepared) / "card.json"
        keys["data"] = card.read_text() if card.exists() else ""
        keys["code"] = [hashlib.sha256(path.read_bytes()).hexdigest() for path in _CODE_FILES]
        return hashlib.sha256(json.dumps(keys, sort_keys=True, default=str).encode()).hexdigest()

    def __post_init__(self) -> None:
        if self.monitor not in MONITORS:
            raise ValueError(f"FitJob.monitor: expected one of {', '.join(MONITORS)}, got {self.monitor!r}")
        if self.prune_schedule is not None:
            schedule = list(self.prune_schedule)
            if not self.prune_masks:
                raise ValueError("FitJob.prune_schedule needs prune_masks (the parameters it prunes)")
            if len(schedule) != self.epochs or any(not 0.0 <= s < 1.0 for s in schedule) or schedule != sorted(schedule):
                raise ValueError(
                    f"FitJob.prune_schedule: expected {self.epochs} non-decreasing sparsities in [0, 1), got {schedule}"
                )

    def eligible(self, epoch: int) -> bool:
        """Whether finished ``epoch`` (from 1) may be the best epoch: under gradual pruning,
        only once the final sparsity is in force."""
        if not self.prune_schedule:
            return True
        return self.prune_schedule[epoch - 1] >= self.prune_schedule[-1]

    @classmethod
    def from_train(cls, train: TrainParams, **job: Any) -> FitJob:
        """A job with ``train``'s shared training settings (batch size, schedule, Horovod and
        hardware options); ``job`` gives the rest (spec, data, folders, epochs, lr, seed,
        hooks) and may override any of them (e.g. ``warmup_epochs`` for a short fine-tune)."""
        shared = {
            "batch_size": train.batch_size, "lr": train.lr, "epochs": train.epochs,
            "weight_decay": train.weight_decay, "warmup_epochs": train.warmup_epochs, "patience": train.patience,
            "monitor": train.monitor,
            "fp16_allreduce": train.fp16_allreduce, "backward_passes_per_step": train.backward_passes_per_step,
            "allreduce_groups": train.allreduce_groups, "mixed_precision": train.mixed_precision,
            "channels_last": train.channels_last,
        }
        return cls(**{**shared, **job})

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    def write(self, path: Path) -> None:
        path.write_text(self.to_json())

    @classmethod
    def read(cls, path: Path) -> FitJob:
        return cls(**json.loads(path.read_text()))


def _content_digest(path: Path) -> str:
    """sha256 of a file, or of a model folder's ``model.pt``; "missing" when absent."""
    target = path / "model.pt" if path.is_dir() else path
    return hashlib.sha256(target.read_bytes()).hexdigest() if target.is_file() else "missing"
