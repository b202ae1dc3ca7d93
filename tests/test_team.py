"""Team mode, for real: the same code and params.yaml on the engines a team runs, switched
by configuration alone (docs/team.md).

One module-scoped stack, started here and stopped here:
- PostgreSQL (a throwaway cluster: initdb in a temporary folder, pg_ctl on a free
  127.0.0.1 port) behind an MLflow tracking server that stores artifacts through itself;
- a Prefect server;
- a tiny project (tests.conftest.make_project) with a local-directory DVC remote.

`python -m flows.cli run` runs the whole pipeline against it with only MLFLOW_TRACKING_URI
and PREFECT_API_URL set; then the DVC remote restores everything in a fresh clone, and the
deployment in prefect.yaml runs on a process worker from its schedule.

Needs PostgreSQL's server binaries (scripts/install_test_services.sh installs them).
"""

from __future__ import annotations

import copy
import glob
import json
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import TINY_PARAMS, deep_update, free_port, make_project
from tasks.core.config import load_params

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
WORK_POOL = "slimflow"  # prefect.yaml work_pool.name
DEPLOYMENT = "slimflow-pipeline/nightly"  # flow name / prefect.yaml deployment name


# ---------------------------------------------------------------------------- helpers
def clean_env(**extra: str) -> dict[str, str]:
    """This environment without any MLflow / Prefect / slimflow setting, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_", "SLIMFLOW_"))}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def run(command: list[str], cwd: Path, env: dict[str, str], timeout: float = 180) -> subprocess.CompletedProcess:
    """Run a command; fail the test with its output when it fails."""
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        pytest.fail(f"{' '.join(map(str, command))} exited {result.returncode}:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result


def wait_for(check: Callable[[], Any], timeout_s: float, what: str, service: Service | None = None, every_s: float = 0.5) -> Any:
    """Poll ``check`` until it returns something truthy; fail naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if service is not None and service.proc.poll() is not None:
            pytest.fail(f"{service.name} exited with {service.proc.returncode} while waiting for {what}:\n{service.tail()}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}" + (f":\n{service.tail()}" if service else ""))
        time.sleep(every_s)


