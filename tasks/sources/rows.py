"""Rows of features and sequences: what the prepare stage chooses on the train split, and says.

Which features go to log scale (:func:`chosen_log_features`: heavy-tailed amounts and
counts, or those ``prepare.log_features`` names), what a missing value becomes
(:func:`fill_values_from_train`: each feature's train-split median), whether a 3-D npz holds
sequences whose features are standardized one by one (:func:`chosen_npz_layout`), and the log
lines that report them. Pure functions of arrays and names; the prepare stage writes the
results into ``preprocess.json`` and the data card.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tasks.core.categories import CategoricalColumn
from tasks.sources.common import DataError


def missing_counts(x: np.ndarray) -> dict[int, int]:
    """``{feature index: missing values}`` of rows ``x``, for the features that have any."""
    counts = np.isnan(x).sum(axis=0) if x.ndim == 2 else np.zeros(0)
    return {i: int(n) for i, n in enumerate(counts) if n}


def fill_values_from_train(splits: dict[str, tuple[np.ndarray, np.ndarray]], feature_names: tuple[str, ...],
                           shown: str) -> tuple[float, ...]:
    """Each feature's median on the train split, its missing values left out; every split's
    missing values (NaN) become it, in place. Refused: images, and a feature the train split
    has no value of (nothing to learn a fill value from)."""
    x_train = splits["train"][0]
    if x_train.ndim != 2:
        raise DataError(f"params.yaml: prepare.missing_values: median: the data is not rows of features (input shape "
                        f"{tuple(x_train.shape[1:])}); only rows have missing values to fill (refuse)")
    present = (~np.isnan(x_train)).sum(axis=0)
    for i in np.flatnonzero(present == 0):
        name = feature_names[i] if feature_names else f"x{i}"
        raise DataError(f"{shown}: feature {name!r} has no value in the train split; leave it out "
                        "(prepare.csv_ignore_columns) or give it values")
    medians = np.nanmedian(x_train.astype(np.float64), axis=0)
    for x, _ in splits.values():
        gaps = np.isnan(x)
        if gaps.any():
            x[gaps] = np.broadcast_to(medians.astype(np.float32), x.shape)[gaps]
    return tuple(float(v) for v in medians)


# A feature is heavy-tailed (amounts, counts) where its train-split values are non-negative and
# their skewness exceeds this (a normal feature's is about 0, an exponential's 2, a lognormal's
# of sigma 1 about 6): standardizing it alone squeezes its bulk into a sliver of its range.
HEAVY_TAIL_SKEWNESS = 2.0


def heavy_tailed_features(x_train: np.ndarray, categorical: tuple[CategoricalColumn, ...] = (),
                          feature_names: tuple[str, ...] = ()) -> tuple[int, ...]:
    """The features of rows ``x_train`` that are non-negative and skewed beyond
    :data:`HEAVY_TAIL_SKEWNESS`; a category's 0/1 feature is none (a rare one is skewed)."""
    if x_train.ndim != 2 or len(x_train) < 3:
        return ()
    one_hot = {name for column in categorical for name in column.features()}
    keep = np.array([not (feature_names and feature_names[i] in one_hot) for i in range(x_train.shape[1])])
    x = x_train.astype(np.float64)
    centred = x - x.mean(axis=0)
    std = np.sqrt((centred**2).mean(axis=0))
    skewness = (centred**3).mean(axis=0) / np.where(std > 0, std, 1.0) ** 3
    return tuple(int(i) for i in np.flatnonzero(keep & (x.min(axis=0) >= 0) & (std > 0)
                                                & (skewness > HEAVY_TAIL_SKEWNESS)))


def chosen_log_features(setting: str | list[int | str], x_train: np.ndarray, feature_names: tuple[str, ...] = (),
                        categorical: tuple[CategoricalColumn, ...] = ()) -> tuple[int, ...]:
    """The features ``prepare.log_features`` takes to log scale (``auto``: the heavy-tailed
    ones of rows of features; none for images); a list (indices, or the names of a CSV's
    columns) is checked against the data."""
    if setting == "none":
        return ()
    if setting == "auto":
        return heavy_tailed_features(x_train, categorical, feature_names)
    if x_train.ndim != 2:
        raise DataError(f"params.yaml: prepare.log_features: {setting}: the data is not rows of features (input shape "
                        f"{tuple(x_train.shape[1:])}); only rows have features to log (none or auto)")
    features = x_train.shape[1]
    indices = []
    for entry in setting:
        if isinstance(entry, str):
            if not feature_names:
                raise DataError(f"params.yaml: prepare.log_features: {entry!r}: the data names no columns (only a CSV's "
                                f"header does); name features by index 0..{features - 1}")
            if entry in {column.name for column in categorical}:
                raise DataError(f"params.yaml: prepare.log_features: {entry!r} is a categorical column "
                                "(prepare.csv_categorical_columns): its 0/1 features have no tail to log")
            if entry not in feature_names:
                raise DataError(f"params.yaml: prepare.log_features: no column {entry!r} (columns: "
                                f"{', '.join(feature_names)})")
            entry = feature_names.index(entry)
        elif entry >= features:
            raise DataError(f"params.yaml: prepare.log_features: feature {entry} does not exist: the data has "
                            f"{features} features (0..{features - 1})")
        indices.append(entry)
    return tuple(sorted(set(indices)))


