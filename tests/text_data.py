"""Synthetic text with a learnable rule, for tests and the benchmark: sentiment-like
templates, noise words, and label noise.

A review is a few sentences; each sentence is a template filled with a subject, an
intensifier and a polar word. The label is the sign of the summed polarity of the polar
words (negations flip a sentence), so a model must read the words and their context, not
the length. Noise words are drawn from a large neutral vocabulary (many appear only in
the test split), and ``label_noise`` of the labels are flipped: the best reachable
accuracy is about ``1 - label_noise``.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

POSITIVE = ("great", "wonderful", "excellent", "delightful", "superb", "charming", "brilliant", "moving", "fun", "lovely")
NEGATIVE = ("awful", "boring", "terrible", "dull", "clumsy", "tedious", "weak", "bland", "poor", "messy")
SUBJECTS = ("the film", "the plot", "the acting", "the story", "the ending", "the soundtrack", "this movie", "the cast")
INTENSIFIERS = ("", "really", "very", "quite", "truly", "rather", "so")
TEMPLATES = (
    "{subject} was {negation}{intensifier} {word}",
    "i found {subject} {negation}{intensifier} {word}",
    "honestly {subject} is {negation}{intensifier} {word} {noise}",
    "{noise} and {subject} felt {negation}{intensifier} {word}",
)
CLASS_NAMES = ("negative", "positive")


def _noise_words(rng: np.random.Generator, count: int) -> str:
    return " ".join(f"n{int(rng.integers(0, 3000))}" for _ in range(count))


def sentiment_texts(n: int, seed: int = 0, label_noise: float = 0.05) -> tuple[list[str], np.ndarray]:
    """``n`` reviews and their labels (0 negative, 1 positive), about balanced."""
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    for _ in range(n):
        sentences, score = [], 0
        for _ in range(int(rng.integers(1, 4))):
            positive = bool(rng.integers(0, 2))
            negated = rng.random() < 0.2
            word = str(rng.choice(POSITIVE if positive else NEGATIVE))
            intensifier = str(rng.choice(INTENSIFIERS))
            sentence = str(rng.choice(TEMPLATES)).format(
                subject=rng.choice(SUBJECTS), negation="not " if negated else "",
                intensifier=intensifier, word=word, noise=_noise_words(rng, int(rng.integers(1, 4))),
            )
            sentences.append(" ".join(sentence.split()))
            score += (1 if positive else -1) * (-1 if negated else 1)
        if score == 0:  # a tie: one more sentence decides
            positive = bool(rng.integers(0, 2))
            sentences.append(f"overall {rng.choice(SUBJECTS)} was {rng.choice(POSITIVE if positive else NEGATIVE)}")
            score = 1 if positive else -1
        text = ". ".join(sentences) + ". " + _noise_words(rng, int(rng.integers(0, 6)))
        label = int(score > 0)
        if rng.random() < label_noise:
            label = 1 - label
        texts.append(text.strip())
        labels.append(label)
    return texts, np.array(labels, dtype=np.int64)


def write_sentiment_csv(path: Path, n: int, seed: int = 0, label_noise: float = 0.05, delimiter: str = ",") -> Path:
    """The synthetic reviews as a CSV/TSV with ``text`` and ``label`` (class names) columns."""
    texts, labels = sentiment_texts(n, seed, label_noise)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, delimiter=delimiter)
        writer.writerow(["id", "text", "label"])
        for i, (text, label) in enumerate(zip(texts, labels)):
            writer.writerow([i, text, CLASS_NAMES[label]])
    return path


def write_sentiment_folder(folder: Path, n: int, seed: int = 0, label_noise: float = 0.05) -> Path:
    """The synthetic reviews as one ``.txt`` per review in ``folder/<class>/``."""
    texts, labels = sentiment_texts(n, seed, label_noise)
    for i, (text, label) in enumerate(zip(texts, labels)):
        target = folder / CLASS_NAMES[label] / f"{i:05d}.txt"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text + "\n", encoding="utf-8")
    return folder
