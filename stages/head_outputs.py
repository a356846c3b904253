"""The head stage's report files besides metrics.json: predictions.json (stages/evaluation.py's format),
errors.csv, the held-out plots (stages/plots.py) and MODEL_CARD.md (stages/model_card.py). Writes only."""
from __future__ import annotations

import csv
import io
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from stages.evaluation import Predictions, predictions_from_proba, write_predictions
from stages.io import write_text
from stages.model_card import model_card
from stages.params import HeadParams
from stages.plots import write_plots


def write_errors_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """Misclassified images: path,true,predicted,prob sorted by path (prob: probability of the prediction)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=("path", "true", "predicted", "prob"), lineterminator="\n")
    writer.writeheader()
    writer.writerows(sorted(rows, key=lambda r: r["path"]))
    write_text(path, buffer.getvalue())


def write_head_reports(reports_dir: Path, model_path: Path, *, metrics: dict[str, Any], result: dict[str, Any],
                       labels: np.ndarray, split: np.ndarray, paths: Sequence[str], classes: Sequence[str],
                       params: HeadParams, preprocess: dict[str, Any] | None, weights_path: Path) -> None:
    """MODEL_CARD.md beside the model, predictions.json, errors.csv and plots/ of the protocol's `result`
    (stages.head.evaluate_protocol) for images with labels, split, paths [N]."""
    heldout, best = result["heldout_rows"], result["best"]
    proba, y_heldout = result["predictions"]["probe"], labels[heldout]
    counts = {str(name): dict(Counter(classes[label] for label in labels[split == name])) for name in np.unique(split)}
    write_text(model_path.parent / "MODEL_CARD.md", model_card(
        backbone_name=metrics["backbone"], metrics=metrics, classes=classes, split_counts=counts,
        preprocess=preprocess, weights_path=weights_path, model_path=model_path))
    write_predictions(reports_dir / "predictions.json", Predictions(
        split=result["heldout_split"], classes=list(classes), paths=[paths[i] for i in heldout], labels=y_heldout,
        rows={name: predictions_from_proba(p) for name, p in result["predictions"].items()}))
    predicted = proba.argmax(1)
    write_errors_csv(reports_dir / "errors.csv", [
        {"path": paths[i], "true": classes[t], "predicted": classes[p], "prob": f"{proba[n, p]:.6f}"}
        for n, (i, t, p) in enumerate(zip(heldout, y_heldout, predicted)) if t != p])
    calibration = result.get("calibration") or {"method": "none"}
    before = (result["predictions"]["layers=" + "+".join(best.candidate.layers)]
              if calibration["method"] != "none" else None)
    write_plots(reports_dir / "plots", y_true=y_heldout, proba=proba, classes=classes, ece_bins=params.ece_bins,
                title=f"{metrics['backbone']} {best.candidate.kind}", split=result["heldout_split"],
                proba_uncalibrated=before, temperature=float(calibration.get("temperature", 1.0)))
