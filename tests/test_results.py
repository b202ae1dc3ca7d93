"""What a pipeline run shows about its result (flows/results.py), on constructed values."""

from __future__ import annotations

from flows.results import (
    PipelineResult, _Links, champion_sentence, comparison_table, result_lines, runs_markdown, standing_decision,
)

ROWS = [
    {"model": "baseline", "accuracy": 0.9708, "accuracy_change_pts": 0.0, "size_bytes": 80_000, "size_reduction_x": 1.0,
     "latency_p50_ms": 0.2, "latency_p95_ms": 0.3, "speedup_x": 1.0, "throughput_sps": 19512.649999999998,
     "gate": "pass"},
    {"model": "int8", "accuracy": 0.9798, "accuracy_change_pts": 0.9, "size_bytes": 20_000, "size_reduction_x": 4.0,
     "latency_p50_ms": 0.4, "latency_p95_ms": 0.5, "speedup_x": 0.5, "throughput_sps": 30000.0, "gate": "champion"},
]
DECISION = {"decision": "int8 registered as version 3", "registered_model": "slimflow-digits",
            "registered_version": "3", "new_version": True, "champion_holder": "int8",
            "model_runs": {"baseline": "run-b", "int8": "run-i"}}


def test_the_champion_in_one_sentence() -> None:
    sentence = champion_sentence("int8", ROWS[1])
    assert sentence == ("int8: accuracy 97.98% (+0.90 pts), size 19.5 KiB (4.00× smaller), "
                        "latency p50 0.400 ms (2.00× slower) vs the baseline")
    assert champion_sentence("baseline", ROWS[0]).startswith("baseline (no variant does better")
    assert champion_sentence(None, {}) == "no champion: no model passes the gate"


def test_the_report_and_the_flow_say_the_champions_gains_in_the_same_words() -> None:
    """report.md's headline read '... (+0.81±0.99 pts vs the baseline), 9.5 KiB (8.42× smaller),
    latency p50 0.058 ms (6.29× faster) than the baseline' while the flow said it otherwise."""
    from pathlib import Path

    import numpy as np

    from tasks.evaluation.report import headline
    from tasks.evaluation.results import Evaluation, ModelResult

    models = {row["model"]: ModelResult(row["model"], Path(row["model"]), {}, dict(row), np.zeros(1), np.zeros((1, 1)))
              for row in ROWS}
    evaluation = Evaluation(models, ("0", "1"), np.zeros(1), {}, champion="int8")
    assert headline(evaluation) == f"**Champion: int8**: {champion_sentence('int8', ROWS[1]).split(': ', 1)[1]}."
    assert headline(evaluation).endswith("latency p50 0.400 ms (2.00× slower) vs the baseline.")

    # The gate's pick that lost its challenge is not called the champion, nor the version it lost to its own
    # (the report said "Registered as `slimflow-drift` version 1 (@champion)" of a model that was not).
    from tasks.evaluation.promotion import Promotion

    evaluation.promotion = Promotion(False, "slimflow-drift", "pruned-l1-auto-int8-static-ort", "1", None,
                                     "int8 accuracy 0.5543 vs the champion's ... 0.0412 worse")
    assert headline(evaluation) == (
        f"**Best of this run (not promoted): int8**: {champion_sentence('int8', ROWS[1]).split(': ', 1)[1]}. "
        "`@champion` of `slimflow-drift` stays version 1 (pruned-l1-auto-int8-static-ort): see Challenger vs. "
        "champion.")
    evaluation.promotion = Promotion(True, "slimflow-drift", "int8", "2", "1", "promoted")
    assert headline(evaluation).endswith("vs the baseline. Registered as `slimflow-drift` version 2 (@champion).")


def test_the_prefect_tables_description_says_how_the_test_split_was_drawn() -> None:
    from flows.results import comparison_description

    assert comparison_description({}).startswith("Baseline and compressed variants on the test split: size × and")
    settings = {"test_split": "12 'patient' groups no model trained on", "test_groups": "patient",
                "test_records": 12, "test_samples": 90}
    described = comparison_description(settings)
    assert described.startswith("Baseline and compressed variants on the test split (12 'patient' groups no model "
                                "trained on): size ×")
    assert "counted over its 12 'patient' groups, each group's rows among its 90 samples counted together)" in described


def test_the_comparison_artifact_is_formatted() -> None:
    table = comparison_table(ROWS)
    assert table[1]["model"] == "int8" and table[1]["gate"] == "champion"
    assert table[1]["accuracy %"] == "97.98" and table[1]["Δ acc (pts)"] == "+0.90" and table[1]["size ×"] == "4.00"
    assert table[0]["samples/s"] == "19,513"  # not 19512.649999999998
    # Prefect's UI reads cells as Markdown: a bare "-" (no figure) showed as a list bullet.
    assert table[0]["payback (preds)"] == "–" and "-" not in [value for row in table for value in row.values()]


