"""The evaluation protocol shared by head, fine-tune and report: which split is held out, which rows may choose
anything, paired comparisons, and the per-image predictions file.

Protocol (nothing that is reported chose anything):
- The held-out split is `test` when the manifest has test images, else `val` (`heldout_split`). Its rows never
  reach a fit or a choice; every reported accuracy is computed on it and carries a 95% Wilson interval
  (stages.metrics.accuracy_interval).
- Selection rows (`selection_rows`) are every other row: train, plus val when test is held out. Choices (C, head
  kind, layers, normalization, k of k-NN, the fine-tune epoch) are made by stratified k-fold cross-validation
  on them (`head.selection: cv`) or, with `head.selection: val` on a train/val/test dataset, by fitting on train
  and scoring val; the chosen setting is then refit on all selection rows.
- Two rows of the report are compared on the same held-out images with McNemar's exact test (`mcnemar_exact`).

predictions.json (one per head or fine-tune; `write_predictions` / `read_predictions`):
    {"split": "val", "classes": [...], "paths": [N], "labels": [N],
     "rows": {row name: {"predicted": [N] int, "confidence": [N] float (probability of the prediction)}}}
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import binomtest

from sklearn.model_selection import StratifiedKFold

from stages.io import read_json, write_json

ALPHA = 0.05  # a row is "indistinguishable from the best" when McNemar's exact p-value is at least this


class ProtocolError(ValueError):
    """The splits do not allow an honest evaluation; the message says what is missing and how to fix it."""


def heldout_split(split: np.ndarray) -> str:
    """The split that is reported and never chooses anything: "test" when any row is in test, else "val"."""
    names = set(np.asarray(split).tolist())
    if "test" in names:
        return "test"
    if "val" in names:
        return "val"
    raise ProtocolError("the manifest has neither test nor val images, so nothing can be held out; set "
                        "prepare.test_fraction > 0 (params.yaml) or add a test/ or val/ folder to the dataset")


def selection_rows(split: np.ndarray, heldout: str | None = None) -> np.ndarray:
    """Indices [M] of the rows that may train and choose: every row outside the held-out split."""
    split = np.asarray(split)
    heldout = heldout or heldout_split(split)
    return np.flatnonzero(split != heldout)


def mcnemar_exact(correct_a: np.ndarray, correct_b: np.ndarray) -> dict[str, Any]:
    """McNemar's exact test of two classifiers on the same images: correct_a, correct_b [N] bool.

    b = images only A gets right, c = only B gets right; p = two-sided binomial test of b against
    Binomial(b + c, 1/2) (1.0 when b + c = 0)."""
    correct_a, correct_b = np.asarray(correct_a, dtype=bool), np.asarray(correct_b, dtype=bool)
    if correct_a.shape != correct_b.shape:
        raise ValueError(f"McNemar needs the same images on both sides; got {correct_a.shape} and {correct_b.shape}")
    only_a = int(np.sum(correct_a & ~correct_b))
    only_b = int(np.sum(~correct_a & correct_b))
    p_value = 1.0 if only_a + only_b == 0 else float(binomtest(only_a, only_a + only_b, 0.5).pvalue)
    return {"only_a": only_a, "only_b": only_b, "p_value": p_value}


# ------------------------------------------------------------------------------------------------ predictions
@dataclass(frozen=True)
class Predictions:
    """Per-image predictions of one or more report rows on the held-out split."""
    split: str
    classes: list[str]
    paths: list[str]
    labels: np.ndarray  # [N] int64
    rows: dict[str, dict[str, np.ndarray]]  # row -> {"predicted": [N] int64, "confidence": [N] float64}

    def correct(self, row: str) -> np.ndarray:
        """[N] bool: row's prediction equals the label."""
        return self.rows[row]["predicted"] == self.labels


def predictions_from_proba(proba: np.ndarray) -> dict[str, np.ndarray]:
    """{"predicted", "confidence"} of class probabilities [N, K]."""
    proba = np.asarray(proba, dtype=np.float64)
    predicted = proba.argmax(1)
    return {"predicted": predicted.astype(np.int64), "confidence": proba[np.arange(len(proba)), predicted]}


def write_predictions(path: Path, predictions: Predictions) -> None:
    n = len(predictions.paths)
    for name, row in predictions.rows.items():
        if len(row["predicted"]) != n:
            raise ValueError(f"predictions row {name!r} has {len(row['predicted'])} entries for {n} images")
    write_json(path, {
        "split": predictions.split, "classes": list(predictions.classes), "paths": list(predictions.paths),
        "labels": [int(v) for v in predictions.labels],
        "rows": {name: {"predicted": [int(v) for v in row["predicted"]],
                        "confidence": [round(float(v), 6) for v in row["confidence"]]}
                 for name, row in predictions.rows.items()}})


