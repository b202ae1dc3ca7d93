"""The worker process: ``python -m tasks.training.worker JOB.json``, started by
:mod:`tasks.training.launcher` alone or under ``horovodrun``, once per rank."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from tasks.training.job import FitJob


def run(job: FitJob) -> dict[str, Any] | None:
    """Train ``job`` on this worker; rank 0 returns the summary metrics, other ranks None."""
    import horovod.torch as hvd

    from tasks.training.distributed import seed_everything, set_threads, start_meter
    from tasks.training.loop import fit

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
    # Horovod: the same seed on every rank, so the initial weights agree even before the
    # broadcast; per-rank dropout streams are seeded when resuming (tasks.training.checkpoint).
    seed_everything(job.seed)
    result = fit(job, hvd, threads)
    hvd.shutdown()
    return result


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m tasks.training.worker JOB.json", file=sys.stderr)
        return 2
    run(FitJob.read(Path(args[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
