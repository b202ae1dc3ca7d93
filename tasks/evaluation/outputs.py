"""The evaluate stage's files: ``metrics/evaluate.json``, ``plots/`` (tradeoff rows, the
confusion CSV, the PNGs declared in ``dvc.yaml``) and ``artifacts/evaluation/`` (figures,
per-model details, training curves), built in a staging folder and moved into place only
when all of them exist."""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import shutil
from pathlib import Path
from typing import Any

from tasks.core.paths import ProjectPaths
from tasks.evaluation import plots
from tasks.evaluation.gate import pareto_flags
from tasks.evaluation.results import Evaluation, json_number, ordered_metrics

log = logging.getLogger("slimflow.evaluate")

# Figures of plots/ the report shows beside itself (copied into artifacts/evaluation/).
REPORT_FIGURES = ("accuracy_vs_size.png", "accuracy_vs_latency.png", "accuracy_vs_energy.png", "confusion_matrix.png")


def metrics_document(evaluation: Evaluation) -> dict[str, Any]:
    """``metrics/evaluate.json``: ``{model: {figure: number, ..., "per_class": {class: {...}}}}``
    (the names of :mod:`tasks.core.metric_names`, headline first), plus ``champion`` (the
    model's name, or null) and ``promoted`` (1/0)."""
    document: dict[str, Any] = {
        name: {
            **{k: json_number(v) for k, v in ordered_metrics(result.metrics).items()},
            "per_class": {c: {k: json_number(v) for k, v in row.items()} for c, row in result.per_class.items()},
        }
        for name, result in evaluation.models.items()
    }
    promoted = bool(evaluation.promotion and evaluation.promotion.promoted)
    document["champion"] = evaluation.champion
    document["promoted"] = int(promoted)
    return document


def result_document(evaluation: Evaluation) -> dict[str, Any]:
    """``artifacts/evaluation/result.json``: the decision and where everything is in MLflow
    (each model's run and logged model, the stage run, the registered version), for the
    pipeline run and the flow run's artifacts to show."""
    promotion = evaluation.promotion
    return {
        "champion": evaluation.champion,
        "gate": {name: evaluation.reasons.get(name) for name in evaluation.models},
        "decision": promotion.reason if promotion else None,
        "promoted": bool(promotion and promotion.promoted),
        "registered_model": promotion.registered_model if promotion else None,
        "registered_version": promotion.version if promotion else None,
        "new_version": bool(promotion and promotion.new_version),
        "champion_holder": promotion.champion if promotion else None,
        "caveats": list(evaluation.caveats),
        "evaluate_run_id": evaluation.stage_run_id,
        "model_runs": dict(evaluation.run_ids),
        "logged_models": dict(evaluation.model_uris),
    }


def tradeoff_rows(evaluation: Evaluation) -> list[dict[str, Any]]:
    """``plots/tradeoff.json``: size, latency, energy per 1,000 predictions and accuracy per
    model, and its Pareto flag (over size and latency)."""
    names = list(evaluation.models)
    m = [evaluation.models[n].metrics for n in names]
    flags = pareto_flags(
        [[x["size_bytes"] for x in m], [x["latency_p50_ms"] for x in m]], [x["accuracy"] for x in m]
    )
    return [
        {
            "model": name,
            "size_bytes": json_number(x["size_bytes"]),
            "latency_p50_ms": json_number(x["latency_p50_ms"]),
            "energy_per_1k_j": json_number(x.get("energy_per_1k_j", math.nan)),
            "accuracy": json_number(x["accuracy"]),
            "pareto": flag,
        }
        for name, x, flag in zip(names, m, flags, strict=True)
    ]


def _short(source: str) -> str:
    """An energy label's kind without its method: ``estimate``, ``rapl``, ``nvml (GPU 0) + ...``."""
    return source.split(" (", 1)[0] if source.startswith(("estimate", "rapl")) else source.split(";", 1)[0][:60]


def write_json(path: Path, payload: Any) -> None:
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


def read_history(path: Path) -> list[dict[str, Any]] | None:
    """``plots/train_history.json`` (a list of per-epoch dicts), or None if absent/unreadable."""
    try:
        history = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return history if isinstance(history, list) and history and all(isinstance(r, dict) for r in history) else None


def models_document(evaluation: Evaluation) -> dict[str, Any]:
    """``artifacts/evaluation/models.json``: how each model was made, measured and judged."""
    per_model = {
        name: {
            "method": r.method, "runtime": r.runtime, "manifest": r.manifest, "notes": r.notes,
            "gate": evaluation.reasons.get(name), "confusion": r.confusion.tolist(),
        }
        for name, r in evaluation.models.items()
    }
    return {"class_names": list(evaluation.class_names), "models": per_model, "settings": evaluation.settings}


def render_model_figures(staging: Path, evaluation: Evaluation, history: list[dict[str, Any]] | None) -> None:
    """What needs only the scored models (no costs, no gate), into ``staging/evaluation``:
    each model's confusion matrix (``confusion/<model>.png``, for its MLflow run) and the
    baseline's training curves; a figure already there is not drawn again."""
    import matplotlib

    matplotlib.use("Agg")
    evaluation_dir = staging / "evaluation"
    pictures = {name: evaluation_dir / "confusion" / f"{name}.png" for name in evaluation.models}
    plots.confusion_pngs({name: picture for name, picture in pictures.items() if not picture.is_file()}, evaluation)
    curves = evaluation_dir / "training_curves.png"
    if history and not curves.is_file():
        plots.training_curves_png(curves, history)


def render_outputs(staging: Path, evaluation: Evaluation, history: list[dict[str, Any]] | None) -> None:
    """Everything but the report and the metrics, into ``staging/{plots,evaluation}``."""
    import matplotlib

    matplotlib.use("Agg")
    plot_dir, evaluation_dir = staging / "plots", staging / "evaluation"
    plot_dir.mkdir(parents=True, exist_ok=True)
    evaluation_dir.mkdir(parents=True, exist_ok=True)
    write_json(plot_dir / "tradeoff.json", tradeoff_rows(evaluation))
    write_confusion_csv(plot_dir / "confusion.csv", evaluation)
    plots.tradeoff_png(plot_dir / "accuracy_vs_size.png", evaluation, "size_bytes", "size on disk (KiB)",
                       "accuracy vs size on disk", scale=1 / 1024)
    plots.tradeoff_png(plot_dir / "accuracy_vs_latency.png", evaluation, "latency_p50_ms",
                       "latency p50, batch 1 (ms)",
                       f"accuracy vs CPU latency ({evaluation.settings['threads']} thread(s))")
    plots.tradeoff_png(plot_dir / "accuracy_vs_energy.png", evaluation, "energy_per_1k_j",
                       f"energy per 1,000 predictions at batch {evaluation.settings['throughput_batch']} (J)",
                       f"accuracy vs energy ({_short(evaluation.settings['energy_source'])}); "
                       "labels: predictions until a variant pays back its making", label_key="payback_predictions")
    render_model_figures(staging, evaluation, history)  # those not drawn while the models were timed
    # DVC's (and the report's) is the shown model's, the same picture.
    shutil.copy2(evaluation_dir / "confusion" / f"{evaluation.shown_model}.png", plot_dir / "confusion_matrix.png")
    for name in REPORT_FIGURES:
        shutil.copy2(plot_dir / name, evaluation_dir / name)  # the report shows them beside itself
    if not history:
        log.warning("no training history (plots/train_history.json): training curves not drawn")
    write_json(evaluation_dir / "models.json", models_document(evaluation))


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
