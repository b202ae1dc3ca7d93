"""What a pipeline run produced, shown where people look: the pipeline's MLflow run (the top
of the run tree) and the Prefect flow run.

- :func:`log_pipeline_params`: the parameters as readable params (lists as JSON; the
  compression recipes as names, with ``recipes.json`` and ``params.yaml`` as artifacts).
- :func:`publish_result`: after the stages, the pipeline run gets the champion (tags: model,
  registered version, its run; metrics: its figures under the names of
  :mod:`tasks.core.metric_names`, against the baseline), the gate decision, the comparison
  (``comparison.csv`` / ``.json``), the Pareto plots and the report as artifacts; the flow
  run gets a formatted ``variant-comparison`` table and an ``mlflow-runs`` Markdown
  artifact linking the pipeline, stage and model runs and the registered version; the
  returned lines close the flow run's log.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flows.report import COMPARISON_COLUMNS, comparison_rows, gate_failures
from tasks.core import metric_names as names
from tasks.core.config import Params
from tasks.core.dvc import Reproduced
from tasks.core.paths import ProjectPaths
from tasks.core.tables import COLUMNS, PAYBACK_NOTE, cell, change_noise_note, gains_sentence

log = logging.getLogger("slimflow.results")

# Where `make ui` serves the local store: links in Prefect artifacts point there when the
# tracking URI is not a server.
LOCAL_UI = "http://127.0.0.1:5000"
PLOTS = ("accuracy_vs_size.png", "accuracy_vs_latency.png", "accuracy_vs_energy.png")
REPORTS = ("report.html", "report.md")


@dataclass
class PipelineResult:
    """What the flow returns and logs about its outcome."""

    rows: list[dict[str, Any]] = field(default_factory=list)  # the comparison, raw values
    champion: str | None = None
    lines: list[str] = field(default_factory=list)  # the closing lines of the flow run's log


def log_pipeline_params(params: Params) -> None:
    """Readable params on the active (pipeline) run; the recipes as artifacts, not a repr."""
    import mlflow
    import yaml

    from tasks.core import tracking

    values = params.model_dump(mode="json")
    recipes = values["compress"].pop("variants")
    values["compress"]["variants"] = [recipe["name"] for recipe in recipes]
    mlflow.log_params(tracking.readable_params(values))
    mlflow.log_dict({"variants": recipes}, "recipes.json")
    mlflow.log_text(yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False), "params.yaml")


def publish_result(
    paths: ProjectPaths, run_id: str, experiment_id: str, results: list[dict[str, Any]]
) -> PipelineResult:
    """The outcome on the active (pipeline) MLflow run and as Prefect artifacts of the flow run."""
    import mlflow

    mlflow.log_metrics({names.stage_time_s(r["stage"]): r["seconds"] for r in results})
    log_pipeline_energy(paths, run_id, [r["stage"] for r in results if r["ran"]])
    outcome = PipelineResult()
    # Only a run that reached the evaluate stage (ran or up to date) has a result of its own.
    if any(r["stage"] == "evaluate" for r in results):
        outcome.rows = comparison_rows(paths)
    evaluated = _read_json(paths.metrics / "evaluate.json") if outcome.rows else {}
    decision = _read_json(paths.evaluation / "result.json") if outcome.rows else {}
    if outcome.rows and not any(r["stage"] == "evaluate" and r["ran"] for r in results):
        decision = standing_decision(decision)
    links = _Links(mlflow.get_tracking_uri(), experiment_id)
    if outcome.rows:
        outcome.champion = evaluated.get("champion")
        _log_result(paths, outcome, evaluated, decision, links)
    outcome.lines = result_lines(outcome, decision, run_id, (paths.evaluation / "report.html").relative_to(paths.root))
    settings = _read_json(paths.evaluation / "models.json").get("settings", {}) if outcome.rows else {}
    _prefect_artifacts(outcome, decision, run_id, links, results, settings if isinstance(settings, dict) else {})
    return outcome


def log_pipeline_energy(paths: ProjectPaths, run_id: str, ran: list[str]) -> float | None:
    """The run's energy on the pipeline run: each stage that ran (its run's ``energy_j``) as
    ``stage_energy_j.<stage>``, their sum as ``energy_j``, and its CO2e (``co2e_g``) at
    ``evaluate.grid_co2e_g_per_kwh``. Stages found up to date spent nothing in this run."""
    import mlflow

    from tasks.core.config import ParamsError, load_params
    from tasks.core.energy import co2e_g

    stage_runs = _stage_runs(run_id)
    client = mlflow.MlflowClient()
    spent = {}
    for stage in ran:
        if stage in stage_runs and names.ENERGY_J in (metrics := client.get_run(stage_runs[stage]).data.metrics):
            spent[stage] = metrics[names.ENERGY_J]
    if not spent:
        return None
    try:
        intensity = load_params(paths.params).evaluate.grid_co2e_g_per_kwh
    except ParamsError:  # validated before the run started; edited since
        intensity = None
    total = sum(spent.values())
    figures = {names.stage_energy_j(stage): joules for stage, joules in spent.items()} | {names.ENERGY_J: total}
    if intensity is not None:
        figures[names.CO2E_G] = co2e_g(total, intensity)
    mlflow.log_metrics(figures)
    return total


def _read_json(path: Any) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _log_result(paths: ProjectPaths, outcome: PipelineResult, evaluated: dict[str, Any],
                decision: dict[str, Any], links: _Links) -> None:
    """Tags, metrics and artifacts of the result on the active (pipeline) run."""
    import mlflow

    champion = outcome.champion
    tags = {
        "champion": champion or "none",
        "gate_decision": str(decision.get("decision") or "")[:5000] or "-",
        "models_evaluated": str(len(outcome.rows)),
    }
    if champion:
        tags.update({
            "champion_registered_model": str(decision.get("registered_model") or "-"),
            "champion_version": str(decision.get("registered_version") or "-"),
            "champion_run_id": str((decision.get("model_runs") or {}).get(champion) or "-"),
            "champion_method": _method(paths, champion),
        })
        figures = evaluated.get(champion) or {}
        mlflow.log_metrics({
            key: float(figures[key]) for key in names.PIPELINE_RESULT_FIGURES
            if isinstance(figures.get(key), (int, float))
        })
    tags["mlflow.note.content"] = _description(outcome, decision, links)
    mlflow.set_tags(tags)
    mlflow.log_text(comparison_csv(outcome.rows), "result/comparison.csv")
    mlflow.log_dict({"champion": champion, "models": outcome.rows}, "result/comparison.json")
    for name in PLOTS:
        if (paths.plots / name).is_file():
            mlflow.log_artifact(str(paths.plots / name), "result")
    for name in REPORTS:
        if (paths.evaluation / name).is_file():
            mlflow.log_artifact(str(paths.evaluation / name), "result")


def _method(paths: ProjectPaths, model: str) -> str:
    folder = paths.model if model == "baseline" else paths.compressed / model
    return str(_read_json(folder / "manifest.json").get("method") or "-")


def comparison_csv(rows: list[dict[str, Any]]) -> str:
    """`result/comparison.csv`: the comparison's raw figures, one row per model."""
    buffer = io.StringIO()
    change = COMPARISON_COLUMNS.index(names.ACCURACY_CHANGE_PTS)  # its noise beside it, as the tables show it
    fields = [*COMPARISON_COLUMNS[:change + 1], names.ACCURACY_CHANGE_NOISE_PTS, *COMPARISON_COLUMNS[change + 1:]]
    writer = csv.DictWriter(buffer, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def champion_sentence(champion: str | None, figures: dict[str, Any]) -> str:
    """'int8-static-ort: accuracy 97.98% (+0.90 pts), 19.5 KiB (4.00× smaller), p50 0.041 ms (2.00× faster) vs the baseline'."""
    if not champion:
        return "no champion: no model passes the gate"
    if champion == "baseline":
        return (
            f"baseline (no variant does better within the gate): accuracy "
            f"{cell(names.ACCURACY, figures)}%, size "
            f"{cell(names.SIZE_BYTES, figures)} KiB, latency p50 "
            f"{cell(names.LATENCY_P50_MS, figures)} ms"
        )
    return f"{champion}: {gains_sentence(figures)}"


def standing_decision(decision: dict[str, Any]) -> dict[str, Any]:
    """The last evaluation's decision, as a run that did not evaluate (evaluate up to date)
    reports it: that run registered nothing and moved no alias, so its lines must not say
    "registered as version N; @champion moved" or "new version" as if it had."""
    if not decision:
        return decision
    last = str(decision.get("evaluate_run_id") or "?")[:8]
    said = decision.get("decision") or "-"
    return {**decision, "new_version": False,
            "decision": f"evaluate up to date: the registry untouched by this run (its last run {last}: {said})"}


def _headline_word(outcome: PipelineResult, decision: dict[str, Any]) -> str:
    """What the gate's pick is called in the result's first line: ``champion`` when it holds
    ``@champion`` after the run, else ``best of this run (not promoted)``. The next line says
    which version does (a pick that lost its challenge, or reads another input)."""
    if not outcome.champion or decision.get("promoted", True):
        return "champion"
    return "best of this run (not promoted)"


def _registered(decision: dict[str, Any]) -> str | None:
    if not (decision.get("registered_model") and decision.get("registered_version")):
        return None
    state = "new version" if decision.get("new_version") else "unchanged"
    return (f"models:/{decision['registered_model']}@champion = version {decision['registered_version']} "
            f"({decision.get('champion_holder') or '?'}; {state})")


def _description(outcome: PipelineResult, decision: dict[str, Any], links: _Links) -> str:
    lines = [f"**{_headline_word(outcome, decision).capitalize()}**: {champion_sentence(outcome.champion, _figures(outcome))}."]
    # Right under the headline: the UI folds the description after its first lines, and a
    # caveat qualifies the headline's figures (98% accuracy where always answering 'ok' reads 98%).
    lines += [f"Caveat: {caveat}." for caveat in decision.get("caveats") or []]
    model_runs = list((decision.get("model_runs") or {}).values())
    if model_runs:  # a link within the MLflow UI, whatever its address
        lines.append(f"[Compare the {len(model_runs)} models]({links.compare(model_runs, relative=True)}) "
                     "(Scatter Plot: X size_bytes, Y accuracy).")
    if registered := _registered(decision):
        lines.append(f"Registered: `{registered}`.")
    if decision.get("decision"):
        lines.append(f"Gate: {decision['decision']}.")
    lines.append("Artifacts: result/report.html (the report, images embedded), result/comparison.csv, "
                 "the accuracy vs size / latency plots; recipes.json and params.yaml.")
    return "\n\n".join(lines)


def result_lines(outcome: PipelineResult, decision: dict[str, Any], run_id: str,
                 local_report: Path | str = "artifacts/evaluation/report.html") -> list[str]:
    """The closing lines of the flow run's log: the champion and its gains, the registry, the
    gate, and where the report is: the pipeline run's artifact and ``local_report``, the
    project's own copy (a user looking for ``result/`` in the project found nothing)."""
    if not outcome.rows:
        return [f"result: no evaluation in this run (evaluate not selected); MLflow pipeline run {run_id}"]
    lines = [f"result: {_headline_word(outcome, decision)} {champion_sentence(outcome.champion, _figures(outcome))}"]
    passing = sum(1 for row in outcome.rows if row.get("gate") in {"pass", "champion"})
    lines.append(f"result: {passing} of {len(outcome.rows)} models pass the gate; {decision.get('decision') or '-'}")
    if registered := _registered(decision):
        lines.append(f"result: registered {registered}")
    lines += [f"result: caveat: {caveat}" for caveat in decision.get("caveats") or []]
    lines.append(f"result: MLflow pipeline run {run_id} (report: its artifact result/report.html; "
                 f"in the project: {local_report})")
    return lines


class _Links:
    """MLflow UI links: the tracking server's, or `make ui`'s for a local store."""

    def __init__(self, tracking_uri: str, experiment_id: str) -> None:
        self.local = not tracking_uri.startswith("http")
        self.base = LOCAL_UI if self.local else tracking_uri.rstrip("/")
        self.experiment_id = experiment_id

    def experiment(self) -> str:
        """The experiment in MLflow's "Model training" view (not the GenAI view it may open in)."""
        return f"{self.base}/#/experiments/{self.experiment_id}?workflowType=machine_learning"

    def compare(self, run_ids: list[str], relative: bool = False) -> str:
        """MLflow's compare page for ``run_ids`` (``#/...`` only, with ``relative``)."""
        runs = "[" + ",".join(f"%22{run_id}%22" for run_id in run_ids) + "]"
        page = (f"#/compare-runs?runs={runs}&experiments=[%22{self.experiment_id}%22]"
                "&workflowType=machine_learning")
        return page if relative else f"{self.base}/{page}"

    def run(self, run_id: str | None, label: str | None = None) -> str:
        if not run_id:
            return "-"
        return f"[{label or run_id}]({self.base}/#/experiments/{self.experiment_id}/runs/{run_id})"

    def version(self, name: str, version: str) -> str:
        return f"[{name} version {version}]({self.base}/#/models/{name}/versions/{version})"


def _stage_runs(run_id: str) -> dict[str, str]:
    """The stage runs nested under the pipeline run: {stage: run id}."""
    import mlflow

    runs = mlflow.search_runs(
        search_all_experiments=True, output_format="list",
        filter_string=f"tags.mlflow.parentRunId = '{run_id}'",
    )
    return {r.data.tags["stage"]: r.info.run_id for r in sorted(runs, key=lambda r: r.info.start_time)
            if r.data.tags.get("stage")}


# Prefect's UI renders each cell of a table artifact as Markdown, where the tables' "-" for
# "no figure" (the baseline's payback) is a list item: it showed a bullet.
_NO_FIGURE_IN_MARKDOWN = "–"


def comparison_table(rows: list[dict[str, Any]]) -> list[dict[str, str]]:
    """The comparison as the flow run's table artifact: formatted cells under readable headers."""
    return [{COLUMNS[key].header: _NO_FIGURE_IN_MARKDOWN if (text := cell(key, row)) == "-" else text
             for key in COMPARISON_COLUMNS} for row in rows]


# How a stage's outcome reads in the run's log and its result.
STAGE_OUTCOME_WORDS = {
    Reproduced.RAN: "ran",
    Reproduced.RESTORED: "restored from DVC's run cache",
    Reproduced.SKIPPED: "skipped (up to date)",
}


def stage_outcome(result: dict[str, Any]) -> Reproduced:
    """What DVC did with the stage of ``result`` (a result of :func:`flows.pipeline.run_stage`)."""
    if result.get("restored"):
        return Reproduced.RESTORED
    return Reproduced.RAN if result["ran"] else Reproduced.SKIPPED


def runs_markdown(outcome: PipelineResult, decision: dict[str, Any], run_id: str, links: _Links,
                  results: list[dict[str, Any]]) -> str:
    """The ``mlflow-runs`` artifact: the result, then where each run is."""
    lines = ["## Result", ""]
    if outcome.rows:
        lines += [f"**Champion**: {champion_sentence(outcome.champion, _figures(outcome))}.", ""]
        if decision.get("registered_model") and decision.get("registered_version"):
            lines += [f"Registered: {links.version(decision['registered_model'], str(decision['registered_version']))}"
                      f" (`models:/{decision['registered_model']}@champion`).", ""]
        if decision.get("decision"):
            lines += [f"Gate: {decision['decision']}.", ""]
        if failed := gate_failures(decision):  # the comparison's gate column says "fail"; here is why
            lines += [f"- **{name}** {reason}" for name, reason in failed.items()] + [""]
        for caveat in decision.get("caveats") or []:
            lines += [f"**Caveat**: {caveat}.", ""]
    else:
        lines += ["No evaluation in this run (the evaluate stage was not selected).", ""]
    lines += ["## MLflow runs", ""]
    if links.local:
        lines += [f"Local store; the links open the MLflow UI started by `make ui` ({LOCAL_UI}).", ""]
    lines += [f"Experiment (Model training view): {links.experiment()}", "",
              f"MLflow pipeline run: {links.run(run_id)}", "", "| run | MLflow run | stage |", "|---|---|---|"]
    stage_runs = _stage_runs(run_id)
    for r in results:
        done = stage_outcome(r)
        state = STAGE_OUTCOME_WORDS[done] + ("" if done is Reproduced.SKIPPED else f" in {r['seconds']:.1f} s")
        lines.append(f"| stage {r['stage']} | {links.run(stage_runs.get(r['stage']))} | {state} |")
    model_runs = decision.get("model_runs") or {}
    for model, model_run in model_runs.items():
        mark = " (champion)" if model == outcome.champion else ""
        lines.append(f"| model {model}{mark} | {links.run(model_run)} | its model, recipe and figures |")
    if model_runs:
        lines += ["", f"[Compare the {len(model_runs)} models in MLflow]({links.compare(list(model_runs.values()))})"
                      " (Scatter Plot: X `size_bytes`, Y `accuracy`)."]
    return "\n".join(lines) + "\n"


def _figures(outcome: PipelineResult) -> dict[str, Any]:
    """The champion's row of the comparison (empty without a champion)."""
    return next((r for r in outcome.rows if r["model"] == outcome.champion), {})


def comparison_description(settings: dict[str, Any]) -> str:
    """The Prefect table's description; ``settings``: the evaluation's (``models.json``), which
    say how the test split was drawn and counted where it was not at random (the closing
    table's title and note say the same)."""
    drawn = f" ({settings['test_split']})" if "test_split" in settings else ""
    return (f"Baseline and compressed variants on the test split{drawn}: size × and speed × are times smaller / "
            f"faster than the baseline; {change_noise_note(settings)}; {PAYBACK_NOTE}; gate: champion, pass or fail.")


def _prefect_artifacts(outcome: PipelineResult, decision: dict[str, Any], run_id: str, links: _Links,
                       results: list[dict[str, Any]], settings: dict[str, Any]) -> None:
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    if outcome.rows:
        create_table_artifact(key="variant-comparison", table=comparison_table(outcome.rows),
                              description=comparison_description(settings))
    create_markdown_artifact(key="mlflow-runs", markdown=runs_markdown(outcome, decision, run_id, links, results),
                             description="The result and its MLflow runs")
