"""Benchmark the whole pipeline: the cost of orchestration, the default run, the variants.

In a fresh copy of this project (its own git + DVC repository, the project's venv):

1. ``make run`` with every stage executing: its wall time, against the stages' own
   compute time measured inside the stages (each stage's MLflow run spans its work;
   for ``train``, the time the Horovod workers spent in their epochs), with the rest
   broken down: CLI + Prefect + MLflow set-up, stage processes (interpreter start,
   imports, DVC hashing), and the Horovod launch.
2. ``make run`` again with nothing to do: every stage up to date.
3. Every compressed variant against the fp32 baseline, from the evaluate stage's own
   measurements in that run (same process, interleaved): size, latency at batch 1,
   throughput at a large batch, accuracy change.

    .venv/bin/python benchmarks/bench_pipeline.py

Targets on this 2-core machine: overhead <= 10% of the default run; no-op re-run
<= 10 s; default run <= 180 s. Prints tables; writes benchmarks/results/pipeline.json.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "pipeline.json"
PROJECT_FILES = ("dvc.yaml", "params.yaml", ".dvcignore", ".gitignore", "Makefile", "pyproject.toml",
                 "scripts", "tasks", "models", "flows", "data/raw/README.md")


def make_copy(dest: Path) -> Path:
    """This project as a fresh repository beside the real one, sharing its installed venv."""
    for name in PROJECT_FILES:
        source, target = REPO / name, dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, target)
    (dest / ".venv").symlink_to(REPO / ".venv")
    for command in (["git", "init", "-q"], ["git", "add", "-A"],
                    ["git", "-c", "user.email=bench@slimflow.invalid", "-c", "user.name=bench", "commit", "-qm", "bench"],
                    [str(REPO / ".venv" / "bin" / "dvc"), "init", "-q"],
                    [str(REPO / ".venv" / "bin" / "dvc"), "config", "core.analytics", "false"]):
        subprocess.run(command, cwd=dest, check=True, capture_output=True)
    return dest


def timed_make_run(root: Path, env: dict[str, str]) -> tuple[float, str]:
    started = time.perf_counter()
    done = subprocess.run(["make", "-s", "run"], cwd=root, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        sys.stderr.write(done.stdout[-3000:] + done.stderr[-5000:])
        raise SystemExit(f"make run failed in {root}")
    return wall, done.stdout + done.stderr


def stage_breakdown(root: Path, uri: str) -> dict[str, float]:
    """Per stage: the Prefect task's time, the stage's own compute, and the difference."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["slimflow"], output_format="list", max_results=1000)
    (pipeline,) = [r for r in runs if r.data.tags.get("pipeline") == "slimflow"]
    stage_runs = {r.data.tags["stage"]: r for r in runs
                  if r.data.tags.get("mlflow.parentRunId") == pipeline.info.run_id and r.data.tags.get("stage")}
    out: dict[str, float] = {"pipeline_run_s": (pipeline.info.end_time - pipeline.info.start_time) / 1000}
    history = json.loads((root / "plots" / "train_history.json").read_text())
    for stage, run in stage_runs.items():
        task_s = pipeline.data.metrics[f"stage_time_s.{stage}"]
        run_s = (run.info.end_time - run.info.start_time) / 1000
        compute_s = sum(h["epoch_time_s"] for h in history) if stage == "train" else run_s
        out[f"{stage}.task_s"] = task_s
        out[f"{stage}.compute_s"] = compute_s
        out[f"{stage}.process_overhead_s"] = task_s - run_s
        if stage == "train":
            out["train.launch_and_logging_s"] = run_s - compute_s
    return out


