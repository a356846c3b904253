"""Classification metrics shared by the head and fine-tune stages, so both write the same keys.

`classification_metrics(probs, labels, classes)` -> {"accuracy", "mean_class_accuracy", "macro_f1", "log_loss",
"ece", "per_class": {class: {"precision", "recall"}}, "n", "correct", "accuracy_ci_low", "accuracy_ci_high"}: flat
enough for `dvc metrics diff` (val.accuracy, ...), which then prints the 95% interval beside the accuracy's change.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.stats import binomtest
from sklearn.metrics import accuracy_score, log_loss, precision_recall_fscore_support

CONFIDENCE = 0.95


def accuracy_interval(correct: int, n: int, *, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Wilson score interval of an accuracy of `correct` out of `n` images (scipy's binomtest); (0, 1) for n = 0."""
    if n == 0:
        return 0.0, 1.0
    interval = binomtest(int(correct), int(n)).proportion_ci(confidence_level=confidence, method="wilson")
    return float(interval.low), float(interval.high)


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, *, n_bins: int = 15) -> float:
    """ECE of probabilities [N, K] against labels [N]: sum over `n_bins` equal-width confidence bins of
    (bin size / N) * |accuracy in bin - mean confidence in bin|; confidence = max probability, bins (a, b]
    with the first bin closed at 0."""
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    bins = np.clip(np.ceil(confidence * n_bins).astype(int) - 1, 0, n_bins - 1)
    ece = 0.0
    for b in np.unique(bins):
        members = bins == b
        ece += members.mean() * abs(correct[members].mean() - confidence[members].mean())
    return float(ece)


def classification_metrics(probs: np.ndarray, labels: np.ndarray, classes: Sequence[str], *,
                           ece_bins: int = 15) -> dict[str, Any]:
    """Metrics of class probabilities [N, K] (rows sum to 1) against integer labels [N] in [0, K)."""
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    every = list(range(len(classes)))
    predicted = probs.argmax(axis=1)
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, predicted, labels=every, zero_division=0)
    present = support > 0
    correct = int(np.sum(predicted == labels))
    low, high = accuracy_interval(correct, len(labels))
    return {
        "accuracy": float(accuracy_score(labels, predicted)),
        "accuracy_ci_low": low,
        "accuracy_ci_high": high,
        "correct": correct,
        "mean_class_accuracy": float(recall[present].mean()),
        "macro_f1": float(f1[present].mean()),
        "log_loss": float(log_loss(labels, probs, labels=every)),
        "ece": expected_calibration_error(probs, labels, n_bins=ece_bins),
        "per_class": {name: {"precision": float(precision[i]), "recall": float(recall[i])}
                      for i, name in enumerate(classes)},
        "n": int(len(labels)),
    }