def http(method: str, url: str, body: Any = None, timeout: float = 10) -> Any:
    """A JSON request; None when the server does not answer (yet)."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            payload = response.read()
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None
    return json.loads(payload) if payload else {}


class Service:
    """A server process in its own session, its output in a log file; ``stop`` ends it and
    every process it started (Prefect starts flow runs in sessions of their own)."""

    def __init__(self, name: str, command: list[str], env: dict[str, str], cwd: Path, logs: Path) -> None:
        self.name = name
        self.log = logs / f"{name}.log"
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout_s: float = 20) -> None:
        import psutil

        try:
            family = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            family = []
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                pass
        for target in family:
            try:
                target.terminate()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(family, timeout=10)
        for target in alive:
            target.kill()
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait(10)


def require_binary(path: str | None, what: str) -> str:
    """The path of a system binary the tests need; fail (root: installable) or skip without it."""
    if path and os.access(path, os.X_OK):
        return path
    message = f"{what} not found; scripts/install_test_services.sh installs it (make test runs it)"
    if os.geteuid() != 0:
        pytest.skip(message + " - as root")
    pytest.fail(message)


# ---------------------------------------------------------------------------- the stack
@dataclass(frozen=True)
class Postgres:
    host: str
    port: int
    superuser_password: str

    def uri(self, database: str, user: str, password: str, driver: str = "postgresql") -> str:
        return f"{driver}://{user}:{password}@{self.host}:{self.port}/{database}"

    def create_database(self, name: str, owner: str, password: str) -> str:
        import psycopg2

        connection = psycopg2.connect(host=self.host, port=self.port, user="postgres",
                                      password=self.superuser_password, dbname="postgres")
        connection.autocommit = True  # CREATE DATABASE refuses to run in a transaction
        try:
            with connection.cursor() as cursor:
                cursor.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (owner,))
                if not cursor.fetchone():
                    cursor.execute(f'CREATE ROLE "{owner}" LOGIN PASSWORD %s', (password,))
                cursor.execute(f'CREATE DATABASE "{name}" OWNER "{owner}"')
        finally:
            connection.close()
        return self.uri(name, owner, password)

    def query(self, database: str, sql: str) -> list[tuple]:
        import psycopg2

        connection = psycopg2.connect(host=self.host, port=self.port, user="postgres",
                                      password=self.superuser_password, dbname=database)
        try:
            with connection.cursor() as cursor:
                cursor.execute(sql)
                return cursor.fetchall()
        finally:
            connection.close()


def _postgres_bin() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(p.split("/")[4]))
    pg_ctl = found[-1] if found else shutil.which("pg_ctl")
    return Path(require_binary(pg_ctl, "PostgreSQL server (pg_ctl, initdb)")).parent


@pytest.fixture(scope="module")
def team_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("team")


@pytest.fixture(scope="module")
def postgres() -> Iterator[Postgres]:
    """A throwaway PostgreSQL cluster on a free 127.0.0.1 port, removed afterwards.

    PostgreSQL refuses to run as root, so as root the cluster belongs to the user
    ``postgres`` (made by the Debian package) and lives outside pytest's root-only tmp.
    """
    bindir = _postgres_bin()
    owner = None
    if os.geteuid() == 0:
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            owner = pwd.getpwnam("nobody")
    folder = Path(tempfile.mkdtemp(prefix="slimflow-pg-"))
    password = "slimflow-tests-superuser"
    (folder / "pwfile").write_text(password + "\n")
    if owner:
        os.chown(folder, owner.pw_uid, owner.pw_gid)
        os.chown(folder / "pwfile", owner.pw_uid, owner.pw_gid)

    def as_owner() -> None:
        if owner:
            os.setgroups([])
            os.setgid(owner.pw_gid)
            os.setuid(owner.pw_uid)

    def pg(*args: str, timeout: float = 120) -> None:
        result = subprocess.run([str(bindir / args[0]), *args[1:]], preexec_fn=as_owner, cwd=folder,
                                capture_output=True, text=True, timeout=timeout)
        if result.returncode != 0:
            log = folder / "postgres.log"
            pytest.fail(f"{args[0]} failed:\n{result.stdout}\n{result.stderr}\n"
                        f"{log.read_text()[-3000:] if log.exists() else ''}")

    port = free_port()
    data = folder / "data"
    started = False
    try:
        pg("initdb", "-D", str(data), "-U", "postgres", "-E", "UTF8", "--auth-local=trust",
           "--auth-host=scram-sha-256", f"--pwfile={folder / 'pwfile'}")
        options = (f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={folder} "
                   "-c fsync=off -c synchronous_commit=off -c full_page_writes=off")
        pg("pg_ctl", "-D", str(data), "-l", str(folder / "postgres.log"), "-o", options, "-w", "-t", "60", "start")
        started = True
        yield Postgres("127.0.0.1", port, password)
    finally:
        if started:
            pg("pg_ctl", "-D", str(data), "-m", "fast", "-w", "-t", "60", "stop")
        shutil.rmtree(folder, ignore_errors=True)


@dataclass(frozen=True)
class MlflowServer:
    uri: str
    backend_database: str
    artifacts: Path


@dataclass(frozen=True)
class Stack:
    mlflow: MlflowServer
    prefect_api: str  # PREFECT_API_URL


def _health(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


@pytest.fixture(scope="module")
def stack(postgres: Postgres, team_dir: Path) -> Iterator[Stack]:
    """An MLflow tracking server on PostgreSQL that serves the artifacts itself (clients
    upload through it), and a Prefect server with its own PREFECT_HOME. Both start at once
    (~20 s each here); the scheduler looks for due runs every 5 s instead of 60."""
    backend = postgres.create_database("mlflow", "slimflow", "slimflow-tests")
    artifacts = team_dir / "mlflow-artifacts"
    mlflow_port, prefect_port = free_port(), free_port()
    services: list[Service] = []
    try:
        services.append(Service("prefect-server", [
            str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(prefect_port),
        ], clean_env(
            PREFECT_HOME=str(team_dir / "prefect-server"),
            PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="5",
            PREFECT_UI_ENABLED="false",
        ), team_dir, team_dir))
        services.append(Service("mlflow-server", [
            str(BIN / "mlflow"), "server", "--backend-store-uri", backend,
            "--serve-artifacts", "--artifacts-destination", str(artifacts),
            "--host", "127.0.0.1", "--port", str(mlflow_port), "--workers", "1",
        ], clean_env(
            # The job runner (7 huey processes) serves GenAI features slimflow does not use.
            MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",
        ), team_dir, team_dir))
        prefect_api = f"http://127.0.0.1:{prefect_port}/api"
        mlflow_uri = f"http://127.0.0.1:{mlflow_port}"
        wait_for(lambda: http("GET", f"{prefect_api}/health") is True, 180, "the Prefect server", services[0])
        wait_for(lambda: _health(f"{mlflow_uri}/health"), 180, "the MLflow server", services[1])
        yield Stack(MlflowServer(mlflow_uri, "mlflow", artifacts), prefect_api)
    finally:
        for service in reversed(services):
            service.stop()


@pytest.fixture(scope="module")
def team_project(team_dir: Path) -> Path:
    """A tiny project with prefect.yaml and a local-directory DVC remote as its default."""
    root = make_project(team_dir / "project", deep_update(copy.deepcopy(TINY_PARAMS), {"train": {"epochs": 2}}))
    shutil.copy2(REPO / "prefect.yaml", root / "prefect.yaml")
    env = clean_env()
    run([str(BIN / "dvc"), "remote", "add", "-d", "team", str(team_dir / "dvc-remote")], root, env)
    run(["git", "add", "-A"], root, env)
    run(["git", "commit", "-qm", "team mode: prefect.yaml, DVC remote"], root, env)
    return root


@dataclass(frozen=True)
class PipelineRun:
    root: Path
    result: subprocess.CompletedProcess
    seconds: float
    env: dict[str, str]

    def require_success(self) -> None:
        if self.result.returncode != 0:
            pytest.fail(f"`python -m flows.cli run` exited {self.result.returncode} after {self.seconds:.0f} s:\n"
                        f"{self.result.stdout[-3000:]}\n{self.result.stderr[-6000:]}")


@pytest.fixture(scope="module")
def pipeline_run(team_project: Path, stack: Stack, team_dir: Path) -> PipelineRun:
    """The whole pipeline, run once as a user would, against the tracking and Prefect servers."""
    env = clean_env(
        MLFLOW_TRACKING_URI=stack.mlflow.uri,
        PREFECT_API_URL=stack.prefect_api,
        PREFECT_HOME=str(team_dir / "prefect-client"),
    )
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "flows.cli", "run"], cwd=team_project, env=env,
                            capture_output=True, text=True, timeout=900)
    seconds = time.monotonic() - started
    (team_dir / "pipeline-run.log").write_text(f"{seconds:.1f} s, exit {result.returncode}\n{result.stdout}\n{result.stderr}")
    return PipelineRun(team_project, result, seconds, env)


def _mlflow_client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


# ---------------------------------------------------------------------------- tracking server
@pytest.mark.timeout(900)
def test_pipeline_tracks_to_an_mlflow_server_on_postgresql(pipeline_run: PipelineRun, stack: Stack,
                                                          postgres: Postgres, team_dir: Path) -> None:
    pipeline_run.require_success()
    mlflow_server, prefect_api = stack.mlflow, stack.prefect_api
    root = pipeline_run.root
    params = yaml.safe_load((root / "params.yaml").read_text())
    client = _mlflow_client(mlflow_server.uri)

    experiment = client.get_experiment_by_name(params["base"]["experiment"])
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id], max_results=500)
    pipeline_runs = [r for r in runs if r.data.tags.get("pipeline") == "slimflow"]
    assert len(pipeline_runs) == 1, [r.info.run_name for r in runs]
    parent = pipeline_runs[0]
    assert parent.info.status == "FINISHED"
    stages = {r.data.tags.get("stage"): r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert {"prepare", "train", "compress", "evaluate"} <= set(stages)
    assert all(r.info.status == "FINISHED" for r in runs), [(r.info.run_name, r.info.status) for r in runs]
    # Rank 0 of the Horovod workers logged through the server.
    assert stages["train"].data.params["world_size"] == str(params["train"]["workers"])
    assert len(client.get_metric_history(stages["train"].info.run_id, "train_loss")) == params["train"]["epochs"]

    # The runs live in PostgreSQL, the artifacts went through the server to its destination,
    # and nothing fell back to the embedded sqlite store.
    (count,), = postgres.query(mlflow_server.backend_database, "SELECT count(*) FROM runs")
    assert count == len(runs)
    assert parent.info.artifact_uri.startswith("mlflow-artifacts:")
    assert any(p.is_file() for p in mlflow_server.artifacts.rglob("*"))
    assert not (root / "mlflow.db").exists()

    # The champion: registered under evaluate.registered_model with the alias, from this run.
    metrics = json.loads((root / "metrics" / "evaluate.json").read_text())
    assert metrics["baseline"]["accuracy"] > 0.5
    name = load_params(root / "params.yaml").evaluate.registered_model  # `auto` there: named after the data
    champion = client.get_model_version_by_alias(name, "champion")
    assert champion.run_id in {r.info.run_id for r in runs}
    assert client.get_registered_model(name).aliases.get("champion") == champion.version

    # A teammate loads it through the server, from anywhere (here: an empty folder).
    elsewhere = team_dir / "elsewhere"
    elsewhere.mkdir(exist_ok=True)
    script = (
        "import json, mlflow, numpy as np\n"
        "from sklearn.datasets import load_digits\n"
        f"model = mlflow.pyfunc.load_model('models:/{name}@champion')\n"
        "digits = load_digits()\n"
        "x, y = digits.data[-300:].reshape(-1, 1, 8, 8).astype(np.float32), digits.target[-300:]  # shaped input: the signature says (-1, 1, 8, 8)\n"
        "predicted = np.asarray(model.predict(x)).ravel()\n"
        "print(json.dumps({'n': len(predicted), 'accuracy': float((predicted == y).mean())}))\n"
    )
    loaded = run([sys.executable, "-c", script], elsewhere, clean_env(MLFLOW_TRACKING_URI=mlflow_server.uri))
    result = json.loads(loaded.stdout.strip().splitlines()[-1])
    assert result["n"] == 300 and result["accuracy"] > 0.5, result

    # The flow run is on the Prefect server, COMPLETED, with the MLflow run id as an artifact.
    flow_run_id = parent.data.tags["prefect_flow_run_id"]
    flow_run = http("GET", f"{prefect_api}/flow_runs/{flow_run_id}")
    assert flow_run and flow_run["state"]["type"] == "COMPLETED"
    assert parent.info.run_id in _mlflow_links(prefect_api, flow_run_id)


def _stop_flow_runs_of(prefect_home: str) -> None:
    """End the flow-run processes a stopped worker leaves: Prefect starts each through a
    starter that exits (``prefect.runner._starter_engine``), so a run that started as the worker
    stopped (the schedule comes due every 5 s) is no child of the worker and outlives it; one
    left crashed on the closed API stayed in Prefect's retries for minutes after the test."""
    import psutil

    leftovers = []
    for process in psutil.process_iter():
        try:
            if process.pid != os.getpid() and process.environ().get("PREFECT_HOME") == prefect_home:
                leftovers.append(process)
        except (psutil.Error, OSError):  # gone, or not ours to read
            continue
    for process in leftovers:
        process.kill()
    psutil.wait_procs(leftovers, timeout=10)


