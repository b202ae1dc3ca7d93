"""The compress stage: every method makes a variant that loads back, sizes are honest, bad recipes are refused.

Each test builds its own tiny project under a temporary folder: a subset of the digits
data written as ``data/prepared`` (the files ``tasks/data.py`` describes) and a small
baseline trained in-process and saved with ``save_state_dict_model``.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from baselines import train_baseline
from models.factory import build_model
from models.spec import ModelSpec
from tasks.compress import CompressError, compress_variants, main
from tasks.compression.weights import weight_sparsity
from tasks.compression.recipes import RecipeError, check_recipes, selected_variants
from tasks.core.config import ParamsError, validate_params
from tasks.data import Preprocessing, load_split
from tasks.compression.loading import load_model_dir
from tasks.core.model_files import count_nonzeros, read_manifest
from tasks.core.paths import ProjectPaths

# Small on purpose: these tests run on 2 CPU cores.
SPECS = {
    "cnn": {"family": "cnn", "channels": [16, 32]},
    "mlp": {"family": "mlp", "hidden_sizes": [64, 32]},
    "lstm": {"family": "lstm", "rnn_hidden": 32},
}


def _write_prepared(prepared: Path, seed: int = 0) -> None:
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(digits.target))
    x = digits.images.astype(np.float32)[:, None][order]
    y = digits.target.astype(np.int64)[order]
    splits = {"train": slice(0, 400), "val": slice(400, 520), "test": slice(520, 640)}
    prepared.mkdir(parents=True)
    for split, rows in splits.items():
        np.save(prepared / f"{split}_x.npy", x[rows])
        np.save(prepared / f"{split}_y.npy", y[rows])
    preprocessing = Preprocessing.fit(x[splits["train"]], 10, [str(i) for i in range(10)])
    (prepared / "preprocess.json").write_text(preprocessing.to_json())
    (prepared / "card.json").write_text(json.dumps({"digest": "test-digits-640"}))


def _train_baseline(root: Path, family: str, epochs: int = 4) -> None:
    """A small baseline trained in-process (the train stage's Horovod run is tested elsewhere)."""
    train_baseline(root, SPECS[family], epochs, lr=0.01)


def _params(variants: list[dict[str, Any]], family: str = "cnn", **compress: Any) -> dict[str, Any]:
    return {
        "base": {"seed": 0, "experiment": "test-compress"},
        "train": {"model": SPECS[family], "epochs": 1, "batch_size": 32, "workers": 2, "warmup_epochs": 0},
        "compress": {"calibration_samples": 64, "variants": variants, **compress},
    }


@pytest.fixture(scope="module")
def baselines(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One prepared data set and a trained baseline per family (copied into each test's project)."""
    made = {}
    for family in SPECS:
        root = tmp_path_factory.mktemp(f"baseline-{family}")
        _write_prepared(root / "data" / "prepared")
        _train_baseline(root, family)
        made[family] = root
    return made


def _project(tmp_path: Path, baselines: dict[str, Path], family: str, variants: list[dict[str, Any]], **compress: Any):
    """A project folder with data, the family's baseline and params.yaml; returns (Params, ProjectPaths)."""
    import shutil

    root = tmp_path / "project"
    shutil.copytree(baselines[family], root)
    (root / "dvc.yaml").write_text("stages: {}\n")
    raw = _params(variants, family, **compress)
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return validate_params(raw), ProjectPaths(root)


def _x_test(paths: ProjectPaths) -> np.ndarray:
    return load_split(paths.prepared, "test").x


def _assert_round_trip(result: Any, x: np.ndarray) -> None:
    """The saved variant predicts the classes of the in-memory model it was evaluated with."""
    loaded = load_model_dir(result.folder)
    assert loaded.name == result.name
    np.testing.assert_array_equal(loaded.predict(x).argmax(1), result.artifact.predict(x).argmax(1))
    manifest = read_manifest(result.folder)
    assert manifest["size_bytes"] == (result.folder / manifest["file"]).stat().st_size
    assert sorted(p.name for p in result.folder.iterdir()) == sorted(["manifest.json", manifest["file"]])
    for key in ("name", "method", "recipe", "parent", "parent_digest", "parameters", "nonzeros", "file",
                "size_bytes", "format", "runtime", "model_spec", "input_shape", "digest"):
        assert key in manifest, key


# -- every method ------------------------------------------------------------------------------

CNN_VARIANTS = [
    {"name": "int8-dynamic", "steps": [{"method": "quantize", "mode": "dynamic", "runtime": "torch"}]},
    {"name": "fp32-onnx", "steps": [{"method": "export", "runtime": "onnxruntime"}]},
    {"name": "fp32-pt2", "steps": [{"method": "export", "runtime": "torch"}]},
    {"name": "fp16", "steps": [{"method": "half"}]},
    {"name": "int8-static-ort", "steps": [{"method": "quantize", "mode": "static"}]},
    {"name": "int8-static-torch", "steps": [{"method": "quantize", "mode": "static", "runtime": "torch"}]},
    {"name": "int8-qat-torch", "steps": [{"method": "quantize", "mode": "qat", "runtime": "torch", "fine_tune_epochs": 1}]},
    {"name": "pruned-l1-70", "steps": [{"method": "prune", "kind": "unstructured", "sparsity": 0.7, "fine_tune_epochs": 1}]},
    {"name": "pruned-l1-70-int8-static-ort", "parent": "pruned-l1-70", "steps": [{"method": "quantize", "mode": "static"}]},
    {"name": "pruned-l1-70-fp16", "parent": "pruned-l1-70", "steps": [{"method": "half"}]},
    {"name": "pruned-structured-50", "steps": [{"method": "prune", "kind": "structured", "sparsity": 0.5, "fine_tune_epochs": 1}]},
    {"name": "pruned-structured-50-int8-static-torch", "parent": "pruned-structured-50",
     "steps": [{"method": "quantize", "mode": "static", "runtime": "torch"}]},
]


@pytest.fixture(scope="module")
def cnn_results(baselines: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    params, paths = _project(tmp_path_factory.mktemp("cnn"), baselines, "cnn", CNN_VARIANTS)
    return paths, compress_variants(params, paths)


def test_every_cnn_method_loads_back_and_predicts_like_the_evaluated_model(cnn_results) -> None:
    paths, results = cnn_results
    assert [r.name for r in results] == [v["name"] for v in CNN_VARIANTS]
    x = _x_test(paths)
    for result in results:
        _assert_round_trip(result, x)
    # Nothing else in the output: no checkpoints, no scratch folders, no leftovers beside it.
    assert sorted(p.name for p in paths.compressed.iterdir()) == sorted(v["name"] for v in CNN_VARIANTS)
    assert sorted(p.name for p in paths.artifacts.iterdir()) == ["compressed", "model"]


def test_manifests_record_how_each_variant_was_made(cnn_results) -> None:
    paths, results = cnn_results
    by_name = {r.name: r.manifest for r in results}
    baseline = read_manifest(paths.model)
    child = by_name["pruned-l1-70-int8-static-ort"]
    assert child["method"] == "prune+quantize"
    assert child["parent"] == "pruned-l1-70" and child["parent_digest"] == by_name["pruned-l1-70"]["digest"]
    assert child["recipe"] == [{"method": "quantize", "mode": "static", "runtime": "onnxruntime",
                                "fine_tune_epochs": 0, "lr": None, "fallback": None}]
    assert [step["method"] for step in child["full_recipe"]] == ["prune", "quantize"]
    assert by_name["fp16"]["parent_digest"] == baseline["digest"]
    expected = {
        "int8-dynamic": ("torch-quantized", "pytorch"), "fp32-onnx": ("onnx", "onnxruntime"),
        "fp32-pt2": ("torch-export", "pytorch"), "fp16": ("torch-state-dict-fp16", "pytorch"),
        "int8-static-ort": ("onnx", "onnxruntime"), "int8-qat-torch": ("torch-quantized", "pytorch"),
        "pruned-l1-70": ("torch-state-dict-gzip", "pytorch"), "pruned-l1-70-int8-static-ort": ("onnx-gzip", "onnxruntime"),
        "pruned-structured-50": ("torch-state-dict", "pytorch"),
    }
    for name, (fmt, runtime) in expected.items():
        assert (by_name[name]["format"], by_name[name]["runtime"]) == (fmt, runtime), name
    # Compression shrinks the file a user ships.
    for name in ("fp16", "int8-static-ort", "int8-qat-torch", "pruned-l1-70", "pruned-l1-70-int8-static-ort"):
        assert by_name[name]["size_bytes"] < baseline["size_bytes"], name
    assert by_name["int8-static-ort"]["size_bytes"] < baseline["size_bytes"] / 2.5
    assert by_name["fp16"]["size_bytes"] < baseline["size_bytes"] * 0.65  # weights halve; the zip framing stays
    # What making each variant cost: its steps, and from the baseline (its parent's steps too).
    # CPU time comes in 10 ms ticks (0.04 J at 4 W per thread): a step quicker than that (fp16)
    # may read 0; a variant that trains never does.
    for name, manifest in by_name.items():
        energy = manifest["energy"]
        assert energy["make_j"] >= energy["steps_j"] >= energy["train_j"] >= 0, name
        assert "estimate (CodeCarbon" in energy["source"] or "rapl" in energy["source"], name
    for name in ("int8-qat-torch", "pruned-l1-70"):  # trained on the Horovod workers
        assert by_name[name]["energy"]["train_j"] > 0, name
    assert by_name["int8-dynamic"]["energy"]["train_j"] == 0  # no training, only this process's work
    assert child["energy"]["make_j"] == pytest.approx(
        by_name["pruned-l1-70"]["energy"]["make_j"] + child["energy"]["steps_j"])


def test_unstructured_sparsity_is_reported_as_measured(cnn_results) -> None:
    paths, results = cnn_results
    result = next(r for r in results if r.name == "pruned-l1-70")
    module = load_model_dir(result.folder).module
    measured = weight_sparsity(module)
    assert result.manifest["sparsity"] == pytest.approx(measured, abs=1e-6)
    assert measured == pytest.approx(0.7, abs=0.01)
    assert result.manifest["nonzeros"] == count_nonzeros(module)
    assert result.manifest["nonzeros"] < 0.4 * result.manifest["parameters"]
    assert result.manifest["parameters"] == read_manifest(paths.model)["parameters"]  # zeros, same shape
    # Stored compressed, so the zeros show on disk.
    assert result.manifest["size_bytes"] < 0.6 * read_manifest(paths.model)["size_bytes"]


def test_structured_pruning_makes_fewer_parameters_and_a_smaller_file(cnn_results) -> None:
    paths, results = cnn_results
    baseline = read_manifest(paths.model)
    pruned = next(r for r in results if r.name == "pruned-structured-50").manifest
    assert pruned["model_spec"]["channels"] == [8, 16]
    assert pruned["parameters"] < 0.4 * baseline["parameters"]
    assert pruned["size_bytes"] < 0.5 * baseline["size_bytes"]
    assert pruned["sparsity"] == 0.0  # dense: smaller, not sparse


@pytest.mark.integration
def test_two_worker_pruning_fine_tune_keeps_the_exact_sparsity_and_identical_ranks(cnn_results) -> None:
    """The fine-tunes ran on 2 Horovod workers: every pruned tensor holds exactly its mask's
    zeros, and both ranks ended with the same weights (each rank's own digest of them)."""
    from tasks.compression.candidate import Candidate
    from tasks.compression.pruning import prune_unstructured

    paths, results = cnn_results
    by_name = {r.name: r.manifest for r in results}
    (training,) = by_name["pruned-l1-70"]["training"]
    assert (training["method"], training["world_size"], training["epochs_run"]) == ("prune", 2, 1)
    ranks = training["ranks_at_end"]
    assert len(ranks["weights_sha256"]) == 2 and ranks["identical"]
    assert len(set(ranks["weights_sha256"])) == 1
    assert ranks["masked_nonzeros"] == [0, 0]
    # The masks pruning makes from this baseline (deterministic), against the saved weights.
    baseline = Candidate(load_model_dir(paths.model).module, ModelSpec.from_dict(SPECS["cnn"]), (1, 8, 8), 10)
    _, masks = prune_unstructured(baseline, 0.7)
    weights = load_model_dir(next(r for r in results if r.name == "pruned-l1-70").folder).module.state_dict()
    pruned_total = sum(int((~mask).sum()) for mask in masks.values())
    assert pruned_total == round(0.7 * sum(mask.numel() for mask in masks.values()))
    for name, mask in masks.items():
        assert int((weights[name][~mask] != 0).sum()) == 0, name  # pruned: exactly zero
        assert int((weights[name] == 0).sum()) == int((~mask).sum()), name  # exactly the mask's zeros
    # QAT and structured pruning trained on the same loop, the ranks (QAT observers included) as one.
    for name in ("int8-qat-torch", "pruned-structured-50"):
        (training,) = by_name[name]["training"]
        assert training["world_size"] == 2 and training["ranks_at_end"]["identical"], name
    (structured,) = by_name["pruned-structured-50"]["training"]
    assert structured["start_val_accuracy"] < 1.0 and "val_accuracy" in structured


@pytest.mark.integration
def test_a_fine_tune_killed_mid_way_resumes_on_the_rerun_to_the_same_model(
    baselines, tmp_path: Path, monkeypatch, capfd, caplog, mlflow_uri: str
) -> None:
    """A worker dies after epoch 2 of the second variant's fine-tune: the stage fails, keeps
    the checkpoints; the re-run reuses the first variant's finished fine-tune, resumes the
    second at epoch 3 and ends with the model an uninterrupted run makes."""
    from mlflow import MlflowClient

    from tasks.core import tracking
    from tasks.training import LaunchError
    from tasks.training.fault import FAULT_ENV

    structured = {"name": "pruned-structured-50", "steps": [
        {"method": "prune", "kind": "structured", "sparsity": 0.5, "fine_tune_epochs": 1}]}
    unstructured = {"name": "pruned-l1-70", "steps": [
        {"method": "prune", "kind": "unstructured", "sparsity": 0.7, "fine_tune_epochs": 3}]}
    params, paths = _project(tmp_path / "crash", baselines, "cnn", [structured, unstructured])
    monkeypatch.setenv(FAULT_ENV, "2")  # the 1-epoch fine-tune never gets there
    with pytest.raises(LaunchError, match="worker 1 exited with status 17"):
        compress_variants(params, paths)
    assert (paths.checkpoints / "pruned-l1-70" / "step1" / "checkpoints" / "last.pt").is_file()
    assert (paths.checkpoints / "pruned-structured-50" / "step1" / "model" / "manifest.json").is_file()
    assert not paths.compressed.exists()

    monkeypatch.delenv(FAULT_ENV)
    capfd.readouterr()
    caplog.set_level("INFO", logger="slimflow.compress")
    with tracking.stage_run("compress", paths.root, "test-compress") as stage:
        _, resumed = compress_variants(params, paths, stage_run_id=stage.info.run_id)
    err = capfd.readouterr().err  # the workers' output
    assert "pruned-structured-50 step 1: reusing the finished training" in caplog.text
    assert err.count("world_size=2") == 1  # one launch: the killed fine-tune's
    assert "resuming from checkpoint at epoch 2 of 3" in err, err[-3000:]
    assert "epoch 2/3 " not in err and "epoch 3/3 " in err
    assert not paths.checkpoints.exists()  # removed once the output is published

    reference_params, reference_paths = _project(tmp_path / "reference", baselines, "cnn", [unstructured])
    (reference,) = compress_variants(reference_params, reference_paths)
    got, want = load_model_dir(resumed.folder).module.state_dict(), load_model_dir(reference.folder).module.state_dict()
    for name, tensor in want.items():
        torch.testing.assert_close(got[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    assert resumed.manifest["sparsity"] == reference.manifest["sparsity"]
    # Each variant's run carries its whole curve: step 0 (the pruned model before fine-tuning) on.
    client = MlflowClient(mlflow_uri)
    runs = {r.info.run_name: r for r in client.search_runs([client.get_experiment_by_name("test-compress").experiment_id])}
    for name, steps in (("pruned-l1-70", [0, 1, 2, 3]), ("pruned-structured-50", [0, 1])):
        history = client.get_metric_history(runs[name].info.run_id, "fine_tune/val_accuracy")
        assert sorted(m.step for m in history) == steps, name
    assert runs["pruned-l1-70"].data.params["fine_tune/resumed_from_epoch"] == "2"
    curve = json.loads((paths.plots / "fine_tune" / "pruned-l1-70.json").read_text())
    assert [row["epoch"] for row in curve] == [1, 2, 3]
    assert {"train_loss", "val_loss", "train_accuracy", "val_accuracy"} <= set(curve[0])
    assert sorted(p.name for p in (paths.plots / "fine_tune").iterdir()) == ["pruned-l1-70.json", "pruned-structured-50.json"]


def test_structured_pruning_of_an_mlp(baselines, tmp_path: Path) -> None:
    variants = [
        {"name": "pruned-structured-50", "steps": [{"method": "prune", "kind": "structured", "sparsity": 0.5}]},
        {"name": "pruned-structured-50-int8-static-ort", "parent": "pruned-structured-50",
         "steps": [{"method": "quantize", "mode": "static"}]},
    ]
    params, paths = _project(tmp_path, baselines, "mlp", variants)
    results = compress_variants(params, paths)
    baseline = read_manifest(paths.model)
    assert results[0].manifest["model_spec"]["hidden_sizes"] == [32, 16]
    assert results[0].manifest["parameters"] < 0.6 * baseline["parameters"]
    assert results[0].manifest["size_bytes"] < 0.6 * baseline["size_bytes"]
    for result in results:
        _assert_round_trip(result, _x_test(paths))


def test_lstm_dynamic_int8_pruning_and_distillation(baselines, tmp_path: Path) -> None:
    variants = [
        {"name": "int8-dynamic", "steps": [{"method": "quantize", "mode": "dynamic", "runtime": "torch"}]},
        {"name": "int8-dynamic-ort", "steps": [{"method": "quantize", "mode": "dynamic", "runtime": "onnxruntime"}]},
        {"name": "pruned-l1-50", "steps": [{"method": "prune", "kind": "unstructured", "sparsity": 0.5}]},
        {"name": "distilled-w0.5", "steps": [{"method": "distill", "student_width": 0.5, "epochs": 1}]},
        {"name": "pruned-structured-50", "steps": [
            {"method": "prune", "kind": "structured", "sparsity": 0.5, "fine_tune_epochs": 1}]},
    ]
    params, paths = _project(tmp_path, baselines, "lstm", variants)
    results = compress_variants(params, paths)
    baseline = read_manifest(paths.model)
    by_name = {r.name: r for r in results}
    for result in results:
        _assert_round_trip(result, _x_test(paths))
    # The half-width lstm student started from its teacher's strongest units, loaded by the workers.
    student = by_name["distilled-w0.5"].manifest
    assert student["model_spec"]["width"] == 0.5 and student["parameters"] < 0.4 * baseline["parameters"]
    assert student["training"][0]["student_start"] == "teacher-pruned"
    # Structured pruning: half the hidden units gone, a smaller dense lstm fine-tuned by the workers.
    structured = by_name["pruned-structured-50"].manifest
    assert structured["model_spec"]["rnn_hidden"] == 16 and structured["model_spec"]["width"] == 1.0
    assert structured["parameters"] < 0.4 * baseline["parameters"] and structured["sparsity"] == 0
    # The LSTM's weights are quantized (not only the head): the file shrinks well.
    assert by_name["int8-dynamic"].manifest["size_bytes"] < 0.5 * baseline["size_bytes"]
    assert by_name["int8-dynamic-ort"].manifest["size_bytes"] < 0.5 * baseline["size_bytes"]
    assert by_name["pruned-l1-50"].manifest["sparsity"] == pytest.approx(
        weight_sparsity(load_model_dir(by_name["pruned-l1-50"].folder).module), abs=1e-6)


def _candidate(spec: dict[str, Any], input_shape: tuple[int, ...]):
    from tasks.compression.candidate import Candidate

    torch.manual_seed(0)
    model_spec = ModelSpec.from_dict(spec)
    return Candidate(build_model(model_spec, input_shape, 10).eval(), model_spec, input_shape, 10)


@pytest.mark.parametrize("spec, input_shape, first_layer", [
    ({"family": "cnn", "channels": [16, 32]}, (1, 8, 8), "features.0"),
    ({"family": "mlp", "hidden_sizes": [64, 32]}, (64,), None),
])
def test_a_narrower_student_starts_from_its_teachers_strongest_channels(
    spec: dict[str, Any], input_shape: tuple[int, ...], first_layer: str | None,
) -> None:
    """``student_init: auto``: the student's first layer holds a subset of the teacher's own
    filters / units (in the teacher's order; structured pruning picks them by L1 magnitude),
    and the weights load strictly into the student the workers build from its spec."""
    from tasks.compression.distillation import student_spec, teacher_start
    from tasks.compression.pruning import structured_layers

    teacher = _candidate(spec, input_shape)
    student = student_spec(teacher.spec, None, 0.5)
    start = teacher_start(teacher, student, torch.randn(2, *input_shape))
    assert start is not None
    build_model(student, input_shape, 10).load_state_dict(start.module.state_dict())  # strict
    name = first_layer or next(iter(structured_layers(teacher.module)))
    teacher_weight = structured_layers(teacher.module)[name].weight.detach()
    start_weight = structured_layers(start.module)[name].weight.detach()
    assert start_weight.shape[0] == teacher_weight.shape[0] // 2
    kept = [int((teacher_weight == row).flatten(1).all(1).nonzero()[0]) for row in start_weight]
    assert kept == sorted(set(kept))  # distinct rows of the teacher, in its order


@pytest.mark.parametrize("spec, input_shape, tokens", [
    ({"family": "gru", "rnn_hidden": 8}, (12, 3), False),  # sequences (T, F)
    ({"family": "lstm", "rnn_hidden": 8, "rnn_layers": 2}, (1, 6, 5), False),  # an image, row by row
    ({"family": "lstm", "rnn_hidden": 8, "embed_dim": 8, "vocab_size": 30}, (7,), True),  # token ids
])
def test_a_recurrent_student_starts_from_its_teachers_strongest_units(
    spec: dict[str, Any], input_shape: tuple[int, ...], tokens: bool,
) -> None:
    """``student_init: auto`` on an lstm/gru: the half-width student is its teacher with the
    weakest hidden units (and embedding dimensions) removed. Units that carry nothing (every
    weight in and out zero) are the ones removed, and the student then computes exactly what
    its teacher does; its weights load strictly into the model the workers build."""
    from tasks.compression.distillation import student_spec, teacher_start

    teacher = _candidate(spec, input_shape)
    rnn, dead = teacher.module.rnn, [1, 2, 4, 7]  # 4 of 8 units, in every layer
    gates = 4 if isinstance(rnn, torch.nn.LSTM) else 3
    rows = [gate * 8 + unit for gate in range(gates) for unit in dead]
    with torch.no_grad():
        for layer in range(rnn.num_layers):
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                getattr(rnn, f"{name}_l{layer}")[rows] = 0
            getattr(rnn, f"weight_hh_l{layer}")[:, dead] = 0
            if layer + 1 < rnn.num_layers:
                getattr(rnn, f"weight_ih_l{layer + 1}")[:, dead] = 0
        teacher.module.head.weight[:, dead] = 0
        if tokens:  # embedding dimensions 0-3 unused
            teacher.module.embedding.weight[:, :4] = 0
            rnn.weight_ih_l0[:, :4] = 0
    student = student_spec(teacher.spec, None, 0.5)
    x = torch.randint(1, 30, (5, *input_shape)).float() if tokens else torch.randn(5, *input_shape)
    start = teacher_start(teacher, student, x[:2])
    assert start is not None and start.spec == student
    assert start.module.rnn.hidden_size == 4
    build_model(student, input_shape, 10).load_state_dict(start.module.state_dict())  # strict
    with torch.no_grad():
        torch.testing.assert_close(start.module(x), teacher.module(x))


@pytest.mark.parametrize("spec, input_shape", [
    ({"family": "gru", "rnn_hidden": 32, "rnn_layers": 2}, (12, 3)),
    ({"family": "lstm", "rnn_hidden": 32, "embed_dim": 16, "vocab_size": 30, "width": 0.5}, (7,)),
])
def test_structured_pruning_of_a_recurrent_model_removes_hidden_units_of_every_layer(
    spec: dict[str, Any], input_shape: tuple[int, ...],
) -> None:
    """``kind: structured`` on an lstm/gru: ``sparsity`` of each layer's hidden units gone (a
    token model's embedding keeps its width); the spec states the sizes at width 1 and
    rebuilds the pruned model exactly."""
    from tasks.compression.pruning import prune_structured

    model = _candidate(spec, input_shape)
    hidden = model.module.rnn.hidden_size
    pruned = prune_structured(model, 0.75, torch.randn(2, *input_shape))
    assert pruned.module.rnn.hidden_size == pruned.spec.rnn_hidden == hidden // 4
    assert pruned.module.rnn.num_layers == model.module.rnn.num_layers and pruned.spec.width == 1.0
    assert pruned.module.rnn.input_size == model.module.rnn.input_size
    build_model(pruned.spec, input_shape, 10).load_state_dict(pruned.module.state_dict())  # strict


def test_other_students_start_from_random_weights() -> None:
    """Another family, a transformer student, or one wider than its teacher: no teacher
    start (the distillation starts from random weights, as ``student_init: random``)."""
    from tasks.compression.distillation import student_spec, teacher_start

    cnn = _candidate({"family": "cnn", "channels": [16, 32]}, (1, 8, 8))
    example = torch.randn(2, 1, 8, 8)
    assert teacher_start(cnn, student_spec(cnn.spec, "mlp", None), example) is None
    assert teacher_start(cnn, student_spec(cnn.spec, None, 2.0), example) is None
    gru = _candidate({"family": "gru", "rnn_hidden": 32}, (8, 8))
    assert teacher_start(gru, student_spec(gru.spec, "lstm", None), torch.randn(2, 8, 8)) is None
    assert teacher_start(gru, student_spec(gru.spec, None, 2.0), torch.randn(2, 8, 8)) is None
    transformer = _candidate({"family": "transformer", "embed_dim": 16, "heads": 2, "ffn_dim": 16}, (1, 8, 8))
    assert teacher_start(transformer, student_spec(transformer.spec, None, 0.5), example) is None


@pytest.mark.integration
def test_distilled_student_has_at_most_30_percent_of_the_teacher(baselines, tmp_path: Path, mlflow_uri: str,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    """Distillation trains the student with Horovod (2 workers) like the baseline."""
    from mlflow import MlflowClient

    from tasks.core import tracking

    variants = [
        {"name": "distilled-cnn-w0.5", "steps": [{"method": "distill", "student_width": 0.5, "epochs": 2}]},
        {"name": "distilled-cnn-w0.5-int8-static-ort", "parent": "distilled-cnn-w0.5",
         "steps": [{"method": "quantize", "mode": "static"}]},
        {"name": "distilled-cnn-w0.5-random", "steps": [
            {"method": "distill", "student_width": 0.5, "epochs": 1, "student_init": "random"}]},
    ]
    params, paths = _project(tmp_path, baselines, "cnn", variants)
    with tracking.stage_run("compress", paths.root, "test-compress") as stage, \
            caplog.at_level(logging.INFO, logger="slimflow.compress"):
        results = compress_variants(params, paths, stage_run_id=stage.info.run_id)
    teacher = read_manifest(paths.model)
    student = results[0].manifest
    assert student["parameters"] <= 0.3 * teacher["parameters"]
    assert student["model_spec"]["width"] == 0.5
    assert student["teacher"] == "baseline"
    assert results[1].manifest["method"] == "distill+quantize"
    for result in results:
        _assert_round_trip(result, _x_test(paths))
    # The student's checkpoints lived in the variant's checkpoint folder, removed once published.
    assert sorted(p.name for p in paths.compressed.iterdir()) == [v["name"] for v in variants]
    assert sorted(p.name for p in paths.artifacts.iterdir()) == ["compressed", "model"]
    assert not list(paths.compressed.rglob("*.pt.tmp")) and not list(paths.compressed.rglob("last.pt"))
    # The student's training curve (rank 0 logs it) sits in the variant's own run, beside its
    # final figures, and in a DVC plot.
    client = MlflowClient(mlflow_uri)
    runs = {r.info.run_name: r for r in client.search_runs([client.get_experiment_by_name("test-compress").experiment_id])}
    variant_run = runs["distilled-cnn-w0.5"]
    assert variant_run.data.tags["mlflow.parentRunId"] == stage.info.run_id
    # Step 0: the student as it started (the teacher's pruned weights), before distillation.
    history = client.get_metric_history(variant_run.info.run_id, "fine_tune/val_loss")
    assert sorted(m.step for m in history) == [0, 1, 2]
    assert variant_run.data.params["fine_tune/world_size"] == "2"
    assert variant_run.data.metrics["val_accuracy"] == pytest.approx(results[0].val_accuracy)
    curve = json.loads((paths.plots / "fine_tune" / "distilled-cnn-w0.5.json").read_text())
    assert [row["epoch"] for row in curve] == [1, 2]
    assert student["training"][0]["method"] == "distill" and student["training"][0]["world_size"] == 2
    # How much its kept epoch gained in its last epoch (2 epochs: the window leaves the first before it).
    best = student["training"][0]["best_epoch"]
    gain = student["training"][0]["val_accuracy_late_gain_pts"]
    assert gain == pytest.approx(100 * (curve[best - 1]["val_accuracy"] - curve[0]["val_accuracy"]), abs=1e-6)
    said = [r.getMessage() for r in caplog.records if "still improving" in r.getMessage()]
    assert said == ([f"distilled-cnn-w0.5 step 1 (distill): still improving when its 2 epochs ran out: validation "
                     f"accuracy {gain:+.2f} points in its last epoch, where the gate tolerates 1 (the step's epochs "
                     "set them)"] if gain > 1 else [])
    # The workers' student started from the teacher's pruned weights: its validation accuracy
    # before the first epoch is theirs, as computed here; with student_init: random, it
    # started from random weights.
    from tasks.compression.candidate import Candidate
    from tasks.compression.distillation import student_spec, teacher_start
    from tasks.core.model_files import load_eager_model
    from tasks.data import load_preprocessing

    baseline = load_eager_model(paths.model)
    spec = ModelSpec.from_dict(teacher["model_spec"])
    val = load_split(paths.prepared, "val", load_preprocessing(paths.prepared))
    start = teacher_start(Candidate(baseline, spec, tuple(teacher["input_shape"]), 10),
                          student_spec(spec, None, 0.5), torch.from_numpy(val.x[:2]))
    with torch.no_grad():
        start_accuracy = float((start.module(torch.from_numpy(val.x)).argmax(1).numpy() == val.y).mean())
    assert student["training"][0]["student_start"] == "teacher-pruned"
    assert student["training"][0]["start_val_accuracy"] == pytest.approx(start_accuracy)
    random_start = results[2].manifest["training"][0]
    assert random_start["student_start"] == "random" and "start_val_accuracy" not in random_start


# -- bad recipes -------------------------------------------------------------------------------

PRUNE = {"method": "prune", "kind": "unstructured", "sparsity": 0.5}
STATIC = {"method": "quantize", "mode": "static"}

V1 = "compress.variants.1(v)"  # how messages name the first variant (numbered from 1, with its name)

BAD_RECIPES = [
    # (variants, family, words the one message must contain)
    ([{"name": "v", "steps": [{"method": "squeeze"}]}], "cnn", [f"{V1}.steps.1(squeeze).method: unknown method"]),
    ([{"name": "v", "steps": [{"kind": "structured"}]}], "cnn", [f"{V1}.steps.1.method: every step needs a method"]),
    ([{"name": "v", "steps": [PRUNE, {**PRUNE, "sparsity": 1.0}]}], "cnn", [f"{V1}.steps.2(prune).sparsity:", "less than 1"]),
    ([{"name": "v", "steps": [{**PRUNE, "sparsity": 1.5}]}], "cnn", [f"{V1}.steps.1(prune).sparsity:", "less than 1", "1.5"]),
    ([{"name": "v", "steps": [{**PRUNE, "sparsity": -0.1}]}], "cnn", [f"{V1}.steps.1(prune).sparsity:", "greater than 0"]),
    ([{"name": "v", "steps": [{"method": "prune", "sparsity": 0.5}]}], "cnn", [f"{V1}.steps.1(prune).kind: prune needs kind"]),
    ([{"name": "v", "steps": [{"method": "prune", "kind": "structured"}]}], "cnn",
     [f"{V1}.steps.1(prune).sparsity: prune needs sparsity"]),
    ([{"name": "v", "steps": [{**PRUNE, "lr": 0.01}]}], "cnn", [f"{V1}.steps.1(prune).lr:", "fine_tune_epochs >= 1"]),
    ([{"name": "v", "steps": [{"method": "quantize"}]}], "cnn", [f"{V1}.steps.1(quantize).mode: quantize needs mode"]),
    ([{"name": "v", "steps": [{"method": "distill"}]}], "cnn", [f"{V1}.steps.1(distill):", "student_width"]),
    ([{"name": "v", "steps": [{"method": "distill", "student_family": "rnn"}]}], "cnn",
     [f"{V1}.steps.1(distill).student_family:", "'mlp', 'cnn', 'lstm', 'gru' or 'transformer'", "got 'rnn'"]),
    ([{"name": "v", "steps": [STATIC]}], "lstm", [f"{V1}.steps.1(quantize):", "static", "mode: dynamic"]),
    ([{"name": "v", "steps": [{"method": "quantize", "mode": "qat", "runtime": "torch", "fine_tune_epochs": 1}]}], "gru",
     [f"{V1}.steps.1(quantize):", "mode: dynamic"]),
    ([{"name": "v", "steps": [STATIC, {"method": "quantize", "mode": "dynamic"}]}], "cnn",
     [f"{V1}.steps.2(quantize): quantize after quantize"]),
    ([{"name": "p", "steps": [STATIC]}, {"name": "c", "parent": "p", "steps": [{"method": "quantize", "mode": "dynamic"}]}],
     "cnn", ["compress.variants.2(c).steps.1(quantize): quantize after quantize", "parent 'p'"]),
    ([{"name": "v", "steps": [{"method": "half"}, PRUNE]}], "cnn", [f"{V1}.steps.2(prune): prune after half", "last step"]),
    ([{"name": "v", "parent": "nowhere", "steps": [PRUNE]}], "cnn", [f"{V1}.parent: 'nowhere' is not a variant"]),
    ([{"name": "c", "parent": "p", "steps": [PRUNE]}, {"name": "p", "steps": [PRUNE]}], "cnn",
     ["compress.variants.1(c).parent: 'p'", "earlier"]),
    ([{"name": "v", "steps": [{"method": "quantize", "mode": "qat"}]}], "cnn",
     [f"{V1}.steps.1(quantize).runtime:", "runtime: torch"]),
    ([{"name": "v", "steps": [{"method": "quantize", "mode": "qat", "runtime": "torch"}]}], "cnn",
     [f"{V1}.steps.1(quantize).fine_tune_epochs:", "qat"]),
    ([{"name": "v", "steps": [{**STATIC, "fine_tune_epochs": 2}]}], "cnn",
     [f"{V1}.steps.1(quantize).fine_tune_epochs: applies to mode qat only"]),
    ([{"name": "v", "steps": [{**PRUNE, "mode": "static"}]}], "cnn",
     [f"{V1}.steps.1(prune).mode: unknown key for prune (it reads: kind, sparsity, fine_tune_epochs, lr)"]),
    ([{"name": "v", "steps": [{**PRUNE, "sparsty": 0.5}]}], "cnn", [f"{V1}.steps.1(prune).sparsty: unknown key"]),
    ([{"name": "v", "steps": [{"method": "half", "runtime": "torch"}]}], "cnn",
     [f"{V1}.steps.1(half).runtime: unknown key for half (it reads: nothing)"]),
    ([{"name": "v", "steps": []}], "cnn", [f"{V1}.steps:", "at least 1"]),
    ([{"name": "v", "families": ["resnet"], "steps": [PRUNE]}], "cnn", [f"{V1}.families.0:", "got 'resnet'"]),
    ([{"name": "baseline", "steps": [PRUNE]}], "cnn", ["compress.variants.1(baseline).name:", "trained model"]),
]


@pytest.mark.parametrize(("variants", "family", "words"), BAD_RECIPES)
def test_bad_recipes_are_refused_with_one_message_naming_variant_and_step(variants, family, words) -> None:
    raw = _params(variants)
    with pytest.raises((ParamsError, RecipeError)) as caught:
        params = validate_params(raw)
        check_recipes(params.compress, family)
    message = str(caught.value)
    assert len(message.splitlines()) == 1, message
    for word in words:
        assert word in message, (word, message)


def test_a_step_that_does_not_suit_the_model_family_is_refused_before_any_stage(tmp_path: Path) -> None:
    """``slimflow run`` and the flow call check_pipeline: the family rules, named like params errors."""
    from tasks.compression.recipes import check_pipeline

    raw = _params([{"name": "ok", "steps": [{"method": "prune", "kind": "structured", "sparsity": 0.5}]},
                   {"name": "rnn-static", "steps": [STATIC]}],
                  family="lstm")
    with pytest.raises(ParamsError) as caught:
        check_pipeline(validate_params(raw))
    assert str(caught.value).startswith("params.yaml: compress.variants.2(rnn-static).steps.1(quantize): static int8")
    check_pipeline(validate_params(_params(raw["compress"]["variants"], family="cnn")))


@pytest.mark.parametrize("source", [{"source": "breast_cancer"}, {"source": "csv", "path": "data/raw/rows.csv"}])
def test_a_model_or_student_that_cannot_read_rows_of_features_is_refused_before_any_stage(source: dict) -> None:
    """A tabular source with the default cnn failed in every Horovod worker, retried twice;
    now the pipeline's check names the key, the source and the families that read rows."""
    from tasks.compression.recipes import check_pipeline

    distill = [{"name": "student", "steps": [{"method": "distill", "student_family": "cnn", "student_width": 0.5}]}]

    def params(family: str, variants: list[dict[str, Any]], data: dict | None = source) -> Any:
        return validate_params({"prepare": data or {}, "train": {"model": {"family": family}},
                                "compress": {"variants": variants}})

    for family in ("cnn", "transformer"):
        with pytest.raises(ParamsError) as caught:
            check_pipeline(params(family, []))
        assert str(caught.value) == (f"params.yaml: train.model.family: {family} does not read rows of features "
                                     f"(prepare.source {source['source']}); use one of mlp, lstm, gru")
    with pytest.raises(ParamsError) as caught:
        check_pipeline(params("mlp", distill))
    assert str(caught.value) == (f"params.yaml: compress.variants.1(student).steps.1(distill): student_family: cnn "
                                 f"does not read rows of features (prepare.source {source['source']}); use one of mlp, lstm, gru")
    check_pipeline(params("mlp", []))
    check_pipeline(params("mlp", distill, None))  # images: a cnn student reads them


def test_an_npz_the_model_or_a_student_cannot_read_is_refused_from_its_header_before_any_stage(tmp_path: Path) -> None:
    """An npz says its shape only in its arrays: the prepare stage used to replace the
    prepared data before the train stage refused the model. The pipeline's check now reads
    the inputs array's header (not the data) and refuses as for the other sources."""
    from tasks.compression.recipes import check_pipeline
    from tasks.sources import check_raw_data, npz_input_shape

    rng = np.random.default_rng(0)
    (tmp_path / "data").mkdir()
    np.savez(tmp_path / "data" / "rows.npz", x=rng.normal(size=(40, 8)).astype(np.float32), y=np.arange(40) % 2)
    np.savez_compressed(tmp_path / "data" / "grey.npz", pixels=rng.normal(size=(40, 6, 6)), y=np.arange(40) % 2)
    np.savez(tmp_path / "data" / "rgb.npz", x=rng.normal(size=(40, 3, 12, 12)), y=np.arange(40) % 2)
    (tmp_path / "data" / "broken.npz").write_bytes(b"PK\x03\x04 not a zip")
    assert npz_input_shape(tmp_path / "data" / "rows.npz", "x") == (8,)
    assert npz_input_shape(tmp_path / "data" / "grey.npz", "pixels") == (1, 6, 6)  # as prepare makes it
    assert npz_input_shape(tmp_path / "data" / "rgb.npz", "x") == (3, 12, 12)
    assert npz_input_shape(tmp_path / "data" / "rows.npz", "pixels") is None  # prepare names what is wrong
    assert npz_input_shape(tmp_path / "data" / "broken.npz", "x") is None
    assert npz_input_shape(tmp_path / "data" / "missing.npz", "x") is None

    def check(path: str, model: dict, variants: list[dict[str, Any]] | None = None, inputs: str = "x") -> None:
        params = validate_params({"prepare": {"source": "npz", "path": path, "npz_inputs": inputs},
                                  "train": {"model": model}, "compress": {"variants": variants or []}})
        check_pipeline(params, input_shape=check_raw_data(params.prepare, tmp_path))

    with pytest.raises(ParamsError) as caught:
        check("data/rows.npz", {"family": "cnn"})
    assert str(caught.value) == ("params.yaml: train.model.family: cnn needs image inputs (C, H, W), got input shape (8,) "
                                 "(prepare.path data/rows.npz); use one of mlp, lstm, gru")
    with pytest.raises(ParamsError, match=r"train.model.patch_size: transformer: patch_size 8 is larger than the image \(6x6\)"):
        check("data/grey.npz", {"family": "transformer", "patch_size": 8}, inputs="pixels")
    student = [{"name": "student", "steps": [{"method": "distill", "student_family": "cnn", "student_width": 0.5}]}]
    with pytest.raises(ParamsError, match=r"^params.yaml: compress.variants.1\(student\).steps.1\(distill\): student_family: "):
        check("data/rows.npz", {"family": "mlp"}, student)
    check("data/rows.npz", {"family": "gru"})
    check("data/rgb.npz", {"family": "cnn"}, student)
    check("data/broken.npz", {"family": "cnn"})  # left to the prepare stage, which names the problem


def test_the_compress_stage_refuses_a_student_that_cannot_read_the_prepared_data() -> None:
    """What ``dvc repro`` meets where the source does not say the data's shape (npz): the
    compress stage checks each student against the prepared data before any training."""
    from models.spec import ModelSpec
    from tasks.compression.recipes import RecipeError, check_students_read
    from tasks.core.config import CompressParams

    compress = CompressParams.model_validate({"variants": [
        {"name": "narrow", "steps": [{"method": "distill", "student_width": 0.5}]},
        {"name": "to-cnn", "steps": [{"method": "distill", "student_family": "cnn"}]},
    ]})
    check_students_read(compress, ModelSpec(family="mlp"), (1, 8, 8))  # images: a cnn student reads them
    with pytest.raises(RecipeError, match=r"^compress.variants.2\(to-cnn\).steps.1\(distill\): student_family: "
                                          r"cnn needs image inputs \(C, H, W\), got input shape \(30,\)$"):
        check_students_read(compress, ModelSpec(family="mlp"), (30,))
    small = CompressParams.model_validate({"variants": [{"name": "vit", "steps": [
        {"method": "distill", "student_family": "transformer"}]}]})
    with pytest.raises(RecipeError, match=r"patch_size 4 is larger than the image \(3x3\) \(train.model.patch_size\)$"):
        check_students_read(small, ModelSpec(family="cnn", patch_size=4), (1, 3, 3))


def test_steps_are_typed_per_method_with_their_own_defaults() -> None:
    from tasks.core.config import DistillStep, ExportStep, HalfStep, PruneStep, QuantizeStep

    steps = validate_params(_params([
        {"name": "a", "steps": [PRUNE]}, {"name": "b", "steps": [{"method": "quantize", "mode": "dynamic"}]},
        {"name": "c", "steps": [{"method": "distill", "student_width": 0.5}]}, {"name": "d", "steps": [{"method": "half"}]},
        {"name": "e", "steps": [{"method": "export"}]},
    ])).compress.variants
    prune, quantize, distill, half, export = (variant.steps[0] for variant in steps)
    assert isinstance(prune, PruneStep) and prune.model_dump() == {**PRUNE, "fine_tune_epochs": 0, "lr": None}
    assert isinstance(quantize, QuantizeStep) and quantize.runtime == "onnxruntime" and quantize.fine_tune_epochs == 0
    assert isinstance(distill, DistillStep) and (distill.temperature, distill.alpha, distill.epochs) == (4.0, 0.7, 10)
    assert isinstance(half, HalfStep) and half.model_dump() == {"method": "half"}
    assert isinstance(export, ExportStep) and export.runtime == "onnxruntime"
    assert not hasattr(half, "mode") and not hasattr(prune, "runtime")  # each method has only its own fields


@pytest.mark.parametrize("family", ["mlp", "cnn", "lstm", "gru"])
def test_the_default_recipes_are_valid_for_every_family(family: str) -> None:
    from tasks.core.config import load_params

    params = load_params(Path(__file__).resolve().parents[1] / "params.yaml")
    check_recipes(params.compress, family)
    made = {v.name for v in selected_variants(params.compress, family)}
    assert "int8-dynamic" in made  # the skeleton's first variant, made for every family
    if family in {"lstm", "gru"}:
        assert not {"pruned-structured-50", "pruned-structured-50-int8-static-ort", "int8-static-ort"} & made


def test_the_default_recipes_cover_every_method_for_the_default_cnn() -> None:
    from tasks.core.config import load_params

    params = load_params(Path(__file__).resolve().parents[1] / "params.yaml")
    assert params.train.model.family == "cnn"
    chains = check_recipes(params.compress, "cnn")
    made = selected_variants(params.compress, "cnn")
    steps = [item.step for variant in made for item in chains[variant.name]]
    assert {step.method for step in steps} == {"prune", "quantize", "distill", "half", "export"}
    kinds = {
        (getattr(step, "kind", None), getattr(step, "mode", None), step.runtime if step.method == "quantize" else None)
        for step in steps
    }
    assert {("unstructured", None, None), ("structured", None, None), (None, "static", "onnxruntime"),
            (None, "dynamic", "torch"), (None, "qat", "torch")} <= kinds
    assert any(len({item.step.method for item in chains[v.name]}) > 1 for v in made)  # combinations
    student = next(v for v in made if v.steps[0].method == "distill")
    spec = params.train.model.spec()
    teacher = build_model(spec, (1, 8, 8), 10)
    pupil = build_model(spec.spec(width=student.steps[0].student_width), (1, 8, 8), 10)
    assert sum(p.numel() for p in pupil.parameters()) <= 0.3 * sum(p.numel() for p in teacher.parameters())


def test_families_limit_a_variant_and_its_children() -> None:
    raw = _params([
        {"name": "structured", "families": ["mlp", "cnn"], "steps": [{"method": "prune", "kind": "structured", "sparsity": 0.5}]},
        {"name": "structured-int8", "parent": "structured", "steps": [STATIC]},
        {"name": "fp16", "steps": [{"method": "half"}]},
    ])
    compress = validate_params(raw).compress
    assert [v.name for v in selected_variants(compress, "lstm")] == ["fp16"]
    assert [v.name for v in selected_variants(compress, "cnn")] == ["structured", "structured-int8", "fp16"]
    check_recipes(compress, "lstm")  # not made for an lstm, so its static int8 child is not refused


def test_the_stage_starts_its_workers_at_once_only_when_a_variant_made_for_the_baseline_trains() -> None:
    """The compress stage starts its Horovod workers before its first variant when one of the
    variants made for the baseline's family trains (they start up while the others are made);
    none start for recipes that only export, quantize without QAT, halve or prune without fine-tuning."""
    from tasks.compression.variants import variants_train

    def trains(variants: list[dict[str, Any]], family: str = "cnn") -> bool:
        return variants_train(validate_params(_params(variants, family)), {"model_spec": {"family": family}})

    no_training = [{"name": "fp16", "steps": [{"method": "half"}]}, {"name": "int8", "steps": [STATIC]},
                   {"name": "pruned", "steps": [{"method": "prune", "kind": "unstructured", "sparsity": 0.5}]}]
    assert not trains(no_training)
    fine_tuned = {"name": "pruned-ft", "steps": [{"method": "prune", "kind": "unstructured", "sparsity": 0.5,
                                                  "fine_tune_epochs": 1}]}
    assert trains([*no_training, fine_tuned])
    qat = {"name": "qat", "families": ["cnn"], "steps": [{"method": "quantize", "mode": "qat", "runtime": "torch",
                                                          "fine_tune_epochs": 1}]}
    assert trains([*no_training, qat])
    assert not trains([*no_training, qat], family="mlp")  # the QAT variant is not made for an mlp
    assert trains([*no_training, {"name": "student", "steps": [{"method": "distill", "student_width": 0.5}]}])


def test_cli_refuses_a_bad_recipe_before_any_work(baselines, tmp_path: Path, monkeypatch, capsys, mlflow_uri) -> None:
    variants = [{"name": "ok", "steps": [{"method": "half"}]}, {"name": "not-for-rnn", "steps": [STATIC]}]
    _, paths = _project(tmp_path, baselines, "lstm", variants)
    monkeypatch.setenv("SLIMFLOW_ROOT", str(paths.root))
    assert main([]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("error: compress: params.yaml: compress.variants.2(not-for-rnn).steps.1(quantize): static int8")
    assert not paths.compressed.exists()
    assert sorted(p.name for p in paths.artifacts.iterdir()) == ["model"]
    assert not (tmp_path / "mlflow.db").exists()


def test_cli_names_the_missing_baseline(tmp_path: Path, monkeypatch, capsys) -> None:
    root = tmp_path / "project"
    _write_prepared(root / "data" / "prepared")
    (root / "dvc.yaml").write_text("stages: {}\n")
    (root / "params.yaml").write_text(yaml.safe_dump(_params([{"name": "fp16", "steps": [{"method": "half"}]}])))
    monkeypatch.setenv("SLIMFLOW_ROOT", str(root))
    assert main([]) == 2
    assert "no trained model" in capsys.readouterr().err
    with pytest.raises(CompressError):
        compress_variants(validate_params(_params([])), ProjectPaths(root))


def test_a_failure_leaves_the_previous_output_untouched(baselines, tmp_path: Path, monkeypatch) -> None:
    from tasks.compression import quantization

    variants = [{"name": "fp16", "steps": [{"method": "half"}]}, {"name": "int8-static-ort", "steps": [STATIC]}]
    params, paths = _project(tmp_path, baselines, "cnn", variants)
    previous = paths.compressed / "old-variant"
    previous.mkdir(parents=True)
    (previous / "manifest.json").write_text("{}")

    def broken(*args: Any, **kwargs: Any) -> bytes:
        raise RuntimeError("calibration exploded")

    monkeypatch.setattr(quantization, "ort_static_int8", broken)
    with pytest.raises(RuntimeError, match="calibration exploded"):
        compress_variants(params, paths)
    assert sorted(p.name for p in paths.compressed.iterdir()) == ["old-variant"]
    assert sorted(p.name for p in paths.artifacts.iterdir()) == ["compressed", "model"]


def test_main_tracks_each_variant_as_a_run_nested_under_the_stage_run(
    baselines, tmp_path: Path, monkeypatch, mlflow_uri: str
) -> None:
    from mlflow import MlflowClient

    variants = [
        {"name": "pruned-l1-50", "steps": [{"method": "prune", "kind": "unstructured", "sparsity": 0.5}]},
        {"name": "pruned-l1-50-fp16", "parent": "pruned-l1-50", "steps": [{"method": "half"}]},
    ]
    _, paths = _project(tmp_path, baselines, "cnn", variants)
    monkeypatch.setenv("SLIMFLOW_ROOT", str(paths.root))
    assert main([]) == 0
    client = MlflowClient(mlflow_uri)
    experiment = client.get_experiment_by_name("test-compress")
    runs = client.search_runs([experiment.experiment_id])
    stage = next(r for r in runs if r.info.run_name == "compress")
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == stage.info.run_id}
    assert set(children) == {"pruned-l1-50", "pruned-l1-50-fp16"}
    for run in [stage, *children.values()]:
        assert run.info.status == "FINISHED"
    child = children["pruned-l1-50-fp16"]
    assert child.data.tags["variant"] == "pruned-l1-50-fp16"
    assert child.data.tags["method"] == "prune+half"
    assert child.data.tags["parent_run_id"] == stage.info.run_id
    assert child.data.params["recipe.step1.method"] == "half" and child.data.params["recipe.parent"] == "pruned-l1-50"
    assert child.data.tags["model"] == "pruned-l1-50-fp16"
    for key in ("size_bytes", "val_accuracy", "sparsity", "nonzeros", "size_reduction_x", "val_accuracy_change_pts",
                "make_energy_j", "train_energy_j"):
        assert key in child.data.metrics, key
    assert child.data.metrics["make_energy_j"] > children["pruned-l1-50"].data.metrics["make_energy_j"] > 0
    assert stage.data.metrics["energy_j"] > 0 and stage.data.tags["stage_energy_source"]
    from tasks.core.metric_names import is_known

    assert all(is_known(key) for run in children.values() for key in run.data.metrics)
    # The evaluate stage finds the variant's run through its manifest.
    manifest = json.loads((paths.compressed / "pruned-l1-50-fp16" / "manifest.json").read_text())
    assert manifest["mlflow_run_id"] == child.info.run_id
    recipe = json.loads(Path(client.download_artifacts(child.info.run_id, "recipe.json")).read_text())
    assert recipe["steps"][0]["method"] == "half" and recipe["parent"] == "pruned-l1-50"
    logged = {a.path for a in client.list_artifacts(child.info.run_id, "variant")}
    assert logged == {"variant/manifest.json", "variant/model.fp16.pt.gz"}
    assert (paths.compressed / "pruned-l1-50-fp16" / "model.fp16.pt.gz").is_file()
    assert os.listdir(paths.compressed) and sorted(os.listdir(paths.compressed)) == sorted(v["name"] for v in variants)
