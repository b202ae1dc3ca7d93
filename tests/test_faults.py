"""Fault injection: what a hard kill, a stopped server, a dead server, a full disk and bad
input leave behind, and how the next start repairs it.

The first tests exercise the mechanisms alone (the reaper and parent-death signal, the
lock's owner and queue, the repair helpers; seconds each). The tests marked
``integration`` run the real stack on tiny configurations through the ``slimflow``
console script: ``kill -9`` during training, Ctrl-C on ``slimflow serve``, a full disk.
A process belongs to a run under test when its environment has ``SLIMFLOW_ROOT`` set to
that test's project (the ``slimflow`` helper sets it; every process a run starts
inherits it), so other work on the machine is never counted.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, TINY_PARAMS, make_project, run_processes, seconds_until_gone, serve_leftovers, slimflow

PYTHON = sys.executable
SLIMFLOW = str(Path(sys.executable).parent / "slimflow")


# ----------------------------------------------------------------------------- helpers


def wait_for_text(log: Path, text: str, process: subprocess.Popen, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if text in log.read_text(errors="replace"):
            return
        if process.poll() is not None:
            pytest.fail(f"exited with {process.returncode} before {text!r}:\n{log.read_text()[-3000:]}")
        time.sleep(0.3)
    pytest.fail(f"no {text!r} within {timeout_s} s:\n{log.read_text()[-3000:]}")


def start(root: Path, *args: str, env: dict, log: Path) -> subprocess.Popen:
    """``slimflow ARGS`` in the background, in a session of its own (as from a terminal)."""
    full_env = {**os.environ, "SLIMFLOW_ROOT": str(root), **env}
    with log.open("w") as out:
        return subprocess.Popen([SLIMFLOW, *args], cwd=root, env=full_env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def runs_of(experiment: str = "slimflow") -> list:
    import mlflow

    exp = mlflow.get_experiment_by_name(experiment)
    if exp is None:
        return []
    return mlflow.search_runs(experiment_ids=[exp.experiment_id], output_format="list", max_results=500)


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- mechanisms


OWNER = textwrap.dedent("""
    import subprocess, sys, time
    from tasks.core.processes import own_process_tree, parent_death_preexec
    own_process_tree()
    # a child in a session of its own (as Horovod's middleman makes it), with a grandchild,
    # and a child armed with the parent-death signal (as the launcher starts horovodrun)
    subprocess.Popen(["sh", "-c", "sleep 600 & sleep 601"], start_new_session=True)
    subprocess.Popen(["sleep", "602"], preexec_fn=parent_death_preexec())
    print("started", flush=True)
    time.sleep(600)
