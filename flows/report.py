"""The comparison of baseline and variants, read from the evaluate stage's metrics.

Kept free of Prefect imports: the CLI uses it without starting a flow.
"""

from __future__ import annotations

import json
import math
from typing import Any

from tasks.core import metric_names as names
from tasks.core.paths import ProjectPaths

# What `slimflow run` and `slimflow report` show (keys of tasks.core.tables.COLUMNS); it fits
# 160 columns with the energy figures (p95 is in the report and metrics/evaluate.json).
COMPARISON_COLUMNS = (
    "model", names.ACCURACY, names.ACCURACY_CHANGE_PTS, names.SIZE_BYTES, names.SIZE_REDUCTION_X,
    names.LATENCY_P50_MS, names.SPEEDUP_X, names.THROUGHPUT_SPS, names.ENERGY_PER_1K_J,
    names.MAKE_ENERGY_J, names.PAYBACK_PREDICTIONS, "gate",
)


def _ratio(numerator: Any, denominator: Any) -> float | None:
    if isinstance(numerator, (int, float)) and isinstance(denominator, (int, float)) and denominator:
        return numerator / denominator
    return None


def _payback(name: str, values: dict[str, Any], baseline: dict[str, Any]) -> float | None:
    """Predictions until the variant repays its making (inf: never); None for the baseline or
    without energy figures. The file holds inf as null: a null payback beside the figures it
    comes from is `never`; a file from before the payback was a figure: computed here."""
    make, energy, reference = (values.get(names.MAKE_ENERGY_J), values.get(names.ENERGY_PER_1K_J),
                               baseline.get(names.ENERGY_PER_1K_J))
    if name == "baseline" or not all(isinstance(v, (int, float)) for v in (make, energy, reference)):
        return None
    if names.PAYBACK_PREDICTIONS in values:
        payback = values[names.PAYBACK_PREDICTIONS]
        return float(payback) if isinstance(payback, (int, float)) else math.inf
    from tasks.evaluation.results import payback_predictions

    return payback_predictions(float(make), float(reference) - float(energy))


def _gate(name: str, values: dict[str, Any], champion: Any) -> str | None:
    # `champion` is the model's name at the top of the file (older files: a 0/1 per model).
    if name == champion or values.get("champion") == 1:
        return "champion"
    if values.get(names.PASSED_GATE) is None:
        return None
    return "pass" if values.get(names.PASSED_GATE) else "fail"


def comparison_rows(paths: ProjectPaths) -> list[dict[str, Any]]:
    """Baseline and every variant from the evaluate stage's metrics, for tables."""
    metrics_file = paths.metrics / "evaluate.json"
    if not metrics_file.exists():
        return []
    metrics = json.loads(metrics_file.read_text())
    baseline = metrics.get("baseline", {})
    rows = []
    for name, values in metrics.items():
        if not isinstance(values, dict) or names.ACCURACY not in values:
            continue
        change = _ratio(values[names.ACCURACY] - baseline[names.ACCURACY], 0.01) if names.ACCURACY in baseline else None
        rows.append({
            "model": name,
            names.ACCURACY: values.get(names.ACCURACY),
            names.ACCURACY_CHANGE_PTS: change,
            names.ACCURACY_CHANGE_NOISE_PTS: values.get(names.ACCURACY_CHANGE_NOISE_PTS),
            names.SIZE_BYTES: values.get(names.SIZE_BYTES),
            names.SIZE_REDUCTION_X: _ratio(baseline.get(names.SIZE_BYTES), values.get(names.SIZE_BYTES)),
            names.LATENCY_P50_MS: values.get(names.LATENCY_P50_MS),
            names.LATENCY_P95_MS: values.get(names.LATENCY_P95_MS),
            names.SPEEDUP_X: _ratio(baseline.get(names.LATENCY_P50_MS), values.get(names.LATENCY_P50_MS)),
            names.THROUGHPUT_SPS: values.get(names.THROUGHPUT_SPS),
            names.ENERGY_PER_1K_J: values.get(names.ENERGY_PER_1K_J),
            names.MAKE_ENERGY_J: values.get(names.MAKE_ENERGY_J),
            names.PAYBACK_PREDICTIONS: _payback(name, values, baseline),
            "gate": _gate(name, values, metrics.get("champion")),
        })
    return rows


def gate_failures(decision: Any) -> dict[str, str]:
    """Why each model the gate failed fails it, from the evaluate stage's decision
    (``artifacts/evaluation/result.json``: its ``gate`` holds every model's reason in the
    stage's own words), for the lines under a table whose gate column says "fail"."""
    reasons = decision.get("gate") if isinstance(decision, dict) else None
    if not isinstance(reasons, dict):
        return {}
    return {name: str(reason) for name, reason in reasons.items() if str(reason).startswith("fails")}


def comparison_table(rows: list[dict[str, Any]], title: str = "baseline vs. compressed variants") -> Any:
    from tasks.core.tables import CHANGE_NOISE_NOTE, PAYBACK_NOTE, results_table

    return results_table(rows, COMPARISON_COLUMNS, title=title, caption=f"{CHANGE_NOISE_NOTE}; {PAYBACK_NOTE}",
                         highlight=lambda row: row.get("gate") == "champion")
