"""Checkpoints: rank 0 writes one every epoch; a run started again with the same settings
resumes from it and ends with the same model as an uninterrupted run.

``last.pt`` holds the model, optimizer, scheduler, progress, the RNG states of every rank
and the fingerprint of the settings, world size, data and code that made it; ``best.pt``
the weights of the best epoch so far. Both are replaced atomically.

Both are read with ``torch.load(weights_only=True)``: loading a checkpoint runs no pickled
code, so everything in them is a tensor or a plain value (numbers, strings, lists, tuples,
dicts). The one RNG state that is not (numpy's keys array) is stored as a list of ints.
"""

from __future__ import annotations

import logging
import math
import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tasks.training.distributed import Placement
from tasks.training.job import FitJob

log = logging.getLogger("slimflow.fit")

CHECKPOINT = "last.pt"
BEST = "best.pt"


def fresh_state() -> dict[str, Any]:
    """The progress of a run that has not trained yet (what a checkpoint's ``state`` holds).

    ``best_val_accuracy`` / ``best_val_loss`` are those of the best epoch by the job's
    ``monitor``; ``start`` is the validation figures of the model training started from
    (jobs with ``init_from``), measured once before the first epoch.
    """
    return {
        "epoch": 0, "best_val_loss": math.inf, "best_val_accuracy": -math.inf, "bad_epochs": 0,
        "history": [], "run_id": None, "start": None,
    }


def rng_state() -> dict[str, Any]:
    """This process's RNG states, as values ``torch.load(weights_only=True)`` reads back."""
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    return {
        "python": random.getstate(),  # (version, tuple of ints, float or None)
        "numpy": [name, keys.tolist(), position, has_gauss, cached_gaussian],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
    }


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, keys, position, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached_gaussian))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def atomic_save(obj: Any, path: Path) -> None:
    """Write ``obj`` to ``path`` so a crash leaves either the old file or the new one."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def read_checkpoint(path: Path, fingerprint: str) -> dict[str, Any] | None:
    """The checkpoint at ``path`` if this very job made it and did not finish, else None."""
    if not path.exists():
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a torn or foreign file (or one holding pickled code): train from scratch
        log.warning("ignoring checkpoint %s: unreadable (%s)", path, err)
        return None
    if saved.get("fingerprint") != fingerprint:
        log.info("ignoring checkpoint %s: made by other settings, data, code or world size", path)
        return None
    if saved.get("complete"):
        log.info("ignoring checkpoint %s: that training finished; training again", path)
        return None
    return saved


@dataclass(frozen=True)
class Checkpoints:
    """The checkpoint folder of one job at one world size."""

    job: FitJob
    folder: Path
    fingerprint: str

    @classmethod
    def of(cls, job: FitJob, world_size: int) -> Checkpoints:
        return cls(job, Path(job.checkpoints), job.fingerprint(world_size))

    def resume(self, hvd: Any, place: Placement, model: nn.Module, optimizer: Any, scheduler: Any) -> dict[str, Any]:
        """The progress to continue from, identical on every rank, with the model, optimizer,
        scheduler and RNGs restored (or seeded afresh); ends with every rank holding rank 0's weights."""
        # Rank 0 reads the last checkpoint if this very job made it and training did not
        # finish; what it holds reaches every rank through the broadcasts below.
        state, rng_states = fresh_state(), None
        if place.is_root and (saved := read_checkpoint(self.folder / CHECKPOINT, self.fingerprint)) is not None:
            model.load_state_dict(saved["model"])
            optimizer.load_state_dict(saved["optimizer"])
            scheduler.load_state_dict(saved["scheduler"])
            state, rng_states = saved["state"], saved["rng"]
            log.info("resuming from checkpoint at epoch %d of %d (the last one completed); continuing with epoch %d",
                     state["epoch"], self.job.epochs, state["epoch"] + 1)
        state = hvd.broadcast_object(state, root_rank=0, name="state")
        rng_states = hvd.broadcast_object(rng_states, root_rank=0, name="rng")
        if rng_states is not None:
            # Horovod: rank 0's optimizer state (Adam moments, step counts) and schedule.
            # A fresh run skips this: its optimizers are already identical everywhere, and
            # Horovod would first take a zero-gradient step to create the state, which
            # advances Adam's step count (and applies weight decay) before training starts.
            hvd.broadcast_optimizer_state(optimizer, root_rank=0)
            scheduler.load_state_dict(hvd.broadcast_object(scheduler.state_dict(), root_rank=0, name="scheduler"))
            restore_rng(rng_states[place.rank])
        else:
            torch.manual_seed(self.job.seed + place.rank)  # per-rank dropout streams
        # Horovod: every rank starts from rank 0's parameters and buffers (last, so nothing
        # above can leave the ranks' weights apart).
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        return state

    def save(
        self, model: nn.Module, optimizer: Any, scheduler: Any, state: dict[str, Any], all_rng: list[Any],
        metrics: dict[str, float], improved: bool, complete: bool,
    ) -> None:
        """Rank 0, after epoch ``state["epoch"]``: the best weights if they improved, and the resume state."""
        self.folder.mkdir(parents=True, exist_ok=True)
        if improved:
            atomic_save({"model": model.state_dict(), "epoch": state["epoch"], "metrics": metrics}, self.folder / BEST)
        atomic_save({
            "fingerprint": self.fingerprint, "complete": complete, "model": model.state_dict(),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "state": state, "rng": all_rng, "job": asdict(self.job),
        }, self.folder / CHECKPOINT)

    def load_best(self) -> dict[str, Any]:
        return torch.load(self.folder / BEST, map_location="cpu", weights_only=True)
