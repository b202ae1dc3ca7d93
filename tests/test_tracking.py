"""MLflow helpers shared by the stages, on a real MLflow store."""

from __future__ import annotations

from pathlib import Path

import pytest

from tasks.core import tracking
from tasks.core.run_context import ENV, RunContext
from tasks.core.telemetry import TELEMETRY_OFF


def _run(run_id: str):
    import mlflow

    return mlflow.get_run(run_id)


def test_without_a_context_a_stage_run_is_top_level_in_the_named_experiment(
    tmp_path: Path, mlflow_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow

    monkeypatch.delenv(ENV, raising=False)
    with tracking.stage_run("train", tmp_path, "my-experiment", params={"model": {"width": 0.5}}) as run:
        run_id = run.info.run_id
    got = _run(run_id)
    assert got.info.status == "FINISHED"
    assert mlflow.get_experiment(got.info.experiment_id).name == "my-experiment"
    assert "mlflow.parentRunId" not in got.data.tags
    assert got.data.tags["stage"] == "train"
    assert got.data.params == {"model.width": "0.5"}


def test_inside_a_pipeline_run_the_context_links_the_stage_run(
    tmp_path: Path, mlflow_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow

    experiment_id = mlflow.create_experiment("pipeline-experiment")
    with mlflow.start_run(experiment_id=experiment_id) as parent:
        pass
    context = RunContext(parent_run_id=parent.info.run_id, flow_run_id="flow-123", experiment_id=experiment_id)
    monkeypatch.setenv(ENV, context.as_env()[ENV])
    # base.experiment says otherwise: the pipeline run's experiment wins inside a run.
    with tracking.stage_run("evaluate", tmp_path, "another-name") as run:
        run_id = run.info.run_id
    got = _run(run_id)
    assert got.info.experiment_id == experiment_id
    assert got.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert got.data.tags["prefect_flow_run_id"] == "flow-123"


def test_a_failing_stage_run_ends_failed_with_its_reason(tmp_path: Path, mlflow_uri: str) -> None:
    with pytest.raises(RuntimeError), tracking.stage_run("compress", tmp_path, "e") as run:
        run_id = run.info.run_id
        raise RuntimeError("disk full")
    got = _run(run_id)
    assert got.info.status == "FAILED"
    assert got.data.tags["error"] == "disk full"


def test_the_default_store_is_the_projects_sqlite_file(tmp_path: Path) -> None:
    assert tracking.default_tracking_uri(tmp_path) == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"


def test_flatten_names_nested_keys_with_dots() -> None:
    assert tracking.flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": None}) == {"a.b": 1, "a.c.d": [1, 2], "e": None}


def test_a_resumed_run_keeps_its_duration_and_a_failure_ends_it_failed(tmp_path: Path, mlflow_uri: str,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow

    monkeypatch.delenv(ENV, raising=False)
    with tracking.stage_run("compress", tmp_path, "resume", run_name="int8") as run:
        run_id = run.info.run_id
    ended = _run(run_id).info.end_time
    with tracking.stage_run("evaluate", tmp_path, "resume"):
        with tracking.resumed_run(run_id):
            mlflow.log_metric("accuracy", 0.9)
    got = _run(run_id)
    assert got.info.status == "FINISHED" and got.info.end_time == ended  # its duration: the making of the model
    assert got.data.metrics["accuracy"] == 0.9 and "mlflow.parentRunId" not in got.data.tags
    with pytest.raises(RuntimeError):
        with tracking.resumed_run(run_id):
            raise RuntimeError("no disk")
    assert _run(run_id).info.status == "FAILED" and _run(run_id).data.tags["error"] == "no disk"


def test_readable_params_write_lists_as_json() -> None:
    params = tracking.readable_params({"model": {"channels": [8, 16], "width": 0.5, "name": None}})
    assert params == {"model.channels": "[8, 16]", "model.width": "0.5", "model.name": "None"}
    recipe = tracking.recipe_params("baseline", "prune", [{"method": "prune", "sparsity": 0.9, "lr": None}])
    assert tracking.readable_params(recipe) == {
        "recipe.parent": "baseline", "recipe.method": "prune", "recipe.step1.method": "prune",
        "recipe.step1.sparsity": "0.9",
    }


def _schema(database: Path) -> tuple[dict[str, list[str]], str]:
    """Every table's columns, and the schema revision MLflow stamped."""
    import sqlalchemy

    engine = sqlalchemy.create_engine(f"sqlite:///{database}")
    try:
        inspector = sqlalchemy.inspect(engine)
        tables = {name: sorted(column["name"] for column in inspector.get_columns(name))
                  for name in inspector.get_table_names()}
        with engine.connect() as connection:
            revision = connection.execute(sqlalchemy.text("SELECT version_num FROM alembic_version")).scalar_one()
    finally:
        engine.dispose()
    return tables, revision


def test_a_new_store_is_a_copy_of_the_install_template_that_mlflow_takes_as_its_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`make install` leaves MLflow's tables made; a new project's store starts from a copy,
    and MLflow adds the Default experiment with the project's artifact root, not the template's."""
    import mlflow

    assert tracking.store_template().is_file()  # made by scripts/install.sh
    template = tracking.write_store_template(tmp_path / "template" / "mlflow.db")
    project = tmp_path / "project"
    project.mkdir()
    monkeypatch.chdir(project)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv(ENV, raising=False)
    uri = tracking.default_tracking_uri(project)
    assert tracking.seed_store(uri, template)
    experiment_id = tracking.configure(project, "seeded")
    client = mlflow.MlflowClient(uri)
    assert client.get_experiment(experiment_id).name == "seeded"
    assert Path(client.get_experiment("0").artifact_location).parent == project / "mlruns"
    run = client.create_run(experiment_id)
    client.log_metric(run.info.run_id, "accuracy", 0.9)
    assert client.get_run(run.info.run_id).data.metrics == {"accuracy": 0.9}
    # The same tables and schema revision as a store MLflow makes itself.
    made = tmp_path / "made" / "mlflow.db"
    made.parent.mkdir()
    mlflow.MlflowClient(f"sqlite:///{made}").search_experiments()
    assert _schema(project / "mlflow.db") == _schema(made)


def test_the_template_never_replaces_a_store_and_only_seeds_sqlite_files(tmp_path: Path) -> None:
    template = tmp_path / "template.db"
    template.write_bytes(b"the template")
    existing = tmp_path / "mlflow.db"
    existing.write_bytes(b"a project's history")
    assert not tracking.seed_store(f"sqlite:///{existing}", template)
    assert existing.read_bytes() == b"a project's history"
    assert not tracking.seed_store("http://127.0.0.1:5000", template)
    assert not tracking.seed_store(f"sqlite:///{tmp_path / 'no-folder' / 'mlflow.db'}", template)
    new = tmp_path / "new.db"
    assert not tracking.seed_store(f"sqlite:///{new}", tmp_path / "no-template.db") and not new.exists()
    assert tracking.seed_store(f"sqlite:///{new}?timeout=30", template)
    assert new.read_bytes() == b"the template"
    assert not [path.name for path in tmp_path.iterdir() if path.name.endswith(".partial")]


# Where MLflow sees one of the CI markers it keeps its telemetry off by itself
# (mlflow/telemetry/utils.py), and the switches are what slimflow sets: a user's shell has
# none of them, so the processes below run without them.
_NOT_IN_A_USERS_SHELL = ("PYTEST_CURRENT_TEST", "GITHUB_ACTIONS", "CI", "CIRCLECI", "GITLAB_CI", "JENKINS_URL",
                         "TRAVIS", "TF_BUILD", "BITBUCKET_BUILD_NUMBER", "CODEBUILD_BUILD_ARN", "BUILDKITE",
                         "TEAMCITY_VERSION", "CLOUD_RUN_EXECUTION", "RUNBOT_HOST_URL", "RUNBOT_BUILD_NAME",
                         "RUNBOT_WORKER_ID", "DO_NOT_TRACK", *TELEMETRY_OFF, "XDG_CONFIG_HOME")


def _as_a_user_runs_it(root: Path, home: Path, *args: str, **env: str) -> Path:
    """``python ARGS`` in ``root`` with a user's environment and ``home``; returns where MLflow
    keeps the installation id its telemetry reports with."""
    import os
    import subprocess
    import sys

    clean = {k: v for k, v in os.environ.items() if k not in _NOT_IN_A_USERS_SHELL}
    done = subprocess.run([sys.executable, *args], cwd=root, capture_output=True, text=True,
                          env={**clean, "HOME": str(home), **env}, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return home / ".config" / "mlflow" / "telemetry.json"


def test_a_stage_and_the_install_send_no_usage_telemetry_to_mlflow_unless_the_user_turns_it_on(
    tiny_project: Path, tmp_path: Path
) -> None:
    import json

    # MLflow (>= 3.2) reports every logging call to mlflow-telemetry.io unless told not to; a
    # process where it is on writes an installation id first (on import), one where it is off never.
    # The prepare stage, as `dvc repro` runs it:
    assert not _as_a_user_runs_it(tiny_project, tmp_path / "home", "-m", "tasks.prepare").exists()
    # The user's own setting wins, and shows the check above would see telemetry that is on.
    turned_on = _as_a_user_runs_it(tiny_project, tmp_path / "home-on", "-m", "tasks.prepare",
                                   MLFLOW_DISABLE_TELEMETRY="false")
    assert json.loads(turned_on.read_text())["installation_id"]
    # `make install`'s MLflow store template (it imports MLflow to create the tables):
    write = "import sys; from pathlib import Path; from tasks.core import tracking; tracking.write_store_template(Path(sys.argv[1]))"
    assert not _as_a_user_runs_it(tiny_project, tmp_path / "home-install", "-c", write,
                                  str(tmp_path / "template" / "mlflow.db")).exists()
    assert (tmp_path / "template" / "mlflow.db").is_file()


def test_a_dvc_experiment_in_a_copy_of_the_project_uses_the_projects_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    project = tmp_path / "project"
    (project / ".dvc" / "tmp" / "exps" / "standalone" / "tmp1").mkdir(parents=True)
    (project / "dvc.yaml").write_text("stages: {}\n")
    copy = project / ".dvc" / "tmp" / "exps" / "standalone" / "tmp1"
    for key in ("DVC_ROOT", "DVC_EXP_NAME"):
        monkeypatch.delenv(key, raising=False)
    assert tracking.store_home(copy) == copy  # no experiment: where the process works
    monkeypatch.setenv("DVC_ROOT", str(project))
    assert tracking.store_home(copy) == copy  # plain `dvc repro` sets DVC_ROOT too
    monkeypatch.setenv("DVC_EXP_NAME", "lucky-fawn")
    assert tracking.store_home(copy) == project.resolve()
    assert tracking.store_home(project) == project  # `dvc exp run` in the workspace itself
    monkeypatch.setenv("DVC_ROOT", str(tmp_path / "gone"))
    assert tracking.store_home(copy) == copy  # not a DVC project: not a store to use


@pytest.mark.integration
def test_dvc_exp_run_temp_logs_to_the_projects_store_not_to_the_deleted_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`dvc exp run --temp` (and queued experiments) run in a copy under .dvc/tmp/exps/ that
    DVC deletes afterwards: the runs went into a store in that copy and were lost."""
    import os
    import subprocess

    import mlflow

    from tests.conftest import TINY_PARAMS, make_project

    project = make_project(tmp_path / "project", TINY_PARAMS)
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_TRACKING_URI", "SLIMFLOW_RUN_CONTEXT", "SLIMFLOW_ROOT", "DVC_ROOT", "DVC_EXP_NAME")}
    env["PATH"] = f"{Path(os.sys.executable).parent}{os.pathsep}{env['PATH']}"  # the stages' `python`
    dvc = str(Path(os.sys.executable).parent / "dvc")
    done = subprocess.run([dvc, "exp", "run", "--temp", "-S", "prepare.val_fraction=0.2", "-n", "split-20", "prepare"],
                          cwd=project, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert not list((project / ".dvc" / "tmp" / "exps").rglob("mlflow.db"))

    monkeypatch.chdir(project)
    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    (run,) = mlflow.search_runs(search_all_experiments=True, output_format="list",
                                filter_string="tags.stage = 'prepare'")
    assert run.data.tags["dvc_experiment"] == "split-20"
    assert run.data.params["prepare.val_fraction"] == "0.2"
    artifacts = Path(mlflow.get_experiment(run.info.experiment_id).artifact_location.removeprefix("file://"))
    assert artifacts.is_relative_to(project / "mlruns"), artifacts
