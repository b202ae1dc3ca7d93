"""scripts/gpu_bundle.py: what travels to a GPU host that reaches no package index."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[1]


def _bundle() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_bundle", REPO / "scripts" / "gpu_bundle.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpu_bundle = _bundle()


def test_it_carries_what_the_image_lacks_and_never_the_images_torch(tmp_path: Path) -> None:
    image = tmp_path / "image.txt"
    image.write_text("# the image\ntorch numpy Onnx_Runtime  # names as pip lists them\nrich\n")
    names = gpu_bundle.image_packages(image)
    assert names == {"torch", "numpy", "onnx-runtime", "rich"}
    installed = {"torch": "2.13.0+cpu", "numpy": "2.5.0", "onnx-runtime": "1.32.0", "rich": "15.0.0", "mlflow": "3.17.2",
                 "prefect": "3.8.8", "dvc": "3.67.1", "nvidia-nccl-cu13": "2.29.7", "triton": "3.6.0",
                 "horovod": "0.28.1+idlecycle.x", "slimflow": "0.1.0", "pytest": "9.0", "pydantic": "2.12.0",
                 "pluggy": "1.6.0"}
    carried = gpu_bundle.carried(installed, names)
    # pluggy is pytest's and Prefect's (its server imports it): carried where the image lacks it.
    assert carried == {"dvc": "3.67.1", "mlflow": "3.17.2", "pluggy": "1.6.0", "prefect": "3.8.8", "pydantic": "2.12.0"}
    # What a copy of the image needs besides its torch stack: the rest of the venv, never the carried.
    assert gpu_bundle.expected_on_host(installed, names) == {"numpy": "2.5.0", "onnx-runtime": "1.32.0", "rich": "15.0.0"}


def test_the_project_venv_needs_mlflow_prefect_and_dvc_carried() -> None:
    """The image list against this venv: the orchestration stack travels, torch does not."""
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_bundle.py"), "--list"],
                          capture_output=True, text=True, check=True)
    names = {line.split("==")[0] for line in done.stdout.split()}
    assert {"mlflow", "mlflow-skinny", "prefect", "dvc", "pydantic", "codecarbon", "torch-pruning"} <= names
    assert not names & {"torch", "numpy", "onnxruntime", "horovod", "slimflow", "pytest"}
    assert not any(n.startswith("nvidia-") for n in names)


def test_a_wheel_is_stored_uncompressed_and_mlflows_web_ui_left_out(tmp_path: Path) -> None:
    wheel, out = tmp_path / "mlflow-3.17.2-py3-none-any.whl", tmp_path / "out.whl"
    ui = "mlflow/server/js/build/index.html"
    record = f"mlflow/__init__.py,sha256=a,3\n{ui},sha256=b,9\nmlflow-3.17.2.dist-info/RECORD,,\n"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("mlflow/__init__.py", "x=1")
        z.writestr(ui, "<html/>!!")
        z.writestr("mlflow-3.17.2.dist-info/RECORD", record)
    assert gpu_bundle.restore(wheel, out) == 9
    with zipfile.ZipFile(out) as z:
        assert z.namelist() == ["mlflow/__init__.py", "mlflow-3.17.2.dist-info/RECORD"]
        assert all(info.compress_type == zipfile.ZIP_STORED for info in z.infolist())
        assert ui not in z.read("mlflow-3.17.2.dist-info/RECORD").decode()
        assert z.read("mlflow/__init__.py") == b"x=1"


def test_another_hosts_package_list_and_a_missing_one(tmp_path: Path) -> None:
    """--image-packages names another host's distributions; a file that is not there is named."""
    host = tmp_path / "host.txt"
    host.write_text("torch numpy mlflow\n")
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_bundle.py"), "--list", "--image-packages", str(host)],
                          capture_output=True, text=True, check=True)
    names = {line.split("==")[0] for line in done.stdout.split()}
    assert "mlflow" not in names and {"prefect", "onnxruntime", "rich"} <= names  # this host lacks what the lent image has
    missing = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_bundle.py"), "--list", "--image-packages",
                              str(tmp_path / "nope.txt")], capture_output=True, text=True)
    assert missing.returncode == 2
    assert f"--image-packages {tmp_path / 'nope.txt'}: no such file" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_a_prebuilt_horovod_wheel_must_be_this_checkouts_for_the_hosts_python(tmp_path: Path) -> None:
    """--horovod-wheel takes a wheel cache folder whose key (its name) is this checkout's
    Horovod and patch for the host's Python: any other would never be used there, so it is
    refused before the downloads, naming the folder."""
    prefix = subprocess.run(["bash", "-c", 'source scripts/lib/horovod_build.sh; echo "$HOROVOD_VERSION+$(horovod_local_version)"'],
                            cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    good = tmp_path / f"horovod-{prefix}-torch2.11.0-cp312-cu130-sm90"
    good.mkdir()
    wheel = good / f"horovod-{prefix}-cp312-cp312-linux_x86_64.whl"
    wheel.write_bytes(b"")
    assert gpu_bundle.check_horovod_wheel(good, "3.12") == wheel
    with pytest.raises(ValueError, match="its key is not this checkout's Horovod for Python 3.11"):
        gpu_bundle.check_horovod_wheel(good, "3.11")
    other_patch = tmp_path / "horovod-0.28.1+idlecycle.00000000-torch2.11.0-cp312-cu130-sm90"
    other_patch.mkdir()
    (other_patch / "horovod-0.28.1+idlecycle.00000000-cp312-cp312-linux_x86_64.whl").write_bytes(b"")
    with pytest.raises(ValueError, match="its key is not this checkout's Horovod"):
        gpu_bundle.check_horovod_wheel(other_patch, "3.12")
    empty = tmp_path / f"horovod-{prefix}-torch2.11.0-cp312-cu130-sm80"
    empty.mkdir()
    with pytest.raises(ValueError, match="0 horovod-\\*.whl there, not one"):
        gpu_bundle.check_horovod_wheel(empty, "3.12")
    missing = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_bundle.py"), "--horovod-wheel",
                              str(tmp_path / "nope"), "--out", str(tmp_path / "bundle")], capture_output=True, text=True)
    assert missing.returncode == 2 and f"--horovod-wheel {tmp_path / 'nope'}: no such folder" in missing.stderr
    assert not (tmp_path / "bundle").exists() and "Traceback" not in missing.stderr


