"""Shared fixtures: tiny projects made from this repository, a real MLflow store per test,
and one Prefect test server per session."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tasks.core.telemetry import turn_off_telemetry

REPO = Path(__file__).resolve().parents[1]
# DVC's usage analytics, for the DVC projects tests make themselves (the repository's own
# .dvc/config turns them off): each DVC command started a daemon that tried the network
# and left its report in the temporary directory (98 files there after a few test runs).
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
# MLflow's and ONNX Runtime's usage telemetry, off in this process and every process a test
# starts, as slimflow's own processes keep them (the tests of that switch unset it first).
turn_off_telemetry()
PROJECT_FILES = ("dvc.yaml", "params.yaml", ".dvcignore", "tasks", "models", "flows")

# Small enough for a 2-core machine, large enough to learn digits.
TINY_PARAMS = {
    "train": {"epochs": 3, "batch_size": 32, "model": {"channels": [8, 16]}, "workers": 2, "patience": 3},
    "compress": {"variants": [{"name": "int8-dynamic", "steps": [{"method": "quantize", "mode": "dynamic", "runtime": "torch"}]}]},
    "evaluate": {"latency_repeats": 5, "warmup": 1, "throughput_batch": 64},
}


def deep_update(base: dict, changes: dict) -> dict:
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            deep_update(base[key], value)
        else:
            base[key] = value
    return base


def _git(root: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=root, check=True, capture_output=True)


def free_port() -> int:
    """A port on 127.0.0.1 nothing listens on now (for a test's server)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def make_project(dest: Path, params: dict | None = None) -> Path:
    """A copy of this project (code, dvc.yaml, params.yaml) as its own git + DVC repository."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in PROJECT_FILES:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif source.exists():
            shutil.copy2(source, dest / name)
    (dest / "data" / "raw").mkdir(parents=True, exist_ok=True)
    (dest / "data" / "raw" / "README.md").write_text("raw data goes here\n")
    merged = deep_update(yaml.safe_load((REPO / "params.yaml").read_text()), params or {})
    (dest / "params.yaml").write_text(yaml.safe_dump(merged, sort_keys=False))
    (dest / ".gitignore").write_text((REPO / ".gitignore").read_text() + ".slimflow/\n")
    _git(dest, "init", "-q")
    _git(dest, "config", "user.email", "tests@slimflow.invalid")
    _git(dest, "config", "user.name", "slimflow tests")
    dvc = str(Path(os.sys.executable).parent / "dvc")
    subprocess.run([dvc, "init", "-q"], cwd=dest, check=True)
    subprocess.run([dvc, "config", "core.analytics", "false"], cwd=dest, check=True)
    _git(dest, "add", "-A")
    _git(dest, "commit", "-qm", "tiny project")
    return dest


def _mlruns_entries(folder: Path) -> set[str]:
    """The experiment and run folders under an ``mlruns/`` folder (two levels)."""
    return {str(path.relative_to(folder)) for path in folder.glob("*/*")} if folder.is_dir() else set()


@pytest.fixture(scope="session", autouse=True)
def checkout_mlruns_untouched() -> Iterator[None]:
    """No test leaves MLflow files in the checkout's own ``mlruns/`` (where a user's runs of
    this project live): MLflow puts a new experiment's files under ``./mlruns`` of the
    working directory, so a test that makes one must stand in its own folder."""
    before = _mlruns_entries(REPO / "mlruns")
    yield
    added = sorted(_mlruns_entries(REPO / "mlruns") - before)
    assert not added, f"tests wrote into {REPO / 'mlruns'}: {', '.join(added[:5])}"


@pytest.fixture
def mlflow_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh, real MLflow sqlite store for one test, its artifacts under ``tmp_path`` too:
    MLflow puts a new experiment's files in ``./mlruns`` of the working directory, which
    was the checkout's own (``mlruns/1`` held a run folder per test run)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    for key in ("MLFLOW_EXPERIMENT_ID", "SLIMFLOW_RUN_CONTEXT", "MLFLOW_RUN_ID"):
        monkeypatch.delenv(key, raising=False)
    import mlflow

    mlflow.set_tracking_uri(uri)
    return uri


@pytest.fixture(scope="session")
def prefect_server() -> Iterator[None]:
    """One temporary Prefect API for the whole session (13-17 s to start here)."""
    from flows.prefect_settings import use_project_prefect_settings

    use_project_prefect_settings(REPO)  # what the CLI does before Prefect is imported
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture
def tiny_project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mlflow_uri: str) -> Path:
    """A tiny project to run the real pipeline in; the test's working directory."""
    root = make_project(tmp_path / "project", TINY_PARAMS)
    monkeypatch.chdir(root)
    monkeypatch.setenv("SLIMFLOW_ROOT", str(root))
    return root


@pytest.fixture(scope="session")
def prefect_api_url(prefect_server: None) -> str:
    """The session Prefect API, for `slimflow` subprocesses (no temporary server per run)."""
    from prefect.settings import PREFECT_API_URL

    return str(PREFECT_API_URL.value())


def run_processes(root: Path) -> dict[int, str]:
    """pid -> command line of every live process of the runs of the project at ``root``: those
    whose environment has ``SLIMFLOW_ROOT=<root>`` (:func:`slimflow` sets it, every process a run
    starts inherits it), so other work on a shared machine is never counted."""
    needle = f"SLIMFLOW_ROOT={root}".encode()
    found = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = Path(f"/proc/{entry.name}/environ").read_bytes()
            stat = Path(f"/proc/{entry.name}/stat").read_bytes()
            cmdline = Path(f"/proc/{entry.name}/cmdline").read_bytes()
        except OSError:
            continue
        if needle in environ.split(b"\0") and b") Z " not in stat:
            found[int(entry.name)] = cmdline.replace(b"\0", b" ").decode(errors="replace").strip()
    return found


def seconds_until_gone(root: Path, limit_s: float = 30.0, ignore: set[int] = frozenset()) -> float:
    """How long until no process of the runs of ``root`` is left, but those in ``ignore``
    (``limit_s`` at most)."""
    import time

    started = time.monotonic()
    while set(run_processes(root)) - set(ignore) and time.monotonic() - started < limit_s:
        time.sleep(0.05)
    return time.monotonic() - started


def slimflow(root: Path, *args: str, env: dict | None = None, timeout: float = 600, **popen) -> subprocess.CompletedProcess:
    """Run the `slimflow` console script of this venv in ``root``."""
    exe = str(Path(os.sys.executable).parent / "slimflow")
    full_env = {**os.environ, "SLIMFLOW_ROOT": str(root), **(env or {})}
    return subprocess.run([exe, *args], cwd=root, env=full_env, capture_output=True, text=True, timeout=timeout, **popen)


def serve_leftovers(temporary: Path) -> list[str]:
    """What Prefect's runner (``slimflow serve``) left in its temporary folder ``temporary``:
    its storage folder, each flow run's attempt and workspace folders, or serve's own."""
    return sorted(p.name for p in temporary.iterdir()
                  if p.name == "runner_storage" or p.name.startswith(("prefect-", "slimflow-serve-"))
                  or (p.name.startswith("tmp") and p.name.endswith("prefect")))
