"""A run owns its process tree: whatever it starts dies with it, however it dies.

``kill -9`` of a run, the OOM killer or a closed laptop give the run no chance to stop
what it started, so the clean-up cannot live in the run itself. Two mechanisms, because
neither alone reaches every process:

1. **A run token and a reaper.** :func:`own_process_tree` adds a token of its own to
   ``SLIMFLOW_RUN_TOKENS`` in this process's environment, which every process started
   afterwards inherits: DVC's stage commands, ``horovodrun``, Horovod's middlemen and
   workers, Prefect's temporary API server, the flow-run processes of ``slimflow
   serve``. It then starts a *reaper* (``python -m tasks.core.processes reap``), a small
   process in a session of its own (so the terminal's Ctrl-C and hang-up do not reach
   it) that sleeps until the kernel reports the owner's death (a pidfd) and then
   SIGKILLs every process whose environment carries the token. The environment
   survives what a process tree does not: re-parenting to init, ``setsid`` (Horovod's
   middleman calls it), a new session (Prefect's runner starts flow runs in one).
2. **A parent-death signal** (Linux ``prctl(PR_SET_PDEATHSIG, SIGKILL)``) on the
   processes slimflow starts itself: each stage entry sets it first thing
   (:func:`die_with_parent`; DVC runs ``$SHELL -c CMD``, which execs CMD, so a stage's
   parent is the process that runs DVC) and the launcher sets it on ``horovodrun``
   (:func:`parent_death_preexec`). The kernel kills them the moment the parent goes,
   even when the reaper is gone too.

The pipeline lock (:mod:`tasks.core.lock`) records its owner's token; the next run
that finds the owner dead kills whatever still carries that token, a third line of
defence. Process groups are not used: Horovod's middleman leaves the group (``setsid``).
"""

from __future__ import annotations

import ctypes
import gc
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn

log = logging.getLogger(__name__)

TOKENS_ENV = "SLIMFLOW_RUN_TOKENS"  # space-separated: the tokens of every owning run above a process
_PR_SET_PDEATHSIG = 1
_owned: tuple[int, str] | None = None  # (pid, token) of this process's own tree, once owned


@dataclass(frozen=True)
class ProcessId:
    """A process as the kernel names it: a pid alone can be reused, pid + start time cannot."""

    pid: int
    started: float  # seconds since the epoch, as psutil's create_time()

    @classmethod
    def current(cls) -> ProcessId:
        return cls.of(os.getpid()) or cls(os.getpid(), 0.0)

    @classmethod
    def of(cls, pid: int) -> ProcessId | None:
        """The process ``pid`` now, or None if there is none."""
        import psutil

        try:
            return cls(pid, psutil.Process(pid).create_time())
        except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
            return None

    def alive(self) -> bool:
        """Whether this very process still runs (not a zombie, not another one with its pid)."""
        import psutil

        try:
            process = psutil.Process(self.pid)
            same = abs(process.create_time() - self.started) < 0.05 if self.started else True
            return same and process.status() != psutil.STATUS_ZOMBIE
        except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
            return False


def exit_process(code: Any = 0) -> NoReturn:
    """``sys.exit(code)`` for an entry point that is done. The exit handlers run as usual,
    but the interpreter's last garbage collection leaves alone what is alive now
    (``gc.freeze``): walking the objects of torch, MLflow and Prefect took 0.6-0.9 s at
    the end of each such process (measured), for memory the OS takes back anyway."""
    gc.freeze()
    sys.exit(code)


class CollectorPaused:
    """The garbage collector off while a process imports its libraries; then what they
    loaded frozen and the collector on again (:meth:`done`, or at the latest on leaving
    the block).

    Imports leave almost no garbage, but each full collection walks every object loaded
    so far: importing what the run's fork server preloads ran 8 full collections, 1.1-1.3 s
    of 4.8-5.4 s (3.5-4.0 s without them, 15 MB more resident; measured). Frozen
    (``gc.freeze``), the loaded objects are also left out of every later collection."""

    def __enter__(self) -> CollectorPaused:
        self._was_enabled, self._paused = gc.isenabled(), True
        gc.disable()
        return self

    def done(self) -> None:
        if self._paused:
            self._paused = False
            gc.freeze()
            if self._was_enabled:
                gc.enable()

    def __exit__(self, *exc_info: Any) -> None:
        self.done()


# ---------------------------------------------------------------- parent-death signal


def _prctl() -> Callable[..., int] | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):  # not Linux
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    return prctl


def die_with_parent() -> bool:
    """Have the kernel SIGKILL this process when its parent dies (Linux; False elsewhere).

    If the parent died before the signal was armed the process exits at once: it was
    re-parented already and no signal would ever come.
    """
    prctl = _prctl()
    if prctl is None:
        return False
    parent = os.getppid()
    if prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return False
    if os.getppid() != parent:
        os._exit(128 + signal.SIGKILL)
    return True


def parent_death_preexec() -> Callable[[], None] | None:
    """A ``preexec_fn`` for ``subprocess.Popen``: the child dies with this process.

    Everything is resolved before the fork, so the child runs two C calls, no imports.
    """
    prctl = _prctl()
    if prctl is None:
        return None
    parent = os.getpid()
    getppid, exit_now = os.getppid, os._exit

    def arm() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if getppid() != parent:  # the parent died during the fork: no signal would come
            exit_now(128 + signal.SIGKILL)

    return arm


