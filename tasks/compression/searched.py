"""The searched steps of a variant (``auto`` knobs within ``compress.budget``): each runs its
trials with the methods' own functions (pruning, fine-tuning on the Horovod loop,
distillation, ONNX Runtime int8), hands them to :mod:`tasks.compression.search` to decide,
and records the trail (manifest ``search``, MLflow, ``plots/search``).

- :func:`prune_searched`: unstructured ``sparsity: auto`` (gradual pruning, bisected);
- :func:`prune_structured_searched`: structured ``sparsity: auto`` (per-layer sensitivity,
  the global ratio bisected; transformers: heads and FFN units; lstm/gru: hidden units);
- :func:`distill_searched`: ``student_width: auto``;
- :func:`fallback_searched`: static int8 ``fallback: auto``.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from models.spec import RECURRENT_FAMILIES
from tasks.compression import formats, pruning, quantization, search
from tasks.compression.candidate import Candidate
from tasks.compression.distillation import distill
from tasks.compression.fine_tuning import Trained, TrainingStep, fine_tune
from tasks.compression.work import Work
from tasks.core.config import DistillStep, PruneStep
from tasks.core.model_files import load_eager_model

log = logging.getLogger("slimflow.compress")


def prune_searched(
    candidate: Candidate, step: PruneStep, work: Work, training: TrainingStep, extra: dict[str, Any]
) -> Candidate:
    """``sparsity: auto``: gradual (cubic) pruning while fine-tuning, one trial per final
    sparsity, bisected to the highest within the budget (:func:`tasks.compression.search.search_sparsity`);
    each trial continues from the best passing one. Records the trail (manifest ``search``,
    MLflow, ``plots/search``)."""
    from dataclasses import replace

    from tasks.compression.weights import parameters_and_nonzeros, weight_sparsity
    from tasks.core.model_files import torch_predictor

    budget = work.budget()
    trained_by_trial: dict[int, tuple[TrainingStep, Trained]] = {}

    def run_trial(target: float, warm: search.Trial | None, number: int) -> search.Trial:
        started = time.perf_counter()
        origin: Candidate = warm.model if warm is not None else candidate
        trial_step = replace(training, trial=number)
        schedule = search.cubic_schedule(min(weight_sparsity(origin.module), target), target, step.fine_tune_epochs)
        trained = fine_tune(origin, trial_step, epochs=step.fine_tune_epochs, lr=work.fine_tune_lr(step),
                            masks=pruning.zero_masks(origin.module), prune_schedule=schedule)
        trained_by_trial[number] = (trial_step, trained)
        model = origin.changed(load_eager_model(trained.folder), sparse=True)
        judged = budget.judge(torch_predictor(model.module)(work.data.x_val), work.data.y_val)
        _, nonzeros = parameters_and_nonzeros(model.module)
        size = len(formats.gzip.compress(formats.torch_bytes(model.module.state_dict()), compresslevel=9, mtime=0))
        return search.Trial.judged(
            number, target, judged, size_bytes=size, nonzeros=nonzeros,
            sparsity=round(weight_sparsity(model.module), 6), seconds=time.perf_counter() - started,
            warm_start=warm.setting if warm is not None else None, model=model,
        )

    outcome = search.search_sparsity(run_trial, budget)
    trial_step, trained = trained_by_trial[outcome.best.number]
    work.curves[training.curve_name] = trained.history
    extra.setdefault("training", []).append(
        {**trained.record("prune", step.fine_tune_epochs, training.number), "trial": outcome.best.number}
    )
    extra["search"] = {
        **outcome.record(),
        # the search's cost in epochs: every trial's fine-tuning (early stopping may cut one short)
        "epochs_run": sum(trained_by_trial[t.number][1].summary.get("epochs_run", 0) for t in outcome.trials),
    }
    return _recorded(outcome, training, work, extra["search"])


def prune_structured_searched(
    candidate: Candidate, step: PruneStep, work: Work, training: TrainingStep, extra: dict[str, Any]
) -> Candidate:
    """Structured ``sparsity: auto`` (mlp, cnn; a transformer, lstm or gru: :func:`_prune_shares_searched`):
    measure each layer's sensitivity (pruned alone at
    :data:`search.SENSITIVITY_RATIOS`, no fine-tuning), then bisect the global channel ratio
    (:func:`search.search_ratio`), shared out between the layers by their sensitivity
    (:func:`search.layer_ratios`: the least sensitive pruned most); each trial prunes (from the
    best passing trial, or the parent) to its per-layer widths and fine-tunes on the Horovod
    loop. Records the sensitivity (table in the log, chart and rows in MLflow, ``plots/sensitivity``)
    and the trail (manifest ``search``, MLflow, ``plots/search``)."""
    from dataclasses import replace

    if candidate.spec.family in ("transformer", *RECURRENT_FAMILIES):
        return _prune_shares_searched(candidate, step, work, training, extra)
    from tasks.compression import sensitivity
    from tasks.compression.candidate import accuracy
    from tasks.compression.weights import parameters_and_nonzeros, weight_sparsity
    from tasks.core.model_files import torch_predictor
    from tasks.core.tables import as_text

    budget = work.budget()
    example, x_val, y_val = work.data.example(), work.data.x_val, work.data.y_val

    def val_accuracy(model: Candidate) -> float:
        return accuracy(torch_predictor(model.module)(x_val), y_val)

    began = time.perf_counter()
    widths = pruning.layer_widths(candidate.module)
    measured = pruning.structured_sensitivity(candidate, example, search.SENSITIVITY_RATIOS, val_accuracy)
    rows = sensitivity.rows(measured, widths, val_accuracy(candidate))
    scores = {layer: search.sensitivity_score(drops) for layer, drops in sensitivity.drops_by_layer(rows).items()}
    sensitivity_seconds = time.perf_counter() - began
    trained_by_trial: dict[int, Trained] = {}
    ratios_by_trial: dict[int, dict[str, float]] = {}

    def run_trial(ratio: float, warm: search.Trial | None, number: int) -> search.Trial:
        started = time.perf_counter()
        ratios = search.layer_ratios(ratio, widths, scores)
        keep = search.kept_widths(widths, ratios)
        origin: Candidate = warm.model if warm is not None else candidate
        current = pruning.layer_widths(origin.module)
        pruned = pruning.prune_structured(origin, 0.0, example, {k: min(keep[k], current[k]) for k in keep})
        masks = pruning.zero_masks(pruned.module) if pruned.sparse else None  # a sparse parent's zeros stay zeros
        trial_step = replace(training, trial=number)
        trained = fine_tune(pruned, trial_step, epochs=step.fine_tune_epochs, lr=work.fine_tune_lr(step), masks=masks)
        trained_by_trial[number], ratios_by_trial[number] = trained, ratios
        model = pruned.changed(load_eager_model(trained.folder))
        judged = budget.judge(torch_predictor(model.module)(x_val), y_val)
        _, nonzeros = parameters_and_nonzeros(model.module)
        return search.Trial.judged(
            number, ratio, judged, size_bytes=len(formats.torch_bytes(model.module.state_dict())),
            nonzeros=nonzeros, sparsity=round(weight_sparsity(model.module), 6),
            seconds=time.perf_counter() - started, warm_start=warm.setting if warm is not None else None, model=model,
        )

    outcome = search.search_ratio(run_trial, budget)
    best = outcome.best
    trained = trained_by_trial[best.number]
    work.curves[training.curve_name] = trained.history
    extra.setdefault("training", []).append(
        {**trained.record("prune", step.fine_tune_epochs, training.number), "trial": best.number}
    )
    extra["search"] = {
        **outcome.record(),
        "layer_ratios": ratios_by_trial[best.number], "widths_before": widths,
        "widths": pruning.layer_widths(best.model.module), "sensitivity": scores,
        "sensitivity_seconds": round(sensitivity_seconds, 2),
        "epochs_run": sum(t.summary.get("epochs_run", 0) for t in trained_by_trial.values()),
    }
    work.sensitivities[training.variant] = rows
    shown = sensitivity.table(rows, ratios_by_trial[best.number], title=f"{training.variant}: sensitivity per layer")
    log.info("%s: per-layer sensitivity (%.1fs):\n%s", training.variant, sensitivity_seconds, as_text(shown))
    if training.run_id is not None:
        import mlflow

        client = mlflow.MlflowClient()
        client.log_dict(training.run_id, rows, "search/sensitivity.json")
        client.log_text(training.run_id, as_text(shown), "search/sensitivity.txt")
        _log_png(client, training.run_id, sensitivity.chart_png(rows, f"{training.variant}: per-layer sensitivity"),
                 "search/sensitivity.png")
    return _recorded(outcome, training, work, extra["search"])


def _log_png(client: Any, run_id: str, png: bytes, artifact: str) -> None:
    """PNG bytes as the run's ``artifact`` (MLflow logs files: through a temporary folder)."""
    import tempfile
    from pathlib import Path

    folder, name = artifact.rsplit("/", 1)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / name).write_bytes(png)
        client.log_artifact(run_id, str(Path(tmp) / name), folder)