""")


def test_a_killed_owner_takes_its_whole_process_tree_with_it(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "SLIMFLOW_ROOT": str(tmp_path)}
    owner = subprocess.Popen([PYTHON, "-c", OWNER], env=env, stdout=subprocess.PIPE, text=True)
    assert owner.stdout.readline().strip() == "started"
    def sleeps(processes: dict[int, str]) -> list[str]:
        return sorted(c for c in processes.values() if c.startswith("sleep "))

    # Until all three sleeps have exec'd (a forked sh shows its parent's command line until then).
    deadline = time.monotonic() + 10
    while sleeps(run_processes(tmp_path)) != ["sleep 600", "sleep 601", "sleep 602"] and time.monotonic() < deadline:
        time.sleep(0.05)
    before = run_processes(tmp_path)
    assert sleeps(before) == ["sleep 600", "sleep 601", "sleep 602"], before
    owner.kill()
    owner.wait()
    assert seconds_until_gone(tmp_path, 10) < 5, run_processes(tmp_path)


def _dead_process() -> tuple[int, float]:
    import psutil

    child = subprocess.Popen(["sleep", "30"])
    started = psutil.Process(child.pid).create_time()
    child.kill()
    child.wait()
    return child.pid, started


@pytest.mark.parametrize(("code", "status", "said"), [(0, 0, ""), (3, 3, ""), ("bad input: x", 1, "bad input: x")])
def test_a_process_that_exits_quickly_still_runs_its_exit_handlers_and_keeps_its_status(
    tmp_path: Path, code: int | str, status: int, said: str,
) -> None:
    """The stage entries and the CLI leave through exit_process (no last garbage collection
    through their imports' objects): what the process writes at exit, its buffered output
    and its exit status are as with sys.exit."""
    flushed = tmp_path / "flushed"
    program = textwrap.dedent(f"""
        import atexit, sys
        from tasks.core.processes import exit_process
        atexit.register(lambda: open({str(flushed)!r}, "w").write("handler ran"))
        cycle = [];  cycle.append(cycle)  # alive at exit, in a reference cycle
        sys.stdout.write("buffered, not flushed")
        exit_process({code!r})
    """)
    done = subprocess.run([PYTHON, "-c", program], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == status, done.stderr
    assert flushed.read_text() == "handler ran"
    assert done.stdout == "buffered, not flushed"
    assert done.stderr.strip() == said


READY = "print('ready', flush=True)"


@pytest.mark.parametrize(("program", "status"), [
    (f"{READY}; time.sleep(60)", -signal.SIGTERM),                                              # ends at SIGTERM
    (f"signal.signal(signal.SIGTERM, lambda *a: sys.exit(7)); {READY}; time.sleep(60)", 7),      # its own way
    (f"signal.signal(signal.SIGTERM, signal.SIG_IGN); {READY}; time.sleep(60)", -signal.SIGKILL),  # after the grace
    (f"{READY}; sys.exit(0)", 0),                                                                 # gone already
])
def test_stop_process_ends_a_child_and_returns_its_status(program: str, status: int) -> None:
    """SIGTERM, then SIGKILL after the grace for a child that ignores it; the child reaped."""
    from tasks.core.processes import stop_process

    child = subprocess.Popen([PYTHON, "-c", f"import signal, sys, time; {program}"], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline() == "ready\n"  # its handler is set
    if status == 0:
        child.wait(timeout=30)
    assert stop_process(child, grace_s=1.0) == status
    assert child.returncode == status
    child.stdout.close()


def test_a_lock_whose_owner_died_is_taken_over_and_says_so(tmp_path: Path) -> None:
    from tasks.core.lock import Holder, lock_paths, pipeline_lock

    pid, started = _dead_process()
    _, owner_file, _ = lock_paths(tmp_path)
    Holder(pid=pid, started=started, command="slimflow run").write(owner_file)
    with pipeline_lock(tmp_path) as state:
        assert state.dead_owner is not None and state.dead_owner.pid == pid
        assert f"pid {pid}" in state.dead_owner.describe()
        assert Holder.read(owner_file).pid == os.getpid()  # the owner file now names this process
    assert not owner_file.exists()


WAITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from tasks.core.lock import pipeline_lock
    root, name, scheduled = Path(sys.argv[1]), sys.argv[2], float(sys.argv[3])
    with pipeline_lock(root, 120, scheduled_at=scheduled, on_wait=lambda m: print(m, flush=True)):
        with (root / "order.txt").open("a") as out:
            out.write(name + "\\n")
""")


def test_waiting_runs_start_in_the_order_they_were_scheduled_and_say_on_whom_they_wait(tmp_path: Path) -> None:
    from tasks.core.lock import pipeline_lock

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    now = time.time()
    waiters = {}
    with pipeline_lock(tmp_path):
        # Started in the opposite order of their schedule, each once the previous one queued.
        for name, scheduled in (("third", now + 3), ("second", now + 2), ("first", now + 1)):
            waiters[name] = subprocess.Popen([PYTHON, "-c", WAITER, str(tmp_path), name, str(scheduled)],
                                             env=env, stdout=subprocess.PIPE, text=True)
            assert "waiting for the pipeline lock" in waiters[name].stdout.readline()
    outputs = {name: p.communicate(timeout=60)[0] for name, p in waiters.items()}
    assert [p.returncode for p in waiters.values()] == [0, 0, 0], outputs
    assert (tmp_path / "order.txt").read_text().split() == ["first", "second", "third"]
    assert not list((tmp_path / ".slimflow" / "queue").iterdir())


