"""The comparison of baseline and variants, read from the evaluate stage's metrics.

Kept free of Prefect imports: the CLI uses it without starting a flow.
"""

from __future__ import annotations

import json
from typing import Any

from tasks.core.paths import ProjectPaths

# What `slimflow run` and `slimflow report` show (keys of tasks.core.tables.COLUMNS).
COMPARISON_COLUMNS = (
    "model", "accuracy", "accuracy_change", "size_bytes", "size_reduction",
    "latency_p50_ms", "latency_p95_ms", "speedup", "throughput_sps", "gate",
)


def _ratio(baseline: Any, value: Any) -> float | None:
    if isinstance(baseline, (int, float)) and isinstance(value, (int, float)) and value:
        return baseline / value
    return None


def comparison_rows(paths: ProjectPaths) -> list[dict[str, Any]]:
    """Baseline and every variant from the evaluate stage's metrics, for tables."""
    metrics_file = paths.metrics / "evaluate.json"
    if not metrics_file.exists():
        return []
    metrics = json.loads(metrics_file.read_text())
    baseline = metrics.get("baseline", {})
    rows = []
    for name, values in metrics.items():
        if not isinstance(values, dict) or "accuracy" not in values:
            continue
        gate = "champion" if values.get("champion") else ("pass" if values.get("passed_gate") else "fail")
        rows.append({
            "model": name,
            "accuracy": values.get("accuracy"),
            "accuracy_change": values["accuracy"] - baseline["accuracy"] if "accuracy" in baseline else None,
            "size_bytes": values.get("size_bytes"),
            "size_reduction": _ratio(baseline.get("size_bytes"), values.get("size_bytes")),
            "latency_p50_ms": values.get("latency_p50_ms"),
            "latency_p95_ms": values.get("latency_p95_ms"),
            "speedup": _ratio(baseline.get("latency_p50_ms"), values.get("latency_p50_ms")),
            "throughput_sps": values.get("throughput_sps"),
            "gate": gate if "passed_gate" in values else None,
        })
    return rows


def comparison_table(rows: list[dict[str, Any]], title: str = "baseline vs. compressed variants") -> Any:
    from tasks.core.tables import results_table

    return results_table(rows, COMPARISON_COLUMNS, title=title, highlight=lambda row: row.get("gate") == "champion")
