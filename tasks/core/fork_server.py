"""A run's fork server: stage and worker processes that start with their imports done.

Every stage is its own process (DVC runs ``python -m tasks.<stage>``), and so is every
Horovod worker (and ``horovodrun``). Each used to spend 2-4 s importing torch, MLflow,
ONNX and scikit-learn and checking the MLflow database's schema before its first line of
work: about 20 s of a 90 s default run on two cores. A pipeline run now starts one *fork server* first
(``python -m tasks.core.fork_server SOCKET``): it imports all of that once, opens the
MLflow stores once, and waits.

The processes themselves do not change: DVC still starts ``python -m tasks.train``, and
``horovodrun`` still starts ``python -m tasks.training.worker``. Each entry's first act
is :func:`run_forked`: when ``SLIMFLOW_FORK_SERVER`` names a server, the process hands it
its command line, working directory, environment, ``sys.path`` and its stdin, stdout and
stderr (the descriptors themselves), and the server forks a child that becomes that
process (``runpy``, as ``python -m`` runs a module) with everything already imported.
The entry waits (for the server to take it, :data:`ACCEPT_TIMEOUT_S` at most, then for the
child), passes on the signals it gets (SIGTERM, SIGINT, SIGHUP), and exits with the child's
exit status, so DVC and ``horovodrun`` see what they always saw. If the
entry dies (kill -9, or the parent-death signal of :mod:`tasks.core.processes`), the
child notices the closed connection and kills itself. Without the variable (a test, a
manual run), or when no server answers, the entry runs as before, in its own process.
Under a plain ``dvc repro`` a stage's entry finds or starts the server of that
reproduction first (:mod:`tasks.core.dvc_fork_server`), which ends with DVC.

The server never runs torch, ONNX Runtime or SQL work itself, and has one Python thread
when it forks (OpenMP's pool, CUDA and SQLite connections do not survive a fork; none
exists in it). It serves one pipeline run and dies with it: it carries the run's token
and parent-death signal, and the run (``slimflow run``, or the flow) stops it at the end.
Workers ``horovodrun`` starts on other hosts are refused and start there by themselves.

The server loads its imports one step at a time and forks between steps: an import in
progress cannot be interrupted. So that the train stage's processes need not wait for the
compress and evaluate stages' libraries, the server forks a *successor* at the hand-over
step (:data:`~tasks.core.fork_preload.HANDOVER_STEP`), which loads the rest while the
server goes on forking with what it has; once loaded, the successor takes the requests
(the same listening socket) and the server only waits for its own children. The run stops
the server, which stops its successor.

This module is the entries' side (:func:`run_forked`) and the run's (:func:`fork_server`);
what runs in the server's process, its loop and the children it forks, is
:mod:`tasks.core.fork_server_process`, and their messages :mod:`tasks.core.fork_protocol`.

``SLIMFLOW_FORK_SERVER=off`` in the environment of ``slimflow run`` keeps the old way:
every process imports for itself.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.core import fork_server_process
from tasks.core.fork_protocol import machine_identity, receive_message, send_message
from tasks.core.fork_server_process import TRACKING_READY

log = logging.getLogger(__name__)

ENV = "SLIMFLOW_FORK_SERVER"  # the socket of the run's fork server; "off": do not start one
OFF = "off"
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
# How long an entry waits for the server to take it: the step the server is loading ends
# first (1.1 s at most on the 2-core machine, measured); a server stuck in a step must not
# hold the run for ever: the entry then runs by itself, as without a server.
ACCEPT_TIMEOUT_S = 60.0


# ---------------------------------------------------------------- the entry's side


def run_forked(module: str) -> None:
    """Become ``python -m module`` in a child of the run's fork server, if there is one.

    Returns at once (the caller runs the module itself) outside a pipeline run, in a
    process the server forked, or when no server answers; otherwise never returns: the
    process exits with the child's status.
    """
    path = os.environ.get(ENV)
    if fork_server_process.in_child() or not path or path == OFF:
        return
    if (Path(path).parent / fork_server_process.STALLED).exists():  # a process before waited in vain
        return
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError:  # the run ended, or this process is on another host: run here
        sock.close()
        return
    request = {
        "module": module, "argv": sys.argv, "orig_argv": getattr(sys, "orig_argv", sys.argv),
        "cwd": os.getcwd(), "env": dict(os.environ), "path": sys.path, "client_pid": os.getpid(),
        "machine": machine_identity(),
    }
    try:
        send_message(sock, request, fds=[0, 1, 2])
    except OSError:
        sock.close()
        return

    forwarded: list[int] = []

    def forward(signum: int, frame: Any) -> None:
        forwarded.append(signum)
        try:
            send_message(sock, {"signal": signum})
        except OSError:
            pass

    previous = {signum: signal.signal(signum, forward) for signum in FORWARDED_SIGNALS}
    try:
        sock.settimeout(ACCEPT_TIMEOUT_S)
        status = receive_message(sock)
        sock.settimeout(None)
        if status.get("accepted"):
            status = receive_message(sock)
    except TimeoutError:
        status = {"stalled": True}
    except (OSError, ConnectionError, ValueError):
        status = {"exit": 1, "error": "the fork server went away"}
    if status.get("refused") or status.get("stalled"):  # another host that shares the socket's folder; a stuck server
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        sock.close()  # a server that reads the request later finds no one to fork for
        if status.get("stalled"):
            give_up_on(Path(path), f"the fork server did not take this process in {ACCEPT_TIMEOUT_S:.0f} s",
                       "it and the processes after it run by themselves")
        if forwarded:  # a signal that came while waiting is this process's own again
            os.kill(os.getpid(), forwarded[0])
        return
    sys.stdout.flush()
    sys.stderr.flush()
    if "signal" in status:  # die as the child died, so the parent sees the same status
        signum = int(status["signal"])
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
    if status.get("error"):
        print(f"slimflow: {status['error']}", file=sys.stderr)
    os._exit(int(status.get("exit", 1)))


def give_up_on(path: Path, what: str, then: str) -> None:
    """Say once that the server at ``path`` let this process wait too long (``what``, then
    the server's last step, then ``then``), and leave the marker by which the processes
    after it run by themselves at once (also :mod:`tasks.core.dvc_fork_server`'s)."""
    step = fork_server_process.loading_step(path.parent)
    print(f"slimflow: {what}{f' (last step begun: {step})' if step else ''}; {then} ({path})",
          file=sys.stderr, flush=True)
    try:
        (path.parent / fork_server_process.STALLED).touch()
    except OSError:
        pass


def client_pid() -> int | None:
    """In a child of the fork server: the pid of the entry process it stands for (which DVC
    or ``horovodrun`` started and waits on); None elsewhere."""
    return fork_server_process.entry_pid()


# ---------------------------------------------------------------- the run's side


@dataclass(frozen=True)
class ForkServer:
    """A running fork server, as the run that started it sees it."""

    socket_path: str
    pid: int

    def tracking_ready(self, uri: str) -> None:
        """Say the run's MLflow store at ``uri`` exists: the server opens it for its children."""
        marker = Path(self.socket_path).parent / TRACKING_READY
        partial = marker.with_suffix(".partial")
        partial.write_text(uri)
        partial.replace(marker)


ANSWER_TIMEOUT_S = 2.0


def answers(path: Path) -> bool:
    """Whether a server listens on the socket ``path`` (and has room in its backlog: a
    blocking connect to a server that has stopped accepting would wait for ever)."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(ANSWER_TIMEOUT_S)
    try:
        probe.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        probe.close()


def bound(path: Path, server: subprocess.Popen, timeout_s: float) -> bool:
    """Wait until the starting ``server`` has bound its socket ``path``; False if it exited
    or ``timeout_s`` passed first."""
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if server.poll() is not None or time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


FOLDER_PREFIX = "slimflow-fork-"  # the socket's folder, in the temporary directory
STALE_AFTER_S = 60.0


def remove_stale_folders(parent: Path, older_than_s: float = STALE_AFTER_S) -> list[Path]:
    """Remove the socket folders of fork servers that are gone (a run killed with -9 leaves
    its folder): nothing listens on the socket, and the folder is not new (a server that
    is starting has not bound its socket yet). Returns what was removed."""
    import shutil

    removed = []
    for folder in parent.glob(f"{FOLDER_PREFIX}*"):
        try:
            if not folder.is_dir() or time.time() - folder.stat().st_mtime < older_than_s:
                continue
        except OSError:
            continue
        if answers(folder / "socket"):
            continue  # a live server
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed


_started: tuple[int, ForkServer] | None = None  # (pid, server) of the one this process runs


@contextmanager
def fork_server(root: Path) -> Iterator[ForkServer | None]:
    """Start the run's fork server for the processes started inside the block (exported as
    ``SLIMFLOW_FORK_SERVER``); stop it after. Yields it, or None when
    ``SLIMFLOW_FORK_SERVER=off`` or it could not start (processes then import for themselves).

    Inside a block of its own (``slimflow run`` starts the server before it waits for
    Prefect, so the imports overlap that wait; the flow then enters again), the running
    server is yielded and left running."""
    global _started
    import shutil
    import tempfile

    from tasks.core.processes import parent_death_preexec, stop_process

    previous = os.environ.get(ENV)
    if previous == OFF or sys.platform != "linux":
        yield None
        return
    if _started is not None and _started[0] == os.getpid() and previous == _started[1].socket_path:
        yield _started[1]
        return
    remove_stale_folders(Path(tempfile.gettempdir()))
    folder = Path(tempfile.mkdtemp(prefix=FOLDER_PREFIX))  # short: a socket path has 107 bytes at most
    path = str(folder / "socket")
    env = {k: v for k, v in os.environ.items() if k != ENV}
    try:
        server = subprocess.Popen(
            [sys.executable, "-m", "tasks.core.fork_server", path], cwd=root, env=env,
            stdin=subprocess.DEVNULL, preexec_fn=parent_death_preexec(),
        )
    except OSError as err:
        log.warning("fork server not started (%s): every process imports for itself", err)
        shutil.rmtree(folder, ignore_errors=True)
        yield None
        return
    bound(Path(path), server, 10.0)  # in milliseconds: before its imports
    os.environ[ENV] = path
    _started = (os.getpid(), ForkServer(path, server.pid))
    try:
        yield _started[1]
    finally:
        _started = None
        if previous is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = previous
        stop_process(server, grace_s=10)
        shutil.rmtree(folder, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    """``python -m tasks.core.fork_server SOCKET_PATH [OWNER_PID]``: serve until the parent
    (the run) is gone, or with ``OWNER_PID`` until that process (a ``dvc repro``) is gone,
    then remove the socket's folder (:mod:`tasks.core.dvc_fork_server`)."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) not in (1, 2) or (len(args) == 2 and not args[1].isdigit()):
        print("usage: python -m tasks.core.fork_server SOCKET_PATH [OWNER_PID]", file=sys.stderr)
        return 2
    import gc

    from tasks.core.processes import die_with_parent
    from tasks.core.telemetry import turn_off_telemetry

    # The server only imports and forks: no collection, ever (each would walk everything
    # loaded so far: 1.1-1.3 s of the preload's 4.8-5.4 s, measured). Before each fork it
    # freezes what it loaded, and the child collects again (fork_server_process).
    gc.disable()
    owner = int(args[1]) if len(args) == 2 else None
    if owner is None:
        die_with_parent()
    # Nothing here may initialize CUDA: a child of a process that did cannot use the GPU.
    # Should an import ask torch whether CUDA is there, NVML answers, not the driver.
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    # Fork from one thread only: a fork copies the forking thread alone, and a lock another
    # thread held at that moment stays locked in the child for ever. pyarrow (which pandas and
    # MLflow import) brings jemalloc, built to start a purging thread when it loads
    # (``background_thread:true``; jemalloc's fork handlers cover it, but jemalloc has had
    # rare deadlocks after a fork); without it jemalloc purges as it allocates. Read when
    # pyarrow loads, so set before any import; children inherit the allocator as it is.
    os.environ.setdefault("JE_ARROW_MALLOC_CONF", "background_thread:false")
    # It loads MLflow and ONNX Runtime; the first stage of a `dvc repro` starts it before the
    # stage turns their telemetry off.
    turn_off_telemetry()
    try:
        fork_server_process.serve(args[0], owner=owner)
    finally:
        if owner is not None:  # its folder is its own: the entry that started it is long gone
            import shutil

            shutil.rmtree(Path(args[0]).parent, ignore_errors=True)
    fork_server_process.leave(0)  # exit handlers, but not the interpreter's slow tear-down of torch and the rest


if __name__ == "__main__":
    # Serve from the module as imported (not this __main__ copy), as the entries import it.
    from tasks.core.fork_server import main as serve_main

    sys.exit(serve_main())
