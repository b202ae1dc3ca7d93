"""`make bench`: every benchmark in one go, then one summary table of targets.

Runs benchmarks/bench_prepare.py, bench_training.py, bench_compression.py,
bench_search.py (compression to a budget: fixed vs searched recipes), bench_pipeline.py,
bench_floor.py (what the pipeline's invariants cost alone, beside its overhead) and
bench_text.py (each writes its own JSON under benchmarks/results/) and prints every
target with its figure and whether it is met. Ratios are measured within one run, so a
noisy machine still gives meaningful figures; absolute seconds are context.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args(argv)  # --help; no options
    from tasks.core.telemetry import turn_off_telemetry

    turn_off_telemetry()  # the benchmarks load MLflow and ONNX Runtime in their own processes too
    failed = []
    for script in ("bench_prepare.py", "bench_training.py", "bench_compression.py", "bench_search.py",
                   "bench_pipeline.py", "bench_floor.py", "bench_text.py"):
        print(f"\n=== {script}", flush=True)
        if subprocess.run([sys.executable, str(HERE / script)]).returncode != 0:
            failed.append(script)
    rows = []
    for name in ("training", "compression", "search", "pipeline", "text"):
        path = RESULTS / f"{name}.json"
        if path.exists():
            for target in json.loads(path.read_text()).get("targets", []):
                rows.append((name, target))
    from rich.console import Console
    from rich.table import Table

    table = Table(title="slimflow benchmark targets")
    for column in ("suite", "target", "figure", "met"):
        table.add_column(column)
    for suite, target in rows:
        figure = target.get("value", target.get("ratio"))
        goal = target["target"] if isinstance(target["target"], str) else f">= {target['target']}"
        table.add_row(suite, f"{target['name']} ({goal})", f"{figure:.3g}", "yes" if target["met"] else "NO")
    Console(width=140).print(table)
    summary = {suite: json.loads((RESULTS / f"{suite}.json").read_text())
               for suite in ("prepare", "training", "compression", "search", "pipeline", "floor", "text")
               if (RESULTS / f"{suite}.json").exists()}
    (RESULTS / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
