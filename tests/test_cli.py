"""The ``slimflow`` command line, as a user types it (the console script in a subprocess)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import make_project, slimflow


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_project(tmp_path_factory.mktemp("cli") / "project")


def _one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


def test_params_schema_is_json_with_every_section(project: Path) -> None:
    done = slimflow(project, "params", "--schema")
    assert done.returncode == 0, done.stderr
    schema = json.loads(done.stdout)
    assert set(schema["properties"]) == {"base", "prepare", "train", "compress", "evaluate"}


def test_params_shows_the_effective_values_with_overrides(project: Path) -> None:
    done = slimflow(project, "params", "--set", "train.epochs=3")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["train"]["epochs"] == 3
    # -S, as `dvc exp run -S` spells it, repeatable and mixed with --set.
    done = slimflow(project, "params", "-S", "train.epochs=4", "--set", "train.batch_size=16")
    assert done.returncode == 0, done.stderr
    train = json.loads(done.stdout)["train"]
    assert (train["epochs"], train["batch_size"]) == (4, 16)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("params", "--set", "train.epochs=0"), "train.epochs: Input should be greater than or equal to 1"),
        (("params", "--set", "train.model.channels=[32,"), "train.model.channels=[32,: not valid YAML"),
        (("run", "--from", "deploy"), "unknown stage 'deploy'; stages: prepare, train, compress, evaluate"),
        (("run", "--from", "evaluate", "--to", "train"),
         "error: stage range evaluate..train is empty: stages run in the order prepare, train, compress, evaluate"),
        (("run", "--set", "train.nope=1"), "train.nope: unknown key"),
        # What `run` refuses, `params` and `serve` refuse too (a schedule of runs that each fail).
        (("params", "--set", "prepare.source=breast_cancer"),
         "params.yaml: train.model.family: cnn does not read rows of features (prepare.source breast_cancer)"),
        (("serve", "--interval", "60", "--set", "prepare.source=breast_cancer"),
         "params.yaml: train.model.family: cnn does not read rows of features (prepare.source breast_cancer)"),
        # A raw path that is not there: refused before the flow starts (params.yaml unchanged).
        (("run", "--set", "prepare.source=csv", "--set", "prepare.path=data/raw/nope.csv", "--set", "train.model.family=mlp"),
         "params.yaml: prepare.path: data/raw/nope.csv: not found"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(project: Path, args: tuple[str, ...], expected: str) -> None:
    done = slimflow(project, *args)
    assert done.returncode == 2
    assert expected in _one_error_line(done.stderr)


def test_an_npz_of_rows_with_the_default_cnn_is_refused_before_the_prepared_data_changes(tmp_path: Path) -> None:
    """The npz's header says it holds rows of features: `run` refuses the cnn in one line
    before any stage, so neither params.yaml nor data/prepared change."""
    import numpy as np

    root = make_project(tmp_path / "project")
    (root / "data" / "raw").mkdir(parents=True, exist_ok=True)
    np.savez(root / "data" / "raw" / "rows.npz", x=np.zeros((60, 8), np.float32), y=np.arange(60) % 3)
    params = (root / "params.yaml").read_text()
    done = slimflow(root, "run", "--set", "prepare.source=npz", "--set", "prepare.path=data/raw/rows.npz")
    assert done.returncode == 2, done.stderr[-3000:]
    assert _one_error_line(done.stderr) == (
        "error: params.yaml: train.model.family: cnn needs image inputs (C, H, W), got input shape (8,) "
        "(prepare.path data/raw/rows.npz); use one of mlp, lstm, gru")
    assert (root / "params.yaml").read_text() == params
    assert not (root / "data" / "prepared").exists()


def test_report_without_an_evaluation_says_what_to_run(project: Path) -> None:
    done = slimflow(project, "report")
    assert done.returncode == 1
    assert "run `slimflow run` first" in _one_error_line(done.stderr)


def test_report_draws_the_comparison_from_the_dvc_metrics(tmp_path: Path) -> None:
    root = make_project(tmp_path / "project")
    (root / "metrics").mkdir(exist_ok=True)
    (root / "metrics" / "evaluate.json").write_text(json.dumps({
        "baseline": {"accuracy": 0.9708, "size_bytes": 80_000, "latency_p50_ms": 0.2, "passed_gate": 1, "champion": 0},
        "int8-dynamic": {"accuracy": 0.9798, "size_bytes": 20_000, "latency_p50_ms": 0.1, "passed_gate": 1, "champion": 1},
    }))
    done = slimflow(root, "report")
    assert done.returncode == 0, done.stderr
    line = next(line for line in done.stdout.splitlines() if "int8-dynamic" in line)
    for cell in ("97.98", "+0.90", "19.5", "4.00", "2.00", "champion"):
        assert cell in line, line
    assert "fails the gate" not in done.stdout  # the stage's decision not written: no reasons to show

    # A model the gate failed: the table says "fail", the line under it why (the stage's words).
    metrics = json.loads((root / "metrics" / "evaluate.json").read_text())
    metrics["pruned"] = {"accuracy": 0.9798, "size_bytes": 9_000, "latency_p50_ms": 0.2, "passed_gate": 0, "champion": 0}
    (root / "metrics" / "evaluate.json").write_text(json.dumps(metrics))
    why = "fails the gate: class '9' recall drop 0.1556 (93.3% -> 77.8%, 7 of its 45 samples) > max_class_recall_drop 0.1000"
    (root / "artifacts" / "evaluation").mkdir(parents=True)
    (root / "artifacts" / "evaluation" / "result.json").write_text(json.dumps({"champion": "int8-dynamic", "gate": {
        "baseline": "passes the gate; not the smallest (80000 B)", "int8-dynamic": "champion: ...", "pruned": why}}))
    done = slimflow(root, "report")
    assert done.returncode == 0, done.stderr
    assert "fail" in next(line for line in done.stdout.splitlines() if line.startswith("│ pruned"))
    assert [line for line in done.stdout.splitlines() if "gate:" in line or "passes" in line] == [f"pruned {why}"]


def test_the_raw_data_is_checked_only_when_the_prepare_stage_is_to_run(tmp_path: Path) -> None:
    """`run --from train` reads the prepared data, not the raw files: a raw path that is not
    in the workspace (say, data only pulled as prepared) does not stop it."""
    import typer

    from flows.cli import _checked_params
    from tasks.core.paths import ProjectPaths

    root = make_project(tmp_path / "project")
    paths = ProjectPaths(root)
    missing = ["prepare.source=csv", "prepare.path=data/raw/gone.csv", "train.model.family=mlp"]
    assert _checked_params(paths, missing, ["train", "compress", "evaluate"]).prepare.path == "data/raw/gone.csv"
    for stages in (None, ["prepare", "train"]):
        with pytest.raises(typer.Exit):
            _checked_params(paths, missing, stages)


def test_a_command_from_a_subfolder_keeps_mlflows_files_in_the_project_root(tmp_path: Path) -> None:
    """`slimflow` works from the project's root wherever it is typed: a new experiment's
    files go to the root's `mlruns/` (ignored by git), not to `mlruns/` in the folder the
    user stood in (`data/mlruns/` was left untracked beside the data)."""
    import os
    import subprocess
    import sys

    from mlflow import MlflowClient

    root = make_project(tmp_path / "project")
    subfolder = root / "data" / "raw"
    env = {k: v for k, v in os.environ.items() if k not in ("SLIMFLOW_ROOT", "MLFLOW_TRACKING_URI")}
    done = subprocess.run([str(Path(sys.executable).parent / "slimflow"), "status"], cwd=subfolder, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not (subfolder / "mlruns").exists()
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("slimflow")
    assert experiment is not None
    assert Path(experiment.artifact_location).parent == root / "mlruns"
