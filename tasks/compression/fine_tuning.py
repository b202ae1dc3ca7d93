"""A variant's training steps on the Horovod loop: pruning and QAT fine-tuning, and distillation.

Every step that trains runs as a :class:`~tasks.training.FitJob` on ``train.workers``
workers (or ``train.hosts``), exactly as the baseline trains: ``cores // workers``
threads, the GPU and NCCL where present (bf16 where the baseline uses it; not for QAT),
learning-rate warm-up and schedule, early stopping on validation accuracy with the best
epoch kept, per-epoch metrics in the variant's MLflow run, checkpoints and resume. What
the step needs of the model travels as files in its folder,
``artifacts/checkpoints/<variant>/step<N>/``: the weights it starts from (``init/``), the
pruning masks (``masks.pt``), the teacher (``teacher/``); the workers write their
checkpoints (``checkpoints/``), the trained model (``model/``), the summary and the curve
there. The folder outlives a failed stage, so the re-run resumes a killed fine-tune (and
reuses a finished one); the stage removes it once its output is published.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from models.spec import ModelSpec
from tasks.compression.candidate import Candidate
from tasks.core.config import Params
from tasks.core.energy import Joules, credit_children
from tasks.core.model_files import MANIFEST, read_manifest, save_state_dict_model
from tasks.core.paths import ProjectPaths
from tasks.training import FitJob, launch_fit, world_size
from tasks.training.fault import fault_after_epoch_from_env
from tasks.training.reporting import MlflowLogger

log = logging.getLogger("slimflow.compress")

PREFIX = "fine_tune/"  # MLflow keys of the curve in the variant's run


@dataclass(frozen=True)
class TrainingStep:
    """One training step of a variant: where it runs, and where it reports."""

    params: Params
    paths: ProjectPaths
    variant: str
    number: int  # the step's number in the variant's recipe, from 1
    run_id: str | None  # the variant's MLflow run
    several: bool = False  # the variant has more than one training step: keys and files say which
    trial: int | None = None  # a searched step's trial (from 1): its own folder and metric keys

    @property
    def folder(self) -> Path:
        folder = self.paths.checkpoints / self.variant / f"step{self.number}"
        return folder / f"trial{self.trial}" if self.trial is not None else folder

    @property
    def metric_prefix(self) -> str:
        prefix = f"{PREFIX}step{self.number}/" if self.several else PREFIX
        return f"{prefix}trial{self.trial}/" if self.trial is not None else prefix

    @property
    def curve_name(self) -> str:
        """The DVC plot file's name (``plots/fine_tune/<curve_name>.json``)."""
        return f"{self.variant}-step{self.number}" if self.several else self.variant


@dataclass(frozen=True)
class Trained:
    """A finished training step: the model folder the workers wrote, its summary and curve."""

    folder: Path
    manifest: dict[str, Any]
    summary: dict[str, Any]
    history: list[dict[str, Any]]
    reused: bool

    def record(self, method: str, epochs: int, number: int) -> dict[str, Any]:
        """What the variant's manifest keeps of this step (``training`` entries)."""
        keys = ("epochs_run", "best_epoch", "world_size", "threads_per_worker", "samples_per_s",
                "val_accuracy", "val_accuracy_late_gain_pts", "start_val_accuracy", "student_start")
        return {"step": number, "method": method, "epochs": epochs, "reused": self.reused,
                **{k: self.summary[k] for k in keys if k in self.summary},
                # every rank's own digest of its final weights, and the non-zeros its masks let through
                "ranks_at_end": self.manifest.get("ranks_at_end")}


def fit_job(step: TrainingStep, spec: ModelSpec, epochs: int, lr: float, **hooks: Any) -> FitJob:
    """The step's job: the baseline's training settings (``train``), this step's model,
    epochs and learning rate (per worker, scaled by the world size like ``train.lr``), and
    ``hooks`` (``init_from``, ``prune_masks``, ``qat``, ``teacher``, ``temperature``, ``alpha``)."""
    train, folder = step.params.train, step.folder.resolve()
    return FitJob.from_train(
        train,
        spec=spec.to_dict(),
        prepared=str(step.paths.prepared.resolve()),
        output=str(folder / "model"),
        checkpoints=str(folder / "checkpoints"),
        epochs=epochs,
        lr=lr,
        seed=step.params.base.seed,
        warmup_epochs=min(train.warmup_epochs, epochs - 1),
        monitor="val_accuracy",  # compressed models are judged by accuracy (the gate's measure)
        run_id=step.run_id,
        metric_prefix=step.metric_prefix,
        metrics_path=str(folder / "summary.json"),
        history_path=str(folder / "history.json"),
        manifest={"name": f"{step.variant} step {step.number}", "method": "fine-tune", "recipe": [], "parent": None},
        fault_after_epoch=fault_after_epoch_from_env(),  # tests only: see tasks.training.fault
        **hooks,
    )


