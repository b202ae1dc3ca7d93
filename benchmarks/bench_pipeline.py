"""Benchmark the whole pipeline: the cost of orchestration, by cause; the default run; the variants.

In a fresh copy of this project (its own git + DVC repository, the project's venv):

1. ``slimflow run`` (what ``make run`` runs) with every stage executing, traced: every
   Python process of the run (the CLI, each DVC stage process, ``horovodrun``, the
   Horovod workers) leaves a timing record (benchmarks/trace/, switched on by
   environment only: the project's code is not touched). Each instant of the wall time
   is attributed to one cause, the innermost that was active (an MLflow call inside a
   stage inside DVC's reproduce counts as MLflow): Prefect's temporary server, the CLI
   and Prefect's flow/task engine, DVC bookkeeping (``Repo()``, ``reproduce`` minus the
   stage command's own process), each stage process's start (interpreter and imports,
   up to its ``main`` loading params, plus imports made later), the Horovod launch
   (launcher call to rank 0's first epoch) and teardown, MLflow (its import in the CLI
   and every call into its API, in any process), and the work: the stages' own
   computation and the training epochs (with a fine-tune's validation of the model it
   starts from, its curve's epoch 0: training work, done inside the hand-over window).
   Overhead = wall - work.
2. ``python -X importtime -c "import <module>"`` and a timestamped plain import of each
   stage entry, the worker and the CLI, and a bare interpreter start.
3. ``slimflow run`` again with nothing to do: every stage up to date; then
   ``slimflow run --force``: the same work as the first run, traced the same way, as
   later runs find the project (its background Prefect server up): its overhead by cause
   is printed beside the first run's; then ``dvc repro -f`` twice (no Prefect, no CLI: a
   user's reproduction), without a fork server and with the one its first stage starts
   (tasks.core.dvc_fork_server), their walls and ratio; then the server is stopped.
4. Every compressed variant against the fp32 baseline, from the evaluate stage's own
   measurements in that run (same process, interleaved): size, latency at batch 1,
   throughput at a large batch, accuracy change.

    .venv/bin/python benchmarks/bench_pipeline.py      # or: make bench
    .venv/bin/python benchmarks/bench_pipeline.py --data noisy28:10000

``--data noisy28:N`` runs the same on N generated noisy 28x28 digits
(``tasks.synthetic.noisy_digits``, an ``npz`` under ``data/raw/`` tracked with ``dvc add``)
instead of the embedded digits: more and larger samples, so more work per stage, and the
same fixed costs, or not; that is what it shows. Its figures go to
``benchmarks/results/pipeline-noisy28-nN.json``; the targets are the default run's.

``--timeline`` also prints every traced process of the run on one clock, with its spans
(imports, MLflow calls, DVC, the Horovod milestones): where the waits are. With
``--reanalyze`` (the last run's trace and figures again, nothing run) it costs nothing.

Then the overhead by cause beside the reference figures of the code before issue 21's cuts
(benchmarks/reference/pipeline-before-issue21.json; ``--before FILE`` for another).

Targets on this 2-core machine (issue 21's acceptance): overhead <= 20% of the default
run; default run <= 60 s; no-op re-run <= 2 s. Prints tables; writes
benchmarks/results/pipeline.json. The tracing itself costs well under a second a run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "pipeline.json"
# The figures before the cuts of issue 21 (worker pool, the project's Prefect server), same
# machine: printed beside this run's (--before FILE for another reference).
BEFORE = REPO / "benchmarks" / "reference" / "pipeline-before-issue21.json"
TRACE_CODE = REPO / "benchmarks" / "trace"
PROJECT_FILES = ("dvc.yaml", "params.yaml", ".dvcignore", ".gitignore", "Makefile", "pyproject.toml",
                 "scripts", "tasks", "models", "flows", "data/raw/README.md")
STAGES = ("prepare", "train", "compress", "evaluate")
IMPORT_MODULES = ("flows.cli", "tasks.prepare", "tasks.train", "tasks.compress", "tasks.evaluate",
                  "tasks.training.worker")

# Causes, in the order they are printed; WORK are the stages' own computation.
PREFECT_SERVER = "Prefect: API server (the project's background one started or found; or the temporary one)"
CLI = "Prefect flow/task engine + CLI (interpreter, imports, params check)"
DVC = "DVC bookkeeping (import, Repo(), status, reproduce minus the stage process)"
STAGE_START = "stage process start (interpreter + imports)"  # in a run with a fork server: its fork
FORK_SERVER = "fork server's imports (once per run, beside the CLI's start)"
HVD_LAUNCH = "Horovod launch / job hand-over (job sent -> rank 0's first epoch)"
HVD_TEARDOWN = "Horovod teardown (last epoch -> job done: rank 0 writes the model; the workers leaving)"
MLFLOW = "MLflow (import in the CLI, set-up, logging, registry)"
OUTSIDE = "outside the CLI process (process start/exit)"
HELPER_START = "helper processes' start (interpreter + imports; evaluate's per-model memory probes)"
STAGE_WORK = "stage work (the stages' own computation)"
EPOCHS = "training epochs (Horovod workers)"
CAUSES = (PREFECT_SERVER, CLI, DVC, FORK_SERVER, STAGE_START, HELPER_START, HVD_LAUNCH, HVD_TEARDOWN, MLFLOW, OUTSIDE)
PROJECT_PACKAGES = {"tasks", "flows", "models"}
SLACK_S = 0.5  # /proc start times are 10 ms ticks, taken against another clock
WORK = (STAGE_WORK, EPOCHS)
# Rank 0's spans that are training work (EPOCHS): the epochs, and a fine-tune's validation
# of its starting model (tasks.training.loop.validate_start), which runs before the first
# epoch: it was counted as hand-over, 2.7 s of the 8.3 s "hand-over" of the compress stage's
# jobs on 10,000 noisy 28x28 digits (py-spy, this machine).
TRAINING_WORK = ("run_epochs", "validate_start")


def venv_dir() -> Path:
    """The venv this benchmark runs in (the project's), else the project's ``.venv``."""
    return Path(sys.prefix) if sys.prefix != sys.base_prefix else REPO / ".venv"


def make_copy(dest: Path, venv: Path) -> Path:
    """This project as a fresh repository beside the real one, sharing its installed venv."""
    for name in PROJECT_FILES:
        source, target = REPO / name, dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, target)
    (dest / ".venv").symlink_to(venv)
    for command in (["git", "init", "-q"], ["git", "add", "-A"],
                    ["git", "-c", "user.email=bench@slimflow.invalid", "-c", "user.name=bench", "commit", "-qm", "bench"],
                    [str(venv / "bin" / "dvc"), "init", "-q"],
                    [str(venv / "bin" / "dvc"), "config", "core.analytics", "false"]):
        subprocess.run(command, cwd=dest, check=True, capture_output=True)
    return dest


def timed_run(root: Path, env: dict[str, str], *args: str) -> tuple[float, float, float, str, float]:
    """``slimflow run ARGS`` in ``root`` (what ``make run`` runs once installed): (start, end,
    wall, output, CPU-seconds of the run's processes).

    Called directly rather than through make: make would reinstall into the shared venv
    when this checkout's install files are newer than its stamp. The CPU-seconds are the
    kernel's account of the process tree the run waited for (the stages and workers through
    the fork server, which reaps them); the project's background Prefect server, which
    outlives the run, is not in it.
    """
    import resource

    def tree_cpu_s() -> float:
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        return usage.ru_utime + usage.ru_stime

    started, clock, cpu = time.time(), time.perf_counter(), tree_cpu_s()
    done = subprocess.run([str(root / ".venv" / "bin" / "slimflow"), "run", *args], cwd=root, env=env,
                          capture_output=True, text=True)
    wall, cpu = time.perf_counter() - clock, tree_cpu_s() - cpu
    if done.returncode != 0:
        sys.stderr.write(done.stdout[-3000:] + done.stderr[-5000:])
        raise SystemExit(f"slimflow run failed in {root}")
    return started, started + wall, wall, done.stdout + done.stderr, cpu


# --- the trace: one record per process (benchmarks/trace/slimflow_bench_trace.py) ---------

@dataclass
class Proc:
    pid: int
    ppid: int
    created: float
    site: float
    exited: float
    cmdline: list[str]
    rank: str | None
    spans: list[tuple[str, float, float]] = field(default_factory=list)

    @property
    def role(self) -> str:
        args = self.cmdline
        if any(a.endswith("/horovodrun") or a in ("horovodrun", "tasks.training.horovodrun") for a in args):
            return "horovodrun"
        if "tasks.training.worker" in args:
            return "worker"
        if any(a.endswith("/slimflow") for a in args[:2]):
            return "cli"
        if "tasks.core.fork_server" in args:
            return "fork-server"
        for i, arg in enumerate(args[:-1]):
            if arg == "-m" and args[i + 1].startswith("tasks.") and args[i + 1][6:] in STAGES:
                return f"stage:{args[i + 1][6:]}"
        return "other"

    @property
    def rank0_worker(self) -> bool:
        """A Horovod worker of rank 0 (or of unknown rank): the one whose spans stand for the job."""
        return self.role == "worker" and self.rank in (None, "0")

    def first(self, label: str) -> tuple[str, float, float] | None:
        return next((s for s in self.spans if s[0] == label), None)


def load_trace(folder: Path) -> list[Proc]:
    procs = []
    for path in sorted(folder.glob("*.json")):
        r = json.loads(path.read_text())
        # A child of the run's fork server stands for the entry process that asked for it
        # (DVC's stage command, a worker horovodrun started): it starts when that one did.
        created = r.get("client_created") or r["created"]
        procs.append(Proc(r["pid"], r["ppid"], created, r["site"], r["exited"], r["cmdline"],
                          r.get("horovod_rank"), [tuple(s) for s in r["spans"]]))
    return procs


def intervals(procs: list[Proc]) -> list[tuple[float, float, int, str]]:
    """``(start, end, priority, cause)``: the innermost (highest priority) cause wins an instant."""
    out: list[tuple[float, float, int, str]] = []
    workers = [p for p in procs if p.rank0_worker]
    epochs = [s for w in workers for s in w.spans if s[0] == "run_epochs"]
    stage_pids = {p.pid for p in procs if p.role.startswith("stage:")}
    for p in procs:
        role = p.role
        if role == "cli":
            out.append((p.created, p.exited, 1, CLI))
            for label, start, end in p.spans:
                if label == "import:mlflow" or _is_mlflow_call(label):
                    out.append((start, end, 9, MLFLOW))
                elif label.startswith(("import:dvc", "dvc.")):
                    out.append((start, end, 3, DVC))
                elif label.startswith("prefect.server."):
                    out.append((start, end, 2, PREFECT_SERVER))
        elif role.startswith("stage:"):
            out.append((p.created, p.exited, 4, STAGE_WORK))
            started = p.first("load_params")
            out.append((p.created, started[1] if started else p.exited, 5, STAGE_START))
            for label, start, end in p.spans:
                if label.startswith("import:"):
                    out.append((start, end, 8, STAGE_START))
                elif _is_mlflow_call(label):
                    out.append((start, end, 9, MLFLOW))
                elif label == "pool.close":
                    out.append((start, end, 6, HVD_TEARDOWN))
                elif label == "run_workers":
                    inside = [e for e in epochs if start - SLACK_S <= e[1] <= end]
                    first, last = (inside[0][1], inside[-1][2]) if inside else (end, end)
                    out.append((start, first, 6, HVD_LAUNCH))
                    out.append((last, end, 6, HVD_TEARDOWN))
        elif role == "other" and p.ppid in stage_pids:
            # A stage's helper process (evaluate measures each model's memory in a fresh one):
            # its start-up is a process start; the rest of it is the stage's work.
            out.append((p.created, p.site, 8, HELPER_START))
            out.extend((start, end, 8, HELPER_START) for label, start, end in p.spans if label.startswith("import:"))
        elif role == "fork-server":  # its imports, once for every stage and worker of the run
            out.extend((start, end, 1.5, FORK_SERVER) for label, start, end in p.spans if label.startswith("import:"))
        elif p.rank0_worker:
            for label, start, end in p.spans:
                if label in TRAINING_WORK:
                    out.append((start, end, 7, EPOCHS))
                elif _is_mlflow_call(label):
                    out.append((start, end, 9, MLFLOW))
    return out


def _is_mlflow_call(label: str) -> bool:
    return label == "mlflow" or label.startswith(("mlflow:", "mlflow."))


def mlflow_calls(procs: list[Proc]) -> dict[str, Any]:
    """MLflow's time by API function and by process (outermost calls; workers: rank 0)."""
    by_call: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    by_process: dict[str, float] = defaultdict(float)
    for p in procs:
        if p.role == "other" or (p.role == "worker" and not p.rank0_worker):
            continue
        for label, start, end in p.spans:
            if _is_mlflow_call(label):
                entry = by_call[label.removeprefix("mlflow:")]
                entry[0] += end - start
                entry[1] += 1
                by_process[p.role] += end - start
            elif label == "import:mlflow":
                by_process[f"{p.role} (import mlflow)"] += end - start
    calls = sorted(((name, round(s, 3), n) for name, (s, n) in by_call.items()), key=lambda x: -x[1])
    return {"by_call": calls, "by_process": {k: round(v, 3) for k, v in by_process.items()}}


def attribute(spans: list[tuple[float, float, int, str]], t0: float, t1: float) -> dict[str, float]:
    """Seconds of ``[t0, t1]`` per cause; the rest of the window is :data:`OUTSIDE`."""
    spans = [(max(a, t0), min(b, t1), prio, cause) for a, b, prio, cause in spans if b > t0 and a < t1 and b > a]
    cuts = sorted({t0, t1, *(a for a, *_ in spans), *(b for _, b, *_ in spans)})
    seconds: dict[str, float] = defaultdict(float)
    for a, b in zip(cuts, cuts[1:]):
        middle = (a + b) / 2
        best = max(((prio, cause) for s, e, prio, cause in spans if s <= middle < e), default=(0, OUTSIDE))
        seconds[best[1]] += b - a
    return dict(seconds)


def trace_breakdown(procs: list[Proc], t0: float, t1: float) -> dict[str, Any]:
    """The run's wall time by cause, per stage (within DVC's reproduce call) and the Horovod launch's steps."""
    spans = intervals(procs)
    result: dict[str, Any] = {"causes_s": attribute(spans, t0, t1), "stages": {}, "horovod_launch": [], "imports": {},
                              "mlflow": mlflow_calls(procs)}
    cli = next((p for p in procs if p.role == "cli"), None)
    stage_procs = [p for p in procs if p.role.startswith("stage:")]
    for label, start, end in (cli.spans if cli else []):
        if label != "dvc.reproduce":
            continue
        inside = [p for p in stage_procs if start - SLACK_S <= p.created <= end]
        if inside:  # the one DVC started for this call (a short stage before it can fall within the slack)
            stage = min(inside, key=lambda p: abs(p.created - start)).role.split(":", 1)[1]
            result["stages"][stage] = {"reproduce_s": end - start, **attribute(spans, start, end)}
    for launcher in stage_procs:
        for label, start, end in launcher.spans:
            if label == "run_workers":
                result["horovod_launch"].append(launch_steps(procs, launcher, start, end))
    result["horovod_pools"] = sum(1 for p in procs if p.role == "horovodrun")  # one horovodrun a pool
    for p in procs:
        if p.role in ("cli", "worker", "horovodrun", "fork-server") or p.role.startswith("stage:"):
            if p.role == "worker" and not p.rank0_worker:
                continue
            imports = sorted(((s[0][7:], s[2] - s[1]) for s in p.spans if s[0].startswith("import:")),
                             key=lambda x: -x[1])
            result["imports"].setdefault(p.role, {"interpreter_s": p.site - p.created,
                                                  "total_s": sum(s for _, s in imports),
                                                  "top": [[n, round(s, 3)] for n, s in imports[:6]]})
    return result


def launch_steps(procs: list[Proc], launcher: Proc, start: float, end: float) -> dict[str, Any]:
    """One training job, from the launcher's call to rank 0's first epoch, step by step (seconds
    since the call). Where the pool's workers started for this job, their start too; a pool
    started earlier (when its stage started, or for an earlier job) has them waiting."""
    within = [p for p in procs if start - SLACK_S <= p.created <= end]
    runner = next((p for p in within if p.role == "horovodrun"), None)
    worker = next((p for p in within if p.rank0_worker), None)
    steps: dict[str, Any] = {"stage": launcher.role.split(":", 1)[1]}
    if runner:
        steps["horovodrun_started_s"] = runner.created - start
        steps["horovodrun_interpreter_up_s"] = runner.site - start
    if worker:
        steps["rank0_started_s"] = worker.created - start
        steps["rank0_interpreter_up_s"] = worker.site - start
        if imp := worker.first("import:torch"):
            steps["rank0_torch_imported_s"] = imp[2] - start
        if imp := worker.first("import:horovod"):
            steps["rank0_horovod_imported_s"] = imp[2] - start
        if init := worker.first("horovod.init"):
            steps["rank0_hvd_init_s"] = init[2] - init[1]
            steps["rank0_hvd_init_done_s"] = init[2] - start
    rank0 = worker or next((p for p in procs if p.rank0_worker and p.created <= end and p.exited >= start), None)
    if rank0:
        # This job's training: its spans that begin within the call (a fine-tune first validates
        # the model it starts from).
        job = [s for s in rank0.spans if s[0] in TRAINING_WORK and start <= s[1] <= end]
        if job:
            steps["rank0_first_epoch_s"] = job[0][1] - start
            steps["rank0_last_epoch_end_s"] = max(s[2] for s in job) - start
        if worker:
            steps["rank0_exited_s"] = worker.exited - start
    steps["launcher_returned_s"] = end - start
    return steps


def timeline(procs: list[Proc], t0: float, min_span_s: float = 0.05) -> list[str]:
    """Every traced process in the order it started (a fork-server child: when its entry
    started), with its spans of at least ``min_span_s``; seconds since ``t0``. Where a
    process waited shows as a gap: between its entry's start and its fork, between spans."""
    lines = []
    for p in sorted(procs, key=lambda p: p.created):
        rank = f" rank {p.rank}" if p.rank is not None else ""
        lines.append(f"{p.role}{rank} (pid {p.pid}): started {p.created - t0:.2f}, interpreter up "
                     f"{p.site - t0:.2f}, exited {p.exited - t0:.2f}")
        lines.extend(f"  {start - t0:7.2f} {end - t0:7.2f} {end - start:6.2f}  {label}"
                     for label, start, end in sorted(p.spans, key=lambda s: s[1]) if end - start >= min_span_s)
    return lines


# --- imports measured on their own -------------------------------------------------------

def parse_importtime(stderr: str) -> dict[str, float]:
    """Cumulative seconds per third-party package that the project's code imports itself,
    from ``-X importtime`` (``import mlflow`` counts pandas and SQLAlchemy under mlflow)."""
    entries = []
    for line in stderr.splitlines():
        match = re.match(r"import time:\s+(\d+) \|\s+(\d+) \| ( *)(\S+)", line)
        if match:
            entries.append((len(match.group(3)) // 2, match.group(4).split(".")[0], int(match.group(2)) / 1e6))
    totals: dict[str, float] = defaultdict(float)
    ancestors: list[tuple[int, str]] = []
    # The output lists a module after everything it imported, indented by depth: read it
    # backwards, so each module comes before its imports and the stack holds its ancestors.
    for depth, package, seconds in reversed(entries):
        while ancestors and ancestors[-1][0] >= depth:
            ancestors.pop()
        if package not in PROJECT_PACKAGES and all(a in PROJECT_PACKAGES for _, a in ancestors):
            totals[package] += seconds
        ancestors.append((depth, package))
    return dict(totals)


def import_costs(root: Path, env: dict[str, str]) -> dict[str, Any]:
    """Interpreter start, and per module: a timestamped plain import and ``-X importtime``'s packages."""
    python = str(root / ".venv" / "bin" / "python")
    out: dict[str, Any] = {}

    def wall(args: list[str]) -> float:
        clock = time.perf_counter()
        subprocess.run([python, *args], cwd=root, env=env, check=True, capture_output=True)
        return time.perf_counter() - clock

    out["interpreter_s"] = min(wall(["-c", "pass"]) for _ in range(3))
    for module in IMPORT_MODULES:
        plain = wall(["-c", f"import {module}"])
        done = subprocess.run([python, "-X", "importtime", "-c", f"import {module}"], cwd=root, env=env,
                              capture_output=True, text=True, check=True)
        packages = parse_importtime(done.stderr)
        top = sorted(packages.items(), key=lambda x: -x[1])
        out[module] = {"wall_s": plain, "importtime_total_s": sum(packages.values()),
                       "top": [[name, round(s, 3)] for name, s in top[:6]]}
    return out


# --- MLflow's view: the stage runs ----------------------------------------------------------

def stage_breakdown(root: Path, uri: str) -> dict[str, float]:
    """Per stage: the Prefect task's time, the stage's MLflow run, and the difference."""
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
        out[f"{stage}.task_s"] = task_s
        out[f"{stage}.mlflow_run_s"] = run_s
        out[f"{stage}.outside_run_s"] = task_s - run_s
        if stage == "train":
            out["train.epochs_s"] = sum(h["epoch_time_s"] for h in history)
    return out


def mlflow_shape(root: Path, uri: str) -> dict[str, int]:
    """What the first run wrote to MLflow: its runs (the pipeline's and every run under it),
    their metric values, params and tags, and the models logged (benchmarks/bench_floor.py
    logs as much to time MLflow's own share)."""
    import sqlite3

    import mlflow

    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["slimflow"], output_format="list", max_results=1000)
    pipelines = sorted((r for r in runs if r.data.tags.get("pipeline") == "slimflow"), key=lambda r: r.info.start_time)
    tree, parents = [pipelines[0]], {pipelines[0].info.run_id}
    while added := [r for r in runs if r not in tree and r.data.tags.get("mlflow.parentRunId") in parents]:
        tree += added
        parents |= {r.info.run_id for r in added}
    ids = [r.info.run_id for r in tree]
    marks = ",".join("?" * len(ids))
    with sqlite3.connect(root / "mlflow.db") as db:
        def rows(table: str) -> int:
            return db.execute(f"SELECT COUNT(*) FROM {table} WHERE run_uuid IN ({marks})", ids).fetchone()[0]

        shape = {"runs": len(ids), "metric_values": rows("metrics"), "params": rows("params"), "tags": rows("tags")}
        shape["nested_runs"] = len(ids) - 1
        shape["models_logged"] = db.execute(
            f"SELECT COUNT(*) FROM logged_models WHERE source_run_id IN ({marks})", ids).fetchone()[0]
    return shape


def variant_ratios(metrics: dict[str, Any]) -> dict[str, dict[str, float]]:
    baseline = metrics["baseline"]
    return {
        name: {
            "size_ratio": m["size_bytes"] / baseline["size_bytes"],
            "latency_ratio_b1": m["latency_p50_ms"] / baseline["latency_p50_ms"],
            "throughput_ratio_large_batch": m["throughput_sps"] / baseline["throughput_sps"],
            "accuracy_change_pts": 100 * (m["accuracy"] - baseline["accuracy"]),
        }
        for name, m in metrics.items() if isinstance(m, dict) and name != "baseline" and "accuracy" in m
    }


NOISY = "noisy28"


def data_option(spec: str) -> tuple[str, int | None]:
    """``--data digits`` (the default: the embedded data set) or ``--data noisy28:N``."""
    name, _, samples = spec.partition(":")
    if name == "digits" and not samples:
        return name, None
    if name == NOISY and samples.isdigit() and int(samples) >= 500:
        return name, int(samples)
    raise argparse.ArgumentTypeError(f"{spec!r}: expected digits or {NOISY}:N (N >= 500 samples)")


def _existing_file(name: str) -> Path:
    path = Path(name)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{name}: no such file")
    return path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The bench's options; a misspelt one stops it at once (a run takes minutes)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=data_option, default=("digits", None), metavar="digits|noisy28:N",
                        help="the embedded digits (default) or N generated noisy 28x28 digits")
    parser.add_argument("--reanalyze", action="store_true",
                        help="the last run's raw figures and trace again; nothing is run")
    parser.add_argument("--timeline", action="store_true",
                        help="also print every traced process of the run on one clock")
    parser.add_argument("--before", type=_existing_file, default=BEFORE, metavar="FILE",
                        help=f"reference figures to print beside (default: {BEFORE.relative_to(REPO)})")
    return parser.parse_args(argv)


def result_paths(data: str, samples: int | None) -> tuple[Path, Path]:
    """Where a data set's figures go (pipeline.json for the default) and its raw record."""
    results = RESULTS if data == "digits" else RESULTS.with_name(f"pipeline-{data}-n{samples}.json")
    return results, results.with_name(f"{results.stem}-raw")


def dvc_repro_walls(root: Path, env: dict[str, str]) -> dict[str, float]:
    """``dvc repro -f`` in ``root`` (no Prefect, no slimflow CLI: what a user's reproduction
    runs), without a fork server (``SLIMFLOW_FORK_SERVER=off``: every stage and worker
    imports for itself) and with the one the first stage starts (tasks.core.dvc_fork_server)."""
    path = f"{root / '.venv' / 'bin'}{os.pathsep}{env.get('PATH', '')}"  # the stages' `python`, as `make repro`
    walls = {}
    for case, extra in (("without_fork_server", {"SLIMFLOW_FORK_SERVER": "off"}), ("with_fork_server", {})):
        clock = time.perf_counter()
        subprocess.run([str(root / ".venv" / "bin" / "dvc"), "repro", "-f"], cwd=root,
                       env={**env, "PATH": path, **extra}, check=True, capture_output=True)
        walls[case] = time.perf_counter() - clock
    return walls


def use_noisy_digits(root: Path, samples: int, env: dict[str, str]) -> list[str]:
    """Write ``samples`` noisy 28x28 digits into the copy as ``data/raw/noisy28.npz``,
    ``dvc add`` it; the ``slimflow run`` options that make it the run's data."""
    import numpy as np

    sys.path.insert(0, str(REPO))
    from tasks.synthetic import noisy_digits

    x, y = noisy_digits(samples, seed=0)
    target = root / "data" / "raw" / f"{NOISY}.npz"
    np.savez_compressed(target, x=x[:, 0], y=y)
    subprocess.run([str(root / ".venv" / "bin" / "dvc"), "add", "-q", str(target.relative_to(root))],
                   cwd=root, env=env, check=True, capture_output=True)
    return ["--set", "prepare.source=npz", "--set", f"prepare.path=data/raw/{target.name}"]


def measure(raw_dir: Path, data: str = "digits", samples: int | None = None) -> dict[str, Any]:
    """Run everything; keep the raw figures and the trace in ``raw_dir``."""
    venv = venv_dir()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MLFLOW_", "PREFECT_", "SLIMFLOW_", "PYTHONPATH", "HOROVOD_"))}
    with tempfile.TemporaryDirectory(prefix="slimflow-bench-") as tmp:
        root = make_copy(Path(tmp) / "project", venv)
        trace, again_trace = Path(tmp) / "trace", Path(tmp) / "trace-again"
        # The copy's code, not the venv's editable install; the tracer first, for the cold run only.
        env["PYTHONPATH"] = str(root)
        traced = {**env, "PYTHONPATH": f"{TRACE_CODE}{os.pathsep}{root}", "SLIMFLOW_BENCH_TRACE": str(trace)}
        # Overrides are written into params.yaml by the first run: the later runs use them too.
        data_args = use_noisy_digits(root, samples, env) if data == NOISY and samples else []
        try:
            t0, t1, cold_wall, _, cold_cpu = timed_run(root, traced, *data_args)
            _, _, noop_wall, noop_output, _ = timed_run(root, env)
            raw = {
                "t0": t0, "t1": t1, "cold_wall": cold_wall, "noop_wall": noop_wall, "cold_cpu_s": cold_cpu,
                "noop_said_up_to_date": "up to date" in noop_output,
                "imports": import_costs(root, env),
                "mlflow_view": stage_breakdown(root, f"sqlite:///{root / 'mlflow.db'}"),
                "mlflow_shape": mlflow_shape(root, f"sqlite:///{root / 'mlflow.db'}"),
                "metrics": json.loads((root / "metrics" / "evaluate.json").read_text()),
                "data": {"name": data, "samples": samples,
                         "card": json.loads((root / "data" / "prepared" / "card.json").read_text())},
            }
            # The same work again, as every later run of the project finds it: the project's
            # Prefect server already up (the first run started it), the venv's files cached.
            # Traced too: its overhead by cause is what a user's second and later runs pay.
            again = {**traced, "SLIMFLOW_BENCH_TRACE": str(again_trace)}
            raw["again_t0"], raw["again_t1"], raw["again_wall"], _, raw["again_cpu_s"] = timed_run(root, again, "--force")
            raw["dvc_repro_s"] = dvc_repro_walls(root, env)
        finally:
            # The copy's background Prefect server goes with the copy.
            subprocess.run([str(venv / "bin" / "slimflow"), "prefect-server", "--stop"], cwd=root,
                           env={**env, "SLIMFLOW_ROOT": str(root)}, capture_output=True, check=False)
        shutil.rmtree(raw_dir, ignore_errors=True)
        shutil.copytree(trace, raw_dir / "trace")
        if again_trace.is_dir():
            shutil.copytree(again_trace, raw_dir / "trace-again")
    (raw_dir / "raw.json").write_text(json.dumps(raw, indent=2) + "\n")
    return raw


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from tasks.core.telemetry import turn_off_telemetry

    turn_off_telemetry()  # its `dvc init`, and every process it starts, report nothing
    data, samples = args.data
    results, raw_dir = result_paths(data, samples)
    # --reanalyze: the last run's raw figures and trace again (benchmarks/results/pipeline-raw/).
    raw = json.loads((raw_dir / "raw.json").read_text()) if args.reanalyze else measure(raw_dir, data, samples)
    procs = load_trace(raw_dir / "trace")
    t0, t1, cold_wall, noop_wall = raw["t0"], raw["t1"], raw["cold_wall"], raw["noop_wall"]
    if args.timeline:  # every process's spans on one clock (with --reanalyze: the last run's)
        print("\n".join(timeline(procs, t0)))
    traced_result = trace_breakdown(procs, t0, t1)
    first = overhead_summary(traced_result["causes_s"], cold_wall)
    share = first["overhead_share"]
    # The run again with the project's Prefect server up (a bench before this was traced: none).
    again_dir = raw_dir / "trace-again"
    again = (overhead_summary(attribute(intervals(load_trace(again_dir)), raw["again_t0"], raw["again_t1"]),
                              raw["again_wall"]) if "again_t0" in raw and again_dir.is_dir() else None)
    result = {
        "default_run_s": cold_wall, "noop_rerun_s": noop_wall, "again_run_s": raw.get("again_wall"),
        **first, "again": again,
        "per_stage": traced_result["stages"], "horovod_launch": traced_result["horovod_launch"],
        "horovod_pools": traced_result["horovod_pools"],
        "imports_in_run": traced_result["imports"], "imports_alone": raw["imports"],
        "mlflow_calls": traced_result["mlflow"],
        "mlflow_view": raw["mlflow_view"], "mlflow_shape": raw.get("mlflow_shape"), "variants": variant_ratios(raw["metrics"]),
        "processes_traced": len(procs), "noop_said_up_to_date": raw["noop_said_up_to_date"],
        "dvc_repro_s": raw.get("dvc_repro_s"),
        # How much of the cores' time the run's processes used: what is left idle is where a
        # shorter chain of steps, not less CPU work, would shorten the run.
        "cpu": {"cores": os.cpu_count(), "default_run_cpu_s": raw.get("cold_cpu_s"),
                "again_cpu_s": raw.get("again_cpu_s")},
        "targets": [
            {"name": "orchestration overhead share of the default run", "value": share,
             "target": "<= 0.20", "met": share <= 0.20},
            {"name": "no-op re-run, seconds", "value": noop_wall, "target": "<= 2", "met": noop_wall <= 2.0},
            {"name": "default run (slimflow run), seconds", "value": cold_wall, "target": "<= 60", "met": cold_wall <= 60.0},
            *([{"name": "default run again, Prefect server up (slimflow run --force), seconds",
                "value": raw["again_wall"], "target": "<= 60", "met": raw["again_wall"] <= 60.0}]
              if "again_wall" in raw else []),
            *([{"name": "orchestration overhead share of the run again, Prefect server up",
                "value": again["overhead_share"], "target": "<= 0.20", "met": again["overhead_share"] <= 0.20}]
              if again else []),
        ],
        "load_average": os.getloadavg(),
    }
    result["data"] = raw.get("data", {"name": "digits", "samples": None})
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps(result, indent=2) + "\n")
    print_tables(result)
    if args.before.exists() and data == "digits":
        print_before_after(json.loads(args.before.read_text()), result)
    return 0


