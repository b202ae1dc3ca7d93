"""Baseline and every variant as rows for :func:`tasks.core.tables.results_table`: the
closing table the stage prints, and the cells of the report's Markdown table."""

from __future__ import annotations

import math
from typing import Any

from rich.table import Table

from tasks.core.tables import results_table
from tasks.evaluation.results import Evaluation

# Keys of tasks.core.tables.COLUMNS: every figure (the report), and the closing table's.
REPORT_COLUMNS = (
    "model", "method", "runtime", "accuracy", "accuracy_change", "macro_f1", "size_bytes", "size_reduction",
    "latency_p50_ms", "latency_p95_ms", "speedup", "cpu_time_p50_ms", "throughput_sps", "flops",
    "peak_memory_mb", "energy_per_1k_j", "gate",
)
SUMMARY_COLUMNS = (
    "model", "runtime", "accuracy", "accuracy_change", "size_bytes", "size_reduction",
    "latency_p50_ms", "latency_p95_ms", "speedup", "throughput_sps", "gate",
)


def _times_better(ratio: float) -> float:
    """A value / baseline ratio as "times smaller / faster than the baseline"."""
    return 1.0 / ratio if ratio and math.isfinite(ratio) else math.nan


def gate_mark(metrics: dict[str, float]) -> str:
    return "champion" if metrics["champion"] else ("pass" if metrics["passed_gate"] else "fail")


def summary_rows(evaluation: Evaluation) -> list[dict[str, Any]]:
    """One row per model, keyed like ``COLUMNS`` (the table and the report share them)."""
    rows = []
    for name, result in evaluation.models.items():
        m = result.metrics
        rows.append({
            **m,
            "model": name,
            "method": result.method,
            "runtime": result.runtime,
            "accuracy_change": m["accuracy_delta"],
            "size_reduction": _times_better(m["size_ratio"]),
            "speedup": _times_better(m["latency_ratio"]),
            "gate": gate_mark(m),
        })
    return rows


def summary_table(evaluation: Evaluation) -> Table:
    """The closing rich table: baseline and every variant, the numbers of evaluate.json."""
    s = evaluation.settings
    promotion = evaluation.promotion
    caption = (
        f"{s['threads']} thread(s), p50/p95 at batch 1, samples/s at batch {s['throughput_batch']}"
        + (f", sequences of {s['sequence_length']} token ids" if "sequence_length" in s else "") + "; "
        f"energy: {s['energy_source']}; size × / speed × = times smaller / faster than the baseline. "
        + (promotion.reason if promotion else "")
    )
    return results_table(
        summary_rows(evaluation), SUMMARY_COLUMNS, title="slimflow evaluation (test split)", caption=caption,
        highlight=lambda row: row["gate"] == "champion",
    )
