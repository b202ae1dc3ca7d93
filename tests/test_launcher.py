"""How workers are placed and started (no processes started here)."""

from __future__ import annotations

import sys

import pytest

from tasks.training.launcher import (
    IDLE_CYCLE_TIME_MS, WORKER_MODULE, HostSlots, LaunchError, build_command, check_hosts_reachable,
    horovod_has_idle_cycle, parse_hosts, summarize_failure, threads_per_worker, worker_environment,
)


def test_one_local_worker_runs_without_horovodrun() -> None:
    command = build_command(["-m", WORKER_MODULE, "job.json"], parse_hosts(None, 1))
    assert command == [sys.executable, "-m", WORKER_MODULE, "job.json"]


def test_local_workers_go_through_horovodrun_over_gloo() -> None:
    command = build_command(["-m", WORKER_MODULE, "job.json"], parse_hosts(None, 2))
    assert command[0].endswith("horovodrun")
    assert command[1:6] == ["--gloo", "-np", "2", "-H", "localhost:2"]
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


def test_launch_fit_starts_the_worker_module_on_the_job(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    from tasks.core.config import TrainParams
    from tasks.training import FitJob, launch_fit

    started = []

    def fake_run_workers(command: list[str], env: dict[str, str], cwd) -> None:
        started.append((command, env["SLIMFLOW_THREADS_PER_WORKER"], FitJob.read(tmp_path.joinpath(command[-1]))))

    monkeypatch.setattr("tasks.training.launcher.run_workers", fake_run_workers)
    job = FitJob(spec={"family": "mlp"}, prepared="p", output="o", checkpoints="c", epochs=1, batch_size=8, lr=0.1,
                 seed=1)
    launch_fit(job, TrainParams(workers=1, threads_per_worker=1), tmp_path)
    ((command, threads, sent),) = started
    assert command[:3] == [sys.executable, "-m", WORKER_MODULE] and threads == "1" and sent == job
