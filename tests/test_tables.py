"""The one results-table renderer (compress, evaluate and the CLI draw with it)."""

from __future__ import annotations

import pytest

from tasks.core.tables import as_text, results_table

ROWS = [
    {"model": "baseline", "accuracy": 0.9708, "accuracy_change_pts": 0.0, "size_bytes": 83_537, "size_reduction_x": 1.0, "gate": "pass"},
    {"model": "int8", "accuracy": 0.9798, "accuracy_change_pts": 0.9, "size_bytes": 20_480, "size_reduction_x": 4.079, "gate": "champion"},
    {"model": "broken", "accuracy": float("nan"), "size_bytes": None},
]


def test_figures_are_formatted_once_for_every_table() -> None:
    text = as_text(results_table(ROWS, ["model", "accuracy", "accuracy_change_pts", "size_bytes", "size_reduction_x", "gate"]))
    assert "accuracy %" in text and "Δ acc (pts)" in text and "size KiB" in text
    # Two decimals of a percentage: 97.08 and 97.98 stay apart.
    assert "97.08" in text and "97.98" in text and "+0.90" in text
    assert "81.6" in text and "4.08" in text and "champion" in text
    broken = next(line for line in text.splitlines() if "broken" in line)
    assert "nan" not in broken.lower() and "-" in broken


def test_every_figure_column_is_a_name_of_the_vocabulary() -> None:
    from tasks.core.metric_names import is_known
    from tasks.core.tables import COLUMNS

    labels = {"model", "method", "search", "format", "runtime", "gate"}  # text columns
    assert all(is_known(key) for key in COLUMNS if key not in labels)


def test_an_unknown_column_is_refused() -> None:
    with pytest.raises(KeyError, match="no table column for latency_ms"):
        results_table(ROWS, ["model", "latency_ms"])


def test_highlighted_rows_are_styled() -> None:
    table = results_table(ROWS, ["model"], highlight=lambda row: row.get("gate") == "champion")
    assert [row.style for row in table.rows] == [None, "bold green", None]


def test_the_closing_comparison_shows_energy_and_payback(tmp_path) -> None:
    """`slimflow run` / `slimflow report` read metrics/evaluate.json (inf is null there): the
    payback is computed again, 'never' for a variant that saves no energy."""
    import json

    from flows.report import comparison_rows, comparison_table
    from tasks.core.paths import ProjectPaths

    (tmp_path / "metrics").mkdir()
    figures = {"accuracy": 0.97, "size_bytes": 80_000, "latency_p50_ms": 0.5, "latency_p95_ms": 0.7,
               "throughput_sps": 9000}
    (tmp_path / "metrics" / "evaluate.json").write_text(json.dumps({
        "baseline": {**figures, "energy_per_1k_j": 10.0, "make_energy_j": 900.0, "payback_predictions": None},
        "lean": {**figures, "energy_per_1k_j": 4.0, "make_energy_j": 600.0, "payback_predictions": 100000},
        "greedy": {**figures, "energy_per_1k_j": 12.0, "make_energy_j": 50.0, "payback_predictions": None},
        "champion": "lean",
    }))
    rows = {row["model"]: row for row in comparison_rows(ProjectPaths(tmp_path))}
    assert rows["lean"]["payback_predictions"] == pytest.approx(100_000)
    assert rows["greedy"]["payback_predictions"] == float("inf") and rows["baseline"]["payback_predictions"] is None
    text = as_text(comparison_table(list(rows.values())))
    assert "J / 1k" in text and "make J" in text and "payback (preds)" in text
    lean, greedy = (next(line for line in text.splitlines() if f" {name} " in line) for name in ("lean", "greedy"))
    assert "100k" in lean and "4.00" in lean and "600" in lean  # three significant figures, any scale
    assert "never" in greedy
    assert "(never: no saving beyond its noise)" in " ".join(text.split())  # the caption says what it means


