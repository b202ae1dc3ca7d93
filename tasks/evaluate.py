"""The ``evaluate`` stage: every model measured alike, compared side by side, a champion registered.

``python -m tasks.evaluate`` (the DVC stage command) measures the baseline
(``artifacts/model``) and every variant (``artifacts/compressed/<name>/`` with a
``manifest.json``) on the test split, each in the runtime it ships in (see
:mod:`tasks.measure` for how), with one identical set of metric keys per model and the
ratios to the baseline. It then

- opens the stage's MLflow run with one nested run per model (same metric keys, so the
  MLflow compare view lines them up), the manifest as params;
- applies the gate (:func:`tasks.registry.select_champion`) and registers the winner as
  a pyfunc model under ``evaluate.registered_model`` with the ``champion`` alias;
- writes ``metrics/evaluate.json``, ``plots/tradeoff.json``, ``plots/confusion.csv``, the
  PNGs declared in ``dvc.yaml`` and ``artifacts/evaluation/`` (report, training curves),
  built in a staging folder and moved into place only when all of them exist;
- prints a closing table of every model.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import platform
import shutil
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tasks.core.config import EvaluateParams, Params, ParamsError, load_params
from tasks.core.paths import ProjectPaths

log = logging.getLogger("slimflow.evaluate")

BASELINE = "baseline"
# Metric keys in the order tables show them; per-class precision/recall follow macro_f1.
HEAD_KEYS = ("accuracy", "accuracy_delta", "macro_f1")
TAIL_KEYS = (
    "parameters", "nonzeros", "sparsity", "size_bytes", "size_ratio", "flops",
    "latency_p50_ms", "latency_p95_ms", "latency_mean_ms", "latency_ratio", "cpu_time_p50_ms",
    "throughput_sps", "throughput_ratio", "peak_memory_mb", "load_memory_mb",
    "energy_per_1k_j", "threads", "passed_gate", "champion",
)
# Recipe steps after which the parent's FLOPs no longer describe the model.
_ARCHITECTURE_CHANGING = {"distill"}


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
    promotion: Any = None  # tasks.registry.Promotion
    run_ids: dict[str, str] = field(default_factory=dict)
    stage_run_id: str | None = None

    def metrics(self) -> dict[str, dict[str, float]]:
        return {name: result.metrics for name, result in self.models.items()}

    @property
    def shown_model(self) -> str:
        """The model whose confusion matrix is published: the champion, else the baseline."""
        return self.champion or BASELINE


# ---------------------------------------------------------------------------- discovery
def discover_models(paths: ProjectPaths) -> dict[str, Path]:
    """``{"baseline": artifacts/model, "<variant>": artifacts/compressed/<variant>, ...}``."""
    from tasks.core.model_files import MANIFEST, read_manifest

    if not (paths.model / MANIFEST).is_file():
        raise EvaluateError(f"{paths.model / MANIFEST}: no baseline model; run the train stage first")
    models = {BASELINE: paths.model}
    if paths.compressed.is_dir():
        for folder in sorted(p for p in paths.compressed.iterdir() if (p / MANIFEST).is_file()):
            try:
                name = str(read_manifest(folder).get("name") or folder.name)
            except (OSError, ValueError) as err:
                raise EvaluateError(f"{folder / MANIFEST}: unreadable manifest: {err}") from err
            if name in models:
                raise EvaluateError(f"{folder / MANIFEST}: model name {name!r} is used twice")
            models[name] = folder
    return models


# ---------------------------------------------------------------------------- measuring
def _recipe_methods(manifest: Mapping[str, Any]) -> list[dict[str, Any]]:
    recipe = manifest.get("recipe") or []
    steps = [step for step in recipe if isinstance(step, Mapping)]
    if not steps and manifest.get("method") not in (None, BASELINE):  # "distill+quantize"
        steps = [{"method": method} for method in str(manifest["method"]).split("+")]
    return steps


def _keeps_architecture(manifest: Mapping[str, Any]) -> bool:
    """True when the recipe changes only storage/runtime/numerics, not the layers."""
    for step in _recipe_methods(manifest):
        if step.get("method") in _ARCHITECTURE_CHANGING:
            return False
        if step.get("method") == "prune" and step.get("kind") == "structured":
            return False
    return True


def _is_quantized(manifest: Mapping[str, Any]) -> bool:
    return any(step.get("method") in {"quantize", "half"} for step in _recipe_methods(manifest))


def _flops(
    result_module: Any, manifest: Mapping[str, Any], example: np.ndarray, parent_flops: float | None
) -> tuple[float, str]:
    """FLOPs per sample and where the figure comes from.

    Counted with FlopCounterMode on a torch module; a quantized or exported (ONNX) copy
    of the same layers does the parent's multiply-adds (in int8 or another runtime), so
    it reports the parent's count - the counter cannot see quantized kernels or ONNX.
    """
    from tasks.measure import count_flops

    same_layers = _keeps_architecture(manifest)
    if parent_flops is not None and same_layers and (_is_quantized(manifest) or result_module is None):
        return parent_flops, "parent (same layers)"
    counted = count_flops(result_module, example) if result_module is not None else None
    if counted is not None:
        return counted, "counted (FlopCounterMode)"
    if parent_flops is not None and same_layers:
        return parent_flops, "parent (same layers)"
    return math.nan, "not countable for this runtime"


def _sparsity(manifest: Mapping[str, Any], module: Any) -> float:
    """Share of zero weights: the compress stage's figure, else counted on the module's parameters."""
    if "sparsity" in manifest:
        return _float(manifest["sparsity"])
    if module is None:
        return math.nan
    weights = [p.detach() for p in module.parameters() if p.is_floating_point()]
    total = sum(w.numel() for w in weights)
    return float(sum(int((w == 0).sum()) for w in weights) / total) if total else math.nan


def _float(value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return math.nan
    return number


def measure_models(
    model_dirs: Mapping[str, Path], prepared: Path, params: EvaluateParams, seed: int = 0
) -> Evaluation:
    """Measure every model on the test split; no MLflow, no files written."""
    from tasks.data import load_preprocessing, load_split
    from tasks.measure import (
        BATCH1_CALLS_PER_ROUND, classification_metrics, load_for_measurement, measure_memory_all,
        predict_in_batches, select_energy_meter, tile_to, time_models, torch_threads,
    )

    preprocessing = load_preprocessing(prepared)
    test = load_split(prepared, "test", preprocessing)
    if len(test.y) == 0:
        raise EvaluateError(f"{prepared}: the test split is empty")
    class_names = tuple(preprocessing.class_names)

    log.info("measuring peak inference memory of %d model(s) in fresh processes", len(model_dirs))
    memory = measure_memory_all(model_dirs, prepared, params.throughput_batch, params.threads)
    meter = select_energy_meter(params.estimate_cpu_watts_per_core)

    results: dict[str, ModelResult] = {}
    with torch_threads(params.threads):
        loaded = {name: load_for_measurement(folder, params.threads) for name, folder in model_dirs.items()}
        for name, model in loaded.items():
            logits = predict_in_batches(model.predict, test.x, params.throughput_batch)
            predictions = logits.argmax(axis=1).astype(np.int64)
            quality, confusion = classification_metrics(test.y, predictions, class_names)
            results[name] = ModelResult(name, model_dirs[name], dict(model.manifest), quality, predictions, confusion)
            log.info("%s (%s): accuracy %.4f", name, model.runtime, quality["accuracy"])

        example = np.ascontiguousarray(test.x[:1])

        def resolve_flops(name: str, seen: tuple[str, ...] = ()) -> None:
            """A variant may reuse its parent's count: parents are resolved first."""
            if "flops" in results[name].metrics:
                return
            manifest = results[name].manifest
            parent = str(manifest.get("parent") or BASELINE)
            parent_flops = None
            if parent in results and parent != name and parent not in seen:
                resolve_flops(parent, (*seen, name))
                parent_flops = results[parent].metrics["flops"]
                parent_flops = None if math.isnan(parent_flops) else parent_flops
            flops, source = _flops(loaded[name].module, manifest, example, parent_flops)
            results[name].metrics["flops"] = flops
            results[name].notes["flops"] = source

        for name in loaded:
            resolve_flops(name)

        log.info(
            "timing %d model(s): %d interleaved rounds, batch 1 and batch %d, %d thread(s)",
            len(loaded), params.latency_repeats, params.throughput_batch, params.threads,
        )
        timings = time_models(
            {name: model.predict for name, model in loaded.items()},
            x_single=test.x[:64],
            x_batch=tile_to(test.x, params.throughput_batch),
            repeats=params.latency_repeats,
            warmup=params.warmup,
            meter=meter,
            seed=seed,
        )

    for name, result in results.items():
        manifest = result.manifest
        module = loaded[name].module
        parameters = _float(manifest.get("parameters"))
        nonzeros = _float(manifest.get("nonzeros"))
        if math.isnan(parameters) and module is not None:
            parameters = float(sum(p.numel() for p in module.parameters()))
        result.metrics.update(
            parameters=parameters,
            nonzeros=nonzeros,
            sparsity=_sparsity(manifest, module),
            size_bytes=_float(manifest.get("size_bytes")),
            peak_memory_mb=_float(memory[name].get("peak_mb")),
            load_memory_mb=_float(memory[name].get("load_mb")),
            threads=float(params.threads),
            **timings[name].summary(),
        )
        result.notes["memory"] = str(memory[name].get("method"))
        result.notes["energy"] = meter.source
    add_ratios(results)

    settings = {
        "test_samples": int(len(test.y)),
        "classes": len(class_names),
        "threads": params.threads,
        "latency_repeats": params.latency_repeats,
        "batch1_calls_per_round": BATCH1_CALLS_PER_ROUND,
        "warmup": params.warmup,
        "throughput_batch": params.throughput_batch,
        "energy_source": meter.source,
        "energy_method": meter.describe(),
        "memory_method": "peak resident set rise (VmHWM) over the loaded model, one cold call at the "
        "throughput batch, in a fresh process per model",
        "cpu": _cpu_name(),
    }
    return Evaluation(results, class_names, test.y, settings)


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


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


