"""Prefect flows, deployments and the ``slimflow`` CLI.

Prefect reads its settings when it is first imported, so the project's defaults are set
here, before any module of this package imports it: a per-project ``PREFECT_HOME``,
no telemetry (nothing may reach the internet), and a start-up timeout long enough for
Prefect's temporary server on a loaded 2-core machine. Anything already set wins.
"""

import os
from pathlib import Path

from tasks.paths import find_project_root

_root = find_project_root()
os.environ.setdefault("PREFECT_HOME", str(_root / ".prefect"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.setdefault("PREFECT_LOGGING_LOG_PRINTS", "false")
os.environ.setdefault("PREFECT_UI_ENABLED", "true")
os.environ.setdefault("PREFECT_CLIENT_METRICS_ENABLED", "false")
Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)
