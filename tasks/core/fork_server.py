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
The entry waits, passes on the signals it gets (SIGTERM, SIGINT, SIGHUP), and exits with
the child's exit status, so DVC and ``horovodrun`` see what they always saw. If the
entry dies (kill -9, or the parent-death signal of :mod:`tasks.core.processes`), the
child notices the closed connection and kills itself. Without the variable (plain
``dvc repro``, a test, a manual run), or when no server answers, the entry runs as
before, in its own process.

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

``SLIMFLOW_FORK_SERVER=off`` in the environment of ``slimflow run`` keeps the old way:
every process imports for itself.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.core.fork_preload import (
    CPU_MODEL_STEP, HANDOVER_STEP, PRELOAD, STORES_STEP, CpuModelProbe, preload_step, start_cpu_model_probe,
)

log = logging.getLogger(__name__)

ENV = "SLIMFLOW_FORK_SERVER"  # the socket of the run's fork server; "off": do not start one
OFF = "off"
# The marker file beside the socket by which the run says its MLflow store exists
# (:meth:`ForkServer.tracking_ready`); the server opens the stores only then.
TRACKING_READY = "tracking-ready"
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_HEADER = struct.Struct("!I")
_in_child = False  # True in a process the server forked: it runs its module, never forwards
_client: int | None = None  # in such a process: the pid of the entry it stands for
_reported = threading.Event()  # in such a process: its status is sent; the entry may go


# ---------------------------------------------------------------- messages


def _send(sock: socket.socket, message: dict[str, Any], fds: list[int] | None = None) -> None:
    body = json.dumps(message).encode()
    data = _HEADER.pack(len(body)) + body
    if fds:
        socket.send_fds(sock, [data], fds)
    else:
        sock.sendall(data)


def _recv_exact(sock: socket.socket, size: int, fds: list[int] | None = None) -> bytes:
    chunks, got = [], 0
    while got < size:
        if fds is not None and not chunks:
            chunk, received, _, _ = socket.recv_fds(sock, size - got, 3)
            fds.extend(received)
        else:
            chunk = sock.recv(size - got)
        if not chunk:
            raise ConnectionError("connection closed")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _recv(sock: socket.socket, fds: list[int] | None = None) -> dict[str, Any]:
    (size,) = _HEADER.unpack(_recv_exact(sock, _HEADER.size, fds))
    return json.loads(_recv_exact(sock, size))


# ---------------------------------------------------------------- the entry's side


def machine_identity() -> dict[str, Any]:
    """What makes two processes the same host to Horovod: hostname and the network, UTS
    and mount namespaces. A worker ``horovodrun`` starts over SSH on another host of a
    shared filesystem finds the socket too; it must run there, not be forked here."""
    identity: dict[str, Any] = {"hostname": socket.gethostname()}
    for name in ("net", "uts", "mnt"):
        try:
            identity[name] = os.stat(f"/proc/self/ns/{name}").st_ino
        except OSError:
            identity[name] = None
    return identity


def run_forked(module: str) -> None:
    """Become ``python -m module`` in a child of the run's fork server, if there is one.

    Returns at once (the caller runs the module itself) outside a pipeline run, in a
    process the server forked, or when no server answers; otherwise never returns: the
    process exits with the child's status.
    """
    path = os.environ.get(ENV)
    if _in_child or not path or path == OFF:
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
        _send(sock, request, fds=[0, 1, 2])
    except OSError:
        sock.close()
        return

    def forward(signum: int, frame: Any) -> None:
        try:
            _send(sock, {"signal": signum})
        except OSError:
            pass

    previous = {signum: signal.signal(signum, forward) for signum in FORWARDED_SIGNALS}
    try:
        status = _recv(sock)
    except (OSError, ConnectionError, ValueError):
        status = {"exit": 1, "error": "the fork server went away"}
    if status.get("refused"):  # another host that shares the socket's folder: run here
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        sock.close()
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


def client_pid() -> int | None:
    """In a child of the fork server: the pid of the entry process it stands for (which DVC
    or ``horovodrun`` started and waits on); None elsewhere."""
    return _client if _in_child else None


