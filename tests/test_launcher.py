"""How workers are placed and started (no processes started here)."""

from __future__ import annotations

import sys

import pytest

from tasks.launcher import HostSlots, LaunchError, build_command, check_hosts_reachable, parse_hosts, threads_per_worker


def test_one_local_worker_runs_without_horovodrun() -> None:
    command = build_command(["-m", "tasks.fit", "job.json"], parse_hosts(None, 1))
    assert command == [sys.executable, "-m", "tasks.fit", "job.json"]


def test_local_workers_go_through_horovodrun_over_gloo() -> None:
    command = build_command(["-m", "tasks.fit", "job.json"], parse_hosts(None, 2))
    assert command[0].endswith("horovodrun")
    assert command[1:6] == ["--gloo", "-np", "2", "-H", "localhost:2"]
    assert command[-3:] == ["-m", "tasks.fit", "job.json"]


def test_hosts_and_network_interface_reach_the_launcher() -> None:
    hosts = parse_hosts("hostA:4,hostB:2", workers=1)
    assert hosts == [HostSlots("hostA", 4), HostSlots("hostB", 2)]
    command = build_command(["-m", "tasks.fit", "j"], hosts, network_interface="eth1")
    assert "-np" in command and command[command.index("-np") + 1] == "6"
    assert command[command.index("-H") + 1] == "hostA:4,hostB:2"
    assert command[command.index("--network-interface") + 1] == "eth1"


def test_threads_never_oversubscribe_the_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("tasks.launcher.usable_cores", lambda: 2)
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
