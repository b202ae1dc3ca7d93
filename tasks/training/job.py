"""The fit job: everything a worker needs, written to JSON by the launching stage."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

_PACKAGE = Path(__file__).resolve().parent
# The code whose change makes a checkpoint stale (resuming it would mix two programs): the
# worker's modules and the models. The launcher only starts workers, so it is left out.
_CODE_FILES = (
    *sorted(p for p in _PACKAGE.glob("*.py") if p.name not in {"__init__.py", "launcher.py"}),
    *sorted((_PACKAGE.parents[1] / "models").glob("*.py")),
)


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
    patience: int = 5
    fp16_allreduce: bool = False
    backward_passes_per_step: int = 1
    allreduce_groups: int | str = "auto"  # see tasks.training.distributed.allreduce_groups()
    mixed_precision: str = "auto"  # auto (bf16 on GPUs) | off | bf16
    channels_last: str = "auto"  # auto (on for GPUs) | off | on
    teacher: str | None = None  # model folder of the teacher (distillation)
    temperature: float = 4.0
    alpha: float = 0.7  # weight of the soft-target loss
    run_id: str | None = None  # MLflow run that rank 0 logs into
    metrics_path: str | None = None  # summary metrics (JSON) written by rank 0
    history_path: str | None = None  # per-epoch history (JSON list) written by rank 0
    manifest: dict[str, Any] = field(default_factory=dict)
    fault_after_epoch: int | None = None  # tests only: see tasks.training.fault

    def fingerprint(self, world_size: int) -> str:
        """What must match for a checkpoint to be resumed: settings, world size, data and code."""
        ignored = {"run_id", "fault_after_epoch", "metrics_path", "history_path"}
        keys: dict[str, Any] = {k: v for k, v in asdict(self).items() if k not in ignored}
        keys["world_size"] = world_size
        card = Path(self.prepared) / "card.json"
        keys["data"] = card.read_text() if card.exists() else ""
        keys["code"] = [hashlib.sha256(path.read_bytes()).hexdigest() for path in _CODE_FILES]
        return hashlib.sha256(json.dumps(keys, sort_keys=True, default=str).encode()).hexdigest()

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2, sort_keys=True))

    @classmethod
    def read(cls, path: Path) -> FitJob:
        return cls(**json.loads(path.read_text()))
