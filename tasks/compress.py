"""The ``compress`` stage: every variant in ``compress.variants``, made from the trained baseline.

A variant is a recipe: steps applied in order to its parent (the baseline, or a variant
defined earlier), e.g. distill -> prune -> quantize. Every recipe is checked before any
work (:mod:`tasks.compression.recipes`); then each variant is made, written to
``artifacts/compressed/<variant>/`` (model file + ``manifest.json``), loaded back and
checked against the in-memory model it was evaluated with, and tracked as its own MLflow
run nested under the stage's run. The output folder is built beside
``artifacts/compressed`` and swapped in at the end, so a failure leaves the previous
output as it was.

``python -m tasks.compress`` (the DVC stage command) reads ``params.yaml``; a bad recipe
or missing input prints ``error: <message>`` and exits 2 without writing anything.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

from tasks.core.errors import report_stage_error
from tasks.core.stage_cli import setup_logging
from tasks.core.config import CompressStep, Params, ParamsError, Variant, load_params
from tasks.compression.recipes import (
    BASELINE, ChainStep, RecipeError, check_recipes, method_name, selected_variants, step_settings,
)
from tasks.core.paths import ProjectPaths

log = logging.getLogger("slimflow.compress")


class CompressError(ValueError):
    """The stage cannot start: a missing or unusable input; the message names it."""


@dataclass
class VariantResult:
    name: str
    folder: Path  # artifacts/compressed/<name> once published
    manifest: dict[str, Any]
    artifact: Any  # tasks.compression.formats.Artifact: the in-memory model that was evaluated
    val_accuracy: float


def check_inputs(params: Params, paths: ProjectPaths) -> dict[str, Any]:
    """Everything that can be checked before work: inputs exist, every recipe fits the model.

    Returns the baseline's manifest. Raises :class:`CompressError` or :class:`RecipeError`.
    """
    from tasks.core.model_files import MANIFEST, read_manifest

    if not (paths.model / MANIFEST).is_file():
        raise CompressError(f"{paths.model}: no trained model ({MANIFEST} missing); run the train stage first")
    if not (paths.prepared / "preprocess.json").is_file():
        raise CompressError(f"{paths.prepared}: no prepared data; run the prepare stage first")
    baseline = read_manifest(paths.model)
    if baseline.get("format") != "torch-state-dict":
        raise CompressError(f"{paths.model / MANIFEST}: the baseline must be a torch-state-dict model, got {baseline.get('format')!r}")
    check_recipes(params.compress, baseline["model_spec"]["family"])
    return baseline


class _Work:
    """What the steps of every variant share: data, settings, scratch space, caches."""

    def __init__(self, params: Params, paths: ProjectPaths, scratch: Path) -> None:
        from tasks.compression.candidate import TrainingData
        from tasks.data import load_preprocessing, load_split

        self.params, self.paths, self.scratch = params, paths, scratch
        preprocessing = load_preprocessing(paths.prepared)
        train = load_split(paths.prepared, "train", preprocessing)
        val = load_split(paths.prepared, "val", preprocessing)
        self.data = TrainingData(train.x, train.y, val.x, val.y)
        self.input_shape = tuple(preprocessing.input_shape)
        self.num_classes = preprocessing.num_classes
        self.onnx_exports: dict[str, bytes] = {}  # fp32 exports of unchanged saved models, by name

    def fine_tuner(self, step: CompressStep, what: str):  # noqa: ANN201 - Callable[[nn.Module], nn.Module] | None
        from tasks.compression.candidate import fine_tune

        if step.fine_tune_epochs < 1:
            return None
        return partial(
            fine_tune, data=self.data, epochs=step.fine_tune_epochs, lr=step.lr or self.params.compress.fine_tune_lr,
            batch_size=self.params.train.batch_size, seed=self.params.base.seed, what=what,
        )

    def onnx_fp32(self, candidate: Any) -> bytes:
        from tasks.compression.onnx import export_onnx

        if candidate.origin is None:
            return export_onnx(candidate.module, self.data.example())
        if candidate.origin not in self.onnx_exports:
            self.onnx_exports[candidate.origin] = export_onnx(candidate.module, self.data.example())
        return self.onnx_exports[candidate.origin]


def _quantize(candidate: Any, step: CompressStep, work: _Work, what: str) -> Any:
    from tasks.compression import formats, quantization

    seed, samples = work.params.base.seed, work.params.compress.calibration_samples
    if step.runtime == "onnxruntime":
        fp32 = work.onnx_fp32(candidate)
        if step.mode == "static":
            model = quantization.ort_static_int8(fp32, work.data.calibration(samples, seed))
            details = {**quantization.ORT_STATIC, "calibration_split": "train",
                       "calibration_samples": min(samples, len(work.data.x_train))}
        else:
            if candidate.family == "cnn":
                log.warning("%s: ONNX Runtime dynamic int8 runs convolutions slowly; mode: static suits CNNs", what)
            model = quantization.ort_dynamic_int8(fp32)
            details = dict(quantization.ORT_DYNAMIC)
        return formats.onnx_artifact(
            model, candidate.sparse,
            {"quantization": {"scheme": step.mode, "library": "onnxruntime.quantization", **details}},
        )
    engine = quantization.quantized_engine()
    if step.mode == "dynamic":
        share = quantization.quantized_share(candidate.module)
        if share < 0.5:
            log.warning(
                "%s: torch dynamic int8 covers linear and recurrent layers only: %.0f%% of this %s's weights "
                "are quantized, the rest stay fp32", what, 100 * share, candidate.family,
            )
        quantized = quantization.torch_dynamic_int8(candidate.fresh_module())
    elif step.mode == "static":
        quantized = quantization.torch_static_int8(candidate.fresh_module(), work.data.calibration(samples, seed))
    else:
        quantized = quantization.torch_qat_int8(
            candidate.fresh_module(), work.fine_tuner(step, f"{what} (QAT)")
        )
    artifact = formats.torch_quantized_artifact(candidate, quantized, step.mode, engine)
    if step.mode == "static":
        artifact.extra["quantization"].update(calibration_split="train", calibration_samples=min(samples, len(work.data.x_train)))
    return artifact


def _make(variant: Variant, parent: Any, work: _Work, run_id: str | None) -> tuple[Any, Any, dict[str, Any]]:
    """Apply the variant's steps to its parent; return (last eager model, artifact, extra manifest fields)."""
    from tasks.compression import formats, pruning
    from tasks.compression.distillation import distill

    candidate, artifact, extra = parent, None, {}
    for number, step in enumerate(variant.steps, start=1):
        what = f"{variant.name} step {number} ({step.method})"
        started, cpu = time.perf_counter(), time.process_time()
        if step.method == "prune":
            fine_tune = work.fine_tuner(step, what)
            if step.kind == "unstructured":
                candidate = pruning.prune_unstructured(candidate, step.sparsity, fine_tune)
            else:
                candidate = pruning.prune_structured(candidate, step.sparsity, work.data.example(), fine_tune)
        elif step.method == "distill":
            extra["teacher"] = candidate.origin or f"{variant.name} before step {number}"
            scratch = work.scratch / f"{variant.name}-step{number}"
            with _student_run(variant, number, step, work, run_id) as student_run_id:
                candidate = distill(
                    candidate, student_family=step.student_family, student_width=step.student_width,
                    temperature=step.temperature, alpha=step.alpha, epochs=step.epochs, lr=step.lr,
                    params=work.params, prepared=work.paths.prepared, root=work.paths.root, scratch=scratch,
                    run_id=student_run_id,
                )
            shutil.rmtree(scratch, ignore_errors=True)  # checkpoints and the student's scratch copy
        elif step.method == "quantize":
            artifact = _quantize(candidate, step, work, what)
        elif step.method == "half":
            artifact = formats.half_artifact(candidate)
        elif step.method == "export":
            if step.runtime == "onnxruntime":
                artifact = formats.onnx_artifact(work.onnx_fp32(candidate), candidate.sparse, {})
            else:
                artifact = formats.export_artifact(candidate, work.data.example())
        log.info("%s: done in %.1fs (%.1fs CPU here)", what, time.perf_counter() - started, time.process_time() - cpu)
    return candidate, artifact or formats.state_dict_artifact(candidate), extra