# ---------------------------------------------------------------------------- decisions
def apply_gate(evaluation: Evaluation, params: EvaluateParams) -> None:
    """Run the gate; mark ``passed_gate`` and ``champion`` in every model's metrics."""
    from tasks.registry import select_champion

    champion, reasons = select_champion(evaluation.metrics(), params.gate, params.objective, BASELINE)
    evaluation.champion, evaluation.reasons = champion, reasons
    for name, result in evaluation.models.items():
        result.metrics["passed_gate"] = 0.0 if reasons[name].startswith("fails") else 1.0
        result.metrics["champion"] = 1.0 if name == champion else 0.0
    if champion:
        log.info("gate: %s wins (objective %s)", champion, params.objective)
    else:
        log.warning("gate: no model passes (%s)", "; ".join(f"{k}: {v}" for k, v in reasons.items()))


def pareto_flags(costs: Sequence[Sequence[float]], accuracy: Sequence[float]) -> list[bool]:
    """True for points no other point beats: cost(s) no higher, accuracy no lower, one strictly."""
    flags = []
    for i in range(len(accuracy)):
        dominated = False
        for j in range(len(accuracy)):
            if i == j:
                continue
            no_worse = all(cj[j] <= cj[i] for cj in costs) and accuracy[j] >= accuracy[i]
            better = any(cj[j] < cj[i] for cj in costs) or accuracy[j] > accuracy[i]
            if no_worse and better:
                dominated = True
                break
        flags.append(not dominated)
    return flags


