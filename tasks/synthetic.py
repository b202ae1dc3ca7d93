"""Generated data sets for the tests and benchmarks, written in the prepared-data layout.

Recipes tuned on the bundled digits are not evidence (DESIGN invariant 7): these sets are
the "data it was not tuned on" that tests and benchmarks try every capability on. No
stage imports this module: it makes data, the stages only read it.

- :func:`noisy_digits`: scikit-learn's 8x8 digits upscaled and drawn into 28x28 canvases
  with rotation, shift, contrast, noise and occlusion (MNIST-like, not one every model aces);
- :func:`noisy_patterns`: 10 classes of smooth random 28x28 patterns, shifted, under noise;
- :func:`tabular`: 8 features, 2 classes; :func:`sequences`: 12 steps x 4 features, 2 classes;
- :func:`sensor_sequences`: raw ``(N, T, F)`` readings in their own units (a pressure in hPa
  beside a vibration in metres), what an ``npz`` of sensor data holds before ``prepare``;
- :func:`colour_shapes`: raw ``(N, H, W, 3)`` uint8 colour images, channels last (as PIL,
  Keras and TensorFlow Datasets hand them), whose colour carries half the class;
- :func:`write_splits`: any ``(x, y)`` as ``data/prepared`` (splits, ``preprocess.json``, ``card.json``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tasks.data import Preprocessing


def write_splits(
    prepared: Path, x: np.ndarray, y: np.ndarray, num_classes: int, digest: str,
    cuts: tuple[int, int] | None = None, source: str = "generated",
) -> dict[str, int]:
    """``x``/``y`` in the prepared-data layout (:mod:`tasks.data`): rows up to ``cuts[0]`` train,
    up to ``cuts[1]`` val, the rest test (default: 60/15/25, as the prepare stage splits).
    Normalization statistics come from the train rows only. Returns the split sizes."""
    count = len(y)
    cut_train, cut_val = cuts if cuts is not None else (int(0.6 * count), int(0.75 * count))
    splits = {"train": slice(0, cut_train), "val": slice(cut_train, cut_val), "test": slice(cut_val, count)}
    prepared.mkdir(parents=True)
    for split, rows in splits.items():
        np.save(prepared / f"{split}_x.npy", np.ascontiguousarray(x[rows], dtype=np.float32))
        np.save(prepared / f"{split}_y.npy", np.ascontiguousarray(y[rows], dtype=np.int64))
    preprocessing = Preprocessing.fit(x[splits["train"]].astype(np.float32), num_classes,
                                      [str(c) for c in range(num_classes)])
    (prepared / "preprocess.json").write_text(preprocessing.to_json())
    (prepared / "card.json").write_text(json.dumps({"source": source, "digest": digest}) + "\n")
    return {split: rows.stop - rows.start for split, rows in splits.items()}


def noisy_digits(samples: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``samples`` noisy 28x28 digits (uint8-range floats, shape (N, 1, 28, 28)) and their labels:
    scikit-learn's 1,797 8x8 digits upscaled to 16x16, drawn with a random rotation (+-10
    degrees), shift (+-4 px), contrast and brightness, Gaussian noise, and 1 in 10 an occluding bar."""
    from scipy import ndimage
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    bank = np.stack([ndimage.zoom(image / 16.0, 2, order=1) for image in digits.images]).clip(0, 1)
    picks = rng.integers(0, len(bank), size=samples)
    x = np.zeros((samples, 28, 28), dtype=np.float32)
    for row, pick in enumerate(picks):
        glyph = ndimage.rotate(bank[pick], rng.uniform(-10, 10), reshape=False, order=1)
        top, left = rng.integers(2, 11, size=2)  # a 16x16 glyph, shifted up to +-4 px from the centre
        x[row, top : top + 16, left : left + 16] = glyph
        if rng.random() < 0.1:  # an occluding bar, horizontal or vertical
            at, width = rng.integers(4, 24), rng.integers(2, 5)
            if rng.random() < 0.5:
                x[row, at : at + width, :] = rng.uniform(0.0, 1.0)
            else:
                x[row, :, at : at + width] = rng.uniform(0.0, 1.0)
    contrast = rng.uniform(0.6, 1.3, size=(samples, 1, 1))
    brightness = rng.uniform(-0.05, 0.1, size=(samples, 1, 1))
    x = x * contrast + brightness + rng.normal(0.0, 0.1, size=x.shape)
    return (255.0 * x.clip(-0.5, 1.5)).astype(np.float32)[:, None], digits.target[picks].astype(np.int64)


