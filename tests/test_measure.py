"""Measuring one model: timing rounds and energy windows, quality metrics, FLOPs
(:mod:`tasks.evaluation.timing`, :mod:`~tasks.evaluation.measure`, :mod:`~tasks.evaluation.flops`),
on constructed inputs. The energy meter itself: tests/test_energy.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import math

import numpy as np
import psutil
import pytest


def test_time_models_interleaves_rounds_and_orders_percentiles() -> None:
    from tasks.core.energy import process_meter
    from tasks.evaluation.timing import BATCH1_CALLS_PER_ROUND, time_models

    calls: list[tuple[str, int]] = []

    def model(name: str):
        def predict(x: np.ndarray) -> np.ndarray:
            calls.append((name, len(x)))
            return np.zeros((len(x), 3), dtype=np.float32)
        return predict

    x = np.zeros((10, 4), dtype=np.float32)
    timings = time_models({"a": model("a"), "b": model("b")}, x, x[:8], repeats=4, warmup=2,
                          meter=process_meter(), seed=0, energy_window_s=0.05)
    for timing in timings.values():
        assert len(timing.batch1_ms) == 4 * BATCH1_CALLS_PER_ROUND and len(timing.batch_s) == 4
        summary = timing.summary()
        assert summary["latency_p50_ms"] <= summary["latency_p95_ms"]
        assert summary["throughput_sps"] > 0
        # The energy windows: back-to-back calls after the rounds, whole batches of 8.
        assert timing.predictions % 8 == 0 and timing.predictions >= 8 and timing.batch1_predictions >= 5
        assert summary["energy_per_1k_j"] >= 0 and summary["energy_per_1k_batch1_j"] >= 0
    timed = calls[2 * (2 + 1):]  # after each model's warm-up (2 single + 1 batch call)
    per_round = 2 * (BATCH1_CALLS_PER_ROUND + 1)
    calls_per_round = 2 * (1 + BATCH1_CALLS_PER_ROUND + 1)  # per model: untimed, timed batch-1 calls, one batch
    rounds, windows = timed[:4 * calls_per_round], timed[4 * calls_per_round:]
    for start in range(0, len(rounds), per_round):
        assert {name for name, _ in rounds[start:start + per_round]} == {"a", "b"}  # every round has both
    # Each model's windows are one run of calls (batch 1, then batch 8), one model after the other.
    changes = sum(1 for before, after in zip(windows, windows[1:]) if before[0] != after[0])
    assert changes == 1 and sum(timing.predictions + timing.batch1_predictions for timing in timings.values()) == \
        sum(n for _, n in windows)


def test_energy_is_read_in_interleaved_passes_that_pair_the_models_readings() -> None:
    """``energy_readings`` 3: each model's windows are read in three passes over both models
    (every pass has both, one model after the other), each reading kept; their mean is the
    model's energy per 1k, and the saving's noise is the spread of the pass-by-pass differences."""
    from tasks.core.energy import process_meter
    from tasks.evaluation.timing import paired_saving_noise, time_models

    calls: list[str] = []

    def model(name: str):
        def predict(x: np.ndarray) -> np.ndarray:
            calls.append(name)
            return np.zeros((len(x), 3), dtype=np.float32)
        return predict

    x = np.zeros((10, 4), dtype=np.float32)
    timings = time_models({"a": model("a"), "b": model("b")}, x, x[:8], repeats=3, warmup=1,
                          meter=process_meter(), seed=0, energy_window_s=0.06, energy_readings=3)
    windows = calls[2 * (1 + 1) + 3 * 2 * (1 + 5 + 1):]  # after the warm-up and the rounds
    runs = [name for i, name in enumerate(windows) if i == 0 or windows[i - 1] != name]
    assert len(runs) == 6 and all({*runs[i:i + 2]} == {"a", "b"} for i in (0, 2, 4))  # 3 passes, both in each
    for timing in timings.values():
        readings = timing.energy_readings_per_1k_j
        assert len(readings) == 3 and all(r >= 0 for r in readings)
        assert timing.summary()["energy_per_1k_j"] == pytest.approx(sum(readings) / 3)
        # The meter's step over a reading's predictions, per 1k (0 for a hardware counter).
        largest_step = 1000.0 * process_meter().resolution_j / 8  # a window of one batch of 8 at least
        assert 0 < timing.energy_step_per_1k_j <= largest_step or process_meter().resolution_j == 0

    # The noise: sd of the paired differences / sqrt(n), NaN with one pair.
    assert paired_saving_noise([10.0, 11.0, 12.0], [9.0, 10.0, 11.0]) == pytest.approx(0.0)
    assert paired_saving_noise([10.0, 12.0], [9.0, 9.0]) == pytest.approx(1.0)  # differences 1, 3: sd 2 ** 0.5
    assert math.isnan(paired_saving_noise([10.0], [9.0])) and math.isnan(paired_saving_noise([], []))


def test_energy_windows_fill_the_window_and_stay_bounded() -> None:
    from tasks.evaluation.timing import calls_for

    assert calls_for(0.5, 0.01) == 50 and calls_for(0.5, 2.0) == 1 and calls_for(0.5, 0.2, least=5) == 5
    assert calls_for(0.5, 1e-9) == 100_000 and calls_for(0.5, float("nan")) == 100_000


def test_quality_metrics_and_fixed_batch_prediction() -> None:
    from tasks.core.classification import classification_metrics
    from tasks.evaluation.measure import predict_in_batches

    y_true = np.array([0, 0, 1, 1, 2, 2])
    y_pred = np.array([0, 1, 1, 1, 2, 0])
    metrics, per_class, confusion = classification_metrics(y_true, y_pred, ["cat", "dog", "sea lion"])
    assert metrics == {"accuracy": pytest.approx(4 / 6), "macro_f1": pytest.approx(metrics["macro_f1"])}
    assert per_class["dog"]["precision"] == pytest.approx(2 / 3) and per_class["sea lion"]["recall"] == pytest.approx(0.5)
    assert per_class["cat"]["support"] == 2 and set(per_class["cat"]) == {"precision", "recall", "f1", "support"}
    assert confusion.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]

    sizes: list[int] = []

    def predict(x: np.ndarray) -> np.ndarray:
        sizes.append(len(x))
        return np.stack([x[:, 0], -x[:, 0]], axis=1)

    x = np.arange(10, dtype=np.float32)[:, None]
    logits = predict_in_batches(predict, x, 4)
    assert sizes == [4, 4, 4] and np.array_equal(logits[:, 0], x[:, 0])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_quality_metrics_equal_scikit_learns(seed: int) -> None:
    """The numpy metrics give scikit-learn's figures, a class never predicted and one
    never present (zero_division=0) included."""
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

    from tasks.core.classification import classification_metrics

    rng = np.random.default_rng(seed)
    names = [f"c{i}" for i in range(6)]
    y_true = rng.integers(0, 5, 200)  # class 5 never present
    y_pred = np.where(rng.random(200) < 0.7, y_true, rng.integers(0, 6, 200))
    y_pred[y_pred == 3] = 4  # class 3 never predicted
    labels = list(range(6))
    metrics, per_class, confusion = classification_metrics(y_true, y_pred, names)
    precision, recall, f1, support = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    assert metrics["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred))
    assert metrics["macro_f1"] == pytest.approx(
        f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0))
    for i, name in enumerate(names):
        assert per_class[name]["precision"] == pytest.approx(precision[i])
        assert per_class[name]["recall"] == pytest.approx(recall[i])
        assert per_class[name]["f1"] == pytest.approx(f1[i])
        assert per_class[name]["support"] == support[i]
    assert np.array_equal(confusion, confusion_matrix(y_true, y_pred, labels=labels))


def test_flops_count_matrix_multiplies_including_fused_lstms() -> None:
    from models.factory import build_model
    from models.spec import ModelSpec
    from tasks.evaluation.flops import count_flops

    x = np.zeros((1, 1, 8, 8), dtype=np.float32)
    mlp = build_model(ModelSpec(family="mlp", hidden_sizes=(32,)), (1, 8, 8), 10).eval()
    assert count_flops(mlp, x) == 2 * (64 * 32 + 32 * 10)
    # 8 rows = 8 steps of 8 features, hidden 16: gates x hidden x (input + hidden) x 2 per step, + the head.
    for family, gates in (("lstm", 4), ("gru", 3)):  # GRU: counted by FlopCounterMode; LSTM: added from shapes
        rnn = build_model(ModelSpec(family=family, rnn_hidden=16), (1, 8, 8), 10).eval()
        assert count_flops(rnn, x) == 8 * 2 * gates * 16 * (8 + 16) + 2 * 16 * 10, family
    assert count_flops(None, x) is None


def test_the_memory_probe_runs_its_own_module() -> None:
    """The probe process is started as ``python -m <module>``: the name must be this module's."""
    import importlib

    from tasks.evaluation import memory

    assert memory.PROBE_MODULE == memory.__name__
    assert importlib.util.find_spec(memory.PROBE_MODULE) is not None
    assert (memory.CODE_ROOT / "tasks" / "evaluation" / "memory.py").is_file()


