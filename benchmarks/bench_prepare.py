"""Benchmark the prepare stage on an MNIST-sized IDX file (60,000 x 28 x 28, random pixels).

Each case runs in a fresh process so its peak RSS (``ru_maxrss`` from ``os.wait4``) is
its own: ``prepare_data`` + ``write_prepared`` in-process for plain and gzipped IDX, and
the whole command line (``python -m tasks.prepare``, MLflow logging included) on the
plain files. Prints a table and writes ``benchmarks/results/prepare.json``.

    .venv/bin/python benchmarks/bench_prepare.py [--samples 60000]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "prepare.json"


def _idx_bytes(array: np.ndarray) -> bytes:
    magic = 0x0800 | array.ndim
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.tobytes()


def make_raw(root: Path, samples: int) -> None:
    """Random MNIST-shaped IDX files, plain and gzipped, under ``root/data/raw``."""
    raw = root / "data" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    images = _idx_bytes(rng.integers(0, 256, size=(samples, 28, 28), dtype=np.uint8))
    labels = _idx_bytes(rng.integers(0, 10, size=samples, dtype=np.uint8))
    (raw / "images.idx").write_bytes(images)
    (raw / "labels.idx").write_bytes(labels)
    # Level 1: random pixels do not compress anyway; this keeps set-up time down.
    (raw / "images.idx.gz").write_bytes(gzip.compress(images, compresslevel=1, mtime=0))
    (raw / "labels.idx.gz").write_bytes(gzip.compress(labels, compresslevel=1, mtime=0))
    (root / "dvc.yaml").write_text("stages: {}\n")


def _params_yaml(suffix: str) -> str:
    return (
        "prepare:\n  source: idx\n"
        f"  path: data/raw/images.idx{suffix}\n  labels_path: data/raw/labels.idx{suffix}\n"
    )


def worker(root: Path, suffix: str) -> None:
    """One in-process run; prints a JSON line with its timings and RSS."""
    sys.path.insert(0, str(REPO))
    from tasks.core.config import PrepareParams
    from tasks.prepare import prepare_data, write_prepared

    rss_imports = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    params = PrepareParams(source="idx", path=f"data/raw/images.idx{suffix}", labels_path=f"data/raw/labels.idx{suffix}")
    start = time.perf_counter()
    prepared = prepare_data(params, 42, root)
    prepared_s = time.perf_counter() - start
    start = time.perf_counter()
    out = root / "data" / f"prepared{suffix.replace('.', '-')}"
    write_prepared(prepared, out)
    write_s = time.perf_counter() - start
    size = sum(p.stat().st_size for p in out.iterdir())
    print(json.dumps({"prepare_data_s": prepared_s, "write_s": write_s, "rss_after_imports_kb": rss_imports, "output_bytes": size}))


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, int, str]:
    """Run a child; returns (wall seconds, its own peak RSS in KiB, stdout)."""
    start = time.perf_counter()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        child = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=err)
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        if child.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed ({child.returncode}):\n{err.read().decode()}")
        return wall, usage.ru_maxrss, out.read().decode()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=60_000)
    parser.add_argument("--worker", nargs=2, metavar=("ROOT", "SUFFIX"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(Path(args.worker[0]), args.worker[1])
        return

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-prepare-") as tmp:
        root = Path(tmp)
        make_raw(root, args.samples)
        env = {**os.environ, "PYTHONPATH": str(REPO), "SLIMFLOW_ROOT": str(root)}
        for suffix, name in (("", "idx, in-process"), (".gz", "idx.gz, in-process")):
            wall, rss, out = _run([sys.executable, __file__, "--worker", str(root), suffix], REPO, env)
            figures = json.loads(out.strip().splitlines()[-1])
            rows.append({"case": name, "wall_s": wall, "peak_rss_mb": rss / 1024, **figures})
        (root / "params.yaml").write_text(_params_yaml(""))
        cli_env = {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"}
        wall, rss, _ = _run([sys.executable, "-m", "tasks.prepare"], root, cli_env)
        rows.append({"case": "idx, python -m tasks.prepare (MLflow on)", "wall_s": wall, "peak_rss_mb": rss / 1024})

    print(f"prepare benchmark: {args.samples} x 28 x 28 IDX (random uint8), {os.cpu_count()} CPUs")
    print(f"{'case':<42} {'prepare_data s':>14} {'write s':>8} {'wall s':>7} {'RSS imports MB':>15} {'peak RSS MB':>12}")
    for row in rows:
        imports = row.get("rss_after_imports_kb")
        print(
            f"{row['case']:<42} {row.get('prepare_data_s', float('nan')):>14.2f} {row.get('write_s', float('nan')):>8.2f} "
            f"{row['wall_s']:>7.2f} {(imports / 1024 if imports else float('nan')):>15.0f} {row['peak_rss_mb']:>12.0f}"
        )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "samples": args.samples,
        "image_shape": [28, 28],
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "numpy": np.__version__},
        "cases": rows,
    }
    RESULTS.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    print(f"wrote {RESULTS.relative_to(REPO)}")


if __name__ == "__main__":
    main()
