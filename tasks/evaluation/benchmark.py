"""Every model measured alike: the baseline (``artifacts/model``) and every variant
(``artifacts/compressed/<name>/`` with a ``manifest.json``), each in the runtime it ships in,
on the test split, into one :class:`~tasks.evaluation.results.Evaluation` with the same
metric keys per model and the ratios to the baseline. No MLflow, no files written."""

from __future__ import annotations

import logging
import math
import os
import platform
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from tasks.core import metric_names as names
from tasks.core.classification import classification_metrics
from tasks.core.config import EvaluateParams
from tasks.core.energy import EnergyMeter, co2e_g, cpu_model_from_kernel, process_meter
from tasks.core.paths import ProjectPaths
from tasks.evaluation.flops import all_models_flops
from tasks.evaluation.measure import load_for_measurement, predict_in_batches, torch_threads
from tasks.evaluation.memory import MemoryProbe
from tasks.evaluation.results import BASELINE, EvaluateError, Evaluation, ModelResult, add_ratios
from tasks.evaluation.timing import BATCH1_CALLS_PER_ROUND, Timing, tile_to, time_models

log = logging.getLogger("slimflow.evaluate")

MEMORY_METHOD = (
    "peak resident set rise (VmHWM) over the loaded model, one cold call at the "
    "throughput batch, in a child forked per model from one probe process that imported the runtimes once"
)


def discover_models(paths: ProjectPaths) -> dict[str, Path]:
    """``{"baseline": artifacts/model, "<variant>": artifacts/compressed/<variant>, ...}``."""
    from tasks.core.model_files import MANIFEST, read_manifest

    if not (paths.model / MANIFEST).is_file():
        raise EvaluateError(f"{paths.model / MANIFEST}: no baseline model; run the train stage first")
    models = {BASELINE: paths.model}
    if paths.compressed.is_dir():
        for folder in sorted(p for p in paths.compressed.iterdir() if (p / MANIFEST).is_file()):
            try:
                name = str(read_manifest(folder).get("name") or folder.name)
            except (OSError, ValueError) as err:
                raise EvaluateError(f"{folder / MANIFEST}: unreadable manifest: {err}") from err
            if name in models:
                raise EvaluateError(f"{folder / MANIFEST}: model name {name!r} is used twice")
            models[name] = folder
    return models


def measure_models(
    model_dirs: Mapping[str, Path], prepared: Path, params: EvaluateParams, seed: int = 0,
    meanwhile: Callable[[Evaluation], None] | None = None,
) -> Evaluation:
    """Measure every model on the test split; no MLflow, no files written.

    ``meanwhile(scored)`` runs once the models are scored (an :class:`Evaluation` with
    predictions, accuracy and confusion matrices; no costs yet) while the memory probe
    process runs, before anything is timed: the evaluate stage logs the models to MLflow
    and draws their figures there (work the timing must not share the CPU with)."""
    from tasks.data import described_test_split, load_preprocessing, load_split, record_ids

    preprocessing = load_preprocessing(prepared)
    test = load_split(prepared, "test", preprocessing)
    if len(test.y) == 0:
        raise EvaluateError(f"{prepared}: the test split is empty")
    records = record_ids(prepared, "test")
    class_names = tuple(preprocessing.class_names)

    meter = process_meter()  # on the CPU, where the models run here; it sets up while memory is probed
    log.info("measuring peak inference memory of %d model(s), a forked child each", len(model_dirs))
    # The probe is not this process's measuring: CodeCarbon's per-process estimate counts the
    # children alive when it is read, and the probe has exited before the first reading.
    probe = MemoryProbe(model_dirs, prepared, params.throughput_batch, params.threads)
    try:
        with torch_threads(params.threads):
            loaded = {name: load_for_measurement(folder, params.threads) for name, folder in model_dirs.items()}
            results = _score(loaded, model_dirs, test.x, test.y, class_names, params.throughput_batch)
            if meanwhile is not None:
                meanwhile(Evaluation(results, class_names, test.y, {}, records=records))
            memory = probe.result()
            flops = all_models_flops(
                {name: r.manifest for name, r in results.items()},
                {name: model.module for name, model in loaded.items()},
                np.ascontiguousarray(test.x[:1]),
            )
            log.info(
                "timing %d model(s): %d interleaved rounds, batch 1 and batch %d, %d thread(s)",
                len(loaded), params.latency_repeats, params.throughput_batch, params.threads,
            )
            timings = time_models(
                {name: model.predict for name, model in loaded.items()},
                x_single=test.x[:64],
                x_batch=tile_to(test.x, params.throughput_batch),
                repeats=params.latency_repeats,
                warmup=params.warmup,
                meter=meter,
                seed=seed,
                energy_window_s=params.energy_window_s,
                energy_readings=params.energy_readings,
            )
    finally:
        probe.stop()

    for name, result in results.items():
        result.metrics["flops"], result.notes["flops"] = flops[name]
        _add_costs(result, loaded[name].module, memory[name], timings[name])
        result.notes["memory"] = str(memory[name].get("method"))
        result.notes["energy"] = meter.source
        _add_energy(result, params.grid_co2e_g_per_kwh)
    add_ratios(results, test.y, {name: timing.energy_readings_per_1k_j for name, timing in timings.items()},
               {name: timing.energy_step_per_1k_j for name, timing in timings.items()}, records)
    settings = _settings(len(test.y), len(class_names), params, meter)
    if records is not None:  # the changes' noise counts copies of one record once
        settings["test_records"] = int(records.max()) + 1
    settings.update(described_test_split(prepared))  # a split in time order or by group says so
    if preprocessing.is_text:  # a text model's cost grows with the sequence: say which one was timed
        settings["sequence_length"] = int(preprocessing.input_shape[0])
    return Evaluation(results, class_names, test.y, settings, records=records)