def test_the_accuracy_change_carries_its_noise_where_there_is_one(tmp_path) -> None:
    """Every table's Δ acc cell says how finely the test split measures it: '-1.25±0.88'.
    None for the baseline (0) or a metrics file from before the figure; the caption says what it is."""
    import json

    from flows.report import comparison_rows, comparison_table
    from tasks.core.paths import ProjectPaths

    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "evaluate.json").write_text(json.dumps({
        "baseline": {"accuracy": 0.9, "accuracy_change_pts": 0.0, "accuracy_change_noise_pts": 0.0},
        "int8": {"accuracy": 0.8875, "accuracy_change_pts": -1.25, "accuracy_change_noise_pts": 0.8839},
        "older": {"accuracy": 0.895},  # written before the noise was
        "champion": "int8",
    }))
    text = as_text(comparison_table(comparison_rows(ProjectPaths(tmp_path))))
    line = {name: next(row for row in text.splitlines() if f"│ {name} " in row) for name in ("baseline", "int8", "older")}
    assert "-1.25±0.88" in line["int8"]
    assert "+0.00" in line["baseline"] and "±" not in line["baseline"]
    assert "-0.50" in line["older"] and "±" not in line["older"]
    assert "one standard error" in text


def test_the_energy_saving_carries_its_noise_and_payback_follows_it(tmp_path) -> None:
    """The comparison read back from metrics/evaluate.json shows the evaluate stage's payback:
    `never` where the stage found no saving beyond its noise (inf is null in the file), its
    figure elsewhere, recomputed only for a file from before it was a figure; the report's cell
    shows the saving with its noise to two significant figures of it, whatever the scale
    ('0.103±0.012', '0.00236±0.00012')."""
    import json

    from flows.report import comparison_rows
    from tasks.core import metric_names as names
    from tasks.core.paths import ProjectPaths
    from tasks.core.tables import cell

    figures = {"accuracy": 0.9, "make_energy_j": 10.0}
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "evaluate.json").write_text(json.dumps({
        "baseline": {**figures, "energy_per_1k_j": 0.110, "payback_predictions": None},
        "fp16": {**figures, "energy_per_1k_j": 0.105, "energy_saved_per_1k_noise_j": 0.002,  # 2.5 noise: within
                 "payback_predictions": None},                                                # t(4)'s 2.78
        "int8": {**figures, "energy_per_1k_j": 0.010, "energy_saved_per_1k_noise_j": 0.004,
                 "payback_predictions": 100_000},
        "older": {**figures, "energy_per_1k_j": 0.107},  # written before the payback was a figure
    }))
    payback = {row["model"]: row[names.PAYBACK_PREDICTIONS] for row in comparison_rows(ProjectPaths(tmp_path))}
    assert payback == {"baseline": None, "fp16": float("inf"), "int8": 100_000,
                       "older": pytest.approx(10.0 / (0.003 / 1000), rel=1e-6)}
    row = {names.ENERGY_SAVED_PER_1K_J: 0.1034, names.ENERGY_SAVED_PER_1K_NOISE_J: 0.0123}
    assert cell(names.ENERGY_SAVED_PER_1K_J, row) == "0.103±0.012"
    # A tabular model's figures are a hundred times smaller: still two figures of the noise.
    row = {names.ENERGY_SAVED_PER_1K_J: 0.002364, names.ENERGY_SAVED_PER_1K_NOISE_J: 0.000123}
    assert cell(names.ENERGY_SAVED_PER_1K_J, row) == "0.00236±0.00012"
    assert cell(names.ENERGY_SAVED_PER_1K_J, {names.ENERGY_SAVED_PER_1K_J: 0.0}) == "0.00"  # the baseline
    # A saving that rounds to nothing has no sign (an LSTM's unstructured pruning: -0.00002).
    row = {names.ENERGY_SAVED_PER_1K_J: -0.00002, names.ENERGY_SAVED_PER_1K_NOISE_J: 0.0092}
    assert cell(names.ENERGY_SAVED_PER_1K_J, row) == "0.0000±0.0092"
