"""The README's screenshots of what a user sees after `make run`, from the latest pipeline run.

    python scripts/screenshots.py [--project .] [--out docs/screenshots]

Needs Playwright (`pip install playwright`, any Python; not a slimflow dependency) and
Debian's `chromium`. It reads the project's MLflow store (`mlflow.db`) and Prefect history
(`.prefect/`) through the project's `.venv`, starts `mlflow ui` and `prefect server start`
on free ports, takes the MLflow experiment (run tree expanded), the pipeline run, its
`result/report.html`, the champion's run, the compare page of the model runs (accuracy vs
size), the Prefect flow run (its log's end) and its two artifacts, then stops both servers.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

LATEST_RUN = """
import json, mlflow
mlflow.set_tracking_uri('sqlite:///mlflow.db')
runs = mlflow.search_runs(search_all_experiments=True, filter_string="tags.pipeline = 'slimflow'",
                          order_by=['attributes.start_time DESC'], max_results=1, output_format='list')
if not runs:
    raise SystemExit('no pipeline run in mlflow.db: run `make run` first')
run = runs[0]
evaluate = mlflow.search_runs([run.info.experiment_id], output_format='list', filter_string=
    f"tags.mlflow.parentRunId = '{run.info.run_id}' and tags.stage = 'evaluate'")[0]
models = mlflow.search_runs([run.info.experiment_id], output_format='list',
                            filter_string=f"tags.evaluate_run_id = '{evaluate.info.run_id}'")
print(json.dumps({'experiment': run.info.experiment_id, 'run': run.info.run_id, 'tags': run.data.tags,
                  'models': {m.data.tags.get('model'): m.info.run_id for m in models}}))
"""


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


def artifact_ids(api: str, flow_run_id: str) -> dict[str, str]:
    query = {"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}}
    request = urllib.request.Request(f"{api}/artifacts/filter", method="POST", data=json.dumps(query).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as answer:
        return {item["key"]: item["id"] for item in json.load(answer) if item.get("key")}


def shoot(page: Any, out: Path, run: dict[str, Any], mlflow_ui: str, prefect_ui: str) -> None:
    experiment, run_id, tags, models = run["experiment"], run["run"], run["tags"], run["models"]
    base, view = f"{mlflow_ui}/#/experiments/{experiment}", "workflowType=machine_learning"

    def visit(url: str, settle_ms: int) -> None:
        page.goto(url)
        page.wait_for_timeout(settle_ms)
        if url.startswith(mlflow_ui):  # MLflow's assistant panel opens on some pages: close it
            try:
                page.get_by_role("button", name="Close").first.click(timeout=2000)
            except Exception:  # noqa: BLE001 - no panel to close
                pass

    visit(f"{base}?{view}", 8000)
    for label, exact in (("pipeline 20", False), ("compress", True)):  # the tree's expanders sit left of the names
        box = page.get_by_text(label, exact=exact).first.bounding_box(timeout=5000)
        page.mouse.click(box["x"] - 35, box["y"] + box["height"] / 2)
        page.wait_for_timeout(2500)
    page.screenshot(path=str(out / "mlflow-experiment.png"))
    visit(f"{base}/runs/{run_id}?{view}", 6000)
    page.screenshot(path=str(out / "mlflow-pipeline-run.png"), full_page=True)
    visit(f"{base}/runs/{run_id}/artifacts/result/report.html?{view}", 12000)
    page.screenshot(path=str(out / "mlflow-report.png"))
    champion = models.get(tags.get("champion")) or next(iter(models.values()))
    visit(f"{base}/runs/{champion}?{view}", 6000)
    page.screenshot(path=str(out / "mlflow-variant-run.png"), full_page=True)
    ids = json.dumps(list(models.values()), separators=(",", ":"))
    visit(f"{mlflow_ui}/#/compare-runs?runs={ids}&experiments=[%22{experiment}%22]&{view}", 10000)
    page.get_by_text("Scatter Plot").first.click()
    page.wait_for_timeout(4000)
    page.get_by_text("allreduce_groups_used").first.click()  # the X-axis picker's first choice
    page.keyboard.type("size_bytes")
    page.keyboard.press("Enter")
    page.wait_for_timeout(3000)
    page.screenshot(path=str(out / "mlflow-compare-models.png"))
    flow_run = tags["prefect_flow_run_id"]
    visit(f"{prefect_ui}/runs/flow-run/{flow_run}", 8000)
    page.mouse.move(800, 800)
    for _ in range(15):  # to the log's end: the result lines
        page.mouse.wheel(0, 1500)
        page.wait_for_timeout(300)
    page.screenshot(path=str(out / "prefect-flow-run.png"))
    artifacts = artifact_ids(f"{prefect_ui}/api", flow_run)
    for key, name in (("mlflow-runs", "prefect-mlflow-runs.png"), ("variant-comparison", "prefect-comparison.png")):
        visit(f"{prefect_ui}/artifacts/artifact/{artifacts[key]}", 6000)
        page.screenshot(path=str(out / name), full_page=True)


def main() -> None:
    from playwright.sync_api import sync_playwright

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", type=Path, default=Path(__file__).resolve().parents[1])
    parser.add_argument("--out", type=Path, default=None, help="default: <project>/docs/screenshots")
    args = parser.parse_args()
    root = args.project.resolve()
    out = (args.out or root / "docs" / "screenshots").resolve()
    out.mkdir(parents=True, exist_ok=True)
    venv = root / ".venv" / "bin"
    found = subprocess.run([str(venv / "python"), "-c", LATEST_RUN], cwd=root, capture_output=True, text=True)
    if found.returncode != 0:
        raise SystemExit(f"screenshots: {found.stderr.strip().splitlines()[-1]}")
    run = json.loads(found.stdout.strip().splitlines()[-1])
    # One server at a time on the project's Prefect database: the background one `make run`
    # left (flows/prefect_server.py) goes first.
    subprocess.run([str(venv / "slimflow"), "prefect-server", "--stop"], cwd=root, capture_output=True,
                   env={**os.environ, "SLIMFLOW_ROOT": str(root)}, check=False)
    mlflow_port, prefect_port = free_port(), free_port()
    prefect_env = {**os.environ, "PREFECT_HOME": str(root / ".prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                   "PREFECT_UI_API_URL": f"http://127.0.0.1:{prefect_port}/api"}
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "start_new_session": True, "cwd": root}
    servers = [
        subprocess.Popen([str(venv / "mlflow"), "ui", "--backend-store-uri", "sqlite:///mlflow.db",
                          "--host", "127.0.0.1", "--port", str(mlflow_port)],
                         env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}, **quiet),  # as `make ui`
        subprocess.Popen([str(venv / "prefect"), "server", "start", "--host", "127.0.0.1",
                          "--port", str(prefect_port)], env=prefect_env, **quiet),
    ]
    try:
        mlflow_ui, prefect_ui = f"http://127.0.0.1:{mlflow_port}", f"http://127.0.0.1:{prefect_port}"
        wait_for(f"{mlflow_ui}/health")
        wait_for(f"{prefect_ui}/api/health")
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
            shoot(browser.new_page(viewport={"width": 1920, "height": 1080}), out, run, mlflow_ui, prefect_ui)
            browser.close()
        print(f"screenshots of pipeline run {run['run']} in {out}")
    finally:
        for server in servers:
            os.killpg(server.pid, signal.SIGTERM)


if __name__ == "__main__":
    main()
