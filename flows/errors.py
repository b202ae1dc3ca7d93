"""Every error of the ``slimflow`` CLI is one line on stderr.

The known failures (bad input, a busy project, a failed stage, a server that is down, a
full disk) carry their own message; anything else is shown as its type and message, and
its traceback goes to ``.slimflow/last-error.log``. ``slimflow run --debug`` (or
``SLIMFLOW_DEBUG=1`` for any command) prints tracebacks instead. During a run the
console shows each log record of Prefect and MLflow as one line; Prefect's API logs
(its UI) keep them whole.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Any

import typer

from tasks.core.errors import disk_full_message
from tasks.core.paths import ProjectPaths
from tasks.core.tables import console as table_console

ERROR_LOG = Path(".slimflow") / "last-error.log"  # relative to the project root
stderr = table_console(stderr=True)
_debug = [os.environ.get("SLIMFLOW_DEBUG", "") not in ("", "0")]


def debug() -> bool:
    """Whether tracebacks are printed (``--debug`` or ``SLIMFLOW_DEBUG=1``)."""
    return _debug[0]


def set_debug() -> None:
    _debug[0] = True


def one_line(err: BaseException) -> str:
    """A full disk as the path and "no space left on device"; anything else as type: message."""
    if full := disk_full_message(err, ProjectPaths.discover().root):
        return full
    text = " ".join(str(err).split()) or "(no message)"
    return f"{type(err).__name__}: {text[:500]}"


def print_error(message: str, err: BaseException | None = None) -> None:
    """``error: <message>`` on stderr; ``err``'s traceback into the error log."""
    where = ""
    if err is not None:
        try:
            log = ProjectPaths.discover().root / ERROR_LOG
            log.parent.mkdir(exist_ok=True)
            log.write_text("".join(traceback.format_exception(err)))
            where = f" (traceback: {ERROR_LOG}; --debug prints it)"
        except OSError:
            pass
    stderr.print(f"[bold red]error:[/] {message}{where}", highlight=False, markup=True, soft_wrap=True)


class OneLineErrors(typer.Typer):
    """A Typer app whose unexpected errors are one line (the traceback goes to the error log)."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().__call__(*args, **kwargs)
        except Exception as err:  # usage errors and typer.Exit never get here
            if debug():
                raise
            print_error(one_line(err), err)
            sys.exit(1)


class _OneLine(logging.Formatter):
    """Another formatter's first line, without the traceback."""

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        saved = record.exc_info, record.exc_text, record.stack_info
        record.exc_info = record.exc_text = record.stack_info = None
        try:
            return self.inner.format(record).split("\n", 1)[0]
        finally:
            record.exc_info, record.exc_text, record.stack_info = saved


def one_line_console_logs() -> None:
    """Console log records of this process (Prefect's, MLflow's) as one line each, without
    tracebacks: a failure reads as its one error line, not as pages of SQL and frames."""
    import mlflow  # noqa: F401  # its logger gets its console handler on import

    for name in (None, "prefect", "mlflow"):
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler.formatter, _OneLine):
                handler.setFormatter(_OneLine(handler.formatter or logging.Formatter()))
                handler.addFilter(_stage_failure_said_elsewhere)


def _stage_failure_said_elsewhere(record: logging.LogRecord) -> bool:
    """False for Prefect's three reports of a failed stage (the task's and the flow's final
    states, the flow's exception): each repeats the stage's message, which the stage's own
    line above and the run's ``error:`` line below already say. The console only: the
    flow run's log in Prefect keeps them, and retry lines stay."""
    if record.name.split(".")[0] != "prefect" or "StageFailed" not in (message := record.getMessage()):
        return True
    return not message.startswith(("Finished in state Failed(", "Encountered exception during execution:"))
