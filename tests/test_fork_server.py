"""The run's fork server (tasks.core.fork_server): an entry that finds one becomes a child
of it, with its imports done, and looks to whoever started it exactly like the process it
would have been: same output streams, exit status, signals, working directory and
environment; it dies when the entry dies; without a server it runs by itself."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from tasks.core import fork_server, fork_server_process
from tasks.core.fork_server import ENV, OFF

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.integration

# A module written like the stage entries: it asks for a fork first, then reports what it is.
PROBE = '''
import json, os, sys, time
from tasks.core.fork_server import client_pid, run_forked

if __name__ == "__main__":
    run_forked("probe")
    print(json.dumps({
        "pid": os.getpid(), "ppid": os.getppid(), "argv": sys.argv[1:], "cwd": os.getcwd(),
        "colour": os.environ.get("PROBE_COLOUR"), "torch_loaded": "torch" in sys.modules,
        "client": client_pid(), "main": __name__,
    }), flush=True)
    print("a line on stderr", file=sys.stderr, flush=True)
    command = sys.argv[1] if len(sys.argv) > 1 else "exit0"
    if command == "store":  # how many tracking stores MLflow has cached in this process
        from mlflow.tracking._tracking_service import utils
        print(utils._tracking_store_registry._get_store_with_resolved_uri.cache_info().currsize, flush=True)
        sys.exit(0)
    if command == "log":  # a stage sets up logging as in a new interpreter
        import logging
        logging.basicConfig(level=logging.INFO)
        logging.getLogger("probe").info("an info line")
        print("mlflow.pytorch" in sys.modules, flush=True)
        sys.exit(0)
    if command == "cpu":  # whether CodeCarbon's CPU model is known already, and what it is
        from codecarbon.core.util import detect_cpu_model
        from codecarbon.core import hardware_cache
        known = detect_cpu_model.cache_info().currsize == 1
        print(json.dumps({"known": known, "model": detect_cpu_model() if known else None,
                          "tdp": getattr(hardware_cache._tdp, "model", None)}), flush=True)
        sys.exit(0)
    if command == "packages":  # whether MLflow's module-to-distribution map is built already
        known = "mlflow.utils.requirements_utils" in sys.modules and (
            sys.modules["mlflow.utils.requirements_utils"]._PACKAGES_TO_MODULES is not None)
        print(json.dumps({"known": known}), flush=True)
        sys.exit(0)
    if command == "gc":  # what this process's full collections walk: only its own objects?
        import gc
        frozen = gc.get_freeze_count()
        print(json.dumps({"known": "mlflow" in sys.modules, "frozen": frozen, "enabled": gc.isenabled(),
                          "tracked_after_collect": (gc.collect(), len(gc.get_objects()))[1]}), flush=True)
        sys.exit(0)
    if command == "sleep":
        time.sleep(60)
    if command == "raise":
        raise RuntimeError("the probe failed on purpose")
    sys.exit(int(command.removeprefix("exit")))
'''


# The same, on "another host": what a Horovod worker started over SSH on a host that shares
# the filesystem (and so finds the socket) sends.
ELSEWHERE = """
import json, os, sys
from tasks.core import fork_server

if __name__ == "__main__":
    fork_server.machine_identity = lambda: {"hostname": "another-host", "net": 1, "uts": 1, "mnt": 1}
    fork_server.run_forked("elsewhere")
    print(json.dumps({"pid": os.getpid(), "client": fork_server.client_pid()}), flush=True)