# ---------------------------------------------------------------------------- outputs
def _json_number(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN; the key stays, so every model keeps the same keys
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    return value


def metrics_document(evaluation: Evaluation) -> dict[str, Any]:
    """``metrics/evaluate.json``: ``{model: {metric: number}}`` plus ``promoted`` (1/0)."""
    document: dict[str, Any] = {
        name: {k: _json_number(v) for k, v in ordered_metrics(result.metrics).items()}
        for name, result in evaluation.models.items()
    }
    promoted = bool(evaluation.promotion and evaluation.promotion.promoted)
    document["promoted"] = int(promoted)
    return document


def tradeoff_rows(evaluation: Evaluation) -> list[dict[str, Any]]:
    names = list(evaluation.models)
    m = [evaluation.models[n].metrics for n in names]
    flags = pareto_flags(
        [[x["size_bytes"] for x in m], [x["latency_p50_ms"] for x in m]], [x["accuracy"] for x in m]
    )
    return [
        {
            "model": name,
            "size_bytes": _json_number(x["size_bytes"]),
            "latency_p50_ms": _json_number(x["latency_p50_ms"]),
            "accuracy": _json_number(x["accuracy"]),
            "pareto": flag,
        }
        for name, x, flag in zip(names, m, flags, strict=True)
    ]


def _write_json(path: Path, payload: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, allow_nan=False) + "\n")


