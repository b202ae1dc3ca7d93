"""Training across hosts, for real: the train stage with ``train.hosts`` runs one Horovod
worker on each of two hosts, started by ``horovodrun`` over SSH.

The hosts are made on this machine: three network namespaces (the launcher, host a, host b)
joined by a bridge inside the launcher's namespace, nothing in the machine's own network.
Each host namespace runs an sshd the test starts (its own host key, an authorized key the
test makes, port 2222) with a hostname of its own (a UTS namespace) that resolves to its
own address (a private /etc/hosts). The filesystem is shared, so the venv and the project
have the same paths everywhere, as on a cluster with a shared home.

Each authorized key runs a recording wrapper before the command, so the test sees what
every host was asked to run, and under which hostname.

Needs root (namespaces) and sshd (scripts/install_test_services.sh installs openssh-server).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from conftest import TINY_PARAMS, deep_update, make_project

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent
SSH_PORT = 2222
SUBNET = "10.77.0"


def _require_root_and_tools() -> tuple[str, str]:
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    ip = shutil.which("ip") or next((p for p in ("/usr/sbin/ip", "/sbin/ip") if os.access(p, os.X_OK)), None)
    sshd = "/usr/sbin/sshd" if os.access("/usr/sbin/sshd", os.X_OK) else None
    missing = [name for name, path in (("iproute2 (ip)", ip), ("openssh-server (sshd)", sshd)) if not path]
    if missing:
        pytest.fail(f"{', '.join(missing)} not found; scripts/install_test_services.sh installs them (make test runs it)")
    return ip, sshd  # type: ignore[return-value]


class Hosts:
    """Two SSH hosts and a launcher, as network namespaces on this machine."""

    def __init__(self, folder: Path) -> None:
        self.ip, self.sshd = _require_root_and_tools()
        tag = f"{os.getpid() % 0xFFFF:04x}"
        self.folder = folder
        self.launcher = f"sfl-{tag}"
        self.namespaces = {"a": f"sfa-{tag}", "b": f"sfb-{tag}"}
        self.interface = f"sfn{tag}"  # the training network's interface: same name everywhere
        self.address = {"launcher": f"{SUBNET}.1", "a": f"{SUBNET}.2", "b": f"{SUBNET}.3"}
        self.hostname = {"a": "slimflow-host-a", "b": "slimflow-host-b"}
        self.key = folder / "id_ed25519"
        self.bin = folder / "bin"
        self._sshd: list[subprocess.Popen] = []
        self._made: list[str] = []

    # -- setup / teardown
    def __enter__(self) -> Hosts:
        try:
            self._network()
            self._ssh()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _cmd(self, *args: str) -> None:
        result = subprocess.run([self.ip, *args], capture_output=True, text=True, timeout=30)
        if result.returncode != 0:
            raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")

    def _network(self) -> None:
        for namespace in (self.launcher, *self.namespaces.values()):
            self._cmd("netns", "add", namespace)
            self._made.append(namespace)
            self._cmd("-n", namespace, "link", "set", "lo", "up")
        # The bridge lives in the launcher's namespace and carries its address.
        self._cmd("-n", self.launcher, "link", "add", self.interface, "type", "bridge")
        self._cmd("-n", self.launcher, "addr", "add", f"{self.address['launcher']}/24", "dev", self.interface)
        self._cmd("-n", self.launcher, "link", "set", self.interface, "up")
        for name, namespace in self.namespaces.items():
            port = f"v{name}{self.interface[3:]}"
            self._cmd("-n", self.launcher, "link", "add", port, "type", "veth",
                      "peer", "name", self.interface, "netns", namespace)
            self._cmd("-n", self.launcher, "link", "set", port, "master", self.interface)
            self._cmd("-n", self.launcher, "link", "set", port, "up")
            self._cmd("-n", namespace, "addr", "add", f"{self.address[name]}/24", "dev", self.interface)
            self._cmd("-n", namespace, "link", "set", self.interface, "up")

    def _ssh(self) -> None:
        keygen = ["ssh-keygen", "-q", "-t", "ed25519", "-N", ""]
        subprocess.run([*keygen, "-C", "slimflow-tests", "-f", str(self.key)], check=True)
        subprocess.run([*keygen, "-f", str(self.folder / "host_key")], check=True)
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation directory
        user_key = (self.folder / "id_ed25519.pub").read_text().strip()
        host_key = " ".join((self.folder / "host_key.pub").read_text().split()[:2])
        # Every host's name resolves to its address on the training network: Gloo binds
        # Horovod's process-set contexts to the address of the hostname (see docs/team.md).
        hosts_file = self.folder / "hosts"
        hosts_file.write_text("127.0.0.1 localhost\n" + "".join(
            f"{self.address[n]} {self.hostname[n]}\n" for n in self.namespaces))
        (self.folder / "known_hosts").write_text("".join(
            f"[{self.address[n]}]:{SSH_PORT} {host_key}\n" for n in self.namespaces))
        for name, namespace in self.namespaces.items():
            record = self.folder / f"record-{name}.sh"
            record.write_text(
                "#!/bin/sh\n"
                f'printf "%s\\t%s\\n" "$(uname -n)" "$SSH_ORIGINAL_COMMAND" >> {self.commands_log(name)}\n'
                'exec /bin/sh -c "$SSH_ORIGINAL_COMMAND"\n'
            )
            record.chmod(0o755)
            (self.folder / f"authorized_keys-{name}").write_text(f'command="{record}" {user_key}\n')
            config = self.folder / f"sshd-{name}.conf"
            config.write_text("\n".join([
                f"Port {SSH_PORT}", f"ListenAddress {self.address[name]}",
                f"HostKey {self.folder / 'host_key'}",
                f"AuthorizedKeysFile {self.folder / f'authorized_keys-{name}'}",
                "PidFile none", "PermitRootLogin prohibit-password", "PasswordAuthentication no",
                "KbdInteractiveAuthentication no", "UsePAM no", "StrictModes no", "PrintMotd no",
                "MaxStartups 64", "LogLevel VERBOSE", "",
            ]))
            log = (self.folder / f"sshd-{name}.log").open("w")
            self._sshd.append(subprocess.Popen(
                [self.ip, "netns", "exec", namespace, "unshare", "--uts", "--mount", "sh", "-c",
                 f"mount --bind {hosts_file} /etc/hosts && hostname {self.hostname[name]} "
                 f"&& exec {self.sshd} -D -e -f {config}"],
                stdout=log, stderr=subprocess.STDOUT,
            ))
        # The client side: the test's key and known_hosts, never the user's ~/.ssh
        # (horovodrun runs plain `ssh`, so a wrapper first on PATH adds the options).
        self.bin.mkdir()
        wrapper = self.bin / "ssh"
        wrapper.write_text(
            "#!/bin/sh\n"
            f'exec /usr/bin/ssh -o UserKnownHostsFile={self.folder / "known_hosts"} '
            '-o BatchMode=yes -o LogLevel=ERROR "$@"\n'
        )
        wrapper.chmod(0o755)
        for name in self.namespaces:
            self._wait_for_sshd(name)

    def _wait_for_sshd(self, name: str, timeout_s: float = 20) -> None:
        probe = f"import socket; socket.create_connection(('{self.address[name]}', {SSH_PORT}), timeout=1).close()"
        deadline = time.monotonic() + timeout_s
        while subprocess.run(self.in_launcher(sys.executable, "-c", probe), capture_output=True).returncode != 0:
            if time.monotonic() > deadline:
                log = (self.folder / f"sshd-{name}.log").read_text()
                raise RuntimeError(f"sshd on host {name} did not come up:\n{log}")
            time.sleep(0.2)

    def close(self) -> None:
        for process in self._sshd:
            process.terminate()
        for process in self._sshd:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
        # Deleting a namespace removes its interfaces (and the veth peers with them).
        for namespace in reversed(self._made):
            subprocess.run([self.ip, "netns", "del", namespace], capture_output=True, timeout=30)
        self._made.clear()

    # -- use
    def commands_log(self, name: str) -> Path:
        return self.folder / f"commands-{name}.log"

    def commands(self, name: str) -> list[tuple[str, str]]:
        """(hostname, command) for every SSH command host ``name`` ran."""
        path = self.commands_log(name)
        lines = path.read_text().splitlines() if path.exists() else []
        return [tuple(line.split("\t", 1)) for line in lines if "\t" in line]  # type: ignore[misc]

    def in_launcher(self, *command: str) -> list[str]:
        return [self.ip, "netns", "exec", self.launcher, *command]

    def environment(self, base: dict[str, str]) -> dict[str, str]:
        env = dict(base)
        env["PATH"] = f"{BIN}{os.pathsep}{self.bin}{os.pathsep}{env.get('PATH', '')}"
        env["HOROVOD_SSH_PORT"] = str(SSH_PORT)
        env["HOROVOD_SSH_IDENTITY_FILE"] = str(self.key)
        return env


@pytest.fixture
def hosts(tmp_path: Path) -> Iterator[Hosts]:
    folder = tmp_path / "hosts"
    folder.mkdir()
    with Hosts(folder) as lab:
        yield lab


def _set_hosts(root: Path, hosts: str, interface: str) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["train"].update(hosts=hosts, network_interface=interface)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.mark.timeout(600)
def test_train_stage_runs_one_worker_on_each_of_two_hosts(hosts: Hosts, tmp_path: Path, mlflow_uri: str) -> None:
    params = deep_update(json.loads(json.dumps(TINY_PARAMS)), {"train": {"epochs": 1}})
    root = make_project(tmp_path / "project", params)
    a, b = hosts.address["a"], hosts.address["b"]
    _set_hosts(root, f"{a}:1,{b}:1", hosts.interface)
    env = hosts.environment({k: v for k, v in os.environ.items() if not k.startswith(("SLIMFLOW_", "MLFLOW_RUN"))})
    env["MLFLOW_TRACKING_URI"] = mlflow_uri

    # The train stage as DVC runs it (prepare first), launched from the launcher's namespace.
    started = time.monotonic()
    result = subprocess.run(hosts.in_launcher(str(BIN / "dvc"), "repro", "train"), cwd=root, env=env,
                            capture_output=True, text=True, timeout=420)
    seconds = time.monotonic() - started
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"dvc repro train exited {result.returncode} after {seconds:.0f} s:\n{output[-6000:]}"

    metrics = json.loads((root / "metrics" / "train.json").read_text())
    assert metrics["world_size"] == 2
    import mlflow

    experiment = mlflow.get_experiment_by_name("slimflow")
    (train_run,) = mlflow.search_runs([experiment.experiment_id], filter_string="tags.stage = 'train'", output_format="list")
    assert train_run.info.status == "FINISHED"
    assert train_run.data.params["world_size"] == "2"

    # horovodrun reached each host over SSH and started one worker there, under that
    # host's own name: rank 0 on host a, rank 1 on host b.
    for name, rank in (("a", 0), ("b", 1)):
        workers = [(hostname, command) for hostname, command in hosts.commands(name) if "tasks.training.worker" in command]
        assert len(workers) == 1, hosts.commands(name)
        hostname, command = workers[0]
        assert hostname == hosts.hostname[name]
        assert f"HOROVOD_RANK={rank} " in command and "HOROVOD_SIZE=2 " in command
        assert f"HOROVOD_GLOO_IFACE={hosts.interface}" in command
    # Only rank 0 logs the training progress.
    epoch_lines = [line for line in output.splitlines() if "slimflow.fit: epoch " in line]
    assert epoch_lines and all(line.startswith("[0]<") for line in epoch_lines), epoch_lines

    # An unreachable host is named before any worker starts, and nothing is overwritten.
    before = (root / "metrics" / "train.json").stat().st_mtime_ns
    unreachable = f"{SUBNET}.9"
    _set_hosts(root, f"{a}:1,{unreachable}:1", hosts.interface)
    started = time.monotonic()
    refused = subprocess.run(hosts.in_launcher(sys.executable, "-m", "tasks.train"), cwd=root, env=env,
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0
    assert f"train.hosts: host '{unreachable}' is unreachable on SSH port {SSH_PORT}" in refused.stderr, refused.stderr[-3000:]
    assert sum("tasks.training.worker" in command for _, command in hosts.commands("a")) == 1  # no new worker
    assert (root / "metrics" / "train.json").stat().st_mtime_ns == before
    assert time.monotonic() - started < 60
