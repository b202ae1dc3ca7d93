"""Per-layer sensitivity to structured pruning, shown: a table (rich), a chart (PNG) and rows (DVC plot).

Each layer that structured pruning can narrow is pruned alone at each of
:data:`tasks.compression.search.SENSITIVITY_RATIOS`, without fine-tuning, and the validation
accuracy it keeps is measured (:func:`tasks.compression.pruning.structured_sensitivity`).
The drops rank the layers (the least sensitive are pruned most, :func:`search.layer_ratios`)
and are the trail a user reads: which layers can lose channels, which cannot.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

from rich.table import Table

from tasks.compression import search


def rows(
    accuracies: Mapping[str, Mapping[float, float]], widths: Mapping[str, int], reference: float
) -> list[dict[str, Any]]:
    """One row per (layer, ratio): its channels, the ratio, the validation accuracy pruned alone
    and the drop in points against ``reference`` (the unpruned model's)."""
    return [
        {"layer": layer, "channels": widths[layer], "ratio": ratio, "val_accuracy": round(acc, 6),
         "drop_points": round(100.0 * (reference - acc), 4)}
        for layer, by_ratio in accuracies.items() for ratio, acc in sorted(by_ratio.items())
    ]


def drops_by_layer(table_rows: list[dict[str, Any]]) -> dict[str, dict[float, float]]:
    """{layer: {ratio: drop in points}} from :func:`rows`."""
    drops: dict[str, dict[float, float]] = {}
    for row in table_rows:
        drops.setdefault(row["layer"], {})[row["ratio"]] = row["drop_points"]
    return drops


def table(table_rows: list[dict[str, Any]], chosen: Mapping[str, float] | None = None, title: str = "") -> Table:
    """The layers as rows: channels, the drop at each ratio, the score and the ratio chosen for each."""
    drops = drops_by_layer(table_rows)
    ratios = sorted({row["ratio"] for row in table_rows})
    channels = {row["layer"]: row["channels"] for row in table_rows}
    out = Table(title=title or "structured pruning: validation drop (points) of each layer pruned alone",
                caption="the least sensitive layers are pruned most")
    out.add_column("layer", justify="left")
    out.add_column("channels")
    for ratio in ratios:
        out.add_column(f"-{100 * ratio:.0f}% channels")
    out.add_column("sensitivity")
    if chosen is not None:
        out.add_column("chosen ratio")
    for layer, by_ratio in drops.items():
        cells = [layer, str(channels[layer]), *(f"{by_ratio[r]:+.2f}" for r in ratios),
                 f"{search.sensitivity_score(by_ratio):.2f}"]
        if chosen is not None:
            cells.append(f"{chosen.get(layer, 0.0):.2f}")
        out.add_row(*cells)
    return out


def chart_png(table_rows: list[dict[str, Any]], title: str) -> bytes:
    """Drop against ratio, one line per layer (matplotlib, Agg), as PNG bytes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for layer, by_ratio in drops_by_layer(table_rows).items():
        ratios = sorted(by_ratio)
        ax.plot([100 * r for r in ratios], [by_ratio[r] for r in ratios], marker="o", label=layer)
    ax.axhline(0.0, color="grey", linewidth=0.8)
    ax.set_xlabel("channels removed from this layer alone (%)")
    ax.set_ylabel("validation accuracy drop (points)")
    ax.set_title(title)
    ax.legend(fontsize="small")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()
