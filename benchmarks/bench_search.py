"""Benchmark compression to a budget: fixed recipes beside searched ones, on two data sets.

Data sets: generated noisy 28x28 digits (``tasks.synthetic.noisy_digits``, 10,000 samples
by default, split 60/15/25) and scikit-learn's bundled 8x8 digits (1,797, split 60/15/25).
For each, in a fresh copy of this checkout (``benchmarks/bench_compression.make_project``)
with the default ``train`` settings (``--epochs`` overrides the baseline's epochs), it runs
the train and compress stages as DVC would, with these recipes:

- fixed (the defaults the issue measured): ``int8-static-ort``, ``pruned-l1-90`` (10
  fine-tune epochs), ``pruned-structured-50`` (10), each pruned one also followed by static int8;
- searched, ``compress.budget.max_accuracy_drop: 1.0`` (points on validation), ``max_trials: 4``:
  ``int8-static-ort-auto`` (``fallback: auto``), ``pruned-l1-auto`` (``sparsity: auto``,
  4 fine-tune epochs a trial), ``pruned-structured-auto`` (``sparsity: auto``, 4 a trial),
  each pruned one followed by static int8 with ``fallback: auto`` (kept within the same budget).

Then every model is measured on the test split (never seen by a search): accuracy change
against the baseline, size reduction (the baseline's file over the variant's), and the
training epochs it cost (its own and its parents', every trial counted).

Targets (issue 17): a searched variant within 1.0 point on test and >= 6x smaller on noisy
28x28, >= 15x on digits; each searched variant's epochs <= 3x the baseline's.

    .venv/bin/python benchmarks/bench_search.py [--samples 10000] [--epochs N] [--sets noisy28,digits] [--out FILE]

Writes ``benchmarks/results/search.json`` (or ``--out``) and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results" / "search.json"
sys.path[:0] = [str(REPO), str(HERE)]

from bench_compression import make_project, run_stage  # noqa: E402

BUDGET = {"max_accuracy_drop": 1.0, "max_trials": 4, "max_minutes": 15}
INT8 = {"method": "quantize", "mode": "static", "runtime": "onnxruntime"}
INT8_AUTO = {**INT8, "fallback": "auto"}
RECIPES: list[dict[str, Any]] = [
    # fixed: tuned on the bundled digits
    {"name": "int8-static-ort", "steps": [INT8]},
    {"name": "pruned-l1-90", "steps": [{"method": "prune", "kind": "unstructured", "sparsity": 0.9,
                                        "fine_tune_epochs": 10}]},
    {"name": "pruned-l1-90-int8", "parent": "pruned-l1-90", "steps": [INT8]},
    {"name": "pruned-structured-50", "steps": [{"method": "prune", "kind": "structured", "sparsity": 0.5,
                                                "fine_tune_epochs": 10, "lr": 0.002}]},
    {"name": "pruned-structured-50-int8", "parent": "pruned-structured-50", "steps": [INT8]},
    # searched: to compress.budget
    {"name": "int8-static-ort-auto", "steps": [INT8_AUTO]},
    {"name": "pruned-l1-auto", "steps": [{"method": "prune", "kind": "unstructured", "sparsity": "auto",
                                          "fine_tune_epochs": 4}]},
    {"name": "pruned-l1-auto-int8", "parent": "pruned-l1-auto", "steps": [INT8_AUTO]},
    {"name": "pruned-structured-auto", "steps": [{"method": "prune", "kind": "structured", "sparsity": "auto",
                                                  "fine_tune_epochs": 4, "lr": 0.002}]},
    {"name": "pruned-structured-auto-int8", "parent": "pruned-structured-auto", "steps": [INT8_AUTO]},
]
# A searched variant and the fixed recipe it stands beside (for the epochs it cost).
FIXED_OF = {"int8-static-ort-auto": "int8-static-ort", "pruned-l1-auto": "pruned-l1-90",
            "pruned-l1-auto-int8": "pruned-l1-90-int8", "pruned-structured-auto": "pruned-structured-50",
            "pruned-structured-auto-int8": "pruned-structured-50-int8"}
SIZE_TARGETS = {"noisy28": 6.0, "digits": 15.0}
MAX_DROP_POINTS = 1.0
EPOCHS_FACTOR = 3.0


def write_data(name: str, prepared: Path, samples: int) -> dict[str, int]:
    import numpy as np

    from tasks import synthetic

    if name == "noisy28":
        x, y = synthetic.noisy_digits(samples, seed=0)
        return synthetic.write_splits(prepared, x, y, 10, f"bench-noisy28-n{samples}", source="noisy 28x28 digits")
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(0).permutation(len(digits.target))
    x = digits.images.astype(np.float32)[:, None][order]
    return synthetic.write_splits(prepared, x, digits.target[order], 10, "bench-digits", source="digits")


def configure(project: Path, epochs: int | None) -> None:
    """The checkout's params.yaml with these recipes and budget (and the baseline's epochs)."""
    path = project / "params.yaml"
    params = yaml.safe_load(path.read_text())
    if epochs is not None:
        params["train"]["epochs"] = epochs
    params["compress"]["budget"] = BUDGET
    params["compress"]["variants"] = RECIPES
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def measure(project: Path) -> dict[str, Any]:
    """Test accuracy, size and epochs of the baseline and of every variant."""
    from tasks.compression.loading import load_model_dir
    from tasks.data import load_split

    prepared = project / "data" / "prepared"
    test, val = load_split(prepared, "test"), load_split(prepared, "val")

    def accuracies(folder: Path) -> tuple[float, float]:
        model = load_model_dir(folder)
        return (float((model.predict(test.x).argmax(1) == test.y).mean()),
                float((model.predict(val.x).argmax(1) == val.y).mean()))

    baseline_manifest = json.loads((project / "artifacts" / "model" / "manifest.json").read_text())
    train = json.loads((project / "metrics" / "train.json").read_text())
    base_test, base_val = accuracies(project / "artifacts" / "model")
    manifests = {p.parent.name: json.loads(p.read_text())
                 for p in (project / "artifacts" / "compressed").glob("*/manifest.json")}

    def own_epochs(manifest: dict[str, Any]) -> int:
        search = manifest.get("search") or {}
        if "epochs_run" in search:  # every trial's fine-tuning
            return int(search["epochs_run"])
        return sum(int(step.get("epochs_run", 0)) for step in manifest.get("training", []))

    def total_epochs(name: str) -> int:
        manifest = manifests[name]
        parent = manifest.get("parent")
        return own_epochs(manifest) + (total_epochs(parent) if parent in manifests else 0)

    rows = []
    for recipe in RECIPES:
        name = recipe["name"]
        manifest = manifests[name]
        test_acc, val_acc = accuracies(project / "artifacts" / "compressed" / name)
        search = manifest.get("search")
        chosen = None
        if search:
            chosen = f"{search['knob']}={search['chosen']:g}" + ("" if search["within_budget"] else " (over budget)")
        rows.append({
            "variant": name, "searched": name in FIXED_OF, "chosen": chosen,
            "size_bytes": manifest["size_bytes"], "size_x": baseline_manifest["size_bytes"] / manifest["size_bytes"],
            "test_accuracy": test_acc, "test_change_points": 100 * (test_acc - base_test),
            "val_change_points": 100 * (val_acc - base_val), "epochs": total_epochs(name),
            "epochs_x_baseline": total_epochs(name) / train["epochs_run"],
            "search_seconds": (search or {}).get("seconds"), "trials": (search or {}).get("trials"),
        })
    return {"baseline": {"test_accuracy": base_test, "val_accuracy": base_val, "size_bytes": baseline_manifest["size_bytes"],
                         "epochs_run": train["epochs_run"], "parameters": baseline_manifest.get("parameters")},
            "variants": rows}


def targets(name: str, measured: dict[str, Any]) -> list[dict[str, Any]]:
    rows = measured["variants"]
    within = [r for r in rows if r["searched"] and r["test_change_points"] >= -MAX_DROP_POINTS]
    best = max(within, key=lambda r: r["size_x"], default=None)
    fixed_within = [r for r in rows if not r["searched"] and r["test_change_points"] >= -MAX_DROP_POINTS]
    best_fixed = max(fixed_within, key=lambda r: r["size_x"], default=None)
    out = [{
        "name": f"{name}: smallest searched variant within {MAX_DROP_POINTS:g} pt on test"
                + (f" ({best['variant']}, {best['test_change_points']:+.2f} pt)" if best else " (none)")
                + (f"; fixed: {best_fixed['size_x']:.1f}x ({best_fixed['variant']})" if best_fixed else "; fixed: none"),
        "value": best["size_x"] if best else 0.0, "target": f">= {SIZE_TARGETS[name]:g}x",
        "met": bool(best and best["size_x"] >= SIZE_TARGETS[name]),
    }]
    worst = max((r for r in rows if r["searched"]), key=lambda r: r["epochs_x_baseline"])
    out.append({
        "name": f"{name}: most epochs of a searched variant / baseline epochs ({worst['variant']}: {worst['epochs']})",
        "value": worst["epochs_x_baseline"], "target": f"<= {EPOCHS_FACTOR:g}",
        "met": worst["epochs_x_baseline"] <= EPOCHS_FACTOR,
    })
    return out


def show(name: str, sizes: dict[str, int], measured: dict[str, Any], walls: dict[str, float]) -> None:
    from rich.console import Console
    from rich.table import Table

    base = measured["baseline"]
    table = Table(title=f"{name}: fixed vs searched (train {sizes['train']} / val {sizes['val']} / test {sizes['test']}; "
                        f"baseline test {100 * base['test_accuracy']:.2f}%, {base['size_bytes']:,} B, "
                        f"{base['epochs_run']} epochs; budget {BUDGET['max_accuracy_drop']} pt on val)")
    for column in ("variant", "recipe", "chosen", "size x", "Δ test (pts)", "Δ val (pts)", "epochs", "epochs / baseline"):
        table.add_column(column, justify="left" if column in ("variant", "recipe", "chosen") else "right")
    for row in measured["variants"]:
        table.add_row(row["variant"], "searched" if row["searched"] else "fixed", row["chosen"] or "-",
                      f"{row['size_x']:.2f}", f"{row['test_change_points']:+.2f}", f"{row['val_change_points']:+.2f}",
                      str(row["epochs"]), f"{row['epochs_x_baseline']:.2f}")
    Console(width=160).print(table)
    print(f"{name}: train stage {walls['train']:.0f} s, compress stage {walls['compress']:.0f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=10_000, help="generated noisy 28x28 samples (>= 10,000)")
    parser.add_argument("--epochs", type=int, default=None, help="the baseline's train.epochs (default: params.yaml's)")
    parser.add_argument("--sets", default="noisy28,digits")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    load_start = os.getloadavg()[0]
    result: dict[str, Any] = {"budget": BUDGET, "recipes": RECIPES, "sets": {}, "targets": []}
    for name in args.sets.split(","):
        with tempfile.TemporaryDirectory(prefix=f"slimflow-bench-search-{name}-") as tmp:
            project = make_project(REPO, Path(tmp) / "project")
            configure(project, args.epochs)
            sizes = write_data(name, project / "data" / "prepared", args.samples)
            print(f"{name}: data {sizes}", file=sys.stderr, flush=True)
            started = time.perf_counter()
            walls = {"train": run_stage(project, "train")[0]}
            print(f"{name}: train stage {walls['train']:.0f} s", file=sys.stderr, flush=True)
            walls["compress"] = run_stage(project, "compress")[0]
            measured = measure(project)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            (project / "compress.log").replace(args.out.with_name(f"search-{name}.compress.log"))
        result["sets"][name] = {"data": sizes, "walls_s": walls, "seconds": time.perf_counter() - started, **measured}
        result["targets"] += targets(name, measured)
        show(name, sizes, measured, walls)
    result["load_average_1min"] = {"start": load_start, "end": os.getloadavg()[0]}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for target in result["targets"]:
        print(f"{target['name']}: {target['value']:.2f} (target {target['target']}): {'met' if target['met'] else 'NOT met'}")
    print(f"load average (1 min): {load_start:.1f} at the start, {result['load_average_1min']['end']:.1f} at the end")
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