def test_the_waiting_message_names_the_holder_and_since_when(tmp_path: Path) -> None:
    from tasks.core.lock import pipeline_lock

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with pipeline_lock(tmp_path):
        waiter = subprocess.Popen([PYTHON, "-c", WAITER, str(tmp_path), "only", str(time.time())],
                                  env=env, stdout=subprocess.PIPE, text=True)
        message = waiter.stdout.readline()
    waiter.communicate(timeout=60)
    assert f"held by pid {os.getpid()}" in message
    assert "since 20" in message and "giving up after 120 s" in message


def test_leftovers_of_a_dead_run_are_removed_and_outputs_kept(tmp_path: Path) -> None:
    from tasks.core.paths import ProjectPaths
    from tasks.core.recovery import remove_leftovers

    paths = ProjectPaths(tmp_path)
    folders = ["data/.prepared.tmp-12-ab", "data/.prepared.old-12-ab", "artifacts/.compressed-build-x1",
               "artifacts/.compressed-scratch-x2", "artifacts/.compressed-old-77", "artifacts/.evaluation-staging-x3",
               "artifacts/evaluation.old"]
    files = ["artifacts/checkpoints/last.pt.tmp", "params.yaml.tmp", ".slimflow/train.error", ".slimflow/fit-job.json",
             ".dvc/cache/files/md5/ab/.xyz.tmp"]
    kept = ["data/prepared/train_x.npy", "artifacts/model/model.pt", "artifacts/checkpoints/last.pt",
            "artifacts/compressed/int8/model.pt", "params.yaml", ".dvc/cache/files/md5/ab/cdef"]
    for name in folders:
        (tmp_path / name).mkdir(parents=True)
        (tmp_path / name / "inside").write_text("x")
    for name in files + kept:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    leftovers = folders + files
    removed = remove_leftovers(paths)
    assert sorted(str(p.relative_to(tmp_path)) for p in removed) == sorted(leftovers)
    assert all((tmp_path / name).exists() for name in kept)


def test_stale_mlflow_runs_end_failed_with_the_reason(mlflow_uri: str) -> None:
    import mlflow
    from mlflow import MlflowClient

    from tasks.core.recovery import fail_run_tree

    client = MlflowClient()
    experiment = client.create_experiment("faults")
    pipeline = client.create_run(experiment)
    stage = client.create_run(experiment, tags={"mlflow.parentRunId": pipeline.info.run_id})
    model = client.create_run(experiment, tags={"mlflow.parentRunId": stage.info.run_id})
    finished = client.create_run(experiment, tags={"mlflow.parentRunId": pipeline.info.run_id})
    client.set_terminated(finished.info.run_id, "FINISHED")
    changed = fail_run_tree(client, pipeline.info.run_id, "its process died")
    assert set(changed) == {pipeline.info.run_id, stage.info.run_id, model.info.run_id}
    for run in (pipeline, stage, model):
        after = mlflow.get_run(run.info.run_id)
        assert after.info.status == "FAILED" and after.data.tags["error"] == "its process died"
    assert mlflow.get_run(finished.info.run_id).info.status == "FINISHED"


def test_a_full_disk_is_recognized_anywhere_in_an_error_chain(monkeypatch: pytest.MonkeyPatch) -> None:
    from tasks.core.errors import disk_full_message

    full = OSError(errno.ENOSPC, "No space left on device", "/data/artifacts/model.pt")
    assert disk_full_message(full) == "/data/artifacts/model.pt: no space left on device"
    try:
        try:
            raise full
        except OSError as err:
            raise RuntimeError("saving failed") from err
    except RuntimeError as wrapped:
        assert disk_full_message(wrapped) == "/data/artifacts/model.pt: no space left on device"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////srv/mlflow.db")
    sqlite = Exception("(sqlite3.OperationalError) database or disk is full\n[SQL: INSERT ...]")
    assert disk_full_message(sqlite).startswith("/srv/mlflow.db: no space left on device")
    assert disk_full_message(ValueError("bad value")) is None


def test_a_dvc_lock_truncated_by_a_failed_stage_is_put_back(tmp_path: Path) -> None:
    from tasks.core import dvc

    lock = tmp_path / "dvc.lock"
    lock.write_text(yaml.safe_dump({"schema": "2.0", "stages": {"train": {"cmd": "python -m tasks.train"}}}))
    before = lock.read_bytes()
    (tmp_path / ".slimflow").mkdir()
    dvc._guard_dvc_lock(tmp_path)
    lock.write_bytes(before[:20])  # what a full disk left: DVC rewrites it in place
    assert dvc.restore_dvc_lock(tmp_path, only_if_broken=True)
    assert lock.read_bytes() == before