"""


@pytest.fixture(scope="module")
def probe_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("probe")
    (folder / "probe.py").write_text(PROBE)
    (folder / "elsewhere.py").write_text(ELSEWHERE)
    return folder


@pytest.fixture(scope="module")
def server_handle(tmp_path_factory: pytest.TempPathFactory) -> Iterator[fork_server.ForkServer]:
    """One fork server for the module (its imports take a few seconds), as a run starts it."""
    saved = os.environ.pop(ENV, None)
    try:
        with fork_server.fork_server(REPO) as server:
            assert server is not None and os.environ[ENV] == server.socket_path
            yield server
        assert ENV not in os.environ and not Path(server.socket_path).exists()  # stopped and cleaned up after
        assert not psutil.pid_exists(server.pid) or psutil.Process(server.pid).status() == psutil.STATUS_ZOMBIE
    finally:
        if saved is not None:
            os.environ[ENV] = saved


@pytest.fixture()
def server(server_handle: fork_server.ForkServer) -> str:
    return server_handle.socket_path


def _server_pid(path: str) -> int:
    for process in psutil.Process().children():
        try:
            command = process.cmdline()
        except psutil.Error:  # a zombie or a process gone meanwhile (another test's): not the server
            continue
        if "tasks.core.fork_server" in command and path in command:
            return process.pid
    raise AssertionError("no fork server among this process's children")


def _start(probe_dir: Path, socket_path: str | None, *args: str, cwd: Path | None = None,
           **env: str) -> subprocess.Popen[str]:
    environ = {k: v for k, v in os.environ.items() if k != ENV}
    environ["PYTHONPATH"] = os.pathsep.join([str(REPO), str(probe_dir)])
    if socket_path:
        environ[ENV] = socket_path
    environ.update(env)
    return subprocess.Popen([sys.executable, "-m", "probe", *args], cwd=cwd or probe_dir, env=environ,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _report(process: subprocess.Popen[str]) -> dict:
    return json.loads(process.stdout.readline())


def test_an_entry_becomes_a_child_of_the_server_with_its_command_line_and_environment(
    server: str, probe_dir: Path, tmp_path: Path
) -> None:
    entry = _start(probe_dir, server, "exit3", cwd=tmp_path, PROBE_COLOUR="teal")
    out, err = entry.communicate(timeout=60)
    report = json.loads(out)
    assert entry.returncode == 3  # the module's own exit status, as DVC would see it
    assert report["ppid"] == _server_pid(server) and report["pid"] != entry.pid
    assert report["client"] == entry.pid
    assert report["main"] == "__main__" and report["argv"] == ["exit3"]
    assert report["cwd"] == str(tmp_path) and report["colour"] == "teal"
    assert "a line on stderr" in err  # the entry's own streams, handed over


def test_children_start_with_torch_imported_once_the_server_has_loaded_it(server: str, probe_dir: Path) -> None:
    """The server loads step by step, serving requests in between; within its load time
    (a few seconds here) every child finds torch imported already."""
    deadline, loaded = time.monotonic() + 90, False
    while not loaded and time.monotonic() < deadline:
        entry = _start(probe_dir, server, "exit0")
        out, _ = entry.communicate(timeout=60)
        loaded = json.loads(out)["torch_loaded"]
        time.sleep(0.2)
    assert loaded


def test_children_reuse_the_mlflow_store_the_server_opened_once_the_run_said_it_exists(
    server_handle: fork_server.ForkServer, probe_dir: Path, tmp_path: Path
) -> None:
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.MlflowClient(uri).search_experiments()  # the run creates its store (tracking.configure)
    server_handle.tracking_ready(uri)
    deadline, cached = time.monotonic() + 90, 0
    while not cached and time.monotonic() < deadline:
        entry = _start(probe_dir, server_handle.socket_path, "store", MLFLOW_TRACKING_URI=uri)
        out, _ = entry.communicate(timeout=60)
        cached = int(out.splitlines()[1])
        time.sleep(0.2)
    assert cached == 1


def _ask_until_known(probe_dir: Path, server: str, command: str, within_s: float) -> dict[str, Any]:
    """Run the probe's ``command`` in a child until it reports ``known`` (the server loads
    in the background) or ``within_s`` pass; its last report."""
    deadline, report = time.monotonic() + within_s, {"known": False}
    while not report["known"] and time.monotonic() < deadline:
        entry = _start(probe_dir, server, command)
        out, _ = entry.communicate(timeout=60)
        report = json.loads(out.splitlines()[1])
        time.sleep(0.2)
    return report


def test_children_know_the_cpu_model_the_server_found(server: str, probe_dir: Path) -> None:
    """The server finds the CPU model once (from the kernel here, else py-cpuinfo's
    subprocess beside it); children get CodeCarbon's answer without asking, and it is the
    answer py-cpuinfo gives a process by itself."""
    import cpuinfo

    report = _ask_until_known(probe_dir, server, "cpu", within_s=90)
    assert report["known"]
    assert report["model"] == cpuinfo.get_cpu_info().get("brand_raw", "")
    # CodeCarbon's CPU power lookup (its tables and the TDP found in them) is done, too:
    # an energy meter in a child starts without it.
    assert report["tdp"] is not None
    assert not [p for p in psutil.Process(_server_pid(server)).children() if "--json" in _command(p)]  # done and reaped


def test_children_that_log_models_find_mlflows_package_map_built(server: str, probe_dir: Path) -> None:
    """MLflow's module-to-distribution map (what a logged model's requirements are checked
    against) is built once by the server (its successor, after the hand-over), not by the
    first model each stage logs."""
    assert _ask_until_known(probe_dir, server, "packages", within_s=120)["known"]


def test_the_server_forks_from_a_single_thread(server_handle: fork_server.ForkServer, probe_dir: Path) -> None:
    """Every server generation, once it has loaded everything (pyarrow's jemalloc among it),
    is one thread: nothing another thread holds can be locked for ever in a child."""
    loaded = Path(server_handle.socket_path).parent / fork_server_process.LOADED
    deadline = time.monotonic() + 60
    while not loaded.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert loaded.exists()
    # The server and the successor that loaded the rest (it named itself in the last step it began).
    successor = int((loaded.parent / fork_server_process.LOADING).read_text().split()[0])
    generations = [psutil.Process(server_handle.pid), psutil.Process(successor)]
    assert generations[1].ppid() == server_handle.pid
    assert _report(_start(probe_dir, server_handle.socket_path, "exit0"))["torch_loaded"]  # pandas in it too
    for generation in generations:
        threads = [Path(f"/proc/{generation.pid}/task/{task.id}/comm").read_text().strip()
                   for task in generation.threads()]
        assert threads == ["python"], (generation.pid, threads)


def test_children_leave_the_servers_objects_out_of_their_garbage_collections(server: str, probe_dir: Path) -> None:
    """What the server imported is frozen (``gc.freeze``) before it forks: a child's full
    collection walks only what the child made, not the server's millions of objects (which
    cost each stage 0.4-1.0 s in a collection soon after it started)."""
    report = _ask_until_known(probe_dir, server, "gc", within_s=120)  # once MLflow is loaded
    assert report["known"]
    assert report["frozen"] > 100_000  # MLflow and its dependencies alone are more
    assert report["enabled"]  # the server runs without the collector; its children with it
    assert report["tracked_after_collect"] < report["frozen"] / 10


def test_a_child_sets_up_logging_as_a_new_interpreter_would(server: str, probe_dir: Path) -> None:
    """Importing mlflow.pytorch configures the root logger (level ERROR); the server's
    children must not inherit that, or every stage's INFO lines vanish."""
    deadline, loaded = time.monotonic() + 90, False
    while not loaded and time.monotonic() < deadline:
        entry = _start(probe_dir, server, "log")
        out, err = entry.communicate(timeout=60)
        loaded = out.splitlines()[1] == "True"
        assert "INFO:probe:an info line" in err
        time.sleep(0.2)
    assert loaded


