"""The evaluate stage's figures (matplotlib, Agg): accuracy against size, latency and energy with
the Pareto front, the shown model's confusion matrix, and the baseline's training curves.
Every function draws one PNG at ``path``; nothing here measures or decides."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tasks.evaluation.gate import pareto_flags
from tasks.evaluation.results import BASELINE, Evaluation

# Label positions tried around a point, nearest first (offset in points, alignment).
_LABEL_OFFSETS = [
    (dx * side, dy, "left" if side > 0 else "right")
    for dy in (4, -12, 14, -22, 26, -34, 38, -46)
    for dx in (6, 18)
    for side in (1, -1)
]


def _keep_layout(fig: Any) -> None:
    """Keep the layout ``fig`` has now: no layout engine from here on. None, not "none":
    with "none"'s placeholder engine every ``savefig`` still draws the figure once more,
    for a layout it never changes, before drawing it for the file."""
    from matplotlib import rc_context

    with rc_context({"figure.autolayout": False, "figure.constrained_layout.use": False}):  # else None picks one
        fig.set_layout_engine(None)


def _label_points(fig: Any, ax: Any, points: Sequence[tuple[str, float, float]]) -> None:
    """Annotate every point with its name, moving labels until none overlaps another."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.transforms import Bbox

    canvas = FigureCanvasAgg(fig)
    fig.draw_without_rendering()  # settle the layout, so window coordinates hold
    _keep_layout(fig)  # the labels are out of the layout: it stays as it is
    renderer = canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    placed = [ax.transData.transform((x, y)) for _, x, y in points]
    taken: list[Any] = [Bbox.from_bounds(px - 5, py - 5, 10, 10) for px, py in placed]  # the markers
    for name, x, y in sorted(points, key=lambda p: (-p[2], p[1])):
        chosen = None
        for dx, dy, align in _LABEL_OFFSETS:
            label = ax.annotate(name, (x, y), xytext=(dx, dy), textcoords="offset points", ha=align, fontsize=7.5,
                                arrowprops={"arrowstyle": "-", "color": "0.6", "lw": 0.5} if abs(dy) > 14 else None)
            label.set_in_layout(False)
            box = label.get_window_extent(renderer).expanded(1.04, 1.15)
            inside = frame.contains(box.x0, box.y0) and frame.contains(box.x1, box.y1)
            if inside and not any(box.overlaps(other) for other in taken):
                chosen = box
                break
            label.remove()
        if chosen is None:  # crowded: take the first spot anyway
            label = ax.annotate(name, (x, y), xytext=_LABEL_OFFSETS[0][:2], textcoords="offset points", fontsize=7.5)
            label.set_in_layout(False)
            chosen = label.get_window_extent(renderer)
        taken.append(chosen)


def _tradeoff_legend(has_champion: bool) -> list[Any]:
    from matplotlib.lines import Line2D

    legend = [
        Line2D([], [], color="tab:red", marker="o", linestyle="-", alpha=0.8, label="Pareto front"),
        Line2D([], [], color="tab:gray", marker="o", linestyle="", label="dominated"),
        Line2D([], [], color="black", marker="s", linestyle="", label="baseline"),
    ]
    if has_champion:
        legend.append(Line2D([], [], color="black", marker="*", markersize=10, linestyle="", label="champion"))
    return legend


