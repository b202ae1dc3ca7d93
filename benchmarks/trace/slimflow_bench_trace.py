"""Timing records of one pipeline run, per process, without touching the code it times.

benchmarks/bench_pipeline.py runs the pipeline with this folder first on ``PYTHONPATH``
and ``SLIMFLOW_BENCH_TRACE=<folder>``; every Python process started below it (the
``slimflow`` CLI, each DVC stage process, ``horovodrun``, the Horovod workers) then
loads :mod:`sitecustomize`, which calls :func:`install`. At exit each process writes
``<folder>/<pid>.json``:

- ``created``: when the kernel started the process (``/proc/self/stat``, 10 ms ticks);
  ``site``: when this module ran, i.e. the interpreter was up; ``exited``;
- ``spans``: ``[label, start, end]`` (epoch seconds) of
  - ``import:<package>``: the first, outermost import of each top-level package
    (``import mlflow`` counts pandas and SQLAlchemy under mlflow);
  - ``mlflow:<function>``: every outermost call into MLflow's API (fluent functions, ``MlflowClient``,
    ``log_model``, the registry, ``mlflow.data``);
  - ``dvc.<method>``: ``Repo()``, ``Repo.reproduce``, ``Repo.status``, ``Repo.push``;
  - ``prefect.server.start``/``stop``: Prefect's temporary API server;
    ``prefect.server.ensure``: the project's background server (started, or found);
  - ``horovod.init``/``shutdown``, and the project's own milestones, by wrapping module
    attributes after import: ``load_params`` (a stage's ``main`` has begun),
    ``run_workers`` (one job of a stage's worker pool: the first
    starts the workers), ``pool.close`` (the pool's workers leaving), ``run_epochs`` (the
    epochs of a worker), ``validate_start`` (a fine-tune's validation of the model it
    starts from: its curve's epoch 0).

Wrapping happens after a module is imported and before anyone binds its names, so
``from tasks.core.config import load_params`` gets the timed function. Nothing here
changes a result; with the variable unset it is never imported.
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

_spans: list[tuple[str, float, float]] = []
_local = threading.local()
_record: dict[str, Any] = {}


def _process_created(pid: int | str = "self") -> float | None:
    """Epoch seconds at which the kernel started process ``pid`` (None if it cannot tell)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        start_ticks = int(fields[19])  # field 22 of stat(5); the first two were cut off
        ticks = os.sysconf("SC_CLK_TCK")
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - start_ticks / ticks
        return time.time() - age
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def _depth(group: str) -> int:
    return getattr(_local, group, 0)


def _timed(fn: Callable, label: str, group: str) -> Callable:
    """``fn``, recording ``[label, start, end]`` of its outermost call within ``group``."""
    if getattr(fn, "__slimflow_timed__", False):
        return fn

    @functools.wraps(fn)
    def timed(*args: Any, **kwargs: Any) -> Any:
        if _depth(group):
            return fn(*args, **kwargs)
        setattr(_local, group, 1)
        start = time.time()
        try:
            return fn(*args, **kwargs)
        finally:
            setattr(_local, group, 0)
            _spans.append((label, start, time.time()))

    timed.__slimflow_timed__ = True  # type: ignore[attr-defined]
    return timed


def _wrap_attrs(owner: Any, names: list[str], prefix: str, group: str) -> None:
    """Time each of ``owner``'s ``names`` as ``<prefix>:<name>``, outermost within ``group``."""
    for name in names:
        value = owner.__dict__.get(name) if isinstance(owner, type) else getattr(owner, name, None)
        if isinstance(value, (staticmethod, classmethod)):
            continue
        if callable(value):
            setattr(owner, name, _timed(value, f"{prefix}:{name}", group))


def _public_functions(module: Any) -> list[str]:
    return [n for n, v in vars(module).items()
            if not n.startswith("_") and callable(v) and getattr(v, "__module__", "") == module.__name__
            and not isinstance(v, type)]


def _patch_mlflow(module: Any) -> None:
    import mlflow
    from mlflow.tracking import fluent

    names = _public_functions(fluent)
    _wrap_attrs(fluent, names, "mlflow", "mlflow")
    for name in names:  # mlflow.start_run is fluent.start_run, re-exported
        if hasattr(mlflow, name):
            setattr(mlflow, name, getattr(fluent, name))
    from mlflow.tracking.client import MlflowClient

    _wrap_attrs(MlflowClient, [n for n, v in vars(MlflowClient).items()
                               if not n.startswith("_") and callable(v)], "mlflow", "mlflow")


def _patch_log_model(module: Any) -> None:
    _wrap_attrs(module, ["log_model", "save_model"], module.__name__, "mlflow")


def _patch_mlflow_data(module: Any) -> None:
    _wrap_attrs(module, _public_functions(module), "mlflow.data", "mlflow")


def _patch_registry_fluent(module: Any) -> None:
    _wrap_attrs(module, ["register_model"], "mlflow", "mlflow")