def test_an_uncaught_error_prints_its_traceback_and_exits_1(server: str, probe_dir: Path) -> None:
    entry = _start(probe_dir, server, "raise")
    _, err = entry.communicate(timeout=60)
    assert entry.returncode == 1
    assert "RuntimeError: the probe failed on purpose" in err and "Traceback" in err


def test_a_signal_to_the_entry_reaches_the_child_and_the_entry_dies_of_it(server: str, probe_dir: Path) -> None:
    entry = _start(probe_dir, server, "sleep")
    child = psutil.Process(_report(entry)["pid"])
    entry.send_signal(signal.SIGTERM)
    assert entry.wait(timeout=30) == -signal.SIGTERM
    assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE


def test_the_child_dies_with_its_entry(server: str, probe_dir: Path) -> None:
    entry = _start(probe_dir, server, "sleep")
    child = psutil.Process(_report(entry)["pid"])
    entry.kill()  # kill -9: the entry cannot pass anything on
    entry.wait(timeout=30)
    deadline = time.monotonic() + 10
    while child.is_running() and child.status() != psutil.STATUS_ZOMBIE and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE


def test_two_entries_at_once_run_side_by_side(server: str, probe_dir: Path) -> None:
    """Horovod's two workers ask at the same moment."""
    first, second = _start(probe_dir, server, "sleep"), _start(probe_dir, server, "exit0")
    assert second.wait(timeout=60) == 0
    assert first.poll() is None  # still sleeping in its own child
    first.kill()
    first.wait(timeout=30)


