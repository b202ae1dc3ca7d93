"""No usage telemetry from slimflow's processes.

Two libraries slimflow runs report usage unless told not to: MLflow (>= 3.2) sends records
of the API calls a process makes to mlflow-telemetry.io (and ``mlflow ui`` passes on the
browser's clicks), and ONNX Runtime's Linux build (1.32) queues an event for each process
that loads it (the interpreter's path, the OS, the kind of network) in
``~/.cache/Microsoft/DeveloperTools/.onnxruntime/onnxruntime.db`` for Microsoft's
collector. A pipeline reports to its own stores and nowhere else, as Prefect's analytics
are off (:mod:`flows.prefect_settings`) and DVC's (the project's ``.dvc/config``; the
variable below covers the ``dvc`` commands slimflow's processes start in other
repositories too, such as the benchmarks' ``dvc init``, which reports before a config can
say no).

The libraries read their switches from the environment when they load, so
:func:`turn_off_telemetry` runs first in every slimflow process that may load them (the
command line, each stage, the fork server, ``make install``'s MLflow store template, a
loaded champion); the processes they start inherit it. A value
the user set wins: ``MLFLOW_DISABLE_TELEMETRY=false`` or ``ORT_DISABLE_TELEMETRY=0``
turns one back on.
"""

from __future__ import annotations

import os

TELEMETRY_OFF = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "ORT_DISABLE_TELEMETRY": "1",
    "DVC_NO_ANALYTICS": "1",
}


def turn_off_telemetry() -> None:
    """Apply :data:`TELEMETRY_OFF` to this process's environment, keeping what is already set."""
    for key, value in TELEMETRY_OFF.items():
        os.environ.setdefault(key, value)
