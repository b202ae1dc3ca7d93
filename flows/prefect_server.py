"""The project's own Prefect API server, kept in the background between runs.

Without ``PREFECT_API_URL`` a Prefect flow starts a temporary API server for itself and
stops it at the end: 12-28 s of every ``slimflow run`` on the 2-core machine (plus 5-7 s
importing the server's modules into the CLI), and its UI is gone with the run. Instead,
the first ``slimflow run`` of a project that finds no server starts one in the background
(Prefect's API server and UI as ``prefect server start`` runs them, :mod:`flows.prefect_api`, on
127.0.0.1, port 4200 if free, else a free one; its history
in the project's ``.prefect/``), and the next runs use it at once. It stops by itself
after ``SLIMFLOW_PREFECT_IDLE_MINUTES`` (default 60) without a run, or with
``slimflow prefect-server --stop``. While a run goes on, the CLI marks the server as in
use every minute, so a long run never loses it.

A small supervisor process (``python -m flows.prefect_server ROOT PORT``, in a session of
its own so a run's Ctrl-C or kill does not reach it) owns the server and writes
``.prefect/slimflow-server.json`` (its pid, the server's pid, port and URL) once the
server answers; the file's modification time is the last use.

A new server migrates its new database first; the supervisor copies the migrated one
``make install`` leaves into a project that has none (:mod:`flows.prefect_database`).

``PREFECT_API_URL`` set (a team server, the tests' server) wins, and
``SLIMFLOW_PREFECT_SERVER=temporary`` keeps Prefect's per-run temporary server.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from flows.prefect_api import answers, api_server_command
from flows.prefect_database import database_template, seed_database

RECORD = "slimflow-server.json"  # in PREFECT_HOME (the project's .prefect/)
LOG = "slimflow-server.log"
MODE_ENV = "SLIMFLOW_PREFECT_SERVER"  # background (default) | temporary
IDLE_ENV = "SLIMFLOW_PREFECT_IDLE_MINUTES"
DEFAULT_IDLE_MINUTES = 60.0
PREFERRED_PORT = 4200
START_TIMEOUT_S = 180.0  # a new database on a loaded 2-core machine takes 15-30 s
HEARTBEAT_S = 60.0
CHECK_EVERY_S = 5.0
# While a server starts, the supervisor asks it and the run reads the record this often:
# the run waits for both (at 0.3 s and 0.2 s, 0.25 s on average of a cold run's critical path).
STARTING_CHECK_S = 0.05


class PrefectServerError(RuntimeError):
    """The background Prefect server could not be started."""


def _home(root: Path) -> Path:
    return Path(os.environ.get("PREFECT_HOME", str(root / ".prefect")))


def record_path(root: Path) -> Path:
    return _home(root) / RECORD


def idle_minutes() -> float:
    value = os.environ.get(IDLE_ENV, "")
    try:
        return float(value) if value else DEFAULT_IDLE_MINUTES
    except ValueError:
        raise PrefectServerError(f"{IDLE_ENV}={value!r}: expected a number of minutes") from None


def wanted() -> bool:
    """Whether runs use the background server: no ``PREFECT_API_URL``, and not opted out."""
    mode = os.environ.get(MODE_ENV) or "background"
    if mode not in ("background", "temporary"):
        raise PrefectServerError(f"{MODE_ENV}={mode!r}: expected background or temporary")
    return mode == "background" and not os.environ.get("PREFECT_API_URL")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def running(root: Path) -> dict | None:
    """The record of this project's background server if it is up and answers, else None."""
    try:
        record = json.loads(record_path(root).read_text())
    except (OSError, ValueError):
        return None
    if not (_alive(record.get("supervisor_pid", -1)) and answers(record["url"])):
        return None
    return record


def _owner(record: Path) -> int | None:
    try:
        return json.loads(record.read_text()).get("supervisor_pid")
    except (OSError, ValueError):
        return None


def touch(root: Path) -> None:
    """Mark the server as in use now (the idle clock starts again)."""
    with contextlib.suppress(OSError):
        os.utime(record_path(root))


