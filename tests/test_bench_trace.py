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


def test_the_timeline_lists_processes_in_start_order_with_their_longer_spans() -> None:
    cli = bench.Proc(10, 1, 100.0, 100.05, 130.0, ["python", ".venv/bin/slimflow", "run"], None,
                     [("import:mlflow", 100.5, 103.0), ("mlflow:end_run", 129.0, 129.01)])
    stage = bench.Proc(20, 11, 107.5, 107.5, 108.0, ["python", "-m", "tasks.prepare"], None, [])
    worker = bench.Proc(30, 11, 109.0, 109.0, 112.0, ["python", "-m", "tasks.training.worker", "--serve"], "0",
                        [("run_epochs", 109.2, 111.9)])
    lines = bench.timeline([worker, stage, cli], t0=100.0)
    assert lines[0] == "cli (pid 10): started 0.00, interpreter up 0.05, exited 30.00"
    assert lines[1].split() == ["0.50", "3.00", "2.50", "import:mlflow"]  # the 10 ms end_run is left out
    assert lines[2] == "stage:prepare (pid 20): started 7.50, interpreter up 7.50, exited 8.00"
    assert lines[3] == "worker rank 0 (pid 30): started 9.00, interpreter up 9.00, exited 12.00"
    assert lines[4].split() == ["9.20", "11.90", "2.70", "run_epochs"]
    assert len(lines) == 5


def test_a_fine_tunes_start_validation_is_training_work_not_hand_over() -> None:
    """Rank 0 validates the model a fine-tune starts from before its first epoch: work,
    though it falls inside the hand-over window (job sent -> first epoch)."""
    stage = bench.Proc(20, 11, 100.0, 100.0, 110.0, ["python", "-m", "tasks.compress"], None,
                       [("load_params", 100.0, 100.1), ("run_workers", 101.0, 109.0)])
    worker = bench.Proc(30, 20, 101.2, 101.2, 109.5, ["python", "-m", "tasks.training.worker", "--serve"], "0",
                        [("validate_start", 102.0, 104.0), ("run_epochs", 104.5, 108.5)])
    seconds = bench.attribute(bench.intervals([stage, worker]), 100.0, 110.0)
    assert seconds[bench.EPOCHS] == pytest.approx(6.0)
    assert seconds[bench.HVD_LAUNCH] == pytest.approx(1.5)  # 101.0-102.0 and 104.0-104.5


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


def test_the_mlflow_shape_counts_the_first_pipeline_run_and_every_run_under_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """bench_floor.py logs as much as the run wrote: the first pipeline's tree only, nested
    runs at any depth, every metric value (history included), and the models logged."""
    import mlflow

    monkeypatch.chdir(tmp_path)  # the new experiment's files go to ./mlruns
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_experiment("slimflow")
    try:
        with mlflow.start_run(tags={"pipeline": "slimflow"}):
            mlflow.log_param("p", 1)
            with mlflow.start_run(nested=True):  # a stage
                mlflow.log_metric("loss", 1.0, step=0)
                mlflow.log_metric("loss", 0.5, step=1)
                with mlflow.start_run(nested=True):  # a model under the stage
                    mlflow.log_metric("accuracy", 0.9)
                    mlflow.pyfunc.log_model(name="model", python_model=mlflow.pyfunc.PythonModel(),
                                            pip_requirements=["mlflow"])
        time.sleep(0.01)
        with mlflow.start_run(tags={"pipeline": "slimflow"}):  # a later pipeline run: not counted
            mlflow.log_metric("x", 1.0)
        shape = bench.mlflow_shape(tmp_path, f"sqlite:///{tmp_path / 'mlflow.db'}")
    finally:
        mlflow.set_tracking_uri(None)
    assert shape["runs"] == 3 and shape["nested_runs"] == 2
    assert shape["metric_values"] == 3 and shape["params"] == 1 and shape["models_logged"] == 1
    assert shape["tags"] >= 3  # ours and MLflow's own (user, source, parent)


