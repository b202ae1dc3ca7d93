"""scripts/gpu_bundle.py: what travels to a GPU host that reaches no package index."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import zipfile
from pathlib import Path
from types import ModuleType

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
                 "horovod": "0.28.1+idlecycle.x", "slimflow": "0.1.0", "pytest": "9.0", "pydantic": "2.12.0"}
    carried = gpu_bundle.carried(installed, names)
    assert carried == {"dvc": "3.67.1", "mlflow": "3.17.2", "prefect": "3.8.8", "pydantic": "2.12.0"}


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
