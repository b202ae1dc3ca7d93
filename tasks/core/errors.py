"""How a stage reports the one message that says why it failed.

A stage runs as a DVC command in its own process, and DVC only says that the command
exited non-zero. So a stage prints its message to stderr (for people and ``dvc repro``)
and also appends it to the run context's ``error_file`` when the flow set one, which lets the
flow fail its Prefect task and its MLflow run with the stage's own words.
"""

from __future__ import annotations

import sys

from tasks.core.run_context import RunContext


def report_stage_error(stage: str, message: str) -> None:
    """Print ``error: <stage>: <message>`` on stderr and hand it to the flow, if any."""
    line = f"{stage}: {message}"
    print(f"error: {line}", file=sys.stderr, flush=True)
    if path := RunContext.current().error_file:
        try:
            with open(path, "a") as handle:
                handle.write(line + "\n")
        except OSError:
            pass
