"""``slimflow serve``'s loop: Prefect's runner serving the pipeline's deployment, stopped the
same way by Ctrl-C and SIGTERM, and leaving nothing in the temporary folder.

Three things ``prefect.serve`` does that a service would notice (Prefect 3.8, measured):

- SIGTERM (``systemctl stop``, ``docker stop``, ``kill``): its handler calls the runner's
  async ``stop`` without awaiting it (a ``RuntimeWarning: coroutine 'Runner.astop' was
  never awaited`` on every stop) and exits from inside the event loop;
- every stop, Ctrl-C too, left the runner's storage folder (``$TMPDIR/runner_storage/<uuid>``):
  one more empty folder in ``/tmp`` per session;
- a stop after a flow run printed an asyncio traceback (:func:`_without_cancelled_connections`).

Here SIGTERM raises what Ctrl-C raises, so both take the one shutdown Prefect has for Ctrl-C
(the schedule paused, the runner's services closed), and the runner's temporary files go
into a folder of this process's own, removed when serving ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

from prefect.exceptions import TerminationSignal
from prefect.runner import Runner


class _Runner(Runner):
    """Prefect's runner, SIGTERM handled as Ctrl-C and the stop's cancelled connections not reported."""

    async def start(self, run_once: bool = False, webserver: bool | None = None) -> None:
        asyncio.get_running_loop().set_exception_handler(_without_cancelled_connections)
        await super().start(run_once=run_once, webserver=webserver)

    def handle_sigterm(self, *args: Any, **kwargs: Any) -> None:
        """SIGTERM stops serving as Ctrl-C does (Prefect installs this as the handler when
        the runner starts)."""
        self._logger.info("SIGTERM received, shutting down...")
        raise KeyboardInterrupt


def _without_cancelled_connections(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """What the event loop reports, less the ``CancelledError`` of tasks cancelled as serving
    stops. Each connection a flow run made to the runner's control channel gave one: Python
    3.11's ``asyncio.streams`` asks the connection's cancelled task for its exception, which
    raises into the loop's handler (an ERROR with 40 lines of traceback at each Ctrl-C or
    SIGTERM after a flow run, in every try here)."""
    if isinstance(context.get("exception"), asyncio.CancelledError):
        return
    loop.default_exception_handler(context)


@contextlib.contextmanager
def _own_temporary_folder() -> Iterator[None]:
    """Python's temporary folder, for this process, is a new one inside it, removed on leaving
    (the runner takes its storage folder from ``tempfile.gettempdir()`` when it is made)."""
    folder = tempfile.mkdtemp(prefix="slimflow-serve-")
    before, tempfile.tempdir = tempfile.tempdir, folder
    try:
        yield
    finally:
        tempfile.tempdir = before
        shutil.rmtree(folder, ignore_errors=True)


def serve_deployment(deployment: Any, registered: Callable[[], None]) -> None:
    """Register ``deployment`` (a ``RunnerDeployment``), call ``registered``, and run its
    schedule until Ctrl-C or SIGTERM; the schedule is paused on the way out."""
    with _own_temporary_folder():
        runner = _Runner(pause_on_shutdown=True)
        runner.add_deployment(deployment)
        registered()
        with contextlib.suppress(KeyboardInterrupt, TerminationSignal):
            asyncio.run(runner.start())
