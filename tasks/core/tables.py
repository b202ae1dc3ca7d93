"""The one renderer of results tables (rich): the compress stage's log, the evaluate
stage's closing table, ``slimflow run`` / ``slimflow report`` all draw their tables here,
from rows of plain values keyed by metric name, so a figure looks the same everywhere."""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.table import Table

from tasks.core import metric_names as names

# Off a terminal (CI logs, `dvc repro` output, pipes) rich assumes 80 columns: too narrow.
WIDTH_OFF_TERMINAL = 160


def _finite(value: Any) -> bool:
    """Whether ``value`` is a figure to show: a finite number (not a bool, None or NaN)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _number(spec: str, scale: float = 1.0) -> Callable[[Any], str]:
    def render(value: Any) -> str:
        if not _finite(value):
            return "-"
        return format(value * scale, spec)

    return render


def _si(value: Any) -> str:
    """4736 -> '4.74k', 1.2e9 -> '1.20G'."""
    if not _finite(value):
        return "-"
    for factor, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.3g}{suffix}"
    return f"{value:.3g}"


def _payback(value: Any) -> str:
    """Predictions until a variant repays its making: 'never' when it saves nothing."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isinf(value) and value > 0:
        return "never"
    return _si(value)


def _text(value: Any) -> str:
    return "-" if value is None or value == "" else str(value)


@dataclass(frozen=True)
class Column:
    header: str
    render: Callable[[Any], str]
    justify: str = "right"
    noise: str | None = None  # the key of the figure's one standard error, shown after it: "-0.45±0.52"
    # How the noise is shown: a format, or None for two significant figures of it, the figure
    # to the same decimal ("0.0893±0.0012", "0.00236±0.00012"): for figures of any scale.
    noise_format: str | None = ".2f"


# Row key -> how it is shown. Figures are keyed by their names in tasks.core.metric_names;
# ratios are "times smaller / faster than the baseline" (> 1 is better).
COLUMNS: dict[str, Column] = {
    "model": Column("model", _text, "left"),
    "method": Column("method", _text, "left"),
    "search": Column("searched", _text, "left"),  # a searched knob's chosen setting (compress)
    "format": Column("format", _text, "left"),
    "runtime": Column("runtime", _text, "left"),
    names.ACCURACY: Column("accuracy %", _number(".2f", 100)),
    names.VAL_ACCURACY: Column("val acc %", _number(".2f", 100)),
    names.ACCURACY_CHANGE_PTS: Column("Δ acc (pts)", _number("+.2f"), noise=names.ACCURACY_CHANGE_NOISE_PTS),
    names.VAL_ACCURACY_CHANGE_PTS: Column("Δ val acc (pts)", _number("+.2f")),
    names.MACRO_F1: Column("macro F1", _number(".4f")),
    names.SIZE_BYTES: Column("size KiB", _number(",.1f", 1 / 1024)),
    names.SIZE_REDUCTION_X: Column("size ×", _number(".2f")),
    names.LATENCY_P50_MS: Column("p50 ms", _number(".3f")),
    names.LATENCY_P95_MS: Column("p95 ms", _number(".3f")),
    names.SPEEDUP_X: Column("speed ×", _number(".2f")),
    names.CPU_TIME_P50_MS: Column("CPU ms", _number(".3f")),
    names.THROUGHPUT_SPS: Column("samples/s", _number(",.0f")),
    names.THROUGHPUT_GAIN_X: Column("samples/s ×", _number(".2f")),
    names.PARAMETERS: Column("params", _si),
    names.NONZEROS: Column("non-zeros", _si),
    names.FLOPS: Column("FLOPs", _si),
    names.PEAK_MEMORY_MB: Column("peak MB", _number(".1f")),
    names.ENERGY_PER_1K_J: Column("J / 1k", _number("#.3g")),
    names.ENERGY_PER_1K_BATCH1_J: Column("J / 1k (batch 1)", _number("#.3g")),
    names.CO2E_PER_1K_G: Column("g CO2e / 1k", _number(".3g")),
    names.ENERGY_SAVED_PER_1K_J: Column("saved J / 1k", _number("#.3g"), noise=names.ENERGY_SAVED_PER_1K_NOISE_J,
                                        noise_format=None),
    names.MAKE_ENERGY_J: Column("make J", _si),
    names.PAYBACK_PREDICTIONS: Column("payback (preds)", _payback),
    "gate": Column("gate", _text, "left"),
}


# Under every table that shows the accuracy change with its noise.
CHANGE_NOISE_NOTE = ("Δ acc ±: one standard error of the change, paired with the baseline on the same "
                     "test samples (a change within about two of them may be chance)")