def _prune_shares_searched(
    candidate: Candidate, step: PruneStep, work: Work, training: TrainingStep, extra: dict[str, Any]
) -> Candidate:
    """Structured ``sparsity: auto`` of a transformer (its heads and FFN units) or an lstm/gru
    (its hidden units): prune :data:`search.STRUCTURED_SPARSITIES` of them from the parent,
    highest first, each fine-tuned on the Horovod loop; the first within budget is kept
    (:func:`search.search_structured`)."""
    from dataclasses import replace

    from tasks.compression.weights import parameters_and_nonzeros
    from tasks.core.model_files import torch_predictor

    budget = work.budget()
    before, _ = parameters_and_nonzeros(candidate.module)
    trained_by_trial: dict[int, Trained] = {}

    def run_trial(sparsity: float, number: int) -> search.Trial:
        began = time.perf_counter()
        pruned = pruning.prune_structured(candidate, sparsity, work.data.example())
        trained = fine_tune(pruned, replace(training, trial=number), epochs=step.fine_tune_epochs,
                            lr=work.fine_tune_lr(step))
        trained_by_trial[number] = trained
        model = pruned.changed(load_eager_model(trained.folder))
        judged = budget.judge(torch_predictor(model.module)(work.data.x_val), work.data.y_val)
        parameters, nonzeros = parameters_and_nonzeros(model.module)
        return search.Trial.judged(
            number, sparsity, judged, size_bytes=len(formats.torch_bytes(model.module.state_dict())),
            nonzeros=nonzeros, sparsity=round(1.0 - parameters / before, 6),  # the share of the parameters removed
            seconds=time.perf_counter() - began, model=model,
        )

    outcome = search.search_structured(run_trial, budget)
    trained = trained_by_trial[outcome.best.number]
    work.curves[training.curve_name] = trained.history
    extra.setdefault("training", []).append(
        {**trained.record("prune", step.fine_tune_epochs, training.number), "trial": outcome.best.number}
    )
    extra["search"] = {**outcome.record(), "sparsities": list(search.STRUCTURED_SPARSITIES),
                       "epochs_run": sum(t.summary.get("epochs_run", 0) for t in trained_by_trial.values())}
    return _recorded(outcome, training, work, extra["search"])


