"""Held-out plots of one classifier: DVC plot files (JSON records) and the same as offline PNGs (matplotlib Agg).

    plots/confusion.json, calibration.json, per_class.json   DVC plots (dvc.yaml `plots:`)
    plots/confusion.png, calibration.png, per_class.png      the same, viewable offline and in the report page

calibration.json and the bars of calibration.png are the reliability diagram of the classifier's probabilities as
exported (after temperature scaling when head.calibration applied it); calibration.png also draws the
probabilities before it, and its title gives the ECE before and after.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import precision_recall_fscore_support

from stages.io import atomic_path, write_json
from stages.metrics import expected_calibration_error


def calibration_bins(confidence: np.ndarray, correct: np.ndarray, *, n_bins: int) -> list[dict[str, Any]]:
    """The reliability diagram behind stages.metrics.expected_calibration_error: equal-width bins over [0, 1],
    right-closed ((0, 1/n], (1/n, 2/n], ...; 0 falls in the first), per non-empty bin its edges, mean
    confidence, accuracy and count. confidence (top-class probability), correct: [N]."""
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    index = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)
    bins = []
    for b in range(n_bins):
        members = index == b
        if members.any():
            bins.append({"bin": b, "lower": float(edges[b]), "upper": float(edges[b + 1]),
                         "confidence": float(confidence[members].mean()),
                         "accuracy": float(correct[members].mean()), "count": int(members.sum())})
    return bins



def _save_png(figure: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})


def write_plots(plots_dir: Path, *, y_true: np.ndarray, proba: np.ndarray, classes: Sequence[str],
                ece_bins: int, title: str, split: str = "val", proba_uncalibrated: np.ndarray | None = None,
                temperature: float = 1.0) -> None:
    """Held-out plots for DVC (confusion.json, calibration.json, per_class.json) and as PNGs (matplotlib Agg).
    proba [N, K]: the classifier's probabilities; proba_uncalibrated: the same before temperature scaling by
    `temperature` (None: not calibrated)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay

    predicted = proba.argmax(1)
    correct = predicted == y_true
    bins = calibration_bins(proba.max(1), correct, n_bins=ece_bins)
    _, recall, _, support = precision_recall_fscore_support(y_true, predicted, labels=np.arange(len(classes)),
                                                           zero_division=0)
    per_class = [{"class": name, "accuracy": float(recall[k]), "count": int(support[k])}
                 for k, name in enumerate(classes)]
    write_json(plots_dir / "confusion.json",
               [{"actual": classes[t], "predicted": classes[p]} for t, p in zip(y_true, predicted)])
    write_json(plots_dir / "calibration.json", bins)
    write_json(plots_dir / "per_class.json", per_class)

    size = max(3.5, 0.45 * len(classes) + 2)
    figure, axes = plt.subplots(figsize=(size, size))
    ConfusionMatrixDisplay.from_predictions(y_true, predicted, labels=np.arange(len(classes)),
                                            display_labels=list(classes), ax=axes, colorbar=False,
                                            xticks_rotation="vertical")
    axes.set_title(f"{title}: held-out {split} confusion")
    _save_png(figure, plots_dir / "confusion.png")
    plt.close(figure)

    _reliability_png(plots_dir / "calibration.png", bins, y_true=y_true, proba=proba, ece_bins=ece_bins,
                     title=f"{title}: held-out {split} calibration", proba_uncalibrated=proba_uncalibrated,
                     temperature=temperature)

    figure, axes = plt.subplots(figsize=(6, max(2.0, 0.35 * len(classes) + 1)))
    axes.barh([p["class"] for p in per_class], [p["accuracy"] for p in per_class], color="tab:blue")
    axes.set(xlim=(0, 1), xlabel="accuracy (recall)", title=f"{title}: held-out {split} accuracy per class")
    axes.invert_yaxis()
    _save_png(figure, plots_dir / "per_class.png")
    plt.close(figure)


def _reliability_png(path: Path, bins: list[dict[str, Any]], *, y_true: np.ndarray, proba: np.ndarray,
                     ece_bins: int, title: str, proba_uncalibrated: np.ndarray | None, temperature: float) -> None:
    """calibration.png: `bins` (of proba) as bars and a curve, the uncalibrated curve beside it when given."""
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(4.5, 4.5))
    axes.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfectly calibrated")
    if bins:
        axes.bar([b["lower"] for b in bins], [b["accuracy"] for b in bins], width=1 / ece_bins, align="edge",
                 alpha=0.6, edgecolor="black", label="accuracy per bin")
        axes.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], marker="o",
                  label="accuracy at the bin's mean confidence")
        for b in bins:
            axes.annotate(str(b["count"]), (b["lower"] + 0.5 / ece_bins, b["accuracy"]), ha="center",
                          va="bottom", fontsize="x-small")
    ece = expected_calibration_error(proba, y_true, n_bins=ece_bins)
    caption = f"ECE {ece:.3f}"
    if proba_uncalibrated is not None:
        before = calibration_bins(proba_uncalibrated.max(1), proba_uncalibrated.argmax(1) == y_true, n_bins=ece_bins)
        axes.plot([b["confidence"] for b in before], [b["accuracy"] for b in before], marker="x", linestyle=":",
                  color="tab:red", label="before temperature scaling")
        caption = (f"ECE {expected_calibration_error(proba_uncalibrated, y_true, n_bins=ece_bins):.3f} -> "
                   f"{ece:.3f} (T = {temperature:.3g})")
    axes.set(xlim=(0, 1), ylim=(0, 1.1), xlabel="confidence (top-class probability); numbers: images per bin",
             ylabel="accuracy", title=f"{title}, {caption}")
    axes.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), fontsize="x-small", frameon=False)
    _save_png(figure, path)
    plt.close(figure)