def test_the_comparison_csv_has_the_figures_and_the_accuracy_changes_noise() -> None:
    import csv
    import io

    from flows.results import comparison_csv

    rows = [{**ROWS[0], "accuracy_change_noise_pts": 0.0}, {**ROWS[1], "accuracy_change_noise_pts": 0.88}]
    table = list(csv.DictReader(io.StringIO(comparison_csv(rows))))
    header = list(table[0])
    assert header.index("accuracy_change_noise_pts") == header.index("accuracy_change_pts") + 1
    assert table[1]["accuracy_change_pts"] == "0.9" and table[1]["accuracy_change_noise_pts"] == "0.88"


def test_the_flow_log_ends_with_the_result() -> None:
    outcome = PipelineResult(rows=ROWS, champion="int8")
    lines = result_lines(outcome, DECISION, "run-p")
    assert lines[0].startswith("result: champion int8: accuracy 97.98%")
    assert "2 of 2 models pass the gate" in lines[1]
    assert "models:/slimflow-digits@champion = version 3" in lines[2]
    assert lines[-1] == ("result: MLflow pipeline run run-p (report: its artifact result/report.html; "
                         "in the project: artifacts/evaluation/report.html)")
    assert result_lines(PipelineResult(), {}, "run-p")[0].startswith("result: no evaluation")
    caveat = "the baseline was still improving when its 15 epochs ran out: ..."
    with_caveat = result_lines(outcome, {**DECISION, "caveats": [caveat]}, "run-p")
    assert with_caveat == [*lines[:-1], f"result: caveat: {caveat}", lines[-1]]


def test_a_pick_that_did_not_take_the_alias_is_not_called_champion() -> None:
    """The gate's pick lost its challenge (or reads another input): the first line does not
    call it champion beside the line that names the version @champion points at."""
    kept = {**DECISION, "promoted": False, "new_version": False, "registered_version": "2", "champion_holder": "fp16",
            "decision": "nothing promoted: int8 is 1.2 points worse than the champion; version 2 (fp16) stays @champion"}
    lines = result_lines(PipelineResult(rows=ROWS, champion="int8"), kept, "run-p")
    assert lines[0].startswith("result: best of this run (not promoted) int8: accuracy 97.98%")
    assert "models:/slimflow-digits@champion = version 2 (fp16; unchanged)" in lines[2]
    promoted = result_lines(PipelineResult(rows=ROWS, champion="int8"), {**DECISION, "promoted": True}, "run-p")
    assert promoted[0].startswith("result: champion int8")


def test_a_run_whose_evaluate_stage_was_up_to_date_does_not_claim_the_last_evaluations_registration() -> None:
    """A run that re-ran an earlier stage (say, prepare restored from DVC's run cache) but
    found evaluate up to date shows the standing result. It registered nothing: its lines
    said "int8 registered as version 3" and "(int8; new version)" as if it had."""
    standing = standing_decision({**DECISION, "evaluate_run_id": "0c0543ad23104422"})
    lines = result_lines(PipelineResult(rows=ROWS, champion="int8"), standing, "run-p")
    assert lines[0].startswith("result: champion int8: accuracy 97.98%")
    assert lines[1] == ("result: 2 of 2 models pass the gate; evaluate up to date: the registry untouched by this "
                        "run (its last run 0c0543ad: int8 registered as version 3)")
    assert "models:/slimflow-digits@champion = version 3 (int8; unchanged)" in lines[2]
    assert not any("new version" in line for line in lines)
    assert standing_decision({}) == {}


def test_the_runs_artifact_links_every_run(monkeypatch) -> None:
    import flows.results as results

    monkeypatch.setattr(results, "_stage_runs", lambda run_id: {"train": "run-t", "evaluate": "run-e"})
    stages = [{"stage": "train", "ran": True, "seconds": 12.0}, {"stage": "evaluate", "ran": False, "seconds": 0.1}]
    text = runs_markdown(PipelineResult(rows=ROWS, champion="int8"), DECISION, "run-p",
                         _Links("sqlite:///mlflow.db", "7"), stages)
    assert "http://127.0.0.1:5000/#/experiments/7/runs/run-p" in text and "`make ui`" in text
    assert "| stage train | [run-t]" in text and "skipped (up to date)" in text
    assert "| model int8 (champion) | [run-i]" in text
    assert "[slimflow-digits version 3](http://127.0.0.1:5000/#/models/slimflow-digits/versions/3)" in text
    assert "(http://127.0.0.1:5000/#/compare-runs?runs=[%22run-b%22,%22run-i%22]&experiments=[%227%22]" in text
    assert "fails the gate" not in text
    # A model the gate failed: the comparison artifact says "fail", this one why.
    why = "fails the gate: accuracy drop 0.0300 > max_accuracy_drop 0.0100"
    failed = {**DECISION, "gate": {"baseline": "passes the gate; not the smallest (80000 B)", "pruned": why}}
    text = runs_markdown(PipelineResult(rows=ROWS, champion="int8"), failed, "run-p", _Links("sqlite:///mlflow.db", "7"),
                         stages)
    assert f"- **pruned** {why}\n" in text and "passes the gate; not" not in text
    server = runs_markdown(PipelineResult(), {}, "run-p", _Links("http://mlflow:5000/", "7"), [])
    assert "http://mlflow:5000/#/experiments/7/runs/run-p" in server and "make ui" not in server