def test_without_a_server_the_entry_runs_by_itself(probe_dir: Path, tmp_path: Path) -> None:
    for socket_path in (None, str(tmp_path / "no-such-socket"), OFF):
        entry = _start(probe_dir, socket_path, "exit0")
        out, _ = entry.communicate(timeout=60)
        report = json.loads(out)
        assert entry.returncode == 0 and report["pid"] == entry.pid and report["client"] is None
        assert not report["torch_loaded"]


def test_an_entry_from_another_host_runs_by_itself(server: str, probe_dir: Path) -> None:
    environ = {**os.environ, ENV: server, "PYTHONPATH": os.pathsep.join([str(REPO), str(probe_dir)])}
    entry = subprocess.Popen([sys.executable, "-m", "elsewhere"], cwd=probe_dir, env=environ,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = entry.communicate(timeout=60)
    assert entry.returncode == 0, err
    assert json.loads(out) == {"pid": entry.pid, "client": None}  # not forked: the server refused


def test_a_nested_block_uses_the_running_server_and_leaves_it_running(
    server_handle: fork_server.ForkServer,
) -> None:
    """``slimflow run`` starts the server before it waits for Prefect; the flow enters again."""
    with fork_server.fork_server(REPO) as again:
        assert again is server_handle
    assert os.environ[ENV] == server_handle.socket_path
    assert psutil.Process(server_handle.pid).status() != psutil.STATUS_ZOMBIE


def test_a_dead_servers_folder_is_removed_a_live_ones_kept(server_handle: fork_server.ForkServer, tmp_path: Path) -> None:
    """kill -9 of a run leaves its server's socket folder; the next server start removes it."""
    import socket as sockets

    dead = tmp_path / f"{fork_server.FOLDER_PREFIX}dead"
    dead.mkdir()
    bound = sockets.socket(sockets.AF_UNIX, sockets.SOCK_STREAM)
    bound.bind(str(dead / "socket"))  # bound, then its process died: nothing listens
    bound.close()
    new = tmp_path / f"{fork_server.FOLDER_PREFIX}starting"
    new.mkdir()
    an_hour_ago = time.time() - 3600
    os.utime(dead, (an_hour_ago, an_hour_ago))
    assert fork_server.remove_stale_folders(tmp_path) == [dead]
    assert not dead.exists() and new.exists()
    live = Path(server_handle.socket_path).parent
    os.utime(live, (an_hour_ago, an_hour_ago))  # a live server's folder, however old, stays
    assert live not in fork_server.remove_stale_folders(live.parent) and live.exists()


def test_an_idle_server_stops_as_soon_as_it_is_asked(tmp_path: Path) -> None:
    """The run ends by stopping its server: SIGTERM must not wait for the idle wait's end."""
    path = tmp_path / "socket"
    server = subprocess.Popen([sys.executable, "-c", f"from tasks.core.fork_server_process import serve; serve({str(path)!r}, ())"],
                              cwd=REPO)
    try:
        deadline = time.monotonic() + 30
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.3)  # inside its idle wait (fork_server_process.IDLE_CHECK_S long)
        asked = time.monotonic()
        server.terminate()
        assert server.wait(timeout=fork_server_process.IDLE_CHECK_S * 2) == 0
        assert time.monotonic() - asked < fork_server_process.IDLE_CHECK_S / 2
    finally:
        server.kill()


