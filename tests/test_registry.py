"""The gate on constructed metrics, promotion in a real MLflow registry (the alias moves,
earlier versions stay), and the champion served by ``mlflow models serve``."""

from __future__ import annotations

import json
import math
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

from test_evaluate_support import SPEC, gate, save_baseline, save_narrow_variant, train_tiny, write_prepared
from tasks.registry import CHAMPION_ALIAS, keep_champion, promote, select_champion


def _m(accuracy: float, size: float, p50: float, p95: float | None = None) -> dict[str, float]:
    return {"accuracy": accuracy, "size_bytes": size, "latency_p50_ms": p50,
            "latency_p95_ms": p50 * 1.5 if p95 is None else p95}


METRICS = {
    "baseline": _m(0.980, 150_000, 0.50),
    "int8-dynamic": _m(0.978, 40_000, 0.80),   # -0.2 pt, smallest but slow
    "onnx-fp32": _m(0.980, 155_000, 0.10),     # same accuracy, fastest, larger
    "pruned-90": _m(0.950, 20_000, 0.45),      # smallest of all, -3 pt
}


# ---------------------------------------------------------------------------- the gate
def test_smallest_passing_model_wins() -> None:
    champion, reasons = select_champion(METRICS, gate(max_accuracy_drop=0.01), "smallest")
    assert champion == "int8-dynamic"
    assert reasons["pruned-90"].startswith("fails the gate: accuracy drop 0.0300")
    assert reasons["int8-dynamic"].startswith("champion")
    assert list(reasons) == list(METRICS)


def test_fastest_passing_model_wins() -> None:
    champion, _ = select_champion(METRICS, gate(max_accuracy_drop=0.01), "fastest")
    assert champion == "onnx-fp32"


def test_a_looser_gate_admits_the_pruned_model() -> None:
    champion, _ = select_champion(METRICS, gate(max_accuracy_drop=0.05), "smallest")
    assert champion == "pruned-90"


def test_latency_and_size_limits_apply() -> None:
    # int8 is too slow at p95 (1.2 ms) -> the next smallest passing one is the baseline.
    champion, reasons = select_champion(METRICS, gate(max_accuracy_drop=0.01, max_latency_p95_ms=1.0), "smallest")
    assert champion == "baseline" and "latency p95" in reasons["int8-dynamic"]
    champion, reasons = select_champion(METRICS, gate(max_accuracy_drop=0.01, max_size_bytes=152_000), "fastest")
    assert champion == "baseline" and "size 155000 B > max_size_bytes" in reasons["onnx-fp32"]


def test_the_baseline_is_a_candidate_too() -> None:
    only_worse = {"baseline": _m(0.98, 100, 1.0), "tiny": _m(0.90, 10, 0.1)}
    assert select_champion(only_worse, gate(max_accuracy_drop=0.01), "smallest")[0] == "baseline"


def test_impossible_thresholds_promote_nothing() -> None:
    champion, reasons = select_champion(METRICS, gate(max_accuracy_drop=0.0, max_size_bytes=1), "smallest")
    assert champion is None
    assert all(reason.startswith("fails the gate") for reason in reasons.values())
    champion, _ = select_champion(METRICS, gate(max_latency_p95_ms=1e-6), "fastest")
    assert champion is None


def test_unmeasured_figures_fail_and_ties_go_to_accuracy() -> None:
    metrics = {
        "baseline": _m(0.98, 100, 1.0),
        "no-size": {**_m(0.98, 50, 1.0), "size_bytes": math.nan},
        "twin-worse": _m(0.975, 80, 1.0),
        "twin-better": _m(0.979, 80, 1.0),
    }
    champion, reasons = select_champion(metrics, gate(max_accuracy_drop=0.01), "smallest")
    assert champion == "twin-better"
    assert "size_bytes not measured" in reasons["no-size"]


def test_exact_threshold_passes_and_bad_inputs_are_refused() -> None:
    metrics = {"baseline": _m(0.98, 100, 1.0), "edge": _m(0.97, 10, 1.0)}  # drop == 0.01 exactly
    assert select_champion(metrics, gate(max_accuracy_drop=0.01), "smallest")[0] == "edge"
    with pytest.raises(ValueError, match="objective"):
        select_champion(metrics, gate(), "cheapest")
    with pytest.raises(ValueError, match="baseline"):
        select_champion({"edge": _m(0.97, 10, 1.0)}, gate(), "smallest")


# ---------------------------------------------------------------------------- promotion
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