def test_the_forked_memory_probe_ranks_a_big_model_above_a_small_one(tmp_path: Path) -> None:
    """One probe process, a forked child per model: a model with ~30x the weights loads
    more and peaks higher at a large batch, and every model is measured (none failed)."""
    import torch

    from tests.test_evaluate_support import SPEC, save_baseline, save_onnx_variant, train_tiny, write_prepared
    from models.spec import ModelSpec
    from tasks.evaluation.memory import measure_memory_all

    prepared = tmp_path / "prepared"
    write_prepared(prepared)
    small = train_tiny(SPEC, prepared, steps=0)
    save_baseline(small, tmp_path / "small")
    big_spec = ModelSpec(family="mlp", hidden_sizes=(2048, 2048), dropout=0.0)
    save_baseline(train_tiny(big_spec, prepared, steps=0), tmp_path / "big", spec=big_spec)
    with torch.no_grad():
        save_onnx_variant(small, tmp_path / "onnx")
    memory = measure_memory_all(
        {"small": tmp_path / "small", "big": tmp_path / "big", "onnx": tmp_path / "onnx"},
        prepared, batch=512, threads=1,
    )
    assert {m["method"] for m in memory.values()} == {"vmhwm-delta-fork"}, memory
    assert memory["big"]["load_mb"] > memory["small"]["load_mb"] + 10, memory  # 4.3M weights ~ 17 MB
    assert memory["big"]["peak_mb"] > memory["small"]["peak_mb"], memory
    assert memory["onnx"]["peak_mb"] is not None and memory["onnx"]["peak_mb"] >= 0, memory