def test_the_floor_groups_every_overhead_cause_once() -> None:
    import bench_floor

    causes = {"Prefect: API server": 3.0, "Prefect flow/task engine": 1.0, "DVC bookkeeping": 2.0,
              "MLflow (import in the CLI, ...)": 9.0, "Horovod launch": 2.5, "Horovod teardown": 0.5,
              "stage process start": 3.0, "fork server's imports": 1.0}
    figures = {"prefect_server_start_s": 4.0, "dvc_reproduce_s": 0.2, "mlflow": {"cpu_s": 3.0, "wall_s": 3.2},
               "horovod_rendezvous_s": 0.1, "imports_s": {"prefect": 1.2, "mlflow": 1.6, "torch": 1.5}}
    gap = {group: (measured, least) for group, measured, least in bench_floor.gap_by_cause(causes, figures, pools=2)}
    assert sum(measured for measured, _ in gap.values()) == pytest.approx(sum(causes.values()))
    assert gap["Prefect"] == (4.0, 4.0) and gap["Horovod"] == (3.0, pytest.approx(0.2))
    assert gap["process starts and imports"] == (4.0, 0.0) and gap["MLflow"] == (9.0, 1.5)
    bounds = bench_floor.floor(figures, pools=2)
    assert bounds["cold_s"] == pytest.approx(4.0 + 0.2 + 1.5 + 0.2)
    assert bounds["warm_s"] == pytest.approx(1.6 + 0.2 + 1.5 + 0.2)  # the largest import instead of the server


def test_the_floor_with_imports_shares_two_cores_before_the_first_stage() -> None:
    """The imports' and the server's CPU seconds share two cores before the first stage;
    the start is never shorter than the server's start, nor than the largest import."""
    import bench_floor

    figures = {"prefect_server_start_s": 3.0, "prefect_server_start_cpu_s": 2.8, "dvc_reproduce_s": 0.2,
               "mlflow": {"cpu_s": 3.0, "wall_s": 3.2}, "horovod_rendezvous_s": 0.1,
               "imports_s": {"prefect": 1.1, "mlflow": 1.4, "torch": 1.3},
               "imports_cpu_s": {"prefect": 1.0, "mlflow": 1.3, "torch": 1.3}}
    after_start = 0.2 + 1.5 + 0.2
    bounds = bench_floor.floor_with_imports(figures, pools=2)
    assert bounds["cold_s"] == pytest.approx((2.8 + 3.6) / 2 + after_start)
    assert bounds["warm_s"] == pytest.approx(3.6 / 2 + after_start)
    # Never below the simpler floor, cold or warm.
    plain = bench_floor.floor(figures, pools=2)
    assert bounds["cold_s"] >= plain["cold_s"] and bounds["warm_s"] >= plain["warm_s"]
    # One import that outweighs the rest: the start waits for it, whatever two cores could share.
    figures["imports_s"], figures["imports_cpu_s"] = {"torch": 5.0}, {"torch": 4.9}
    assert bench_floor.floor_with_imports(figures, pools=2)["warm_s"] == pytest.approx(5.0 + after_start)
    # A server that starts slowly but idles (waits, not CPU) still sets the cold start.
    figures["prefect_server_start_s"], figures["prefect_server_start_cpu_s"] = 8.0, 1.0
    assert bench_floor.floor_with_imports(figures, pools=2)["cold_s"] == pytest.approx(8.0 + after_start)


def test_a_runs_overhead_is_its_wall_less_its_work_every_cause_listed() -> None:
    """The first run and the run again (server up) are summed up alike: overhead = wall -
    (stage work + epochs), every cause listed (0 where the run had none)."""
    causes = {bench.MLFLOW: 3.0, bench.DVC: 1.0, bench.STAGE_WORK: 10.0, bench.EPOCHS: 4.0, bench.OUTSIDE: 0.5}
    summary = bench.overhead_summary(causes, wall=18.5)
    assert summary["work_s"] == pytest.approx(14.0)
    assert summary["overhead_s"] == pytest.approx(4.5)
    assert summary["overhead_share"] == pytest.approx(4.5 / 18.5)
    assert list(summary["overhead_by_cause_s"]) == list(bench.CAUSES)
    assert summary["overhead_by_cause_s"][bench.PREFECT_SERVER] == 0.0
    assert sum(summary["overhead_by_cause_s"].values()) == pytest.approx(summary["overhead_s"])