# ---------------------------------------------------------------- run token and reaper


def tokens(environ: dict[str, str] | None = None) -> list[str]:
    return ((os.environ if environ is None else environ).get(TOKENS_ENV) or "").split()


def own_process_tree() -> str:
    """Mark every process this one starts from now on with a token of its own, and start
    the reaper that kills them when this process dies; returns the token (once per process)."""
    global _owned
    if _owned is not None and _owned[0] == os.getpid():
        return _owned[1]
    token = f"{os.getpid()}-{secrets.token_hex(6)}"
    os.environ[TOKENS_ENV] = " ".join([*tokens(), token])
    _owned = (os.getpid(), token)
    _start_reaper(ProcessId.current(), token)
    return token


def is_reaper(cmdline: list[str]) -> bool:
    """Whether a process with this command line is a reaper (to be left alone by those who
    stop a run's children: it has to outlive the run)."""
    return "tasks.core.processes" in cmdline and "reap" in cmdline


def owned_token() -> str | None:
    """The token of this process's own tree, if :func:`own_process_tree` ran here."""
    return _owned[1] if _owned is not None and _owned[0] == os.getpid() else None


def _start_reaper(owner: ProcessId, token: str) -> None:
    from tasks.core.paths import CODE_ROOT, code_on_path

    env = code_on_path({k: v for k, v in os.environ.items() if k != TOKENS_ENV})  # the reaper is no prey
    root = str(CODE_ROOT)
    try:
        subprocess.Popen(
            [sys.executable, "-m", "tasks.core.processes", "reap", str(owner.pid), repr(owner.started), token],
            env=env, cwd=root, start_new_session=True, close_fds=True,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
    except OSError as err:  # the lock's takeover and the parent-death signals still clean up
        log.warning("could not start the reaper of this run's processes: %s", err)


def marked_processes(token: str) -> list[int]:
    """The pids of the processes whose environment carries ``token`` (not this process)."""
    needle = token.encode()
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry.name}/environ", "rb") as handle:
                environ = handle.read()
        except OSError:  # gone, or not ours to read
            continue
        for variable in environ.split(b"\0"):
            if variable.startswith(TOKENS_ENV.encode() + b"=") and needle in variable.split(b"=", 1)[1].split():
                found.append(int(entry.name))
                break
    return found


def kill_marked(token: str, rounds: int = 20) -> int:
    """SIGKILL every process carrying ``token``, again until none is left (a process may
    start a child between a scan and its kill); returns how many were killed."""
    killed: set[int] = set()
    for _ in range(rounds):
        pids = [pid for pid in marked_processes(token) if pid not in killed or is_running(pid)]
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(0.05)
    return len(killed)


def stop_process(process: subprocess.Popen[Any], grace_s: float) -> int:
    """SIGTERM ``process``; SIGKILL it if it is still there after ``grace_s``; its exit status."""
    process.terminate()
    try:
        wait_promptly(process, grace_s)
    except subprocess.TimeoutExpired:
        process.kill()
    return process.wait()


def wait_promptly(process: subprocess.Popen[Any], timeout_s: float) -> None:
    """``process.wait(timeout_s)`` that returns as the process ends (its pidfd becomes
    readable), not at the next of ``Popen.wait``'s polls, which back off to 50 ms apart: the
    end of a run waited 0.115 s that way for a fork server that stops in 0.07 s (measured).
    Raises :class:`subprocess.TimeoutExpired` as ``Popen.wait`` does; leaves the reaping to it."""
    import select

    try:
        fd = os.pidfd_open(process.pid)
    except (AttributeError, OSError):  # reaped already, or no pidfd (Linux < 5.3)
        process.wait(timeout=timeout_s)
        return
    try:
        if not select.select([fd], [], [], timeout_s)[0]:
            raise subprocess.TimeoutExpired(process.args, timeout_s)
    finally:
        os.close(fd)


def is_running(pid: int) -> bool:
    """Whether process ``pid`` exists on this host and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            return b") Z " not in handle.read()  # a zombie is dead already
    except OSError:
        return False


def wait_for_death(owner: ProcessId) -> None:
    """Block until ``owner`` has exited (woken by the kernel through a pidfd where possible)."""
    import select

    try:
        fd = os.pidfd_open(owner.pid)
    except (AttributeError, OSError):
        fd = None
    if fd is not None and owner.alive():  # the pidfd refers to the owner, not a reused pid
        select.select([fd], [], [])
        os.close(fd)
        return
    while owner.alive():
        time.sleep(0.2)


def reap(argv: list[str]) -> int:
    """``python -m tasks.core.processes reap PID STARTED TOKEN``: wait, then kill the tree."""
    pid, started, token = int(argv[0]), float(argv[1]), argv[2]
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    wait_for_death(ProcessId(pid, started))
    kill_marked(token)
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["reap"]:
        sys.exit(reap(sys.argv[2:]))
    print("usage: python -m tasks.core.processes reap PID STARTED TOKEN", file=sys.stderr)
    sys.exit(2)