def noisy_patterns(samples: int = 600, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """10 classes of 28x28 images (N, 1, 28, 28): a fixed smooth random pattern per class,
    shifted by up to 3 pixels, under Gaussian noise (0.8 x the pattern's std)."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    patterns = np.stack([ndimage.gaussian_filter(p, 3) for p in rng.normal(size=(10, 28, 28))])
    patterns /= patterns.std(axis=(1, 2), keepdims=True)
    y = rng.integers(0, 10, samples)
    x = np.stack([np.roll(patterns[c], tuple(rng.integers(-3, 4, 2)), axis=(0, 1)) for c in y])
    return (x + rng.normal(scale=0.8, size=x.shape))[:, None], y.astype(np.int64)


def tabular(samples: int = 600, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """8 features, 2 classes: a noisy linear rule with one interaction."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(samples, 8))
    score = x @ rng.normal(size=8) + 1.5 * x[:, 0] * x[:, 1] + rng.normal(scale=0.5, size=samples)
    return x, (score > 0).astype(np.int64)


def sequences(samples: int = 600, seed: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Sequences of 12 steps x 4 features, shaped (N, 1, 12, 4) (one row per step), 2 classes:
    a slow or a fast wave in noise."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, samples)
    t = np.arange(12)[None, :, None]
    frequency = np.where(y == 1, 0.9, 0.3)[:, None, None]
    phase = rng.uniform(0, 2 * np.pi, size=(samples, 1, 4))
    x = np.sin(frequency * t + phase) + rng.normal(scale=0.5, size=(samples, 12, 4))
    return x[:, None], y.astype(np.int64)


def sensor_sequences(samples: int = 600, seed: int = 3, steps: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """Raw sensor readings ``(N, steps, 4)``, float32, each channel in its own unit, 2 classes:
    a pressure (about 1013 hPa, drifting), a vibration in metres (about 1e-3: a slow or a fast
    wave, the class), a temperature (about 60 C) and a motor current (about 10 A), the last two
    noise. As one image channel the vibration spans a millionth of a unit: it takes a mean and
    standard deviation per feature for a model to see the class."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, samples)
    t = np.arange(steps)[None, :]
    frequency = np.where(y == 1, 0.25, 0.08)[:, None]
    phase = rng.uniform(0, 2 * np.pi, (samples, 1))
    vibration = 1e-3 * np.sin(2 * np.pi * frequency * t + phase) + rng.normal(0, 2e-4, (samples, steps))
    pressure = 1013 + rng.normal(0, 5, (samples, 1)) + np.cumsum(rng.normal(0, 0.3, (samples, steps)), axis=1)
    temperature = 60 + rng.normal(0, 3, (samples, 1)) + rng.normal(0, 0.4, (samples, steps))
    current = 10 + rng.normal(0, 1, (samples, steps))
    x = np.stack([pressure, vibration, temperature, current], axis=2).astype(np.float32)
    return x, y.astype(np.int64)


def colour_shapes(samples: int = 600, seed: int = 4, size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Raw colour images ``(N, size, size, 3)``, uint8, channels last, 4 classes: a disc or a
    square (the shape) in a warm or a cool colour (the colour), at a random place and size on a
    grey background, under pixel noise. Read as ``(C=size, H=size, W=3)`` a model mixes up the
    colour channels with a column of pixels."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, samples)
    rows, cols = np.mgrid[0:size, 0:size]
    radius = rng.uniform(size * 0.15, size * 0.3, samples)[:, None, None]
    centre = rng.uniform(0.3 * size, 0.7 * size, (samples, 2))[:, :, None, None]
    dy, dx = rows[None] - centre[:, 0], cols[None] - centre[:, 1]
    disc = dy**2 + dx**2 <= radius**2
    square = (np.abs(dy) <= 0.85 * radius) & (np.abs(dx) <= 0.85 * radius)
    mask = np.where((y % 2 == 0)[:, None, None], disc, square)
    hue = np.where((y // 2 == 0)[:, None], [[200.0, 90.0, 40.0]], [[40.0, 110.0, 200.0]])
    colour = hue + rng.normal(0, 25, (samples, 3))
    background = rng.uniform(60, 160, (samples, 1)) + rng.normal(0, 15, (samples, 3))
    x = np.where(mask[..., None], colour[:, None, None, :], background[:, None, None, :])
    x = x + rng.normal(0, 18, x.shape)
    return np.clip(x, 0, 255).astype(np.uint8), y.astype(np.int64)
