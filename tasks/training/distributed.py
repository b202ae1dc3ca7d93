"""What each Horovod worker sets up for itself: threads, seeds, device, allreduce groups,
the learning-rate multiplier and the collectives that keep the ranks' metrics identical."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from tasks.core.energy import EnergyMeter, Joules, process_meter, rapl_readable
from tasks.training.launcher import THREADS_ENV, threads_per_worker

log = logging.getLogger("slimflow.fit")
_said: set[str] = set()


def log_once(message: str, *args: Any) -> None:
    """``log.info`` a line this worker has not logged yet: a worker of the compress stage's
    pool trains every fine-tune in turn, with the same device and, mostly, the same settings."""
    line = message % args
    if line not in _said:
        _said.add(line)
        log.info("%s", line)


def set_threads(local_workers: int) -> int:
    """Set torch's (OpenMP) intra-op threads: the launcher's choice, else usable cores // local workers.

    Workers that each use every core oversubscribe the machine (28x slower measured
    here), so this runs before any tensor work.
    """
    configured = int(os.environ.get(THREADS_ENV) or 0) or None
    threads = threads_per_worker(local_workers, configured)
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)  # for anything started later
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set, or inter-op work already started
        pass
    return threads


def start_meter(local_rank: int) -> EnergyMeter:
    """This rank's energy meter: the GPU it is pinned to (one per local rank), else the CPU.

    Summed over the ranks, every GPU counts once; the RAPL package counters (the whole
    package, shared by the host's ranks) count on local rank 0 only.
    """
    gpu = local_rank if torch.cuda.is_available() else None
    return process_meter(gpu_index=gpu, count_cpu=local_rank == 0 or not rapl_readable())


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


@dataclass(frozen=True)
class Placement:
    """This worker's place in the job: rank, world size and the device it computes on."""

    rank: int
    size: int
    local_rank: int
    device: torch.device

    @property
    def use_cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def is_root(self) -> bool:
        return self.rank == 0


def place_worker(hvd: Any) -> Placement:
    """Pin this worker to its GPU (one per local rank), or the CPU when there is none."""
    rank, size, local_rank = hvd.rank(), hvd.size(), hvd.local_rank()
    if torch.cuda.is_available():
        # Horovod: pin one GPU per local rank.
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        if rank == 0:
            log_once("CUDA: one GPU per local rank, collectives over %s",
                     "NCCL" if hvd.nccl_built() else "Gloo (this Horovod was built without NCCL)")
    else:
        device = torch.device("cpu")
        if rank == 0:
            log_once("no CUDA GPU found: training on CPU, Gloo collectives")
    return Placement(rank, size, local_rank, device)


def autocast_factory(device: torch.device, bf16: bool) -> Callable[[], contextlib.AbstractContextManager]:
    """``autocast()`` contexts for ``device``: bf16 when asked, else a no-op."""

    def autocast() -> contextlib.AbstractContextManager:
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

    return autocast


def allreduce_groups(setting: int | str, use_cuda: bool) -> int | None:
    """Horovod's ``groups`` for DistributedOptimizer: None (one allreduce per gradient) or N groups.

    ``"auto"``: on GPUs, one allreduce per gradient as soon as backward produces it, so
    communication overlaps the rest of the backward pass (Horovod's default). On CPU
    workers every core is already computing, so there is nothing to overlap with: each
    extra allreduce only costs a Horovod cycle and a Gloo exchange that preempt the
    backward pass, and one fused allreduce of all gradients per step is faster (measured
    here, 2 workers on 2 cores, 28x28 CNN: 5-9% more samples/s, paired in one job).
    """
    if setting == "auto":
        return None if use_cuda else 1
    return int(setting) or None


def lr_multiplier(step: int, warmup_steps: int, total_steps: int, world_size: int, start: float = 1.0) -> float:
    """Learning-rate multiplier per optimizer step.

    Ramps linearly from ``start`` to ``world_size`` over the warm-up (Goyal et al., 2017: the
    global batch is ``world_size`` times larger; transformers also need a gentle start, so
    theirs starts below 1), then decays to 0.1 x that by a cosine.
    """
    if warmup_steps and step < warmup_steps:
        return start + (world_size - start) * step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return world_size * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def gather_epoch_metrics(
    hvd: Any, train_counts: tuple[float, float, float], val_counts: tuple[float, float, float], epoch_time: float,
    energy: Joules = Joules(),
) -> dict[str, float]:
    """Global epoch metrics from every rank's (loss sum, correct, count), time and energy.

    Horovod: one allgather (a row per rank), so every rank sees identical global metrics
    (and stops together). The epoch's energy is every rank's, summed.
    """
    local = torch.tensor([[*train_counts, *val_counts, epoch_time, energy.total]], dtype=torch.float64)
    rows = hvd.allgather(local, name="epoch_metrics")
    sums = rows[:, :6].sum(0).tolist()
    slowest = rows[:, 6].max().item()  # the epoch lasts as long as its slowest rank
    return {
        "train_loss": sums[0] / sums[2],
        "train_accuracy": sums[1] / sums[2],
        "val_loss": sums[3] / sums[5],
        "val_accuracy": sums[4] / sums[5],
        "epoch_time_s": slowest,
        "samples_per_s": sums[2] / slowest,  # global: every rank's samples
        "epoch_energy_j": rows[:, 7].sum().item(),
    }


def gather_energy(hvd: Any, meter: EnergyMeter, since: Joules | None = None) -> dict[str, Any]:
    """Every rank's energy since ``since`` (a reading of its meter; None: since the meter
    started), summed (on every rank), and how it was obtained."""
    joules = meter.read() - since if since is not None else meter.read()
    rows = hvd.allgather_object({"joules": joules.as_list(), "source": meter.source}, name="energy_totals")
    cpu, gpu = (sum(row["joules"][i] for row in rows) for i in (0, 1))
    sources = sorted({row["source"] for row in rows})
    return {"train_energy_j": cpu + gpu, "train_energy_cpu_j": cpu, "train_energy_gpu_j": gpu,
            "energy_source": "; ".join(sources)}