def distill_searched(
    candidate: Candidate, step: DistillStep, work: Work, training: TrainingStep, extra: dict[str, Any]
) -> Candidate:
    """``student_width: auto``: students of :data:`search.STUDENT_WIDTHS` x the teacher's width,
    smallest first, each distilled on the Horovod loop; the first within budget is kept
    (:func:`search.search_width`)."""
    from dataclasses import replace

    from tasks.compression.weights import parameters_and_nonzeros, weight_sparsity
    from tasks.core.model_files import torch_predictor

    budget = work.budget()
    widths = [round(share * candidate.spec.width, 6) for share in search.STUDENT_WIDTHS]
    trained_by_trial: dict[int, Trained] = {}

    def run_trial(width: float, number: int) -> search.Trial:
        began = time.perf_counter()
        student, trained = distill(
            candidate, replace(training, trial=number), student_family=step.student_family, student_width=width,
            student_layers=step.student_layers, temperature=step.temperature, alpha=step.alpha, epochs=step.epochs, lr=step.lr,
            student_init=step.student_init, example=work.data.example(),
        )
        trained_by_trial[number] = trained
        judged = budget.judge(torch_predictor(student.module)(work.data.x_val), work.data.y_val)
        _, nonzeros = parameters_and_nonzeros(student.module)
        size = len(formats.torch_bytes(student.module.state_dict()))
        return search.Trial.judged(number, width, judged, size_bytes=size, nonzeros=nonzeros,
                                   sparsity=round(weight_sparsity(student.module), 6),
                                   seconds=time.perf_counter() - began, model=student)

    outcome = search.search_width(widths, run_trial, budget)
    trained = trained_by_trial[outcome.best.number]
    work.curves[training.curve_name] = trained.history
    extra.setdefault("training", []).append(
        {**trained.record("distill", step.epochs, training.number), "trial": outcome.best.number}
    )
    extra["search"] = {**outcome.record(), "widths": widths,
                       "epochs_run": sum(t.summary.get("epochs_run", 0) for t in trained_by_trial.values())}
    return _recorded(outcome, training, work, extra["search"])


SENSITIVITY_SAMPLES = 256  # validation samples the per-layer output error is measured on


