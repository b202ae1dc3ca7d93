"""Servers that are down are found in seconds, before any work starts.

Left alone, MLflow's client retries a tracking server that does not answer for minutes
(257 s measured) and Prefect's prints a long traceback. So before a run starts, each
server the configuration names is asked once for its health page with a short timeout,
and a server that does not answer stops the run with one line naming the URI and what
failed. The embedded defaults (a SQLite store, Prefect's temporary API) need no check.
"""

from __future__ import annotations

import os

TIMEOUT_S = 3.0


class ServerDown(RuntimeError):
    """A configured server did not answer its health check."""


def _get(url: str, timeout_s: float, auth: tuple[str, str] | None = None, token: str | None = None) -> str | None:
    """None if the server at ``url`` answered, else what went wrong, in a few words.

    401 and 403 count as answers (the server is up; credentials are another matter);
    404 (a wrong URL) and server errors do not."""
    import httpx

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        response = httpx.get(url, timeout=timeout_s, follow_redirects=True, auth=auth, headers=headers)
    except httpx.TimeoutException:
        return f"no answer within {timeout_s:.0f} s"
    except httpx.ConnectError as err:
        return f"cannot connect ({_reason(err)})"
    except httpx.HTTPError as err:
        return f"{type(err).__name__}: {_reason(err)}"
    if response.status_code not in (200, 401, 403):
        return f"HTTP {response.status_code} from {url}"
    return None


def _reason(err: Exception) -> str:
    text = str(err) or type(err).__name__
    return text.split("] ", 1)[-1] if text.startswith("[Errno") else text


def check_tracking_server(timeout_s: float = TIMEOUT_S) -> None:
    """``MLFLOW_TRACKING_URI`` answers ``GET /health`` (when it is an http(s) server)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri.startswith(("http://", "https://")):
        return
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    auth = (user, password) if user and password else None
    if problem := _get(f"{uri.rstrip('/')}/health", timeout_s, auth, os.environ.get("MLFLOW_TRACKING_TOKEN")):
        raise ServerDown(f"MLflow tracking server {uri} (MLFLOW_TRACKING_URI) is not reachable: {problem}")


def check_prefect_api(timeout_s: float = TIMEOUT_S) -> None:
    """``PREFECT_API_URL`` answers ``GET /health`` (when it is set)."""
    url = os.environ.get("PREFECT_API_URL", "")
    if not url:
        return
    user, _, password = os.environ.get("PREFECT_API_AUTH_STRING", "").partition(":")
    auth = (user, password) if password else None
    if problem := _get(f"{url.rstrip('/')}/health", timeout_s, auth, os.environ.get("PREFECT_API_KEY")):
        raise ServerDown(f"Prefect API {url} (PREFECT_API_URL) is not reachable: {problem}")


def check_servers(timeout_s: float = TIMEOUT_S) -> None:
    """Both checks; raises :class:`ServerDown` with one line for the first that fails."""
    check_tracking_server(timeout_s)
    check_prefect_api(timeout_s)