@contextlib.contextmanager
def _student_run(
    variant: Variant, number: int, step: CompressStep, work: _Work, variant_run_id: str | None
) -> Iterator[str | None]:
    """A run nested under the variant's for the student's training curves (its keys are the
    baseline's train_loss, val_accuracy...; the variant's run keeps the final figures)."""
    if variant_run_id is None:
        yield None
        return
    from tasks.core import tracking

    with tracking.stage_run(
        "compress", work.paths.root, work.params.base.experiment, params=step_settings(step),
        run_name=f"{variant.name} student training", parent_run_id=variant_run_id,
        tags={"variant": variant.name, "role": "distillation-training", "step": str(number)},
    ) as run:
        yield run.info.run_id


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
        "parent": variant.parent,
        "method": method_name(chain),
        "steps": {str(number): step_settings(step) for number, step in enumerate(variant.steps, start=1)},
        "calibration_samples": params.compress.calibration_samples,
        "fine_tune_lr": params.compress.fine_tune_lr,
        "seed": params.base.seed,
    }
    with tracking.stage_run(
        "compress", paths.root, params.base.experiment, params=recipe, run_name=variant.name,
        tags={"variant": variant.name, "method": method_name(chain), "parent_run_id": stage_run_id,
              "parent_variant": variant.parent},
        parent_run_id=stage_run_id,
    ) as run:
        yield run.info.run_id