def tradeoff_png(
    path: Path, evaluation: Evaluation, cost_key: str, xlabel: str, title: str, scale: float = 1.0,
    label_key: str | None = None,
) -> None:
    """Accuracy against one cost, every point labelled (with ``label_key``'s figure where it has
    one, e.g. the payback), the 2-D Pareto front in red."""
    from tasks.core.tables import COLUMNS

    from matplotlib.figure import Figure

    names = list(evaluation.models)
    cost = [evaluation.models[n].metrics[cost_key] * scale for n in names]
    accuracy = [evaluation.models[n].metrics["accuracy"] * 100 for n in names]
    front = pareto_flags([cost], accuracy)
    fig = Figure(figsize=(9, 5.5), dpi=110, layout="constrained")
    ax = fig.add_subplot()
    for name, x, y, on_front in zip(names, cost, accuracy, front, strict=True):
        is_champion = name == evaluation.champion
        ax.scatter(
            [x], [y], s=140 if is_champion else 40, zorder=3,
            marker="*" if is_champion else ("s" if name == BASELINE else "o"),
            color="tab:red" if on_front else "tab:gray",
        )
    frontier = sorted((x, y) for x, y, f in zip(cost, accuracy, front, strict=True) if f and math.isfinite(x))
    if len(frontier) > 1:
        ax.step([p[0] for p in frontier], [p[1] for p in frontier], where="post", color="tab:red", alpha=0.5)
    ax.legend(handles=_tradeoff_legend(bool(evaluation.champion)), loc="lower right", fontsize=8)
    finite = [c for c in cost if math.isfinite(c)]
    if finite and min(finite) > 0 and max(finite) / min(finite) > 20:
        ax.set_xscale("log")
    ax.margins(x=0.12, y=0.12)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    labels = {n: n for n in names}
    if label_key:
        for n in names:
            value = evaluation.models[n].metrics.get(label_key, math.nan)
            if not (isinstance(value, float) and math.isnan(value)):
                labels[n] = f"{n} ({COLUMNS[label_key].header}: {COLUMNS[label_key].render(value)})"
    points = [(labels[n], x, y) for n, x, y in zip(names, cost, accuracy, strict=True)
              if math.isfinite(x) and math.isfinite(y)]
    _label_points(fig, ax, points)
    fig.savefig(path)


def confusion_png(path: Path, evaluation: Evaluation, model: str | None = None) -> None:
    """The confusion matrix of ``model`` (default: the shown model): :func:`confusion_pngs`."""
    confusion_pngs({model or evaluation.shown_model: path}, evaluation)


def confusion_pngs(targets: Mapping[str, Path], evaluation: Evaluation) -> None:
    """The confusion matrix of each model in ``targets`` into its path, counts written in
    the cells up to 30 classes.

    One figure serves them all: it is laid out once, for the model with the largest count
    (the widest colour-bar labels; the counts are drawn inside the axes and titles do not
    move the layout), and each model then changes only the image, the colour scale, the
    counts and the title (about 0.1 s a picture instead of 0.16-0.18 s, measured)."""
    from matplotlib.figure import Figure

    if not targets:
        return
    order = sorted(targets, key=lambda m: -int(evaluation.models[m].confusion.max(initial=0)))
    names = evaluation.class_names
    size = max(4.0, 0.45 * len(names) + 2)
    fig = Figure(figsize=(size + 1, size), dpi=110, layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(evaluation.models[order[0]].confusion, cmap="Blues")
    fig.colorbar(image, ax=ax, shrink=0.8)
    ticks = range(len(names))
    ax.set_xticks(ticks, labels=names, rotation=45 if max(len(n) for n in names) > 3 else 0, fontsize=8)
    ax.set_yticks(ticks, labels=names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    counts: list[Any] = []
    for model in order:
        matrix = evaluation.models[model].confusion
        image.set_data(matrix)
        image.autoscale()  # the colour scale (and its bar) of this model's counts, as imshow sets it
        for text in counts:
            text.remove()
        counts = []
        threshold = matrix.max() / 2 if matrix.size else 0
        if len(names) <= 30:
            for (i, j), count in np.ndenumerate(matrix):
                if count:
                    counts.append(ax.text(j, i, str(count), ha="center", va="center", fontsize=7,  # inside the axes:
                                          color="white" if count > threshold else "black", in_layout=False))
        ax.set_title(f"confusion matrix: {model} (test split)", fontsize=10)
        targets[model].parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(targets[model])
        _keep_layout(fig)  # the first model's (1.75 -> 1.33 CPU-s for 12 pictures, same pixels)


def training_curves_png(path: Path, history: Sequence[Mapping[str, Any]]) -> None:
    """Loss and accuracy per epoch, train and validation, side by side."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    epochs = [row.get("epoch", i + 1) for i, row in enumerate(history)]
    fig = Figure(figsize=(9, 3.8), dpi=110, layout="constrained")
    loss_ax, acc_ax = fig.subplots(1, 2)
    for ax, keys, label in (
        (loss_ax, ("train_loss", "val_loss"), "loss"),
        (acc_ax, ("train_accuracy", "val_accuracy"), "accuracy"),
    ):
        for key in keys:
            values = [row.get(key) for row in history]
            if any(v is not None for v in values):
                ax.plot(epochs, [math.nan if v is None else v for v in values], marker=".", label=key)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("training curves (baseline)", fontsize=10)
    fig.savefig(path)
