"""The project's background Prefect server (flows/prefect_server.py): started once, found by
the next commands, stopped on request or when idle; the temporary server on request.

Real Prefect API servers (what ``prefect server start`` runs) through the ``slimflow`` console script, in a
project of their own (its ``.prefect/``); each test stops what it started.
"""

from __future__ import annotations

import contextlib
import json
import socket
import sqlite3
import time
from pathlib import Path

import httpx
import psutil
import pytest

from flows.prefect_database import DATABASE_URL_SETTINGS, database_template, seed_database
from flows.prefect_server import LOG, free_port, record_path
from tests.conftest import TINY_PARAMS, make_project, run_processes, seconds_until_gone, slimflow

pytestmark = pytest.mark.integration

NO_SERVER: dict[str, str] = {}


@pytest.fixture(autouse=True)
def _no_configured_server(monkeypatch: pytest.MonkeyPatch) -> None:
    """The session's test server (or a user's) must not be what these commands find, and
    each project keeps its own Prefect home (the session's points at the repository's)."""
    for key in ("PREFECT_API_URL", "SLIMFLOW_PREFECT_SERVER", "PREFECT_HOME"):
        monkeypatch.delenv(key, raising=False)


def _heartbeats(url: str, flow_run_id: str, wait_s: float = 20.0) -> list[dict]:
    """The flow run's heartbeat events the server stored (it stores events in batches)."""
    query = {"filter": {"event": {"name": ["prefect.flow-run.heartbeat"]},
                        "any_resource": {"id": [f"prefect.flow-run.{flow_run_id}"]}}, "limit": 50}
    deadline = time.monotonic() + wait_s
    while True:
        events = httpx.post(f"{url}/api/events/filter", json=query, timeout=30).json()["events"]
        if events or time.monotonic() > deadline:
            time.sleep(2.0)  # a second one would be stored with the first
            return httpx.post(f"{url}/api/events/filter", json=query, timeout=30).json()["events"]
        time.sleep(0.5)


def _url(output: str) -> str:
    line = next(line for line in output.splitlines() if line.startswith("Prefect UI: "))
    return line.split()[2]


def test_the_server_is_started_once_found_after_and_stopped_on_request(tmp_path: Path) -> None:
    root = make_project(tmp_path / "project", TINY_PARAMS)
    try:
        with socket.socket() as port_4200:  # taken (here or by another project): the server takes another
            port_4200.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # also while an old server's connections linger
            with contextlib.suppress(OSError):
                port_4200.bind(("127.0.0.1", 4200))
                port_4200.listen()
            first = slimflow(root, "prefect-server", env=NO_SERVER, timeout=240)
        assert first.returncode == 0, first.stdout + first.stderr
        url = _url(first.stdout)
        record = json.loads(record_path(root).read_text())
        assert record["url"] == url and url.startswith("http://127.0.0.1:") and not url.endswith(":4200")
        assert httpx.get(f"{url}/api/health", timeout=10).status_code == 200
        # The UI is served, and sends its browser to this server's API, not to port 4200's.
        page = httpx.get(url, timeout=10)
        assert page.status_code == 200 and "<html" in page.text.lower()
        assert httpx.get(f"{url}/ui-settings", timeout=10).json()["api_url"] == record["api_url"]
        # A run's Ctrl-C stops the run's processes, not the server it started (it outlives runs).
        from flows.cli import _spared

        supervisor = psutil.Process(record["supervisor_pid"])
        assert all(_spared(p) for p in (supervisor, *supervisor.children(recursive=True)))
        assert "stops after 60 idle minutes" in first.stdout
        # A new project's server starts on a copy of the database make install migrated,
        # with Prefect's block types registered (what a server's first start does).
        assert database_template().is_file()
        with contextlib.closing(sqlite3.connect(database_template())) as template:
            assert template.execute("SELECT count(*) FROM block_type").fetchone()[0] > 0
        assert f"a new database: a copy of {database_template()}" in (root / ".prefect" / LOG).read_text()

        started = time.monotonic()
        again = slimflow(root, "prefect-server", env=NO_SERVER, timeout=60)
        assert _url(again.stdout) == url and time.monotonic() - started < 15
        assert json.loads(record_path(root).read_text())["supervisor_pid"] == record["supervisor_pid"]
    finally:
        stopped = slimflow(root, "prefect-server", "--stop", env=NO_SERVER, timeout=60)
    assert stopped.stdout.strip() == "stopped"
    assert not record_path(root).exists() and run_processes(root) == {}
    assert slimflow(root, "prefect-server", "--stop", env=NO_SERVER).stdout.strip() == (
        "no background Prefect server was running"
    )


def _port_left_in_time_wait() -> int:
    """A port whose server has gone, leaving a connection it closed in TIME_WAIT (what a
    stopped server leaves behind when a browser or a run still held a connection)."""
    with socket.socket() as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn's listener
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        accepted, _ = server.accept()
        accepted.close()  # the server's side closes first: its end waits, on the port
        client.close()
    return port