# A feature (last axis) of a 3-D npz whose train-split values, standardized together with the
# others as one image channel, would span less than this share of a unit is on another scale
# (a vibration in metres beside a pressure in hPa): the model would see it as a near-constant.
SQUEEZED_SPAN = 0.1


def squeezed_features(x_train: np.ndarray, channel_std: float) -> tuple[int, ...]:
    """The features (last axis) of ``(N, 1, T, F)`` ``x_train`` that one mean and standard
    deviation for the whole array (``channel_std``: the one-channel fit's) would flatten:
    their range is under :data:`SQUEEZED_SPAN` of that deviation. A constant feature is none
    (it carries nothing either way)."""
    axes = tuple(range(x_train.ndim - 1))
    span = x_train.max(axis=axes).astype(np.float64) - x_train.min(axis=axes)
    return tuple(int(i) for i in np.flatnonzero((span > 0) & (span < SQUEEZED_SPAN * channel_std)))


def chosen_npz_layout(setting: str, x_train: np.ndarray, channel_std: float) -> dict[str, Any]:
    """What a 3-D npz's train split ``(N, 1, A, B)`` is standardized as, for the data card:
    ``layout`` (``sequences``: each feature B on its own; ``images``: one channel), the
    ``setting`` (``prepare.npz_layout``) and the ``squeezed`` features that one channel of
    standard deviation ``channel_std`` would flatten (``auto`` picks sequences where there are any)."""
    squeezed = squeezed_features(x_train, channel_std)
    layout = setting if setting != "auto" else "sequences" if squeezed else "images"
    return {"layout": layout, "setting": setting, "squeezed": list(squeezed)}


def npz_layout_line(layout: dict[str, Any], input_shape: list[int]) -> str:
    """The prepare stage's line for the data card's ``npz_layout``: what the 3-D array was read
    as and why, and the setting that reads it the other way."""
    steps, features = input_shape[-2:]
    squeezed = layout["squeezed"]
    listed = ", ".join(str(i) for i in squeezed[:8]) + (f", ... ({len(squeezed)})" if len(squeezed) > 8 else "")
    flat = (f"as one image channel, feature{'s' if len(squeezed) > 1 else ''} {listed} of 0..{features - 1} "
            f"would span less than {SQUEEZED_SPAN:g} of a unit")
    if layout["layout"] == "sequences":
        why = f"auto: {flat}" if layout["setting"] == "auto" else "sequences"
        return (f"sequences of {steps} steps x {features} features: each feature standardized on its own "
                f"(prepare.npz_layout {why}; prepare.npz_layout=images reads the array as one-channel images)")
    if squeezed:  # images asked for, and some features will hardly reach the model
        return (f"one-channel {steps}x{features} images: one mean and std (prepare.npz_layout images); {flat}, "
                "so the model hardly sees them: prepare.npz_layout=sequences standardizes each feature on its own")
    return (f"one-channel {steps}x{features} images: one mean and std (prepare.npz_layout {layout['setting']}"
            f"{': no feature on another scale' if layout['setting'] == 'auto' else ''}; prepare.npz_layout=sequences "
            f"standardizes each of the {features} features (last axis) on its own)")


def missing_line(missing: dict[str, Any], rows: int, shown: int = 8) -> str:
    """``income 120 of 3000 (4.0%) -> 51234.5, ...`` (the card's ``missing_values``): each
    feature's gaps and its fill value; ``none in the data`` (a request's are still filled)."""
    counts = missing["counts"]
    if not counts:
        return "none in the data (a request's missing values are still filled)"
    parts = [f"{name} {n} of {rows} ({100 * n / rows:.1f}%) -> {missing['fill_values'][name]:g}"
             for name, n in list(counts.items())[:shown]]
    return ", ".join(parts) + (f", ... ({len(counts)} features)" if len(counts) > shown else "")


def feature_list(indices: tuple[int, ...], names: tuple[str, ...] = (), shown: int = 12) -> str:
    """The model's column names with their indices where the data names its columns
    (``amount (0), visits (3)``), else ``x0, x3``; the first ``shown``, then the count."""
    listed = ", ".join(f"{names[i]} ({i})" if names else f"x{i}" for i in indices[:shown])
    return listed + (f", ... ({len(indices)} features)" if len(indices) > shown else "")