def fallback_searched(
    candidate: Candidate, fp32: bytes, calibration: Any, work: Work, what: str, run_id: str | None,
    extra: dict[str, Any],
) -> tuple[bytes, list[str]]:
    """``fallback: auto``: rank the weighted layers by the output error each costs when it
    alone is int8 (normalized MSE of the logits against fp32 on the validation split), then
    keep the worst in fp32, one more per trial, until the drop fits (:func:`search.search_fallback`).
    Returns the chosen model and its fp32 layers."""
    import numpy as np

    from tasks.compression.onnx import onnx_predictor
    from tasks.compression.weights import parameters_and_nonzeros, weight_sparsity

    budget = work.budget()
    started = time.perf_counter()
    layers = quantization.ort_weighted_nodes(fp32)
    x_val, y_val = work.data.x_val, work.data.y_val
    probe = x_val[:SENSITIVITY_SAMPLES]
    reference = onnx_predictor(fp32)(probe)
    sensitivity: dict[str, float] = {}
    for layer in layers:  # this layer alone in int8
        alone = quantization.ort_static_int8(fp32, calibration, nodes_to_exclude=[n for n in layers if n != layer])
        error = float(np.mean((onnx_predictor(alone)(probe) - reference) ** 2) / max(np.mean(reference**2), 1e-12))
        sensitivity[layer] = error
    ranked = sorted(layers, key=lambda name: -sensitivity[name])
    log.info("%s: layers by the output error int8 costs them: %s", what,
             ", ".join(f"{name} {sensitivity[name]:.2e}" for name in ranked))
    _, nonzeros = parameters_and_nonzeros(candidate.module)
    sparsity = round(weight_sparsity(candidate.module), 6)

    def run_trial(fp32_layers: list[str], number: int) -> search.Trial:
        began = time.perf_counter()
        model = quantization.ort_static_int8(fp32, calibration, nodes_to_exclude=fp32_layers)
        judged = budget.judge(onnx_predictor(model)(x_val), y_val)
        return search.Trial.judged(number, float(len(fp32_layers)), judged, size_bytes=len(model), nonzeros=nonzeros,
                                   sparsity=sparsity, seconds=time.perf_counter() - began,
                                   model=(model, list(fp32_layers)))

    outcome = search.search_fallback(ranked, run_trial, budget, started=started)
    model, fp32_layers = outcome.best.model
    record = {**outcome.record(), "fp32_layers": fp32_layers, "sensitivity": sensitivity,
              "ranking_seconds": round(outcome.seconds - sum(t.seconds for t in outcome.trials), 2)}
    extra["search"] = record
    rows = [{**trial.row(), "fp32_layers": trial.model[1]} for trial in outcome.trials]
    name = what.split(" step ")[0]
    work.searches[name] = rows
    if run_id is not None:
        _log_search(run_id, rows, record)
        import mlflow

        mlflow.MlflowClient().log_dict(run_id, sensitivity, "search/sensitivity.json")
    log.log(outcome.log_level, "%s: %s; fp32 layers: %s", what, outcome.message, fp32_layers or "none")
    return model, fp32_layers


def _log_search(run_id: str, rows: list[dict[str, Any]], record: dict[str, Any]) -> None:
    """Each trial as step-indexed ``search/...`` metrics, the table and the chosen setting in the variant's run."""
    import mlflow
    from mlflow.entities import Metric

    from tasks.core.metric_names import SEARCH_TRIAL_KEYS

    client = mlflow.MlflowClient()
    now = int(time.time() * 1000)
    trials = [Metric(name, float(row[key]), now, int(row["number"]))
              for row in rows for name, key in SEARCH_TRIAL_KEYS.items() if row.get(key) is not None]
    for start in range(0, len(trials), 1000):  # one transaction per 1,000 values (MLflow's limit), not one each
        client.log_batch(run_id, metrics=trials[start : start + 1000])
    client.log_dict(run_id, rows, "search/trials.json")
    client.log_dict(run_id, record, "search/chosen.json")
    client.set_tag(run_id, "search", f"{record['knob']}={record['chosen']:g}"
                   + ("" if record["within_budget"] else " (over budget)"))


def _recorded(outcome: Any, training: Any, work: Any, search: dict[str, Any]) -> Any:
    """Keep a finished search's trials (compress table, MLflow run) and return its best model."""
    rows = [trial.row() for trial in outcome.trials]
    work.searches[training.variant] = rows
    if training.run_id is not None:
        _log_search(training.run_id, rows, search)
    log.log(outcome.log_level, "%s: %s", training.variant, outcome.message)
    return outcome.best.model
