"""What the run's fork server (:mod:`tasks.core.fork_server`) loads before it forks: the
libraries every stage and worker imports, MLflow's stores, and CodeCarbon's CPU model,
one step at a time (the server serves requests between two steps)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from tasks.core.energy import cpu_model_from_kernel, know_cpu_model, remember_cpu_model

log = logging.getLogger("tasks.core.fork_server")

# MLflow's stores are opened once the run says its tracking store exists (the marker file
# beside the socket, :meth:`ForkServer.tracking_ready`): on a new project the run creates
# the database, and two processes creating MLflow's tables at once can fail.
STORES_STEP = "@mlflow-stores"
# CodeCarbon's CPU model (and its TDP), found once for every child's energy meter. Where the
# kernel names the model (``/proc/cpuinfo``, :func:`tasks.core.energy.know_cpu_model`) the
# step reads it. Elsewhere it comes from py-cpuinfo, which runs a Python subprocess for it
# (``cpuinfo.py --json``: 1.1-1.2 s, a core busy for 1 s of it while its child measures the
# clock); the server starts that subprocess first thing and answers requests meanwhile, and
# the step runs when it has finished (measured: a stage that asked during the old in-line
# call waited 1.2 s).
CPU_MODEL_STEP = "@cpu-model"
# From here the server forks a successor that loads the remaining steps while it goes on
# serving (:func:`tasks.core.fork_server_process.serve`): the train stage's processes, which ask
# while the compress and evaluate stages' libraries load, need none of them (measured: the
# train stage, horovodrun and the workers waited 0.4-0.8 s, 0.2-0.3 s and 0.1-0.6 s for a
# step of ONNX or matplotlib to end).
HANDOVER_STEP = "@handover"
# MLflow's map of the installed distributions' modules (``packages_distributions()``, read
# from every distribution's metadata), which each process builds at its first logged model
# (0.3 s alone, 0.5 s in the evaluate stage's first ``pyfunc.log_model``; measured).
MLFLOW_PACKAGES_STEP = "@mlflow-packages"
# What the stages and workers import, in the order the pipeline needs it: the server
# serves a request between two steps, so the prepare stage (MLflow, numpy) need not wait
# for torch and ONNX, which load while it runs. Libraries only: the project's own modules
# are each stage's, small (0.1-0.2 s), and a stage's DVC deps must not grow by every module
# named here. A module that fails to import is skipped:
# the process that needs it reports it in its own words, as it would without the server.
# Not ONNX Runtime: importing it starts a thread of its own (measured), and a fork copies
# only the thread that forks. OpenBLAS's threads (numpy, scipy) are made for forking (they
# re-arm in the child through pthread_atfork); pyarrow's jemalloc purging thread is not
# started at all in the server (``JE_ARROW_MALLOC_CONF``, tasks.core.fork_server.main).
# "git" is GitPython (MLflow's start_run reads the commit); "horovod.runner.launch" and
# "tabulate" are horovodrun's (the launcher imports setuptools, through distutils). Not
# scikit-learn: the built-in data sets are read from its files without it (1.0-1.2 CPU-s,
# tasks.sources.builtin).
# torch._dynamo (``torch.optim`` imports it) is three steps, not one of 1.0-1.1 s: sympy
# (0.35 s), torch.distributed.fsdp (0.16 s), the rest (0.55 s). A run whose Prefect server
# is up asks for its prepare stage about when the server gets there, and a request waits
# for the step in progress (traced: 0.33-0.49 s, asked during sympy each time).
MLFLOW_SQL_STORES = ("mlflow.store.tracking.sqlalchemy_store", "mlflow.store.model_registry.sqlalchemy_store")
PRELOAD = (
    "numpy", "pandas", "mlflow", *MLFLOW_SQL_STORES, STORES_STEP, "git",                    # prepare
    "torch", "torch.nn", "sympy", "torch.distributed.fsdp", "torch._dynamo",                # train
    "horovod.torch", "horovod.runner.launch", "tabulate",
    "codecarbon", CPU_MODEL_STEP,
    HANDOVER_STEP,
    "mlflow.pytorch", "torch.ao.quantization", "torch.onnx", "onnx", "onnxscript",      # compress
    "networkx", "mlflow.pyfunc", "mlflow.models", MLFLOW_PACKAGES_STEP,
    "psutil", "matplotlib.figure", "matplotlib.backends.backend_agg",                   # evaluate
)


def preload_step(name: str, tracking_ready: Path, cpu_model: CpuModelProbe | None = None) -> None:
    """Import ``name``, or run the warm-up ``@name``; failures are left to the processes."""
    import importlib

    try:
        if name == STORES_STEP:
            open_mlflow_stores(tracking_ready.read_text().strip())
        elif name == MLFLOW_PACKAGES_STEP:
            warm_mlflow_packages_map()
        elif name == CPU_MODEL_STEP:
            if cpu_model.remember() if cpu_model is not None else know_cpu_model():
                warm_cpu_power_table()
        else:
            importlib.import_module(name)
    except Exception as err:  # noqa: BLE001 - any error: the process that needs it reports it
        log.debug("fork server: %s not loaded ahead: %s", name, err)


class CpuModelProbe:
    """py-cpuinfo's own subprocess, run beside the server; its answer goes into CodeCarbon's
    cache (``detect_cpu_model``), so every child's energy meter has the CPU model for free.

    Its stdout is in the server's selector: :meth:`read` takes what arrived, and
    :attr:`finished` is set at end of file. A probe that fails leaves the cache empty;
    the children then ask py-cpuinfo themselves, as without the server.
    """

    def __init__(self, command: list[str] | None = None) -> None:
        import importlib

        # One small module; the command is the one cpuinfo.get_cpu_info() runs.
        if command is None:
            command = [sys.executable, importlib.import_module("cpuinfo.cpuinfo").__file__, "--json"]
        # Its own process group: py-cpuinfo runs its CPUID query in a child of its own, and a
        # probe stopped before it answered (:meth:`close`) takes that child along.
        self.process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        assert self.process.stdout is not None
        self.fd = self.process.stdout.fileno()
        os.set_blocking(self.fd, False)
        self.output = b""
        self.finished = False
        self.started = time.monotonic()

    def overdue(self, timeout_s: float) -> bool:
        """Whether the probe is still running ``timeout_s`` after its start."""
        return not self.finished and time.monotonic() - self.started > timeout_s

    def read(self) -> None:
        """Take what the probe wrote; at end of file, reap it."""
        try:
            data = os.read(self.fd, 65536)
        except BlockingIOError:
            return
        if data:
            self.output += data
            return
        self.process.wait()
        self.finished = True

    def remember(self) -> bool:
        """Put the probe's answer into CodeCarbon's cache; whether there was one."""
        if self.process.returncode != 0:
            return False
        info = json.loads(self.output.decode() or "{}")
        if not info:
            return False
        remember_cpu_model(info.get("brand_raw", ""))
        return True

    def close(self) -> None:
        import signal

        if not self.finished:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process.wait()
            self.finished = True  # a second close must not signal the group again (its id may be reused)
        if self.process.stdout is not None:
            self.process.stdout.close()


def warm_cpu_power_table() -> None:
    """CodeCarbon's per-process CPU power lookup (its reference tables, read with pandas and
    json, and the CPU's TDP found in them), done once here instead of in every child's
    energy meter, where it ran in the meter's set-up thread beside the stage's own start.
    It needs the CPU model, so it runs after :meth:`CpuModelProbe.remember` filled its cache."""
    from codecarbon.core import cpu, hardware_cache

    # As the energy meter has it (tasks.core.energy): a CPU CodeCarbon does not know got two
    # warnings printed by the server into the run's output; the meter states its source itself.
    logging.getLogger("codecarbon").setLevel(logging.ERROR)
    hardware_cache.get_cached_tdp(cpu)


def warm_mlflow_packages_map() -> None:
    """MLflow's module-to-distribution map, built once here for every child that logs a model
    (a private MLflow function: where it is gone, each process builds the map itself)."""
    from mlflow.utils import requirements_utils

    requirements_utils._init_packages_to_modules_map()


def open_mlflow_stores(uri: str) -> None:
    """Create MLflow's tracking and registry stores for ``uri`` (the schema check: about a
    second per process), then close their connections: children reuse the checked stores
    (MLflow caches them by URI) and open connections of their own."""
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    os.environ["MLFLOW_TRACKING_URI"] = uri  # resolved as the stages resolve it
    for store in (tracking_utils._get_store(), registry_utils._get_store()):
        engine = getattr(store, "engine", None)
        if engine is not None:
            engine.dispose()


def start_cpu_model_probe() -> CpuModelProbe | None:
    """py-cpuinfo's subprocess, started; None where the kernel names the CPU model (the step
    reads it there) or the probe cannot start (the children then ask for it themselves)."""
    if cpu_model_from_kernel() is not None:
        return None
    try:
        return CpuModelProbe()
    except Exception as err:  # noqa: BLE001 - no py-cpuinfo, no subprocess: the children ask themselves
        log.debug("fork server: no CPU model probe: %s", err)
        return None
