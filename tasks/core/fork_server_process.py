"""What runs in the run's fork server process (:mod:`tasks.core.fork_server` starts it and
hands it its entries): the serving loop, with its preload steps and its successor, and the
child it forks per request, which becomes the process that asked."""

from __future__ import annotations

import atexit
import gc
import logging
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.core.fork_preload import (
    CPU_MODEL_STEP, HANDOVER_STEP, PRELOAD, STORES_STEP, CpuModelProbe, preload_step, start_cpu_model_probe,
)
from tasks.core.fork_protocol import machine_identity, receive_message, send_message

log = logging.getLogger("tasks.core.fork_server")

# The marker file beside the socket by which the run says its MLflow store exists
# (:meth:`tasks.core.fork_server.ForkServer.tracking_ready`); the server opens the stores only then.
TRACKING_READY = "tracking-ready"
# The marker file beside the socket by which the server says it has loaded every step
# (MLflow's stores aside, until the run has made them): an entry that started the server
# may wait for it (tasks.core.dvc_fork_server).
LOADED = "loaded"
# The marker file in which a server generation names the step it is loading (its pid and
# the step): what a stage that gave up waiting for :data:`LOADED` tells the user.
LOADING = "loading"
# The marker file left beside the socket by a process that gave up waiting for the server
# (it did not take it, or did not finish loading, in time): the processes after it run by
# themselves at once instead of each waiting as long again.
STALLED = "stalled"
_in_child = False  # True in a process the server forked: it runs its module, never forwards
_client: int | None = None  # in such a process: the pid of the entry it stands for
_reported = threading.Event()  # in such a process: its status is sent; the entry may go


def in_child() -> bool:
    """Whether this process is one the server forked for an entry."""
    return _in_child


def entry_pid() -> int | None:
    """In a forked child: the pid of the entry it stands for; None elsewhere."""
    return _client if _in_child else None


# ---------------------------------------------------------------- the child


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
    gc.enable()  # off in the server; the server's objects are frozen (_freeze_for_children)
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
    leave(code, conn)


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


def leave(code: int, conn: socket.socket | None = None) -> None:
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
                send_message(conn, {"exit": code})
            except OSError:
                pass
        os._exit(code)


def _watch_client(conn: socket.socket) -> None:
    """Pass on the signals the entry got; kill this child when the entry is gone."""
    while True:
        try:
            message = receive_message(conn)
        except (OSError, ConnectionError, ValueError):
            if not _reported.is_set():
                os.kill(os.getpid(), signal.SIGKILL)
            return
        if "signal" in message:
            os.kill(os.getpid(), int(message["signal"]))


IDLE_CHECK_S = 5.0  # how often an idle server looks whether its run is still there
# A successor asked to stop finishes the step it is in first (an import: 1.1 s at most on
# the 2-core machine, measured); one that has not stopped after this is killed.
SUCCESSOR_GRACE_S = 10.0
# py-cpuinfo's probe answers in 1.2 s here; one that has not answered after this is stopped
# (its subprocess is known to hang on some hosts, and the hand-over waits for it).
CPU_MODEL_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class _WakeUp:
    """The selector's key for the server's wake-up pipe (its read end)."""

    write_fd: int


@dataclass(frozen=True)
class _OwnerGone:
    """The selector's key for the pidfd of the process the server serves (``owner``)."""


@dataclass(frozen=True)
class _Successor:
    """The selector's key for the read end of a successor's ready pipe."""

    pid: int


def serve(path: str, preload: tuple[str, ...] = PRELOAD, owner: int | None = None) -> None:
    """Listen on ``path``; fork a child per request; send each entry its child's status.

    Loads ``preload`` one step at a time, serving the requests that came in between steps.
    At :data:`HANDOVER_STEP` the server forks a *successor* that loads the remaining steps
    while this one goes on serving with what it has; once the successor has loaded them
    all it takes the requests, and this one only waits for its own children.

    The server stops when its parent is gone or, given ``owner`` (a pid), when that process
    is gone: the ``dvc repro`` whose stages it serves (:mod:`tasks.core.dvc_fork_server`).
    """
    owner_fd = os.pidfd_open(owner) if owner is not None else None  # before binding: a dead owner, no server
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)  # entries that connect wait in the backlog until the current step is done
    _serve(listener, Path(path).parent / TRACKING_READY, list(preload), os.getppid(), None, owner_fd)


