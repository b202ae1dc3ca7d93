"""The project's pipeline lock: one run at a time, waiting runs served in order, a dead
owner detected.

The lock is an ``flock`` (``.slimflow/pipeline.lock``), which the kernel releases when
its holder dies, however it dies. Beside it:

- ``.slimflow/pipeline.owner`` (JSON) names the holder: pid, start time, host, command,
  since when, and the token of its process tree (:mod:`tasks.core.processes`). A run
  that gets the lock and still finds an owner file knows the last owner died holding
  it: it says so, and kills whatever still carries the dead owner's token.
- ``.slimflow/queue/`` holds one ticket per waiting run, named by the time the run was
  scheduled. Only the first live ticket may take the lock, so waiting runs start in the
  order they were scheduled; tickets of dead waiters are dropped.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from tasks.core.processes import ProcessId, kill_marked, owned_token

log = logging.getLogger(__name__)

POLL_S = 0.25


class PipelineBusy(RuntimeError):
    """Another pipeline run holds the project lock."""


@dataclass(frozen=True)
class Holder:
    """Who holds (or held, or waits for) the lock."""

    pid: int
    started: float
    host: str = field(default_factory=socket.gethostname)
    command: str = ""
    since: float = field(default_factory=time.time)
    token: str | None = None

    @classmethod
    def me(cls) -> Holder:
        me = ProcessId.current()
        command = " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]])[:200] if sys.argv else ""
        return cls(pid=me.pid, started=me.started, command=command, token=owned_token())

    @classmethod
    def read(cls, path: Path) -> Holder | None:
        try:
            data = json.loads(path.read_text())
            return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})
        except (OSError, ValueError, TypeError, KeyError):
            return None

    def write(self, path: Path) -> None:
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(asdict(self)))
        os.replace(tmp, path)

    def alive(self) -> bool:
        """Whether it still runs; one on another host (a shared folder) is taken to."""
        return self.host != socket.gethostname() or ProcessId(self.pid, self.started).alive()

    def describe(self) -> str:
        since = datetime.fromtimestamp(self.since).strftime("%Y-%m-%d %H:%M:%S")
        what = f", `{self.command}`" if self.command else ""
        where = "" if self.host == socket.gethostname() else f" on {self.host}"
        return f"pid {self.pid}{where}{what}, since {since}"


@dataclass
class LockState:
    """What :func:`pipeline_lock` found: the owner that died holding the lock, if one did."""

    path: Path
    dead_owner: Holder | None = None
    killed_leftovers: int = 0


def lock_paths(root: Path) -> tuple[Path, Path, Path]:
    """The lock, owner file and queue folder of the project at ``root``."""
    folder = root / ".slimflow"
    (folder / "queue").mkdir(parents=True, exist_ok=True)
    return folder / "pipeline.lock", folder / "pipeline.owner", folder / "queue"


def _tickets(queue: Path) -> list[tuple[Path, Holder]]:
    """Live tickets in the order they were scheduled; dead waiters' tickets are removed."""
    live = []
    for path in sorted(queue.glob("*.ticket")):
        holder = Holder.read(path)
        if holder is None or not holder.alive():
            path.unlink(missing_ok=True)
            continue
        live.append((path, holder))
    return live


def _busy_message(root: Path, lock: Path, owner: Holder | None) -> str:
    held = f" (held by {owner.describe()})" if owner else ""
    return (f"another slimflow pipeline run is in progress in {root}{held}; it holds {lock}. "
            f"Wait for it to finish, or pass --wait SECONDS to queue behind it.")


def _waiting_message(owner: Holder | None, ahead: int, wait_s: float) -> str:
    who = f"held by {owner.describe()}" if owner else "held by a run that has not named itself yet"
    queue = f"; {ahead} run(s) ahead of this one in the queue" if ahead else ""
    return f"waiting for the pipeline lock, {who}{queue}; giving up after {wait_s:.0f} s"


def _take(lock: FileLock, ticket: Path, queue: Path) -> bool:
    tickets = _tickets(queue)
    if tickets and tickets[0][0] != ticket:
        return False  # someone scheduled earlier goes first
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return False
    return True


def _acquire(root: Path, lock: FileLock, wait_s: float, scheduled_at: float | None,
             on_wait: Callable[[str], Any]) -> None:
    path, owner_file, queue = lock_paths(root)
    me = Holder.me()
    ticket = queue / f"{(scheduled_at or time.time()):018.6f}-{me.pid}.ticket"
    me.write(ticket)
    deadline = time.monotonic() + wait_s
    told: tuple[int, int] | None = None
    try:
        while not _take(lock, ticket, queue):
            owner = Holder.read(owner_file)
            if time.monotonic() >= deadline:
                raise PipelineBusy(_busy_message(root, path, owner))
            ahead = [t for t, _ in _tickets(queue) if t < ticket]
            if told != (owner.pid if owner else 0, len(ahead)):
                told = (owner.pid if owner else 0, len(ahead))
                on_wait(_waiting_message(owner, len(ahead), wait_s))
            time.sleep(POLL_S)
    finally:
        ticket.unlink(missing_ok=True)


@contextmanager
def pipeline_lock(
    root: Path,
    wait_s: float = 0.0,
    *,
    scheduled_at: float | None = None,
    on_wait: Callable[[str], Any] | None = None,
) -> Iterator[LockState]:
    """Hold the project's pipeline lock; raise :class:`PipelineBusy` if it is not ours in ``wait_s``.

    ``scheduled_at`` (seconds since the epoch; default now) orders the waiting runs;
    ``on_wait`` hears, once and whenever it changes, that this run waits and on whom.
    """
    path, owner_file, _ = lock_paths(root)
    lock = FileLock(path)
    _acquire(root, lock, wait_s, scheduled_at, on_wait or log.info)
    state = LockState(path)
    try:
        previous = Holder.read(owner_file)
        if previous is not None and not previous.alive():
            # The kernel freed the flock when its holder died; the owner file survived it.
            state.dead_owner = previous
            if previous.token:
                state.killed_leftovers = kill_marked(previous.token)
            log.info("took over the pipeline lock from %s, which died without releasing it%s",
                        previous.describe(),
                        f"; killed {state.killed_leftovers} process(es) it left" if state.killed_leftovers else "")
        Holder.me().write(owner_file)
        yield state
    finally:
        owner_file.unlink(missing_ok=True)
        lock.release()
