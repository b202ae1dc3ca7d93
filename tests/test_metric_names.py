"""The one vocabulary of figures: one name per figure, units in the names, ratios one way."""

from __future__ import annotations

from tasks.core import metric_names as names

UNIT_SUFFIXES = {"_bytes": "bytes", "_ms": "ms", "_s": "s", "_mb": "MB", "_j": "J", "_pts": "percentage points",
                 "_x": "times"}


def test_every_figure_has_one_name_and_one_meaning() -> None:
    meanings = [figure.meaning for figure in names.VOCABULARY.values()]
    assert len(meanings) == len(set(meanings))
    assert all(key == figure.name for key, figure in names.VOCABULARY.items())
    assert len(names.MODEL_FIGURES) == len(set(names.MODEL_FIGURES))


def test_units_are_in_the_names() -> None:
    for figure in names.VOCABULARY.values():
        for suffix, unit in UNIT_SUFFIXES.items():
            if figure.name.endswith(suffix) and not figure.name.endswith("_per_s"):
                assert figure.unit == unit, figure
    ratios = [f for f in names.VOCABULARY.values() if f.unit == "times"]
    assert ratios and all(f.name.endswith("_x") and "> 1" in f.meaning for f in ratios)


def test_decisions_and_per_class_figures_are_not_metrics() -> None:
    assert not names.is_known("champion") and not names.is_known("threads")
    assert not any(key.startswith(("precision_", "recall_")) for key in names.VOCABULARY)
    for old in ("accuracy_delta", "size_ratio", "latency_ratio", "compression_ratio", "val_accuracy_change"):
        assert not names.is_known(old), old


def test_templated_names() -> None:
    assert names.stage_time_s("train") == "stage_time_s.train"
    assert names.is_known("stage_time_s.evaluate") and not names.is_known("stage_time_s.")
    assert names.figure("stage_time_s.train").unit == "s"