def change_noise_note(settings: dict) -> str:
    """:data:`CHANGE_NOISE_NOTE`, saying where the test split's copies of one record were
    counted once (``settings["test_records"]``: its distinct records), or a group's rows
    (``settings["test_groups"]``: the group column)."""
    if "test_records" not in settings:
        return CHANGE_NOISE_NOTE
    if column := settings.get("test_groups"):  # prepare.csv_group_column: a group's rows are counted as one
        return (f"{CHANGE_NOISE_NOTE[:-1]}; counted over its {settings['test_records']:,} {column!r} groups, each "
                f"group's rows among its {settings['test_samples']:,} samples counted together)")
    return (f"{CHANGE_NOISE_NOTE[:-1]}; counted over its {settings['test_records']:,} distinct records, each record's "
            f"copies among its {settings['test_samples']:,} samples right or wrong together)")


# Under every table that shows the payback.
PAYBACK_NOTE = "payback: predictions until a variant's energy saving repays its making (never: no saving beyond its noise)"


# Under every table that shows the energy saving with its noise.
SAVING_NOISE_NOTE = ("saved ±: one standard error of the saving, from the model's energy readings paired with the "
                     "baseline's (read in the same passes; never below what the meter's step allows); payback is "
                     "`never` for a saving whose 95% interval (Student's t over the readings) reaches zero")


def cell(key: str, row: Mapping[str, Any]) -> str:
    """``row[key]`` as :data:`COLUMNS` shows it; a figure whose column names its noise is
    followed by ``±`` and the noise where the row has one above 0 (none for the baseline,
    or a model whose every prediction is the baseline's)."""
    column = COLUMNS[key]
    text = column.render(row.get(key))
    noise = row.get(column.noise) if column.noise else None
    if text == "-" or not _finite(noise) or noise <= 0:
        return text
    if column.noise_format is not None:
        return f"{text}±{noise:{column.noise_format}}"
    decimals = max(0, 1 - math.floor(math.log10(noise)))
    value = round(row[key], decimals) or 0.0  # no "-0.0000"
    return f"{value:.{decimals}f}±{noise:.{decimals}f}"


def times(ratio: Any, better: str, worse: str) -> str:
    """A "times better" ratio in words: 4.08 -> '4.08× smaller', 0.5 -> '2.00× larger', 1 -> 'the same'."""
    if not _finite(ratio) or ratio <= 0:
        return "-"
    if round(ratio, 2) == 1.0:
        return "the same"
    return f"{ratio:.2f}× {better}" if ratio >= 1 else f"{1 / ratio:.2f}× {worse}"


def gains_sentence(figures: Mapping[str, Any]) -> str:
    """A model's figures against the baseline in words, as every headline says them:
    'accuracy 97.98% (+0.90±0.55 pts), size 19.5 KiB (4.00× smaller), latency p50 0.041 ms
    (2.00× faster) vs the baseline' (``figures``: metric names to values, as a table row)."""
    return (
        f"accuracy {cell(names.ACCURACY, figures)}% ({cell(names.ACCURACY_CHANGE_PTS, figures)} pts), "
        f"size {cell(names.SIZE_BYTES, figures)} KiB ({times(figures.get(names.SIZE_REDUCTION_X), 'smaller', 'larger')}), "
        f"latency p50 {cell(names.LATENCY_P50_MS, figures)} ms "
        f"({times(figures.get(names.SPEEDUP_X), 'faster', 'slower')}) vs the baseline"
    )


def results_table(
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[str],
    title: str | None = None,
    caption: str | None = None,
    highlight: Callable[[Mapping[str, Any]], bool] | None = None,
) -> Table:
    """A rich table of ``rows`` showing ``columns`` (keys of :data:`COLUMNS`)."""
    unknown = [key for key in columns if key not in COLUMNS]
    if unknown:
        raise KeyError(f"no table column for {', '.join(unknown)}")
    table = Table(title=title, caption=caption)
    for key in columns:
        table.add_column(COLUMNS[key].header, justify=COLUMNS[key].justify)  # type: ignore[arg-type]
    for row in rows:
        cells = [cell(key, row) for key in columns]
        table.add_row(*cells, style="bold green" if highlight and highlight(row) else None)
    return table


def console(stderr: bool = False) -> Console:
    """A console that keeps tables readable off a terminal."""
    probe = Console(stderr=stderr)
    return probe if probe.is_terminal else Console(stderr=stderr, width=WIDTH_OFF_TERMINAL)


def as_text(table: Table, width: int = WIDTH_OFF_TERMINAL) -> str:
    """The table as plain text (for a log line or a Markdown code block)."""
    buffer = io.StringIO()
    Console(file=buffer, width=width, color_system=None, legacy_windows=False).print(table)
    return buffer.getvalue().rstrip()
