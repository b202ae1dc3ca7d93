"""The Horovod data-parallel fit loop, run by every worker: epochs, evaluation, early stopping.

It follows Horovod's own order (examples/pytorch/pytorch_mnist.py): shard with
DistributedSampler, scale the learning rate by the world size, wrap the optimizer in
DistributedOptimizer, broadcast parameters and optimizer state from rank 0,
``set_epoch`` every epoch, average metrics with allreduce; only rank 0 logs and writes
files. With a ``teacher`` it trains a student by knowledge distillation on the same loop;
with ``init_from``, ``prune_masks`` or ``qat`` it fine-tunes a compressed model
(:mod:`tasks.training.adaptation`). (Init, threads and seeds come first, in
:mod:`tasks.training.worker`.)
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data.distributed import DistributedSampler

from models.factory import build_model
from models.spec import ModelSpec
from tasks.core.model_files import load_eager_model, save_state_dict_model
from tasks.data import Preprocessing, spec_for_data
from tasks.training import fault
from tasks.training.adaptation import Adaptation
from tasks.training.checkpoint import Checkpoints, rng_state
from tasks.core.energy import Joules, process_meter
from tasks.training.distributed import (
    Placement, allreduce_groups, autocast_factory, gather_energy, gather_epoch_metrics, log_once, lr_multiplier,
    place_worker,
)
from tasks.training.job import FitJob
from tasks.training.losses import LossFn, training_loss
from tasks.training.reporting import EventLog, late_val_accuracy_gain_pts, missed_val_accuracy, summary, write_json
from tasks.training.shards import Shards, load_shards

log = logging.getLogger("slimflow.fit")

VAL_BATCH = 1024
# Where the warm-up starts, as a share of the learning rate, by model family (the rest: 1,
# a warm-up that only scales to the world size). Transformers diverge or stall on a full
# learning rate at their first steps (post-LN and pre-LN alike benefit from a ramp).
WARMUP_START = {"transformer": 0.05}


@dataclass(frozen=True)
class Trainer:
    """Everything an epoch needs, built once per worker by :func:`build_trainer`."""

    job: FitJob
    hvd: Any
    place: Placement
    data: Shards
    spec: ModelSpec
    model: nn.Module
    loss_of: LossFn
    sampler: DistributedSampler
    optimizer: Any
    scheduler: Any
    groups: int | None
    bf16: bool
    channels_last: bool
    autocast: Callable
    adapt: Adaptation


def build_trainer(job: FitJob, hvd: Any, place: Placement) -> Trainer:
    """Data, model (and teacher), sampler, Horovod optimizer and learning-rate schedule."""
    # QAT trains in fp32: fake quantization simulates int8 rounding on fp32 values (torch.ao's
    # fused fake-quantize kernels take fp32), and bf16 would add rounding of its own.
    bf16 = job.qat is None and (job.mixed_precision == "bf16" or (job.mixed_precision == "auto" and place.use_cuda))
    want_channels_last = job.channels_last == "on" or (job.channels_last == "auto" and place.use_cuda)
    data = load_shards(job, place)
    spec = spec_for_data(ModelSpec.from_dict(job.spec), data.preprocessing)
    adapt = Adaptation(job)
    model = build_model(spec, data.preprocessing.input_shape, data.preprocessing.num_classes)
    model = adapt.prepare(model, place.device)
    channels_last = want_channels_last and data.x_train.dim() == 4
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    teacher = None
    if job.teacher:
        teacher = load_eager_model(Path(job.teacher)).to(place.device).eval()
        for parameter in teacher.parameters():
            parameter.requires_grad_(False)

    # Horovod: shard the training data; set_epoch below gives a new shuffle every epoch,
    # the same permutation on every rank, each rank taking its own slice.
    sampler = DistributedSampler(
        range(len(data.x_train)), num_replicas=place.size, rank=place.rank, shuffle=True, seed=job.seed
    )
    batches_per_epoch = math.ceil(len(sampler) / job.batch_size)
    steps_per_epoch = math.ceil(batches_per_epoch / job.backward_passes_per_step)  # optimizer steps
    # Horovod: average gradients across ranks (fp16 on the wire if asked). With
    # backward_passes_per_step = k the allreduce fires on every k-th backward pass and
    # step() must follow it: the loop steps once per k batches (and at the epoch's end).
    # Gradients of a group are allreduced together once the last of them is ready: one
    # fused allreduce per step on CPU workers, one per gradient on GPUs (allreduce_groups).
    groups = allreduce_groups(job.allreduce_groups, place.use_cuda)
    optimizer = hvd.DistributedOptimizer(
        torch.optim.AdamW(model.parameters(), lr=job.lr, weight_decay=job.weight_decay),
        named_parameters=model.named_parameters(),
        compression=hvd.Compression.fp16 if job.fp16_allreduce else hvd.Compression.none,
        backward_passes_per_step=job.backward_passes_per_step,
        groups=groups,
    )
    # Horovod: the learning rate is scaled by the world size, ramped up over the warm-up.
    warmup_steps, total_steps = job.warmup_epochs * steps_per_epoch, job.epochs * steps_per_epoch
    start = job.warmup_start if job.warmup_start is not None else WARMUP_START.get(spec.family, 1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, warmup_steps, total_steps, place.size, start)
    )
    return Trainer(
        job, hvd, place, data, spec, model, training_loss(teacher, job.temperature, job.alpha), sampler,
        optimizer, scheduler, groups, bf16, channels_last, autocast_factory(place.device, bf16), adapt,
    )


def fit(job: FitJob, hvd: Any, threads: int, energy_since: Joules | None = None) -> dict[str, Any] | None:
    """Train ``job`` on this (initialized, seeded) worker; rank 0 returns the summary metrics, other ranks None.

    The job's energy is each rank's since ``energy_since`` (a reading of its meter; None:
    since the meter started, i.e. the worker's set-up included).
    """
    place = place_worker(hvd)
    t = build_trainer(job, hvd, place)
    mlflow_log = EventLog(job.events_path if place.is_root else None)  # the stage logs it into MLflow
    checkpoints = Checkpoints.of(job, place.size)
    state = checkpoints.resume(hvd, place, t.model, t.optimizer, t.scheduler)
    if job.init_from and state["start"] is None:
        state["start"] = validate_start(t)
    if place.is_root:
        log_start(t, mlflow_log, state, threads)
    # Horovod: start the clocks together (rank 0 has been opening MLflow and checkpoints).
    hvd.barrier()
    resumed_from = state["epoch"]
    run_epochs(t, checkpoints, mlflow_log, state)
    # Horovod: every rank's energy from its set-up (or the previous job) to its last epoch,
    # summed; epochs run before a resume were measured then (their figures are in the history).
    energy = gather_energy(hvd, process_meter(), energy_since)
    energy["train_energy_j"] += sum(h.get("epoch_energy_j", 0.0) for h in state["history"][:resumed_from])
    # Horovod: every rank's own evidence that the ranks ended as one model (and the masks held).
    checks = hvd.allgather_object(t.adapt.check(t.model), name="rank_checks")
    return finish(t, checkpoints, state, threads, checks, energy) if place.is_root else None


def validate_start(t: Trainer) -> dict[str, float]:
    """Validation loss and accuracy of the model training starts from (every rank takes part)."""
    with t.adapt.as_started(t.model):
        loss, correct, count = evaluate(t.model, t.data.x_val, t.data.y_val, VAL_BATCH, t.autocast)
    rows = t.hvd.allgather(torch.tensor([[loss, correct, count]], dtype=torch.float64), name="start_metrics")
    loss, correct, count = rows.sum(0).tolist()
    return {"val_loss": loss / count, "val_accuracy": correct / count}


def log_start(t: Trainer, mlflow_log: EventLog, state: dict[str, Any], threads: int) -> None:
    """Rank 0: the run's settings (and, when resumed into a new MLflow run, the curve so far)."""
    place = t.place
    mlflow_log.params({
        "world_size": place.size, "threads_per_worker": threads, "device": place.device.type, "bf16": t.bf16,
        "channels_last": t.channels_last, "resumed_from_epoch": state["epoch"],
        "allreduce_groups_used": "per-gradient" if t.groups is None else t.groups,
    })
    if state.get("run_id") != t.job.run_id:
        # A fine-tune's curve starts at step 0 with the model it starts from; a resumed
        # run carries the whole curve.
        mlflow_log.history(([{"epoch": 0, **state["start"]}] if state["start"] else []) + state["history"])
    state["run_id"] = t.job.run_id
    log_once("world_size=%d threads_per_worker=%d device=%s bf16=%s channels_last=%s allreduce=%s train=%d val=%d",
             place.size, threads, place.device.type, t.bf16, t.channels_last,
             "per gradient" if t.groups is None else f"{t.groups} group(s) per step",
             len(t.data.x_train), t.data.val_total)


def run_epochs(t: Trainer, checkpoints: Checkpoints, mlflow_log: EventLog, state: dict[str, Any]) -> None:
    """From the epoch after ``state["epoch"]`` to the last, or until early stopping; updates ``state``."""
    job, place, hvd = t.job, t.place, t.hvd
    meter = process_meter()
    for epoch in range(state["epoch"], job.epochs):
        energy_start = meter.read()
        t.adapt.before_epoch(epoch)  # gradual pruning: the masks at this epoch's sparsity
        train_counts, epoch_time = train_epoch(t, epoch)
        # BatchNorm running statistics are buffers: gradients are averaged, these are not.
        float_buffers = [b for b in t.model.buffers() if b.is_floating_point() and b.numel()]
        if place.size > 1 and float_buffers:
            # Horovod: average the BatchNorm statistics, so every rank holds the model rank 0
            # saves and validation measures exactly that model.
            hvd.grouped_allreduce_(float_buffers, op=hvd.Average, name="buffers")
        t.adapt.after_buffer_sync(hvd, t.model)  # QAT: fake-quantization ranges from the averaged observers
        with t.adapt.evaluating(t.model):
            val_counts = evaluate(t.model, t.data.x_val, t.data.y_val, VAL_BATCH, t.autocast)
        metrics = {
            **gather_epoch_metrics(hvd, train_counts, val_counts, epoch_time, meter.read() - energy_start),
            "lr": t.optimizer.param_groups[0]["lr"],
        }
        improved, stop = record_epoch(state, epoch + 1, metrics, job.patience, job.monitor, job.eligible(epoch + 1))
        complete = stop or epoch + 1 == job.epochs
        # Horovod: every rank's RNG state goes into the checkpoint, so dropout resumes exactly.
        all_rng = hvd.allgather_object(rng_state(), name="rng_gather")
        if place.is_root:
            log.info(
                "epoch %d/%d  loss %.4f  acc %.4f  val_loss %.4f  val_acc %.4f  %.0f samples/s  %.2fs",
                epoch + 1, job.epochs, metrics["train_loss"], metrics["train_accuracy"],
                metrics["val_loss"], metrics["val_accuracy"], metrics["samples_per_s"], metrics["epoch_time_s"],
            )
            mlflow_log.metrics(metrics, step=epoch + 1)
            checkpoints.save(t.model, t.optimizer, t.scheduler, state, all_rng, metrics, improved, complete)
        # Horovod: nobody goes on before rank 0 has saved this epoch: a crash from here on
        # resumes after it, and the next epoch's clocks start together.
        hvd.barrier()
        fault.crash_if_due(job.fault_after_epoch, epoch + 1, place.rank, place.size)  # tests only
        if stop:
            if place.is_root:
                log.info("early stopping: no %s improvement for %d epochs", job.monitor, job.patience)
            break


def train_epoch(t: Trainer, epoch: int) -> tuple[tuple[float, float, float], float]:
    """One pass over this rank's shard: ((loss sum, correct, samples), seconds)."""
    job, device, model, optimizer = t.job, t.place.device, t.model, t.optimizer
    accumulate = job.backward_passes_per_step
    # Horovod: a different shuffle every epoch, identical across ranks.
    t.sampler.set_epoch(epoch)
    batches = torch.tensor(list(t.sampler), device=device).split(job.batch_size)
    model.train()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    started = time.perf_counter()
    optimizer.zero_grad()
    for first in range(0, len(batches), accumulate):
        group = batches[first : first + accumulate]
        group_samples = sum(len(batch) for batch in group)
        for batch in group:
            xb, yb = t.data.x_train.index_select(0, batch), t.data.y_train.index_select(0, batch)
            if t.channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            with t.autocast():
                logits = model(xb).float()
                loss = t.loss_of(logits, xb, yb)
            # Accumulated over the group, the gradient is that of the mean loss over all
            # its samples (as one big batch, short last batches included); Horovod then
            # averages it over the ranks.
            (loss * (len(batch) / group_samples) if len(group) > 1 else loss).backward()
            # Summed on the device: no host sync per step.
            loss_sum.add_(loss.detach(), alpha=len(batch))
            correct.add_((logits.argmax(1) == yb).sum())
        # Horovod: step() waits for the allreduced gradients, then updates.
        optimizer.step()
        t.adapt.after_step()  # pruning: the masked weights back to zero, on every rank alike
        optimizer.zero_grad()
        t.scheduler.step()
    if t.place.use_cuda:
        torch.cuda.synchronize()
    epoch_time = time.perf_counter() - started
    return (loss_sum.item(), correct.item(), len(t.sampler)), epoch_time


def evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int, autocast: Callable
) -> tuple[float, int, int]:
    """Summed loss, correct predictions and count on this rank's shard."""
    model.eval()
    total_loss, correct = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(x), batch):
            with autocast():
                logits = model(x[start : start + batch]).float()
            total_loss += F.cross_entropy(logits, y[start : start + batch], reduction="sum").item()
            correct += int((logits.argmax(1) == y[start : start + batch]).sum())
    return total_loss, correct, len(x)