def read_predictions(path: Path) -> Predictions:
    data = read_json(path)
    try:
        labels = np.asarray(data["labels"], dtype=np.int64)
        rows = {name: {"predicted": np.asarray(row["predicted"], dtype=np.int64),
                       "confidence": np.asarray(row["confidence"], dtype=np.float64)}
                for name, row in data["rows"].items()}
        predictions = Predictions(split=str(data["split"]), classes=list(data["classes"]),
                                  paths=[str(p) for p in data["paths"]], labels=labels, rows=rows)
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path}: not a predictions file ({exc!r}); re-run the stage that writes it") from None
    if any(len(row["predicted"]) != len(labels) for row in rows.values()) or len(predictions.paths) != len(labels):
        raise ValueError(f"{path}: rows, paths and labels differ in length; re-run the stage that writes it")
    return predictions


def paired_comparison(best: tuple[Predictions, str], other: tuple[Predictions, str]) -> dict[str, Any] | None:
    """McNemar of `other` against `best` on the images both predicted (matched by path); None when the two
    were evaluated on different split names or share no image."""
    (pa, ra), (pb, rb) = best, other
    if pa.split != pb.split:
        return None
    index_b = {path: i for i, path in enumerate(pb.paths)}
    common = [(i, index_b[path]) for i, path in enumerate(pa.paths) if path in index_b]
    if not common:
        return None
    ia, ib = (np.asarray(v) for v in zip(*common))
    result = mcnemar_exact(pa.correct(ra)[ia], pb.correct(rb)[ib])
    result["n"] = len(common)
    result["indistinguishable"] = result["p_value"] >= ALPHA
    return result


# ------------------------------------------------------------------------------------------------ selection
def stratified_folds(y: np.ndarray, *, folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified k-fold splits [(fit indices, score indices)] of labels y [M]: k = min(folds, the smallest
    class count); ProtocolError when a class has fewer than 2 rows (nothing to cross-validate)."""
    counts = np.bincount(np.asarray(y))
    smallest = int(counts[counts > 0].min()) if counts.size else 0
    if smallest < 2:
        raise ProtocolError(f"cross-validation needs at least 2 selection images per class; the smallest class "
                            f"has {smallest}. Add images, or set head.selection: val with a val split.")
    splitter = StratifiedKFold(n_splits=min(folds, smallest), shuffle=True, random_state=seed)
    return list(splitter.split(np.zeros(len(y)), y))


def normalize_blocks(blocks: Sequence[np.ndarray], normalization: str) -> np.ndarray:
    """Concatenate feature blocks [N, D_i] -> [N, sum D_i] (float32, as features are stored; one new array).
    "l2" in `normalization`: each block is first scaled to L2 norm sqrt(D_i) (unit norm, rescaled so a feature's
    typical size stays about 1 and one C grid fits every normalization); standardization, when asked for, is the
    head's own first step."""
    out = []
    for block in blocks:
        block = np.asarray(block, dtype=np.float32)
        if "l2" in normalization:
            norms = np.linalg.norm(block, axis=1, keepdims=True)
            block = block * (np.float32(np.sqrt(block.shape[1])) / np.maximum(norms, np.float32(1e-12)))
        out.append(block)
    return np.concatenate(out, axis=1) if len(out) > 1 else np.array(out[0], dtype=np.float32, copy=True)


def stratified_subsample(strata: np.ndarray, *, size: int, seed: int, min_per_stratum: int = 1) -> np.ndarray:
    """Sorted indices of about `size` rows of strata [M] (a label, or split and label combined), each stratum
    keeping its share (rounded) and at least min(its count, min_per_stratum) rows; all rows when M <= size.
    Seeded: the same (strata, size, seed) always gives the same rows."""
    strata = np.asarray(strata)
    if len(strata) <= size:
        return np.arange(len(strata))
    rng = np.random.default_rng(seed)
    values, inverse, counts = np.unique(strata, return_inverse=True, return_counts=True)
    quota = np.maximum(np.minimum(counts, min_per_stratum), np.round(counts * (size / len(strata))).astype(int))
    order = np.argsort(inverse, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    chosen = [rng.choice(order[start:start + count], size=int(q), replace=False)
              for start, count, q in zip(starts, counts, np.minimum(quota, counts))]
    return np.sort(np.concatenate(chosen))


def draw_few_shot(y: np.ndarray, *, shots: int, seed: int) -> np.ndarray:
    """Indices of `shots` rows per class drawn from labels y [M] (all of a class that has fewer), sorted;
    the same (y, shots, seed) always gives the same draw."""
    rng = np.random.default_rng(seed)
    chosen = [rng.choice(np.flatnonzero(y == c), size=min(shots, int(np.sum(y == c))), replace=False)
              for c in np.unique(y)]
    return np.sort(np.concatenate(chosen))


def spread(values: Sequence[float]) -> dict[str, float]:
    """{"mean", "std" (population), "min", "max"} of accuracies over draws."""
    values = np.asarray(values, dtype=np.float64)
    return {"mean": float(values.mean()), "std": float(values.std()), "min": float(values.min()),
            "max": float(values.max())}
