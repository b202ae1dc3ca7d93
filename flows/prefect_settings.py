"""Prefect's settings for a slimflow project, applied by the CLI before Prefect is imported.

Prefect reads its settings from the environment when it is first imported, so
:func:`use_project_prefect_settings` runs first in every ``slimflow`` command (never as an
import side effect). It sets, unless already set:

- ``PREFECT_HOME=<project>/.prefect``: the flow-run history of the project's background
  API server (:mod:`flows.prefect_server`; ``make prefect-ui`` prints its URL) or of the
  temporary one lives with the project (``~/.prefect`` is shared by everything on the machine);
- no telemetry (nothing may reach the internet), no client metrics, no print capture;
- a start-up timeout long enough for Prefect's temporary server on a loaded 2-core
  machine (it counts only its sleeps: the real wait is longer).
"""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
    "PREFECT_LOGGING_LOG_PRINTS": "false",
    "PREFECT_UI_ENABLED": "true",
    "PREFECT_CLIENT_METRICS_ENABLED": "false",
}


def project_prefect_settings(root: Path) -> dict[str, str]:
    """The settings slimflow uses for the project at ``root``."""
    return {"PREFECT_HOME": str(root / ".prefect"), **PROJECT_DEFAULTS}


def use_project_prefect_settings(root: Path) -> dict[str, str]:
    """Apply :func:`project_prefect_settings` to this process (values already set win);
    returns what is in force."""
    for key, value in project_prefect_settings(root).items():
        os.environ.setdefault(key, value)
    Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)
    return {key: os.environ[key] for key in project_prefect_settings(root)}