def _patch_dvc(module: Any) -> None:
    repo = module.Repo
    for name in ("__init__", "reproduce", "status", "push"):
        value = repo.__dict__.get(name)
        if callable(value):
            setattr(repo, name, _timed(value, f"dvc.{name.strip('_')}", "dvc"))


def _patch_prefect_server(module: Any) -> None:
    server = module.SubprocessASGIServer
    server.start = _timed(server.start, "prefect.server.start", "prefect_server")
    server.stop = _timed(server.stop, "prefect.server.stop", "prefect_server")


def _patch_worker_pool(module: Any) -> None:
    pool = module.WorkerPool
    pool.run = _timed(pool.run, "run_workers", "run_workers")  # a job: launch (first) or hand-over
    pool.close = _timed(pool.close, "pool.close", "pool.close")


def _patch_horovod(module: Any) -> None:
    for name in ("init", "shutdown"):
        if hasattr(module, name):
            setattr(module, name, _timed(getattr(module, name), f"horovod.{name}", "horovod"))


def _patch_named(names: dict[str, str]) -> Callable[[Any], None]:
    def patch(module: Any) -> None:
        for name, label in names.items():
            if hasattr(module, name):
                setattr(module, name, _timed(getattr(module, name), label, label))

    return patch


# module -> what to wrap once it has been imported
PATCHES: dict[str, Callable[[Any], None]] = {
    "mlflow": _patch_mlflow,
    "mlflow.pytorch": _patch_log_model,
    "mlflow.pyfunc": _patch_log_model,
    "mlflow.data": _patch_mlflow_data,
    "mlflow.tracking._model_registry.fluent": _patch_registry_fluent,
    "dvc.repo": _patch_dvc,
    "prefect.server.api.server": _patch_prefect_server,
    "horovod.torch": _patch_horovod,
    "tasks.core.config": _patch_named({"load_params": "load_params"}),
    "tasks.training.pool": _patch_worker_pool,
    "flows.prefect_server": _patch_named({"ensure": "prefect.server.ensure", "stop": "prefect.server.stop"}),
    "tasks.training.loop": _patch_named({"run_epochs": "run_epochs", "validate_start": "validate_start"}),
}


class _ImportTimer:
    """A meta-path finder that times top-level imports and patches :data:`PATCHES`."""

    def __init__(self) -> None:
        self.busy: set[str] = set()

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        top = "." not in name
        if name in self.busy or not (top or name in PATCHES):
            return None
        self.busy.add(name)
        try:
            spec = None
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(name, path, target)
                if spec is not None:
                    break
        finally:
            self.busy.discard(name)
        loader = getattr(spec, "loader", None)
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        original = loader.exec_module
        patch = PATCHES.get(name)

        def exec_module(module: Any) -> None:
            outermost = top and not _depth("import")
            if outermost:
                _local.__dict__["import"] = 1
            start = time.time()
            try:
                original(module)
            finally:
                if outermost:
                    _local.__dict__["import"] = 0
                    _spans.append((f"import:{name}", start, time.time()))
            if patch is not None:
                try:
                    patch(module)
                except Exception as err:  # timing must never break the run
                    _record.setdefault("patch_errors", []).append(f"{name}: {err!r}")

        try:
            loader.exec_module = exec_module  # this module's own loader instance
        except AttributeError:
            pass
        return spec


def _write(folder: Path) -> None:
    _record["exited"] = time.time()
    _record["spans"] = sorted(_spans, key=lambda s: s[1])
    if _record.get("forked"):  # a child of the run's fork server: the command it became
        _record["cmdline"] = list(getattr(sys, "orig_argv", sys.argv))
        _record["horovod_rank"] = os.environ.get("HOROVOD_RANK")
        _record["client_created"] = _client_created()
        return _save(folder)
    try:
        _record["cmdline"] = Path("/proc/self/cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
    except OSError:
        _record["cmdline"] = list(sys.argv)
    _save(folder)


def _save(folder: Path) -> None:
    path = folder / f"{os.getpid()}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(_record))
    tmp.replace(path)


def install(folder: str) -> None:
    """Start timing this process; its record is written to ``folder`` at exit."""
    target = Path(folder)
    target.mkdir(parents=True, exist_ok=True)
    _record.update(
        pid=os.getpid(), ppid=os.getppid(), created=_process_created() or time.time(), site=time.time(),
        horovod_rank=os.environ.get("HOROVOD_RANK"),
    )
    sys.meta_path.insert(0, _ImportTimer())
    atexit.register(_write, target)
    os.register_at_fork(after_in_child=_forked)


def _forked() -> None:
    """A forked child (the fork server's: a stage or a worker) keeps its own record."""
    now = time.time()
    _spans.clear()
    _record.update(pid=os.getpid(), ppid=os.getppid(), created=now, site=now, forked=True)


def _client_created() -> float | None:
    """When the process this child became (the entry that asked the fork server) started."""
    try:
        from tasks.core import fork_server

        pid = fork_server.client_pid()
    except Exception:
        return None
    return _process_created(pid) if pid else None