# ----------------------------------------------------------------------------- the CLI, before work starts


@pytest.fixture(scope="module")
def cli_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_project(tmp_path_factory.mktemp("faults") / "project", TINY_PARAMS)


def _silent_server() -> socket.socket:
    """A TCP port that accepts connections and never answers."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    return server


@pytest.mark.parametrize("variable", ["MLFLOW_TRACKING_URI", "PREFECT_API_URL"])
@pytest.mark.parametrize("server", ["down", "silent"])
def test_a_server_that_is_down_fails_the_run_in_seconds_with_one_line(
    cli_project: Path, variable: str, server: str
) -> None:
    listener = _silent_server() if server == "silent" else None
    port = listener.getsockname()[1] if listener else 9
    uri = f"http://127.0.0.1:{port}" + ("/api" if variable == "PREFECT_API_URL" else "")
    started = time.monotonic()
    try:
        done = slimflow(cli_project, "run", env={variable: uri}, timeout=60)
    finally:
        if listener:
            listener.close()
    seconds = time.monotonic() - started
    assert done.returncode == 1, done.stderr
    assert seconds < 15
    (line,) = [line for line in done.stderr.splitlines() if line.strip()]
    assert line.startswith("error: ") and uri in line and variable in line
    assert ("cannot connect" if server == "down" else "no answer within 3 s") in line
    assert "Traceback" not in done.stderr


def test_a_malformed_set_value_is_one_line(cli_project: Path) -> None:
    done = slimflow(cli_project, "run", "--set", "train.model.channels=[32,", timeout=60)
    assert done.returncode == 2
    (line,) = [line for line in done.stderr.splitlines() if line.strip()]
    assert "train.model.channels=[32,: not valid YAML" in line
    assert "Traceback" not in done.stderr


# ----------------------------------------------------------------------------- the real stack


def _long_training(epochs: int = 60) -> dict:
    return {**TINY_PARAMS, "train": {**TINY_PARAMS["train"], "epochs": epochs, "patience": epochs}}


def background_server(root: Path) -> dict[int, str]:
    """pid -> command line of the project's background Prefect server: supervisor, server, uvicorn."""
    import psutil

    from flows.prefect_server import record_path

    record = json.loads(record_path(root).read_text())
    supervisor = psutil.Process(record["supervisor_pid"])
    return {p.pid: " ".join(p.cmdline()) for p in (supervisor, *supervisor.children(recursive=True))}