def compress_variants(
    params: Params, paths: ProjectPaths, *, stage_run_id: str | None = None, output: Path | None = None
) -> list[VariantResult]:
    """Make every variant of ``params.compress`` from the baseline in ``paths.model``.

    Writes ``output`` (default ``paths.compressed``) atomically: built in a temporary folder
    beside it, then swapped in. With ``stage_run_id`` each variant is an MLflow run nested
    under that run. Raises before any work when an input or a recipe is bad.
    """
    from tasks.compression.candidate import Candidate, accuracy
    from tasks.compression.formats import count_parameters
    from tasks.compression.pruning import weight_sparsity
    from models import ModelSpec
    from tasks.data import data_digest
    from tasks.core.model_files import load_eager_model, read_manifest, torch_predictor, write_manifest

    baseline_manifest = check_inputs(params, paths)
    family = baseline_manifest["model_spec"]["family"]
    chains = check_recipes(params.compress, family)
    variants = selected_variants(params.compress, family)
    for skipped in sorted({v.name for v in params.compress.variants} - {v.name for v in variants}):
        log.info("variant %s: skipped, not made for %s models (its families, or its parent's)", skipped, family)
    output = output or paths.compressed
    output.parent.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix=f".{output.name}-build-", dir=output.parent))
    scratch = Path(tempfile.mkdtemp(prefix=f".{output.name}-scratch-", dir=output.parent))
    results: list[VariantResult] = []
    import torch

    # One intra-op thread: for models this size threads cost more than they give, and on a
    # busy machine their spin-waits made a 2-epoch fine-tune 10x slower (0.8 s -> 9 s here).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        work = _Work(params, paths, scratch)
        baseline = Candidate(
            load_eager_model(paths.model), ModelSpec.from_dict(baseline_manifest["model_spec"]),
            work.input_shape, work.num_classes, origin=BASELINE, origin_folder=paths.model,
        )
        baseline_accuracy = accuracy(torch_predictor(baseline.module)(work.data.x_val), work.data.y_val)
        log.info("baseline: %d parameters, %d bytes, val accuracy %.4f",
                 baseline_manifest["parameters"], baseline_manifest["size_bytes"], baseline_accuracy)
        states: dict[str, Any] = {BASELINE: baseline}
        digests = {BASELINE: baseline_manifest["digest"]}
        try:
            data = data_digest(paths.prepared)
        except (OSError, KeyError, ValueError):
            data = None
        for variant in variants:
            chain = chains[variant.name]
            started = time.perf_counter()
            log.info("variant %s: %s from %s", variant.name, method_name(chain), variant.parent)
            with _variant_run(variant, chain, params, paths, stage_run_id) as run_id:
                candidate, artifact, extra = _make(variant, states[variant.parent], work, run_id)
                folder = build / variant.name
                folder.mkdir()
                measured = artifact.measured or candidate.module
                parameters, nonzeros = count_parameters(measured)
                val_accuracy = accuracy(artifact.predict(work.data.x_val), work.data.y_val)
                manifest = write_manifest(folder, {
                    "name": variant.name,
                    "method": method_name(chain),
                    "recipe": [step_settings(step) for step in variant.steps],
                    "full_recipe": [{"variant": item.variant, **step_settings(item.step)} for item in chain],
                    "parent": variant.parent,
                    "parent_digest": digests[variant.parent],
                    "baseline_digest": baseline_manifest["digest"],
                    "data_digest": data,
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
                ratio = baseline_manifest["size_bytes"] / manifest["size_bytes"]
                log.info(
                    "variant %s: %s, %d bytes (%.2fx smaller), %d parameters, %d non-zero values, val accuracy %.4f (%+.2f pt)",
                    variant.name, manifest["format"], manifest["size_bytes"], ratio, parameters, nonzeros,
                    val_accuracy, 100 * (val_accuracy - baseline_accuracy),
                )
                if run_id is not None:
                    import mlflow

                    mlflow.log_metrics({
                        "size_bytes": manifest["size_bytes"], "compression_ratio": ratio,
                        "parameters": parameters, "nonzeros": nonzeros, "sparsity": manifest["sparsity"],
                        "val_accuracy": val_accuracy, "val_accuracy_change": val_accuracy - baseline_accuracy,
                        "compress_time_s": time.perf_counter() - started,
                    })
                    mlflow.set_tags({"format": manifest["format"], "runtime": manifest["runtime"]})
                    mlflow.log_artifacts(str(folder), artifact_path="variant")
            digests[variant.name] = manifest["digest"]
            if chain[-1].step.method not in {"quantize", "half", "export"}:
                # Children start from this eager model; ONNX exports of it can be shared.
                states[variant.name] = replace(
                    candidate, origin=variant.name,
                    origin_folder=folder if manifest["format"] == "torch-state-dict" else None,
                )
            results.append(VariantResult(variant.name, output / variant.name, manifest, artifact, val_accuracy))
        _summary(results, baseline_manifest, baseline_accuracy)
        _publish(build, output)
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        torch.set_num_threads(threads)
    return results


def _check_reload(folder: Path, artifact: Any, x: Any) -> None:
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


def _summary(results: list[VariantResult], baseline: dict[str, Any], baseline_accuracy: float) -> None:
    rows = [("variant", "method", "format", "bytes", "x smaller", "val acc", "change")]
    rows.append(("baseline", "-", baseline["format"], str(baseline["size_bytes"]), "1.00", f"{baseline_accuracy:.4f}", ""))
    for result in results:
        m = result.manifest
        rows.append((
            result.name, m["method"], m["format"], str(m["size_bytes"]), f"{baseline['size_bytes'] / m['size_bytes']:.2f}",
            f"{result.val_accuracy:.4f}", f"{100 * (result.val_accuracy - baseline_accuracy):+.2f} pt",
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        log.info("  ".join(cell.ljust(width) for cell, width in zip(row, widths)))


def main(argv: list[str] | None = None) -> int:
    """``python -m tasks.compress``: compress the baseline as ``params.yaml`` says."""
    args = sys.argv[1:] if argv is None else argv
    if args:
        print("usage: python -m tasks.compress   (settings come from params.yaml: compress)", file=sys.stderr)
        return 2
    setup_logging()
    paths = ProjectPaths.discover()
    try:
        params = load_params(paths.params)
        check_inputs(params, paths)
    except (ParamsError, CompressError, RecipeError) as err:
        report_stage_error("compress", str(err))
        return 2

    from tasks.core import tracking
    from tasks.launcher import LaunchError

    try:
        with tracking.stage_run(
            "compress", paths.root, params.base.experiment,
            params={"calibration_samples": params.compress.calibration_samples,
                    "fine_tune_lr": params.compress.fine_tune_lr,
                    "variants": ",".join(v.name for v in params.compress.variants),
                    "seed": params.base.seed},
        ) as run:
            compress_variants(params, paths, stage_run_id=run.info.run_id)
    except LaunchError as err:
        report_stage_error("compress", f"distillation: {err}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
