"""What rank 0 reports: params and per-epoch metrics (for MLflow), the summary and history files.

The workers never import MLflow (1.5-2 s of a worker's start, on the way to its first
epoch while the other ranks wait): rank 0 appends its reports to the job's event file
(:class:`EventLog`), and the stage that launched the job, MLflow already loaded, logs them
into its run as they come (:class:`EventForwarder`, called by :mod:`tasks.training.pool`
while it waits), so the curves still fill in live in the MLflow UI.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any


class MlflowLogger:
    """Logs into the run the launching stage opened (that stage ends the run, not us): rank
    0's reports (:class:`EventForwarder`), or a reused training's curve.

    Without a run id (runs without MLflow) every call does nothing. ``prefix``
    goes before every key: a compressed variant's run holds its own final figures under the
    plain keys and its fine-tuning curve under ``fine_tune/...``.
    """

    def __init__(self, run_id: str | None, prefix: str = "") -> None:
        self.run_id = run_id
        self.prefix = prefix
        self.client = None
        if run_id:
            from mlflow import MlflowClient

            self.client = MlflowClient()

    def params(self, values: dict[str, Any]) -> None:
        if self.client:
            from mlflow.entities import Param

            self.client.log_batch(self.run_id, params=[Param(self.prefix + k, str(v)) for k, v in values.items()])

    def metrics(self, values: dict[str, float], step: int) -> None:
        self.history([{**values, "epoch": step}])

    def history(self, rows: list[dict[str, float]]) -> None:
        """Per-epoch metrics; ``epoch`` is the MLflow step."""
        if self.client and rows:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            batch = [
                Metric(self.prefix + k, float(v), now, int(row["epoch"]))
                for row in rows for k, v in row.items() if k != "epoch"
            ]
            for start in range(0, len(batch), 1000):  # MLflow's log_batch limit
                self.client.log_batch(self.run_id, metrics=batch[start : start + 1000])


class EventLog:
    """Rank 0's params and per-epoch metrics as JSON lines in ``path`` (None: nothing is kept)."""

    def __init__(self, path: str | None) -> None:
        self.path = Path(path) if path else None

    def params(self, values: dict[str, Any]) -> None:
        self._append({"params": {key: str(value) for key, value in values.items()}})

    def metrics(self, values: dict[str, float], step: int) -> None:
        self.history([{**values, "epoch": step}])

    def history(self, rows: list[dict[str, float]]) -> None:
        """Per-epoch metrics; ``epoch`` is the MLflow step."""
        if rows:
            self._append({"history": rows})

    def _append(self, event: dict[str, Any]) -> None:
        if self.path is not None:
            with self.path.open("a") as events:
                events.write(json.dumps(event) + "\n")


class EventForwarder:
    """The launching stage's side of :class:`EventLog`: what rank 0 reported since the last
    call, logged into the job's MLflow run (only whole lines: rank 0 may be mid-write)."""

    def __init__(self, path: Path, logger: MlflowLogger) -> None:
        self.path = path
        self.logger = logger
        self.offset = 0
        self.forwarded_at = -math.inf

    def forward(self, at_most_every_s: float = 0.0) -> None:
        """Log what came since the last call, in one ``log_batch`` for the params and one for
        the epochs (a SQLite transaction each); with ``at_most_every_s``, a call sooner than
        that after the last one that logged does nothing (while a job runs)."""
        now = time.monotonic()
        if now - self.forwarded_at < at_most_every_s:
            return
        try:
            with self.path.open("rb") as events:
                events.seek(self.offset)
                data = events.read()
        except FileNotFoundError:
            return
        self.forwarded_at = now
        complete = data[: data.rfind(b"\n") + 1]
        self.offset += len(complete)
        params: dict[str, Any] = {}
        rows: list[dict[str, float]] = []
        for line in complete.splitlines():
            event = json.loads(line)
            params.update(event.get("params", {}))
            rows.extend(event.get("history", []))
        if params:
            self.logger.params(params)
        self.logger.history(rows)