def write_confusion_csv(path: Path, evaluation: Evaluation) -> None:
    """One row per test sample (actual, predicted), class names, for the shown model."""
    predictions = evaluation.models[evaluation.shown_model].predictions
    names = evaluation.class_names
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["actual", "predicted"])
        for actual, predicted in zip(evaluation.y_true, predictions, strict=True):
            writer.writerow([names[int(actual)], names[int(predicted)]])


# Label positions tried around a point, nearest first (offset in points, alignment).
_LABEL_OFFSETS = [
    (dx * side, dy, "left" if side > 0 else "right")
    for dy in (4, -12, 14, -22, 26, -34, 38, -46)
    for dx in (6, 18)
    for side in (1, -1)
]


def _label_points(fig: Any, ax: Any, points: Sequence[tuple[str, float, float]]) -> None:
    """Annotate every point with its name, moving labels until none overlaps another."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.transforms import Bbox

    canvas = FigureCanvasAgg(fig)
    canvas.draw()  # settle the layout, so window coordinates hold
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


def _tradeoff_png(
    path: Path, evaluation: Evaluation, cost_key: str, xlabel: str, title: str, scale: float = 1.0
) -> None:
    """Accuracy against one cost, every point labelled, the 2-D Pareto front in red."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

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
    legend = [
        Line2D([], [], color="tab:red", marker="o", linestyle="-", alpha=0.8, label="Pareto front"),
        Line2D([], [], color="tab:gray", marker="o", linestyle="", label="dominated"),
        Line2D([], [], color="black", marker="s", linestyle="", label="baseline"),
    ]
    if evaluation.champion:
        legend.append(Line2D([], [], color="black", marker="*", markersize=10, linestyle="", label="champion"))
    ax.legend(handles=legend, loc="lower right", fontsize=8)
    finite = [c for c in cost if math.isfinite(c)]
    if finite and min(finite) > 0 and max(finite) / min(finite) > 20:
        ax.set_xscale("log")
    ax.margins(x=0.12, y=0.12)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    points = [(n, x, y) for n, x, y in zip(names, cost, accuracy, strict=True) if math.isfinite(x) and math.isfinite(y)]
    _label_points(fig, ax, points)
    fig.savefig(path)