# ---------------------------------------------------------------- the server


def _become(request: dict[str, Any], fds: list[int], conn: socket.socket, inherited: list[int]) -> None:
    """In the forked child: turn into the process that asked, run its module, exit."""
    global _in_child, _client
    _in_child, _client = True, request.get("client_pid")
    for fd in inherited:  # the server's: its socket, the other children's connections and pidfds
        try:
            os.close(fd)
        except OSError:
            pass
    for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD):  # as a new interpreter has them
        signal.signal(signum, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C: KeyboardInterrupt
    for target, fd in zip((0, 1, 2), fds):
        os.dup2(fd, target)
    for fd in fds:
        if fd > 2:
            os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.path[:] = request["path"]
    sys.argv[:] = request["argv"]
    sys.orig_argv = request["orig_argv"]
    _fresh_root_logger()
    threading.Thread(target=_watch_client, args=(conn,), name="fork-client", daemon=True).start()
    code = 0
    try:
        import runpy

        runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
    except SystemExit as exit_:
        code = _exit_code(exit_.code)
    except BaseException:  # noqa: BLE001 - as the interpreter does: the traceback, then status 1
        import traceback

        traceback.print_exc()
        code = 1
    _finish(code, conn)


def _fresh_root_logger() -> None:
    """The root logger as a new interpreter has it, so the module's ``logging.basicConfig``
    takes effect: some imports configure it (``mlflow.pytorch`` calls ``basicConfig`` with
    level ERROR), which a stage that sets up logging before importing them never sees."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.setLevel(logging.WARNING)


def _exit_code(code: Any) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def _finish(code: int, conn: socket.socket | None = None) -> None:
    """Leave as an interpreter leaves: wait for non-daemon threads, run the exit handlers,
    flush; tell the entry the status itself; then ``_exit`` (never the server's own clean-up).

    The entry learns the status from here rather than from the server's reaping: the server
    reaps only between two of its preload steps, and an import step can take a second
    (measured: the prepare stage's entry, and so DVC, waited 0.8 s for the status). Deaths
    by a signal, which never get here, are still reported by the server.
    """
    try:
        threading._shutdown()  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001
        pass
    try:
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001
                pass
        if conn is not None:
            _reported.set()  # the entry leaves once it has the status: not a reason to kill this one
            try:
                _send(conn, {"exit": code})
            except OSError:
                pass
        os._exit(code)


def _watch_client(conn: socket.socket) -> None:
    """Pass on the signals the entry got; kill this child when the entry is gone."""
    while True:
        try:
            message = _recv(conn)
        except (OSError, ConnectionError, ValueError):
            if not _reported.is_set():
                os.kill(os.getpid(), signal.SIGKILL)
            return
        if "signal" in message:
            os.kill(os.getpid(), int(message["signal"]))


IDLE_CHECK_S = 5.0  # how often an idle server looks whether its run is still there


@dataclass(frozen=True)
class _WakeUp:
    """The selector's key for the server's wake-up pipe (its read end)."""

    write_fd: int


@dataclass(frozen=True)
class _Successor:
    """The selector's key for the read end of a successor's ready pipe."""

    pid: int


def serve(path: str, preload: tuple[str, ...] = PRELOAD) -> None:
    """Listen on ``path``; fork a child per request; send each entry its child's status.

    Loads ``preload`` one step at a time, serving the requests that came in between steps.
    At :data:`HANDOVER_STEP` the server forks a *successor* that loads the remaining steps
    while this one goes on serving with what it has; once the successor has loaded them
    all it takes the requests, and this one only waits for its own children.
    """
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)  # entries that connect wait in the backlog until the current step is done
    _serve(listener, Path(path).parent / TRACKING_READY, list(preload), os.getppid(), None)


def _serve(listener: socket.socket, tracking_ready: Path, pending: list[str], parent: int,
           ready_fd: int | None) -> None:
    """One server generation's loop: the first (``ready_fd`` None) accepts requests at once;
    a successor accepts once its steps are loaded, and says so on ``ready_fd``."""
    import selectors

    selector = selectors.DefaultSelector()
    accepting = ready_fd is None
    if accepting:
        selector.register(listener, selectors.EVENT_READ, None)
    # SIGTERM must end a wait at once: select() resumes after a signal handler (PEP 475),
    # so the handler also writes to a pipe the selector watches.
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_write, False)
    selector.register(wake_read, selectors.EVENT_READ, _WakeUp(wake_write))
    stopping = False
    successor: int | None = None

    def stop(signum: int, frame: Any) -> None:
        nonlocal stopping
        stopping = True
        try:
            os.write(wake_write, b"x")
        except OSError:  # the pipe is full: a wake-up is pending already
            pass

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C reaches the run, which stops the server
    cpu_model = start_cpu_model_probe() if CPU_MODEL_STEP in pending else None
    if cpu_model is not None:
        selector.register(cpu_model.fd, selectors.EVENT_READ, cpu_model)
    elif CPU_MODEL_STEP in pending:
        pending.remove(CPU_MODEL_STEP)

    def possible(step: str) -> bool:
        """Steps not yet possible (MLflow's stores before the run made them, the CPU model
        before its probe answered, the hand-over before the CPU model) wait their turn."""
        if step == STORES_STEP:
            return tracking_ready.exists()
        if step == HANDOVER_STEP:
            return CPU_MODEL_STEP not in pending
        return step != CPU_MODEL_STEP or (cpu_model is not None and cpu_model.finished)

    while not stopping:
        # Nothing after a hand-over loads here: that is the successor's.
        upto = pending.index(HANDOVER_STEP) + 1 if HANDOVER_STEP in pending else len(pending)
        ready = [step for step in pending[:upto] if possible(step)]
        if STORES_STEP in ready:  # before forking anyone: a stage forked now would open them itself
            pending.remove(STORES_STEP)
            preload_step(STORES_STEP, tracking_ready)
            continue
        # A successor takes over once loaded (MLflow's stores, if still waiting, open later).
        if not accepting and ready_fd is not None and all(step == STORES_STEP for step in pending):
            selector.register(listener, selectors.EVENT_READ, None)
            accepting = True
            _say_ready(ready_fd)
        for key, _ in selector.select(timeout=0 if ready else (0.2 if pending else IDLE_CHECK_S)):
            if key.data is None:
                _accept(listener, selector)
            elif isinstance(key.data, CpuModelProbe):
                key.data.read()
                if key.data.finished:
                    selector.unregister(key.fd)
            elif isinstance(key.data, _Successor):
                selector.unregister(key.fd)
                took_over = _read_ready(key.fd)
                if took_over and accepting:  # it serves from now on
                    selector.unregister(listener)
                    accepting = False
                elif not took_over:  # it died loading: this one goes on serving
                    log.warning("fork server: the successor died before it was ready")
                    _reap_quietly(key.data.pid)
                    successor = None
            elif not isinstance(key.data, _WakeUp):
                _reap(key, selector)
        if os.getppid() != parent:  # the run is gone (and its parent-death signal missed)
            break
        if ready and not stopping:
            step = ready[0]
            pending.remove(step)
            if step == HANDOVER_STEP:
                successor, pending = _fork_successor(listener, selector, tracking_ready, pending)
                continue
            preload_step(step, tracking_ready, cpu_model)
            sys.stdout.flush()
            sys.stderr.flush()
    if successor is not None:  # it dies with this one: stop it and wait (it is a child)
        try:
            os.kill(successor, signal.SIGTERM)
            os.waitpid(successor, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
    listener.close()
    if cpu_model is not None:
        cpu_model.close()
    for fd in (wake_read, wake_write):
        os.close(fd)


def _fork_successor(listener: socket.socket, selector: Any, tracking_ready: Path,
                    pending: list[str]) -> tuple[int, list[str]]:
    """Fork the successor that loads ``pending``; returns its pid and what this server still
    loads: MLflow's stores, if the run has not made them yet (both then open them)."""
    import selectors

    read_end, write_end = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:  # the successor: this server's listener and nothing else of its state
        os.close(read_end)
        for fd in _server_fds(listener, selector, keep_listener=True):
            try:
                os.close(fd)
            except OSError:
                pass
        from tasks.core.processes import die_with_parent

        die_with_parent()
        try:
            _serve(listener, tracking_ready, pending, parent, write_end)
        finally:
            _finish(0)
    os.close(write_end)
    selector.register(read_end, selectors.EVENT_READ, _Successor(pid))
    return pid, [STORES_STEP] if STORES_STEP in pending else []


def _read_ready(fd: int) -> bool:
    """Whether the successor said it took over (else it died: end of file)."""
    try:
        return os.read(fd, 1) == b"r"
    except OSError:
        return False
    finally:
        os.close(fd)


def _reap_quietly(pid: int) -> None:
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass


def _say_ready(fd: int) -> None:
    try:
        os.write(fd, b"r")
    except OSError:  # the server before it is gone: this one is the run's server now
        pass
    os.close(fd)


def _accept(listener: socket.socket, selector: Any) -> None:
    import selectors

    conn, _ = listener.accept()
    fds: list[int] = []
    try:
        request = _recv(conn, fds)
    except (OSError, ConnectionError, ValueError):
        conn.close()
        for fd in fds:
            os.close(fd)
        return
    if request.get("machine") != machine_identity():
        _refuse(conn, fds)
        return
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        try:
            _become(request, fds, conn, _server_fds(listener, selector))
        finally:
            os._exit(1)
    for fd in fds:
        os.close(fd)
    pidfd = os.pidfd_open(pid)
    selector.register(pidfd, selectors.EVENT_READ, (pid, conn))


def _refuse(conn: socket.socket, fds: list[int]) -> None:
    """Tell an entry from another host (or namespace) to run by itself."""
    for fd in fds:
        os.close(fd)
    try:
        _send(conn, {"refused": True})
    except OSError:
        pass
    conn.close()


def _server_fds(listener: socket.socket, selector: Any, keep_listener: bool = False) -> list[int]:
    """In a child (or a successor, which keeps the listener): the server's descriptors,
    released by their owners (closed by the caller)."""
    fds = []
    for key in list(selector.get_map().values()):
        if key.data is None:
            continue
        if isinstance(key.data, _WakeUp):
            fds += [key.fd, key.data.write_fd]
            continue
        if isinstance(key.data, (CpuModelProbe, _Successor)):  # the probe's stdout; a successor's pipe
            fds.append(key.fd)
            continue
        fds.append(key.fd)  # another child's pidfd
        fds.append(key.data[1].detach())  # another entry's connection
    selector.close()
    if not keep_listener:
        fds.append(listener.detach())
    return fds


def _reap(key: Any, selector: Any) -> None:
    pid, conn = key.data
    selector.unregister(key.fd)
    os.close(key.fd)
    _, status = os.waitpid(pid, 0)
    reply = {"signal": os.WTERMSIG(status)} if os.WIFSIGNALED(status) else {"exit": os.WEXITSTATUS(status)}
    try:
        _send(conn, reply)
    except OSError:  # the entry is gone already
        pass
    conn.close()


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
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(folder / "socket"))
            continue  # a live server
        except OSError:
            pass
        finally:
            probe.close()
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
    deadline = time.monotonic() + 10.0
    while not os.path.exists(path) and server.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)  # bound in milliseconds: before its imports
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
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m tasks.core.fork_server SOCKET_PATH", file=sys.stderr)
        return 2
    from tasks.core.processes import die_with_parent

    die_with_parent()
    # Nothing here may initialize CUDA: a child of a process that did cannot use the GPU.
    # Should an import ask torch whether CUDA is there, NVML answers, not the driver.
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    serve(args[0])
    _finish(0)  # exit handlers, but not the interpreter's slow tear-down of torch and the rest


if __name__ == "__main__":
    # Serve from the module as imported (not this __main__ copy), so that the entries, which
    # import tasks.core.fork_server, see the same state (``_in_child``) in the children.
    from tasks.core.fork_server import main as serve_main

    sys.exit(serve_main())
