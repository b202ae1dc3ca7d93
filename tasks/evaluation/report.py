"""``artifacts/evaluation/report.md``: the result first, the tables of every model (headline
figures, then details), the gate decision, and how every figure was obtained. Cells are
rendered by :data:`tasks.core.tables.COLUMNS`, so the report shows the same figures as the
closing table. ``report.html`` is the same report with its images embedded: MLflow's
artifact viewer shows it whole (it does not display a Markdown file's relative images)."""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tasks.core import metric_names as names
from tasks.core.config import EvaluateParams
from tasks.core.tables import COLUMNS, SAVING_NOISE_NOTE, cell, change_noise_note, gains_sentence
from tasks.evaluation.results import BASELINE, Evaluation
from tasks.evaluation.summary import DETAIL_COLUMNS, ENERGY_COLUMNS, HEADLINE_COLUMNS, summary_rows


def models_table(evaluation: Evaluation, columns: Sequence[str] = HEADLINE_COLUMNS) -> list[str]:
    """The Markdown table of every model (one line per row) showing ``columns``."""
    lines = [
        "| " + " | ".join(COLUMNS[key].header for key in columns) + " |",
        "|" + "---|" * len(columns),
    ]
    for row in summary_rows(evaluation):
        lines.append("| " + " | ".join(cell(key, row) for key in columns) + " |")
    return lines


def headline(evaluation: Evaluation) -> str:
    """One sentence: the champion and what it gains over the baseline (or that there is none)."""
    promotion = evaluation.promotion
    if not evaluation.champion:
        return f"**No champion**: no model passes the gate. {promotion.reason if promotion else ''}".strip()
    m = evaluation.models[evaluation.champion].metrics
    registered = (
        f" Registered as `{promotion.registered_model}` version {promotion.version} (@champion)."
        if promotion and promotion.version else ""
    )
    # The gate's pick that lost its challenge (or reads another input) is no champion: the flow's
    # result says "best of this run (not promoted)", and so does the report.
    title = "Champion"
    if promotion and not promotion.promoted:
        title = "Best of this run (not promoted)"
        registered = (f" `@champion` of `{promotion.registered_model}` stays version {promotion.version} "
                      f"({promotion.champion}): see Challenger vs. champion." if promotion.version else
                      f" No version of `{promotion.registered_model}` holds `@champion`.")
    if evaluation.champion == BASELINE:
        return (f"**{title}: baseline** (accuracy {cell(names.ACCURACY, m)}%): no variant beats it within the "
                f"gate.{registered}")
    return f"**{title}: {evaluation.champion}**: {gains_sentence(m)}.{registered}"


def _methods(evaluation: Evaluation, data_digest: str | None) -> list[str]:
    s = evaluation.settings
    return [f"- {line}" for line in [
        f"Test split: {s['test_samples']} samples, {s['classes']} classes"
        + (f"; {s['test_split']}" if "test_split" in s else "")
        + (f", data digest `{data_digest}`" if data_digest else "") + ".",
        f"CPU: {s['cpu']}; {s['threads']} thread(s) (torch intra-op and ONNX Runtime intra-op).",
        f"Latency: wall clock at batch 1, {s['latency_repeats']} interleaved rounds x "
        f"{s['batch1_calls_per_round']} timed calls per model (after {s['warmup']} warm-up call(s), and one "
        f"untimed call per round); CPU ms = median process CPU time of those calls; throughput: median of "
        f"{s['latency_repeats']} calls at batch {s['throughput_batch']}"
        + (f"; every input a sequence of {s['sequence_length']} token ids (text, padded)" if "sequence_length" in s else "")
        + ".",
        f"Energy per 1,000 predictions: {s['energy_method']} (`energy_source: {s['energy_source']}`). "
        f"CO2e: joules x {s['grid_co2e_g_per_kwh']:g} g/kWh (`evaluate.grid_co2e_g_per_kwh`).",
        "Energy to make a model (`make_energy_j`): the baseline's training, every Horovod worker summed; a "
        "variant's steps from the baseline (its parent's included): training on the Horovod workers, "
        "calibration, quantization, export in the compress stage (each model's `make_energy` note says how "
        "it was measured). Payback: make_energy_j / (the baseline's energy per prediction - the variant's); "
        "`never` when the variant saves nothing measurable: the saving's 95% interval reaches zero (Student's t "
        "times `energy_saved_per_1k_noise_j`, one standard error from its energy readings and the baseline's, "
        "paired pass by pass, and never below what the meter's step allows).",
        f"Peak memory: {s['memory_method']}.",
        "Size × and speed ×: times smaller / faster (latency p50) than the baseline; samples/s ×: "
        "throughput / the baseline's. Per-class precision and recall: `per_class` in "
        "`metrics/evaluate.json` and `per_class.json` in each model's MLflow run.",
    ]]


