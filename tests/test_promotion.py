"""Promotion in a real MLflow registry (the alias moves, earlier versions stay), and the
champion served by ``mlflow models serve`` (:mod:`tasks.evaluation.promotion`, :mod:`~tasks.evaluation.pyfunc`)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from test_evaluate_support import SPEC, save_baseline, save_narrow_variant, train_tiny, write_prepared
from tasks.evaluation.promotion import CHAMPION_ALIAS, keep_champion, promote


@pytest.fixture
def two_models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mlflow_uri: str) -> dict[str, Path]:
    import mlflow

    monkeypatch.chdir(tmp_path)  # ./mlruns (artifacts) under tmp as well
    mlflow.set_experiment("registry-tests")  # not an experiment id remembered from another store
    prepared = tmp_path / "prepared"
    write_prepared(prepared)
    save_baseline(train_tiny(SPEC, prepared), tmp_path / "baseline")
    save_narrow_variant(prepared, tmp_path / "narrow")
    return {"prepared": prepared, "baseline": tmp_path / "baseline", "narrow": tmp_path / "narrow"}


def test_a_second_promotion_moves_the_alias_and_keeps_version_1(two_models: dict[str, Path]) -> None:
    import mlflow

    client = mlflow.MlflowClient()
    name = "registry-test"
    preprocess = two_models["prepared"] / "preprocess.json"
    evidence = {"data_digest": "d1", "git_commit": "abc123", "metric.accuracy": 0.97, "recipe": []}
    assert keep_champion(name, "nothing passed").version is None  # nothing registered yet

    with mlflow.start_run():
        first = promote("baseline", two_models["baseline"], preprocess, name, evidence)
    assert first.promoted and first.new_version and first.version == "1"
    assert str(client.get_model_version_by_alias(name, CHAMPION_ALIAS).version) == "1"

    with mlflow.start_run():
        second = promote("distilled-mlp-w0.5", two_models["narrow"], preprocess, name,
                         {**evidence, "recipe": [{"method": "distill"}]})
    assert second.promoted and second.version == "2" and second.previous_version == "1"
    champion = client.get_model_version_by_alias(name, CHAMPION_ALIAS)
    assert str(champion.version) == "2"
    assert champion.tags["variant"] == "distilled-mlp-w0.5" and champion.tags["data_digest"] == "d1"
    assert json.loads(champion.tags["recipe"]) == [{"method": "distill"}]
    assert champion.tags["git_commit"] == "abc123" and champion.tags["model_digest"]
    version_1 = client.get_model_version(name, "1")
    assert version_1.tags["variant"] == "baseline" and CHAMPION_ALIAS not in version_1.aliases

    # The same model on the same data again: no new version, the alias stays.
    with mlflow.start_run():
        again = promote("distilled-mlp-w0.5", two_models["narrow"], preprocess, name, evidence)
    assert again.promoted and not again.new_version and again.version == "2"
    kept = keep_champion(name, "no model passes the gate")
    assert not kept.promoted and kept.version == "2" and "no model passes the gate" in kept.reason
    assert {str(v.version) for v in client.search_model_versions(f"name='{name}'")} == {"1", "2"}

    # The champion predicts from raw inputs, flat or shaped, and returns class indices.
    model = mlflow.pyfunc.load_model(f"models:/{name}@{CHAMPION_ALIAS}")
    raw = np.load(two_models["prepared"] / "test_x.npy")
    shaped, flat = model.predict(raw[:20]), model.predict(raw[:20].reshape(20, -1).tolist())
    assert shaped.shape == (20,) and shaped.dtype == np.int64
    np.testing.assert_array_equal(shaped, flat)


# ---------------------------------------------------------------------------- serving
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _post(url: str, payload: Any, timeout: float = 10.0) -> Any:
    request = urllib.request.Request(
        url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_mlflow_models_serve_answers_with_the_champion(two_models: dict[str, Path], mlflow_uri: str) -> None:
    import mlflow

    name = "served-test"
    with mlflow.start_run():
        promote("baseline", two_models["baseline"], two_models["prepared"] / "preprocess.json", name,
                {"data_digest": "d"})
    expected = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    raw = np.load(two_models["prepared"] / "test_x.npy")[:16]

    port = _free_port()
    mlflow_cli = str(Path(sys.executable).parent / "mlflow")
    server = subprocess.Popen(
        [mlflow_cli, "models", "serve", "-m", f"models:/{name}@champion", "--env-manager", "local",
         "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
        # `mlflow models serve` execs `uvicorn` by name: the venv's bin must be on PATH.
        env={**os.environ, "MLFLOW_TRACKING_URI": mlflow_uri,
             "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            if server.poll() is not None:
                pytest.fail(f"mlflow models serve exited {server.returncode}: {server.stderr.read().decode()[-2000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("mlflow models serve did not answer /ping within 60 s")
            time.sleep(0.5)
        answer = _post(f"http://127.0.0.1:{port}/invocations", {"inputs": raw.reshape(len(raw), -1).tolist()})
        assert answer["predictions"] == expected.predict(raw).tolist()
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server and its gunicorn/uvicorn workers
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=5)
