"""The fork server of a ``dvc repro`` (tasks.core.dvc_fork_server), under real DVC: the
stages of one reproduction after the first start as children of one server with torch
and the rest imported; the server ends with DVC and leaves nothing behind;
``SLIMFLOW_FORK_SERVER=off`` keeps every stage in its own process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from tasks.core.fork_preload import PRELOAD

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.integration

# A stage entry written like tasks/prepare.py and the others: it asks for a fork first.
STAGE = '''
import sys
if __name__ == "__main__":
    from tasks.core.dvc_fork_server import run_stage_forked
    run_stage_forked("stage", light=sys.argv[1] == "light")

import json, os
from tasks.core import fork_server_process
json.dump({
    "pid": os.getpid(), "ppid": os.getppid(), "forked": fork_server_process.in_child(),
    "torch": "torch" in sys.modules, "last_preloaded": LAST in sys.modules,
}, open(sys.argv[2], "w"))
'''
LAST_MODULE = [step for step in PRELOAD if not step.startswith("@")][-1]
DVC_YAML = """stages:
  first:
    cmd: python -m stage light first.json
    outs: [first.json]
  second:
    cmd: python -m stage heavy second.json
    deps: [first.json]
    outs: [second.json]
  third:
    cmd: python -m stage heavy third.json
    deps: [second.json]
    outs: [third.json]
"""


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "stage.py").write_text(STAGE.replace("LAST", repr(LAST_MODULE)))
    (tmp_path / "dvc.yaml").write_text(DVC_YAML)
    subprocess.run([str(Path(sys.executable).parent / "dvc"), "init", "--no-scm", "-q"], cwd=tmp_path, check=True)
    return tmp_path


def repro(project: Path, *args: str, shell: str = "/bin/bash", **env: str) -> tuple[int, dict[str, dict[str, Any]]]:
    """``dvc repro ARGS`` in ``project`` (stage commands through ``shell``); DVC's pid and what each stage reported."""
    environ = {k: v for k, v in os.environ.items() if k not in ("SLIMFLOW_FORK_SERVER", "DVC_STAGE")}
    environ.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{environ['PATH']}", SHELL=shell,
                   PYTHONPATH=f"{project}{os.pathsep}{REPO}", **env)
    dvc = subprocess.Popen([str(Path(sys.executable).parent / "dvc"), "repro", *args], cwd=project, env=environ,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = dvc.communicate(timeout=180)
    except subprocess.TimeoutExpired as hung:  # say who was still there, and in what state
        pytest.fail(f"dvc repro {' '.join(args)} did not end (or something kept its output open):\n"
                    f"{_processes_and_folders(dvc.pid)}\noutput so far:\n{hung.output!r}")
    assert dvc.returncode == 0, output
    # The server's loading prints nothing into DVC's output (CodeCarbon warned of an unknown CPU).
    assert "codecarbon" not in output.lower(), output
    reports = {path.stem: json.loads(path.read_text()) for path in project.glob("*.json")}
    return dvc.pid, reports


def _processes_and_folders(dvc_pid: int) -> str:
    """What a hung reproduction left: the processes under this test and the server folders
    (then it stops them all)."""
    lines = []
    processes = psutil.Process().children(recursive=True)
    servers = [p for p in psutil.process_iter(["cmdline"]) if "tasks.core.fork_server" in " ".join(p.info["cmdline"] or [])]
    for process in {p.pid: p for p in processes + servers}.values():
        try:
            lines.append(f"{process.pid} ppid={process.ppid()} {process.status()} "
                         f"threads={process.num_threads()} {' '.join(process.cmdline())[:160]}")
        except psutil.Error:
            pass
    for folder in server_folders(dvc_pid):
        lines.append(f"{folder}: {sorted(path.name for path in folder.iterdir())}")
    for process in processes + servers:
        try:
            process.kill()
        except psutil.Error:
            pass
    return "\n".join(lines)


def server_folders(dvc_pid: int) -> list[Path]:
    return list(Path(tempfile.gettempdir()).glob(f"slimflow-fork-dvc-{dvc_pid}-*"))


def gone(pid: int, within_s: float = 10.0) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("shell", ["/bin/bash", "/bin/sh"])  # bash execs the stage's command; dash does not
def test_the_stages_after_the_first_are_children_of_one_server_that_ends_with_dvc(project: Path, shell: str) -> None:
    dvc_pid, stages = repro(project, shell=shell)
    first, second, third = stages["first"], stages["second"], stages["third"]
    # The light first stage started the server and ran by itself meanwhile.
    assert not first["forked"] and not first["torch"]
    # The next ones became children of the server, with its imports done.
    assert second["forked"] and third["forked"]
    assert second["torch"] and third["torch"]
    assert second["ppid"] == third["ppid"] != first["pid"]
    server = second["ppid"]
    assert gone(server), "the server outlived the dvc repro that it served"
    assert server_folders(dvc_pid) == [], "the server left its socket folder behind"


def test_a_stage_that_starts_the_server_waits_for_everything_to_load(project: Path) -> None:
    """A heavy stage reproduced alone never imports beside the server's own loading."""
    repro(project)
    dvc_pid, stages = repro(project, "-f", "-s", "third")
    assert stages["third"]["forked"] and stages["third"]["last_preloaded"]
    assert gone(stages["third"]["ppid"])
    assert server_folders(dvc_pid) == []


def test_off_keeps_every_stage_in_its_own_process(project: Path) -> None:
    dvc_pid, stages = repro(project, SLIMFLOW_FORK_SERVER="off")
    assert not any(report["forked"] for report in stages.values())
    assert not stages["second"]["torch"]
    assert server_folders(dvc_pid) == []


def test_a_server_that_never_finishes_loading_costs_one_wait_not_one_per_stage(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]) -> None:
    """A stage gives up waiting for a server stuck loading, says so once, and runs by itself;
    the stages after it of the same reproduction run by themselves at once."""
    from tasks.core import dvc_fork_server

    monkeypatch.setattr(dvc_fork_server, "LOADED_TIMEOUT_S", 1.0)
    (tmp_path / "stuck_step.py").write_text(
        "import signal, time; signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM}); time.sleep(600)")
    owner = os.getpid()  # the process whose stages the server serves: this test, as DVC
    folder = dvc_fork_server.socket_folder(owner)
    assert folder is not None
    folder.mkdir(mode=0o700)
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}"}
    server = subprocess.Popen([sys.executable, "-c", "from tasks.core.fork_server_process import serve; "
                               f"serve({str(folder / 'socket')!r}, ('stuck_step',), {owner})"], cwd=REPO, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # the stage's words alone
    try:
        deadline = time.monotonic() + 30
        while not (folder / "socket").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        started = time.monotonic()
        assert dvc_fork_server._server_of(owner, light=False) is None
        assert time.monotonic() - started >= 1.0
        said = capfd.readouterr().err
        assert "has not loaded its libraries in 1 s (last step begun: stuck_step (process" in said
        assert str(folder / "socket") in said
        started = time.monotonic()
        assert dvc_fork_server._server_of(owner, light=False) is None  # the next stage: no second wait
        assert dvc_fork_server._server_of(owner, light=True) is None  # nor a light one's fork from it
        assert time.monotonic() - started < 0.5
        assert capfd.readouterr().err == ""
    finally:
        server.kill()
        server.wait()
        import shutil

        shutil.rmtree(folder, ignore_errors=True)
