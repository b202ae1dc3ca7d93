"""The Horovod launcher: how many workers where, how many threads each, and the command.

One local worker runs in a plain process (Horovod with size 1, no launcher start-up);
more, or several hosts, go through ``horovodrun`` over Gloo. The same worker code
(:mod:`tasks.training.worker`) runs in every case; the stages call
:func:`tasks.training.pool.launch_fit`, which starts workers here once and runs its jobs on them.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tasks.core.processes import parent_death_preexec

if TYPE_CHECKING:
    from tasks.core.config import TrainParams

log = logging.getLogger(__name__)

WORKER_MODULE = "tasks.training.worker"  # what each worker runs: python -m WORKER_MODULE --serve DIR
HOROVODRUN_MODULE = "tasks.training.horovodrun"  # horovodrun, as python -m HOROVODRUN_MODULE ARGS
THREADS_ENV = "SLIMFLOW_THREADS_PER_WORKER"  # the launcher's thread count, read by each worker


class LaunchError(RuntimeError):
    """The workers could not be started or one of them failed."""


@dataclass(frozen=True)
class HostSlots:
    host: str
    slots: int


def parse_hosts(hosts: str | None, workers: int) -> list[HostSlots]:
    """``"a:4,b:4"`` -> two hosts; ``None`` -> ``workers`` slots on localhost."""
    if not hosts:
        return [HostSlots("localhost", workers)]
    parsed = []
    for entry in hosts.split(","):
        host, _, slots = entry.strip().partition(":")
        parsed.append(HostSlots(host, int(slots) if slots else 1))
    return parsed


def world_size(train_params: TrainParams) -> int:
    """How many workers a launch starts for these settings (``train.hosts`` or ``train.workers``)."""
    return sum(h.slots for h in parse_hosts(train_params.hosts, train_params.workers))


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def threads_per_worker(local_workers: int, configured: int | None = None) -> int:
    """Cores // local workers, so workers never oversubscribe the machine (28x slower if they do)."""
    if configured:
        return configured
    return max(1, usable_cores() // max(1, local_workers))


def _is_local(host: str) -> bool:
    return host in {"localhost", "127.0.0.1", socket.gethostname()}


def check_hosts_reachable(hosts: list[HostSlots], timeout_s: float = 5.0) -> None:
    """Fail before training with a clear message when a remote host cannot be reached by SSH."""
    for entry in hosts:
        if _is_local(entry.host):
            continue
        ssh_port = os.environ.get("HOROVOD_SSH_PORT", "22")
        try:
            with socket.create_connection((entry.host, int(ssh_port)), timeout=timeout_s):
                pass
        except OSError as err:
            raise LaunchError(
                f"train.hosts: host {entry.host!r} is unreachable on SSH port {ssh_port}: {err}"
            ) from None


# Horovod's background thread, with nothing enqueued, waits up to this long for work
# instead of coordinating with the other ranks every HOROVOD_CYCLE_TIME (1 ms). Every
# coordination wakes every rank's background thread, which preempts training threads
# that fill the cores; a collective enqueued meanwhile starts at once. 50-250 ms measured
# alike here; it bounds how long a rank may wait for an idle one (shutdown, stall checks).
IDLE_CYCLE_TIME_MS = 100
IDLE_CYCLE_PATCH = "idlecycle"  # the local version label of slimflow's Horovod build


def horovod_has_idle_cycle() -> bool:
    """Whether the installed Horovod carries slimflow's idle-cycle patch (scripts/horovod/)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("horovod").partition("+")[2].startswith(IDLE_CYCLE_PATCH)
    except PackageNotFoundError:
        return False


def worker_environment(threads: int | None) -> dict[str, str]:
    """The workers' environment: threads per worker set before Python starts (OpenMP reads
    it then), and Horovod's idle cycle (``HOROVOD_IDLE_CYCLE_TIME``, unless already set).

    ``None`` leaves the thread count to each worker (its host's usable cores // its local
    workers), for hosts that may differ from this one.
    """
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("HOROVOD_IDLE_CYCLE_TIME", str(IDLE_CYCLE_TIME_MS))
    if threads is None:
        for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", THREADS_ENV):
            env.pop(key, None)
    else:
        env.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), THREADS_ENV: str(threads)})
    return env


def is_multi_host(hosts: list[HostSlots]) -> bool:
    return any(not _is_local(h.host) for h in hosts)


def build_command(
    worker_args: list[str], hosts: list[HostSlots], network_interface: str | None = None
) -> list[str]:
    """The command that starts every worker: ``python -m ...`` alone, or under ``horovodrun``."""
    worker = [sys.executable, *worker_args]
    total = sum(h.slots for h in hosts)
    if total == 1 and _is_local(hosts[0].host):
        return worker
    # Horovod's horovodrun, through an entry of ours so that a run's fork server starts it
    # with torch imported (tasks/training/horovodrun.py says why).
    command = [
        sys.executable, "-m", HOROVODRUN_MODULE, "--gloo", "-np", str(total),
        "-H", ",".join(f"{h.host}:{h.slots}" for h in hosts),
    ]
    if ssh_port := os.environ.get("HOROVOD_SSH_PORT"):
        command += ["-p", ssh_port]
    if ssh_key := os.environ.get("HOROVOD_SSH_IDENTITY_FILE"):
        command += ["-i", ssh_key]
    if network_interface:
        command += ["--network-interface", network_interface]
    return command + worker


_WORKER_LINE = re.compile(r"^\[(\d+)\]<std(?:err|out)>:(.*)$")
_EXCEPTION = re.compile(r"^\s*(\w+(Error|Exception|Interrupt)|Killed|Terminated)\b")
_PROCESS_EXIT = re.compile(r"^Process (\d+) exit with status code (-?\d+)")


def _clip(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


# How a worker fails because another one did: stopped by horovodrun (SIGTERM), or told by
# Horovod that the job is shut down (a peer's exit or error).
_STOPPED_STATUSES = {"143", "-15"}
_PEER_GONE = re.compile(r"Horovod has been shut down|HorovodInternalError|Connection closed by peer")


def _consequence(rank: str, code: str, errors: dict[str, str]) -> bool:
    return code in _STOPPED_STATUSES or bool(_PEER_GONE.search(errors.get(rank, "")))


def summarize_failure(lines: list[str]) -> str:
    """The first worker that failed and why, from horovodrun's (or one worker's) output.

    horovodrun prefixes each worker line with ``[rank]<stdout|stderr>:`` and prints
    ``Process N exit with status code C.`` when a worker ends; the first worker to end
    badly is the cause, the others were stopped because of it. A worker that died
    without a traceback (killed, ``os._exit``) is described by its last line of output.
    """
    prefixed = any(_WORKER_LINE.match(line) for line in lines)
    failed_exits: list[tuple[str, str]] = []  # (rank, status) of each worker that ended badly, as reported
    errors: dict[str, str] = {}  # rank -> its first exception line
    last: dict[str, str] = {}  # rank -> its last line
    for line in lines:
        if exited := _PROCESS_EXIT.match(line):
            if exited.group(2) != "0":
                failed_exits.append((exited.group(1), exited.group(2)))
            continue
        match = _WORKER_LINE.match(line)
        if match:
            rank, text = match.group(1), match.group(2).strip()
        elif prefixed:
            continue  # horovodrun's own output
        else:
            rank, text = "0", line.strip()
        if not text:
            continue
        last[rank] = text
        if rank not in errors and _EXCEPTION.match(text):
            errors[rank] = text
    # horovodrun reports the exits in the order its watchers see them, which on a busy machine
    # can put a worker that was only reacting (stopped by horovodrun, or told by Horovod that
    # a peer is gone) before the one that failed first: the cause is the first that was not.
    first_exit = next((exit for exit in failed_exits if not _consequence(*exit, errors)), None) \
        or (failed_exits[0] if failed_exits else None)
    if first_exit:
        rank, code = first_exit
        summary = f"worker {rank} exited with status {code} (the first to fail; the others were stopped)"
        if rank in errors:
            return f"{summary}: {_clip(errors[rank])}"
        if rank in last:
            return f"{summary} without an error message; its last output: {_clip(last[rank])}"
        return summary
    if errors:
        rank, error = next(iter(errors.items()))
        return f"worker {rank}: {_clip(error)}"
    if last:
        rank, text = next(reversed(last.items()))
        return f"worker {rank} failed without an error message; its last output: {_clip(text)}"
    return "no error message from the workers (see the output above)"


def start_workers(command: list[str], env: dict[str, str], cwd: Path) -> subprocess.Popen[str]:
    """Start the workers (``horovodrun`` or the one worker); their output, merged, on ``stdout``."""
    if not horovod_has_idle_cycle():
        log.warning(
            "this Horovod build lacks slimflow's idle-cycle patch: its background thread "
            "coordinates every cycle, which costs CPU workers 5-15%% of their throughput; "
            "scripts/install.sh builds the patched wheel"
        )
    log.info("launching: %s", " ".join(command))
    # horovodrun (or the one worker) dies with this stage, even on SIGKILL: the kernel's
    # parent-death signal. Horovod's middlemen then stop the workers, and the run's reaper
    # kills anything left that carries the run's token (see tasks.core.processes).
    return subprocess.Popen(
        command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        preexec_fn=parent_death_preexec(),
    )