@pytest.mark.skipif(not (shutil.which("gcc") and shutil.which("strip")), reason="needs gcc and strip")
def test_a_carried_wheels_libraries_lose_their_debug_info_and_still_load(tmp_path: Path) -> None:
    """Horovod's build keeps debug info (its GPU library: 68.8 MB, 2.5 MB without): the carried
    wheel's libraries are stripped of it, RECORD says their new hash and size, and they load."""
    import base64
    import ctypes
    import hashlib

    source = tmp_path / "answer.c"
    source.write_text("int answer(void) { return 42; }\n")
    library = tmp_path / "answer.so"
    subprocess.run(["gcc", "-g3", "-O0", "-shared", "-fPIC", str(source), "-o", str(library)], check=True)
    name = "pkg/_answer.cpython-312-x86_64-linux-gnu.so"
    wheel, out = tmp_path / "pkg-1.0-cp312-cp312-linux_x86_64.whl", tmp_path / "out.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("pkg/__init__.py", "x = 1\n")
        z.writestr(name, library.read_bytes())
        z.writestr("pkg-1.0.dist-info/RECORD", f"pkg/__init__.py,sha256=abc,6\n{name},sha256=old,1\npkg-1.0.dist-info/RECORD,,\n")
    left_out = gpu_bundle.without_debug_info(wheel, out)
    with zipfile.ZipFile(out) as z:
        stripped = z.read(name)
        record = z.read("pkg-1.0.dist-info/RECORD").decode().splitlines()
        assert z.read("pkg/__init__.py") == b"x = 1\n"
    assert left_out == library.stat().st_size - len(stripped) > 0
    assert b".debug_info" in library.read_bytes() and b".debug_info" not in stripped
    digest = base64.urlsafe_b64encode(hashlib.sha256(stripped).digest()).rstrip(b"=").decode()
    assert record == ["pkg/__init__.py,sha256=abc,6", f"{name},sha256={digest},{len(stripped)}", "pkg-1.0.dist-info/RECORD,,"]
    loaded = tmp_path / "stripped.so"
    loaded.write_bytes(stripped)
    assert ctypes.CDLL(str(loaded)).answer() == 42
