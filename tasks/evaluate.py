"""The ``evaluate`` stage: every model measured alike, compared side by side, a champion registered.

``python -m tasks.evaluate`` (the DVC stage command) measures the baseline
(``artifacts/model``) and every variant (``artifacts/compressed/<name>/`` with a
``manifest.json``) on the test split, each in the runtime it ships in (see
:mod:`tasks.evaluation.benchmark` for how), with one identical set of metric keys per model
and the ratios to the baseline. It then

- opens the stage's MLflow run and completes each model's own run (the train stage's for
  the baseline, the compress stage's for a variant; see :mod:`tasks.evaluation.model_runs`)
  with its logged model (while the memory probe runs, before anything is timed) and figures
  under the same metric keys, so the MLflow compare view and Models tab line them up;
- applies the gate (:func:`tasks.evaluation.gate.select_champion`); the winner then
  challenges the current ``@champion`` of ``evaluate.registered_model``
  (:mod:`tasks.evaluation.challenge`) and is registered (from its own run's logged model)
  with the alias only if it takes the same input and is not worse on the same data
  (:mod:`tasks.evaluation.registration`); the decision and both models' figures go to
  ``artifacts/evaluation/promotion.json``;
- writes ``metrics/evaluate.json``, ``plots/tradeoff.json``, ``plots/confusion.csv``, the
  PNGs declared in ``dvc.yaml`` and ``artifacts/evaluation/`` (report.md and .html,
  result.json, training curves, each model's confusion matrix),
  built in a staging folder and moved into place only when all of them exist;
- prints a closing table of every model.
"""

from __future__ import annotations

# In a pipeline run or a `dvc repro` this process becomes a child of a fork server (tasks.core.fork_server)
# before it imports anything else: the imports below took the entry 0.1-0.3 s for nothing.
if __name__ == "__main__":
    from tasks.core.dvc_fork_server import run_stage_forked

    run_stage_forked("tasks.evaluate")

import logging
import os
import shutil
import tempfile
from pathlib import Path

from tasks.core.config import Params, ParamsError, load_params
from tasks.core.errors import disk_full_message, stage_main
from tasks.core.paths import ProjectPaths
from tasks.core.processes import die_with_parent, exit_process
from tasks.evaluation.benchmark import discover_models, measure_models
from tasks.evaluation.drawing import MODEL_FIGURES, figures_drawn_meanwhile
from tasks.evaluation.gate import apply_gate
from tasks.evaluation.outputs import metrics_document, publish, read_history, result_document, write_json
from tasks.evaluation.report import report_html, report_markdown
from tasks.evaluation.results import EvaluateError, Evaluation

log = logging.getLogger("slimflow.evaluate")


def run_evaluate(paths: ProjectPaths, params: Params) -> Evaluation:
    """Measure, compare, decide, register and publish; the outputs appear all together or not at all."""
    from tasks.core import tracking
    from tasks.evaluation import model_runs, registration, runs  # MLflow: imported once the inputs are known to be there

    from tasks.core.energy import process_meter

    settings = params.evaluate
    meter = process_meter()  # sets itself up in the background while the models load
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
            # Each model is logged into the run that made it, and its figures drawn, while the
            # memory probe runs, before the timing, which must have the machine to itself.
            history = read_history(paths.plots / "train_history.json")
            logged: dict[str, tuple[str, str]] = {}

            def log_and_draw_models(scored: Evaluation) -> None:
                with figures_drawn_meanwhile(staging, scored, history, MODEL_FIGURES):
                    logged.update(model_runs.log_models(scored.models, scored.class_names, paths,
                                                        params.base.experiment, stage.info.run_id))
                model_runs.log_confusion_matrices({name: run_id for name, (run_id, _) in logged.items()},
                                                  staging / "evaluation")

            evaluation = measure_models(model_dirs, paths.prepared, settings, params.base.seed,
                                        meanwhile=log_and_draw_models)
            evaluation.stage_run_id = stage.info.run_id
            apply_gate(evaluation, settings)
            # Each model's figures and gate go into its run while another process draws the
            # comparison (they share nothing).
            with figures_drawn_meanwhile(staging, evaluation, history):
                model_runs.log_model_runs(evaluation, paths, params.base.experiment, stage.info.run_id, logged)
            model_runs.log_confusion_matrices(  # those not logged while the models were timed
                {name: run_id for name, run_id in evaluation.run_ids.items() if name not in logged},
                staging / "evaluation")
            # The registry is the one change that cannot be rolled back: do it last.
            evaluation.promotion = registration.register_champion(evaluation, paths, settings)
            model_runs.tag_registration(evaluation)
            write_json(staging / "evaluation" / "promotion.json", evaluation.promotion.decision)
            curves = (staging / "evaluation" / "training_curves.png").is_file()
            digest = registration.data_digest_or_none(paths)
            report = report_markdown(evaluation, settings, digest, curves)
            (staging / "evaluation" / "report.md").write_text(report)
            (staging / "evaluation" / "report.html").write_text(report_html(report, staging / "evaluation"))
            write_json(staging / "evaluation" / "result.json", result_document(evaluation))
            write_json(staging / "metrics" / "evaluate.json", metrics_document(evaluation))
            runs.log_stage_summary(evaluation, staging)
            tracking.log_stage_energy(meter.read().total, meter.source, settings.grid_co2e_g_per_kwh)
            publish(staging, paths)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return evaluation


@stage_main("evaluate", lambda: ProjectPaths.discover().evaluation)
def main(argv: list[str] | None = None) -> int:
    """``python -m tasks.evaluate [--set evaluate.threads=2 ...]``: 0 on success, 2 on bad input."""
    from tasks.core.errors import report_stage_error
    from tasks.core.stage_cli import parse_stage_args
    from tasks.core.tables import console
    from tasks.evaluation.summary import summary_table

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
        report_stage_error("evaluate", disk_full_message(err, paths.evaluation)
                           or f"cannot read or write {err.filename or ''}: {err.strerror or err}")
        return 1
    console().print(summary_table(evaluation))
    return 0


if __name__ == "__main__":
    die_with_parent()  # the stage dies with the run that started it (tasks.core.processes)
    exit_process(main())