# Two preload steps for the test below: the first waits for a file, the second takes seconds.
GATE = """
import os, time
while not os.path.exists(os.environ["GATE_FILE"]):
    time.sleep(0.02)
"""
SLOW = "import time; time.sleep(4)"


def test_an_entry_gets_its_childs_status_while_the_server_is_loading(probe_dir: Path, tmp_path: Path) -> None:
    """The server reaps its children only between two preload steps; the entry (and DVC,
    waiting on it) must not wait for the step in progress to learn that its child is done."""
    (tmp_path / "gate_step.py").write_text(GATE)
    (tmp_path / "slow_step.py").write_text(SLOW)
    path, gate = tmp_path / "socket", tmp_path / "go"
    env = {k: v for k, v in os.environ.items() if k != ENV}
    env.update(PYTHONPATH=os.pathsep.join([str(REPO), str(tmp_path)]), GATE_FILE=str(gate))
    server = subprocess.Popen(
        [sys.executable, "-c", f"from tasks.core.fork_server_process import serve; serve({str(path)!r}, ('gate_step', 'slow_step'))"],
        cwd=REPO, env=env)
    try:
        deadline = time.monotonic() + 30
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        entry = _start(probe_dir, str(path), "exit3")  # waits in the backlog while the gate step runs
        time.sleep(0.5)
        opened = time.monotonic()
        gate.touch()  # the gate step ends: the server forks the entry's child, then starts the slow step
        out, _ = entry.communicate(timeout=30)
        assert entry.returncode == 3
        assert _report_line(out)["client"] == entry.pid  # it ran as the server's child
        assert time.monotonic() - opened < 2.5  # not after the slow step's 4 s
    finally:
        server.kill()
        server.wait()


# What the entries of the hand-over tests below report: who forked them, what was loaded.
LOADED = """
import json, os, sys
from tasks.core.fork_server import run_forked

if __name__ == "__main__":
    run_forked("loaded")
    print(json.dumps({"ppid": os.getppid(), "gate": "gate_step" in sys.modules}), flush=True)
"""


# A preload step stuck for good: an import that never returns, deaf to SIGTERM.
STUCK = "import signal, time; signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM}); time.sleep(600)"


def _serve_in_background(tmp_path: Path, preload: tuple[str, ...], setup: str = "",
                         **popen: Any) -> tuple[subprocess.Popen, Path, dict]:
    """A server on ``tmp_path/socket`` loading ``preload``; ``setup``: code run before it serves."""
    for name, text in (("gate_step", GATE), ("loaded", LOADED), ("dying_step", "import os; os._exit(3)"),
                       ("stuck_step", STUCK)):
        (tmp_path / f"{name}.py").write_text(text)
    path = tmp_path / "socket"
    env = {k: v for k, v in os.environ.items() if k != ENV}
    env.update(PYTHONPATH=os.pathsep.join([str(REPO), str(tmp_path)]), GATE_FILE=str(tmp_path / "go"))
    code = f"{setup}\nfrom tasks.core.fork_server_process import serve; serve({str(path)!r}, {preload!r})"
    server = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env, **popen)
    deadline = time.monotonic() + 30
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    return server, path, {**env, ENV: str(path)}


