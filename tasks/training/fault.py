"""TESTS ONLY: a simulated worker crash, to prove that a failed run resumes.

``SLIMFLOW_FAULT_AFTER_EPOCH=N`` in the train stage's environment sets
``FitJob.fault_after_epoch``; the last rank then exits with :data:`FAULT_EXIT_CODE`
right after epoch N was checkpointed. Nothing else in the loop knows about it.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger("slimflow.fit")

FAULT_ENV = "SLIMFLOW_FAULT_AFTER_EPOCH"
FAULT_EXIT_CODE = 17


def fault_after_epoch_from_env() -> int | None:
    """The epoch after which a worker should die, from :data:`FAULT_ENV` (unset: never)."""
    value = os.environ.get(FAULT_ENV)
    return int(value) if value else None


def crash_if_due(fault_after_epoch: int | None, epoch: int, rank: int, size: int) -> None:
    """Exit the last rank at once (no clean-up, like a crash) after epoch ``fault_after_epoch``."""
    if fault_after_epoch is not None and epoch == fault_after_epoch and rank == size - 1:
        log.warning("fault injection: worker rank %d exits with status %d after epoch %d", rank, FAULT_EXIT_CODE, epoch)
        logging.shutdown()
        os._exit(FAULT_EXIT_CODE)  # a simulated crash (tests only)
