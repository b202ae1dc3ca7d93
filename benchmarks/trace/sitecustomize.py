"""Loaded by every Python process whose PYTHONPATH starts with this folder (Python imports
``sitecustomize`` at start-up); it does nothing unless ``SLIMFLOW_BENCH_TRACE`` names a
folder, where :mod:`slimflow_bench_trace` then leaves one timing record per process.
benchmarks/bench_pipeline.py sets both for the pipeline run it measures."""

import os

if os.environ.get("SLIMFLOW_BENCH_TRACE"):
    import slimflow_bench_trace

    slimflow_bench_trace.install(os.environ["SLIMFLOW_BENCH_TRACE"])
