"""Prefect's API server and UI in a process of its own: ``python -m flows.prefect_api PORT``
(:func:`api_server_command`), what the project's background server runs
(:mod:`flows.prefect_server`) and what ``make install`` starts once on the database it
leaves (:mod:`flows.prefect_database`); :func:`answers` is its health check."""

from __future__ import annotations

import os
import sys

MODULE = "flows.prefect_api"


def api_server_command(port: int) -> list[str]:
    """The command that serves Prefect's API and UI on 127.0.0.1:``port`` (:func:`serve`)."""
    return [sys.executable, "-m", MODULE, str(port)]


def answers(url: str, timeout_s: float = 5.0) -> bool:
    """Whether the server at ``url`` (the UI's: the API is under ``/api``) is healthy."""
    import httpx

    try:
        return httpx.get(f"{url}/api/health", timeout=timeout_s).status_code == 200
    except httpx.HTTPError:
        return False


def serve(port: int) -> None:
    """Prefect's API server and UI on ``port``: what ``prefect server start`` runs in the
    foreground (Prefect's app factory under uvicorn, with the same settings), without
    first importing Prefect's command line: 0.46 s less of the server's start on the
    2-core machine (3.2 s instead of 3.6 s to its first answer, three starts each), which
    a cold run waits for.

    The port goes into Prefect's settings too: the UI asks ``/ui-settings`` where the API
    is, which Prefect derives from them (with ``prefect server start --port`` a server on
    another port than 4200 sent its UI to port 4200, another project's server if any)."""
    from tasks.core.processes import CollectorPaused

    os.environ["PREFECT_SERVER_API_HOST"], os.environ["PREFECT_SERVER_API_PORT"] = "127.0.0.1", str(port)
    # What the server loads stays for its life: no collection walks it while it loads, and
    # frozen, none walks it later, when the server answers requests (two full collections
    # took 0.28 and 0.32 s during a cold run's first API calls; measured with gc.callbacks).
    with CollectorPaused():
        import prefect
        import uvicorn
        from prefect.server.api.server import create_app
        from prefect.settings import (
            PREFECT_SERVER_API_KEEPALIVE_TIMEOUT,
            PREFECT_SERVER_API_WEBSOCKET_PING_INTERVAL,
            PREFECT_SERVER_API_WEBSOCKET_PING_TIMEOUT,
            PREFECT_SERVER_LOGGING_LEVEL,
        )

        app = create_app(final=True)
    uvicorn.run(
        app=app, app_dir=str(prefect.__module_path__.parent), host="127.0.0.1", port=port,
        timeout_keep_alive=PREFECT_SERVER_API_KEEPALIVE_TIMEOUT.value(),
        ws_ping_interval=PREFECT_SERVER_API_WEBSOCKET_PING_INTERVAL.value(),
        ws_ping_timeout=PREFECT_SERVER_API_WEBSOCKET_PING_TIMEOUT.value(),
        log_level=PREFECT_SERVER_LOGGING_LEVEL.value().lower(),
    )


if __name__ == "__main__":
    serve(int(sys.argv[1]))
