"""The fork server of one ``dvc repro``: its stages and Horovod workers start with their
imports done, as in a ``slimflow run``.

``slimflow run`` starts a fork server (:mod:`tasks.core.fork_server`) and exports its
socket; ``dvc repro`` run by hand had none, and each stage process and each Horovod
worker imported torch, MLflow and ONNX for itself.

So a stage's entry (:func:`run_stage_forked`) under DVC (``DVC_STAGE`` set: DVC sets it
for every stage command) looks for the server of the ``dvc`` process that started it
(its nearest ancestor that is not a shell), by a socket in a folder named after that
process (pid and start time), and starts one if there is none. That server serves every
later stage of the same ``dvc repro`` and stops when the ``dvc`` process is gone (it
watches it through a pidfd, not as its parent: its parent is the first stage's entry),
removing its folder.

The prepare stage, a *light* one (numpy and MLflow), runs by itself when it is the one
that starts the server, which loads torch and the rest meanwhile for the stages after it.
Every other stage becomes the server's child only once the server has loaded everything
(it says so with a file beside its socket): no stage imports what the server is importing
at the same time (two imports of torch on two cores), and the evaluate stage's timing,
reproduced alone (``dvc repro -s evaluate``), never shares the machine with the loading.

Measured on the 2-core machine, the default pipeline in one project copy, the code before
and after, alternating: ``dvc repro -f`` 54.9-56.2 s before (three runs), 36.1-37.3 s after (four);
``dvc repro -f -s compress`` 22.7 -> 16.0 s, ``-s evaluate`` 23.1-23.9 -> 21.8-22.2 s;
``-s prepare`` 2.7 -> 3.1 s (the server loads beside it, for nothing when it runs alone).

``SLIMFLOW_FORK_SERVER=off`` keeps every process importing for itself, under DVC too.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tasks.core import fork_server_process
from tasks.core.fork_server import ENV, FOLDER_PREFIX, ForkServer, answers, bound, give_up_on, run_forked
from tasks.core.processes import ProcessId, die_with_parent

SHELLS = frozenset({"sh", "dash", "bash", "zsh", "ksh", "mksh", "fish"})  # DVC runs a stage's cmd through $SHELL
START_TIMEOUT_S = 10.0  # to the socket: bound before the server imports anything
LOADED_TIMEOUT_S = 60.0  # to the last preload step (5-6 s on the 2-core machine)
_started: subprocess.Popen | None = None


def run_stage_forked(module: str, light: bool = False) -> None:
    """A DVC stage's entry: :func:`~tasks.core.fork_server.run_forked`, with the server of
    the ``dvc repro`` that runs the stage when no run's server is there (see the module).

    ``light``: a stage that imports little runs by itself when it is the one that starts the
    server (the server loads for the stages after it).
    """
    if _wanted():
        path = _server_of(_dvc_process(), light)
        if path is not None:
            die_with_parent()  # as the stage would: killed with DVC, the entry takes its child along
            os.environ[ENV] = path
    run_forked(module)


def _wanted() -> bool:
    return (not os.environ.get(ENV) and bool(os.environ.get("DVC_STAGE")) and sys.platform == "linux"
            and hasattr(os, "pidfd_open") and not fork_server_process.in_child())


def _dvc_process() -> int | None:
    """The nearest ancestor that is not a shell: the ``dvc`` process running this stage."""
    import psutil

    try:
        process = psutil.Process(os.getppid())
        while process.pid > 1 and process.name() in SHELLS:
            process = psutil.Process(process.ppid())
    except (psutil.Error, ValueError):
        return None
    return process.pid if process.pid > 1 else None


def socket_folder(owner: int) -> Path | None:
    """The folder of ``owner``'s server: named after its pid and start time (a pid is
    reused); None when ``owner`` is gone."""
    identity = ProcessId.of(owner)
    if identity is None:
        return None
    return Path(tempfile.gettempdir()) / f"{FOLDER_PREFIX}dvc-{owner}-{identity.started:.2f}"


def _server_of(owner: int | None, light: bool) -> str | None:
    """The socket of ``owner``'s server, started first if none answers, once it has loaded
    everything; None to run here (a light stage that started it, or a server that could
    not start or load)."""
    folder = socket_folder(owner) if owner is not None else None
    if folder is None:
        return None
    path = folder / "socket"
    if (folder / fork_server_process.STALLED).exists():
        return None
    try:
        if answers(path):
            if light:
                return str(path)
        else:
            folder.mkdir(mode=0o700, exist_ok=True)
            if folder.stat().st_uid != os.getuid():  # someone else's folder: not a server to trust
                return None
            path.unlink(missing_ok=True)  # a server that died: its socket would refuse the new one's bind
            for marker in (fork_server_process.LOADED, fork_server_process.TRACKING_READY, fork_server_process.LOADING):
                (folder / marker).unlink(missing_ok=True)
            if not _start(path, owner) or light:
                return None
    except OSError:
        return None
    # Forked before then, a stage would import what the server is importing at the same time.
    deadline = time.monotonic() + LOADED_TIMEOUT_S
    checked = time.monotonic()
    while not (folder / fork_server_process.LOADED).exists():
        if time.monotonic() > deadline:
            give_up_on(path, "the fork server of this dvc repro has not loaded its libraries in "
                       f"{LOADED_TIMEOUT_S:.0f} s", "this stage and the ones after it run in their own processes")
            return None
        if time.monotonic() - checked > 0.5:
            if not answers(path):  # it died loading
                return None
            checked = time.monotonic()
        time.sleep(0.02)
    return str(path)


def _start(path: Path, owner: int) -> bool:
    """Start ``owner``'s server on ``path`` (False: it did not bind its socket); tell it
    MLflow's store exists when it does."""
    from tasks.core.tracking import default_tracking_uri, sqlite_path

    root = Path(os.environ.get("DVC_ROOT") or os.getcwd())
    env = {k: v for k, v in os.environ.items() if k != ENV}
    # Its own session: a Ctrl-C or a stop of the job reaches DVC and the stage, not the
    # server, which ends when DVC does (its output stays this stage's, DVC's).
    server = subprocess.Popen(
        [sys.executable, "-m", "tasks.core.fork_server", str(path), str(owner)],
        cwd=root, env=env, stdin=subprocess.DEVNULL, start_new_session=True,
    )
    if not bound(path, server, START_TIMEOUT_S):
        server.kill()  # no stage will use it
        server.wait()
        return False
    # MLflow's stores are opened in the server only for a SQLite store that a run has
    # opened before: two processes must not make an MLflow database (its tables, or the
    # Default experiment of a new copy) at once (tasks.core.fork_preload).
    uri = os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(root)
    database = sqlite_path(uri)
    if database is not None and database.is_file():
        ForkServer(str(path), server.pid).tracking_ready(uri)
    global _started
    _started = server  # left running: it serves the stages after this one, and ends with DVC
    return True