def _serve(listener: socket.socket, tracking_ready: Path, pending: list[str], parent: int,
           ready_fd: int | None, owner_fd: int | None = None) -> None:
    """One server generation's loop: the first (``ready_fd`` None) accepts requests at once;
    a successor accepts once its steps are loaded, and says so on ``ready_fd``. The
    generation that loads the last step says so beside the socket (:data:`LOADED`). With
    ``owner_fd`` (a pidfd) it serves until that process is gone, else until its parent is."""
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
    if owner_fd is not None:
        selector.register(owner_fd, selectors.EVENT_READ, _OwnerGone())
    stopping = False
    successor: int | None = None
    said_loaded = False

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

    def give_up_on_cpu_model() -> None:
        """A probe that has not answered by its deadline is stopped: the hand-over waits
        for it, and everything after the hand-over with it."""
        log.warning("fork server: py-cpuinfo gave no CPU model within %.0f s; stopped it "
                    "(each stage's energy meter asks for it itself)", CPU_MODEL_TIMEOUT_S)
        selector.unregister(cpu_model.fd)
        cpu_model.close()
        pending.remove(CPU_MODEL_STEP)

    def possible(step: str) -> bool:
        """Steps not yet possible (MLflow's stores before the run made them, the CPU model
        before its probe answered, the hand-over before the CPU model) wait their turn."""
        if step == STORES_STEP:
            return tracking_ready.exists()
        if step == HANDOVER_STEP:
            return CPU_MODEL_STEP not in pending
        return step != CPU_MODEL_STEP or cpu_model is None or cpu_model.finished  # None: the kernel's, if any

    while not stopping:
        if cpu_model is not None and CPU_MODEL_STEP in pending and cpu_model.overdue(CPU_MODEL_TIMEOUT_S):
            give_up_on_cpu_model()
        # Nothing after a hand-over loads here: that is the successor's.
        upto = pending.index(HANDOVER_STEP) + 1 if HANDOVER_STEP in pending else len(pending)
        ready = [step for step in pending[:upto] if possible(step)]
        if STORES_STEP in ready:  # before forking anyone: a stage forked now would open them itself
            pending.remove(STORES_STEP)
            preload_step(STORES_STEP, tracking_ready)
            continue
        # A successor takes over once loaded (MLflow's stores, if still waiting, open later).
        loaded = successor is None and all(step == STORES_STEP for step in pending)
        if not accepting and ready_fd is not None and loaded:
            selector.register(listener, selectors.EVENT_READ, None)
            accepting = True
            _say_ready(ready_fd)
        if loaded and not said_loaded:
            (tracking_ready.parent / LOADED).touch()
            said_loaded = True
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
            elif isinstance(key.data, _OwnerGone):
                stopping = True
            elif not isinstance(key.data, _WakeUp):
                _reap(key, selector)
        if owner_fd is None and os.getppid() != parent:  # the run is gone (and its parent-death signal missed)
            break
        if ready and not stopping:
            step = ready[0]
            pending.remove(step)
            if step == HANDOVER_STEP:
                successor, pending = _fork_successor(listener, selector, tracking_ready, pending)
                continue
            _say_loading(tracking_ready.parent, step)
            preload_step(step, tracking_ready, cpu_model)
            sys.stdout.flush()
            sys.stderr.flush()
    if successor is not None:  # it dies with this one: stop it and wait (it is a child)
        _stop_successor(successor, SUCCESSOR_GRACE_S)
    listener.close()
    if cpu_model is not None:
        cpu_model.close()
    for fd in (wake_read, wake_write, *(() if owner_fd is None else (owner_fd,))):
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
    _freeze_for_children()
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
            leave(0)
    os.close(write_end)
    selector.register(read_end, selectors.EVENT_READ, _Successor(pid))
    return pid, [STORES_STEP] if STORES_STEP in pending else []


def _say_loading(folder: Path, step: str) -> None:
    try:
        (folder / LOADING).write_text(f"{os.getpid()} {step}")
    except OSError:  # the folder is gone: the server is stopping
        pass


def loading_step(folder: Path) -> str:
    """What the server in ``folder`` said it is loading: ``"STEP (process PID)"``; "" if nothing."""
    try:
        pid, step = (folder / LOADING).read_text().split(" ", 1)
    except (OSError, ValueError):
        return ""
    return f"{step} (process {pid})"


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


def _stop_successor(pid: int, grace_s: float) -> None:
    """SIGTERM the successor, SIGKILL it if it is still there after ``grace_s``, reap it.

    A successor stops between two of its steps; one stuck inside a step (an import that
    never returns) would otherwise keep this server waiting for it, and with it the
    output pipe of whoever started the server: a ``dvc repro`` whose caller reads its
    output to the end would never see that end."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return
        if done:
            return
        time.sleep(0.02)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    _reap_quietly(pid)


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
        request = receive_message(conn, fds)
    except (OSError, ConnectionError, ValueError):
        _drop(conn, fds)
        return
    if request.get("machine") != machine_identity():
        _refuse(conn, fds)
        return
    try:  # taken: the entry now waits for its child's status without a deadline
        send_message(conn, {"accepted": True})
    except OSError:  # the entry gave up waiting (it runs by itself) or is gone: no child
        _drop(conn, fds)
        return
    sys.stdout.flush()
    sys.stderr.flush()
    _freeze_for_children()
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


def _drop(conn: socket.socket, fds: list[int]) -> None:
    """Let go of a request that gets no child: its connection and the descriptors it sent."""
    conn.close()
    for fd in fds:
        os.close(fd)


def _freeze_for_children() -> None:
    """Move everything the server has loaded out of the garbage collector's reach
    (``gc.freeze``) before a fork: a child (which turns the collector on again, the server
    runs without it) then walks only the objects it made itself. Without it every stage
    process, ``horovodrun`` and the evaluate stage paid a full collection over the
    server's millions of objects (torch, MLflow, ONNX, matplotlib) soon after it started:
    0.4-1.0 s each, six in a default run (measured with ``gc.callbacks``). The server only
    imports: what it leaves uncollected is the odd reference cycle of an import (15 MB
    for the whole preload, measured), kept for the run's length."""
    gc.freeze()


def _refuse(conn: socket.socket, fds: list[int]) -> None:
    """Tell an entry from another host (or namespace) to run by itself."""
    for fd in fds:
        os.close(fd)
    try:
        send_message(conn, {"refused": True})
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
        # The probe's stdout; a successor's pipe; the pidfd of the process the server serves.
        if isinstance(key.data, (CpuModelProbe, _Successor, _OwnerGone)):
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
        send_message(conn, reply)
    except OSError:  # the entry is gone already
        pass
    conn.close()
