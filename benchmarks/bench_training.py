"""Benchmark training throughput: a plain PyTorch loop against slimflow's Horovod workers.

One workload for every case: synthetic 28x28 grayscale images of 10 classes (class
prototypes plus noise), the default CNN (``ModelSpec()``: channels 32, 64), AdamW,
batch 32 per worker. Three cases, interleaved round by round so that load from other
processes falls on all of them alike:

* ``plain``      a single-process PyTorch loop in a fresh process, torch threads = cores
* ``slimflow-1`` ``tasks.training`` on 1 worker (a plain process, Horovod size 1), threads = cores
* ``slimflow-2`` ``tasks.training`` on 2 workers under ``horovodrun`` (Gloo), threads = cores // 2 each

slimflow's throughput is what its workers measure (``samples_per_s`` per epoch in the
history: every rank's samples over the slowest rank's time in the training loop), so
start-up is not counted; the launch overhead is printed on its own: the launch's wall
time minus the time spent in training epochs (process start, imports, Gloo rendezvous,
data loading, validation, checkpoints, shutdown). The plain loop is timed the same way
(its training loop only). Every epoch after the first (warm-up) is one measurement.

Targets are judged on ratios within a round: each round runs the three cases back to
back, a case's figure for the round is the median of its measured epochs, and the
target's figure is the median over the rounds of (case / reference) in the same round.
The machine is shared, and its speed drifts over minutes by more than the differences
measured, so only cases measured side by side are compared, and the median keeps one
disturbed round from deciding. The best epoch of each case (over all rounds) and the
ratio of the overall medians are printed beside it, with the load average.

    .venv/bin/python benchmarks/bench_training.py [--samples 6000] [--epochs 4] [--rounds 5]

Targets: slimflow-1 >= 0.95 x plain; slimflow-2 >= 0.9 x slimflow-1. Prints a table and
writes ``benchmarks/results/training.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS = REPO / "benchmarks" / "results" / "training.json"

TARGETS = (  # (name, case, reference, minimum ratio)
    ("1 worker vs plain loop", "slimflow-1", "plain", 0.95),
    ("2 workers vs 1 worker", "slimflow-2", "slimflow-1", 0.90),
)


def write_workload(prepared: Path, samples: int, seed: int = 0) -> None:
    """Synthetic 28x28 images of 10 classes in the prepared-data layout (``tasks/data.py``)."""
    from tasks.data import Preprocessing

    rng = np.random.default_rng(seed)
    prototypes = np.kron(rng.random((10, 7, 7)), np.ones((4, 4)))  # blocky 28x28 class patterns
    val_samples = max(100, samples // 6)

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, 10, size=n).astype(np.int64)
        x = 0.6 * prototypes[y] + 0.4 * rng.random((n, 28, 28))
        return x.astype(np.float32)[:, None] * 255.0, y

    prepared.mkdir(parents=True)
    splits = {"train": draw(samples), "val": draw(val_samples), "test": draw(100)}
    for split, (x, y) in splits.items():
        np.save(prepared / f"{split}_x.npy", x)
        np.save(prepared / f"{split}_y.npy", y)
    preprocessing = Preprocessing.fit(splits["train"][0], 10, [str(c) for c in range(10)])
    (prepared / "preprocess.json").write_text(preprocessing.to_json())
    (prepared / "card.json").write_text(json.dumps({"source": "synthetic-28x28", "digest": f"seed{seed}-n{samples}"}))


def plain_loop(prepared: Path, epochs: int, batch_size: int, lr: float, threads: int, seed: int) -> list[float]:
    """The loop a PyTorch user writes: tensors in memory, shuffled batches, AdamW. Samples/s per epoch."""
    import torch
    import torch.nn.functional as F

    from models.factory import build_model
    from models.spec import ModelSpec
    from tasks.data import load_preprocessing, load_split

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    preprocessing = load_preprocessing(prepared)
    train = load_split(prepared, "train", preprocessing)
    x, y = torch.from_numpy(train.x), torch.from_numpy(train.y)
    model = build_model(ModelSpec(), preprocessing.input_shape, preprocessing.num_classes)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    rates = []
    for _ in range(epochs):
        model.train()
        started = time.perf_counter()
        for batch in torch.randperm(len(x)).split(batch_size):
            loss = F.cross_entropy(model(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        rates.append(len(x) / (time.perf_counter() - started))
    return rates


def plain_run(prepared: Path, epochs: int, batch_size: int, threads: int) -> list[float]:
    """:func:`plain_loop` in a fresh process started like a worker (same thread environment)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    done = subprocess.run(
        [sys.executable, __file__, "--plain-loop-in", str(prepared), "--epochs", str(epochs),
         "--batch-size", str(batch_size), "--cores", str(threads)],
        env=env, capture_output=True, text=True, check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def slimflow_run(
    prepared: Path, scratch: Path, workers: int, threads: int, epochs: int, batch_size: int, lr: float, seed: int,
    allreduce_groups: int | str = "auto",
) -> tuple[list[float], float, float]:
    """``tasks.training`` on ``workers`` local workers; (samples/s per epoch, wall s, s in epochs)."""
    from models.spec import ModelSpec
    from tasks.core.config import TrainParams
    from tasks.training import FitJob, launch_fit

    job = FitJob(
        spec=ModelSpec().to_dict(), prepared=str(prepared), output=str(scratch / "model"),
        checkpoints=str(scratch / "checkpoints"), epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
        patience=epochs, metrics_path=str(scratch / "train.json"), history_path=str(scratch / "history.json"),
        mixed_precision="off", channels_last="off", allreduce_groups=allreduce_groups,
    )
    started = time.perf_counter()
    launch_fit(job, TrainParams(workers=workers, threads_per_worker=threads), REPO)
    wall = time.perf_counter() - started
    history = json.loads((scratch / "history.json").read_text())
    return [row["samples_per_s"] for row in history], wall, sum(row["epoch_time_s"] for row in history)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=6000, help="training samples (28x28, 10 classes)")
    parser.add_argument("--epochs", type=int, default=4, help="epochs per run; the first is warm-up")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of (plain, 1 worker, 2 workers)")
    parser.add_argument("--batch-size", type=int, default=32, help="per worker")
    parser.add_argument("--allreduce-groups", default="auto", type=lambda v: v if v == "auto" else int(v),
                        help="train.allreduce_groups for slimflow (auto, 0 = per gradient, N); "
                             "HOROVOD_IDLE_CYCLE_TIME=0 in the environment turns Horovod's idle cycle off")
    parser.add_argument("--cores", type=int, default=2, help="threads: plain and 1 worker use all, 2 workers half each")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--plain-loop-in", type=Path, help=argparse.SUPPRESS)  # internal: one plain run
    args = parser.parse_args(argv)
    lr, seed = 0.002, 42
    if args.plain_loop_in:
        print(json.dumps(plain_loop(args.plain_loop_in, args.epochs, args.batch_size, lr, args.cores, seed)))
        return 0
    if args.epochs < 2:
        parser.error("--epochs must be at least 2 (the first epoch is warm-up)")
    import horovod
    import torch

    # The launcher's lines (the command) go to stderr beside the workers'.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    threads = {"plain": args.cores, "slimflow-1": args.cores, "slimflow-2": max(1, args.cores // 2)}
    # rates[case][round]: samples/s of each measured epoch of that round
    rates: dict[str, list[list[float]]] = {case: [] for case in threads}
    overheads: dict[str, list[float]] = {"slimflow-1": [], "slimflow-2": []}
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="slimflow-bench-") as tmp:
        prepared = Path(tmp) / "prepared"
        write_workload(prepared, args.samples)
        for round_ in range(args.rounds):
            print(f"round {round_ + 1}/{args.rounds}: plain loop", file=sys.stderr, flush=True)
            rates["plain"].append(plain_run(prepared, args.epochs, args.batch_size, threads["plain"])[1:])
            for workers in (1, 2):
                case = f"slimflow-{workers}"
                print(f"round {round_ + 1}/{args.rounds}: {case}", file=sys.stderr, flush=True)
                per_epoch, wall, in_epochs = slimflow_run(
                    prepared, Path(tmp) / f"{case}-{round_}", workers, threads[case],
                    args.epochs, args.batch_size, lr, seed, args.allreduce_groups,
                )
                rates[case].append(per_epoch[1:])
                overheads[case].append(wall - in_epochs)

    every_epoch = {case: [rate for round_ in rounds for rate in round_] for case, rounds in rates.items()}
    best = {case: max(values) for case, values in every_epoch.items()}
    median = {case: statistics.median(values) for case, values in every_epoch.items()}
    per_round = {case: [statistics.median(round_) for round_ in rounds] for case, rounds in rates.items()}
    targets = []
    for name, case, reference, minimum in TARGETS:
        each_round = [mine / theirs for mine, theirs in zip(per_round[case], per_round[reference], strict=True)]
        ratio = statistics.median(each_round)
        targets.append({
            "name": name, "case": case, "reference": reference, "ratio": ratio, "target": minimum,
            "met": ratio >= minimum, "ratio_each_round": each_round,
            "ratio_best_epochs": best[case] / best[reference], "ratio_of_medians": median[case] / median[reference],
        })
    result = {
        "workload": {
            "data": "synthetic 28x28x1, 10 classes", "train_samples": args.samples, "model": "cnn (channels 32, 64)",
            "optimizer": "AdamW", "batch_size_per_worker": args.batch_size, "epochs": args.epochs,
            "measured_epochs": "all but the first, every round", "rounds": args.rounds,
            "judged_on": "median over rounds of the within-round ratio of median epochs",
            "allreduce_groups": args.allreduce_groups,
            "horovod_idle_cycle_time": os.environ.get("HOROVOD_IDLE_CYCLE_TIME", "launcher default"),
        },
        "machine": {
            "cores_used": args.cores, "python": platform.python_version(), "torch": torch.__version__,
            "horovod": horovod.__version__, "platform": platform.platform(),
            "load_average_1min": {"start": load_start, "end": os.getloadavg()[0]},
        },
        "cases": {
            case: {
                "threads_per_process": threads[case], "processes": 2 if case == "slimflow-2" else 1,
                "samples_per_s": best[case], "samples_per_s_median": median[case],
                "samples_per_s_each_round": per_round[case], "samples_per_s_each_epoch": rates[case],
                **({"launch_overhead_s": statistics.median(overheads[case]),
                    "launch_overhead_s_each_round": overheads[case]} if case in overheads else {}),
            }
            for case in threads
        },
        "targets": targets,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")

    print(f"\ntraining throughput: {args.samples} synthetic 28x28 images, default CNN, batch {args.batch_size}/worker")
    load_end = result["machine"]["load_average_1min"]["end"]
    print(f"load average (1 min): {load_start:.1f} at the start, {load_end:.1f} at the end")
    print(f"{'case':<12} {'procs x threads':>15} {'best samples/s':>15} {'median':>8} {'launch overhead':>16}")
    for case, values in result["cases"].items():
        overhead = f"{values['launch_overhead_s']:.1f} s" if "launch_overhead_s" in values else "-"
        shape = f"{values['processes']} x {values['threads_per_process']}"
        best, median = values["samples_per_s"], values["samples_per_s_median"]
        print(f"{case:<12} {shape:>15} {best:>15.0f} {median:>8.0f} {overhead:>16}")
    print(f"\n{'target (paired rounds)':<26} {'ratio':>7} {'needed':>7}  {'result':<8} {'each round':<32} "
          "best epochs  medians")
    for target in targets:
        verdict = "met" if target["met"] else "NOT met"
        rounds = " ".join(f"{r:.2f}" for r in target["ratio_each_round"])
        print(f"{target['name']:<26} {target['ratio']:>7.3f} {target['target']:>7.2f}  {verdict:<8} {rounds:<32} "
              f"{target['ratio_best_epochs']:>11.3f} {target['ratio_of_medians']:>8.3f}")
    print(f"\nwritten: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