def main() -> int:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_API", "SLIMFLOW_"))}
    with tempfile.TemporaryDirectory(prefix="slimflow-bench-") as tmp:
        root = make_copy(Path(tmp) / "project")
        cold_wall, _ = timed_make_run(root, env)
        noop_wall, noop_output = timed_make_run(root, env)
        breakdown = stage_breakdown(root, f"sqlite:///{root / 'mlflow.db'}")
        metrics = json.loads((root / "metrics" / "evaluate.json").read_text())

    stages = ("prepare", "train", "compress", "evaluate")
    compute = sum(breakdown[f"{s}.compute_s"] for s in stages)
    overhead = cold_wall - compute
    parts = {
        "CLI + Prefect + MLflow (outside the stages)": cold_wall - sum(breakdown[f"{s}.task_s"] for s in stages),
        "stage processes (interpreter, imports, DVC)": sum(breakdown[f"{s}.process_overhead_s"] for s in stages),
        "Horovod launch, model logging (train)": breakdown["train.launch_and_logging_s"],
    }
    baseline = metrics["baseline"]
    variants = {
        name: {
            "size_ratio": m["size_bytes"] / baseline["size_bytes"],
            "latency_ratio_b1": m["latency_p50_ms"] / baseline["latency_p50_ms"],
            "throughput_ratio_large_batch": m["throughput_sps"] / baseline["throughput_sps"],
            "accuracy_change_pts": 100 * (m["accuracy"] - baseline["accuracy"]),
        }
        for name, m in metrics.items() if isinstance(m, dict) and name != "baseline" and "accuracy" in m
    }
    result = {
        "default_run_s": cold_wall, "noop_rerun_s": noop_wall, "stage_compute_s": compute,
        "overhead_s": overhead, "overhead_share": overhead / cold_wall, "overhead_parts_s": parts,
        "breakdown": breakdown, "variants": variants,
        "noop_said_up_to_date": "up to date" in noop_output,
        "targets": [
            {"name": "orchestration overhead share of the default run", "value": overhead / cold_wall,
             "target": "<= 0.10", "met": overhead / cold_wall <= 0.10},
            {"name": "no-op re-run, seconds", "value": noop_wall, "target": "<= 10", "met": noop_wall <= 10.0},
            {"name": "default run (make run), seconds", "value": cold_wall, "target": "<= 180", "met": cold_wall <= 180.0},
        ],
        "load_average": os.getloadavg(),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")

    from rich.console import Console
    from rich.table import Table

    console = Console(width=140)
    table = Table(title="pipeline: default run, no-op re-run, orchestration overhead")
    for column in ("figure", "value", "target", "met"):
        table.add_column(column)
    table.add_row("default run (make run), wall", f"{cold_wall:.1f} s", "<= 180 s", "yes" if cold_wall <= 180 else "NO")
    table.add_row("stages' own compute", f"{compute:.1f} s", "", "")
    table.add_row("overhead (wall - compute)", f"{overhead:.1f} s = {100 * overhead / cold_wall:.0f}%", "<= 10%",
                  "yes" if overhead / cold_wall <= 0.10 else "NO")
    for name, seconds in parts.items():
        table.add_row(f"  {name}", f"{seconds:.1f} s", "", "")
    table.add_row("no-op re-run (make run), wall", f"{noop_wall:.1f} s", "<= 10 s", "yes" if noop_wall <= 10 else "NO")
    console.print(table)
    per_stage = Table(title="per stage (seconds)")
    for column in ("stage", "Prefect task", "own compute", "process overhead"):
        per_stage.add_column(column)
    for s in stages:
        per_stage.add_row(s, f"{breakdown[f'{s}.task_s']:.1f}", f"{breakdown[f'{s}.compute_s']:.1f}",
                          f"{breakdown[f'{s}.process_overhead_s']:.1f}")
    console.print(per_stage)
    variants_table = Table(title="compressed variants vs. fp32 baseline (evaluate stage, same run)")
    for column in ("variant", "size x", "latency x (b=1)", "throughput x (large batch)", "accuracy change (pts)"):
        variants_table.add_column(column)
    for name, v in variants.items():
        variants_table.add_row(name, f"{v['size_ratio']:.2f}", f"{v['latency_ratio_b1']:.2f}",
                               f"{v['throughput_ratio_large_batch']:.2f}", f"{v['accuracy_change_pts']:+.1f}")
    console.print(variants_table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