def late_val_accuracy_gain_pts(history: list[dict[str, float]], best_epoch: int, epochs: int, patience: int) -> float:
    """How much the kept epoch's validation accuracy gained in the run's last ``patience``
    epochs, in points: its accuracy minus the best one before them; 0 when early stopping
    ended the run before ``epochs`` (it had found no gain for ``patience`` epochs). Above what
    the gate tolerates, the run was still improving when its epochs ran out: more epochs would
    likely give a stronger model. Negative where the kept epoch, chosen by val_loss, is less
    accurate than an earlier one.
    """
    if len(history) < max(epochs, 2):
        return 0.0
    before = history[: len(history) - late_window(len(history), patience)]
    return round(100.0 * (history[best_epoch - 1]["val_accuracy"] - max(h["val_accuracy"] for h in before)), 6)


def missed_val_accuracy(history: list[dict[str, float]], best_epoch: int) -> tuple[int, float]:
    """The most accurate epoch on the validation split (the first of equals), and how many
    points its accuracy is above the kept epoch's: more than 0 only where the kept epoch was
    chosen by ``val_loss`` (``train.monitor``), which can keep a less accurate epoch."""
    if not history:
        return best_epoch, 0.0
    top = max(range(len(history)), key=lambda i: (history[i]["val_accuracy"], -i))
    return top + 1, round(100.0 * (history[top]["val_accuracy"] - history[best_epoch - 1]["val_accuracy"]), 6)


def kept_less_accurate(best_epoch: int, top_epoch: int, missed_pts: float, tolerance_pts: float) -> str | None:
    """``missed_pts`` (:func:`missed_val_accuracy`) in words when it is more than
    ``tolerance_pts`` (the gate's ``max_accuracy_drop`` in points), else None."""
    if missed_pts <= tolerance_pts + 1e-9:
        return None
    return (f"kept epoch {best_epoch} by val_loss, but epoch {top_epoch} was {missed_pts:.2f} points more accurate "
            f"on the validation split, where the gate tolerates {tolerance_pts:g} (train.monitor=val_accuracy keeps "
            "the most accurate epoch)")


def late_window(epochs: int, patience: int) -> int:
    """The last epochs :func:`late_val_accuracy_gain_pts` looks at: ``patience``, leaving one before them."""
    return max(1, min(patience, epochs - 1))


def still_improving(gain_pts: float, epochs: int, patience: int, tolerance_pts: float) -> str | None:
    """``gain_pts`` (:func:`late_val_accuracy_gain_pts`) in words when it is more than
    ``tolerance_pts`` (the gate's ``max_accuracy_drop`` in points: the scale every verdict of a
    run is made on; a gain within it may be a sample or two of the validation split), else None."""
    if gain_pts <= tolerance_pts + 1e-9:
        return None
    window = late_window(epochs, patience)
    return (f"still improving when its {epochs} epochs ran out: validation accuracy {gain_pts:+.2f} points "
            f"in its last {'epoch' if window == 1 else f'{window} epochs'}, where the gate tolerates {tolerance_pts:g}")


def summary(
    best_epoch: int, history: list[dict[str, float]], epochs_run: int, world_size: int, threads: int, parameters: int
) -> dict[str, Any]:
    """The summary metrics of a finished run: those of its best epoch, and its mean throughput."""
    best = history[best_epoch - 1]
    return {
        "best_epoch": best_epoch, "epochs_run": epochs_run, "world_size": world_size,
        "threads_per_worker": threads, "val_accuracy": best["val_accuracy"],
        "val_loss": best["val_loss"], "train_accuracy": best["train_accuracy"],
        "train_loss": best["train_loss"],
        "samples_per_s": sum(h["samples_per_s"] for h in history) / len(history),
        "parameters": parameters,
    }


def write_json(target: str | None, payload: Any) -> None:
    """Write ``payload`` to ``target`` (if any) as the stage's metrics and plots files are written."""
    if target:
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        Path(target).write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