def test_a_server_stopped_and_started_again_keeps_its_port() -> None:
    port = _port_left_in_time_wait()
    with socket.socket() as plain:  # what a probe without SO_REUSEADDR would conclude
        with pytest.raises(OSError):
            plain.bind(("127.0.0.1", port))
    assert free_port(preferred=port) == port
    with socket.socket() as listening:  # a port something listens on is still passed over
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        taken = listening.getsockname()[1]
        assert free_port(preferred=taken) != taken


def test_the_template_seeds_only_a_project_without_a_database(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    template = tmp_path / "prefect-template.db"
    template.write_bytes(b"a migrated database")
    home = tmp_path / "home"
    home.mkdir()
    assert seed_database(home, template)
    assert (home / "prefect.db").read_bytes() == b"a migrated database"
    (home / "prefect.db").write_bytes(b"this project's history")
    assert not seed_database(home, template)  # never over a project's own history
    assert (home / "prefect.db").read_bytes() == b"this project's history"
    other = tmp_path / "other"
    other.mkdir()
    monkeypatch.setenv(DATABASE_URL_SETTINGS[0], "postgresql+asyncpg://prefect@db/prefect")
    assert not seed_database(other, template) and not (other / "prefect.db").exists()
    monkeypatch.delenv(DATABASE_URL_SETTINGS[0])
    assert not seed_database(other, tmp_path / "no-template.db") and not (other / "prefect.db").exists()


def test_an_idle_server_stops_by_itself(tmp_path: Path) -> None:
    root = make_project(tmp_path / "project", TINY_PARAMS)
    env = {**NO_SERVER, "SLIMFLOW_PREFECT_IDLE_MINUTES": "0.05"}  # 3 s
    try:
        started = slimflow(root, "prefect-server", env=env, timeout=240)
        assert started.returncode == 0, started.stdout + started.stderr
        deadline = time.monotonic() + 60
        while record_path(root).exists() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not record_path(root).exists()
        deadline = time.monotonic() + 30
        while run_processes(root) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert run_processes(root) == {}
        assert "idle for 0.05 minutes: stopping" in (root / ".prefect" / "slimflow-server.log").read_text()
    finally:
        slimflow(root, "prefect-server", "--stop", env=NO_SERVER, timeout=60)


def test_a_bad_idle_setting_is_one_line_and_starts_nothing(tmp_path: Path) -> None:
    root = make_project(tmp_path / "project", TINY_PARAMS)
    done = slimflow(root, "prefect-server", env={**NO_SERVER, "SLIMFLOW_PREFECT_IDLE_MINUTES": "soon"}, timeout=60)
    assert done.returncode == 1
    assert done.stderr.strip() == "error: SLIMFLOW_PREFECT_IDLE_MINUTES='soon': expected a number of minutes"
    assert not record_path(root).exists() and run_processes(root) == {}


def test_the_temporary_server_on_request_leaves_no_server_behind(tmp_path: Path, mlflow_uri: str) -> None:
    root = make_project(tmp_path / "project", TINY_PARAMS)
    env = {**NO_SERVER, "SLIMFLOW_PREFECT_SERVER": "temporary", "MLFLOW_TRACKING_URI": mlflow_uri}
    done = slimflow(root, "run", "--to", "prepare", env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "Prefect UI:" not in done.stdout
    assert not record_path(root).exists()
    assert seconds_until_gone(root) < 5, run_processes(root)  # the run's reaper leaves just after it


def test_a_run_that_starts_the_server_sends_its_flow_run_to_it(tmp_path: Path, mlflow_uri: str) -> None:
    """The run imports Prefect while the server starts; Prefect reads its settings once, at
    import, so the server's URL must be set by then. With Prefect's temporary server
    forbidden, a run that missed it fails instead of starting one."""
    root = make_project(tmp_path / "project", TINY_PARAMS)
    env = {**NO_SERVER, "PREFECT_SERVER_EPHEMERAL_ENABLED": "false", "MLFLOW_TRACKING_URI": mlflow_uri}
    try:
        done = slimflow(root, "run", "--to", "prepare", env=env, timeout=600)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
        url = _url(done.stdout)
        assert json.loads(record_path(root).read_text())["url"] == url
        runs = httpx.post(f"{url}/api/flow_runs/filter", json={}, timeout=30).json()
        assert [run["state_type"] for run in runs] == ["COMPLETED"]
        # Its heartbeat (flows.heartbeat): one, not Prefect's and slimflow's both (the run is
        # shorter than the 180 s between two).
        beats = _heartbeats(url, runs[0]["id"])
        assert len(beats) == 1, beats
        assert {r["prefect.resource.role"] for r in beats[0]["related"]} >= {"flow"}
    finally:
        slimflow(root, "prefect-server", "--stop", env=NO_SERVER, timeout=60)
    assert run_processes(root) == {}
