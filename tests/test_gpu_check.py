"""scripts/gpu_check.sh and scripts/gpu_check.py: every step that needs no GPU, here; the
GPU path (NCCL allreduce, NVML energy) where a CUDA GPU exists.

The GPU test is skipped without a GPU unless ``SLIMFLOW_TEST_GPU=1`` demands it (then it
fails), like Horovod's ``skip_or_fail_gpu_test``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "gpu_check.sh"
HELPER = REPO / "scripts" / "gpu_check.py"
VENV = Path(sys.prefix)  # the installed project venv: the dry run reuses it


def _helper() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_check", HELPER)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpu_check = _helper()


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def skip_or_fail_gpu_test(reason: str) -> None:
    """Skip, unless the environment demands GPU tests (SLIMFLOW_TEST_GPU=1): then fail."""
    if os.environ.get("SLIMFLOW_TEST_GPU") == "1":
        pytest.fail(f"SLIMFLOW_TEST_GPU=1 but {reason}")
    pytest.skip(reason)


def _run(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def _fake_cuda_home(home: Path, runtime: str, version: int) -> None:
    """A CUDA home as far as the build looks: nvcc, the runtime's headers, ``runtime`` (the library's path)."""
    for folder in ("bin", "include", str(Path(runtime).parent)):
        (home / folder).mkdir(parents=True, exist_ok=True)
    (home / "bin" / "nvcc").write_text("#!/bin/sh\n")
    (home / "include" / "cuda_runtime.h").write_text("")
    (home / "include" / "cuda_runtime_api.h").write_text(f"#define CUDART_VERSION {version}\n")
    (home / runtime).write_text("")


def _fake_pip_cuda(site: Path) -> None:
    """The layout of CUDA 13's and NCCL's pip packages, as far as the build looks."""
    _fake_cuda_home(site / "nvidia" / "cu13", "lib/libcudart.so.13", 13000)
    nccl = site / "nvidia" / "nccl"
    (nccl / "include").mkdir(parents=True)
    (nccl / "lib").mkdir()
    (nccl / "include" / "nccl.h").write_text("")
    (nccl / "lib" / "libnccl.so.2").write_text("")


def test_cuda_env_from_pip_packages(tmp_path: Path) -> None:
    _fake_pip_cuda(tmp_path)
    env = gpu_check.cuda_env(tmp_path)
    home = tmp_path / "nvidia" / "cu13"
    assert env["HOROVOD_GPU_OPERATIONS"] == "NCCL"
    assert env["HOROVOD_CUDA_HOME"] == env["CUDA_HOME"] == str(home)
    assert env["HOROVOD_NCCL_HOME"] == str(tmp_path / "nvidia" / "nccl")
    assert env["HOROVOD_NCCL_LINK"] == "SHARED"
    assert env["SLIMFLOW_CUDA_TAG"] == "cu130"
    # The unversioned names CMake looks for, and nvcc's targets/ folder, now resolve.
    assert (home / "lib" / "libcudart.so").resolve() == (home / "lib" / "libcudart.so.13").resolve()
    assert (tmp_path / "nvidia/nccl/lib/libnccl.so").resolve().name == "libnccl.so.2"
    assert (home / "targets/x86_64-linux/include/cuda_runtime.h").is_file()
    assert (home / "lib64" / "libcudart.so.13").exists()
    assert gpu_check.cuda_env(tmp_path) == env  # a second call changes nothing


def test_cuda_env_says_what_is_missing(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="no nvcc"):
        gpu_check.cuda_env(tmp_path)
    _fake_pip_cuda(tmp_path)
    (tmp_path / "nvidia/nccl/lib/libnccl.so.2").unlink()
    with pytest.raises(SystemExit, match="no NCCL"):
        gpu_check.cuda_env(tmp_path)


def test_cuda_env_from_a_toolkit_outside_pip(tmp_path: Path) -> None:
    """A host image with torch's NCCL from pip but nvcc from NVIDIA's installer (--offline)."""
    site, toolkit = tmp_path / "site", tmp_path / "cuda"
    _fake_pip_cuda(site)
    shutil.rmtree(site / "nvidia" / "cu13")  # no pip nvcc
    _fake_cuda_home(toolkit, "lib64/libcudart.so", 13020)  # NVIDIA's installer's layout
    with pytest.raises(SystemExit, match="no nvcc"):
        gpu_check.cuda_env(site)  # without the toolkit's folder
    env = gpu_check.cuda_env(site, toolkit)
    assert env["CUDA_HOME"] == env["HOROVOD_CUDA_HOME"] == str(toolkit)
    assert env["SLIMFLOW_CUDA_TAG"] == "cu132" and env["SLIMFLOW_CUDA_BIN"] == str(toolkit / "bin")
    assert env["HOROVOD_NCCL_HOME"] == str(site / "nvidia" / "nccl")
    assert env["SLIMFLOW_CUDA_LIBS"].split(":")[0] == str(toolkit / "lib64")
    assert not (toolkit / "targets").exists()  # a toolkit installed the usual way is left as it is


def test_nvml_reader_without_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails, as where nvidia-ml-py is missing
    reader = gpu_check.NvmlReader()
    assert not reader.available and "not installed" in reader.reason
    assert reader.energy_j() is None
    with gpu_check.EnergyWindow(reader) as window:
        pass
    assert window.figures()["energy_j"] is None and window.figures()["mean_power_w"] is None


def test_report_merges_every_step(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "steps.tsv").write_text("install\tok\t200.5\ncheck-build\tok\t3.0\npipeline\tskipped\t0\n")
    gpu_check.write_json(tmp_path / "wheel.json", {"key": "horovod-k-cu130-sm90", "source": "bundled"})
    for workers, per_worker in ((1, 1000.0), (4, 900.0)):
        gpu_check.write_json(tmp_path / f"throughput-{workers}.json", {
            "workers": workers, "precision": "bf16", "samples_per_s_per_worker": per_worker,
            "energy_j": None, "wall_s": 9.0})
    out = tmp_path / "gpu_check.json"
    result = gpu_check.report(tmp_path, out, dry_run=True)
    assert json.loads(out.read_text()) == json.loads(json.dumps(result, default=str))
    assert result["ok"] and result["within_budget"] and result["total_s"] == pytest.approx(203.5)
    assert result["scaling"] == {"workers": 4, "efficiency": pytest.approx(0.9)}
    assert "horovod: the bundle's wheel, not built here (horovod-k-cu130-sm90)" in capsys.readouterr().out
    (tmp_path / "steps.tsv").write_text("install\tfailed\t700\n")
    failed = gpu_check.report(tmp_path, out, dry_run=True)
    assert not failed["ok"] and not failed["within_budget"]


def test_wheel_cache_key_adds_cuda_to_the_cpu_key() -> None:
    done = subprocess.run(
        ["bash", "-c", f'set -euo pipefail; source scripts/lib/horovod_build.sh; '
                       f'horovod_wheel_key "{sys.executable}" 2.13.0; horovod_wheel_key "{sys.executable}" 2.13.0 -cu130-sm90'],
        cwd=REPO, capture_output=True, text=True, check=True)
    cpu, gpu = done.stdout.split()
    assert cpu.startswith("horovod-0.28.1+idlecycle.") and cpu.endswith(f"-torch2.13.0-cp{sys.version_info.major}{sys.version_info.minor}")
    assert gpu == cpu + "-cu130-sm90"


def test_a_bundled_sdist_fixed_already_is_not_patched_again(tmp_path: Path) -> None:
    """gpu_bundle.py carries Horovod's sdist with the fixes applied and marked: the host needs
    no patch or git. A mark of other fixes (another slimflow's) asks for a new bundle."""
    def prepare(mark: str) -> subprocess.CompletedProcess:
        src = tmp_path / mark.replace(" ", "_")
        src.mkdir()
        (src / "SLIMFLOW_FIXED").write_text(mark + "\n")
        return subprocess.run(["bash", "-c", f'set -euo pipefail; source scripts/lib/horovod_build.sh; '
                               f'horovod_prepare_source "{src}"'], cwd=REPO, capture_output=True, text=True)

    mark = subprocess.run(["bash", "-c", 'source scripts/lib/horovod_build.sh; echo "$(horovod_local_version) fixes $HOROVOD_FIXES"'],
                          cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    fixed = prepare(mark)
    assert fixed.returncode == 0 and f"fixes are applied already (SLIMFLOW_FIXED: {mark})" in fixed.stdout
    other = prepare("idlecycle.00000000 fixes 1")
    assert other.returncode == 1
    assert "the sdist was fixed by another slimflow (SLIMFLOW_FIXED: idlecycle.00000000 fixes 1" in other.stdout
    assert "make the bundle again (scripts/gpu_bundle.py)" in other.stdout


def test_the_bundles_horovod_wheel_for_this_hosts_key_goes_into_the_cache(tmp_path: Path) -> None:
    """--offline: the wheel gpu_bundle.py --horovod-wheel carries for the host's own key
    lands in the wheel cache, where the build takes it instead of building; a bundle with
    none for this key, or a wheel cached already, copies nothing (exit 1: build as before)."""
    key = "horovod-0.28.1+idlecycle.abcd1234-torch2.11.0-cp312-cu130-sm90"
    bundled, cache = tmp_path / "bundle" / "horovod-wheel", tmp_path / "cache"
    (bundled / key).mkdir(parents=True)
    wheel = bundled / key / "horovod-0.28.1+idlecycle.abcd1234-cp312-cp312-linux_x86_64.whl"
    wheel.write_bytes(b"the wheel's bytes")

    def take(for_key: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(HELPER), "take-wheel", str(bundled), for_key, str(cache)],
                              capture_output=True, text=True)

    assert take(key.replace("sm90", "sm80")).returncode == 1  # another GPU's key: nothing for it
    assert not cache.exists()
    assert take(key).returncode == 0
    assert [p.name for p in (cache / key).iterdir()] == [wheel.name]
    assert (cache / key / wheel.name).read_bytes() == b"the wheel's bytes"
    (cache / key / wheel.name).write_bytes(b"a wheel built here")
    assert take(key).returncode == 1  # one is cached already: kept
    assert (cache / key / wheel.name).read_bytes() == b"a wheel built here"


@pytest.mark.parametrize(("args", "message"), [
    (["--bogus"], "unknown argument: --bogus"),
    (["--epochs", "1"], "--epochs must be"),
    (["--out"], "--out needs a file"),
    (["--offline", "no-such-bundle"], "no wheels.tar.xz there (make the bundle with scripts/gpu_bundle.py)"),
])
def test_bad_arguments_are_refused(args: list[str], message: str) -> None:
    done = _run(*args)
    assert done.returncode == 2 and message in done.stderr


def test_help_and_no_gpu_without_dry_run(tmp_path: Path) -> None:
    done = _run("--help")
    assert done.returncode == 0 and "--dry-run" in done.stdout
    if shutil.which("nvidia-smi"):
        pytest.skip("this host has nvidia-smi")
    done = _run("--out", str(tmp_path / "x.json"), env={"SLIMFLOW_GPU_CHECK_DRY_RUN": "0"})
    assert done.returncode == 2 and "no NVIDIA GPU found" in done.stderr


def test_offline_needs_a_host_python_with_torch(tmp_path: Path) -> None:
    """--offline builds on the host's own torch: a Python without one is named, nothing installed."""
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    for name in ("wheels.tar.xz", "manifest.json", "horovod-0.28.1.tar.gz"):
        (bundle / name).write_text("{}" if name.endswith(".json") else "")
    bare = tmp_path / "python3"  # this interpreter without its site-packages: no torch
    bare.write_text(f"#!/bin/sh\nexec {sys.executable} -S \"$@\"\n")
    bare.chmod(0o755)
    out = tmp_path / "gpu_check.json"
    done = _run("--offline", str(bundle), "--dry-run", "--venv", str(tmp_path / "venv"), "--out", str(out),
                env={"PYTHON": str(bare), "SLIMFLOW_WHEEL_CACHE": str(tmp_path / "wheels")})
    assert done.returncode == 1
    assert f"{bare} has no torch: --offline builds on the host's own torch (set PYTHON)" in done.stderr
    assert not (tmp_path / "venv").exists()
    steps = {s["step"]: s["status"] for s in json.loads(out.read_text())["steps"]}
    assert steps == {"install": "failed"}


@pytest.mark.integration
def test_dry_run_exercises_every_cpu_step(tmp_path: Path) -> None:
    """The whole script on CPU, reusing the installed venv: nothing installed, nothing built."""
    out = tmp_path / "gpu_check.json"
    done = _run("--out", str(out), "--venv", str(VENV), env={"SLIMFLOW_GPU_CHECK_DRY_RUN": "1",
                                                              "SLIMFLOW_WHEEL_CACHE": str(tmp_path / "wheels")},
                timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["dry_run"] and result["ok"], result["steps"]
    steps = {s["step"]: s["status"] for s in result["steps"]}
    assert steps == {"install": "skipped", "wheel-key": "ok", "check-build": "ok", "allreduce": "ok", "copy": "ok",
                     "pipeline": "skipped", "prepare": "ok", "throughput-1": "ok", "latency": "ok", "nvml": "ok"}
    assert result["wheel"]["key"].endswith("-cu130-sm90") and not result["wheel"]["cached"]
    assert not (tmp_path / "wheels").exists()  # nothing built
    assert "PyTorch" in result["horovod_check_build"]
    allreduce = result["allreduce"]
    assert allreduce["all_correct"] and allreduce["world_size"] == 1 and allreduce["device"] == "cpu"
    assert result["throughput_1"]["samples_per_s_per_worker"] > 0 and result["throughput_1"]["epochs"] == 2
    assert result["throughput_n"] is None and result["scaling"] is None
    assert set(result["latency"]["models"]) == {"fp32", "bf16-autocast"}
    assert result["latency"]["models"]["fp32"]["latency_p50_ms"] > 0
    assert not result["nvml"]["available"] and result["nvml"]["reason"]
    assert "slimflow GPU check (dry run" in done.stdout


def test_gpu_allreduce_and_nvml_meter(tmp_path: Path) -> None:
    """On a GPU: Horovod's allreduce of CUDA tensors (NCCL where built) and NVML's energy counter."""
    if not _cuda_available():
        skip_or_fail_gpu_test("no CUDA GPU visible to torch")
    out = tmp_path / "allreduce.json"
    subprocess.run([sys.executable, str(HELPER), "allreduce", "--sizes-mb", "4", "--iterations", "3", "--out", str(out)],
                   check=True, timeout=300)
    result = json.loads(out.read_text())
    assert result["device"] == "cuda" and result["all_correct"]
    if not result["nccl_built"]:
        skip_or_fail_gpu_test("this Horovod was built without NCCL (scripts/gpu_check.sh builds one with it)")
    assert result["gpu_operations"] == "NCCL"
    reader = gpu_check.NvmlReader()
    if not reader.available:
        skip_or_fail_gpu_test(f"NVML energy counters unreadable: {reader.reason}")
    import torch

    with gpu_check.EnergyWindow(reader) as window:
        x = torch.randn(4096, 4096, device="cuda")
        for _ in range(50):
            x = x @ x.T / 4096
        torch.cuda.synchronize()
    assert window.joules is not None and window.joules > 0


@pytest.mark.integration
def test_a_checkout_sent_without_its_git_folder_is_copied_too(tmp_path: Path) -> None:
    """A GPU host may get the working tree without .git (a copy of the files): the project copy
    the pipeline runs in is then made from the files themselves."""
    checkout = tmp_path / "checkout"
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout.split(b"\0")
    for name in filter(None, files):
        source = REPO / name.decode()
        if source.is_file():
            target = checkout / name.decode()
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    out = tmp_path / "gpu_check.json"
    done = subprocess.run(["bash", str(checkout / "scripts" / "gpu_check.sh"), "--dry-run", "--venv", str(VENV),
                           "--out", str(out), "--keep-work"], cwd=checkout, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "SLIMFLOW_GPU_CHECK_WORK": str(tmp_path / "work")})
    assert done.returncode == 0, done.stderr[-3000:]
    steps = {s["step"]: s["status"] for s in json.loads(out.read_text())["steps"]}
    assert steps["copy"] == steps["prepare"] == steps["throughput-1"] == "ok"
    copy = tmp_path / "work" / "project"
    assert (copy / "dvc.yaml").is_file() and (copy / "tasks" / "train.py").is_file()
    assert (copy / "data" / "prepared").is_dir()  # prepare ran in the copy