def _confusion_png(path: Path, evaluation: Evaluation) -> None:
    from matplotlib.figure import Figure

    matrix = evaluation.models[evaluation.shown_model].confusion
    names = evaluation.class_names
    size = max(4.0, 0.45 * len(names) + 2)
    fig = Figure(figsize=(size + 1, size), dpi=110, layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(matrix, cmap="Blues")
    fig.colorbar(image, ax=ax, shrink=0.8)
    ticks = range(len(names))
    ax.set_xticks(ticks, labels=names, rotation=45 if max(len(n) for n in names) > 3 else 0, fontsize=8)
    ax.set_yticks(ticks, labels=names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    threshold = matrix.max() / 2 if matrix.size else 0
    if len(names) <= 30:
        for (i, j), count in np.ndenumerate(matrix):
            if count:
                ax.text(j, i, str(count), ha="center", va="center", fontsize=7,
                        color="white" if count > threshold else "black")
    ax.set_title(f"confusion matrix: {evaluation.shown_model} (test split)", fontsize=10)
    fig.savefig(path)


def _training_curves_png(path: Path, history: Sequence[Mapping[str, Any]]) -> None:
    from matplotlib.figure import Figure

    epochs = [row.get("epoch", i + 1) for i, row in enumerate(history)]
    from matplotlib.ticker import MaxNLocator

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


def read_history(path: Path) -> list[dict[str, Any]] | None:
    """``plots/train_history.json`` (a list of per-epoch dicts), or None if absent/unreadable."""
    try:
        history = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return history if isinstance(history, list) and history and all(isinstance(r, dict) for r in history) else None


def render_outputs(staging: Path, evaluation: Evaluation, history: list[dict[str, Any]] | None) -> None:
    """Everything but the report, into ``staging/{metrics,plots,evaluation}``."""
    import matplotlib

    matplotlib.use("Agg")
    plots, evaluation_dir = staging / "plots", staging / "evaluation"
    plots.mkdir(parents=True, exist_ok=True)
    evaluation_dir.mkdir(parents=True, exist_ok=True)
    _write_json(plots / "tradeoff.json", tradeoff_rows(evaluation))
    write_confusion_csv(plots / "confusion.csv", evaluation)
    _tradeoff_png(plots / "accuracy_vs_size.png", evaluation, "size_bytes", "size on disk (KiB)",
                  "accuracy vs size on disk", scale=1 / 1024)
    _tradeoff_png(plots / "accuracy_vs_latency.png", evaluation, "latency_p50_ms", "latency p50, batch 1 (ms)",
                  f"accuracy vs CPU latency ({evaluation.settings['threads']} thread(s))")
    _confusion_png(plots / "confusion_matrix.png", evaluation)
    for name in ("accuracy_vs_size.png", "accuracy_vs_latency.png", "confusion_matrix.png"):
        shutil.copy2(plots / name, evaluation_dir / name)  # the report shows them beside itself
    if history:
        _training_curves_png(evaluation_dir / "training_curves.png", history)
    else:
        log.warning("no training history (plots/train_history.json): training curves not drawn")
    per_model = {
        name: {
            "method": r.method, "runtime": r.runtime, "manifest": r.manifest, "notes": r.notes,
            "gate": evaluation.reasons.get(name), "confusion": r.confusion.tolist(),
        }
        for name, r in evaluation.models.items()
    }
    _write_json(evaluation_dir / "models.json", {"class_names": list(evaluation.class_names), "models": per_model,
                                                  "settings": evaluation.settings})


def _fmt(value: float, spec: str) -> str:
    return "n/a" if value is None or (isinstance(value, float) and not math.isfinite(value)) else format(value, spec)


def _si(value: float) -> str:
    """4736 -> '4.74k', 1.2e9 -> '1.20G'."""
    if value is None or not math.isfinite(value):
        return "n/a"
    for factor, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.3g}{suffix}"
    return f"{value:.3g}"


def table_rows(evaluation: Evaluation) -> list[list[str]]:
    """The closing table's cells (the terminal table and the report share them)."""
    rows = []
    for name, result in evaluation.models.items():
        m = result.metrics
        mark = "champion" if m["champion"] else ("pass" if m["passed_gate"] else "fail")
        rows.append([
            name, result.method, result.runtime,
            _fmt(m["accuracy"] * 100, ".2f"), _fmt(m["accuracy_delta"] * 100, "+.2f"),
            _fmt(m["macro_f1"], ".4f"),
            _fmt(m["size_bytes"] / 1024, ",.1f"), _fmt(m["size_ratio"], ".2f"),
            _fmt(m["latency_p50_ms"], ".3f"), _fmt(m["latency_p95_ms"], ".3f"), _fmt(m["latency_ratio"], ".2f"),
            _fmt(m["cpu_time_p50_ms"], ".3f"),
            _fmt(m["throughput_sps"], ",.0f"), _si(m["flops"]),
            _fmt(m["peak_memory_mb"], ".1f"), _fmt(m["energy_per_1k_j"], ".3f"), mark,
        ])
    return rows


TABLE_HEADER = [
    "model", "method", "runtime", "accuracy %", "Δ acc (pts)", "macro F1", "size KiB", "size ×",
    "p50 ms", "p95 ms", "latency ×", "CPU ms", "samples/s", "FLOPs", "peak MB", "J / 1k", "gate",
]


def report_markdown(
    evaluation: Evaluation, params: EvaluateParams, data_digest: str | None, training_curves: bool = True
) -> str:
    """``artifacts/evaluation/report.md``: the table of every model, the gate decision, the methods."""
    s = evaluation.settings
    lines = [
        "# slimflow evaluation",
        "",
        f"Test split: {s['test_samples']} samples, {s['classes']} classes"
        + (f", data digest `{data_digest}`" if data_digest else "") + ".",
        f"CPU: {s['cpu']}; {s['threads']} thread(s) (torch intra-op and ONNX Runtime intra-op).",
        f"Latency: wall clock at batch 1, {s['latency_repeats']} interleaved rounds x "
        f"{s['batch1_calls_per_round']} timed calls per model (after {s['warmup']} warm-up call(s), and one "
        f"untimed call per round); CPU ms = median process CPU time of those calls; throughput: median of "
        f"{s['latency_repeats']} calls at batch {s['throughput_batch']}.",
        f"Energy: {s['energy_method']}, over the throughput calls (`energy_source: {s['energy_source']}`).",
        f"Peak memory: {s['memory_method']}.",
        "",
        "## Models",
        "",
        "| " + " | ".join(TABLE_HEADER) + " |",
        "|" + "---|" * len(TABLE_HEADER),
    ]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(evaluation)]
    gate = params.gate
    limits = [f"accuracy drop <= {gate.max_accuracy_drop:g}"]
    if gate.max_latency_p95_ms is not None:
        limits.append(f"latency p95 <= {gate.max_latency_p95_ms:g} ms")
    if gate.max_size_bytes is not None:
        limits.append(f"size <= {gate.max_size_bytes} B")
    promotion = evaluation.promotion
    lines += [
        "",
        "## Gate and champion",
        "",
        f"Gate: {', '.join(limits)}; objective: **{params.objective}**; the baseline is a candidate too.",
        "",
    ]
    lines += [f"- **{name}**: {reason}" for name, reason in evaluation.reasons.items()]
    lines += ["", f"**Decision:** {promotion.reason if promotion else 'registry not updated'}."]
    if promotion and promotion.version:
        lines.append(
            f"Load it with `mlflow.pyfunc.load_model(\"models:/{promotion.registered_model}@champion\")` "
            f"(version {promotion.version}, raw inputs, returns class indices)."
        )
    lines += ["", "## How figures were obtained", ""]
    for name, result in evaluation.models.items():
        notes = ", ".join(f"{k}: {v}" for k, v in result.notes.items())
        lines.append(f"- {name}: {notes}")
    lines += [
        "",
        "## Plots",
        "",
        "![accuracy vs size](accuracy_vs_size.png)",
        "![accuracy vs latency](accuracy_vs_latency.png)",
        f"![confusion matrix of {evaluation.shown_model}](confusion_matrix.png)",
    ]
    if training_curves:
        lines.append("![training curves](training_curves.png)")
    else:
        lines.append("(no training curves: plots/train_history.json was missing)")
    return "\n".join(lines) + "\n"


