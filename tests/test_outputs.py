"""The evaluate stage's outputs on constructed values (the files themselves are checked
end to end in test_evaluate.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np


def test_nan_metrics_keep_their_key_as_null() -> None:
    from tasks.evaluation.results import json_number as _json_number

    assert _json_number(math.nan) is None and _json_number(3.0) == 3 and _json_number(0.5) == 0.5
    assert json.dumps({"flops": _json_number(math.inf)}) == '{"flops": null}'


def _evaluation() -> Any:
    """Two models with constructed figures; the variant's FLOPs were not countable (NaN)."""
    from tasks.evaluation.results import Evaluation, ModelResult, add_ratios

    def result(name: str, accuracy: float, size: float, p50: float, flops: float) -> ModelResult:
        metrics = {"accuracy": accuracy, "macro_f1": accuracy, "size_bytes": size, "latency_p50_ms": p50,
                   "latency_p95_ms": 1.5 * p50, "throughput_sps": 1000 / p50, "flops": flops}
        manifest = {"name": name, "method": "baseline" if name == "baseline" else "quantize", "runtime": "pytorch"}
        per_class = {"a": {"precision": 1.0, "recall": 0.5, "f1": 0.667, "support": 2}}
        return ModelResult(name, Path(name), manifest, metrics, np.array([0, 1]), np.eye(2, dtype=np.int64),
                           per_class=per_class)

    models = {"baseline": result("baseline", 0.98, 4096, 0.5, 4736.0), "int8": result("int8", 0.975, 1024, 0.25,
                                                                                      math.nan)}
    add_ratios(models)
    settings = {"threads": 1, "throughput_batch": 32, "energy_source": "estimate"}
    return Evaluation(models, ("a", "b"), np.array([0, 1]), settings)


def test_documents_keep_the_same_keys_and_mark_the_front() -> None:
    from tasks.core.config import EvaluateParams
    from tasks.evaluation.gate import apply_gate
    from tasks.evaluation.outputs import metrics_document, tradeoff_rows

    evaluation = _evaluation()
    apply_gate(evaluation, EvaluateParams(gate={"max_accuracy_drop": 0.01}, objective="smallest"))
    assert evaluation.champion == "int8"
    document = metrics_document(evaluation)
    assert document["promoted"] == 0  # nothing registered yet
    assert list(document["baseline"]) == list(document["int8"])
    assert document["int8"]["flops"] is None and document["int8"]["size_reduction_x"] == 4.0
    assert document["int8"]["speedup_x"] == 2.0 and document["int8"]["accuracy_change_pts"] == -0.5
    assert document["champion"] == "int8" and "champion" not in document["int8"]
    # Headline figures first, the per-class table nested last; every key a name of the vocabulary.
    from tasks.core.metric_names import MODEL_FIGURES, MODEL_HEADLINE

    assert list(document["int8"])[: len(MODEL_HEADLINE)] == list(MODEL_HEADLINE)
    assert list(document["int8"]) == [*MODEL_FIGURES, "per_class"]
    assert document["int8"]["per_class"]["a"] == {"precision": 1, "recall": 0.5, "f1": 0.667, "support": 2}
    json.dumps(document, allow_nan=False)
    assert [row["pareto"] for row in tradeoff_rows(evaluation)] == [True, True]


