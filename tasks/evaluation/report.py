"""``artifacts/evaluation/report.md``: the table of every model, the gate decision, and how
every figure was obtained. Cells are rendered by :data:`tasks.core.tables.COLUMNS`, so the
report shows the same figures as the closing table."""

from __future__ import annotations

from typing import Any

from tasks.core.config import EvaluateParams
from tasks.core.tables import COLUMNS
from tasks.evaluation.results import Evaluation
from tasks.evaluation.summary import REPORT_COLUMNS, summary_rows


def models_table(evaluation: Evaluation) -> list[str]:
    """The Markdown table of every model (one line per row)."""
    lines = [
        "| " + " | ".join(COLUMNS[key].header for key in REPORT_COLUMNS) + " |",
        "|" + "---|" * len(REPORT_COLUMNS),
    ]
    for row in summary_rows(evaluation):
        lines.append("| " + " | ".join(COLUMNS[key].render(row.get(key)) for key in REPORT_COLUMNS) + " |")
    return lines


def _methods(evaluation: Evaluation, data_digest: str | None) -> list[str]:
    s = evaluation.settings
    return [
        f"Test split: {s['test_samples']} samples, {s['classes']} classes"
        + (f", data digest `{data_digest}`" if data_digest else "") + ".",
        f"CPU: {s['cpu']}; {s['threads']} thread(s) (torch intra-op and ONNX Runtime intra-op).",
        f"Latency: wall clock at batch 1, {s['latency_repeats']} interleaved rounds x "
        f"{s['batch1_calls_per_round']} timed calls per model (after {s['warmup']} warm-up call(s), and one "
        f"untimed call per round); CPU ms = median process CPU time of those calls; throughput: median of "
        f"{s['latency_repeats']} calls at batch {s['throughput_batch']}"
        + (f"; every input a sequence of {s['sequence_length']} token ids (text, padded)" if "sequence_length" in s else "")
        + ".",
        f"Energy: {s['energy_method']}, over the throughput calls (`energy_source: {s['energy_source']}`).",
        f"Peak memory: {s['memory_method']}.",
        "Size × and speed ×: times smaller / faster (latency p50) than the baseline.",
    ]


def _gate_section(evaluation: Evaluation, params: EvaluateParams) -> list[str]:
    gate = params.gate
    limits = [f"accuracy drop <= {gate.max_accuracy_drop:g}"]
    if gate.max_latency_p95_ms is not None:
        limits.append(f"latency p95 <= {gate.max_latency_p95_ms:g} ms")
    if gate.max_size_bytes is not None:
        limits.append(f"size <= {gate.max_size_bytes} B")
    promotion = evaluation.promotion
    lines = [
        "## Gate and champion",
        "",
        f"Gate: {', '.join(limits)}; objective: **{params.objective}**; the baseline is a candidate too.",
        "",
    ]
    lines += [f"- **{name}**: {reason}" for name, reason in evaluation.reasons.items()]
    lines += ["", f"**Decision:** {promotion.reason if promotion else 'registry not updated'}."]
    if promotion:
        lines += ["", *_champion_section(promotion)]
    return lines


def _figure(value: object, key: str) -> str:
    if value is None:
        return "-"
    return f"{float(value):.0f}" if key in {"size_bytes", "throughput_sps"} else f"{float(value):.4g}"


def _champion_section(promotion: Any) -> list[str]:
    """Challenger and champion side by side, and the version ``@champion`` points at after the run."""
    decision = promotion.decision or {}
    name = promotion.registered_model
    lines = ["## Challenger vs. champion", ""]
    champion = decision.get("champion")
    if decision.get("challenger") and champion:
        ours, recorded = decision["challenger"]["figures"], champion.get("recorded") or {}
        remeasured = champion.get("remeasured") or {}
        lines += [
            f"Basis: {decision.get('basis') or 'input contract'}; tolerance: max_accuracy_drop "
            f"{decision['tolerance']['max_accuracy_drop']:g} on accuracy.",
            "",
            f"| figure | challenger {decision['challenger']['model']} | champion v{champion['version']} "
            "(re-measured, this split) | champion (recorded) |",
            "|---|---|---|---|",
        ]
        for key in ("accuracy", "macro_f1", "size_bytes", "latency_p50_ms"):
            lines.append(f"| {key} | {_figure(ours.get(key), key)} | {_figure(remeasured.get(key), key)} | "
                         f"{_figure(recorded.get(key), key)} |")
        lines.append("")
    elif decision.get("verdict") == "first_champion":
        lines += [f"No champion under `{name}` before this run.", ""]
    if promotion.version:
        lines.append(
            f"**@champion of `{name}` after this run: version {promotion.version}** ({promotion.champion}). "
            f"Load it with `mlflow.pyfunc.load_model(\"models:/{name}@champion\")` (raw, shaped inputs; "
            "returns class indices). The evidence is in `promotion.json`."
        )
    else:
        lines.append(f"**@champion of `{name}` after this run: none** (no version holds the alias).")
    return lines


def _plots_section(evaluation: Evaluation, training_curves: bool) -> list[str]:
    lines = [
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
    return lines


def report_markdown(
    evaluation: Evaluation, params: EvaluateParams, data_digest: str | None, training_curves: bool = True
) -> str:
    """``artifacts/evaluation/report.md``: the table of every model, the gate decision, the methods."""
    lines = ["# slimflow evaluation", "", *_methods(evaluation, data_digest), "", "## Models", ""]
    lines += models_table(evaluation)
    lines += ["", *_gate_section(evaluation, params), "", "## How figures were obtained", ""]
    for name, result in evaluation.models.items():
        notes = ", ".join(f"{k}: {v}" for k, v in result.notes.items())
        lines.append(f"- {name}: {notes}")
    lines += ["", *_plots_section(evaluation, training_curves)]
    return "\n".join(lines) + "\n"
