"""What the evaluate stage measured and decided, as plain data: one :class:`ModelResult`
per model (the same metric keys for every model), the :class:`Evaluation` around them,
and the ratios to the baseline."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

BASELINE = "baseline"
# Metric keys in the order tables show them; per-class precision/recall follow macro_f1.
HEAD_KEYS = ("accuracy", "accuracy_delta", "macro_f1")
TAIL_KEYS = (
    "parameters", "nonzeros", "sparsity", "size_bytes", "size_ratio", "flops",
    "latency_p50_ms", "latency_p95_ms", "latency_mean_ms", "latency_ratio", "cpu_time_p50_ms",
    "throughput_sps", "throughput_ratio", "peak_memory_mb", "load_memory_mb",
    "energy_per_1k_j", "threads", "passed_gate", "champion",
)


class EvaluateError(RuntimeError):
    """An input of the stage is missing or unreadable; the message names it."""


@dataclass
class ModelResult:
    """One model's measurements (``metrics`` has the same keys for every model)."""

    name: str
    folder: Path
    manifest: dict[str, Any]
    metrics: dict[str, float]
    predictions: np.ndarray
    confusion: np.ndarray
    notes: dict[str, str] = field(default_factory=dict)  # how a figure was obtained

    @property
    def method(self) -> str:
        return str(self.manifest.get("method") or BASELINE)

    @property
    def runtime(self) -> str:
        return str(self.manifest.get("runtime", "unknown"))


@dataclass
class Evaluation:
    """Everything the stage measured and decided."""

    models: dict[str, ModelResult]  # the baseline first
    class_names: tuple[str, ...]
    y_true: np.ndarray
    settings: dict[str, Any]
    champion: str | None = None
    reasons: dict[str, str] = field(default_factory=dict)
    promotion: Any = None  # tasks.evaluation.promotion.Promotion
    run_ids: dict[str, str] = field(default_factory=dict)
    stage_run_id: str | None = None

    def metrics(self) -> dict[str, dict[str, float]]:
        return {name: result.metrics for name, result in self.models.items()}

    @property
    def shown_model(self) -> str:
        """The model whose confusion matrix is published: the champion, else the baseline."""
        return self.champion or BASELINE


def add_ratios(results: Mapping[str, ModelResult]) -> None:
    """size_ratio, latency_ratio, throughput_ratio and accuracy_delta vs. the baseline."""
    base = results[BASELINE].metrics

    def ratio(value: float, reference: float) -> float:
        return value / reference if reference and not math.isnan(reference) and not math.isnan(value) else math.nan

    for result in results.values():
        metrics = result.metrics
        metrics["accuracy_delta"] = metrics["accuracy"] - base["accuracy"]
        metrics["size_ratio"] = ratio(metrics["size_bytes"], base["size_bytes"])
        metrics["latency_ratio"] = ratio(metrics["latency_p50_ms"], base["latency_p50_ms"])
        metrics["throughput_ratio"] = ratio(metrics["throughput_sps"], base["throughput_sps"])
        metrics.setdefault("passed_gate", math.nan)
        metrics.setdefault("champion", 0.0)


def ordered_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    """The metric dict in table order (head, per-class, tail)."""
    head = {k: metrics[k] for k in HEAD_KEYS if k in metrics}
    tail = {k: metrics[k] for k in TAIL_KEYS if k in metrics}
    middle = {k: v for k, v in metrics.items() if k not in head and k not in tail}
    return {**head, **dict(sorted(middle.items(), key=lambda kv: (kv[0].split("_", 1)[0], kv[0]))), **tail}


def json_number(value: Any) -> Any:
    """A metric value as JSON holds it: NaN/inf as None (the key stays), whole floats as int."""
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN; the key stays, so every model keeps the same keys
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    return value