def _gate_section(evaluation: Evaluation, params: EvaluateParams) -> list[str]:
    gate = params.gate
    limits = [f"accuracy drop <= {gate.max_accuracy_drop:g}"]
    if gate.max_class_recall_drop is not None:
        limits.append(f"each class's recall drop <= {gate.max_class_recall_drop:g}")
    if gate.max_latency_p95_ms is not None:
        limits.append(f"latency p95 <= {gate.max_latency_p95_ms:g} ms")
    if gate.max_size_bytes is not None:
        limits.append(f"size <= {gate.max_size_bytes} B")
    if gate.max_energy_per_1k_j is not None:
        limits.append(f"energy <= {gate.max_energy_per_1k_j:g} J per 1,000 predictions")
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
            f"{decision['tolerance']['max_accuracy_drop']:g} on accuracy"
            + (f", max_class_recall_drop {limit:g} on each class's recall."
               if (limit := decision['tolerance'].get('max_class_recall_drop')) is not None else "."),
            "",
            f"| figure | challenger {decision['challenger']['model']} | champion v{champion['version']} "
            "(re-measured, this split) | champion (recorded) |",
            "|---|---|---|---|",
        ]
        for key in ("accuracy", "macro_f1", "size_bytes", "latency_p50_ms"):
            lines.append(f"| {key} | {_figure(ours.get(key), key)} | {_figure(remeasured.get(key), key)} | "
                         f"{_figure(recorded.get(key), key)} |")
        lines.append("")
        rows = decision.get("compared_on") or {}
        if rows.get("left_out"):  # compared_on is there only where the decision used those rows
            both = " and ".join(f"{key} {_figure(rows['challenger'].get(key), key)} vs "
                                f"{_figure(rows['champion'].get(key), key)}"
                                for key in ("accuracy", "macro_f1") if key in rows["champion"])
            lines += [f"{rows['left_out']} of this split's {rows['test_rows']} test rows were in the champion's train "
                      f"or validation split. The decision compares both on the {rows['compared']} it never trained on: "
                      f"{both} (challenger vs champion).", ""]
    elif decision.get("verdict") == "first_champion":
        lines += [f"No champion under `{name}` before this run.", ""]
    if promotion.version:
        lines.append(
            f"**@champion of `{name}` after this run: version {promotion.version}** ({promotion.champion}). "
            f"Load it with `mlflow.pyfunc.load_model(\"models:/{name}@champion\")` (raw inputs as its signature "
            "says: images shaped, rows of features as a DataFrame of its named columns; returns class indices, or "
            "their names with `params={\"output\": \"name\"}`). The evidence is in `promotion.json`."
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
        "![accuracy vs energy](accuracy_vs_energy.png)",
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
    """``artifacts/evaluation/report.md``: the result, the tables of every model (headline
    figures, then details), the plots, the gate decision, the methods."""
    lines = ["# slimflow evaluation", "", headline(evaluation), ""]
    for caveat in evaluation.caveats:
        lines += [f"**Caveat**: {caveat[0].upper()}{caveat[1:]}.", ""]
    lines += ["## Models", ""]
    lines += models_table(evaluation, HEADLINE_COLUMNS)
    lines += ["", f"{change_noise_note(evaluation.settings)}.", "", *_plots_section(evaluation, training_curves), "",
              "## Details", ""]
    lines += models_table(evaluation, DETAIL_COLUMNS)
    lines += ["", "## Energy", "", *models_table(evaluation, ENERGY_COLUMNS), "", f"{SAVING_NOISE_NOTE}."]
    lines += ["", *_gate_section(evaluation, params), "", "## How figures were obtained", ""]
    lines += [*_methods(evaluation, data_digest), ""]
    for name, result in evaluation.models.items():
        notes = ", ".join(f"{k}: {v}" for k, v in result.notes.items())
        lines.append(f"- {name}: {notes}")
    return "\n".join(lines) + "\n"


_IMAGE = re.compile(r'<img src="([^"/]+\.png)"')

_STYLE = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; font-size: 14px;
       line-height: 1.45; max-width: 1100px; margin: 1.5em auto; padding: 0 1em; color: #1f2328; }
table { border-collapse: collapse; margin: 0.5em 0 1em; font-size: 13px; }
th, td { border: 1px solid #d0d7de; padding: 3px 8px; text-align: right; white-space: nowrap; }
th:first-child, td:first-child { text-align: left; }
tr:nth-child(even) { background: #f6f8fa; }
img { max-width: 100%; display: block; margin: 0.5em 0 1em; }
code { background: #eff1f3; padding: 0 3px; border-radius: 3px; }
"""


def report_html(markdown_text: str, folder: Path) -> str:
    """``report.md`` as one HTML page, the PNGs it shows (in ``folder``) embedded as data URIs."""
    from markdown_it import MarkdownIt  # rich's Markdown parser: already installed

    body = MarkdownIt("commonmark").enable("table").render(markdown_text)

    def embed(match: re.Match[str]) -> str:
        image = folder / match.group(1)
        if not image.is_file():
            return match.group(0)
        return f'<img src="data:image/png;base64,{base64.b64encode(image.read_bytes()).decode()}"'

    title = html.escape("slimflow evaluation")
    return (
        f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{title}</title>"
        f"<style>{_STYLE}</style></head>\n<body>\n{_IMAGE.sub(embed, body)}</body></html>\n"
    )
