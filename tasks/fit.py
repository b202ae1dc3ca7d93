"""The Horovod data-parallel training loop, run by every worker.

It follows Horovod's own order (examples/pytorch/pytorch_mnist.py): init, set threads,
seed, pin the device to the local rank, shard with DistributedSampler, scale the learning
rate by the world size, wrap the optimizer in DistributedOptimizer, broadcast parameters
and optimizer state from rank 0, ``set_epoch`` every epoch, average metrics with
allreduce; only rank 0 logs and writes files. With a ``teacher`` it trains a student by
knowledge distillation on the same loop.

Every epoch rank 0 writes a checkpoint (model, optimizer, scheduler, progress, the RNG
states of every rank and the settings that made it); a run started again with the same
settings resumes from it and ends with the same model as an uninterrupted run.

Started as ``python -m tasks.fit JOB.json`` by :mod:`tasks.launcher`, alone or under
``horovodrun``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import sys
import time
from collections.abc import Callable
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
from tasks.core.model_files import load_eager_model, save_state_dict_model

log = logging.getLogger("slimflow.fit")

CHECKPOINT = "last.pt"
BEST = "best.pt"
THREADS_ENV = "SLIMFLOW_THREADS_PER_WORKER"  # set by tasks.launcher.worker_environment
FAULT_EXIT_CODE = 17

# The code whose change makes a checkpoint stale (resuming it would mix two programs).
_CODE_FILES = (Path(__file__), *sorted((Path(__file__).resolve().parents[1] / "models").glob("*.py")))


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
    allreduce_groups: int | str = "auto"  # see allreduce_groups()
    mixed_precision: str = "auto"  # auto (bf16 on GPUs) | off | bf16
    channels_last: str = "auto"  # auto (on for GPUs) | off | on
    teacher: str | None = None  # model folder of the teacher (distillation)
    temperature: float = 4.0
    alpha: float = 0.7  # weight of the soft-target loss
    run_id: str | None = None  # MLflow run that rank 0 logs into
    metrics_path: str | None = None  # summary metrics (JSON) written by rank 0
    history_path: str | None = None  # per-epoch history (JSON list) written by rank 0
    manifest: dict[str, Any] = field(default_factory=dict)
    fault_after_epoch: int | None = None  # tests: the last rank dies after that epoch

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


def set_threads(local_workers: int) -> int:
    """Set torch's (OpenMP) intra-op threads: the launcher's choice, else usable cores // local workers.

    Workers that each use every core oversubscribe the machine (28x slower measured
    here), so this runs before any tensor work.
    """
    from tasks.launcher import threads_per_worker

    configured = int(os.environ.get(THREADS_ENV) or 0) or None
    threads = threads_per_worker(local_workers, configured)
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)  # for anything started later
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set, or inter-op work already started
        pass
    return threads


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


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    return {
        "python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
    }


def _restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def lr_multiplier(step: int, warmup_steps: int, total_steps: int, world_size: int) -> float:
    """Learning-rate multiplier per optimizer step.

    Ramps linearly from 1 to ``world_size`` over the warm-up (Goyal et al., 2017: the
    global batch is ``world_size`` times larger), then decays to 0.1 x that by a cosine.
    """
    if warmup_steps and step < warmup_steps:
        return 1.0 + (world_size - 1) * step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return world_size * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


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


def _evaluate(
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


class _MlflowLogger:
    """Rank 0 logs into the run the launching stage opened (that stage ends the run, not us)."""

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
        self.history([{**values, "epoch": step}])

    def history(self, rows: list[dict[str, float]]) -> None:
        """Per-epoch metrics; ``epoch`` is the MLflow step."""
        if self.client and rows:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            batch = [
                Metric(k, float(v), now, int(row["epoch"])) for row in rows for k, v in row.items() if k != "epoch"
            ]
            for start in range(0, len(batch), 1000):  # MLflow's log_batch limit
                self.client.log_batch(self.run_id, metrics=batch[start : start + 1000])


def _read_checkpoint(path: Path, fingerprint: str) -> dict[str, Any] | None:
    """The checkpoint at ``path`` if this very job made it and did not finish, else None."""
    if not path.exists():
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # a torn or foreign file: train from scratch rather than fail
        log.warning("ignoring checkpoint %s: unreadable (%s)", path, err)
        return None
    if saved.get("fingerprint") != fingerprint:
        log.info("ignoring checkpoint %s: made by other settings, data, code or world size", path)
        return None
    if saved.get("complete"):
        log.info("ignoring checkpoint %s: that training finished; training again", path)
        return None
    return saved


def run(job: FitJob) -> dict[str, Any] | None:
    """Train ``job`` on this worker; rank 0 returns the summary metrics, other ranks None."""
    import horovod.torch as hvd

    # Horovod: initialize; everything below depends on rank and size.
    hvd.init()
    rank, size, local_rank = hvd.rank(), hvd.size(), hvd.local_rank()
    # Threads first, before any tensor work: cores // local workers, never oversubscribed.
    threads = set_threads(hvd.local_size())
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S", stream=sys.stderr,
    )
    # Horovod: the same seed on every rank, so the initial weights agree even before the
    # broadcast; per-rank dropout streams are seeded below.
    _seed_everything(job.seed)

    use_cuda = torch.cuda.is_available()
    if use_cuda:
        # Horovod: pin one GPU per local rank.
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        if rank == 0:
            log.info("CUDA: one GPU per local rank, collectives over %s",
                     "NCCL" if hvd.nccl_built() else "Gloo (this Horovod was built without NCCL)")
    else:
        device = torch.device("cpu")
        if rank == 0:
            log.info("no CUDA GPU found: training on CPU, Gloo collectives")
    bf16 = job.mixed_precision == "bf16" or (job.mixed_precision == "auto" and use_cuda)
    want_channels_last = job.channels_last == "on" or (job.channels_last == "auto" and use_cuda)

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

    prepared = Path(job.prepared)
    preprocessing = load_preprocessing(prepared)
    train = load_split(prepared, "train", preprocessing)
    val = load_split(prepared, "val", preprocessing)
    x_train = torch.from_numpy(train.x).to(device)
    y_train = torch.from_numpy(train.y).to(device)
    # Horovod: each rank validates its own shard of the validation split; sums are allreduced.
    x_val = torch.from_numpy(np.ascontiguousarray(val.x[rank::size])).to(device)
    y_val = torch.from_numpy(np.ascontiguousarray(val.y[rank::size])).to(device)

    spec = ModelSpec.from_dict(job.spec)
    model = build_model(spec, preprocessing.input_shape, preprocessing.num_classes).to(device)
    channels_last = want_channels_last and x_train.dim() == 4
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    teacher = None
    if job.teacher:
        teacher = load_eager_model(Path(job.teacher)).to(device).eval()
        for parameter in teacher.parameters():
            parameter.requires_grad_(False)

    # Horovod: shard the training data; set_epoch below gives a new shuffle every epoch,
    # the same permutation on every rank, each rank taking its own slice.
    sampler = DistributedSampler(range(len(x_train)), num_replicas=size, rank=rank, shuffle=True, seed=job.seed)
    accumulate = job.backward_passes_per_step
    batches_per_epoch = math.ceil(len(sampler) / job.batch_size)
    steps_per_epoch = math.ceil(batches_per_epoch / accumulate)  # optimizer steps
    # Horovod: average gradients across ranks (fp16 on the wire if asked). With
    # backward_passes_per_step = k the allreduce fires on every k-th backward pass and
    # step() must follow it: the loop steps once per k batches (and at the epoch's end).
    # Gradients of a group are allreduced together once the last of them is ready: one
    # fused allreduce per step on CPU workers, one per gradient on GPUs (allreduce_groups).
    groups = allreduce_groups(job.allreduce_groups, use_cuda)
    optimizer = hvd.DistributedOptimizer(
        torch.optim.AdamW(model.parameters(), lr=job.lr, weight_decay=job.weight_decay),
        named_parameters=model.named_parameters(),
        compression=hvd.Compression.fp16 if job.fp16_allreduce else hvd.Compression.none,
        backward_passes_per_step=accumulate,
        groups=groups,
    )
    # Horovod: the learning rate is scaled by the world size, ramped up over the warm-up.
    warmup_steps, total_steps = job.warmup_epochs * steps_per_epoch, job.epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, warmup_steps, total_steps, size)
    )

    mlflow_log = _MlflowLogger(job.run_id if rank == 0 else None)

    # Resume: rank 0 reads the last checkpoint if this very job made it and training did
    # not finish; what it holds reaches every rank through the broadcasts below.
    checkpoints = Path(job.checkpoints)
    fingerprint = job.fingerprint(size)
    state: dict[str, Any] = {"epoch": 0, "best_val_loss": math.inf, "bad_epochs": 0, "history": [], "run_id": None}
    rng_states: list[Any] | None = None
    if rank == 0 and (saved := _read_checkpoint(checkpoints / CHECKPOINT, fingerprint)) is not None:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        state, rng_states = saved["state"], saved["rng"]
        log.info("resuming from checkpoint at epoch %d of %d (the last one completed); continuing with epoch %d",
                 state["epoch"], job.epochs, state["epoch"] + 1)
    state = hvd.broadcast_object(state, root_rank=0, name="state")
    rng_states = hvd.broadcast_object(rng_states, root_rank=0, name="rng")
    resumed_from = state["epoch"]
    if rng_states is not None:
        # Horovod: rank 0's optimizer state (Adam moments, step counts) and schedule.
        # A fresh run skips this: its optimizers are already identical everywhere, and
        # Horovod would first take a zero-gradient step to create the state, which
        # advances Adam's step count (and applies weight decay) before training starts.
        hvd.broadcast_optimizer_state(optimizer, root_rank=0)
        scheduler.load_state_dict(hvd.broadcast_object(scheduler.state_dict(), root_rank=0, name="scheduler"))
        _restore_rng(rng_states[rank])
    else:
        torch.manual_seed(job.seed + rank)  # per-rank dropout streams
    # Horovod: every rank starts from rank 0's parameters and buffers (last, so nothing
    # above can leave the ranks' weights apart).
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)

    if rank == 0:
        mlflow_log.params({
            "world_size": size, "threads_per_worker": threads, "device": device.type, "bf16": bf16,
            "channels_last": channels_last, "resumed_from_epoch": resumed_from,
            "allreduce_groups_used": "per-gradient" if groups is None else groups,
        })
        if state.get("run_id") != job.run_id:
            mlflow_log.history(state["history"])  # a resumed run carries the whole curve
        state["run_id"] = job.run_id
        log.info("world_size=%d threads_per_worker=%d device=%s bf16=%s channels_last=%s allreduce=%s train=%d val=%d",
                 size, threads, device.type, bf16, channels_last,
                 "per gradient" if groups is None else f"{groups} group(s) per step", len(x_train), len(val.y))

    def loss_of(logits: torch.Tensor, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        if teacher is None:
            return F.cross_entropy(logits, yb)
        with torch.no_grad():
            teacher_logits = teacher(xb).float()
        return distillation_loss(logits, teacher_logits, yb, job.temperature, job.alpha)

    # BatchNorm running statistics are buffers: gradients are averaged, these are not.
    float_buffers = [b for b in model.buffers() if b.is_floating_point()]
    history: list[dict[str, float]] = state["history"]
    # Horovod: start the clocks together (rank 0 has been opening MLflow and checkpoints).
    hvd.barrier()
    for epoch in range(state["epoch"], job.epochs):
        # Horovod: a different shuffle every epoch, identical across ranks.
        sampler.set_epoch(epoch)
        batches = torch.tensor(list(sampler), device=device).split(job.batch_size)
        model.train()
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        correct = torch.zeros((), dtype=torch.int64, device=device)
        started = time.perf_counter()
        optimizer.zero_grad()
        for first in range(0, len(batches), accumulate):
            group = batches[first : first + accumulate]
            group_samples = sum(len(batch) for batch in group)
            for batch in group:
                xb, yb = x_train.index_select(0, batch), y_train.index_select(0, batch)
                if channels_last:
                    xb = xb.contiguous(memory_format=torch.channels_last)
                with autocast():
                    logits = model(xb).float()
                    loss = loss_of(logits, xb, yb)
                # Accumulated over the group, the gradient is that of the mean loss over all
                # its samples (as one big batch, short last batches included); Horovod then
                # averages it over the ranks.
                (loss * (len(batch) / group_samples) if len(group) > 1 else loss).backward()
                # Summed on the device: no host sync per step.
                loss_sum.add_(loss.detach(), alpha=len(batch))
                correct.add_((logits.argmax(1) == yb).sum())
            # Horovod: step() waits for the allreduced gradients, then updates.
            optimizer.step()
            optimizer.zero_grad()
            scheduler.step()
        if use_cuda:
            torch.cuda.synchronize()
        epoch_time = time.perf_counter() - started
        seen = len(sampler)

        if size > 1 and float_buffers:
            # Horovod: average the BatchNorm statistics, so every rank holds the model rank 0
            # saves and validation measures exactly that model.
            hvd.grouped_allreduce_(float_buffers, op=hvd.Average, name="buffers")
        val_loss_sum, val_correct, val_seen = _evaluate(model, x_val, y_val, 1024, autocast)
        # Horovod: every rank's counts and time in one allgather (a row per rank), so every
        # rank sees identical global metrics (and stops together).
        local = torch.tensor(
            [[loss_sum.item(), correct.item(), seen, val_loss_sum, val_correct, val_seen, epoch_time]],
            dtype=torch.float64,
        )
        rows = hvd.allgather(local, name="epoch_metrics")
        sums = rows[:, :6].sum(0).tolist()
        slowest = rows[:, 6].max().item()  # the epoch lasts as long as its slowest rank
        metrics = {
            "train_loss": sums[0] / sums[2],
            "train_accuracy": sums[1] / sums[2],
            "val_loss": sums[3] / sums[5],
            "val_accuracy": sums[4] / sums[5],
            "epoch_time_s": slowest,
            "samples_per_s": sums[2] / slowest,  # global: every rank's samples
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
        # Horovod: every rank's RNG state goes into the checkpoint, so dropout resumes exactly.
        all_rng = hvd.allgather_object(_rng_state(), name="rng_gather")
        if rank == 0:
            log.info(
                "epoch %d/%d  loss %.4f  acc %.4f  val_loss %.4f  val_acc %.4f  %.0f samples/s  %.2fs",
                epoch + 1, job.epochs, metrics["train_loss"], metrics["train_accuracy"],
                metrics["val_loss"], metrics["val_accuracy"], metrics["samples_per_s"], metrics["epoch_time_s"],
            )
            mlflow_log.metrics(metrics, step=epoch + 1)
            checkpoints.mkdir(parents=True, exist_ok=True)
            if improved:
                _atomic_save({"model": model.state_dict(), "epoch": epoch + 1, "metrics": metrics}, checkpoints / BEST)
            _atomic_save({
                "fingerprint": fingerprint, "complete": complete, "model": model.state_dict(),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "state": state, "rng": all_rng, "job": asdict(job),
            }, checkpoints / CHECKPOINT)
        # Horovod: nobody goes on before rank 0 has saved this epoch: a crash from here on
        # resumes after it, and the next epoch's clocks start together.
        hvd.barrier()
        if job.fault_after_epoch is not None and epoch + 1 == job.fault_after_epoch and rank == size - 1:
            log.warning("fault injection: worker rank %d exits with status %d after epoch %d",
                        rank, FAULT_EXIT_CODE, epoch + 1)
            logging.shutdown()
            os._exit(FAULT_EXIT_CODE)  # a simulated crash (tests only)
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
            "train_loss": best_metrics["train_loss"],
            "samples_per_s": sum(h["samples_per_s"] for h in history) / len(history),
            "parameters": manifest["parameters"],
        }
        for target, payload in ((job.metrics_path, result), (job.history_path, history)):
            if target:
                Path(target).parent.mkdir(parents=True, exist_ok=True)
                Path(target).write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
        log.info("best epoch %d: val_loss %.4f val_acc %.4f; model written to %s",
                 best["epoch"], best_metrics["val_loss"], best_metrics["val_accuracy"], job.output)
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
