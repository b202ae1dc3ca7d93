"""Horovod data-parallel training: accuracy, MLflow records, crash and resume, determinism.

The integration tests run real workers in subprocesses (``horovodrun`` over Gloo for
two workers, a plain process for one): ``hvd.init()`` can happen only once in a
process, so pytest itself never initializes Horovod. Each ``horovodrun`` launch costs
~10 s on the 2-core machine, so the stage runs are shared through module fixtures.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tasks.training import FitJob
from tasks.training.distributed import lr_multiplier
from tests.conftest import REPO, make_project

# Measured, not computed: differ between runs (and how the energy was measured, a label).
TIMING_KEYS = {"samples_per_s", "epoch_time_s", "epoch_energy_j", "train_energy_j", "train_energy_cpu_j",
               "train_energy_gpu_j", "energy_source"}
# Stage runs keep one cheap variant so the params stay valid whatever the compress defaults.
ONE_VARIANT = {
    "variants": [{"name": "int8-dynamic", "steps": [{"method": "quantize", "mode": "dynamic", "runtime": "torch"}]}]
}
STAGE_TIMEOUT_S = 420


# --------------------------------------------------------------------------- helpers


def write_digits(prepared: Path, seed: int = 42, val_fraction: float = 0.15, test_fraction: float = 0.25) -> None:
    """The full digits set as the prepare stage lays it out: a stratified 60/15/25 split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    from tasks.data import Preprocessing

    digits = load_digits()
    x = digits.images.astype(np.float32)[:, None, :, :]
    y = digits.target.astype(np.int64)
    index = np.arange(len(y))
    rest, test = train_test_split(index, test_size=test_fraction, stratify=y, random_state=seed)
    train, val = train_test_split(
        rest, test_size=val_fraction / (1 - test_fraction), stratify=y[rest], random_state=seed
    )
    prepared.mkdir(parents=True, exist_ok=True)
    for split, rows in (("train", train), ("val", val), ("test", test)):
        np.save(prepared / f"{split}_x.npy", x[rows])
        np.save(prepared / f"{split}_y.npy", y[rows])
    preprocessing = Preprocessing.fit(x[train], 10, [str(name) for name in digits.target_names])
    (prepared / "preprocess.json").write_text(preprocessing.to_json())
    digest = hashlib.md5(x.tobytes() + y.tobytes()).hexdigest()
    (prepared / "card.json").write_text(json.dumps({"source": "digits", "digest": digest}) + "\n")


def digits_project(root: Path, experiment: str) -> Path:
    """A project copy with params.yaml's training defaults and the digits data prepared."""
    project = make_project(root, {"base": {"experiment": experiment}, "compress": ONE_VARIANT})
    write_digits(project / "data" / "prepared")
    return project