@pytest.mark.integration
def test_kill_9_during_training_leaves_no_process_and_the_next_run_repairs_and_resumes(
    tmp_path: Path, mlflow_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No PREFECT_API_URL: the run starts the project's background Prefect server, which
    # outlives the run (the next one uses it); everything else of the run must die.
    for key in ("PREFECT_API_URL", "SLIMFLOW_PREFECT_SERVER", "PREFECT_HOME"):  # the project's own
        monkeypatch.delenv(key, raising=False)
    root = make_project(tmp_path / "killed", _long_training())
    env = {"MLFLOW_TRACKING_URI": mlflow_uri}
    log = tmp_path / "first.log"
    first = start(root, "run", "--to", "train", env=env, log=log)
    try:
        wait_for_text(log, "epoch 3/60", first)
        from flows.prefect_api import MODULE

        server = background_server(root)
        assert any(f"-m {MODULE} " in command for command in server.values()), server  # the API
        before = {pid: command for pid, command in run_processes(root).items() if pid not in server}
        for part in ("tasks.training.worker", "horovodrun", "-m tasks.train"):
            assert any(part in command for command in before.values()), (part, before)

        os.kill(first.pid, signal.SIGKILL)
        first.wait()
        seconds = seconds_until_gone(root, ignore=set(server))
        print(f"kill -9: {len(before)} processes of the run gone {seconds:.2f} s after the kill")
        assert seconds < 5, run_processes(root)
        assert set(run_processes(root)) == set(server)  # the server alone is left, by design
        (stale,) = [r for r in runs_of() if r.data.tags.get("pipeline") == "slimflow"]
        assert stale.info.status == "RUNNING"  # nobody could end it

        second = slimflow(root, "run", "--to", "train", env=env, timeout=900)
        output = second.stdout + second.stderr
        assert second.returncode == 0, output[-4000:]
        assert background_server(root) == server  # the same server, found, not started again
        assert "Prefect UI: http://127.0.0.1:" in output
        assert f"took over the pipeline lock from pid {first.pid}" in output
        assert "resuming from checkpoint at epoch" in output
        stale = next(r for r in runs_of() if r.info.run_id == stale.info.run_id)
        assert stale.info.status == "FAILED"
        assert f"pid {first.pid}" in stale.data.tags["error"] and "died" in stale.data.tags["error"]
        assert [r for r in runs_of() if r.info.status == "RUNNING"] == []
        assert any(r.info.status == "FAILED" for r in runs_of() if r.data.tags.get("stage") == "train")
        flow_run_id = stale.data.tags["prefect_flow_run_id"]
        with sqlite3.connect(root / ".prefect" / "prefect.db") as db:
            (state,) = db.execute("SELECT state_type FROM flow_run WHERE id = ?", (flow_run_id,)).fetchone()
        assert state == "CRASHED"
        assert not list((root / ".slimflow" / "runs").glob("*.json"))
        assert not (root / ".slimflow" / "pipeline.owner").exists()
    finally:
        stopped = slimflow(root, "prefect-server", "--stop", timeout=60)
    assert stopped.stdout.strip() == "stopped", stopped.stdout + stopped.stderr
    assert run_processes(root) == {}


@pytest.mark.integration
def test_a_flow_run_prefect_marked_crashed_first_still_gets_the_reason(tmp_path: Path, prefect_api_url: str) -> None:
    """`slimflow serve` kills its runs as it stops, and Prefect's runner, seeing a run exit -9,
    may mark the flow run CRASHED before the repair does, with its guess (an out-of-memory kill):
    the repair still writes why. A flow run that ended otherwise is left as it is."""
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.states import Completed, Crashed

    from flows.recovery import RunRecord, repair_stale_runs

    @flow(name="slimflow-repair-test")
    def nothing() -> None:
        return None

    guess = "Process exited with status code: -9. Process exited due to a SIGKILL signal."
    with get_client(sync_client=True) as client:
        crashed = client.create_flow_run(nothing, state=Crashed(message=guess))
        completed = client.create_flow_run(nothing, state=Completed())
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    for flow_run in (crashed, completed):
        RunRecord(str(flow_run.id), gone.pid, time.time() - 5, socket.gethostname(), time.time()).save(tmp_path)
    assert repair_stale_runs(tmp_path, note=lambda message: None) == 2
    with get_client(sync_client=True) as client:
        state = client.read_flow_run(crashed.id).state
        assert state.is_crashed() and "died without ending it" in state.message, state.message
        assert client.read_flow_run(completed.id).state.is_completed()


@pytest.mark.integration
def test_ctrl_c_on_serve_leaves_no_running_flow_run_and_no_orphan(
    tiny_project: Path, prefect_api_url: str, mlflow_uri: str, tmp_path: Path
) -> None:
    (tiny_project / "params.yaml").write_text(yaml.safe_dump(
        {**yaml.safe_load((tiny_project / "params.yaml").read_text()), "train": _long_training()["train"]}))
    name = f"faults-{os.getpid()}-{int(time.time())}"
    temporary = tmp_path / "tmp"  # serve's TMPDIR: what Prefect's runner leaves there
    temporary.mkdir()
    env = {"PREFECT_API_URL": prefect_api_url, "MLFLOW_TRACKING_URI": mlflow_uri, "PREFECT_RUNNER_POLL_FREQUENCY": "2",
           "TMPDIR": str(temporary)}
    log = tmp_path / "serve.log"
    served = start(tiny_project, "serve", "--interval", "86400", "--to", "train", "--name", name, env=env, log=log)
    try:
        wait_for_text(log, f"serving slimflow-pipeline/{name}", served, 180)
        from prefect.client.orchestration import get_client
        from prefect.deployments import run_deployment

        flow_run = run_deployment(f"slimflow-pipeline/{name}", timeout=0)
        wait_for_text(log, "epoch 3/60", served, 400)
        interrupted = time.monotonic()
        os.killpg(served.pid, signal.SIGINT)  # Ctrl-C: the terminal signals the foreground group
        served.wait(timeout=120)
        stopping = time.monotonic() - interrupted
    finally:
        if served.poll() is None:
            served.kill()
    seconds = seconds_until_gone(tiny_project)
    print(f"Ctrl-C on serve: serve exited after {stopping:.1f} s (runs marked), its processes gone {seconds:.2f} s later")
    assert seconds < 5, run_processes(tiny_project)
    output = log.read_text()
    assert served.returncode == 0, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    # The runner's storage folder goes with it (Prefect's own serve left one per session).
    assert not serve_leftovers(temporary), serve_leftovers(temporary)
    with get_client(sync_client=True) as client:
        state = client.read_flow_run(flow_run.id).state
    assert state.is_final() and state.type.value == "CRASHED", state
    assert "died" in (state.message or "")
    assert [r for r in runs_of() if r.info.status == "RUNNING"] == []
    with get_client(sync_client=True) as client:  # stopped mid-run, the schedule is paused all the same
        assert client.read_deployment_by_name(f"slimflow-pipeline/{name}").paused
    assert f"schedule of slimflow-pipeline/{name} paused" in output, output[-3000:]
    (pipeline_run,) = [r for r in runs_of() if r.data.tags.get("prefect_flow_run_id") == str(flow_run.id)
                       and r.data.tags.get("pipeline") == "slimflow"]
    assert pipeline_run.info.status == "FAILED" and "died" in pipeline_run.data.tags["error"]


@pytest.fixture
def small_disk(tmp_path: Path) -> Path:
    """A 64 MiB tmpfs, unmounted afterwards; skipped where mounting is not allowed."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def _fill(mount: Path, leave_bytes: int) -> None:
    stat = os.statvfs(mount)
    free = stat.f_bavail * stat.f_frsize
    fd = os.open(mount / "ballast", os.O_CREAT | os.O_WRONLY)
    try:
        os.posix_fallocate(fd, 0, max(1, free - leave_bytes))
    finally:
        os.close(fd)


@pytest.mark.integration
def test_a_full_disk_is_one_line_naming_the_path_and_loses_no_earlier_output(
    small_disk: Path, prefect_api_url: str, mlflow_uri: str
) -> None:
    root = make_project(small_disk / "project", {**TINY_PARAMS, "train": {**TINY_PARAMS["train"], "epochs": 1}})
    env = {"PREFECT_API_URL": prefect_api_url, "MLFLOW_TRACKING_URI": mlflow_uri}
    done = slimflow(root, "run", "--to", "train", env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    before = {name: digest(root / name) for name in ("data/prepared", "artifacts/model")}
    lock, params = (root / "dvc.lock").read_bytes(), (root / "params.yaml").read_bytes()

    _fill(small_disk, 28 * 1024)  # room for the flow's own small files, not for the variants
    done = slimflow(root, "run", "--to", "compress", env=env, timeout=900)
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-3000:]
    (line,) = [line for line in done.stderr.splitlines() if line.startswith("error: pipeline failed")]
    assert line.startswith(f"error: pipeline failed: compress: {small_disk}")
    assert "no space left on device" in line
    assert "Traceback" not in done.stderr
    assert done.stderr.count("Retry") == 0  # a full disk is not retried: it fails the same way

    (small_disk / "ballast").unlink()
    assert (root / "dvc.lock").read_bytes() == lock and (root / "params.yaml").read_bytes() == params
    assert {name: digest(root / name) for name in before} == before
    status = subprocess.run([str(Path(PYTHON).parent / "dvc"), "status", "prepare", "train"], cwd=root,
                            capture_output=True, text=True, timeout=120)
    assert "up to date" in status.stdout, status.stdout + status.stderr
    assert [r for r in runs_of() if r.info.status == "RUNNING"] == []
    assert not list((root / "artifacts").glob(".compressed-*"))