def test_models_are_handed_over_scored_while_the_memory_probe_runs_and_before_any_timing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The evaluate stage logs its models to MLflow in ``meanwhile``: it must get every model
    scored (predictions, accuracy) while the probe process still runs, and the timing must
    start only after both are done (it needs the machine to itself)."""
    from tasks.core.config import EvaluateParams
    from tasks.evaluation import benchmark
    from tasks.evaluation.memory import MemoryProbe
    from tests.test_evaluate_support import SPEC, save_baseline, save_onnx_variant, train_tiny, write_prepared

    prepared = tmp_path / "prepared"
    write_prepared(prepared)
    model = train_tiny(SPEC, prepared, steps=5)
    save_baseline(model, tmp_path / "baseline")
    save_onnx_variant(model, tmp_path / "onnx")
    events: list[str] = []
    result, time_models = MemoryProbe.result, benchmark.time_models

    def probe_result(self: MemoryProbe) -> dict:
        events.append("probe read")
        return result(self)

    def timing(*args: Any, **kwargs: Any) -> Any:
        events.append("timing")
        return time_models(*args, **kwargs)

    def meanwhile(scored: Any) -> None:
        probe = [p for p in psutil.Process().children() if "tasks.evaluation.memory" in " ".join(p.cmdline())]
        events.append(f"meanwhile, probe running: {bool(probe)}")
        assert list(scored.models) == ["baseline", "onnx"] and len(scored.class_names) == 10
        assert all("accuracy" in r.metrics and "latency_p50_ms" not in r.metrics for r in scored.models.values())
        assert all(len(r.predictions) == len(scored.y_true) == 150 for r in scored.models.values())

    monkeypatch.setattr(MemoryProbe, "result", probe_result)
    monkeypatch.setattr(benchmark, "time_models", timing)
    params = EvaluateParams(latency_repeats=3, warmup=1, energy_window_s=0.01, throughput_batch=64)
    evaluation = benchmark.measure_models({"baseline": tmp_path / "baseline", "onnx": tmp_path / "onnx"},
                                          prepared, params, meanwhile=meanwhile)
    assert events == ["meanwhile, probe running: True", "probe read", "timing"]
    assert {r.notes["memory"] for r in evaluation.models.values()} == {"vmhwm-delta-fork"}
    assert all(r.metrics["latency_p50_ms"] > 0 and r.metrics["peak_memory_mb"] >= 0
               for r in evaluation.models.values())
