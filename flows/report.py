"""The comparison of baseline and variants, read from the evaluate stage's metrics.

Kept free of Prefect imports: the CLI uses it without starting a flow.
"""

from __future__ import annotations

import json
from typing import Any

from tasks.paths import ProjectPaths


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
        rows.append({
            "model": name,
            "accuracy": values.get("accuracy"),
            "accuracy_change": values["accuracy"] - baseline["accuracy"] if "accuracy" in baseline else None,
            "size_bytes": values.get("size_bytes"),
            "latency_p50_ms": values.get("latency_p50_ms"),
            "latency_p95_ms": values.get("latency_p95_ms"),
            "throughput_sps": values.get("throughput_sps"),
        })
    return rows
