"""Horovod workers started once per stage, running its fit jobs one after another.

A stage that trains several times (the compress stage: QAT, pruning fine-tunes, every
trial of a budget search, distillation) would otherwise pay a whole launch per job:
``horovodrun``, each worker's interpreter and torch, the Gloo rendezvous, MLflow's import,
about 6-10 s each on the 2-core machine. Inside :func:`worker_pool` the workers start at
the first job (or on entering, for a stage that will train: their launch then runs beside
its other work) and stay: each later job costs only its own work.

The protocol is a control folder the stage and every worker can read (a temporary folder;
for several hosts, one in the shared project folder, like the one-job launch): the stage
writes ``job-<n>.json`` (atomically), each worker waits for it, runs it, and rank 0 writes
``done-<n>`` after the job's files; ``stop`` ends the workers. A worker that fails ends
its ``horovodrun``, and the waiting stage raises :class:`LaunchError` naming it, as for a
one-job launch. Outside a pool, :func:`launch_fit` starts a pool for the one job.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import TYPE_CHECKING

from tasks.core.energy import children_excluded
from tasks.core.processes import is_running, stop_process
from tasks.training.reporting import EventForwarder, MlflowLogger
from tasks.training.launcher import (
    WORKER_MODULE, LaunchError, build_command, check_hosts_reachable, is_multi_host, parse_hosts, start_workers,
    summarize_failure, threads_per_worker, worker_environment,
)

if TYPE_CHECKING:
    from tasks.core.config import TrainParams
    from tasks.training.job import FitJob

log = logging.getLogger(__name__)

SERVE_FLAG = "--serve"  # python -m tasks.training.worker --serve CONTROL_FOLDER
STOP_FILE = "stop"
POLL_S = 0.02  # how often the stage and idle workers look at the control folder
STOP_WAIT_S = 60.0  # how long the workers may take to leave after ``stop``
FORWARD_EVERY_S = 1.0  # how often a running job's epochs are logged into MLflow (a transaction each)
SHARED_FOLDER_PREFIX = "fit-pool-"  # + host + "-" + the stage's pid, in the project's .slimflow/
LOCAL_FOLDER_PREFIX = "slimflow-pool-"  # + the stage's pid + "-" + a random part, in the temporary directory


def job_file(control: Path, number: int) -> Path:
    return control / f"job-{number}.json"


def done_file(control: Path, number: int) -> Path:
    return control / f"done-{number}"


def shared_control_folder(root: Path) -> Path:
    """A pool's control folder for several hosts: in the shared project folder, named after
    this host and this process (the stage)."""
    return root / ".slimflow" / f"{SHARED_FOLDER_PREFIX}{socket.gethostname()}-{os.getpid()}"


def remove_dead_control_folders(folder: Path, prefix: str | None = None) -> list[Path]:
    """Remove the control folders in ``folder`` that killed stages left (kill -9 skips the
    pool's clean-up): those whose process is gone. By default the shared ones of this host
    (other hosts' folders stay); with ``prefix`` :data:`LOCAL_FOLDER_PREFIX`, the local
    ones in the temporary directory. Returns them."""
    prefix = prefix or f"{SHARED_FOLDER_PREFIX}{socket.gethostname()}-"
    removed = []
    for control in folder.glob(f"{prefix}*"):
        pid = control.name.removeprefix(prefix).split("-", 1)[0]
        if not pid.isdigit() or is_running(int(pid)):
            continue
        shutil.rmtree(control, ignore_errors=True)
        removed.append(control)
    return removed


def write_atomically(path: Path, text: str) -> None:
    """Readers polling for ``path`` never see it half-written."""
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text)
    partial.replace(path)


class WorkerPool:
    """The workers for ``train_params`` (``train.workers`` or ``train.hosts``), started at
    the first :meth:`run` and kept until :meth:`close`."""

    def __init__(self, train_params: TrainParams, root: Path) -> None:
        self.train_params = train_params
        self.root = root
        self.hosts = parse_hosts(train_params.hosts, train_params.workers)
        self.launches = 0  # how many times workers were started (again after a failure)
        self.jobs = 0  # jobs sent to the current workers
        self._process: subprocess.Popen[str] | None = None
        self._control: Path | None = None
        self._tail: deque[str] = deque(maxlen=400)
        self._reader: threading.Thread | None = None

    def serves(self, train_params: TrainParams, root: Path) -> bool:
        """Whether jobs for ``train_params`` can run on these workers (same hosts and settings)."""
        keys = ("hosts", "workers", "threads_per_worker", "network_interface")
        return root == self.root and all(getattr(train_params, k) == getattr(self.train_params, k) for k in keys)

    def start(self) -> None:
        """Start the workers (they wait for their first job); a no-op once started."""
        if self._process is not None:
            return
        check_hosts_reachable(self.hosts)
        if is_multi_host(self.hosts):
            # Remote workers read their jobs from the shared project folder; each host's
            # workers divide their own host's cores (hosts may differ from this one).
            remove_dead_control_folders(self.root / ".slimflow")
            self._control = shared_control_folder(self.root)
            shutil.rmtree(self._control, ignore_errors=True)
            self._control.mkdir(parents=True)
            threads = self.train_params.threads_per_worker
        else:
            temporary = Path(tempfile.gettempdir())
            remove_dead_control_folders(temporary, LOCAL_FOLDER_PREFIX)  # a few KB each, but one per killed stage
            self._control = Path(tempfile.mkdtemp(prefix=f"{LOCAL_FOLDER_PREFIX}{os.getpid()}-", dir=temporary))
            threads = threads_per_worker(sum(h.slots for h in self.hosts), self.train_params.threads_per_worker)
        command = build_command(
            ["-m", WORKER_MODULE, SERVE_FLAG, str(self._control)], self.hosts, self.train_params.network_interface
        )
        self._process = start_workers(command, worker_environment(threads), self.root)
        self.launches += 1
        self.jobs = 0
        self._tail.clear()
        self._reader = threading.Thread(target=self._stream, name="worker-output", daemon=True)
        self._reader.start()

    def _stream(self) -> None:
        """The workers' output, passed through to this process's stderr (and kept for errors)."""
        assert self._process is not None and self._process.stdout is not None
        for line in self._process.stdout:
            sys.stderr.write(line)
            self._tail.append(line.rstrip())

    def _failure(self, code: int) -> LaunchError:
        if self._reader is not None:
            self._reader.join(timeout=10)  # the last lines name the failure
        return LaunchError(f"training workers failed (exit code {code}): {summarize_failure(list(self._tail))}")

    def run(self, job: FitJob) -> None:
        """Run ``job`` on the workers and return when rank 0 has written its files.

        Raises :class:`LaunchError` when a host is unreachable or a worker fails.
        """
        self.start()  # again after a failure: the failed workers are gone
        assert self._process is not None and self._control is not None
        self.jobs += 1
        done = done_file(self._control, self.jobs)
        events = None
        if job.run_id:  # rank 0 reports into a file; this process logs it into MLflow
            job = dataclasses.replace(job, events_path=str(self._control / f"events-{self.jobs}.jsonl"))
            events = EventForwarder(Path(job.events_path), MlflowLogger(job.run_id, job.metric_prefix))
        write_atomically(job_file(self._control, self.jobs), job.to_json())
        # The workers measure their own energy (the job's summary); a meter of this process
        # leaves them out rather than count part of them as its children.
        with children_excluded():
            while not done.exists():
                if (code := self._process.poll()) is not None:
                    self._process = None
                    failure = self._failure(code)
                    shutil.rmtree(self._control, ignore_errors=True)
                    self._control = None
                    raise failure
                if events:  # the epochs reach the run live, at most once a second
                    events.forward(at_most_every_s=FORWARD_EVERY_S)
                time.sleep(POLL_S)
            if events:
                events.forward()

    def close(self, abort: bool = False) -> None:
        """Tell the workers to leave after their job and wait for them (``abort``: stop them
        now, e.g. on an error or Ctrl-C in the stage); remove the control folder."""
        process, control = self._process, self._control
        self._process = None
        try:
            if process is not None and control is not None:
                code = self._stop(process, control, abort)
                if self._reader is not None:
                    self._reader.join(timeout=10)
                if code != 0 and not abort:
                    log.warning("the training workers exited with code %s after their last job", code)
        finally:
            if control is not None:
                shutil.rmtree(control, ignore_errors=True)
            self._control = None

    @staticmethod
    def _stop(process: subprocess.Popen[str], control: Path, abort: bool) -> int:
        if not abort:
            write_atomically(control / STOP_FILE, "")
            try:
                return process.wait(timeout=STOP_WAIT_S)
            except subprocess.TimeoutExpired:
                log.warning("the training workers did not stop within %.0f s; stopping them", STOP_WAIT_S)
        return stop_process(process, grace_s=30)  # SIGTERM: horovodrun stops its workers


# The pool of the innermost enclosing worker_pool() block, per thread (a new thread starts
# with none: jobs launched from several threads at once each get their own workers).
_ACTIVE: ContextVar[WorkerPool | None] = ContextVar("slimflow_worker_pool", default=None)


@contextmanager
def worker_pool(train_params: TrainParams, root: Path, start: bool = False) -> Iterator[WorkerPool]:
    """Inside the block, :func:`launch_fit` for these settings runs on one set of workers,
    started at the first job (a block that trains nothing starts none).

    ``start``: start them on entering instead, for a block that will train: their launch
    (``horovodrun``, each worker's start, the Gloo rendezvous) then runs beside the block's
    work before its first job, and the workers wait for it.
    """
    pool = WorkerPool(train_params, root)
    token = _ACTIVE.set(pool)
    try:
        if start:
            pool.start()
        yield pool
    except BaseException:
        pool.close(abort=True)
        raise
    else:
        pool.close()
    finally:
        _ACTIVE.reset(token)


def launch_fit(job: FitJob, train_params: TrainParams, root: Path) -> None:
    """Run ``job`` on the configured Horovod workers (``train.workers`` or ``train.hosts``):
    those of the enclosing :func:`worker_pool` when it serves these settings, else workers
    started for this job alone.

    Raises :class:`LaunchError` when a host is unreachable or a worker fails.
    """
    if (pool := _ACTIVE.get()) is not None and pool.serves(train_params, root):
        pool.run(job)
        return
    with worker_pool(train_params, root) as pool:
        pool.run(job)