def publish(staging: Path, paths: ProjectPaths) -> None:
    """Move the staged outputs into place: the evaluation folder swapped, each file replaced."""
    destination = paths.evaluation
    destination.parent.mkdir(parents=True, exist_ok=True)
    old = destination.with_name(destination.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if destination.exists():
        os.replace(destination, old)
    os.replace(staging / "evaluation", destination)
    shutil.rmtree(old, ignore_errors=True)
    for folder, target in (("plots", paths.plots), ("metrics", paths.metrics)):  # metrics last
        target.mkdir(parents=True, exist_ok=True)
        for item in sorted((staging / folder).iterdir()):
            os.replace(item, target / item.name)


# ---------------------------------------------------------------------------- MLflow
def _model_tags(result: ModelResult) -> dict[str, str]:
    manifest = result.manifest
    return {
        "variant": result.name,
        "method": result.method,
        "runtime": result.runtime,
        "format": str(manifest.get("format", "")),
        "parent": str(manifest.get("parent") or ("none" if result.name == BASELINE else BASELINE)),
        "energy_source": result.notes.get("energy", ""),
        "flops_source": result.notes.get("flops", ""),
        "memory_method": result.notes.get("memory", ""),
    }


def log_model_run(
    result: ModelResult, evaluation: Evaluation, paths: ProjectPaths, experiment: str, parent_run_id: str
) -> str:
    """One nested run per model: identical metric keys, the manifest as params."""
    import mlflow

    from tasks.core import tracking

    manifest = {k: v for k, v in result.manifest.items() if k not in {"digest"}}
    manifest["recipe"] = json.dumps(manifest.get("recipe"), sort_keys=True, default=str)
    run_params = {"manifest": manifest, "model_digest": result.manifest.get("digest"),
                  "evaluation": {k: v for k, v in evaluation.settings.items() if k != "memory_method"}}
    with tracking.stage_run(
        "evaluate", paths.root, experiment, params=run_params, run_name=result.name,
        tags=_model_tags(result), parent_run_id=parent_run_id,
    ) as run:
        mlflow.log_metrics({k: float(v) for k, v in ordered_metrics(result.metrics).items()})
        mlflow.log_dict(
            {"labels": list(evaluation.class_names), "matrix": result.confusion.tolist()}, "confusion.json"
        )
        mlflow.set_tag("gate", evaluation.reasons.get(result.name, "")[:5000])
        return run.info.run_id


def _evidence(
    result: ModelResult, evaluation: Evaluation, paths: ProjectPaths, params: EvaluateParams
) -> dict[str, Any]:
    """Version tags: the champion's metrics, recipe, data digest, git commit, runs, gate."""
    from tasks.core import tracking
    from tasks.data import data_digest

    try:
        digest = data_digest(paths.prepared)
    except (OSError, KeyError, ValueError):
        digest = None
    evidence: dict[str, Any] = {f"metric.{k}": _json_number(v) for k, v in ordered_metrics(result.metrics).items()}
    evidence.update(
        method=result.method,
        runtime=result.runtime,
        recipe=result.manifest.get("recipe") or [],
        data_digest=digest,
        git_commit=tracking.git_commit(paths.root),
        source_run_id=evaluation.run_ids.get(result.name),
        evaluate_run_id=evaluation.stage_run_id,
        gate=params.gate.model_dump(),
        objective=params.objective,
    )
    return evidence


# ---------------------------------------------------------------------------- the stage
def run_evaluate(paths: ProjectPaths, params: Params) -> Evaluation:
    """Measure, compare, decide, register and publish; the outputs appear all together or not at all."""
    import mlflow

    from tasks.core import tracking
    from tasks.data import data_digest
    from tasks.registry import keep_champion, promote

    settings = params.evaluate
    model_dirs = discover_models(paths)
    if not (paths.prepared / "preprocess.json").is_file():
        raise EvaluateError(f"{paths.prepared}: no prepared data; run the prepare stage first")
    log.info("evaluating %s", ", ".join(model_dirs))

    staging = Path(tempfile.mkdtemp(prefix=".evaluation-staging-", dir=paths.artifacts))
    try:
        with tracking.stage_run(
            "evaluate", paths.root, params.base.experiment,
            params={"evaluate": settings.model_dump(), "seed": params.base.seed},
        ) as stage:
            evaluation = measure_models(model_dirs, paths.prepared, settings, params.base.seed)
            evaluation.stage_run_id = stage.info.run_id
            apply_gate(evaluation, settings)
            for name, result in evaluation.models.items():
                evaluation.run_ids[name] = log_model_run(
                    result, evaluation, paths, params.base.experiment, stage.info.run_id
                )
            render_outputs(staging, evaluation, read_history(paths.plots / "train_history.json"))

            # The registry is the one change that cannot be rolled back: do it last.
            if evaluation.champion:
                champion = evaluation.models[evaluation.champion]
                # The pyfunc model is logged into the champion's own run (resumed).
                with mlflow.start_run(run_id=evaluation.run_ids[champion.name], nested=True):
                    evaluation.promotion = promote(
                        champion.name, champion.folder, paths.prepared / "preprocess.json",
                        settings.registered_model, _evidence(champion, evaluation, paths, settings),
                    )
            else:
                evaluation.promotion = keep_champion(
                    settings.registered_model, "no model passes the gate (see the reasons per model)"
                )

            try:
                digest = data_digest(paths.prepared)
            except (OSError, KeyError, ValueError):
                digest = None
            curves = (staging / "evaluation" / "training_curves.png").is_file()
            (staging / "evaluation" / "report.md").write_text(report_markdown(evaluation, settings, digest, curves))
            _write_json(staging / "metrics" / "evaluate.json", metrics_document(evaluation))

            mlflow.log_metrics({
                "promoted": float(evaluation.promotion.promoted),
                "registered_new_version": float(evaluation.promotion.new_version),
                "models_evaluated": float(len(evaluation.models)),
                "models_passing": float(sum(r.metrics["passed_gate"] for r in evaluation.models.values())),
            })
            mlflow.set_tags({
                "champion": evaluation.champion or "none",
                "champion_version": evaluation.promotion.version or "none",
                "gate_decision": evaluation.promotion.reason[:5000],
            })
            mlflow.log_artifacts(str(staging / "plots"), "plots")
            mlflow.log_artifacts(str(staging / "metrics"), "metrics")
            mlflow.log_artifacts(str(staging / "evaluation"), "evaluation")
            publish(staging, paths)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return evaluation


def summary_table(evaluation: Evaluation) -> Any:
    """The closing rich table: baseline and every variant, the numbers of evaluate.json."""
    from rich.table import Table

    s = evaluation.settings
    promotion = evaluation.promotion
    table = Table(
        title="slimflow evaluation (test split)",
        caption=f"{s['threads']} thread(s), p50/p95 at batch 1, samples/s at batch {s['throughput_batch']}; "
        f"energy: {s['energy_source']}. " + (promotion.reason if promotion else ""),
    )
    keep = {"model", "runtime", "accuracy %", "Δ acc (pts)", "size KiB", "size ×", "p50 ms", "p95 ms",
            "latency ×", "samples/s", "gate"}
    columns = [i for i, h in enumerate(TABLE_HEADER) if h in keep]
    for i in columns:
        table.add_column(TABLE_HEADER[i], justify="left" if i < 3 or TABLE_HEADER[i] == "gate" else "right")
    for row in table_rows(evaluation):
        styled = [row[i] for i in columns]
        table.add_row(*styled, style="bold green" if row[-1] == "champion" else None)
    return table


def main(argv: list[str] | None = None) -> int:
    """``python -m tasks.evaluate [--set evaluate.threads=2 ...]``: 0 on success, 2 on bad input."""
    from tasks.core.errors import report_stage_error
    from tasks.core.stage_cli import parse_stage_args

    args = parse_stage_args("evaluate", __doc__.splitlines()[0], argv, "evaluate.objective=fastest")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no tqdm bars in stage logs
    paths = ProjectPaths.discover()
    try:
        params = load_params(paths.params, args.overrides)
        evaluation = run_evaluate(paths, params)
    except (ParamsError, EvaluateError) as err:
        report_stage_error("evaluate", str(err))
        return 2
    except OSError as err:
        report_stage_error("evaluate", f"cannot read or write {err.filename or ''}: {err.strerror or err}")
        return 1
    from rich.console import Console

    console = Console()
    if not console.is_terminal:  # under dvc repro / a log file: do not squeeze the table into 80 columns
        console = Console(width=160)
    console.print(summary_table(evaluation))
    return 0


if __name__ == "__main__":
    sys.exit(main())
