"""Screenshots of what a user sees after `slimflow run`: the MLflow experiment, the pipeline
run, its report, one variant's run, the compare page of the model runs, and the Prefect
flow run with its two artifacts. Written to docs/screenshots/ (the README shows them).

    .venv/bin/python scripts/screenshots.py [--out docs/screenshots]

It reads the latest pipeline run of this project's MLflow store (mlflow.db) and Prefect
history (.prefect/), starts `mlflow ui` and `prefect server start` on free ports, takes
each page with headless Chromium (Debian's `chromium` package) and stops both servers.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for(url: str, seconds: float = 180) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except OSError:
            time.sleep(1)
    raise SystemExit(f"screenshots: {url} did not answer within {seconds:.0f} s")


def shoot(browser: str, url: str, target: Path, size: str = "1600,1100", wait_ms: int = 20000) -> None:
    subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
         f"--window-size={size}", f"--virtual-time-budget={wait_ms}", f"--screenshot={target}", url],
        check=True, capture_output=True, timeout=180,
    )
    print(f"{target.relative_to(ROOT)}  <- {url}")


def latest_pipeline_run() -> tuple[str, str, dict[str, str]]:
    """(experiment id, run id, tags) of the newest finished pipeline run."""
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{ROOT / 'mlflow.db'}")
    runs = mlflow.search_runs(search_all_experiments=True, filter_string="tags.pipeline = 'slimflow'",
                              order_by=["attributes.start_time DESC"], max_results=1, output_format="list")
    if not runs:
        raise SystemExit("screenshots: no pipeline run in mlflow.db; run `make run` first")
    run = runs[0]
    return run.info.experiment_id, run.info.run_id, run.data.tags


def model_runs(experiment_id: str, evaluate_run_id: str) -> list[str]:
    import mlflow

    runs = mlflow.search_runs([experiment_id], filter_string=f"tags.evaluate_run_id = '{evaluate_run_id}'",
                              output_format="list")
    return [run.info.run_id for run in runs]


def prefect_ids(api: str, flow_run_id: str) -> dict[str, str]:
    """The flow run's artifacts by key."""
    request = urllib.request.Request(f"{api}/artifacts/filter", method="POST",
                                     data=json.dumps({"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as answer:
        return {item["key"]: item["id"] for item in json.load(answer) if item.get("key")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "screenshots")
    args = parser.parse_args()
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if not browser:
        raise SystemExit("screenshots: no chromium on PATH (apt-get install chromium)")
    args.out.mkdir(parents=True, exist_ok=True)
    experiment_id, run_id, tags = latest_pipeline_run()
    import mlflow

    evaluate = mlflow.search_runs([experiment_id], filter_string=f"tags.mlflow.parentRunId = '{run_id}' and "
                                  "tags.stage = 'evaluate'", output_format="list")
    models = model_runs(experiment_id, evaluate[0].info.run_id) if evaluate else []
    variant = next((m for m in models if m != tags.get("champion_run_id")), None) or tags.get("champion_run_id")

    mlflow_port, prefect_port = free_port(), free_port()
    env = {**os.environ, "PREFECT_HOME": str(ROOT / ".prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    servers = [
        subprocess.Popen([str(BIN / "mlflow"), "ui", "--backend-store-uri", f"sqlite:///{ROOT / 'mlflow.db'}",
                          "--host", "127.0.0.1", "--port", str(mlflow_port)], cwd=ROOT,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True),
        subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(prefect_port)],
                         cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True),
    ]
    try:
        ui = f"http://127.0.0.1:{mlflow_port}"
        prefect = f"http://127.0.0.1:{prefect_port}"
        wait_for(f"{ui}/health")
        wait_for(f"{prefect}/api/health")
        experiment = f"{ui}/#/experiments/{experiment_id}"
        ml = "workflowType=machine_learning"
        shoot(browser, f"{experiment}?{ml}", args.out / "mlflow-experiment.png")
        shoot(browser, f"{experiment}/runs/{run_id}?{ml}", args.out / "mlflow-pipeline-run.png", "1600,1600")
        shoot(browser, f"{experiment}/runs/{run_id}/artifacts/result/report.html?{ml}",
              args.out / "mlflow-report.png", "1600,1400")
        if variant:
            shoot(browser, f"{experiment}/runs/{variant}?{ml}", args.out / "mlflow-variant-run.png", "1600,1600")
        if models:
            compare = (f"{ui}/#/compare-runs?runs={json.dumps(models, separators=(',', ':'))}"
                       f"&experiments=[%22{experiment_id}%22]&{ml}")
            shoot(browser, compare, args.out / "mlflow-compare-models.png", "1600,1400")
        flow_run_id = tags.get("prefect_flow_run_id")
        if flow_run_id:
            shoot(browser, f"{prefect}/runs/flow-run/{flow_run_id}", args.out / "prefect-flow-run.png", "1600,1200")
            artifacts = prefect_ids(f"{prefect}/api", flow_run_id)
            for key, name in (("mlflow-runs", "prefect-mlflow-runs.png"), ("variant-comparison", "prefect-comparison.png")):
                if key in artifacts:
                    shoot(browser, f"{prefect}/artifacts/artifact/{artifacts[key]}", args.out / name, "1600,1200")
    finally:
        for server in servers:
            os.killpg(server.pid, signal.SIGTERM)
        for server in servers:
            server.wait(timeout=30)


if __name__ == "__main__":
    main()