def _ask(env: dict, cwd: Path) -> dict:
    done = subprocess.run([sys.executable, "-m", "loaded"], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_the_server_serves_while_its_successor_loads_the_rest_then_hands_over(tmp_path: Path) -> None:
    """At the hand-over step a successor loads the remaining steps; until it is done the
    server forks requests at once with what it has, then the successor forks them with
    everything loaded; stopping the server stops both."""
    server, _, env = _serve_in_background(tmp_path, ("@handover", "gate_step"))
    try:
        early = _ask(env, tmp_path)  # the successor waits in its gate step: the server answers
        assert early == {"ppid": server.pid, "gate": False}
        (tmp_path / "go").touch()
        deadline, report = time.monotonic() + 30, early
        while report["ppid"] == server.pid and time.monotonic() < deadline:
            time.sleep(0.05)
            report = _ask(env, tmp_path)
        assert report["gate"] and report["ppid"] != server.pid
        successor = psutil.Process(report["ppid"])
        assert successor.ppid() == server.pid
        server.terminate()
        assert server.wait(timeout=10) == 0
        assert not psutil.pid_exists(successor.pid)  # stopped and reaped by the server
    finally:
        server.kill()
        server.wait()


def test_the_server_goes_on_serving_when_its_successor_dies_loading(tmp_path: Path) -> None:
    server, _, env = _serve_in_background(tmp_path, ("@handover", "dying_step"))
    try:
        time.sleep(1.0)  # the successor has died by now
        assert _ask(env, tmp_path)["ppid"] == server.pid
        assert server.poll() is None
        deadline = time.monotonic() + 10  # the asking entry's child may still be on its way out
        while _live_children(server.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _live_children(server.pid)
    finally:
        server.kill()
        server.wait()


def test_a_server_stops_even_when_its_successor_is_stuck_in_a_step(tmp_path: Path) -> None:
    """A successor that never finishes its step is killed after a grace period: the server
    must end (and release the output pipe it shares with whoever started it, DVC's)."""
    setup = "import tasks.core.fork_server_process as f; f.SUCCESSOR_GRACE_S = 1.0"
    server, path, env = _serve_in_background(tmp_path, ("@handover", "stuck_step"), setup)
    try:
        assert _ask(env, tmp_path)["ppid"] == server.pid  # the successor is stuck: the server serves
        loading, deadline = path.parent / fork_server_process.LOADING, time.monotonic() + 10
        while fork_server_process.loading_step(path.parent).split(" ")[:1] != ["stuck_step"]:
            assert time.monotonic() < deadline, "the successor never began its step"
            time.sleep(0.02)
        successor = psutil.Process(int(loading.read_text().split()[0]))  # it named itself
        assert successor.ppid() == server.pid
        server.terminate()
        assert server.wait(timeout=10) == 0
        assert not psutil.pid_exists(successor.pid)
    finally:
        server.kill()
        server.wait()


def test_where_the_kernel_names_no_cpu_model_the_servers_py_cpuinfo_probe_finds_it(
        tmp_path: Path, probe_dir: Path) -> None:
    """On a host whose kernel names no CPU model (many ARM ones), the server runs py-cpuinfo's
    subprocess beside its loading; children then know the model py-cpuinfo gives."""
    import cpuinfo

    setup = ("import tasks.core.fork_preload as p, tasks.core.fork_server_process as f\n"
             "p.cpu_model_from_kernel = f.cpu_model_from_kernel = lambda: None")
    server, path, _ = _serve_in_background(tmp_path, ("codecarbon", "@cpu-model", "@handover", "gate_step"), setup)
    try:
        deadline, probed = time.monotonic() + 10, False
        while not probed and time.monotonic() < deadline:  # the probe is a child while it runs (1.1 s)
            probed = any("--json" in _command(p) for p in psutil.Process(server.pid).children())
            time.sleep(0.02)
        assert probed, "no py-cpuinfo probe was started"
        (tmp_path / "go").touch()
        report = _ask_until_known(probe_dir, str(path), "cpu", within_s=60)
        assert report["known"] and report["model"] == cpuinfo.get_cpu_info().get("brand_raw", "")
        assert report["tdp"] is not None
    finally:
        server.kill()
        server.wait()


def test_a_cpu_model_probe_that_never_answers_is_stopped_and_the_loading_goes_on(tmp_path: Path) -> None:
    """py-cpuinfo's subprocess can hang; the hand-over (and every step after it) waits for
    the CPU model, so the server stops the probe at its deadline, says so, and loads on."""
    setup = ("import sys, tasks.core.fork_server_process as f\n"
             "f.CPU_MODEL_TIMEOUT_S = 1.0\n"
             "f.start_cpu_model_probe = lambda: f.CpuModelProbe([sys.executable, '-c', 'import time; time.sleep(600)', 'cpu-probe'])")
    server, path, env = _serve_in_background(tmp_path, ("@cpu-model", "@handover", "gate_step"), setup,
                                             stderr=subprocess.PIPE, text=True)
    try:
        (tmp_path / "go").touch()
        loaded = path.parent / fork_server_process.LOADED
        deadline = time.monotonic() + 20
        while not loaded.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert loaded.exists(), "the server never finished loading"
        assert _ask(env, tmp_path)["gate"]  # the successor loaded the steps after the hand-over
        assert not [p for p in psutil.Process(server.pid).children(recursive=True) if _command(p)[-1:] == ["cpu-probe"]]
        server.terminate()
        _, err = server.communicate(timeout=10)
        assert "py-cpuinfo gave no CPU model within 1 s" in err
    finally:
        server.kill()
        server.wait()


def test_an_entry_the_server_does_not_take_in_time_runs_by_itself_and_so_do_the_next(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]) -> None:
    """A server stuck in a step must not hold a run for ever: the entry waits for it to be
    taken until a deadline, then runs by itself, says so once, and the entries after it do not
    wait again; the server, once it reads the abandoned request, forks no child for it."""
    server, path, _ = _serve_in_background(tmp_path, ("gate_step",), stdout=subprocess.DEVNULL,
                                           stderr=subprocess.DEVNULL)
    monkeypatch.setattr(fork_server, "ACCEPT_TIMEOUT_S", 1.0)
    monkeypatch.setenv(ENV, str(path))
    handlers = {signum: signal.getsignal(signum) for signum in fork_server.FORWARDED_SIGNALS}
    try:
        deadline = time.monotonic() + 10
        while not (path.parent / fork_server_process.LOADING).exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        started = time.monotonic()
        fork_server.run_forked("loaded")  # returns: this process runs the module itself
        assert time.monotonic() - started >= 1.0
        said = capfd.readouterr().err
        assert "did not take this process in 1 s (last step begun: gate_step (process" in said
        assert {signum: signal.getsignal(signum) for signum in handlers} == handlers
        started = time.monotonic()
        fork_server.run_forked("loaded")  # the next entry: no second wait, no second line
        assert time.monotonic() - started < 0.5 and capfd.readouterr().err == ""
        (tmp_path / "go").touch()  # the step ends; the server reads the abandoned request
        time.sleep(1.0)
        assert server.poll() is None
        assert _live_children(server.pid) == []
    finally:
        server.kill()
        server.wait()


def _command(process: psutil.Process) -> list[str]:
    """A process's command line; [] for one that is gone (a child exiting meanwhile)."""
    try:
        return process.cmdline()
    except psutil.Error:
        return []


def _live_children(pid: int) -> list[psutil.Process]:
    """``pid``'s children that are neither zombies (not yet reaped) nor gone meanwhile."""
    live = []
    for child in psutil.Process(pid).children():
        try:
            if child.status() != psutil.STATUS_ZOMBIE:
                live.append(child)
        except psutil.Error:
            pass
    return live


def _report_line(out: str) -> dict:
    return json.loads(out.splitlines()[0])


def test_off_starts_no_server(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, OFF)
    before = {p.pid for p in psutil.Process().children()}
    with fork_server.fork_server(REPO) as server:
        assert server is None
        assert {p.pid for p in psutil.Process().children()} == before
    assert os.environ[ENV] == OFF


def test_the_collector_is_paused_for_imports_and_on_again_after() -> None:
    """A process's imports run without the garbage collector; after them what they loaded is
    frozen and the collector is on again, also when the block fails; a process that had it
    off keeps it off."""
    import gc

    from tasks.core.processes import CollectorPaused

    assert gc.isenabled()
    try:
        with CollectorPaused() as collector:
            assert not gc.isenabled()
            loaded = [[] for _ in range(1000)]
            collector.done()
            assert gc.isenabled() and gc.get_freeze_count() >= len(loaded)
        gc.unfreeze()
        with pytest.raises(RuntimeError), CollectorPaused():
            raise RuntimeError("an import failed")
        assert gc.isenabled()
        gc.disable()
        with CollectorPaused():
            pass
        assert not gc.isenabled()
    finally:
        gc.unfreeze()
        gc.enable()
