"""The run context: the one typed object a pipeline run hands its stage processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.core.errors import report_stage_error
from tasks.core.run_context import ENV, RunContext

REPO = Path(__file__).resolve().parents[1]


def test_round_trips_through_the_environment_of_a_child_process(tmp_path: Path) -> None:
    context = RunContext(parent_run_id="p1", flow_run_id="f1", experiment_id="7", error_file=str(tmp_path / "e"))
    code = "from tasks.core.run_context import RunContext; print(repr(RunContext.current()))"
    env = {**os.environ, "PYTHONPATH": str(REPO), **context.as_env()}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == repr(context)


def test_outside_a_pipeline_run_the_context_is_empty() -> None:
    assert RunContext.current({}) == RunContext()
    assert RunContext.current({ENV: ""}) == RunContext()


def test_a_corrupt_context_is_named() -> None:
    with pytest.raises(ValueError, match=r"\$SLIMFLOW_RUN_CONTEXT is not valid JSON"):
        RunContext.current({ENV: "{not json"})


def test_exported_sets_and_restores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV, raising=False)
    outer, inner = RunContext(parent_run_id="outer"), RunContext(parent_run_id="inner")
    with outer.exported():
        assert RunContext.current() == outer
        with inner.exported():
            assert RunContext.current() == inner
        assert RunContext.current() == outer
    assert ENV not in os.environ


def test_a_stage_error_reaches_the_flow_through_the_context(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    error_file = tmp_path / "train.error"
    monkeypatch.setenv(ENV, RunContext().with_error_file(error_file).as_env()[ENV])
    report_stage_error("train", "params.yaml: train.epochs: must be >= 1")
    assert capsys.readouterr().err == "error: train: params.yaml: train.epochs: must be >= 1\n"
    assert error_file.read_text() == "train: params.yaml: train.epochs: must be >= 1\n"


def test_importing_the_flows_package_changes_no_environment() -> None:
    code = (
        "import os; before = dict(os.environ);"
        "import flows, flows.cli, flows.report, flows.prefect_settings;"
        "changed = sorted(k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k));"
        "print(changed)"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**env, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