def _score(
    loaded: Mapping[str, Any], model_dirs: Mapping[str, Path], x: np.ndarray, y: np.ndarray,
    class_names: tuple[str, ...], batch: int,
) -> dict[str, ModelResult]:
    """Every model's predictions on the test split and their quality metrics."""
    results: dict[str, ModelResult] = {}
    for name, model in loaded.items():
        logits = predict_in_batches(model.predict, x, batch)
        predictions = logits.argmax(axis=1).astype(np.int64)
        quality, per_class, confusion = classification_metrics(y, predictions, class_names)
        results[name] = ModelResult(
            name, model_dirs[name], dict(model.manifest), quality, predictions, confusion, per_class=per_class
        )
        log.info("%s (%s): accuracy %.4f", name, model.runtime, quality["accuracy"])
    return results


def _add_costs(result: ModelResult, module: Any, memory: Mapping[str, Any], timing: Timing) -> None:
    """Size, parameters, sparsity, memory and timings into ``result.metrics``."""
    manifest = result.manifest
    parameters = _float(manifest.get("parameters"))
    if math.isnan(parameters) and module is not None:
        parameters = float(sum(p.numel() for p in module.parameters()))
    result.metrics.update(
        parameters=parameters,
        nonzeros=_float(manifest.get("nonzeros")),
        sparsity=_sparsity(manifest, module),
        size_bytes=_float(manifest.get("size_bytes")),
        peak_memory_mb=_float(memory.get("peak_mb")),
        load_memory_mb=_float(memory.get("load_mb")),
        **timing.summary(),
    )


def _add_energy(result: ModelResult, grid_co2e_g_per_kwh: float) -> None:
    """What making the model cost (its manifest's ``energy``, written where it was made) and the
    CO2e of that and of 1,000 predictions."""
    energy = result.manifest.get("energy") or {}
    make_j = _float(energy.get("make_j"))
    result.notes["make_energy"] = str(energy.get("source", ""))
    result.metrics.update({
        names.MAKE_ENERGY_J: make_j,
        names.MAKE_CO2E_G: co2e_g(make_j, grid_co2e_g_per_kwh),
        names.CO2E_PER_1K_G: co2e_g(result.metrics[names.ENERGY_PER_1K_J], grid_co2e_g_per_kwh),
    })


def _settings(test_samples: int, classes: int, params: EvaluateParams, meter: EnergyMeter) -> dict[str, Any]:
    """How the figures were obtained (the report's methods section, the runs' params)."""
    return {
        "test_samples": int(test_samples),
        "classes": classes,
        "threads": params.threads,
        "latency_repeats": params.latency_repeats,
        "batch1_calls_per_round": BATCH1_CALLS_PER_ROUND,
        "warmup": params.warmup,
        "throughput_batch": params.throughput_batch,
        "energy_source": meter.source,
        "energy_method": (
            f"{meter.source}; read over {params.energy_window_s:g} s of back-to-back calls per model, "
            f"at batch 1 and at batch {params.throughput_batch}, in {params.energy_readings} interleaved "
            f"part(s) (a shuffled order of the models each)"
        ),
        "energy_window_s": params.energy_window_s,
        "energy_readings": params.energy_readings,
        "grid_co2e_g_per_kwh": params.grid_co2e_g_per_kwh,
        "memory_method": MEMORY_METHOD,
        "cpu": _cpu_name(),
    }


def _sparsity(manifest: Mapping[str, Any], module: Any) -> float:
    """Share of zero weights: the compress stage's figure, else counted on the module's parameters."""
    if "sparsity" in manifest:
        return _float(manifest["sparsity"])
    if module is None:
        return math.nan
    weights = [p.detach() for p in module.parameters() if p.is_floating_point()]
    total = sum(w.numel() for w in weights)
    return float(sum(int((w == 0).sum()) for w in weights) / total) if total else math.nan


def _float(value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return math.nan
    return number


def _cpu_name() -> str:
    model = cpu_model_from_kernel() or platform.processor() or platform.machine()
    return f"{model} ({os.cpu_count()} cores)"
