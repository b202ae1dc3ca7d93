"""Baseline and every variant as rows for :func:`tasks.core.tables.results_table`: the
closing table the stage prints, and the cells of the report's Markdown tables."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from tasks.core import metric_names as names
from tasks.core.tables import PAYBACK_NOTE, change_noise_note, results_table
from tasks.evaluation.results import Evaluation

# Keys of tasks.core.tables.COLUMNS. The report shows every figure in two tables that fit a
# page: the headline figures, then the details; the closing table shows the headline.
HEADLINE_COLUMNS = (
    "model", "method", names.ACCURACY, names.ACCURACY_CHANGE_PTS, names.SIZE_BYTES, names.SIZE_REDUCTION_X,
    names.LATENCY_P50_MS, names.SPEEDUP_X, "gate",
)
DETAIL_COLUMNS = (
    "model", "runtime", names.MACRO_F1, names.LATENCY_P95_MS, names.CPU_TIME_P50_MS, names.THROUGHPUT_SPS,
    names.THROUGHPUT_GAIN_X, names.PARAMETERS, names.NONZEROS, names.FLOPS, names.PEAK_MEMORY_MB,
)
# What each model costs in energy: to serve (per 1,000 predictions) and to make, and when a
# variant's saving has repaid its making.
ENERGY_COLUMNS = (
    "model", names.ENERGY_PER_1K_J, names.ENERGY_PER_1K_BATCH1_J, names.CO2E_PER_1K_G, names.ENERGY_SAVED_PER_1K_J,
    names.MAKE_ENERGY_J, names.PAYBACK_PREDICTIONS,
)
# The closing table fits 160 columns with the energy figures: runtime and p95 are in the
# report's details.
SUMMARY_COLUMNS = (
    "model", names.ACCURACY, names.ACCURACY_CHANGE_PTS, names.SIZE_BYTES, names.SIZE_REDUCTION_X,
    names.LATENCY_P50_MS, names.SPEEDUP_X, names.THROUGHPUT_SPS, names.ENERGY_PER_1K_J,
    names.PAYBACK_PREDICTIONS, "gate",
)


def gate_mark(evaluation: Evaluation, name: str) -> str:
    """``champion``, ``pass`` or ``fail``: the gate's verdict on one model, as a word."""
    if name == evaluation.champion:
        return "champion"
    return "pass" if evaluation.models[name].metrics.get(names.PASSED_GATE) == 1.0 else "fail"


def summary_rows(evaluation: Evaluation) -> list[dict[str, Any]]:
    """One row per model, keyed like ``COLUMNS`` (the table and the report share them)."""
    return [
        {**result.metrics, "model": name, "method": result.method, "runtime": result.runtime,
         "gate": gate_mark(evaluation, name)}
        for name, result in evaluation.models.items()
    ]


def summary_table(evaluation: Evaluation) -> Table:
    """The closing rich table: baseline and every variant, the numbers of evaluate.json."""
    s = evaluation.settings
    promotion = evaluation.promotion
    caption = (
        f"{s['threads']} thread(s), p50/p95 at batch 1, samples/s at batch {s['throughput_batch']}"
        + (f", sequences of {s['sequence_length']} token ids" if "sequence_length" in s else "") + "; "
        f"energy at batch {s['throughput_batch']}: {s['energy_source']}; {PAYBACK_NOTE}; "
        f"size × / speed × = times smaller / faster than the baseline; {change_noise_note(s)}. "
        + (promotion.reason if promotion else "")
    )
    return results_table(
        summary_rows(evaluation), SUMMARY_COLUMNS, caption=caption,
        title="slimflow evaluation (test split" + (f": {s['test_split']})" if "test_split" in s else ")"),
        highlight=lambda row: row["gate"] == "champion",
    )
