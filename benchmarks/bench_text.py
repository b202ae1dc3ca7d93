"""Benchmark text and transformers: the transformer's searched int8 + pruned variant against
its own fp32 ONNX export, on a generated text set, through the real stages.

Workload: synthetic reviews (tests/text_data.py: sentiment templates with negations,
noise words from a large neutral vocabulary, 3% of the labels flipped), 4,000 by default,
as a CSV read by the prepare stage (``source: text_table``; a word-level tokenizer trained
on the train split, 48 token ids per review). In a fresh copy of this checkout the stages
run as DVC would: prepare, train (a transformer: 2 layers, width 96, 4 heads, FFN 384, on
the Horovod loop, warm-up from 5% of lr), compress, evaluate. The recipes:

- ``fp32-onnx``: the baseline's fp32 export (the runtime reference);
- ``pruned-structured-auto``: torch-pruning removes a share of every layer's attention
  heads and FFN units, searched (0.75, 0.5, 0.25: the first within 1 point on the
  validation split, each fine-tuned on the Horovod loop);
- ``pruned-structured-auto-int8-dynamic-ort``: that, exported, ONNX Runtime dynamic int8.

Targets (the issue's), on the evaluate stage's figures (test split, 1 thread, batch 1,
interleaved timing): the int8 + pruned variant within 1 point of the baseline's accuracy,
>= 3x smaller and >= 1.5x faster (latency p50) than the fp32 ONNX export, same runtime.

    .venv/bin/python benchmarks/bench_text.py [--samples 4000] [--out FILE]

Writes ``benchmarks/results/text.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "text.json"
sys.path[:0] = [str(REPO / "benchmarks"), str(REPO / "tests")]

from bench_compression import make_project, run_stage  # noqa: E402
from text_data import write_sentiment_csv  # noqa: E402

REFERENCE, VARIANT = "fp32-onnx", "pruned-structured-auto-int8-dynamic-ort"
MAX_DROP_POINTS, SMALLER, FASTER = 1.0, 3.0, 1.5
SEQUENCE = 48

PARAMS = {
    "base": {"seed": 0, "experiment": "bench-text"},
    "prepare": {"source": "text_table", "path": "data/raw/reviews.csv", "text_max_length": SEQUENCE,
                "text_vocab_size": 4000, "val_fraction": 0.15, "test_fraction": 0.25},
    "train": {"model": {"family": "transformer", "embed_dim": 96, "heads": 4, "ffn_dim": 384, "layers": 2,
                        "dropout": 0.1},
              "epochs": 8, "batch_size": 32, "lr": 0.001, "warmup_epochs": 1, "patience": 3, "workers": 2},
    "compress": {
        "fine_tune_lr": 0.0005,
        "budget": {"max_accuracy_drop": MAX_DROP_POINTS, "max_trials": 3, "max_minutes": 20},
        "variants": [
            {"name": REFERENCE, "steps": [{"method": "export", "runtime": "onnxruntime"}]},
            {"name": "int8-dynamic-ort", "steps": [{"method": "quantize", "mode": "dynamic", "runtime": "onnxruntime"}]},
            {"name": "pruned-structured-auto",
             "steps": [{"method": "prune", "kind": "structured", "sparsity": "auto", "fine_tune_epochs": 3}]},
            {"name": VARIANT, "parent": "pruned-structured-auto",
             "steps": [{"method": "quantize", "mode": "dynamic", "runtime": "onnxruntime"}]},
        ],
    },
    "evaluate": {"latency_repeats": 20, "warmup": 5, "throughput_batch": 64, "threads": 1,
                 "registered_model": "bench-text-transformer", "gate": {"max_accuracy_drop": 0.01}},
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=4000)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="slimflow-bench-text-") as tmp:
        project = make_project(REPO, Path(tmp) / "project")
        params = yaml.safe_load((project / "params.yaml").read_text())
        params.update({key: value for key, value in PARAMS.items() if key != "evaluate"})
        params["evaluate"] = {**params.get("evaluate", {}), **PARAMS["evaluate"]}
        (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        write_sentiment_csv(project / "data" / "raw" / "reviews.csv", args.samples, seed=7, label_noise=0.03)
        walls = {}
        for stage in ("prepare", "train", "compress", "evaluate"):
            started = time.perf_counter()
            run_stage(project, stage)
            walls[stage] = round(time.perf_counter() - started, 1)
            print(f"{stage}: {walls[stage]} s", flush=True)
        evaluation = json.loads((project / "metrics" / "evaluate.json").read_text())
        card = json.loads((project / "data" / "prepared" / "card.json").read_text())
        variant_manifest = json.loads(
            (project / "artifacts" / "compressed" / "pruned-structured-auto" / "manifest.json").read_text()
        )
    models = {name: figures for name, figures in evaluation.items() if isinstance(figures, dict)}
    base, ref, var = models["baseline"], models[REFERENCE], models[VARIANT]
    drop = 100.0 * (base["accuracy"] - var["accuracy"])
    smaller = ref["size_bytes"] / var["size_bytes"]
    faster = ref["latency_p50_ms"] / var["latency_p50_ms"]
    rows = {name: {k: m[k] for k in ("accuracy", "size_bytes", "latency_p50_ms", "throughput_sps") if k in m}
            for name, m in models.items()}
    result = {
        "samples": args.samples, "sequence_length": SEQUENCE, "batch": 1, "threads": PARAMS["evaluate"]["threads"],
        "tokenizer": card["tokenizer"], "split_sizes": card["split_sizes"], "stage_wall_s": walls,
        "search": variant_manifest.get("search"), "models": rows,
        "targets": [
            {"name": f"{VARIANT} accuracy drop vs baseline, points", "value": drop, "target": f"<= {MAX_DROP_POINTS}",
             "met": drop <= MAX_DROP_POINTS},
            {"name": f"{VARIANT} times smaller than {REFERENCE}", "value": smaller, "target": SMALLER,
             "met": smaller >= SMALLER},
            {"name": f"{VARIANT} times faster than {REFERENCE}, batch 1, seq {SEQUENCE}", "value": faster,
             "target": FASTER, "met": faster >= FASTER},
        ],
    }
    for name, row in rows.items():
        print(f"{name:45s} acc {100 * row['accuracy']:6.2f}%  {row['size_bytes'] / 1024:8.1f} KiB  "
              f"p50 {row['latency_p50_ms']:.3f} ms")
    for target in result["targets"]:
        print(f"{target['name']}: {target['value']:.3g} (target {target['target']}) {'met' if target['met'] else 'NOT met'}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
