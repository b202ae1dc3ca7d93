"""Prefect orchestration for real: overrides, retries, failures, signals, no overlap, schedules.

The `slimflow` CLI runs as a subprocess against the session's Prefect test server (and a
real Prefect server for the schedule test), with a real MLflow store and real DVC.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import TINY_PARAMS, free_port, make_project, seconds_until_gone, serve_leftovers, slimflow

pytestmark = pytest.mark.integration


def _dvc_status(root: Path, *targets: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(Path(os.sys.executable).parent / "dvc"), "status", *targets], cwd=root,
                          capture_output=True, text=True, timeout=60)


def _runs(experiment: str = "slimflow"):
    import mlflow

    exp = mlflow.get_experiment_by_name(experiment)
    if exp is None:
        return []
    return mlflow.search_runs(experiment_ids=[exp.experiment_id], output_format="list", max_results=500)


def _pipeline_runs():
    return [r for r in _runs() if r.data.tags.get("pipeline") == "slimflow"]


def _stage_runs(stage: str):
    return [r for r in _runs() if r.data.tags.get("stage") == stage and not r.data.tags.get("variant")]


@pytest.mark.parametrize(
    ("override", "named"),
    [("train.epochs=-1", "train.epochs"), ("train.epochz=3", "train.epochz: unknown key")],
)
def test_invalid_override_is_refused_before_any_stage(tiny_project: Path, mlflow_uri: str, override: str, named: str) -> None:
    before = (tiny_project / "params.yaml").read_text()
    result = slimflow(tiny_project, "run", "--set", override, env={"MLFLOW_TRACKING_URI": mlflow_uri})
    assert result.returncode == 2
    assert named in result.stderr
    assert not (tiny_project / "data" / "prepared").exists()
    assert (tiny_project / "params.yaml").read_text() == before
    assert _runs() == []


def test_override_is_recorded_in_mlflow_and_dvc(tiny_project: Path, prefect_api_url: str, mlflow_uri: str) -> None:
    env = {"PREFECT_API_URL": prefect_api_url, "MLFLOW_TRACKING_URI": mlflow_uri}
    result = slimflow(tiny_project, "run", "--set", "train.epochs=1", "--to", "train", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr  # DVC's lines once each, not again in Prefect's format
    assert [output.count(f"Running stage '{stage}'") for stage in ("prepare", "train")] == [1, 1], output[-3000:]

    lock = yaml.safe_load((tiny_project / "dvc.lock").read_text())
    assert lock["stages"]["train"]["params"]["params.yaml"]["train"]["epochs"] == 1
    assert yaml.safe_load((tiny_project / "params.yaml").read_text())["train"]["epochs"] == 1
    (pipeline_run,) = _pipeline_runs()
    assert pipeline_run.data.params["train.epochs"] == "1"
    assert pipeline_run.data.tags["overrides"] == "train.epochs=1"
    (train_run,) = _stage_runs("train")
    assert train_run.data.params["train.epochs"] == "1"
    # DVC agrees the recorded parameters reproduce this run: nothing left to do.
    dvc = _dvc_status(tiny_project, "train")
    assert "up to date" in dvc.stdout


def test_a_stage_restored_from_dvcs_run_cache_is_not_said_to_have_run(
    tiny_project: Path, prefect_api_url: str, mlflow_uri: str
) -> None:
    """Back to settings that ran before: DVC checks the prepare stage's outputs out of its
    run cache instead of running it. The run says so, and its MLflow run does not list the
    stage as ran (no stage run of it is nested under the pipeline run)."""
    env = {"PREFECT_API_URL": prefect_api_url, "MLFLOW_TRACKING_URI": mlflow_uri}
    for fraction in ("0.2", "0.15"):
        result = slimflow(tiny_project, "run", "--to", "prepare", "--set", f"prepare.val_fraction={fraction}", env=env)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "prepare ran in" in result.stdout + result.stderr
    prepared = {p.name: p.read_bytes() for p in (tiny_project / "data" / "prepared").iterdir()}

    result = slimflow(tiny_project, "run", "--to", "prepare", "--set", "prepare.val_fraction=0.2", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert "prepare restored from DVC's run cache" in output, output[-3000:]
    assert "prepare ran in" not in output
    assert "Running stage 'prepare'" not in output
    assert {p.name: p.read_bytes() for p in (tiny_project / "data" / "prepared").iterdir()} != prepared  # 0.2's split
    latest = max(_pipeline_runs(), key=lambda run: run.info.start_time)
    assert (latest.data.tags["stages_ran"], latest.data.tags["stages_restored"]) == ("none", "prepare")
    assert [r for r in _stage_runs("prepare") if r.data.tags.get("mlflow.parentRunId") == latest.info.run_id] == []
    assert len(_stage_runs("prepare")) == 2
    assert "up to date" in _dvc_status(tiny_project, "prepare").stdout
    listed = slimflow(tiny_project, "status", env=env)
    assert listed.returncode == 0 and "restored:" in listed.stdout, listed.stdout[-3000:]


def test_a_run_its_data_file_refuses_leaves_the_project_as_it_found_it(
    tiny_project: Path, prefect_api_url: str, mlflow_uri: str
) -> None:
    """An npz that only reading finds corrupt (the prepare stage): one error line naming the
    file, exit code 2; the run's overrides taken back out of params.yaml (no stage recorded
    them) and the prepared data of the last good run still there (DVC had removed it before
    the stage ran), so `dvc status` shows only what the user changed."""
    env = {"PREFECT_API_URL": prefect_api_url, "MLFLOW_TRACKING_URI": mlflow_uri}
    assert slimflow(tiny_project, "run", "--to", "prepare", env=env).returncode == 0
    prepared = {p.name: p.read_bytes() for p in (tiny_project / "data" / "prepared").iterdir()}
    params, lock = (tiny_project / "params.yaml").read_bytes(), (tiny_project / "dvc.lock").read_bytes()
    (tiny_project / "data" / "raw" / "scans.npz").write_bytes(b"PK\x03\x04 not a whole zip file")

    result = slimflow(tiny_project, "run", "--set", "prepare.source=npz", "--set", "prepare.path=data/raw/scans.npz",
                      "--set", "train.epochs=2", env=env)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1].startswith(
        "error: pipeline failed: prepare: data/raw/scans.npz: cannot read as NPZ"), result.stderr[-3000:]
    assert (tiny_project / "params.yaml").read_bytes() == params
    assert (tiny_project / "dvc.lock").read_bytes() == lock
    assert {p.name: p.read_bytes() for p in (tiny_project / "data" / "prepared").iterdir()} == prepared
    status = _dvc_status(tiny_project, "prepare").stdout
    assert "modified:" in status and "data/raw" in status and "deleted" not in status, status
    (pipeline_run,) = [r for r in _pipeline_runs() if r.data.tags.get("overrides")]
    assert pipeline_run.info.status == "FAILED"


def test_failed_train_stage_is_retried_and_resumes_from_its_checkpoint(
    tiny_project: Path, prefect_api_url: str, mlflow_uri: str
) -> None:
    env = {"PREFECT_API_URL": prefect_api_url, "MLFLOW_TRACKING_URI": mlflow_uri, "SLIMFLOW_FAULT_AFTER_EPOCH": "2"}
    result = slimflow(tiny_project, "run", "--to", "train", env=env)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "resuming from checkpoint at epoch 2 of 3" in output
    (pipeline_run,) = _pipeline_runs()
    assert pipeline_run.info.status == "FINISHED"
    statuses = sorted(r.info.status for r in _stage_runs("train"))
    assert statuses == ["FAILED", "FINISHED"]


def test_stage_that_always_fails_fails_the_flow_in_prefect_and_mlflow(
    tmp_path: Path, prefect_api_url: str, mlflow_uri: str
) -> None:
    # A CSV with a value that is not a number: only reading it finds out (a missing file is
    # refused before the flow starts, tests/test_cli.py).
    root = make_project(tmp_path / "broken", {**TINY_PARAMS, "prepare": {"source": "csv", "path": "data/raw/broken.csv"},
                                              "train": {**TINY_PARAMS["train"], "model": {"family": "mlp"}}})
    (root / "data" / "raw").mkdir(parents=True, exist_ok=True)
    (root / "data" / "raw" / "broken.csv").write_text("a,b,label\n" + "1,2,0\n" * 20 + "3,oops,1\n" + "4,5,1\n" * 20)
    env = {"PREFECT_API_URL": prefect_api_url, "MLFLOW_TRACKING_URI": mlflow_uri}
    result = slimflow(root, "run", env=env)
    assert result.returncode == 2  # bad input, as the stage said: one line naming the file
    line = [line for line in result.stderr.splitlines() if line.startswith("error:")][-1]  # after the stage's own
    assert line.startswith("error: pipeline failed: prepare: data/raw/broken.csv: line 22"), line
    # Said twice: the stage's own line and the run's; not three more times in Prefect's reports
    # of the failed task and flow (their Prefect log keeps them, checked below).
    assert (result.stdout + result.stderr).count("broken.csv: line 22") == 2, result.stderr[-3000:]
    (pipeline_run,) = _pipeline_runs()
    assert pipeline_run.info.status == "FAILED"
    assert "broken.csv" in pipeline_run.data.tags["error"]
    assert [r for r in _runs() if r.info.status == "RUNNING"] == []

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    flow_run_id = pipeline_run.data.tags["prefect_flow_run_id"]
    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(flow_run_id)
        task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    assert flow_run.state.is_failed()
    assert "broken.csv" in flow_run.state.message
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    assert any(entry.message.startswith("Finished in state Failed(") and "broken.csv" in entry.message
               for entry in logs), [entry.message for entry in logs]
    (prepare_task,) = [t for t in task_runs if t.name.startswith("prepare")]
    assert prepare_task.state.is_failed()
    assert prepare_task.run_count == 1  # bad input: not retried, it would fail the same way
    assert not (root / "data" / "prepared").exists()


def test_a_crashing_stage_is_retried_with_back_off_until_it_gives_up(
    tmp_path: Path, prefect_api_url: str, mlflow_uri: str
) -> None:
    # One worker dies after epoch 1 on every attempt: with 1 epoch there is no checkpoint
    # past the crash to resume from, so each retry crashes again.
    root = make_project(tmp_path / "crashing", {**TINY_PARAMS, "train": {**TINY_PARAMS["train"], "epochs": 1}})
    env = {"PREFECT_API_URL": prefect_api_url, "MLFLOW_TRACKING_URI": mlflow_uri, "SLIMFLOW_FAULT_AFTER_EPOCH": "1"}
    result = slimflow(root, "run", "--to", "train", env=env)
    assert result.returncode == 1
    assert "exited with status 17" in result.stderr
    (pipeline_run,) = _pipeline_runs()
    assert pipeline_run.info.status == "FAILED"
    assert "exited with status 17" in pipeline_run.data.tags["error"]
    assert pipeline_run.data.tags["stages_ran"] == "prepare"  # what the run did before it failed
    train_runs = _stage_runs("train")
    assert [r.info.status for r in train_runs] == ["FAILED"] * 3  # the attempt and its two retries (retries=2)
    assert all("exited with status 17" in r.data.tags["error"] for r in train_runs)


def test_two_runs_at_once_never_overlap_and_leave_consistent_outputs(
    tiny_project: Path, prefect_api_url: str, mlflow_uri: str
) -> None:
    from tasks.core.dvc import pipeline_lock
    from tasks.core.lock import lock_paths

    env = {**os.environ, "SLIMFLOW_ROOT": str(tiny_project), "PREFECT_API_URL": prefect_api_url, "MLFLOW_TRACKING_URI": mlflow_uri}
    exe = str(Path(os.sys.executable).parent / "slimflow")
    # The project is held until both runs queue for it, so they meet at the lock however
    # their starts are timed (started at once, one could finish before the other asked).
    queue = lock_paths(tiny_project)[2]
    with pipeline_lock(tiny_project):
        runs = [
            subprocess.Popen([exe, "run", "--to", "prepare", "--force", "--wait", "300"], cwd=tiny_project, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for _ in range(2)
        ]
        deadline = time.monotonic() + 240
        while len(list(queue.glob("*.ticket"))) < 2 and all(p.poll() is None for p in runs):
            assert time.monotonic() < deadline, "the two runs did not both queue for the lock in 240 s"
            time.sleep(0.1)
    outputs = [p.communicate(timeout=300)[0] for p in runs]
    assert [p.returncode for p in runs] == [0, 0], outputs
    assert all("waiting for the pipeline lock, held by pid" in output for output in outputs), outputs
    first, second = sorted(_pipeline_runs(), key=lambda r: r.info.start_time)
    assert first.info.status == second.info.status == "FINISHED"
    assert first.info.end_time <= second.info.start_time  # serialized by the project lock
    import numpy as np

    prepared = tiny_project / "data" / "prepared"
    assert np.load(prepared / "train_x.npy").shape[1:] == (1, 8, 8)
    dvc = _dvc_status(tiny_project, "prepare")
    assert "up to date" in dvc.stdout


def test_a_run_is_refused_with_a_clear_message_while_another_holds_the_project(
    tiny_project: Path, prefect_api_url: str, mlflow_uri: str
) -> None:
    from tasks.core.dvc import pipeline_lock

    with pipeline_lock(tiny_project):
        result = slimflow(tiny_project, "run", env={"PREFECT_API_URL": prefect_api_url, "MLFLOW_TRACKING_URI": mlflow_uri})
    assert result.returncode == 3
    assert "another slimflow pipeline run is in progress" in result.stderr
    assert not (tiny_project / "data" / "prepared").exists()


def test_sigterm_leaves_no_run_running_no_lock_and_no_half_written_output(
    tmp_path: Path, prefect_api_url: str, mlflow_uri: str
) -> None:
    tiny_project = make_project(tmp_path / "interrupted", {**TINY_PARAMS, "train": {**TINY_PARAMS["train"], "epochs": 1}})
    env = {**os.environ, "SLIMFLOW_ROOT": str(tiny_project), "PREFECT_API_URL": prefect_api_url, "MLFLOW_TRACKING_URI": mlflow_uri}
    # A model of an earlier run, which DVC removes when the train stage starts again.
    assert slimflow(tiny_project, "run", "--to", "train", env=env).returncode == 0
    model = {p.name: p.read_bytes() for p in (tiny_project / "artifacts" / "model").iterdir()}
    params = (tiny_project / "params.yaml").read_bytes()
    log = tiny_project / "run.log"
    with log.open("w") as out:
        # Long enough training that SIGTERM lands while the workers are busy.
        process = subprocess.Popen([str(Path(os.sys.executable).parent / "slimflow"), "run", "--set", "train.epochs=300",
                                    "--set", "train.patience=300"], cwd=tiny_project,
                                   env=env, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 180
        while "epoch 2/300" not in log.read_text() and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.5)
        assert process.poll() is None, log.read_text()[-3000:]
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=120)
    assert process.returncode != 0
    assert [r for r in _runs() if r.info.status == "RUNNING"] == []
    assert {r.info.status for r in _pipeline_runs()} == {"FINISHED", "FAILED"}
    # No DVC lock held: status answers; the interrupted stage left no output of its own: the
    # earlier model is back, and the overrides no stage recorded are out of params.yaml.
    dvc = _dvc_status(tiny_project, "prepare", "train")
    assert dvc.returncode == 0, dvc.stderr
    assert "up to date" in dvc.stdout, dvc.stdout
    assert {p.name: p.read_bytes() for p in (tiny_project / "artifacts" / "model").iterdir()} == model
    assert (tiny_project / "params.yaml").read_bytes() == params
    # No process of this run left (workers included); other work on the machine is not counted.
    assert seconds_until_gone(tiny_project, 10) < 5


def test_sigterm_as_serve_begins_still_pauses_the_schedule_and_exits_cleanly(
    tiny_project: Path, tmp_path: Path, prefect_api_url: str, mlflow_uri: str
) -> None:
    """SIGTERM the moment the deployment is registered, as the runner starts. Prefect's
    runner, stopped by an exception raised wherever its event loop was, exited 0 with the
    schedule still active (5 of 5 tries), or died of the signal (2 of them)."""
    from prefect.client.orchestration import get_client

    name = f"sigterm-{os.getpid()}-{int(time.time())}"
    log = tmp_path / "serve.log"
    env = {**os.environ, "SLIMFLOW_ROOT": str(tiny_project), "PREFECT_API_URL": prefect_api_url,
           "MLFLOW_TRACKING_URI": mlflow_uri}
    with log.open("w") as out:
        served = subprocess.Popen([str(Path(os.sys.executable).parent / "slimflow"), "serve", "--interval", "86400",
                                   "--name", name], cwd=tiny_project, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while "trigger a run now" not in log.read_text() and served.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        served.send_signal(signal.SIGTERM)
        assert served.wait(timeout=60) == 0, log.read_text()[-3000:]
    finally:
        if served.poll() is None:
            served.kill()
    output = log.read_text()
    assert "SIGTERM received: stopping serve" in output, output
    assert f"schedule of slimflow-pipeline/{name} paused" in output, output
    assert "Traceback" not in output, output
    with get_client(sync_client=True) as client:
        assert client.read_deployment_by_name(f"slimflow-pipeline/{name}").paused


def test_scheduler_triggers_the_served_deployment_and_the_run_completes(
    tiny_project: Path, tmp_path: Path, mlflow_uri: str
) -> None:
    import httpx

    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "SLIMFLOW_ROOT": str(tiny_project),
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_API_URL": api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "5",
        "PREFECT_RUNNER_POLL_FREQUENCY": "5",
        "MLFLOW_TRACKING_URI": mlflow_uri,
    }
    bin_dir = Path(os.sys.executable).parent
    server = subprocess.Popen([str(bin_dir / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    served = None
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(1)
        else:
            pytest.fail("Prefect server did not start in 120 s")
        temporary = tmp_path / "tmp"  # serve's TMPDIR: what Prefect's runner leaves there
        temporary.mkdir()
        log = tmp_path / "serve.log"
        with log.open("w") as out:
            served = subprocess.Popen(
                [str(bin_dir / "slimflow"), "serve", "--interval", "10", "--to", "prepare", "--name", "every-10s"],
                cwd=tiny_project, env={**env, "TMPDIR": str(temporary)}, stdout=out, stderr=subprocess.STDOUT,
            )
        completed = []
        deadline = time.monotonic() + 180
        while not completed and time.monotonic() < deadline:
            time.sleep(3)
            response = httpx.post(f"{api}/flow_runs/filter", json={
                "flow_runs": {"state": {"type": {"any_": ["COMPLETED"]}}}}, timeout=10)
            completed = [r for r in response.json() if r.get("deployment_id") and r.get("auto_scheduled")]
        assert completed, "no scheduled flow run completed within 180 s"
        assert (tiny_project / "data" / "prepared" / "card.json").exists()
        # SIGTERM (systemctl stop, docker stop): the shutdown Ctrl-C takes, quietly.
        served.terminate()
        assert served.wait(timeout=60) == 0, log.read_text()[-3000:]
        output = log.read_text()
        assert "trigger a run now: prefect deployment run 'slimflow-pipeline/every-10s'" in output
        assert "never awaited" not in output and "Traceback" not in output, output[-3000:]
        deployment = httpx.get(f"{api}/deployments/name/slimflow-pipeline/every-10s", timeout=10).json()
        assert deployment["paused"], deployment  # its schedule paused on the way out
        assert not serve_leftovers(temporary), serve_leftovers(temporary)
    finally:
        for process in (served, server):  # the runner before the server it talks to
            if process is not None:
                process.terminate()
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