def record_epoch(
    state: dict[str, Any], epoch: int, metrics: dict[str, float], patience: int, monitor: str = "val_loss",
    eligible: bool = True,
) -> tuple[bool, bool]:
    """Add finished ``epoch`` to ``state``; (whether it is the best so far by ``monitor``, whether to stop early).

    ``val_loss``: lower by more than 1e-6. ``val_accuracy``: higher, or as high with a lower
    val_loss (accuracy on a validation split moves in steps of one sample).
    """
    state["history"].append({"epoch": epoch, **metrics})
    if not eligible:  # gradual pruning before its final sparsity: neither best nor a bad epoch
        state.update(epoch=epoch)
        return False, False
    if monitor == "val_loss":
        improved = metrics["val_loss"] < state["best_val_loss"] - 1e-6
        state["best_val_loss"] = min(state["best_val_loss"], metrics["val_loss"])
    else:
        accuracy, best = metrics["val_accuracy"], state["best_val_accuracy"]
        improved = accuracy > best + 1e-9 or (accuracy >= best - 1e-9 and metrics["val_loss"] < state["best_val_loss"])
        if improved:  # the best epoch's figures
            state.update(best_val_accuracy=accuracy, best_val_loss=metrics["val_loss"])
    state.update(epoch=epoch, bad_epochs=0 if improved else state["bad_epochs"] + 1)
    return improved, state["bad_epochs"] >= patience