def run(step: TrainingStep, job: FitJob) -> Trained:
    """Run ``job`` on the Horovod workers, unless this very job (same fingerprint) finished
    before, in a stage that failed later: then its model is reused."""
    output = Path(job.output)
    fingerprint = job.fingerprint(world_size(step.params.train))
    reused = (output / MANIFEST).is_file() and read_manifest(output).get("fingerprint") == fingerprint
    if not reused:
        launch_fit(job, step.params.train, step.paths.root)
    manifest = read_manifest(output)
    summary = json.loads(Path(job.metrics_path).read_text())
    # The workers' energy goes to the variant that this process is making (a reused step's
    # was spent by an earlier run of the stage, for the same model).
    credit_children(Joules(summary.get("train_energy_cpu_j", 0.0), summary.get("train_energy_gpu_j", 0.0)),
                    summary.get("energy_source", "unknown"))
    history = json.loads(Path(job.history_path).read_text())
    if reused:
        log.info("%s step %d: reusing the finished training in %s (same job, data and code)",
                 step.variant, step.number, output)
        # This run's variant run gets the curve the workers logged into an earlier one.
        start = [{"epoch": 0, **manifest["start"]}] if manifest.get("start") else []
        MlflowLogger(step.run_id, step.metric_prefix).history(start + history)
    return Trained(output, manifest, summary, history, reused)


def start_folder(candidate: Candidate, step: TrainingStep, name: str) -> Path:
    """A torch-state-dict folder holding ``candidate`` as the workers load it: its saved
    model when it is an unchanged copy of one, else written into the step's folder."""
    if candidate.origin_folder is not None and read_manifest(candidate.origin_folder)["format"] == "torch-state-dict":
        return candidate.origin_folder.resolve()
    folder = step.folder / name
    save_state_dict_model(
        candidate.module, candidate.spec, candidate.input_shape, candidate.num_classes, folder,
        {"name": name, "method": name, "recipe": [], "parent": None},
    )
    return folder.resolve()


def fine_tune(
    candidate: Candidate,
    step: TrainingStep,
    *,
    epochs: int,
    lr: float,
    masks: dict[str, torch.Tensor] | None = None,
    qat_engine: str | None = None,
    prune_schedule: list[float] | None = None,
) -> Trained:
    """Fine-tune ``candidate`` (its architecture and weights) on the Horovod loop.

    ``masks`` ({parameter name: bool}): the weights they zero stay exactly zero, on every
    rank, after every step. ``qat_engine``: train with fake quantization for that engine
    (the output is the QAT model's state, ``tasks.compression.quantization`` converts it).
    """
    step.folder.mkdir(parents=True, exist_ok=True)
    hooks: dict[str, Any] = {"init_from": str(start_folder(candidate, step, "init"))}
    if masks:
        path = step.folder / "masks.pt"
        torch.save({name: mask.cpu().bool() for name, mask in masks.items()}, path)
        hooks["prune_masks"] = str(path.resolve())
    if prune_schedule:  # gradual pruning: the masks grow at each epoch start
        hooks["prune_schedule"] = list(prune_schedule)
    if qat_engine:
        hooks["qat"] = qat_engine
    what = "quantization-aware training" if qat_engine else "fine-tuning"
    log.info("%s step %d: %s for %d epochs on %d workers%s", step.variant, step.number, what, epochs,
             world_size(step.params.train), f", {len(masks)} masked tensors" if masks else "")
    trained = run(step, fit_job(step, candidate.spec, epochs, lr, **hooks))
    _check_ranks(step, trained)
    return trained


def _check_ranks(step: TrainingStep, trained: Trained) -> None:
    """The workers' own evidence: the masks held on every rank (else fail); the ranks agree (else warn)."""
    ranks = trained.manifest.get("ranks_at_end", {})
    if any(ranks.get("masked_nonzeros") or []):
        raise RuntimeError(
            f"{step.variant} step {step.number}: pruned weights became non-zero during fine-tuning "
            f"(non-zeros per rank: {ranks['masked_nonzeros']})"
        )
    if ranks and not ranks.get("identical", True):
        log.warning("%s step %d: the workers ended with different weights", step.variant, step.number)