def test_report_and_table_cells_come_from_the_shared_columns() -> None:
    from tasks.core.tables import COLUMNS
    from tasks.evaluation.report import models_table
    from tasks.evaluation.summary import DETAIL_COLUMNS, HEADLINE_COLUMNS, summary_rows

    evaluation = _evaluation()
    for result in evaluation.models.values():
        result.metrics.update(passed_gate=1.0)
    evaluation.champion = "int8"
    rows = {row["model"]: row for row in summary_rows(evaluation)}
    assert rows["int8"]["size_reduction_x"] == 4.0 and rows["int8"]["speedup_x"] == 2.0
    assert rows["int8"]["gate"] == "champion" and rows["baseline"]["gate"] == "pass"
    lines = models_table(evaluation, HEADLINE_COLUMNS)
    assert lines[0] == "| " + " | ".join(COLUMNS[key].header for key in HEADLINE_COLUMNS) + " |"
    int8 = next(line for line in lines if line.startswith("| int8 |")).split(" | ")
    assert int8[HEADLINE_COLUMNS.index("size_reduction_x")] == "4.00"
    assert int8[HEADLINE_COLUMNS.index("accuracy_change_pts")] == "-0.50"
    details = models_table(evaluation, DETAIL_COLUMNS)
    int8 = next(line for line in details if line.startswith("| int8 |")).split(" | ")
    assert int8[DETAIL_COLUMNS.index("flops")] == "-"  # NaN: the shared placeholder
    baseline = next(line for line in details if line.startswith("| baseline |")).split(" | ")
    assert baseline[DETAIL_COLUMNS.index("flops")] == "4.74k"
    # Two tables that fit a page, not one of 17 columns.
    assert len(HEADLINE_COLUMNS) <= 10 and len(DETAIL_COLUMNS) <= 12


def test_the_html_report_embeds_its_images_and_renders_its_tables(tmp_path: Path) -> None:
    import base64

    from tasks.evaluation.report import report_html

    png = b"\x89PNG\r\n\x1a\n" + b"0" * 16
    (tmp_path / "accuracy_vs_size.png").write_bytes(png)
    text = "# report\n\n| model | size × |\n|---|---|\n| int8 | 4.00 |\n\n![accuracy vs size](accuracy_vs_size.png)\n"
    page = report_html(text, tmp_path)
    assert "<table>" in page and "<td>int8</td>" in page
    assert f'src="data:image/png;base64,{base64.b64encode(png).decode()}"' in page
    assert 'src="accuracy_vs_size.png"' not in page


def test_each_confusion_picture_shows_only_its_own_model(tmp_path: Path) -> None:
    """The pictures share one figure (laid out for the largest count): nothing of a model
    drawn before (its counts, its colour scale, its title) may stay in the next one."""
    from PIL import Image

    from tasks.evaluation.plots import confusion_png, confusion_pngs

    evaluation = _evaluation()
    evaluation.models["int8"].confusion = np.array([[3, 0], [0, 4]])
    for folder, big in (("a", [[900, 7], [2, 880]]), ("b", [[900, 1], [5, 600]])):  # same largest count
        evaluation.models["baseline"].confusion = np.array(big)
        confusion_pngs({"baseline": tmp_path / folder / "baseline.png", "int8": tmp_path / folder / "int8.png"},
                       evaluation)
    pictures = {path.relative_to(tmp_path).as_posix(): np.asarray(Image.open(path).convert("RGB"))
                for path in tmp_path.glob("*/*.png")}
    assert len({picture.shape for picture in pictures.values()}) == 1
    assert np.array_equal(pictures["a/int8.png"], pictures["b/int8.png"])  # drawn after two different models
    assert not np.array_equal(pictures["a/baseline.png"], pictures["b/baseline.png"])
    assert not np.array_equal(pictures["a/int8.png"], pictures["a/baseline.png"])
    # The model with the largest count is laid out as when drawn alone.
    confusion_png(tmp_path / "alone.png", evaluation, "baseline")
    assert np.array_equal(np.asarray(Image.open(tmp_path / "alone.png").convert("RGB")), pictures["b/baseline.png"])


def test_a_tradeoff_picture_keeps_the_layout_matplotlib_would_choose(tmp_path: Path, monkeypatch) -> None:
    """The trade-off figure is laid out once, before its labels are placed, and kept (no
    second layout pass in savefig): the same picture as with the layout engine left on."""
    from PIL import Image

    from tasks.evaluation import plots

    evaluation = _evaluation()
    evaluation.champion = "int8"

    def draw(path: Path) -> np.ndarray:
        plots.tradeoff_png(path, evaluation, "size_bytes", "size on disk (KiB)", "accuracy vs size", scale=1 / 1024)
        return np.asarray(Image.open(path).convert("RGB"))

    kept = draw(tmp_path / "kept.png")
    monkeypatch.setattr(plots, "_keep_layout", lambda fig: None)  # the engine stays: savefig lays it out again
    assert np.array_equal(kept, draw(tmp_path / "engine.png"))
