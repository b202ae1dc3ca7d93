"""Training on the Horovod loop: the fit job and loop (rank-aware), checkpoints and resume,
and the launcher that starts the workers (``horovodrun``). The train stage and the
compression methods that train (distillation) use it.

    job.py          FitJob: what a worker trains, and the fingerprint a resume must match
    launcher.py     hosts, threads, worker environment, the horovodrun command, failures
    worker.py       the worker process (``python -m tasks.training.worker JOB.json``)
    loop.py         the fit loop: epochs, evaluation, early stopping, the final model
    distributed.py  per-worker Horovod set-up: threads, seeds, device, allreduce, lr scaling
    checkpoint.py   checkpoint read/write, RNG state, resume
    losses.py       cross-entropy and knowledge distillation
    reporting.py    rank 0's MLflow metrics and summary files
    fault.py        tests only: a simulated worker crash

Importing this package is light (no torch, no Horovod): the stages import it at start-up.
"""

from tasks.training.job import FitJob
from tasks.training.launcher import LaunchError, launch_fit

__all__ = ["FitJob", "LaunchError", "launch_fit"]