def overhead_summary(causes: dict[str, float], wall: float) -> dict[str, Any]:
    """A traced run's wall time as work and overhead, the overhead by cause."""
    work = sum(causes.get(c, 0.0) for c in WORK)
    return {"work_s": work, "overhead_s": wall - work, "overhead_share": (wall - work) / wall,
            "overhead_by_cause_s": {c: causes.get(c, 0.0) for c in CAUSES},
            "work_by_kind_s": {c: causes.get(c, 0.0) for c in WORK}}


def print_before_after(before: dict[str, Any], now: dict[str, Any]) -> None:
    """This run's overhead by cause beside a reference run's (e.g. the code before a change)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"overhead by cause, seconds: before ({before.get('code', '?')}, {before.get('measured', '?')}) and now")
    for column in ("cause", "before", "now"):
        table.add_column(column)
    for cause in CAUSES:
        table.add_row(cause, f"{before['overhead_by_cause_s'].get(cause, 0.0):.1f}",
                      f"{now['overhead_by_cause_s'].get(cause, 0.0):.1f}")
    table.add_row("[b]overhead[/b]", f"{before['overhead_s']:.1f} ({100 * before['overhead_share']:.0f}%)",
                  f"{now['overhead_s']:.1f} ({100 * now['overhead_share']:.0f}%)")
    table.add_row("work", f"{before['work_s']:.1f}", f"{now['work_s']:.1f}")
    table.add_row("[b]default run, wall[/b]", f"{before['default_run_s']:.1f}", f"{now['default_run_s']:.1f}")
    for stage, seconds in before.get("per_stage_reproduce_s", {}).items():
        table.add_row(f"{stage} stage (DVC's reproduce call)", f"{seconds:.1f}",
                      f"{now['per_stage'].get(stage, {}).get('reproduce_s', float('nan')):.1f}")
    Console(width=150).print(table)


def print_tables(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=150)
    wall = result["default_run_s"]
    data = result.get("data") or {"name": "digits"}
    default_data = data["name"] == "digits"
    card = data.get("card") or {}
    shown = "the embedded digits" if default_data else (
        f"{data['name']}, {data['samples']} samples, input {card.get('input_shape', '?')}")
    table = Table(title=f"pipeline on {shown}: a run, no-op re-run, orchestration overhead"
                  + ("" if default_data else " (the targets are the default data set's)"))
    for column in ("figure", "value", "target", "met"):
        table.add_column(column)
    for target in result["targets"]:
        value = f"{100 * target['value']:.0f}%" if "share" in target["name"] else f"{target['value']:.1f} s"
        met = ("yes" if target["met"] else "NO") if default_data else "n/a"
        table.add_row(target["name"], value, target["target"], met)
    console.print(table)
    if repro := result.get("dvc_repro_s"):
        console.print(f"dvc repro -f (no Prefect): {repro['with_fork_server']:.1f} s with the fork server its first "
                      f"stage starts, {repro['without_fork_server']:.1f} s without (SLIMFLOW_FORK_SERVER=off): "
                      f"{repro['with_fork_server'] / repro['without_fork_server']:.2f}x")
    cpu = result.get("cpu") or {}
    for label, used, run_wall in (("default run", cpu.get("default_run_cpu_s"), wall),
                                  ("run again", cpu.get("again_cpu_s"), result.get("again_run_s"))):
        if used and run_wall:
            offered = cpu["cores"] * run_wall
            console.print(f"CPU, {label}: its processes used {used:.1f} of the {cpu['cores']} cores' {offered:.1f} "
                          f"CPU-seconds ({100 * used / offered:.0f}%; the background Prefect server not counted)")

    # Beside it, the same work again with the project's Prefect server up (what later runs pay).
    again = result.get("again")
    causes = Table(title=f"where the default run's {wall:.1f} s go (each instant to its innermost cause)"
                   + (f"; and the run again, server up ({result['again_run_s']:.1f} s)" if again else ""))
    for column in ("cause", "seconds", "share of wall", *(("again, s", "share") if again else ())):
        causes.add_column(column)

    def cells(key: str, cause: str | None = None) -> list[str]:
        runs = [(result, wall)] + ([(again, result["again_run_s"])] if again else [])
        out = []
        for figures, run_wall in runs:
            seconds = figures[key] if cause is None else figures[key].get(cause, 0.0)
            out += [f"{seconds:.1f}", f"{100 * seconds / run_wall:.0f}%"]
        return out

    for cause, _ in sorted(result["overhead_by_cause_s"].items(), key=lambda x: -x[1]):
        causes.add_row(cause, *cells("overhead_by_cause_s", cause))
    causes.add_row("[b]overhead[/b]", *cells("overhead_s"))
    for kind in result["work_by_kind_s"]:
        causes.add_row(kind, *cells("work_by_kind_s", kind))
    console.print(causes)

    per_stage = Table(title="per stage, inside DVC's reproduce call (seconds)")
    short = {DVC: "DVC", STAGE_START: "process start", HELPER_START: "helper starts", HVD_LAUNCH: "Horovod launch", HVD_TEARDOWN: "Horovod teardown",
             MLFLOW: "MLflow", STAGE_WORK: "stage work", EPOCHS: "epochs"}
    per_stage.add_column("stage")
    per_stage.add_column("reproduce")
    for name in short.values():
        per_stage.add_column(name)
    for stage, figures in result["per_stage"].items():
        per_stage.add_row(stage, f"{figures['reproduce_s']:.1f}", *(f"{figures.get(c, 0.0):.1f}" for c in short))
    console.print(per_stage)

    jobs = result["horovod_launch"]
    if jobs:  # one row a training job; a worker's start only where its pool started for that job
        keys = [key for key in dict.fromkeys(k for steps in jobs for k in steps) if key != "stage"]
        launch = Table(title="Horovod jobs: seconds after the launcher's call (rank 0; - where the workers were up already)")
        for column in ("stage", *(key.removesuffix("_s").replace("_", " ") for key in keys)):
            launch.add_column(column)
        for steps in jobs:
            launch.add_row(steps["stage"], *(f"{steps[k]:.2f}" if k in steps else "-" for k in keys))
        console.print(launch)

    imports = Table(title="imports: a fresh `python -c 'import M'` (wall) and -X importtime's biggest packages")
    for column in ("module", "wall s", "importtime s", "biggest (cumulative s)"):
        imports.add_column(column)
    alone = result["imports_alone"]
    imports.add_row("(interpreter: python -c pass)", f"{alone['interpreter_s']:.2f}", "", "")
    for module in IMPORT_MODULES:
        m = alone[module]
        imports.add_row(module, f"{m['wall_s']:.2f}", f"{m['importtime_total_s']:.2f}",
                        ", ".join(f"{n} {s:.2f}" for n, s in m["top"]))
    console.print(imports)
    in_run = Table(title="imports in the traced run, per process (lazy ones included)")
    for column in ("process", "interpreter up s", "imports s", "biggest"):
        in_run.add_column(column)
    for role, m in result["imports_in_run"].items():
        in_run.add_row(role, f"{m['interpreter_s']:.2f}", f"{m['total_s']:.2f}",
                       ", ".join(f"{n} {s:.2f}" for n, s in m["top"]))
    console.print(in_run)

    calls = result["mlflow_calls"]
    mlflow_table = Table(title="MLflow: seconds in its API, by process (and `import mlflow`) and by function")
    for column in ("process", "seconds", "function", "seconds ", "calls"):
        mlflow_table.add_column(column)
    processes, functions = list(calls["by_process"].items()), calls["by_call"][:len(calls["by_process"])]
    for i in range(max(len(processes), len(functions))):
        left = processes[i] if i < len(processes) else ("", None)
        right = functions[i] if i < len(functions) else ("", None, None)
        mlflow_table.add_row(left[0], "" if left[1] is None else f"{left[1]:.2f}",
                             right[0], "" if right[1] is None else f"{right[1]:.2f}", "" if right[2] is None else str(right[2]))
    console.print(mlflow_table)

    variants_table = Table(title="compressed variants vs. fp32 baseline (evaluate stage, same run)")
    for column in ("variant", "size x", "latency x (b=1)", "throughput x (large batch)", "accuracy change (pts)"):
        variants_table.add_column(column)
    for name, v in result["variants"].items():
        variants_table.add_row(name, f"{v['size_ratio']:.2f}", f"{v['latency_ratio_b1']:.2f}",
                               f"{v['throughput_ratio_large_batch']:.2f}", f"{v['accuracy_change_pts']:+.1f}")
    console.print(variants_table)


if __name__ == "__main__":
    sys.exit(main())
