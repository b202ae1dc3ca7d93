"""Every variant of ``compress.variants``, made from the trained baseline and written out.

Each variant is made (:func:`tasks.compression.build.make_variant`), written to
``<output>/<variant>/`` (model file + ``manifest.json``), loaded back and checked against
the in-memory model it was evaluated with, and tracked as its own MLflow run nested
under the stage's run (its fine-tuning curve under ``fine_tune/...`` keys). The output
folder is built beside ``output`` and swapped in at the end, so a failure leaves the
previous output as it was; then every fine-tuning curve is written as a DVC plot
(``plots/fine_tune/<variant>.json``) and the variants' checkpoint folders
(``artifacts/checkpoints/<variant>/``, kept until then so a re-run resumes) are removed.

Torch and the compression libraries load on the first call, not on import, so the stage
refuses bad input before paying for them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks.compression.recipes import ChainStep, check_recipes, check_students_read, method_name, selected_variants
from tasks.core import metric_names as names
from tasks.core.config import BASELINE, FINAL_METHODS, Params, Variant
from tasks.core.paths import ProjectPaths
from tasks.core.tables import as_text, results_table

if TYPE_CHECKING:
    from rich.table import Table

    from tasks.compression.work import Work
    from tasks.compression.candidate import Candidate
    from tasks.compression.formats import Artifact

log = logging.getLogger("slimflow.compress")

SUMMARY_COLUMNS = (
    "model", "method", "search", "format", names.SIZE_BYTES, names.SIZE_REDUCTION_X, names.VAL_ACCURACY,
    names.VAL_ACCURACY_CHANGE_PTS,
)


class CompressError(ValueError):
    """The stage cannot start: a missing or unusable input; the message names it."""


@dataclass
class VariantResult:
    name: str
    folder: Path  # <output>/<name> once published
    manifest: dict[str, Any]
    artifact: Artifact  # the in-memory model that was evaluated
    val_accuracy: float


@dataclass(frozen=True)
class _Baseline:
    """What every variant is compared with and records: the trained model and its manifest."""

    candidate: Candidate
    manifest: dict[str, Any]
    val_accuracy: float
    data_digest: str | None


def check_inputs(params: Params, paths: ProjectPaths) -> dict[str, Any]:
    """Everything that can be checked before work: inputs exist, every recipe fits the model.

    Returns the baseline's manifest. Raises :class:`CompressError` or
    :class:`~tasks.compression.recipes.RecipeError`.
    """
    from models.spec import ModelSpec
    from tasks.core.model_files import MANIFEST, read_manifest
    from tasks.data import load_preprocessing

    if not (paths.model / MANIFEST).is_file():
        raise CompressError(f"{paths.model}: no trained model ({MANIFEST} missing); run the train stage first")
    if not (paths.prepared / "preprocess.json").is_file():
        raise CompressError(f"{paths.prepared}: no prepared data; run the prepare stage first")
    baseline = read_manifest(paths.model)
    if baseline.get("format") != "torch-state-dict":
        raise CompressError(
            f"{paths.model / MANIFEST}: the baseline must be a torch-state-dict model, got {baseline.get('format')!r}"
        )
    check_recipes(params.compress, baseline["model_spec"]["family"])
    check_students_read(params.compress, ModelSpec.from_dict(baseline["model_spec"]),
                        load_preprocessing(paths.prepared).input_shape)
    return baseline


def variants_train(params: Params, baseline: dict[str, Any]) -> bool:
    """Whether a variant made for ``baseline`` (its manifest) trains: a step fine-tunes,
    runs QAT or distils, on the Horovod workers."""
    from tasks.compression.build import trains

    variants = selected_variants(params.compress, baseline["model_spec"]["family"])
    return any(trains(step) for variant in variants for step in variant.steps)


def compress_variants(
    params: Params, paths: ProjectPaths, *, stage_run_id: str | None = None, output: Path | None = None
) -> list[VariantResult]:
    """Make every variant of ``params.compress`` made for the baseline in ``paths.model``.

    Writes ``output`` (default ``paths.compressed``) atomically: built in a temporary folder
    beside it, then swapped in. With ``stage_run_id`` each variant is an MLflow run nested
    under that run. Raises before any work when an input or a recipe is bad.
    """
    baseline_manifest = check_inputs(params, paths)
    family = baseline_manifest["model_spec"]["family"]
    variants = selected_variants(params.compress, family)
    for skipped in sorted({v.name for v in params.compress.variants} - {v.name for v in variants}):
        log.info("variant %s: skipped, not made for %s models (its families, or its parent's)", skipped, family)
    output = output or paths.compressed
    output.parent.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix=f".{output.name}-build-", dir=output.parent))
    try:
        with _one_thread():
            from tasks.compression.work import Work

            work = Work(params, paths)
            baseline = _load_baseline(work, baseline_manifest)
            results = _make_all(variants, work, baseline, build, output, stage_run_id)
        log.info("compressed variants:\n%s", as_text(summary_table(results, baseline.manifest, baseline.val_accuracy)))
        _publish(build, output)
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise
    _write_curves(paths.plots / "fine_tune", work.curves)
    _write_curves(paths.plots / "search", work.searches)  # accuracy vs sparsity, one point per trial
    _write_curves(paths.plots / "sensitivity", work.sensitivities)  # structured searches: drop per layer and ratio
    _remove_checkpoints(paths.checkpoints, [variant.name for variant in variants])
    return results


# The one file of a plot folder no variant has a curve for (the default recipes have no
# structured search): an empty series. DVC warns "'plots/X' is empty." about an empty output
# folder on every `dvc repro`, as if something had gone wrong.
NO_CURVES = "none"  # plots/<folder>/none.json


def _write_curves(folder: Path, curves: dict[str, list[dict[str, Any]]]) -> None:
    """One DVC plot file per variant (a training's steps, a search's trials, a structured
    search's per-layer drops); the folder holds exactly this run's curves, or only
    ``none.json`` (:data:`NO_CURVES`, an empty series) when there are none."""
    import json

    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for name, rows in (curves or {NO_CURVES: []}).items():
        (folder / f"{name}.json").write_text(json.dumps(rows, indent=2, sort_keys=True) + "\n")


def _remove_checkpoints(checkpoints: Path, names: list[str]) -> None:
    """The variants' training folders, once their models are published (the train stage's own
    checkpoints beside them stay)."""
    for name in names:
        shutil.rmtree(checkpoints / name, ignore_errors=True)
    with contextlib.suppress(OSError):
        checkpoints.rmdir()  # only when empty


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """One intra-op thread for the work done in this process (pruning, export, calibration,
    checks): for models this size threads cost more than they give, and on a busy machine
    their spin-waits made a 2-epoch fine-tune 10x slower (0.8 s -> 9 s here). The training
    steps run in Horovod workers with their own threads (cores // workers)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _load_baseline(work: Work, manifest: dict[str, Any]) -> _Baseline:
    from models.spec import ModelSpec
    from tasks.compression.candidate import Candidate
    from tasks.core.model_files import load_eager_model, torch_predictor
    from tasks.data import data_digest

    paths = work.paths
    candidate = Candidate(
        load_eager_model(paths.model), ModelSpec.from_dict(manifest["model_spec"]),
        work.input_shape, work.num_classes, origin=BASELINE, origin_folder=paths.model,
    )
    val_accuracy = work.set_baseline(torch_predictor(candidate.module)(work.data.x_val))  # the budgets' reference
    log.info("baseline: %d parameters, %d bytes, val accuracy %.4f",
             manifest["parameters"], manifest["size_bytes"], val_accuracy)
    try:
        digest = data_digest(paths.prepared)
    except (OSError, KeyError, ValueError):
        digest = None
    return _Baseline(candidate, manifest, val_accuracy, digest)


def _make_all(
    variants: list[Variant], work: Work, baseline: _Baseline, build: Path, output: Path, stage_run_id: str | None
) -> list[VariantResult]:
    """Make the variants in order; a child starts from its parent's eager model."""
    from tasks.compression.build import make_variant
    from tasks.core.energy import process_meter

    chains = check_recipes(work.params.compress, baseline.candidate.family)
    states: dict[str, Candidate] = {BASELINE: baseline.candidate}
    digests = {BASELINE: baseline.manifest["digest"]}
    made_j = {BASELINE: 0.0}  # energy from the trained baseline to each model
    meter = process_meter()
    results: list[VariantResult] = []
    for variant in variants:
        chain = chains[variant.name]
        started = time.perf_counter()
        energy_before, trained_before = meter.read(), meter.credited
        log.info("variant %s: %s from %s", variant.name, method_name(chain), variant.parent)
        with _variant_run(variant, chain, work.params, work.paths, stage_run_id) as run_id:
            candidate, artifact, extra = make_variant(variant, states[variant.parent], work, run_id)
            spent, trained = (meter.read() - energy_before).total, (meter.credited - trained_before).total
            made_j[variant.name] = made_j[variant.parent] + spent
            folder = build / variant.name
            folder.mkdir()
            extra = {**extra, "parent_digest": digests[variant.parent], "energy": {
                # this variant's steps (this process's work and its training workers'), and with
                # its parent's: everything spent getting from the baseline to it
                "steps_j": spent, "train_j": trained, "make_j": made_j[variant.name], "source": meter.sources(),
            }}
            if run_id is not None:  # the evaluate stage adds its figures to this same run
                extra["mlflow_run_id"] = run_id
            manifest, val_accuracy = _write_variant(folder, variant, chain, candidate, artifact, extra, work, baseline)
            if run_id is not None:
                _log_variant(folder, manifest, baseline, time.perf_counter() - started)
        digests[variant.name] = manifest["digest"]
        if chain[-1].step.method not in FINAL_METHODS:
            # Children start from this eager model; ONNX exports of it can be shared.
            states[variant.name] = replace(
                candidate, origin=variant.name,
                origin_folder=folder if manifest["format"] == "torch-state-dict" else None,
            )
        results.append(VariantResult(variant.name, output / variant.name, manifest, artifact, val_accuracy))
    return results


def _write_variant(
    folder: Path, variant: Variant, chain: list[ChainStep], candidate: Candidate, artifact: Artifact,
    extra: dict[str, Any], work: Work, baseline: _Baseline,
) -> tuple[dict[str, Any], float]:
    """Write the model file and its manifest, check that it loads back; return (manifest, val accuracy)."""
    from tasks.compression.candidate import accuracy
    from tasks.compression.weights import parameters_and_nonzeros, weight_sparsity
    from tasks.core.model_files import read_manifest, write_manifest

    measured = artifact.measured or candidate.module
    parameters, nonzeros = parameters_and_nonzeros(measured)
    val_accuracy = accuracy(artifact.predict(work.data.x_val), work.data.y_val)
    write_manifest(folder, {
        "name": variant.name,
        "method": method_name(chain),
        "recipe": [step.model_dump() for step in variant.steps],
        "full_recipe": [{"variant": item.variant, **item.step.model_dump()} for item in chain],
        "parent": variant.parent,
        "baseline_digest": baseline.manifest["digest"],
        "data_digest": baseline.data_digest,
        "parameters": parameters,
        "nonzeros": nonzeros,
        "sparsity": round(weight_sparsity(measured), 6),
        "model_spec": candidate.spec.to_dict(),
        "input_shape": list(work.input_shape),
        "num_classes": work.num_classes,
        "val_accuracy": val_accuracy,
        **extra,
        **artifact.write(folder),
    })
    manifest = read_manifest(folder)  # as JSON has it (lists, not tuples)
    _check_reload(folder, artifact, work.data.x_val)
    log.info(
        "variant %s: %s, %d bytes (%.2fx smaller), %d parameters, %d non-zero values, val accuracy %.4f (%+.2f pt)",
        variant.name, manifest["format"], manifest["size_bytes"], baseline.manifest["size_bytes"] / manifest["size_bytes"],
        parameters, nonzeros, val_accuracy, 100 * (val_accuracy - baseline.val_accuracy),
    )
    return manifest, val_accuracy


def _log_variant(folder: Path, manifest: dict[str, Any], baseline: _Baseline, seconds: float) -> None:
    """The variant's figures, format tags and files in its (active) MLflow run."""
    import mlflow

    mlflow.log_metrics({
        names.SIZE_BYTES: manifest["size_bytes"],
        names.SIZE_REDUCTION_X: baseline.manifest["size_bytes"] / manifest["size_bytes"],
        names.PARAMETERS: manifest["parameters"], names.NONZEROS: manifest["nonzeros"],
        names.SPARSITY: manifest["sparsity"], names.VAL_ACCURACY: manifest["val_accuracy"],
        names.VAL_ACCURACY_CHANGE_PTS: 100 * (manifest["val_accuracy"] - baseline.val_accuracy),
        names.COMPRESS_TIME_S: seconds,
        names.TRAIN_ENERGY_J: manifest["energy"]["train_j"], names.MAKE_ENERGY_J: manifest["energy"]["make_j"],
    })
    mlflow.set_tags({"format": manifest["format"], "runtime": manifest["runtime"],
                     "make_energy_source": manifest["energy"]["source"]})
    mlflow.log_artifacts(str(folder), artifact_path="variant")
    mlflow.log_dict({"variant": manifest["name"], "parent": manifest["parent"], "method": manifest["method"],
                     "steps": manifest["recipe"], "chain_from_baseline": manifest["full_recipe"]}, "recipe.json")


@contextlib.contextmanager
def _variant_run(
    variant: Variant, chain: list[ChainStep], params: Params, paths: ProjectPaths, stage_run_id: str | None
) -> Iterator[str | None]:
    """The variant's own MLflow run, nested under the stage's run (none without a stage run)."""
    if stage_run_id is None:
        yield None
        return
    from tasks.core import tracking

    recipe = {
        **tracking.recipe_params(variant.parent, method_name(chain), [step.model_dump() for step in variant.steps]),
        "calibration_samples": params.compress.calibration_samples,
        "fine_tune_lr": params.compress.fine_tune_lr,
        "seed": params.base.seed,
    }
    with tracking.stage_run(
        "compress", paths.root, params.base.experiment, params=recipe, run_name=variant.name,
        tags={"model": variant.name, "variant": variant.name, "method": method_name(chain),
              "parent_run_id": stage_run_id, "parent_variant": variant.parent},
        parent_run_id=stage_run_id,
    ) as run:
        yield run.info.run_id


def _check_reload(folder: Path, artifact: Artifact, x: Any) -> None:
    """The written file must predict what the evaluated in-memory model predicted."""
    from tasks.compression.loading import load_model_dir

    expected = artifact.predict(x).argmax(1)
    got = load_model_dir(folder).predict(x).argmax(1)
    disagree = int((expected != got).sum())
    if disagree:
        raise RuntimeError(f"{folder}: the saved model disagrees with the evaluated one on {disagree}/{len(x)} samples")


def _publish(build: Path, output: Path) -> None:
    """Swap the new output in: a rename, so readers see the old folder or the new one, whole."""
    old = None
    if output.exists():
        old = output.with_name(f".{output.name}-old-{os.getpid()}")
        os.replace(output, old)
    os.replace(build, output)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def summary_table(results: list[VariantResult], baseline: dict[str, Any], baseline_accuracy: float) -> Table:
    """The closing table: the baseline and every variant, size and val accuracy against the baseline's."""
    rows = [{"model": BASELINE, "method": None, "search": None, "format": baseline["format"],
             names.SIZE_BYTES: baseline["size_bytes"], names.SIZE_REDUCTION_X: 1.0,
             names.VAL_ACCURACY: baseline_accuracy, names.VAL_ACCURACY_CHANGE_PTS: None}]
    for result in results:
        m = result.manifest
        rows.append({
            "model": result.name, "method": m["method"], "search": _search_cell(m.get("search")),
            "format": m["format"], names.SIZE_BYTES: m["size_bytes"],
            names.SIZE_REDUCTION_X: baseline["size_bytes"] / m["size_bytes"], names.VAL_ACCURACY: result.val_accuracy,
            names.VAL_ACCURACY_CHANGE_PTS: 100 * (result.val_accuracy - baseline_accuracy),
        })
    return results_table(rows, SUMMARY_COLUMNS, title="compressed variants (validation split)")


def _search_cell(search: dict[str, Any] | None) -> str | None:
    """The searched setting, as the summary table shows it (e.g. ``sparsity=0.87``)."""
    if not search:
        return None
    return f"{search['knob']}={search['chosen']:g}" + ("" if search["within_budget"] else " (over budget)")