def run_stage(project: Path, mlflow_uri: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``python -m tasks.train`` in ``project``, as DVC runs it."""
    environment = {**os.environ, "SLIMFLOW_ROOT": str(project), "MLFLOW_TRACKING_URI": mlflow_uri, **env}
    for key in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID", "SLIMFLOW_RUN_CONTEXT", "SLIMFLOW_FAULT_AFTER_EPOCH"):
        if key not in env:
            environment.pop(key, None)
    return subprocess.run(
        [sys.executable, "-m", "tasks.train"], cwd=project, env=environment,
        capture_output=True, text=True, timeout=STAGE_TIMEOUT_S,
    )


def run_fit(
    job: FitJob, workers: int, threads: int | None = None
) -> tuple[dict, list[dict], dict[str, torch.Tensor]]:
    """Launch ``job`` on ``workers`` local workers (no MLflow); returns metrics, history, weights."""
    from tasks.core.config import TrainParams
    from tasks.training import launch_fit

    launch_fit(job, TrainParams(workers=workers, threads_per_worker=threads), REPO)
    return read_outputs(Path(job.metrics_path), Path(job.history_path), Path(job.output))


def read_outputs(metrics: Path, history: Path, model: Path) -> tuple[dict, list[dict], dict[str, torch.Tensor]]:
    weights = torch.load(model / "model.pt", map_location="cpu", weights_only=True)["state_dict"]
    return json.loads(metrics.read_text()), json.loads(history.read_text()), weights


def fit_job(folder: Path, prepared: Path, **changes) -> FitJob:
    """A job writing everything under ``folder``: the tiny budget unless ``changes`` say otherwise."""
    settings = dict(
        spec={"family": "cnn", "channels": [8, 16]}, prepared=str(prepared), output=str(folder / "model"),
        checkpoints=str(folder / "checkpoints"), epochs=3, batch_size=32, lr=0.002, seed=42, patience=3,
        metrics_path=str(folder / "train.json"), history_path=str(folder / "history.json"),
    )
    settings.update(changes)
    return FitJob(**settings)


def without_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in rows]


def assert_rows_close(actual: list[dict], expected: list[dict], rel: float) -> None:
    """Same rows with the same keys; every value within ``rel`` (timings left out)."""
    actual, expected = without_timing(actual), without_timing(expected)
    assert len(actual) == len(expected)
    for got, want in zip(actual, expected, strict=True):
        assert got == pytest.approx(want, rel=rel, abs=1e-12)


def accuracy_on_test_split(model_dir: Path, prepared: Path) -> float:
    from tasks.data import load_split
    from tasks.core.model_files import load_eager_model

    model = load_eager_model(model_dir)
    test = load_split(prepared, "test")
    with torch.inference_mode():
        predicted = model(torch.from_numpy(test.x)).argmax(1).numpy()
    return float((predicted == test.y).mean())


def mlflow_runs(mlflow_uri: str, experiment: str) -> list:
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_uri)
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no MLflow experiment {experiment!r}"
    return client.search_runs([found.experiment_id], order_by=["attributes.start_time ASC"])


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def shared_mlflow(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One MLflow store for the module's stage runs (creating one costs seconds)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture(scope="module")
def default_stage(tmp_path_factory: pytest.TempPathFactory, shared_mlflow: str) -> Path:
    """The train stage with params.yaml's defaults (CNN, 2 workers) on the full digits set."""
    project = digits_project(tmp_path_factory.mktemp("default") / "project", "default")
    done = run_stage(project, shared_mlflow)
    assert done.returncode == 0, done.stderr[-4000:]
    (project / "stage.log").write_text(done.stderr)
    return project


def default_stage_job(default_stage: Path, scratch: Path, **changes: object) -> FitJob:
    """The default stage's own training job (params.yaml of that project), writing under ``scratch``."""
    from tasks.core.config import load_params
    from tasks.core.paths import ProjectPaths
    from tasks.train import fit_job as stage_job

    job = stage_job(load_params(default_stage / "params.yaml"), ProjectPaths(default_stage), None)
    return dataclasses.replace(
        job, output=str(scratch / "model"), checkpoints=str(scratch / "checkpoints"),
        metrics_path=str(scratch / "train.json"), history_path=str(scratch / "history.json"), **changes,
    )


def default_stage_outputs(default_stage: Path) -> tuple[dict, list[dict], dict[str, torch.Tensor]]:
    return read_outputs(default_stage / "metrics" / "train.json", default_stage / "plots" / "train_history.json",
                        default_stage / "artifacts" / "model")


# --------------------------------------------------------------------------- unit


def test_the_baseline_and_a_fine_tune_take_train_s_settings_through_one_constructor(tmp_path: Path) -> None:
    """FitJob.from_train: every shared setting of ``train`` reaches both jobs; a fine-tune's
    own epochs, lr and shortened warm-up override them, and it follows val accuracy whatever
    the baseline's ``train.monitor``."""
    from tasks.compression.fine_tuning import TrainingStep
    from tasks.compression.fine_tuning import fit_job as step_job
    from tasks.core.config import validate_params
    from tasks.core.paths import ProjectPaths
    from tasks.train import fit_job as stage_job

    params = validate_params({"train": {"batch_size": 48, "weight_decay": 0.01, "warmup_epochs": 3, "patience": 2,
                                        "fp16_allreduce": True, "backward_passes_per_step": 2, "allreduce_groups": 3,
                                        "mixed_precision": "off", "channels_last": "on", "epochs": 7, "lr": 0.004,
                                        "monitor": "val_loss"}})
    paths = ProjectPaths(tmp_path)
    baseline = stage_job(params, paths, None)
    tuned = step_job(TrainingStep(params, paths, "v", 1, None), params.train.model.spec(), epochs=2, lr=0.001)
    shared = {"batch_size": 48, "weight_decay": 0.01, "patience": 2, "fp16_allreduce": True,
              "backward_passes_per_step": 2, "allreduce_groups": 3, "mixed_precision": "off", "channels_last": "on"}
    for job in (baseline, tuned):
        assert {key: getattr(job, key) for key in shared} == shared
    assert (baseline.epochs, baseline.lr, baseline.warmup_epochs, baseline.monitor) == (7, 0.004, 3, "val_loss")
    assert (tuned.epochs, tuned.lr, tuned.warmup_epochs, tuned.monitor) == (2, 0.001, 1, "val_accuracy")


def test_rank_0s_reports_reach_the_stages_mlflow_run_as_whole_lines(tmp_path: Path, mlflow_uri: str) -> None:
    """The workers never import MLflow: rank 0 appends reports, the stage forwards each
    finished line once (a line rank 0 is still writing waits for the next call)."""
    from mlflow import MlflowClient

    from tasks.training.reporting import EventForwarder, EventLog, MlflowLogger

    client = MlflowClient()
    run_id = client.create_run(client.create_experiment("events")).info.run_id
    path = tmp_path / "events.jsonl"
    forwarder = EventForwarder(path, MlflowLogger(run_id, "fine_tune/"))
    forwarder.forward()  # nothing written yet
    reports = EventLog(str(path))
    reports.params({"world_size": 2, "bf16": False})
    reports.metrics({"val_accuracy": 0.5, "lr": 0.01}, step=1)
    with path.open("a") as events:
        events.write('{"history": [{"epoch": 2, "val_accuracy": 0.7')  # rank 0 mid-write
    forwarder.forward()
    data = client.get_run(run_id).data
    assert data.params == {"fine_tune/world_size": "2", "fine_tune/bf16": "False"}
    assert data.metrics == {"fine_tune/val_accuracy": 0.5, "fine_tune/lr": 0.01}
    with path.open("a") as events:
        events.write("}]}\n")
    forwarder.forward()
    forwarder.forward()
    history = client.get_metric_history(run_id, "fine_tune/val_accuracy")
    assert [(m.step, m.value) for m in history] == [(1, 0.5), (2, 0.7)]
    # While a job runs the stage forwards at most every so often; at the end, everything.
    reports.metrics({"val_accuracy": 0.8, "lr": 0.01}, step=3)
    reports.metrics({"val_accuracy": 0.9, "lr": 0.01}, step=4)
    forwarder.forward(at_most_every_s=600)  # the last forward was just now: not yet
    assert len(client.get_metric_history(run_id, "fine_tune/val_accuracy")) == 2
    forwarder.forward()
    history = client.get_metric_history(run_id, "fine_tune/val_accuracy")
    assert [(m.step, m.value) for m in history] == [(1, 0.5), (2, 0.7), (3, 0.8), (4, 0.9)]
    EventLog(None).metrics({"val_accuracy": 1.0}, step=3)  # other ranks: nothing kept


def test_learning_rate_ramps_to_world_size_then_decays() -> None:
    warmup, total = 10, 100
    assert lr_multiplier(0, warmup, total, world_size=4) == 1.0
    assert lr_multiplier(5, warmup, total, world_size=4) == pytest.approx(2.5)
    assert lr_multiplier(warmup, warmup, total, world_size=4) == pytest.approx(4.0)
    assert lr_multiplier(total, warmup, total, world_size=4) == pytest.approx(0.4)
    assert lr_multiplier(0, 0, total, world_size=1) == 1.0
    ramp = [lr_multiplier(s, warmup, total, 4) for s in range(total + 1)]
    assert ramp[: warmup + 1] == sorted(ramp[: warmup + 1])
    assert ramp[warmup:] == sorted(ramp[warmup:], reverse=True)


def test_cpu_workers_allreduce_all_gradients_at_once_and_gpus_overlap_per_gradient() -> None:
    from tasks.training.distributed import allreduce_groups

    assert allreduce_groups("auto", use_cuda=False) == 1  # one fused allreduce per step
    assert allreduce_groups("auto", use_cuda=True) is None  # Horovod's default: per gradient, overlapped
    assert allreduce_groups(0, use_cuda=False) is None
    assert allreduce_groups(3, use_cuda=True) == 3


def test_checkpoint_fingerprint_covers_settings_and_world_size_not_run_bookkeeping(tmp_path: Path) -> None:
    job = fit_job(tmp_path, tmp_path / "prepared")
    assert job.fingerprint(2) == dataclasses.replace(job, run_id="abc", fault_after_epoch=1).fingerprint(2)
    assert job.fingerprint(2) != job.fingerprint(1)
    assert job.fingerprint(2) != dataclasses.replace(job, lr=0.001).fingerprint(2)
    assert job.fingerprint(2) != dataclasses.replace(job, backward_passes_per_step=2).fingerprint(2)


def test_early_stopping_counts_epochs_without_val_loss_improvement() -> None:
    from tasks.training.checkpoint import fresh_state
    from tasks.training.loop import record_epoch

    state = fresh_state()
    assert record_epoch(state, 1, {"val_loss": 1.0}, patience=2) == (True, False)
    assert record_epoch(state, 2, {"val_loss": 1.0}, patience=2) == (False, False)
    assert record_epoch(state, 3, {"val_loss": 1.5}, patience=2) == (False, True)
    assert state["epoch"] == 3 and state["best_val_loss"] == 1.0 and len(state["history"]) == 3


def test_only_an_unfinished_checkpoint_of_the_same_job_is_resumed(tmp_path: Path) -> None:
    from tasks.training.checkpoint import atomic_save, read_checkpoint

    path = tmp_path / "last.pt"
    assert read_checkpoint(path, "f") is None  # none yet
    atomic_save({"fingerprint": "f", "complete": False, "state": {"epoch": 2}}, path)
    assert read_checkpoint(path, "f")["state"] == {"epoch": 2}
    assert read_checkpoint(path, "other settings") is None
    atomic_save({"fingerprint": "f", "complete": True}, path)
    assert read_checkpoint(path, "f") is None  # that training finished
    path.write_bytes(b"torn")
    assert read_checkpoint(path, "f") is None
    assert not path.with_suffix(".pt.tmp").exists()


def test_checkpoints_load_with_weights_only_and_restore_every_rng(tmp_path: Path) -> None:
    """No pickled code in a checkpoint: RNG states are plain values, restored exactly."""
    import random

    from tasks.training.checkpoint import atomic_save, fresh_state, restore_rng, rng_state

    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    atomic_save({"state": fresh_state(), "rng": [rng_state()]}, tmp_path / "last.pt")
    expected = (random.random(), np.random.rand(3).tolist(), torch.rand(3))
    saved = torch.load(tmp_path / "last.pt", weights_only=True)
    assert saved["state"]["best_val_loss"] == float("inf") and saved["state"]["start"] is None
    restore_rng(saved["rng"][0])
    got = (random.random(), np.random.rand(3).tolist(), torch.rand(3))
    assert got[:2] == expected[:2] and torch.equal(got[2], expected[2])


def test_early_stopping_on_val_accuracy_keeps_the_most_accurate_epoch() -> None:
    from tasks.training.checkpoint import fresh_state
    from tasks.training.loop import record_epoch

    state = fresh_state()
    epochs = [(0.80, 0.50), (0.90, 0.60), (0.90, 0.55), (0.85, 0.40), (0.90, 0.58)]
    outcomes = [record_epoch(state, n, {"val_accuracy": a, "val_loss": l}, 2, "val_accuracy")
                for n, (a, l) in enumerate(epochs, start=1)]
    # higher accuracy improves; as accurate with a lower loss improves; a lower loss alone does not
    assert outcomes == [(True, False), (True, False), (True, False), (False, False), (False, True)]
    assert (state["best_val_accuracy"], state["best_val_loss"]) == (0.90, 0.55)
    with pytest.raises(ValueError, match="monitor"):
        fit_job(Path("x"), Path("y"), monitor="val_f1")


def test_a_run_still_improving_when_its_epochs_ran_out_says_by_how_much() -> None:
    """The late gain: the kept epoch's validation accuracy against the best before the last
    ``patience`` epochs, when the run used every epoch; the sensor baseline of 15 epochs
    (session 39) read 75.00% by epoch 10 and 78.73% at 15, and its students "beat" it."""
    from tasks.training.reporting import late_val_accuracy_gain_pts, still_improving

    def history(accuracies: list[float]) -> list[dict[str, float]]:
        return [{"epoch": n, "val_accuracy": a} for n, a in enumerate(accuracies, start=1)]

    rising = [0.26, 0.28, 0.28, 0.32, 0.31, 0.38, 0.51, 0.60, 0.69, 0.75, 0.74, 0.76, 0.78, 0.78, 0.7873]
    assert late_val_accuracy_gain_pts(history(rising), 15, epochs=15, patience=5) == pytest.approx(3.73)
    # the same curve ended by early stopping at epoch 14 (of 15): no claim
    assert late_val_accuracy_gain_pts(history(rising[:14]), 13, epochs=15, patience=5) == 0.0
    # flat at the end: the best before the window is as good
    flat = [0.63, 0.85, 0.93, 0.92, 0.96, 0.96, 0.95, 0.96, 0.9662, 0.9662, 0.9662, 0.96, 0.9662, 0.96, 0.9662]
    assert late_val_accuracy_gain_pts(history(flat), 15, epochs=15, patience=5) == pytest.approx(0.0)
    # the kept epoch (by val_loss) less accurate than an earlier one: negative, not hidden
    assert late_val_accuracy_gain_pts(history(flat[:14]), 14, epochs=14, patience=5) == pytest.approx(-0.62)
    # fewer epochs than patience + 1: the window leaves the first epoch before it
    assert late_val_accuracy_gain_pts(history([0.5, 0.7, 0.9]), 3, epochs=3, patience=3) == pytest.approx(40.0)
    assert late_val_accuracy_gain_pts(history([0.5]), 1, epochs=1, patience=3) == 0.0
    assert still_improving(3.73, 15, 5, tolerance_pts=1.0) == (
        "still improving when its 15 epochs ran out: validation accuracy +3.73 points in its last 5 epochs, "
        "where the gate tolerates 1")
    # within the gate's tolerance (two samples of a 266-sample split), nothing is said
    assert still_improving(0.75, 10, 5, tolerance_pts=1.0) is None and still_improving(1.0, 10, 5, 1.0) is None
    assert still_improving(40.0, 3, 3, 1.0).endswith("+40.00 points in its last 2 epochs, where the gate tolerates 1")
    assert still_improving(5.0, 2, 5, 0.5).endswith("+5.00 points in its last epoch, where the gate tolerates 0.5")


def test_fingerprint_counts_the_files_a_job_starts_from_by_content(tmp_path: Path) -> None:
    """A compress stage that writes a fine-tune's start weights and masks again, identically,
    resumes it; different masks are a different job."""
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        torch.save({"w": torch.ones(3, dtype=torch.bool)}, tmp_path / folder / "masks.pt")
    job = fit_job(tmp_path, tmp_path / "prepared", prune_masks=str(tmp_path / "a" / "masks.pt"))
    moved = dataclasses.replace(job, prune_masks=str(tmp_path / "b" / "masks.pt"), metric_prefix="fine_tune/")
    assert job.fingerprint(2) == moved.fingerprint(2)
    torch.save({"w": torch.tensor([True, False, True])}, tmp_path / "b" / "masks.pt")
    assert job.fingerprint(2) != moved.fingerprint(2)


def test_a_workers_next_job_on_the_same_data_reuses_its_shards_until_the_files_change(tmp_path: Path) -> None:
    """The jobs of a stage run one after another on the same workers: the second reads no
    data again; new splits written by the prepare stage are read, never the old ones."""
    from tasks.training.distributed import Placement
    from tasks.training.shards import LastShards

    prepared = tmp_path / "prepared"
    write_digits(prepared)
    job = fit_job(tmp_path, prepared)
    rank0 = Placement(rank=0, size=2, local_rank=0, device=torch.device("cpu"))
    shards = LastShards()
    first = shards.get(job, rank0)
    assert shards.get(fit_job(tmp_path / "next", prepared, metric_prefix="fine_tune/"), rank0) is first
    x, y = np.load(prepared / "train_x.npy"), np.load(prepared / "train_y.npy")
    np.save(prepared / "train_x.npy", x[:100])
    np.save(prepared / "train_y.npy", y[:100])
    again = shards.get(job, rank0)
    assert len(again.x_train) == 100 and torch.equal(again.y_train, torch.from_numpy(y[:100]))
    rank1 = shards.get(job, Placement(rank=1, size=2, local_rank=1, device=torch.device("cpu")))
    assert len(rank1.x_val) + len(again.x_val) == again.val_total and not torch.equal(rank1.y_val, again.y_val)


def test_prune_masks_put_pruned_weights_back_to_zero_after_a_step(tmp_path: Path) -> None:
    from tasks.training.adaptation import PruneMasks

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    mask = torch.rand(4, 6) > 0.5
    torch.save({"0.weight": mask}, tmp_path / "masks.pt")
    masks = PruneMasks.load(tmp_path / "masks.pt", model)
    masks.apply()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    torch.nn.functional.cross_entropy(model(torch.randn(8, 6)), torch.randint(0, 2, (8,))).backward()
    optimizer.step()
    assert masks.violations() > 0  # the step moved pruned weights...
    masks.apply()
    assert masks.violations() == 0  # ...and the mask put them back
    assert int((model[0].weight == 0).sum()) == int((~mask).sum())
    torch.save({"2.weight": mask}, tmp_path / "wrong.pt")
    with pytest.raises(ValueError, match="matches no parameter"):
        PruneMasks.load(tmp_path / "wrong.pt", model)


def test_qat_observers_averaged_over_ranks_give_every_rank_one_quantization() -> None:
    """Two ranks that observed different data hold the same ranges, scales and zero points
    after average_observers (the allreduce simulated: each tensor replaced by the ranks' mean)."""
    import copy

    from models.factory import build_model
    from models.spec import ModelSpec
    from tasks.training import qat

    torch.manual_seed(0)
    base = build_model(ModelSpec.from_dict({"family": "mlp", "hidden_sizes": [16], "dropout": 0.0}), (1, 8, 8), 10)
    ranks = [qat.prepare_qat_model(model, qat.quantized_engine()) for model in (base, copy.deepcopy(base))]
    for scale, model in zip((1.0, 3.0), ranks, strict=True):
        model(torch.randn(32, 1, 8, 8) * scale)  # each rank observes its own shard
    ranges = [[b.clone() for b in _ranges(model)] for model in ranks]
    assert not all(torch.equal(a, b) for a, b in zip(*ranges, strict=True))
    means = [(a + b) / 2 for a, b in zip(*ranges, strict=True)]

    class TwoRanks:
        Average = "average"

        def size(self) -> int:
            return 2

        def grouped_allreduce_(self, tensors, op, name) -> None:
            for tensor, mean in zip(tensors, means, strict=True):
                tensor.copy_(mean)

    for model in ranks:
        qat.average_observers(TwoRanks(), model)
    first, second = (model.state_dict() for model in ranks)
    for key in first:
        if "activation_post_process" in key or key.endswith(("scale", "zero_point")):
            assert torch.equal(first[key], second[key]), key


def _ranges(model: torch.nn.Module) -> list[torch.Tensor]:
    from tasks.training import qat

    return [b for fq in qat.fake_quantizers(model)
            for b in (fq.activation_post_process.min_val, fq.activation_post_process.max_val) if b.numel()]


def test_workers_set_threads_to_usable_cores_over_local_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    from tasks.training.distributed import THREADS_ENV, set_threads

    before = torch.get_num_threads()
    monkeypatch.setattr("tasks.training.launcher.usable_cores", lambda: 4)
    monkeypatch.delenv(THREADS_ENV, raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "99")
    monkeypatch.setenv("MKL_NUM_THREADS", "99")
    try:
        assert set_threads(local_workers=2) == 2 and torch.get_num_threads() == 2
        assert os.environ["OMP_NUM_THREADS"] == "2"
        monkeypatch.setenv(THREADS_ENV, "3")  # the launcher's choice wins
        assert set_threads(local_workers=2) == 3 and torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


# --------------------------------------------------------------------------- integration


@pytest.mark.parametrize(("model", "setting", "words"), [
    ({"family": "cnn"}, "family", ["cnn needs image inputs (C, H, W), got input shape (30,) "
                                   "(the data prepared in data/prepared); use one of mlp, lstm, gru"]),
    ({"family": "lstm", "vocab_size": 50}, "vocab_size", ["is 50 but the prepared data is not token ids (text); leave it null"]),
])
def test_a_model_that_cannot_read_the_prepared_data_is_refused_before_any_worker_starts(
    tmp_path: Path, model: dict, setting: str, words: list[str]
) -> None:
    """Rows of 30 features (an npz or a CSV's) and a family that reads images: one line naming
    the key, exit 2 (bad input: the flow does not retry it), no worker, no MLflow run. In
    the workers it was a traceback from each, retried twice by the flow."""
    from mlflow import MlflowClient

    from tasks.synthetic import tabular, write_splits

    project = make_project(tmp_path / "project", {"train": {"model": model}, "compress": ONE_VARIANT})
    x, y = tabular(samples=200)
    write_splits(project / "data" / "prepared", np.pad(x, ((0, 0), (0, 22))), y, 2, "rows")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    done = run_stage(project, uri)
    assert done.returncode == 2, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, done.stderr[-3000:]
    assert errors[0].startswith(f"error: train: params.yaml: train.model.{setting}"), errors[0]
    for word in words:
        assert word in errors[0], (word, errors[0])
    assert "Traceback" not in done.stderr and "horovodrun" not in done.stderr and "<stderr>" not in done.stderr
    if (tmp_path / "mlflow.db").exists():
        assert not MlflowClient(uri).search_runs([e.experiment_id for e in MlflowClient(uri).search_experiments()])


@pytest.mark.integration
def test_default_cnn_on_two_workers_reaches_95_percent_and_is_recorded(default_stage: Path, shared_mlflow: str) -> None:
    from mlflow import MlflowClient

    log = (default_stage / "stage.log").read_text()
    assert "horovodrun --gloo -np 2 -H localhost:2" in log
    assert "threads_per_worker=1" in log  # 2 cores // 2 local workers
    assert re.search(r"epoch 1/15 .* samples/s", log), log[-3000:]
    accuracy = accuracy_on_test_split(default_stage / "artifacts" / "model", default_stage / "data" / "prepared")
    assert accuracy >= 0.95, f"test accuracy {accuracy:.4f}"

    metrics = json.loads((default_stage / "metrics" / "train.json").read_text())
    history = json.loads((default_stage / "plots" / "train_history.json").read_text())
    assert metrics["world_size"] == 2 and len(history) == metrics["epochs_run"]
    assert (default_stage / "artifacts" / "checkpoints" / "best.pt").exists()

    (run,) = mlflow_runs(shared_mlflow, "default")
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["world_size"] == "2" and params["threads_per_worker"] == "1"
    assert params["train.epochs"] == "15" and params["train.model.family"] == "cnn"
    client = MlflowClient(shared_mlflow)
    for key in ("train_loss", "val_loss", "train_accuracy", "val_accuracy", "samples_per_s", "epoch_time_s"):
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert sorted(steps) == list(range(1, metrics["epochs_run"] + 1)), key
    assert run.data.metrics["best_epoch"] == metrics["best_epoch"]
    # Whether it was still improving when its epochs ran out, from its own curve.
    window = history[: len(history) - 5]
    late_gain = 100 * (history[metrics["best_epoch"] - 1]["val_accuracy"] - max(h["val_accuracy"] for h in window))
    assert metrics["val_accuracy_late_gain_pts"] == pytest.approx(late_gain if len(history) == 15 else 0.0, abs=1e-6)
    assert run.data.metrics["val_accuracy_late_gain_pts"] == pytest.approx(metrics["val_accuracy_late_gain_pts"])
    # The stage's run is the baseline's one place in MLflow: the manifest names it, so the
    # evaluate stage logs the model (a pyfunc, like every variant) and its figures there.
    manifest = json.loads((default_stage / "artifacts" / "model" / "manifest.json").read_text())
    assert manifest["mlflow_run_id"] == run.info.run_id and run.data.tags["model"] == "baseline"
    # ...and whether val_loss kept a less accurate epoch than another, from the same curve.
    top = max(range(len(history)), key=lambda i: (history[i]["val_accuracy"], -i))
    missed = 100 * (history[top]["val_accuracy"] - history[metrics["best_epoch"] - 1]["val_accuracy"])
    assert metrics["most_accurate_epoch"] == top + 1
    assert metrics["val_accuracy_missed_pts"] == pytest.approx(missed, abs=1e-6)
    assert run.data.metrics["val_accuracy_missed_pts"] == pytest.approx(missed, abs=1e-6)
    assert manifest["fit"] == {"epochs": 15, "epochs_run": metrics["epochs_run"], "patience": 5,
                               "val_accuracy_late_gain_pts": metrics["val_accuracy_late_gain_pts"],
                               "monitor": "val_loss", "most_accurate_epoch": top + 1,
                               "val_accuracy_missed_pts": metrics["val_accuracy_missed_pts"],
                               # the best epoch on its training rows and on validation (a model that memorized)
                               "train_accuracy": metrics["train_accuracy"], "val_accuracy": metrics["val_accuracy"]}
    files = {a.path for a in client.list_artifacts(run.info.run_id, "baseline")}
    assert files == {"baseline/manifest.json", "baseline/model.pt"}
    assert manifest["nonzeros"] <= manifest["parameters"]


@pytest.mark.integration
def test_two_worker_rerun_with_the_same_seed_is_identical(default_stage: Path, tmp_path: Path) -> None:
    metrics, history, weights = run_fit(default_stage_job(default_stage, tmp_path), workers=2)
    first_metrics, first_history, first_weights = default_stage_outputs(default_stage)
    assert without_timing(history) == without_timing(first_history)
    assert without_timing([metrics]) == without_timing([first_metrics])
    for name, tensor in first_weights.items():
        assert torch.equal(weights[name], tensor), name


@pytest.mark.integration
def test_jobs_in_turn_on_one_set_of_workers_train_as_if_each_were_launched_alone(
    default_stage: Path, digits_prepared: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """The compress stage's pool: after another job (another model, seed and data order) on
    the same two workers, the default job trains exactly the model its own launch trained."""
    from tasks.core.config import TrainParams
    from tasks.training import launch_fit, worker_pool

    params = TrainParams(workers=2)
    other = fit_job(tmp_path / "other", digits_prepared, spec={"family": "mlp", "hidden_sizes": [64]}, seed=7)
    default = default_stage_job(default_stage, tmp_path / "default")
    with worker_pool(params, REPO) as pool:
        launch_fit(other, params, REPO)
        launch_fit(default, params, REPO)
    assert (pool.launches, pool.jobs) == (1, 2)
    workers_said = capfd.readouterr().err  # the device once per set of workers, each job's curve
    assert workers_said.count("no CUDA GPU found") == 1 and workers_said.count("best epoch") == 2, workers_said[-3000:]
    metrics, history, weights = read_outputs(Path(default.metrics_path), Path(default.history_path),
                                             Path(default.output))
    first_metrics, first_history, first_weights = default_stage_outputs(default_stage)
    assert without_timing(history) == without_timing(first_history)
    assert without_timing([metrics]) == without_timing([first_metrics])
    for name, tensor in first_weights.items():
        assert torch.equal(weights[name], tensor), name
    # The second job's energy starts where the first's ended: its epochs and little else.
    epochs_energy = sum(row["epoch_energy_j"] for row in history)
    assert epochs_energy <= metrics["train_energy_j"] < 1.5 * epochs_energy + 10.0


@pytest.mark.integration
def test_per_gradient_allreduce_trains_the_same_model_as_the_fused_default(default_stage: Path, tmp_path: Path) -> None:
    """allreduce_groups changes how gradients travel (one fused allreduce, or one per gradient
    overlapped with backward), not what the workers learn."""
    assert default_stage_job(default_stage, tmp_path).allreduce_groups == "auto"  # the default run: fused on CPU
    metrics, history, weights = run_fit(default_stage_job(default_stage, tmp_path, allreduce_groups=0), workers=2)
    first_metrics, first_history, first_weights = default_stage_outputs(default_stage)
    assert_rows_close(history, first_history, rel=1e-6)
    assert_rows_close([metrics], [first_metrics], rel=1e-6)
    for name, tensor in first_weights.items():
        torch.testing.assert_close(weights[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    log = (default_stage / "stage.log").read_text()
    assert "allreduce=1 group(s) per step" in log


@pytest.mark.integration
def test_a_crashed_worker_fails_the_stage_and_the_rerun_resumes_to_the_same_model(
    default_stage: Path, tmp_path: Path, shared_mlflow: str
) -> None:
    project = digits_project(tmp_path / "project", "crash")
    crashed = run_stage(project, shared_mlflow, SLIMFLOW_FAULT_AFTER_EPOCH="2")
    assert crashed.returncode != 0
    assert "error: train: training workers failed" in crashed.stderr
    assert "worker 1 exited with status 17" in crashed.stderr, crashed.stderr[-3000:]
    (failed,) = mlflow_runs(shared_mlflow, "crash")
    assert failed.info.status == "FAILED"
    assert not (project / "artifacts" / "model" / "manifest.json").exists()

    resumed = run_stage(project, shared_mlflow)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    match = re.search(r"resuming from checkpoint at epoch (\d+)", resumed.stderr)
    assert match and int(match.group(1)) == 2, resumed.stderr[-3000:]
    assert "epoch 1/15 " not in resumed.stderr and "epoch 3/15 " in resumed.stderr
    runs = mlflow_runs(shared_mlflow, "crash")
    assert [r.info.status for r in runs] == ["FAILED", "FINISHED"]
    assert runs[1].data.params["resumed_from_epoch"] == "2"

    expected = default_stage_outputs(default_stage)
    actual = read_outputs(project / "metrics" / "train.json", project / "plots" / "train_history.json",
                          project / "artifacts" / "model")
    assert_rows_close([actual[0]], [expected[0]], rel=1e-6)
    assert_rows_close(actual[1], expected[1], rel=1e-6)
    # The energy of the epochs before the crash counts too (from the checkpoint's history).
    assert actual[0]["train_energy_j"] >= sum(row["epoch_energy_j"] for row in actual[1]) > 0
    for name, tensor in expected[2].items():
        torch.testing.assert_close(actual[2][name], tensor, rtol=1e-5, atol=1e-6, msg=name)


@pytest.fixture(scope="module")
def digits_prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    prepared = tmp_path_factory.mktemp("digits") / "prepared"
    write_digits(prepared)
    return prepared


MLP_WITHOUT_DROPOUT = {"family": "mlp", "hidden_sizes": [32], "dropout": 0.0}
# One-worker runs (plain processes, Horovod size 1) on the tiny budget, by name.
ONE_WORKER_JOBS: dict[str, dict] = {
    **{family: {"spec": {"family": family, "width": 0.5}, "epochs": 2} for family in ("mlp", "cnn", "lstm", "gru")},
    "repeat-1": {"epochs": 2},
    "repeat-2": {"epochs": 2},
    "whole-batches": {"spec": MLP_WITHOUT_DROPOUT, "epochs": 2},
    "accumulated-halves": {"spec": MLP_WITHOUT_DROPOUT, "epochs": 2, "batch_size": 16, "backward_passes_per_step": 2},
}


@pytest.fixture(scope="module")
def one_worker_runs(digits_prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """Every one-worker job, as many at a time as there are cores (one thread each).

    Each entry is (metrics, history, weights, folder), or the exception its launch raised.
    """
    from concurrent.futures import ThreadPoolExecutor

    from tasks.training.launcher import usable_cores

    root = tmp_path_factory.mktemp("one-worker")

    def launch(name: str) -> object:
        folder = root / name
        try:
            return (*run_fit(fit_job(folder, digits_prepared, **ONE_WORKER_JOBS[name]), workers=1, threads=1), folder)
        except Exception as err:  # reported by the test that needs this run
            return err

    with ThreadPoolExecutor(max_workers=usable_cores()) as pool:
        return dict(zip(ONE_WORKER_JOBS, pool.map(launch, ONE_WORKER_JOBS), strict=True))


def one_worker(runs: dict[str, object], name: str) -> tuple[dict, list[dict], dict[str, torch.Tensor], Path]:
    outcome = runs[name]
    if isinstance(outcome, Exception):
        raise AssertionError(f"one-worker run {name!r} failed: {outcome}") from outcome
    return outcome  # type: ignore[return-value]


@pytest.mark.integration
def test_one_worker_rerun_with_the_same_seed_is_identical(one_worker_runs: dict[str, object]) -> None:
    first, second = one_worker(one_worker_runs, "repeat-1"), one_worker(one_worker_runs, "repeat-2")
    assert first[0]["world_size"] == 1
    assert without_timing(first[1]) == without_timing(second[1])
    assert without_timing([first[0]]) == without_timing([second[0]])
    for name, tensor in first[2].items():
        assert torch.equal(second[2][name], tensor), name


@pytest.mark.integration
def test_gradient_accumulation_equals_one_batch_of_the_whole_group(one_worker_runs: dict[str, object]) -> None:
    """backward_passes_per_step=2 over batches of 16 is one step on 32 samples (no dropout, no BN)."""
    _, whole, whole_weights, _ = one_worker(one_worker_runs, "whole-batches")
    _, split, split_weights, _ = one_worker(one_worker_runs, "accumulated-halves")
    # As many optimizer steps, hence the same learning-rate schedule.
    assert [row["lr"] for row in split] == pytest.approx([row["lr"] for row in whole], rel=1e-9)
    assert_rows_close(split, whole, rel=1e-4)
    for name, tensor in whole_weights.items():
        torch.testing.assert_close(split_weights[name], tensor, rtol=1e-3, atol=1e-4, msg=name)


@pytest.mark.integration
@pytest.mark.parametrize("family", ["mlp", "cnn", "lstm", "gru"])
def test_each_model_family_learns_on_a_tiny_budget(
    family: str, one_worker_runs: dict[str, object], digits_prepared: Path
) -> None:
    metrics, history, _, folder = one_worker(one_worker_runs, family)
    accuracy = accuracy_on_test_split(folder / "model", digits_prepared)
    assert accuracy > 0.2, f"{family}: test accuracy {accuracy:.3f} (chance 0.1)"
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert metrics["world_size"] == 1 and metrics["threads_per_worker"] == 1


def test_ctrl_c_ends_a_training_worker_with_130_and_no_traceback(tmp_path: Path) -> None:
    """Ctrl-C reaches every process of the terminal's group, the Horovod workers too (a
    serve's interrupted run printed a worker's KeyboardInterrupt traceback, forwarded by
    horovodrun): a worker interrupted mid-epoch leaves quietly, with the shell's 128 + SIGINT."""
    import signal
    import time

    from tasks.training.pool import SERVE_FLAG, job_file

    write_digits(tmp_path / "prepared")
    control = tmp_path / "control"
    control.mkdir()
    fit_job(tmp_path, tmp_path / "prepared", epochs=500, patience=500).write(job_file(control, 1))
    log = tmp_path / "worker.log"
    with open(log, "wb") as stderr:
        # As from a terminal: a shell without job control (CI, `make test &`) starts its
        # background commands with SIGINT ignored, and the worker would inherit that.
        worker = subprocess.Popen([sys.executable, "-m", "tasks.training.worker", SERVE_FLAG, str(control)],
                                  cwd=REPO, stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr,
                                  preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 120
        while "epoch 2/500" not in log.read_text() and worker.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "epoch 2/500" in log.read_text(), log.read_text()[-2000:]
        worker.send_signal(signal.SIGINT)
        assert worker.wait(timeout=60) == 128 + signal.SIGINT, log.read_text()[-2000:]
    finally:
        if worker.poll() is None:
            worker.kill()
    assert "Traceback" not in log.read_text(), log.read_text()[-3000:]


def test_a_killed_stages_shared_pool_folder_is_removed_by_the_next_pool_of_its_host(tmp_path: Path) -> None:
    """kill -9 of a multi-host stage leaves its control folder in the project's .slimflow/;
    the next pool on that host removes it, and keeps live stages' and other hosts' folders."""
    import socket

    from tasks.training.pool import SHARED_FOLDER_PREFIX, remove_dead_control_folders, shared_control_folder

    folder = tmp_path / ".slimflow"
    dead_pid = subprocess.Popen(["true"])  # a stage that is gone
    dead_pid.wait()
    here = f"{SHARED_FOLDER_PREFIX}{socket.gethostname()}-"
    dead = folder / f"{here}{dead_pid.pid}"
    live = shared_control_folder(tmp_path)
    elsewhere = folder / f"{SHARED_FOLDER_PREFIX}another-host-{dead_pid.pid}"
    for control in (dead, live, elsewhere):
        control.mkdir(parents=True)
        (control / "job-1.json").write_text("{}")
    assert live.parent == folder and live.name == f"{here}{os.getpid()}"
    assert remove_dead_control_folders(folder) == [dead]
    assert not dead.exists() and live.exists() and elsewhere.exists()


def test_a_killed_stages_local_pool_folder_is_removed_by_the_next_pool(tmp_path: Path) -> None:
    """The same for a one-host pool's folder in the temporary directory: named after the
    stage's pid, removed once that process is gone; a live stage's stays."""
    from tasks.training.pool import LOCAL_FOLDER_PREFIX, remove_dead_control_folders

    gone = subprocess.Popen(["true"])
    gone.wait()
    dead = tmp_path / f"{LOCAL_FOLDER_PREFIX}{gone.pid}-k2x9a"
    live = tmp_path / f"{LOCAL_FOLDER_PREFIX}{os.getpid()}-q81zd"
    for control in (dead, live):
        control.mkdir()
        (control / "job-1.json").write_text("{}")
    assert remove_dead_control_folders(tmp_path, LOCAL_FOLDER_PREFIX) == [dead]
    assert not dead.exists() and live.exists()