def test_each_reproduce_call_is_given_to_the_stage_it_started_after_a_short_stage_too() -> None:
    """A stage that takes less than the start-time slack (prepare: 0.45 s with the server up)
    must not be taken for the next one: the train stage's call is the train stage's."""
    cli = bench.Proc(10, 1, 0.0, 0.05, 10.0, ["python", ".venv/bin/slimflow", "run"], None,
                     [("dvc.reproduce", 2.75, 3.21), ("dvc.reproduce", 3.22, 6.51)])
    prepare = bench.Proc(20, 11, 2.81, 2.91, 3.10, ["python", "-m", "tasks.prepare"], None, [("load_params", 2.92, 2.93)])
    train = bench.Proc(21, 11, 3.24, 3.38, 6.41, ["python", "-m", "tasks.train"], None, [("load_params", 3.40, 3.41)])
    stages = bench.trace_breakdown([cli, prepare, train], 0.0, 10.0)["stages"]
    assert set(stages) == {"prepare", "train"}
    assert stages["prepare"]["reproduce_s"] == pytest.approx(0.46)
    assert stages["train"]["reproduce_s"] == pytest.approx(3.29)


def test_a_job_sent_to_workers_started_earlier_is_timed_to_its_own_first_epoch() -> None:
    """A pool started with its stage (cut 10) has its workers up before the job: the job's
    hand-over is the call to this job's first epoch, and the workers' start is no step of it."""
    stage = bench.Proc(20, 11, 0.0, 0.1, 20.0, ["python", "-m", "tasks.compress"], None,
                       [("run_workers", 5.0, 6.0), ("run_workers", 8.0, 9.5)])
    runner = bench.Proc(30, 20, 0.3, 0.4, 19.0, ["python", "-m", "tasks.training.horovodrun"], None, [])
    rank0 = bench.Proc(31, 30, 0.6, 0.7, 19.0, ["python", "-m", "tasks.training.worker", "--serve"], "0",
                       [("horovod.init", 0.8, 1.0), ("validate_start", 5.1, 5.2), ("run_epochs", 5.2, 5.9),
                        ("run_epochs", 8.3, 9.4)])
    result = bench.trace_breakdown([stage, runner, rank0], 0.0, 20.0)
    first, second = result["horovod_launch"]
    assert first["rank0_first_epoch_s"] == pytest.approx(0.1) and first["rank0_last_epoch_end_s"] == pytest.approx(0.9)
    assert second["rank0_first_epoch_s"] == pytest.approx(0.3) and second["launcher_returned_s"] == pytest.approx(1.5)
    assert "rank0_started_s" not in first and "horovodrun_started_s" not in second
    assert result["horovod_pools"] == 1


@pytest.mark.parametrize("script, argv", [
    ("bench_pipeline.py", ["--reanalyse"]),            # misspelt: the old bench ignored it and ran for minutes
    ("bench_pipeline.py", ["--data", "noisy28:10"]),
    ("bench_pipeline.py", ["--before", "no-such-figures.json", "--reanalyze"]),
    ("bench_floor.py", ["--help-me"]),
    ("run.py", ["pipeline"]),
])
def test_a_bench_given_a_wrong_option_says_which_and_runs_nothing(script: str, argv: list[str], tmp_path: Path) -> None:
    results = REPO / "benchmarks" / "results"
    before = {p: p.stat().st_mtime_ns for p in results.glob("*.json")} if results.is_dir() else {}
    started = time.monotonic()
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *argv], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stdout + done.stderr
    assert argv[0] in done.stderr and "error:" in done.stderr
    assert time.monotonic() - started < 30  # refused before any benchmark started
    after = {p: p.stat().st_mtime_ns for p in results.glob("*.json")} if results.is_dir() else {}
    assert after == before


def test_the_pipeline_bench_reads_its_data_option() -> None:
    assert bench.parse_args([]).data == ("digits", None)
    assert bench.parse_args(["--data", "noisy28:10000"]).data == ("noisy28", 10000)
    assert bench.parse_args(["--reanalyze", "--timeline"]).reanalyze