@contextlib.contextmanager
def _start_lock(root: Path) -> Iterator[None]:
    """Two runs starting at once start one server."""
    home = _home(root)
    home.mkdir(parents=True, exist_ok=True)
    with open(home / "slimflow-server.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def free_port(preferred: int = PREFERRED_PORT) -> int:
    """``preferred`` if nothing listens on it, else a free port. The probe binds as the
    API server does (``SO_REUSEADDR``): connections the last server on the port closed
    linger for up to a minute (TIME_WAIT; FIN_WAIT_2 while a browser still holds one), and
    a plain bind takes them for a user, moving a server stopped and started again to
    another port (and its UI with it)."""
    for port in (preferred, 0):
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return probe.getsockname()[1]
    raise PrefectServerError("no free port on 127.0.0.1")


def _api_url(port: int) -> str:
    return f"http://127.0.0.1:{port}/api"


def ensure(root: Path, timeout_s: float = START_TIMEOUT_S, known: Callable[[str], None] | None = None) -> str:
    """The API URL of this project's background server, started first if none runs.

    ``known`` is called with the URL as soon as it is known: before the wait when a server
    is started (the caller can import Prefect meanwhile; Prefect reads its settings once).
    """
    with _start_lock(root):
        if record := running(root):
            touch(root)
            if known is not None:
                known(record["api_url"])
            return record["api_url"]
        idle_minutes()  # a bad setting is refused here, not by the supervisor later
        record_path(root).unlink(missing_ok=True)
        port = free_port()
        # Not the run's: its token (the server outlives the run), its fork server, an API URL.
        env = {k: v for k, v in os.environ.items()
               if k not in ("SLIMFLOW_RUN_TOKENS", "SLIMFLOW_FORK_SERVER", "PREFECT_API_URL")}
        with open(_home(root) / LOG, "ab") as log:
            # Its own session: the run's Ctrl-C, kill or reaper never reach it (it outlives runs).
            supervisor = subprocess.Popen(
                [sys.executable, "-m", "flows.prefect_server", str(root), str(port)],
                cwd=root, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        if known is not None:
            known(_api_url(port))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if (record := running(root)) is not None:
                return record["api_url"]
            if supervisor.poll() is not None:
                break
            time.sleep(STARTING_CHECK_S)
        with contextlib.suppress(ProcessLookupError):
            os.kill(supervisor.pid, signal.SIGTERM)
        raise PrefectServerError(
            f"the background Prefect server did not answer within {timeout_s:.0f} s (log: {_home(root) / LOG}); "
            f"set {MODE_ENV}=temporary to use Prefect's temporary server instead"
        )


def use(root: Path, start: bool = True, settled: Callable[[], None] | None = None) -> str | None:
    """Point this process's Prefect (``PREFECT_API_URL``) at the project's background server,
    started first if none runs (``start``; else only a running one), unless
    ``PREFECT_API_URL`` is set or the temporary server is asked for; its UI's URL, or None.

    ``settled`` is called once Prefect's settings are final (``PREFECT_API_URL`` set, or
    known to stay as it is), which for a server being started is before it answers.
    """
    def point_at(api_url: str) -> None:
        os.environ["PREFECT_API_URL"] = api_url
        if settled is not None:
            settled()

    if wanted() and start:
        api_url = ensure(root, known=point_at)
    elif wanted() and (record := running(root)):
        api_url = record["api_url"]
        point_at(api_url)
    else:
        api_url = None
        if settled is not None:
            settled()
    return api_url.removesuffix("/api") if api_url else None


def stop(root: Path, timeout_s: float = 30.0) -> bool:
    """Stop this project's background server; False if none was running."""
    try:
        record = json.loads(record_path(root).read_text())
    except (OSError, ValueError):
        return False
    pid = record.get("supervisor_pid", -1)
    if not _alive(pid):
        record_path(root).unlink(missing_ok=True)
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    return True


@contextlib.contextmanager
def in_use(root: Path) -> Iterator[None]:
    """Around a run: the server's idle clock is reset every minute (and at the end)."""
    done = threading.Event()

    def beat() -> None:
        while not done.wait(HEARTBEAT_S):
            touch(root)

    beater = threading.Thread(target=beat, name="prefect-server-heartbeat", daemon=True)
    beater.start()
    try:
        yield
    finally:
        done.set()
        touch(root)


def supervise(root: Path, port: int) -> int:
    """The supervisor: start the server, record it once it answers, stop it when idle."""
    from flows.prefect_settings import use_project_prefect_settings

    use_project_prefect_settings(root)
    if seed_database(_home(root)):
        print(f"a new database: a copy of {database_template()} (migrated by make install)", flush=True)
    server = subprocess.Popen(
        api_server_command(port),
        cwd=root, stdin=subprocess.DEVNULL, start_new_session=True,
    )
    stopping = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, lambda *_: stopping.set())
    url = f"http://127.0.0.1:{port}"
    record = record_path(root)
    idle_s = idle_minutes() * 60
    recorded = False
    try:
        while not stopping.is_set() and server.poll() is None:
            if not recorded:
                if answers(url):
                    payload = {"supervisor_pid": os.getpid(), "server_pid": server.pid, "port": port, "url": url,
                               "api_url": _api_url(port), "started": time.time(), "idle_minutes": idle_s / 60}
                    partial = record.with_name(f".{record.name}.partial")
                    partial.write_text(json.dumps(payload, indent=2) + "\n")
                    partial.replace(record)
                    recorded = True
            elif _owner(record) != os.getpid():
                break  # stopped (the record removed) or replaced by another server
            elif time.time() - record.stat().st_mtime > idle_s:
                print(f"idle for {idle_s / 60:g} minutes: stopping", flush=True)
                break
            stopping.wait(CHECK_EVERY_S if recorded else STARTING_CHECK_S)
    finally:
        if _owner(record) == os.getpid():
            record.unlink(missing_ok=True)
        if server.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
    return 0


if __name__ == "__main__":
    sys.exit(supervise(Path(sys.argv[1]), int(sys.argv[2])))