def _mlflow_links(api: str, flow_run_id: str) -> str:
    """The markdown of the flow run's ``mlflow-runs`` artifact ("" if none)."""
    artifacts = http("POST", f"{api}/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}}) or []
    return "".join(str(a.get("data") or "") for a in artifacts if a.get("key") == "mlflow-runs")


# ---------------------------------------------------------------------------- shared data
@pytest.mark.timeout(600)
def test_dvc_remote_restores_data_and_outputs_in_a_fresh_clone(pipeline_run: PipelineRun, team_dir: Path) -> None:
    pipeline_run.require_success()
    from tasks.core.dvc import push_outputs

    root = pipeline_run.root
    env = clean_env()
    # What a run does after it succeeds when a remote is configured (a flow that already
    # pushed leaves little or nothing to send, hence no count asserted here).
    assert push_outputs(root) is not None, "the project's default remote was not found"
    assert any(p.is_file() for p in (team_dir / "dvc-remote").rglob("*"))

    # Commit what git tracks after a run - the lock file, DVC's .gitignore entries, metrics
    # and plots - exactly what `dvc repro` tells you to add (not `git add -A`).
    tracked = ["dvc.lock", "params.yaml", "metrics", "plots", *(str(p.relative_to(root)) for p in root.rglob(".gitignore"))]
    run(["git", "add", *tracked], root, env)
    run(["git", "commit", "-qm", "pipeline results"], root, env)

    clone = team_dir / "clone"
    run(["git", "clone", "-q", str(root), str(clone)], team_dir, env)
    assert not (clone / "artifacts" / "model").exists()
    run([str(BIN / "dvc"), "pull"], clone, env)
    for output in ("data/prepared", "artifacts/model", "artifacts/compressed", "artifacts/evaluation"):
        assert (clone / output).is_dir() and any((clone / output).iterdir()), output
    status = run([str(BIN / "dvc"), "status", "--json"], clone, env)
    assert json.loads(status.stdout or "{}") == {}, status.stdout
    repro = run([str(BIN / "dvc"), "repro"], clone, env, timeout=300)
    assert "Running stage" not in repro.stdout, repro.stdout


# ---------------------------------------------------------------------------- scheduler
@pytest.mark.timeout(900)
def test_prefect_yaml_deployment_runs_on_schedule_on_a_process_worker(pipeline_run: PipelineRun, stack: Stack,
                                                                     team_dir: Path) -> None:
    pipeline_run.require_success()
    mlflow_server, prefect_api = stack.mlflow, stack.prefect_api
    root = pipeline_run.root
    # The shipped schedule is nightly; make this copy's come due every few seconds.
    config = yaml.safe_load((root / "prefect.yaml").read_text())
    (deployment_config,) = config["deployments"]
    deployment_config["schedules"] = [{"interval": 5, "active": True}]
    (root / "prefect.yaml").write_text(yaml.safe_dump(config, sort_keys=False))

    env = clean_env(PREFECT_API_URL=prefect_api, PREFECT_HOME=str(team_dir / "prefect-client"))
    prefect = str(BIN / "prefect")
    run([prefect, "work-pool", "create", WORK_POOL, "--type", "process"], root, env)
    run([prefect, "--no-prompt", "deploy", "--all"], root, env)
    flow_name, deployment_name = DEPLOYMENT.split("/")
    deployment = http("GET", f"{prefect_api}/deployments/name/{flow_name}/{deployment_name}")
    assert deployment and deployment["entrypoint"] == "flows/pipeline.py:pipeline"
    # The checkout is found on the worker when a run starts, not fixed at deploy time.
    assert "{{ $SLIMFLOW_ROOT }}" in json.dumps(deployment["pull_steps"])

    worker_env = clean_env(
        PREFECT_API_URL=prefect_api,
        PREFECT_HOME=str(team_dir / "prefect-worker"),
        PREFECT_WORKER_QUERY_SECONDS="5",
        MLFLOW_TRACKING_URI=mlflow_server.uri,
        SLIMFLOW_ROOT=str(root),
        # Prefect's process worker leaves a runner_storage/ folder and each flow run's attempt
        # folder in its temporary folder: this test's, not the machine's /tmp.
        TMPDIR=str(team_dir / "worker-tmp"),
    )
    (team_dir / "worker-tmp").mkdir(exist_ok=True)
    # Started elsewhere on purpose: the pull step takes the run to the checkout.
    worker = Service("prefect-worker", [prefect, "worker", "start", "--pool", WORK_POOL], worker_env, team_dir, team_dir)

    def runs_of_deployment() -> list[dict]:
        found = http("POST", f"{prefect_api}/flow_runs/filter", {
            "flow_runs": {"deployment_id": {"any_": [deployment["id"]]}}, "sort": "EXPECTED_START_TIME_ASC"})
        return found or []

    def started_run() -> dict | None:
        return next((r for r in runs_of_deployment() if r["state"]["type"] not in ("SCHEDULED",)), None)

    try:
        picked = wait_for(started_run, 180, "the worker to pick up a scheduled run", worker, every_s=1)
        # One scheduled run is the test: stop the schedule (deletes the runs still waiting).
        http("POST", f"{prefect_api}/deployments/{deployment['id']}/pause_deployment")

        def finished() -> dict | None:
            current = http("GET", f"{prefect_api}/flow_runs/{picked['id']}")
            return current if current and current["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") else None

        final = wait_for(finished, 300, "the scheduled run to finish", worker, every_s=1)
    finally:
        worker.stop()  # before the server, or a run in progress fails on a closed connection
        _stop_flow_runs_of(worker_env["PREFECT_HOME"])
    assert final["state"]["type"] == "COMPLETED", f"{final['state']}\n{worker.tail()}"
    assert final["auto_scheduled"] is True  # made by the scheduler, not `prefect deployment run`
    assert final["work_pool_name"] == WORK_POOL

    # The run in the Prefect UI links to its MLflow run on the tracking server.
    links = _mlflow_links(prefect_api, final["id"])
    match = re.search(r"\b([0-9a-f]{32})\b", links)
    assert match, links
    mlflow_run = _mlflow_client(mlflow_server.uri).get_run(match.group(1))
    assert mlflow_run.info.status == "FINISHED"
    assert mlflow_run.data.tags["prefect_flow_run_id"] == final["id"]
    # Nothing changed since the manual run, so DVC skipped every stage.
    assert mlflow_run.data.tags["stages_ran"] == "none"
