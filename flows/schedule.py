"""``slimflow serve``'s loop: Prefect's runner serving the pipeline's deployment, stopped the
same way by Ctrl-C and SIGTERM, its schedule paused on the way out, and nothing left in the
temporary folder.

What ``prefect.serve`` does that a service would notice (Prefect 3.8, measured):

- SIGTERM (``systemctl stop``, ``docker stop``, ``kill``): its handler calls the runner's
  async ``stop`` without awaiting it (a ``RuntimeWarning: coroutine 'Runner.astop' was
  never awaited`` on every stop) and exits from inside the event loop;
- a stop signal turned into an exception (``KeyboardInterrupt``, ``SystemExit``) where the
  event loop waits unwinds the loop around the runner instead of the runner: ``asyncio.run``
  then cancels the runner's tasks, and the shutdown either skipped pausing the schedule
  (2 of 10 signals at random moments, 5 of 5 as the runner started, once in CI) or never
  ended (``asyncio.run`` waiting for a cancelled task, 1 try in 4);
- every stop, Ctrl-C too, left the runner's storage folder (``$TMPDIR/runner_storage/<uuid>``):
  one more empty folder in ``/tmp`` per session;
- a stop after a flow run printed an asyncio traceback (:func:`_without_cancelled_connections`).

Here SIGTERM and Ctrl-C only ask the event loop to stop the runner (:class:`_StopSignals`);
the runner stops from inside the loop with Prefect's own ``astop`` (the flow runs in
progress stopped by serve's caller, :meth:`_Runner.cancel_all`), its services close in
order, and the schedule is paused afterwards with a client of its own, however serving
ended. A second signal ends serving at once. The runner's temporary files go into a folder
of this process's own, removed when serving ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import signal
import tempfile
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any
from uuid import UUID

from prefect.exceptions import TerminationSignal
from prefect.runner import Runner

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class _StopSignals:
    """SIGTERM and Ctrl-C, while serving: the first asks serving to stop (from inside the
    event loop once one runs), a second ends it at once (``KeyboardInterrupt``)."""

    def __init__(self) -> None:
        self.requested: str | None = None  # the name of the signal that asked
        self._wake: Callable[[], None] | None = None

    def received(self, signum: int, frame: FrameType | None = None) -> None:
        """The handler of both signals. Python runs it in the main thread between two
        bytecodes, maybe inside a write to stdout, so it prints nothing itself."""
        if self.requested:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        if self._wake is not None:
            self._wake()

    def wake(self, loop: asyncio.AbstractEventLoop, event: asyncio.Event) -> None:
        """A stop asked for from now on sets ``event`` in ``loop``; one asked for already has."""
        self._wake = lambda: loop.call_soon_threadsafe(event.set)
        if self.requested:
            event.set()

    def stop_waking(self) -> None:
        self._wake = None

    def say_stopping(self) -> None:
        print(f"{self.requested} received: stopping serve; again to stop at once", flush=True)


@contextlib.contextmanager
def _stop_signals() -> Iterator[_StopSignals]:
    """:class:`_StopSignals` handling SIGTERM and SIGINT, the previous handlers back on leaving.

    Our own SIGINT handler also keeps ``asyncio.run`` from installing its own, which turns a
    first Ctrl-C into a cancellation of the runner's main task: twice in full test-suite runs
    that stopped the flow run's processes (they share serve's process group) but not serve."""
    stop = _StopSignals()
    previous = {signum: signal.signal(signum, stop.received) for signum in STOP_SIGNALS}
    try:
        yield stop
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


class _Runner(Runner):
    """Prefect's runner, stopped from inside its event loop when :class:`_StopSignals` asks,
    the stop's cancelled connections not reported."""

    def __init__(self, stop: _StopSignals, stop_runs: Callable[[], None], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._stop_signals = stop
        self._stop_runs = stop_runs

    async def start(self, run_once: bool = False, webserver: bool | None = None) -> None:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(_without_cancelled_connections)
        requested = asyncio.Event()
        self._stop_signals.wake(loop, requested)
        stopper = asyncio.create_task(self._stop_when(requested))
        try:
            await super().start(run_once=run_once, webserver=webserver)
        finally:
            self._stop_signals.stop_waking()
            stopper.cancel()

    async def _stop_when(self, requested: asyncio.Event) -> None:
        await requested.wait()
        self._stop_signals.say_stopping()
        while not self.started:  # asked while the runner was starting: stop it once started
            await asyncio.sleep(0.05)
        await self.astop()

    def handle_sigterm(self, signum: int = signal.SIGTERM, frame: FrameType | None = None) -> None:
        """Prefect installs this for SIGTERM as the runner starts: the same stop as Ctrl-C."""
        self._stop_signals.received(signum, frame)

    async def cancel_all(self) -> None:
        """The flow runs in progress, as serving stops (``astop`` calls this first):
        ``stop_runs`` kills them and ends their states itself, before the runner sees them
        exit. Prefect's own cancels each through its control channel, which interrupts the
        stage where it is (a ``KeyboardInterrupt`` traceback in the middle of a stage's
        database call, in a try here); without either, the runner waits for the runs to
        finish (a training run: minutes)."""
        self._stop_runs()
        # The runner then sees them exit -9 and guesses (at INFO) at an out-of-memory kill.
        logging.getLogger("prefect.runner.flow_run_executor").setLevel(logging.WARNING)


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


def _pause_schedule(deployment_id: UUID) -> str | None:
    """Pause the deployment's schedule; why it could not be, or None."""
    import httpx
    from prefect.client.orchestration import get_client

    try:
        with get_client(sync_client=True) as client:
            client.pause_deployment(deployment_id)
    except httpx.HTTPError as error:
        return f"{type(error).__name__}: {error}"
    return None


def serve_deployment(deployment: Any, registered: Callable[[], None], stop_runs: Callable[[], None]) -> str | None:
    """Register ``deployment`` (a ``RunnerDeployment``), call ``registered``, and run its
    schedule until Ctrl-C or SIGTERM, which call ``stop_runs`` to stop the flow runs in
    progress; then pause the schedule. Returns why the schedule could not be paused, or None."""
    with _own_temporary_folder(), _stop_signals() as stop:
        runner = _Runner(stop, stop_runs, pause_on_shutdown=False)  # paused below, however serving ended
        deployment_id = runner.add_deployment(deployment)
        try:
            registered()
            if stop.requested:  # asked before serving began
                stop.say_stopping()
            else:
                with contextlib.suppress(KeyboardInterrupt, TerminationSignal):
                    asyncio.run(runner.start())
        finally:
            problem = _pause_schedule(deployment_id)
    return problem
