"""The Horovod data-parallel training loop, run by every worker.

It follows Horovod's own order (examples/pytorch/pytorch_mnist.py): init, seed, pin the
device to the local rank, set threads, shard with DistributedSampler, scale the learning
rate by the world size, broadcast parameters and optimizer state from rank 0, wrap the
optimizer in DistributedOptimizer, ``set_epoch`` every epoch, average metrics with
allreduce; only rank 0 logs and writes files. With a ``teacher`` it trains a student
by knowledge distillation on the same loop.

Started as ``python -m tasks.fit JOB.json`` by :mod:`tasks.launcher`, alone or under
``horovodrun``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data.distributed import DistributedSampler

from models import ModelSpec, build_model
from tasks.data import load_preprocessing, load_split
from tasks.model_io import load_eager_model, save_state_dict_model

log = logging.getLogger("slimflow.fit")

CHECKPOINT = "last.pt"
BEST = "best.pt"


@dataclass(frozen=True)
class FitJob:
    """Everything a worker needs; written to JSON by the launching stage."""

    spec: dict[str, Any]
    prepared: str
    output: str  # model folder written by rank 0 from the best checkpoint
    checkpoints: str
    epochs: int
    batch_size: int
    lr: float
    seed: int
    weight_decay: float = 0.0
    warmup_epochs: int = 1
    patience: int = 5
    fp16_allreduce: bool = False
    backward_passes_per_step: int = 1
    mixed_precision: str = "auto"
    channels_last: str = "auto"
    teacher: str | None = None  # model folder of the teacher (distillation)
    temperature: float = 4.0
    alpha: float = 0.7  # weight of the soft-target loss
    run_id: str | None = None  # MLflow run that rank 0 logs into
    metrics_path: str | None = None  # summary metrics (JSON) written by rank 0
    history_path: str | None = None  # per-epoch history (JSON list) written by rank 0
    manifest: dict[str, Any] = field(default_factory=dict)
    fault_after_epoch: int | None = None  # tests: kill this worker after that epoch

    def fingerprint(self, world_size: int) -> str:
        """What must match for a checkpoint to be resumed."""
        import hashlib

        keys = {k: v for k, v in asdict(self).items() if k not in {"run_id", "fault_after_epoch", "metrics_path", "history_path"}}
        keys["world_size"] = world_size
        keys["data"] = (Path(self.prepared) / "card.json").read_text() if (Path(self.prepared) / "card.json").exists() else ""
        return hashlib.sha256(json.dumps(keys, sort_keys=True, default=str).encode()).hexdigest()

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2, sort_keys=True))

    @classmethod
    def read(cls, path: Path) -> FitJob:
        return cls(**json.loads(path.read_text()))


def _set_threads() -> int:
    threads = int(os.environ.get("SLIMFLOW_THREADS_PER_WORKER", "0")) or torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set, or parallel work already started
        pass
    return threads


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def _restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def _warmup_factor(warmup_steps: int, world_size: int):
    """LR multiplier: ramps from 1 to world_size over the warm-up (Goyal et al.), then cosine to 0.1."""

    def factor(step: int, total: int) -> float:
        if warmup_steps and step < warmup_steps:
            return 1.0 + (world_size - 1) * step / warmup_steps
        progress = (step - warmup_steps) / max(1, total - warmup_steps)
        return world_size * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))

    return factor


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


def _evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int, autocast) -> tuple[float, int, int]:
    model.eval()
    total_loss, correct = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(x), batch):
            with autocast():
                logits = model(x[start : start + batch]).float()
            total_loss += F.cross_entropy(logits, y[start : start + batch], reduction="sum").item()
            correct += int((logits.argmax(1) == y[start : start + batch]).sum())
    return total_loss, correct, len(x)


class _MlflowLogger:
    """Rank 0 logs into the run the launching stage opened (it ends the run, not us)."""

    def __init__(self, run_id: str | None) -> None:
        self.run_id = run_id
        self.client = None
        if run_id:
            from mlflow import MlflowClient

            self.client = MlflowClient()

    def params(self, values: dict[str, Any]) -> None:
        if self.client:
            from mlflow.entities import Param

            self.client.log_batch(self.run_id, params=[Param(k, str(v)) for k, v in values.items()])

    def metrics(self, values: dict[str, float], step: int) -> None:
        if self.client:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in values.items()])


def run(job: FitJob) -> dict[str, Any] | None:
    import horovod.torch as hvd

    # Horovod: initialize; everything below depends on rank and size.
    hvd.init()
    rank, size, local_rank = hvd.rank(), hvd.size(), hvd.local_rank()
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S", stream=sys.stderr,
    )
    # Horovod: the same seed on every rank, so initial weights agree before the broadcast;
    # the sampler shards the data and dropout differs per rank through its own offset.
    _seed_everything(job.seed)

    use_cuda = torch.cuda.is_available()
    if use_cuda:
        # Horovod: pin one GPU per local rank.
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
        if rank == 0:
            log.info("no CUDA GPU found: training on CPU, Gloo collectives")
    threads = _set_threads()
    bf16 = job.mixed_precision == "bf16" or (job.mixed_precision == "auto" and use_cuda)
    channels_last = job.channels_last == "on" or (job.channels_last == "auto" and use_cuda)

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

    prepared = Path(job.prepared)
    preprocessing = load_preprocessing(prepared)
    train = load_split(prepared, "train", preprocessing)
    val = load_split(prepared, "val", preprocessing)
    x_train = torch.from_numpy(train.x).to(device)
    y_train = torch.from_numpy(train.y).to(device)
    x_val_all, y_val_all = torch.from_numpy(val.x), torch.from_numpy(val.y)
    # Horovod: each rank validates its own shard; sums are allreduced.
    x_val = x_val_all[rank::size].to(device)
    y_val = y_val_all[rank::size].to(device)

    spec = ModelSpec.from_dict(job.spec)
    model = build_model(spec, preprocessing.input_shape, preprocessing.num_classes).to(device)
    memory_format = torch.channels_last if channels_last and x_train.dim() == 4 else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    teacher = None
    if job.teacher:
        teacher = load_eager_model(Path(job.teacher)).to(device).eval()
        for parameter in teacher.parameters():
            parameter.requires_grad_(False)

    sampler = DistributedSampler(range(len(x_train)), num_replicas=size, rank=rank, shuffle=True, seed=job.seed)
    steps_per_epoch = math.ceil(len(sampler) / job.batch_size)
    # Horovod: scale the learning rate by the world size (ramped up over the warm-up).
    optimizer = torch.optim.AdamW(model.parameters(), lr=job.lr, weight_decay=job.weight_decay)
    factor = _warmup_factor(job.warmup_epochs * steps_per_epoch, size)
    total_steps = job.epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: factor(step, total_steps))

    # Resume: rank 0 reads the last checkpoint if it was made by this very job and
    # training did not finish; everything it holds is broadcast below.
    checkpoints = Path(job.checkpoints)
    fingerprint = job.fingerprint(size)
    state: dict[str, Any] = {"epoch": 0, "best_val_loss": math.inf, "bad_epochs": 0, "history": []}
    rng_states: list[Any] | None = None
    if rank == 0 and (checkpoints / CHECKPOINT).exists():
        saved = torch.load(checkpoints / CHECKPOINT, map_location="cpu", weights_only=False)
        if saved.get("fingerprint") == fingerprint and not saved.get("complete"):
            model.load_state_dict(saved["model"])
            optimizer.load_state_dict(saved["optimizer"])
            scheduler.load_state_dict(saved["scheduler"])
            state = saved["state"]
            rng_states = saved["rng"]
            log.info("resuming from checkpoint at epoch %d/%d", state["epoch"], job.epochs)
        else:
            log.info("ignoring checkpoint %s: made by other settings or finished", checkpoints / CHECKPOINT)
    state = hvd.broadcast_object(state, root_rank=0, name="state")
    rng_states = hvd.broadcast_object(rng_states, root_rank=0, name="rng")
    scheduler.load_state_dict(hvd.broadcast_object(scheduler.state_dict(), root_rank=0, name="scheduler"))
    # Horovod: every rank starts from rank 0's parameters and optimizer state.
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(optimizer, root_rank=0)
    if rng_states is not None:
        _restore_rng(rng_states[rank])
    else:
        torch.manual_seed(job.seed + rank)  # per-rank dropout streams

    # Horovod: average gradients across ranks (optionally fp16 on the wire).
    optimizer = hvd.DistributedOptimizer(
        optimizer,
        named_parameters=model.named_parameters(),
        compression=hvd.Compression.fp16 if job.fp16_allreduce else hvd.Compression.none,
        backward_passes_per_step=job.backward_passes_per_step,
    )

    mlflow_log = _MlflowLogger(job.run_id if rank == 0 else None)
    if state["epoch"] == 0:
        mlflow_log.params({"world_size": size, "threads_per_worker": threads, "device": device.type,
                           "bf16": bf16, "channels_last": channels_last})
    if rank == 0:
        log.info("world_size=%d threads_per_worker=%d device=%s train=%d val=%d",
                 size, threads, device.type, len(x_train), len(x_val_all))

    history: list[dict[str, float]] = state["history"]
    accumulate = job.backward_passes_per_step
    for epoch in range(state["epoch"], job.epochs):
        # Horovod: a different shuffle every epoch, identical across ranks.
        sampler.set_epoch(epoch)
        indices = torch.tensor(list(iter(sampler)), device=device)
        model.train()
        started = time.perf_counter()
        loss_sum, correct, seen = 0.0, 0, 0
        batches = list(torch.split(indices, job.batch_size))
        optimizer.zero_grad()
        for step, batch_idx in enumerate(batches, start=1):
            xb, yb = x_train[batch_idx], y_train[batch_idx]
            with autocast():
                logits = model(xb.contiguous(memory_format=memory_format) if xb.dim() == 4 else xb).float()
                if teacher is not None:
                    with torch.no_grad():
                        teacher_logits = teacher(xb).float()
                    loss = distillation_loss(logits, teacher_logits, yb, job.temperature, job.alpha)
                else:
                    loss = F.cross_entropy(logits, yb)
            (loss / accumulate).backward()
            if step % accumulate == 0 or step == len(batches):
                optimizer.step()
                optimizer.zero_grad()
                scheduler.step()
            loss_sum += loss.item() * len(yb)
            correct += int((logits.argmax(1) == yb).sum())
            seen += len(yb)
        epoch_time = time.perf_counter() - started

        val_loss_sum, val_correct, val_seen = _evaluate(model, x_val, y_val, 1024, autocast)
        # Horovod: global sums, so every rank sees identical metrics.
        totals = hvd.allreduce(
            torch.tensor([loss_sum, correct, seen, val_loss_sum, val_correct, val_seen, epoch_time], dtype=torch.float64),
            op=hvd.Sum, name="epoch_metrics",
        ).tolist()
        metrics = {
            "train_loss": totals[0] / totals[2],
            "train_accuracy": totals[1] / totals[2],
            "val_loss": totals[3] / totals[5],
            "val_accuracy": totals[4] / totals[5],
            "epoch_time_s": totals[6] / size,
            "samples_per_s": totals[2] / (totals[6] / size),
            "lr": optimizer.param_groups[0]["lr"],
        }
        history.append({"epoch": epoch + 1, **metrics})
        improved = metrics["val_loss"] < state["best_val_loss"] - 1e-6
        state.update(
            epoch=epoch + 1,
            best_val_loss=min(state["best_val_loss"], metrics["val_loss"]),
            bad_epochs=0 if improved else state["bad_epochs"] + 1,
            history=history,
        )
        stop = state["bad_epochs"] >= job.patience
        complete = stop or epoch + 1 == job.epochs
        all_rng = hvd.allgather_object(_rng_state(), name="rng_gather")
        if rank == 0:
            log.info(
                "epoch %d/%d  loss %.4f  acc %.4f  val_loss %.4f  val_acc %.4f  %.0f samples/s  %.2fs",
                epoch + 1, job.epochs, metrics["train_loss"], metrics["train_accuracy"],
                metrics["val_loss"], metrics["val_accuracy"], metrics["samples_per_s"], metrics["epoch_time_s"],
            )
            mlflow_log.metrics(metrics, step=epoch + 1)
            checkpoints.mkdir(parents=True, exist_ok=True)
            snapshot = {
                "fingerprint": fingerprint, "complete": complete, "model": model.state_dict(),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "state": state, "rng": all_rng, "job": asdict(job),
            }
            _atomic_save(snapshot, checkpoints / CHECKPOINT)
            if improved:
                _atomic_save({"model": model.state_dict(), "epoch": epoch + 1, "metrics": metrics}, checkpoints / BEST)
        if job.fault_after_epoch is not None and epoch + 1 == job.fault_after_epoch and rank == size - 1:
            os._exit(17)  # simulated crash of one worker (tests only)
        if stop:
            if rank == 0:
                log.info("early stopping: no val_loss improvement for %d epochs", job.patience)
            break

    result = None
    if rank == 0:
        best = torch.load(checkpoints / BEST, map_location="cpu", weights_only=True)
        model.load_state_dict(best["model"])
        model = model.to("cpu", memory_format=torch.contiguous_format)
        manifest = save_state_dict_model(
            model, spec, preprocessing.input_shape, preprocessing.num_classes, Path(job.output),
            {**job.manifest, "best_epoch": best["epoch"], "world_size": size},
        )
        best_metrics = history[best["epoch"] - 1]
        result = {
            "best_epoch": best["epoch"], "epochs_run": state["epoch"], "world_size": size,
            "threads_per_worker": threads, "val_accuracy": best_metrics["val_accuracy"],
            "val_loss": best_metrics["val_loss"], "train_accuracy": best_metrics["train_accuracy"],
            "samples_per_s": sum(h["samples_per_s"] for h in history) / len(history),
            "parameters": manifest["parameters"],
        }
        for target, payload in ((job.metrics_path, result), (job.history_path, history)):
            if target:
                Path(target).parent.mkdir(parents=True, exist_ok=True)
                Path(target).write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    hvd.shutdown()
    return result


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m tasks.fit JOB.json", file=sys.stderr)
        return 2
    run(FitJob.read(Path(args[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