def finish(
    t: Trainer, checkpoints: Checkpoints, state: dict[str, Any], threads: int, checks: list[dict[str, Any]],
    energy: dict[str, Any],
) -> dict[str, Any]:
    """Rank 0: write the best epoch's model and the summary and history files; return the summary.

    The model's manifest records the job's fingerprint and every rank's end-of-training
    evidence (``checks``: a digest of its weights, the non-zeros its masks let through).
    """
    job, size, history = t.job, t.place.size, state["history"]
    best = checkpoints.load_best()
    late_gain = late_val_accuracy_gain_pts(history, best["epoch"], job.epochs, job.patience)
    top_epoch, missed = missed_val_accuracy(history, best["epoch"])
    t.model.load_state_dict(best["model"])
    model = t.model.to("cpu", memory_format=torch.contiguous_format)
    preprocessing = t.data.preprocessing
    ranks = {
        "weights_sha256": [check["weights_sha256"] for check in checks],
        "identical": len({check["weights_sha256"] for check in checks}) == 1,
        **({"masked_nonzeros": [check["masked_nonzeros"] for check in checks]} if job.prune_masks else {}),
    }
    if not ranks["identical"]:
        log.warning("the ranks ended with different weights (digests %s)", ranks["weights_sha256"])
    manifest = save_state_dict_model(
        model, t.spec, preprocessing.input_shape, preprocessing.num_classes, Path(job.output),
        {**job.manifest, "best_epoch": best["epoch"], "world_size": size, "fingerprint": checkpoints.fingerprint,
         # whether the run was still improving when its epochs ran out (the evaluate stage says so)
         "fit": {"epochs": job.epochs, "epochs_run": state["epoch"], "patience": job.patience,
                 "val_accuracy_late_gain_pts": late_gain, "monitor": job.monitor,
                 "most_accurate_epoch": top_epoch, "val_accuracy_missed_pts": missed,
                 # the best epoch on its training rows and on the validation split (a model that memorized)
                 "train_accuracy": history[best["epoch"] - 1]["train_accuracy"],
                 "val_accuracy": history[best["epoch"] - 1]["val_accuracy"]},
         "ranks_at_end": ranks, **({"start": state["start"]} if state["start"] else {}),
         **({"qat_engine": job.qat} if job.qat else {}),
         # what training it cost, every rank summed (the baseline's make_energy_j)
         "energy": {"train_j": energy["train_energy_j"], "make_j": energy["train_energy_j"],
                    "source": energy["energy_source"]}},
        format_name="torch-qat-state-dict" if job.qat else "torch-state-dict",
    )
    result = {**summary(best["epoch"], history, state["epoch"], size, threads, manifest["parameters"]),
              "val_accuracy_late_gain_pts": late_gain, "most_accurate_epoch": top_epoch,
              "val_accuracy_missed_pts": missed, **energy}
    if state["start"]:
        result.update(start_val_loss=state["start"]["val_loss"], start_val_accuracy=state["start"]["val_accuracy"])
    write_json(job.metrics_path, result)
    write_json(job.history_path, history)
    log.info("best epoch %d: val_loss %.4f val_acc %.4f; model written to %s; energy %.1f J (%s)",
             best["epoch"], result["val_loss"], result["val_accuracy"], job.output, energy["train_energy_j"],
             energy["energy_source"])
    return result
