"""The pipeline benchmark's timing (benchmarks/trace/) and how it attributes the wall time."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import bench_pipeline as bench  # noqa: E402


def test_each_instant_goes_to_its_innermost_cause() -> None:
    spans = [
        (0.0, 10.0, 1, bench.CLI),
        (2.0, 8.0, 3, bench.DVC),           # reproduce
        (3.0, 7.0, 4, bench.STAGE_WORK),    # the stage process inside it
        (3.0, 4.0, 5, bench.STAGE_START),
        (5.0, 5.5, 9, bench.MLFLOW),
    ]
    seconds = bench.attribute(spans, -1.0, 11.0)
    assert seconds == pytest.approx({bench.OUTSIDE: 2.0, bench.CLI: 4.0, bench.DVC: 2.0, bench.STAGE_START: 1.0,
                                     bench.STAGE_WORK: 2.5, bench.MLFLOW: 0.5})
    assert sum(seconds.values()) == pytest.approx(12.0)


def test_importtime_counts_what_the_project_imports_itself() -> None:
    # -X importtime prints a module after its imports, indented by depth.
    stderr = "\n".join([
        "import time: self [us] | cumulative | imported package",
        "import time:       100 |        100 |       pandas.core",
        "import time:       200 |        300 |     pandas",
        "import time:      1000 |       1300 |   mlflow",
        "import time:        50 |         50 |   tasks.core",
        "import time:        10 |       1360 | tasks.train",
        "import time:        70 |         70 | site",
    ])
    assert bench.parse_importtime(stderr) == pytest.approx({"mlflow": 0.0013, "site": 0.00007})


def test_tracer_records_a_process(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO / "benchmarks" / "trace"), "SLIMFLOW_BENCH_TRACE": str(tmp_path)}
    code = "import colorsys, tasks.core.config as c; c.load_params"  # a patched module, a top-level import
    subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**env, "PYTHONPATH": env["PYTHONPATH"] + os.pathsep + str(REPO)},
                   check=True, timeout=60)
    (record_file,) = tmp_path.glob("*.json")
    record = json.loads(record_file.read_text())
    assert record["created"] - 0.05 <= record["site"] <= record["exited"]  # /proc: 10 ms ticks
    labels = {span[0] for span in record["spans"]}
    assert "import:colorsys" in labels and "import:tasks" in labels
    assert not record.get("patch_errors")
    procs = bench.load_trace(tmp_path)
    assert procs[0].role == "other" and procs[0].cmdline[:2] == [sys.executable, "-c"]


@pytest.mark.integration
def test_a_fork_server_child_is_timed_as_the_stage_process_it_became(tmp_path: Path) -> None:
    """In a run with a fork server the stage process DVC starts hands over to a forked child:
    the trace keeps one record for the stage, under its own command line, from the moment
    DVC started it; the server keeps its own."""
    trace = tmp_path / "trace"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "benchmarks" / "trace"), str(REPO)]),
           "SLIMFLOW_BENCH_TRACE": str(trace)}
    env.pop("SLIMFLOW_FORK_SERVER", None)
    socket_path = tmp_path / "socket"
    server = subprocess.Popen([sys.executable, "-m", "tasks.core.fork_server", str(socket_path)], cwd=REPO, env=env)
    try:
        deadline = time.monotonic() + 30
        while not socket_path.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        started = time.time()
        stage = subprocess.run([sys.executable, "-m", "tasks.prepare", "--help"], cwd=REPO, capture_output=True,
                               text=True, env={**env, "SLIMFLOW_FORK_SERVER": str(socket_path)}, timeout=120)
        assert stage.returncode == 0 and "--set KEY=VALUE" in stage.stdout
    finally:
        server.terminate()
        server.wait(timeout=30)
    procs = bench.load_trace(trace)
    (prepare,) = [p for p in procs if p.role == "stage:prepare"]  # the entry itself left no record
    (fork_server,) = [p for p in procs if p.role == "fork-server"]
    assert prepare.ppid == fork_server.pid
    assert started - 0.05 <= prepare.created <= prepare.site <= prepare.exited  # from DVC's start of it
