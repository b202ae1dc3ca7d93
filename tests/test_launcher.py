"""How workers are placed and started (no processes started here)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from tasks.training.launcher import (
    HOROVODRUN_MODULE, IDLE_CYCLE_TIME_MS, WORKER_MODULE, HostSlots, LaunchError, build_command, check_hosts_reachable,
    horovod_has_idle_cycle, parse_hosts, summarize_failure, threads_per_worker, worker_environment,
)


def test_one_local_worker_runs_without_horovodrun() -> None:
    command = build_command(["-m", WORKER_MODULE, "job.json"], parse_hosts(None, 1))
    assert command == [sys.executable, "-m", WORKER_MODULE, "job.json"]


def test_local_workers_go_through_horovodrun_over_gloo() -> None:
    command = build_command(["-m", WORKER_MODULE, "job.json"], parse_hosts(None, 2))
    assert command[:3] == [sys.executable, "-m", HOROVODRUN_MODULE]  # Horovod's horovodrun, our entry
    assert command[3:8] == ["--gloo", "-np", "2", "-H", "localhost:2"]
    assert command[-3:] == ["-m", WORKER_MODULE, "job.json"]


def test_hosts_and_network_interface_reach_the_launcher() -> None:
    hosts = parse_hosts("hostA:4,hostB:2", workers=1)
    assert hosts == [HostSlots("hostA", 4), HostSlots("hostB", 2)]
    command = build_command(["-m", WORKER_MODULE, "j"], hosts, network_interface="eth1")
    assert "-np" in command and command[command.index("-np") + 1] == "6"
    assert command[command.index("-H") + 1] == "hostA:4,hostB:2"
    assert command[command.index("--network-interface") + 1] == "eth1"


def test_threads_never_oversubscribe_the_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("tasks.training.launcher.usable_cores", lambda: 2)
    assert threads_per_worker(1) == 2
    assert threads_per_worker(2) == 1
    assert threads_per_worker(4) == 1
    assert threads_per_worker(2, configured=3) == 3


def test_unreachable_host_is_named_before_training(monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    # A loopback address with a port nobody listens on: refused at once, never leaves the machine.
    with socket.socket() as probe:
        probe.bind(("127.0.0.2", 0))
        free_port = probe.getsockname()[1]
    monkeypatch.setenv("HOROVOD_SSH_PORT", str(free_port))
    with pytest.raises(LaunchError, match="'127.0.0.2' is unreachable"):
        check_hosts_reachable([HostSlots("127.0.0.2", 1)], timeout_s=2)


def test_failure_summary_names_the_first_worker_that_died() -> None:
    lines = [
        "[1]<stderr>:12:00:01 slimflow.fit: fault injection: worker rank 1 exits with status 17 after epoch 2",
        "Process 1 exit with status code 17.",
        "[0]<stderr>:RuntimeError: Horovod has been shut down. This was caused by an exception on one of the ranks",
        "Process 0 exit with status code 1.",
        "RuntimeError: Horovod detected that one or more processes exited with non-zero status",
    ]
    summary = summarize_failure(lines)
    assert summary.startswith("worker 1 exited with status 17")
    assert "fault injection" in summary and "Horovod has been shut down" not in summary
    crashed = ["[0]<stdout>:ok", "[1]<stderr>:Traceback (most recent call last):", "[1]<stderr>:ValueError: bad shape",
               "Process 1 exit with status code 1."]
    assert summarize_failure(crashed) == (
        "worker 1 exited with status 1 (the first to fail; the others were stopped): ValueError: bad shape"
    )
    assert summarize_failure(["Traceback (most recent call last):", "KeyError: 'x'"]) == "worker 0: KeyError: 'x'"


def test_failure_summary_names_the_cause_when_a_reacting_worker_is_reported_first() -> None:
    """horovodrun reports exits in the order its watcher threads see them, so on a busy
    machine the worker that only reacted (Horovod shut down under it, or horovodrun stopped
    it) can come first: the one that crashed is still named. (The retry test failed once
    under load this way or another: a train run's error did not name status 17.)"""
    crash = "[1]<stderr>:12:00:01 slimflow.fit: fault injection: worker rank 1 exits with status 17 after epoch 2"
    shut_down = "[0]<stderr>:RuntimeError: Horovod has been shut down. This was caused by an exception on one of the ranks"
    for reported_first in (["Process 0 exit with status code 1."], ["Process 0 exit with status code 143."]):
        lines = [crash, shut_down, *reported_first, "Process 1 exit with status code 17."]
        assert summarize_failure(lines).startswith("worker 1 exited with status 17"), lines
    # Every worker reacting (the cause not among them): the first reported, as before.
    assert summarize_failure([shut_down, "Process 0 exit with status code 1."]).startswith("worker 0 exited with status 1")
    # A worker killed by the kernel (OOM: 137) is a cause, not a reaction.
    killed = ["[1]<stdout>:epoch 1", "Process 1 exit with status code 137.", shut_down, "Process 0 exit with status code 1."]
    assert summarize_failure(killed).startswith("worker 1 exited with status 137")


def test_worker_environment_carries_the_thread_count_or_leaves_it_to_each_host(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "8")
    local = worker_environment(1)
    assert local["OMP_NUM_THREADS"] == local["MKL_NUM_THREADS"] == local["SLIMFLOW_THREADS_PER_WORKER"] == "1"
    remote = worker_environment(None)
    assert "OMP_NUM_THREADS" not in remote and "SLIMFLOW_THREADS_PER_WORKER" not in remote


def test_workers_get_horovods_idle_cycle_from_the_patched_build_unless_set(monkeypatch: pytest.MonkeyPatch) -> None:
    # scripts/install.sh built and installed Horovod with scripts/horovod/idle-cycle.patch.
    assert horovod_has_idle_cycle()
    monkeypatch.delenv("HOROVOD_IDLE_CYCLE_TIME", raising=False)
    assert worker_environment(1)["HOROVOD_IDLE_CYCLE_TIME"] == str(IDLE_CYCLE_TIME_MS)
    monkeypatch.setenv("HOROVOD_IDLE_CYCLE_TIME", "0")  # the user's choice (0: upstream behaviour) wins
    assert worker_environment(1)["HOROVOD_IDLE_CYCLE_TIME"] == "0"


# A stand-in for `python -m tasks.training.worker --serve FOLDER` that follows the pool's
# protocol without Horovod: records each job it gets, fails on a job whose seed is 13.
STAND_IN_WORKER = """
import json, os, sys, time
from pathlib import Path
control = Path(sys.argv[-1])
if "STARTED" in os.environ:  # the pids of the workers started, as they start
    with open(os.environ["STARTED"], "a") as started:
        started.write(f"{os.getpid()}\\n")
number = 1
while True:
    job, stop = control / f"job-{number}.json", control / "stop"
    while not job.exists():
        if stop.exists():
            sys.exit(0)
        time.sleep(0.01)
    sent = json.loads(job.read_text())
    if sent["seed"] == 13:
        print("ValueError: bad job", flush=True)
        sys.exit(3)
    with open(os.environ["RECEIVED"], "a") as received:
        received.write(json.dumps({"pid": os.getpid(), "argv": sys.argv[1:], "threads": os.environ["SLIMFLOW_THREADS_PER_WORKER"], "job": sent}) + "\\n")
    (control / f"done-{number}").write_text("")
    number += 1
"""


def stand_in_workers(monkeypatch: pytest.MonkeyPatch, tmp_path) -> Path:
    """Pools start the stand-in (the real command's arguments passed on); returns its record."""
    import subprocess

    from tasks.training import pool

    received = tmp_path / "received.jsonl"
    monkeypatch.setenv("RECEIVED", str(received))

    def start(command: list[str], env: dict[str, str], cwd) -> subprocess.Popen[str]:
        assert command[:3] == [sys.executable, "-m", WORKER_MODULE]  # one local worker: no horovodrun
        return subprocess.Popen([sys.executable, "-c", STAND_IN_WORKER, *command[3:]], cwd=cwd, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    monkeypatch.setattr(pool, "start_workers", start)
    return received


def received_jobs(received) -> list[dict]:
    import json

    return [json.loads(line) for line in received.read_text().splitlines()] if received.exists() else []


def small_job(seed: int = 1):
    from tasks.training import FitJob

    return FitJob(spec={"family": "mlp"}, prepared="p", output="o", checkpoints="c", epochs=1, batch_size=8,
                  lr=0.1, seed=seed)


def test_a_pool_sends_a_stages_jobs_in_turn_to_workers_started_once(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    from tasks.core.config import TrainParams
    from tasks.training import launch_fit, worker_pool

    received = stand_in_workers(monkeypatch, tmp_path)
    params = TrainParams(workers=1, threads_per_worker=1)
    with worker_pool(params, tmp_path) as pool:
        for seed in (1, 2, 3):
            launch_fit(small_job(seed), params, tmp_path)
            assert [r["job"]["seed"] for r in received_jobs(received)][-1] == seed  # done before it returns
        # Other settings (here: threads) get workers of their own, for that job alone.
        launch_fit(small_job(4), TrainParams(workers=1, threads_per_worker=2), tmp_path)
    rows = received_jobs(received)
    assert [r["job"]["seed"] for r in rows] == [1, 2, 3, 4]
    assert len({r["pid"] for r in rows[:3]}) == 1 and rows[3]["pid"] != rows[0]["pid"]
    assert rows[0]["argv"][0] == "--serve" and [r["threads"] for r in rows] == ["1", "1", "1", "2"]
    assert rows[0]["job"] == json.loads(small_job(1).to_json())
    assert pool.launches == 1 and pool.jobs == 3
    control = Path(rows[0]["argv"][1])
    assert not control.exists()  # the control folder goes with the pool


def test_a_pool_started_on_entering_has_its_workers_up_before_the_first_job_and_sends_it_to_them(
    monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    """A stage that will train starts its workers first (they start up beside its other work);
    a block that then trains nothing lets them leave cleanly."""
    from tasks.core.config import TrainParams
    from tasks.core.processes import is_running
    from tasks.training import launch_fit, worker_pool

    received = stand_in_workers(monkeypatch, tmp_path)
    started = tmp_path / "started"
    monkeypatch.setenv("STARTED", str(started))
    params = TrainParams(workers=1, threads_per_worker=1)

    def started_pids() -> list[int]:
        """The pids written so far, once a worker has written a whole line (the file exists
        from its ``open``, before its line is in it)."""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if started.exists() and (text := started.read_text()).endswith("\n"):
                return [int(line) for line in text.split()]
            time.sleep(0.01)
        return [int(line) for line in started.read_text().split()] if started.exists() else []

    with worker_pool(params, tmp_path, start=True) as pool:
        (worker,) = started_pids()  # up with no job sent
        assert (pool.launches, pool.jobs, received_jobs(received)) == (1, 0, [])
        launch_fit(small_job(1), params, tmp_path)
    assert [r["pid"] for r in received_jobs(received)] == [worker] and pool.launches == 1
    assert started_pids() == [worker]

    started.unlink()
    with worker_pool(params, tmp_path, start=True) as pool:
        (idle,) = started_pids()
    assert not is_running(idle) and pool.jobs == 0  # told to stop, it left
    with worker_pool(params, tmp_path) as pool:  # by default the workers start at the first job
        pass
    assert pool.launches == 0 and started_pids() == [idle]


def test_a_failed_job_names_the_worker_and_the_pool_starts_new_workers_for_the_next(
    monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    from tasks.core.config import TrainParams
    from tasks.training import launch_fit, worker_pool

    received = stand_in_workers(monkeypatch, tmp_path)
    params = TrainParams(workers=1, threads_per_worker=1)
    with worker_pool(params, tmp_path) as pool:
        launch_fit(small_job(1), params, tmp_path)
        with pytest.raises(LaunchError, match=r"exit code 3\): worker 0: ValueError: bad job"):
            launch_fit(small_job(13), params, tmp_path)
        launch_fit(small_job(2), params, tmp_path)
    rows = received_jobs(received)
    assert [r["job"]["seed"] for r in rows] == [1, 2]
    assert rows[0]["pid"] != rows[1]["pid"] and pool.launches == 2
