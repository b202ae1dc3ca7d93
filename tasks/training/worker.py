"""The worker process, ``python -m tasks.training.worker --serve FOLDER``: started by
:mod:`tasks.training.pool` (through :mod:`tasks.training.launcher`) alone or under
``horovodrun``, once per rank; it runs the fit jobs the stage writes into FOLDER until told
to stop. Horovod, torch and the energy meter are set up once for every job of a stage.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from tasks.core.fork_server import run_forked
from tasks.training.job import FitJob
from tasks.training.pool import POLL_S, SERVE_FLAG, STOP_FILE, done_file, job_file, write_atomically


def start(hvd: Any) -> int:
    """Initialize Horovod, this rank's energy meter, threads and logging; the thread count."""
    from tasks.training.distributed import set_threads, start_meter

    # Horovod: initialize; everything below depends on rank and size.
    hvd.init()
    # Each rank measures its own energy (its GPU's NVML counter, or its CPU); the meter sets
    # itself up in the background while the worker loads data and builds the model.
    start_meter(hvd.local_rank())
    # Threads first, before any tensor work: cores // local workers, never oversubscribed.
    threads = set_threads(hvd.local_size())
    logging.basicConfig(
        level=logging.INFO if hvd.rank() == 0 else logging.WARNING,
        format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S", stream=sys.stderr,
    )
    return threads


def run_job(job: FitJob, hvd: Any, threads: int, energy_since: Any = None) -> dict[str, Any] | None:
    """Train ``job`` on this (started) worker; rank 0 returns the summary metrics, other ranks None."""
    from tasks.training.distributed import seed_everything
    from tasks.training.loop import fit

    # Horovod: the same seed on every rank, so the initial weights agree even before the
    # broadcast; per-rank dropout streams are seeded when resuming (tasks.training.checkpoint).
    seed_everything(job.seed)
    return fit(job, hvd, threads, energy_since)


def next_job(control: Path, number: int) -> Path | None:
    """Wait for job ``number`` in ``control``; None when told to stop (or orphaned)."""
    path, stop = job_file(control, number), control / STOP_FILE
    while not path.exists():
        if stop.exists() or not control.is_dir() or os.getppid() == 1:
            return None
        time.sleep(POLL_S)
    return path


def serve(control: Path) -> None:
    """Run the fit jobs the stage writes into ``control``, in order, until it says stop.

    Each job's energy is this rank's since the previous job ended (the first job's: since
    the meter started), so the jobs' figures add up to everything the workers used.
    """
    import horovod.torch as hvd

    from tasks.core.energy import process_meter

    threads = start(hvd)
    number, since = 1, None
    while (path := next_job(control, number)) is not None:
        run_job(FitJob.read(path), hvd, threads, since)
        since = process_meter().read()
        if hvd.rank() == 0:
            write_atomically(done_file(control, number), "")
        number += 1
    hvd.shutdown()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[0] != SERVE_FLAG:
        print(f"usage: python -m tasks.training.worker {SERVE_FLAG} FOLDER", file=sys.stderr)
        return 2
    try:
        serve(Path(args[1]))
    except KeyboardInterrupt:
        # Ctrl-C reaches every process of the terminal's group, the workers too: the run
        # says it was interrupted; a traceback from each worker's epoch would only bury that.
        return 128 + signal.SIGINT
    return 0


if __name__ == "__main__":
    from tasks.core.processes import exit_process

    run_forked("tasks.training.worker")  # in a pipeline run: a child of its fork server (tasks.core.fork_server)
    exit_process(main())
