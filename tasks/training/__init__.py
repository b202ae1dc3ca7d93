"""Training on the Horovod loop: the fit job and loop (rank-aware), checkpoints and resume,
and the launcher that starts the workers (``horovodrun``). Every training of the pipeline
runs here: the train stage's baseline, and the compression methods that train
(distillation, pruning fine-tuning, quantization-aware fine-tuning) through the job's
generic hooks (initial weights, pruning masks, fake quantization, a teacher).

    job.py          FitJob: what a worker trains, and the fingerprint a resume must match
    launcher.py     hosts, threads, worker environment, the horovodrun command, failures
    pool.py         launch_fit: workers started once per stage, running its jobs in turn
    worker.py       the worker process (``--serve``: a pool's jobs, in turn)
    loop.py         the fit loop: epochs, evaluation, early stopping, the final model
    adaptation.py   the job's hooks on the model: initial weights, pruning masks, QAT
    qat.py          torch.ao fake quantization, observers averaged over the ranks
    distributed.py  per-worker Horovod set-up: threads, seeds, device, allreduce, lr scaling
    checkpoint.py   checkpoint read/write (weights_only), RNG state, resume
    losses.py       cross-entropy and knowledge distillation
    reporting.py    rank 0's MLflow metrics and summary files
    fault.py        tests only: a simulated worker crash

Importing this package is light (no torch, no Horovod): the stages import it at start-up.
"""

from tasks.training.job import FitJob
from tasks.training.launcher import LaunchError, world_size
from tasks.training.pool import launch_fit, worker_pool

__all__ = ["FitJob", "LaunchError", "launch_fit", "worker_pool", "world_size"]
