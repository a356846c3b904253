"""Head stage: heads on the cached features, chosen by an honest protocol, metrics with intervals, an export.

    python -m stages.head --backbone NAME --features features/NAME.h5 --manifest data/prepared/manifest.csv \
        --weights models/pretrained/NAME.pth --raw data/raw --model models/NAME/classifier.pt --reports reports/NAME
    python -m stages.head --bench        # 10,000 x 2048 features, 5-fold CV over 5 values of C: seconds

1. Provenance: the features file must name this backbone, the sha256 of this weight file and of this
   manifest, and hold the manifest's images (path + sha256, in order); otherwise ProvenanceError says which
   attribute differs and to re-run `dvc repro extract@NAME`.
2. Protocol (stages/evaluation.py): the held-out split is test when the manifest has one, else val. Every
   candidate (head.kind x head.feature_sets x head.normalization x head.C) is scored on the other images only:
   stratified k-fold CV (`head.selection: cv`) or train -> val (`val`). The best selection accuracy wins (ties:
   lower log loss, then params order) and is refit on all selection images; the held-out split is predicted
   once, after every choice. Poisoning its labels changes no choice (tests/test_head.py).
     logreg      sklearn LogisticRegression (lbfgs), warm-started along the C sweep
     linear_svm  sklearn LinearSVC                 } probabilities: CalibratedClassifierCV(method="sigmoid",
     svm_rbf     sklearn SVC(kernel="rbf")         }   stratified k-fold, k <= 5, ensemble=False)
     softmax     a torch nn.Linear trained full batch with L-BFGS (CUDA when present), logreg's objective
   Feature sets concatenate pooled layers (`mid`: the backbone's last-but-one stage, attrs layer_aliases);
   normalization: standardize, l2 (each layer to norm sqrt(D)), or l2+standardize.
3. From the same cache, no second backbone pass: every feature set's own best candidate (report rows), a cosine
   k-NN probe (k chosen on the selection folds, votes weighted exp(similarity / 0.07)), and a few-shot curve
   (head.few_shot images per class, head.few_shot_draws seeded draws, logreg with the chosen settings).
4. Augmented training views (extract.augment_views) and TTA view rows (extract.tta_mode: rows) add training rows
   of their image only: a fit on images S uses S's extra rows; a fold never sees its scored images' views.

Outputs (predictions are the argmax of the probabilities everywhere; every accuracy has a 95% Wilson interval):
    reports/NAME/metrics.json        DVC metrics: heldout.* (accuracy, accuracy_ci_low/high, ...), heldout_split,
                                     selection (method, chosen, candidates), feature_sets, knn, few_shot
    reports/NAME/predictions.json    held-out predictions per row (probe, knn, layers=...): stages/evaluation.py
    reports/NAME/errors.csv          misclassified held-out images: path,true,predicted,prob (prob of the prediction)
    reports/NAME/plots/confusion.json, calibration.json, per_class.json (DVC plots, held-out) and the same as PNG
    models/NAME/classifier.pt        backbone + preprocessing + head (format: stages/export.py)
    models/NAME/classifier.onnx      the same classifier for ONNX Runtime, checked against it on held-out images
                                     from --raw (decoded as predict decodes them)
    models/NAME/probe_pool.pt        the best probe on the pooled embedding alone: where finetune@NAME starts
    models/NAME/MODEL_CARD.md        what it was trained on, held-out metrics with intervals, provenance, use, limits
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import os
import time
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.special import softmax as np_softmax
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.calibration import CalibratedClassifierCV
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss, precision_recall_fscore_support
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC, LinearSVC
from threadpoolctl import threadpool_limits
from torch import nn

from stages.backbones import (WeightsError, build_model, classifier_path, get_backbone, load_weights,
                              module_version, replace_module)
from stages.io import atomic_path, setup_logging, sha256_file, write_json, write_text
from stages.features import FeatureFile, FeaturesError, ProvenanceError, read_checked, views_per_image  # noqa: F401 (ProvenanceError: part of head's errors)
from stages.evaluation import (Predictions, ProtocolError, draw_few_shot, heldout_split, knn_proba, normalize_blocks,
                               predictions_from_proba, selection_rows, spread, stratified_folds, write_predictions)
from stages.metrics import classification_metrics, expected_calibration_error
from stages.params import HeadParams, ParamError, load_params
from stages.export import (build_export, build_head, classifier_from_export, onnx_path_for, preprocess_from,
                           read_sample_images, save_export, save_onnx)

logger = logging.getLogger(__name__)

KINDS = ("logreg", "linear_svm", "svm_rbf", "softmax")
LOGREG_TOL = 1e-5  # lbfgs gradient tolerance on the mean loss; 1e-4 lets warm starts stop at once
CALIBRATION_FOLDS = 5
SPLITS = ("train", "val", "test")


class HeadError(FeaturesError):
    """The inputs do not allow training a head; the message names the file or parameter and why."""


# ------------------------------------------------------------------------------------------------ heads
class SoftmaxClassifier(ClassifierMixin, BaseEstimator):
    """Multinomial logistic regression as a torch nn.Linear, trained full batch with L-BFGS.

    Minimizes mean cross-entropy + |W|^2 / (2 C n) (scikit-learn's LogisticRegression objective divided by
    C n) in float32 on CUDA when present; zero-initialized, so the result is deterministic. Features [N, D]
    should be standardized. `coef_` [K, D] and `intercept_` [K] are float64 copies of the trained layer.
    """

    def __init__(self, C: float = 1.0, *, max_iter: int = 2000, tol: float = LOGREG_TOL, seed: int = 0,
                 warm_start: bool = False, device: str = "auto") -> None:
        self.C = C
        self.max_iter = max_iter
        self.tol = tol
        self.seed = seed
        self.warm_start = warm_start
        self.device = device

    def fit(self, X: np.ndarray, y: np.ndarray) -> SoftmaxClassifier:
        self.classes_, targets = np.unique(np.asarray(y), return_inverse=True)
        device = torch.device("cuda" if self.device == "auto" and torch.cuda.is_available() else
                              "cpu" if self.device == "auto" else self.device)
        features = torch.as_tensor(np.asarray(X, dtype=np.float32), device=device)
        target = torch.as_tensor(targets, device=device)
        layer = nn.Linear(features.shape[1], len(self.classes_), device=device)
        with torch.no_grad():
            previous = getattr(self, "coef_", None)
            if self.warm_start and previous is not None and previous.shape == tuple(layer.weight.shape):
                layer.weight.copy_(torch.as_tensor(previous))
                layer.bias.copy_(torch.as_tensor(self.intercept_))
            else:
                layer.weight.zero_()
                layer.bias.zero_()
        penalty = 1.0 / (2.0 * self.C * len(features))
        optimizer = torch.optim.LBFGS(layer.parameters(), lr=1, max_iter=self.max_iter, tolerance_grad=self.tol,
                                      tolerance_change=1e-12, history_size=20, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(layer(features), target) + penalty * layer.weight.square().sum()
            loss.backward()
            return loss

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            optimizer.step(closure)
        self.n_iter_ = int(optimizer.state[layer.weight].get("n_iter", 0))
        if self.n_iter_ >= self.max_iter:
            warnings.warn(f"softmax head: L-BFGS reached max_iter={self.max_iter} before the gradient fell below "
                          f"{self.tol} (C={self.C}); increase head.max_iter", ConvergenceWarning, stacklevel=2)
        self.coef_ = layer.weight.detach().cpu().double().numpy()
        self.intercept_ = layer.bias.detach().cpu().double().numpy()
        return self

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        """Logits [N, K] (float64)."""
        return np.asarray(X, dtype=np.float64) @ self.coef_.T + self.intercept_

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        return np_softmax(self.decision_function(X), axis=1)

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.classes_[self.predict_proba(X).argmax(1)]


def make_head(kind: str, *, C: float, max_iter: int, seed: int, calibration_folds: int = CALIBRATION_FOLDS) -> Any:
    """An unfitted scikit-learn classifier with `predict_proba` for `head.kind` (features standardized)."""
    if kind == "logreg":
        return LogisticRegression(C=C, max_iter=max_iter, tol=LOGREG_TOL, warm_start=True, random_state=seed)
    if kind == "softmax":
        return SoftmaxClassifier(C, max_iter=max_iter, seed=seed, warm_start=True)
    if kind == "linear_svm":
        base: Any = LinearSVC(C=C, max_iter=max_iter, random_state=seed)
    elif kind == "svm_rbf":
        base = SVC(kernel="rbf", C=C, gamma="scale", random_state=seed)
    else:
        raise ParamError(f"head.kind must be one of {', '.join(KINDS)}; got {kind!r}. Edit params.yaml.")
    folds = StratifiedKFold(n_splits=calibration_folds, shuffle=True, random_state=seed)
    return CalibratedClassifierCV(base, method="sigmoid", cv=folds, ensemble=False)


def _fit_recording(estimator: Any, X: np.ndarray, y: np.ndarray) -> list[str]:
    """Fit `estimator` with one BLAS thread; return the ConvergenceWarning messages it raised (other warnings
    pass through).

    One thread because scipy's L-BFGS-B makes many level-1 BLAS calls on the [K*D] parameter vector and a
    threaded OpenBLAS pays a thread hand-off on each: on 2 shared cores the `--bench` sweep took 21 s with
    2 threads and 3.4 s with one (the same models). liblinear, libsvm and torch do not use this BLAS.
    """
    with threadpool_limits(limits=1, user_api="blas"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        estimator.fit(X, y)
    messages = []
    for item in caught:
        if issubclass(item.category, ConvergenceWarning):
            messages.append(" ".join(str(item.message).split()))
        else:
            warnings.warn_explicit(item.message, item.category, item.filename, item.lineno)
    return list(dict.fromkeys(messages))


@dataclass(frozen=True)
class Candidate:
    """One setting the protocol may choose: head kind, feature set (layers concatenated), normalization, C."""
    kind: str
    layers: tuple[str, ...]
    normalization: str
    C: float

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "layers": list(self.layers), "normalization": self.normalization, "C": self.C}


@dataclass(frozen=True)
class Score:
    """A candidate's selection score: accuracy and mean log loss over the selection folds' scored rows."""
    candidate: Candidate
    accuracy: float
    log_loss: float
    seconds: float
    warnings: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {**self.candidate.as_dict(), "accuracy": round(self.accuracy, 6), "log_loss": round(self.log_loss, 6),
                "seconds": round(self.seconds, 4), "converged": not self.warnings}


@dataclass
class Probe:
    """A fitted head: `model` (optional StandardScaler + classifier) maps `normalize_blocks` of the candidate's
    layers to probabilities [N, K]."""
    candidate: Candidate
    model: Pipeline
    train_seconds: float
    warnings: list[str] = field(default_factory=list)
    block_dims: tuple[int, ...] = ()  # feature columns of each layer in candidate.layers

    @property
    def probabilities(self) -> str:
        """How predict_proba is made: "softmax" or the Platt calibration used."""
        return ("softmax" if self.candidate.kind in ("logreg", "softmax") else
                "Platt sigmoid: CalibratedClassifierCV(stratified k-fold, ensemble=False)")

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        """features [N, D]: the candidate's layers concatenated, as stored (normalized here)."""
        blocks = np.split(np.asarray(features), np.cumsum(self.block_dims)[:-1], axis=1)
        return self.model.predict_proba(normalize_blocks(blocks, self.candidate.normalization))


def choose(scores: Sequence[Score]) -> Score:
    """The highest selection accuracy; ties: the lower log loss, then the first candidate (params order:
    simpler feature sets, normalizations and smaller C come first)."""
    return min(enumerate(scores), key=lambda item: (-round(item[1].accuracy, 12), round(item[1].log_loss, 9),
                                                    item[0]))[1]


def calibration_folds(y: np.ndarray, kind: str) -> int:
    """Folds for the SVM kinds' Platt calibration: at most 5, at most the smallest class count."""
    smallest = int(np.bincount(y).min())
    if kind in ("linear_svm", "svm_rbf") and smallest < 2:
        raise HeadError(f"head.kind {kind} calibrates its probabilities by cross-validation and needs at least 2 "
                        f"training images per class; the smallest class has {smallest}. Use head.kind logreg.")
    return max(2, min(CALIBRATION_FOLDS, smallest))


def _pipeline(kind: str, normalization: str, *, C: float, max_iter: int, seed: int, y: np.ndarray) -> Pipeline:
    steps = [StandardScaler()] if "standardize" in normalization else []
    return make_pipeline(*steps, make_head(kind, C=C, max_iter=max_iter, seed=seed,
                                           calibration_folds=calibration_folds(y, kind)))


def sweep_C(x_fit: np.ndarray, y_fit: np.ndarray, x_score: np.ndarray, y_score: np.ndarray, *, kind: str,
            normalization: str, Cs: Sequence[float], max_iter: int, seed: int, n_classes: int
            ) -> list[tuple[float, float, float, list[str]]]:
    """Fit every C (ascending; logreg and softmax warm-start from the previous C) on x_fit [M, D] and score
    x_score [S, D]: [(C, correct count, summed log loss, convergence warnings)]. x_* already normalized."""
    labels = np.arange(n_classes)
    results, pipeline = [], None
    for C in sorted(set(float(c) for c in Cs)):
        if pipeline is None or not getattr(pipeline[-1], "warm_start", False):
            pipeline = _pipeline(kind, normalization, C=C, max_iter=max_iter, seed=seed, y=y_fit)
        else:
            pipeline[-1].set_params(C=C)
        messages = _fit_recording(pipeline, x_fit, y_fit)
        proba = pipeline.predict_proba(x_score)
        results.append((C, float(np.sum(proba.argmax(1) == y_score)),
                        float(log_loss(y_score, proba, labels=labels, normalize=False)), messages))
    return results


def select(dataset: Dataset, rows: np.ndarray, folds: Sequence[tuple[np.ndarray, np.ndarray]], *,
           kinds: Sequence[str], feature_sets: Sequence[tuple[str, ...]], normalizations: Sequence[str],
           Cs: Sequence[float], max_iter: int, seed: int, n_classes: int) -> list[Score]:
    """Score every candidate on `folds` (index pairs into `rows`, the selection images): fit on the fold's fit
    images (plus their augmented / view rows), score its other images. The held-out split never enters."""
    totals: dict[Candidate, list[float]] = {}
    notes: dict[Candidate, list[str]] = {}
    scored = 0
    for fit, score in folds:
        fit_rows, score_rows = rows[fit], rows[score]
        scored += len(score_rows)
        for kind in kinds:
            for layers in feature_sets:
                for normalization in normalizations:
                    tick = time.perf_counter()
                    x_fit, y_fit = dataset.fit_set(layers, normalization, fit_rows)
                    x_score = dataset.eval_set(layers, normalization, score_rows)
                    sweep = sweep_C(x_fit, y_fit, x_score, dataset.labels[score_rows], kind=kind,
                                    normalization=normalization, Cs=Cs, max_iter=max_iter, seed=seed,
                                    n_classes=n_classes)
                    per_c = (time.perf_counter() - tick) / len(sweep)
                    for C, correct, loss, messages in sweep:
                        key = Candidate(kind, tuple(layers), normalization, C)
                        total = totals.setdefault(key, [0.0, 0.0, 0.0])
                        total[0] += correct
                        total[1] += loss
                        total[2] += per_c
                        notes.setdefault(key, []).extend(messages)
    return [Score(candidate=key, accuracy=t[0] / scored, log_loss=t[1] / scored, seconds=t[2],
                  warnings=tuple(dict.fromkeys(notes[key]))) for key, t in totals.items()]


def fit_candidate(dataset: Dataset, rows: np.ndarray, candidate: Candidate, *, max_iter: int, seed: int) -> Probe:
    """Refit `candidate` on the images `rows` (plus their augmented / view rows)."""
    tick = time.perf_counter()
    x_fit, y_fit = dataset.fit_set(candidate.layers, candidate.normalization, rows)
    model = _pipeline(candidate.kind, candidate.normalization, C=candidate.C, max_iter=max_iter, seed=seed, y=y_fit)
    messages = _fit_recording(model, x_fit, y_fit)
    for message in messages:
        logger.warning("%s refit: %s", candidate, message)
    return Probe(candidate=candidate, model=model, train_seconds=time.perf_counter() - tick,
                 warnings=[f"refit {candidate.as_dict()}: {m}" for m in messages],
                 block_dims=tuple(dataset.images[layer].shape[1] for layer in candidate.layers))


# ------------------------------------------------------------------------------------------------ metrics
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


# ------------------------------------------------------------------------------------------------ export
def _fold_scaler(weight: np.ndarray, bias: np.ndarray,
                 scaler: StandardScaler | None) -> tuple[np.ndarray, np.ndarray]:
    """(W, b) acting on standardized features -> (W', b') acting on the features before the scaler [.., D]."""
    if scaler is None:
        return weight, bias
    folded = weight / scaler.scale_
    return folded, bias - folded @ scaler.mean_


def export_head(probe: Probe) -> dict[str, Any]:
    """The head as float64 tensors for classifier.pt (see stages/export.py for the format)."""
    steps, estimator = probe.model[:-1], probe.model[-1]
    scaler = steps[0] if len(steps) else None
    candidate = probe.candidate
    spec: dict[str, Any] = {"kind": candidate.kind, "C": candidate.C, "normalization": candidate.normalization}
    if "l2" in candidate.normalization:
        spec["l2_blocks"] = [int(d) for d in probe.block_dims]
    if candidate.kind in ("logreg", "softmax"):
        weight, bias = estimator.coef_, np.atleast_1d(estimator.intercept_)
        if weight.shape[0] == 1:  # binary logreg: p1 = sigmoid(z) = softmax([0, z])[1]
            weight, bias = np.vstack([np.zeros_like(weight), weight]), np.concatenate([[0.0], bias])
        weight, bias = _fold_scaler(weight, bias, scaler)
        spec.update(type="linear", output="softmax", weight=torch.from_numpy(weight), bias=torch.from_numpy(bias))
        return spec
    calibrated = estimator.calibrated_classifiers_[0]
    svm = calibrated.estimator
    spec.update(output="platt", calibration="sigmoid (CalibratedClassifierCV, ensemble=False)",
                platt_a=torch.tensor([c.a_ for c in calibrated.calibrators], dtype=torch.float64),
                platt_b=torch.tensor([c.b_ for c in calibrated.calibrators], dtype=torch.float64))
    if candidate.kind == "linear_svm":
        weight, bias = _fold_scaler(svm.coef_, np.atleast_1d(svm.intercept_), scaler)
        spec.update(type="linear", weight=torch.from_numpy(weight), bias=torch.from_numpy(bias))
        return spec
    n_classes = len(svm.classes_)
    starts = np.concatenate([[0], np.cumsum(svm.n_support_)])
    pairs = [(i, j) for i in range(n_classes) for j in range(i + 1, n_classes)]
    dual = np.zeros((len(svm.support_vectors_), len(pairs)))
    if n_classes == 2:  # scikit-learn's public binary coefficients already score class 1
        dual[:, 0] = svm.dual_coef_[0]
    else:  # libsvm layout: pair (i, j) uses dual_coef_[j-1] on class i's vectors, dual_coef_[i] on class j's
        for p, (i, j) in enumerate(pairs):
            dual[starts[i]:starts[i + 1], p] = svm.dual_coef_[j - 1, starts[i]:starts[i + 1]]
            dual[starts[j]:starts[j + 1], p] = svm.dual_coef_[i, starts[j]:starts[j + 1]]
    dim = svm.support_vectors_.shape[1]
    mean = scaler.mean_ if scaler is not None else np.zeros(dim)
    scale = scaler.scale_ if scaler is not None else np.ones(dim)
    spec.update(type="rbf_svm", mean=torch.from_numpy(mean.astype(np.float64)),
                scale=torch.from_numpy(scale.astype(np.float64)),
                support_vectors=torch.from_numpy(svm.support_vectors_.astype(np.float64)),
                dual_coef=torch.from_numpy(dual), intercept=torch.from_numpy(svm.intercept_.astype(np.float64)),
                gamma=float(svm._gamma), n_classes=n_classes)
    return spec


def verify_export(head_spec: dict[str, Any], probe: Probe, features: np.ndarray) -> float:
    """Check that the exported head reproduces `probe` on features [N, D]: same predictions wherever the top
    two probabilities differ by more than 1e-9, probabilities within 1e-6. Returns the largest difference."""
    expected = probe.predict_proba(features)
    with torch.no_grad():
        got = build_head(head_spec)(torch.from_numpy(np.asarray(features, dtype=np.float64))).numpy()
    top2 = np.sort(expected, axis=1)[:, -2:] if expected.shape[1] > 1 else np.zeros((len(expected), 2))
    decided = (top2[:, 1] - top2[:, 0]) > 1e-9
    differ = int(np.sum((got.argmax(1) != expected.argmax(1)) & decided))
    largest = float(np.abs(got - expected).max()) if len(expected) else 0.0
    if differ or largest > 1e-6:
        raise HeadError(f"the exported {probe.candidate.kind} head disagrees with the trained one on {differ} images "
                        f"(largest probability difference {largest:.3g}); this is a bug in stages/head.py")
    return largest


def check_feature_dim(export: dict[str, Any], dim: int, features_path: Path) -> None:
    """Raise HeadError unless the exported backbone's layer gives `dim` features: one forward pass of a blank
    image [1, 3, S, S] through the classifier predict would rebuild (features that were cut or padded columnwise
    would otherwise train a head the exported backbone cannot feed)."""
    model = classifier_from_export(export)
    size = model.preprocess.input_size
    with torch.inference_mode():
        produced = int(model.embed(torch.zeros(1, 3, size, size)).shape[1])
    if produced != dim:
        raise HeadError(f"{features_path}: features/{'+'.join(model.layers)} have {dim} columns but layer(s) "
                        f"{'+'.join(model.layers)} of "
                        f"{model.name} gives {produced}; the file is damaged or was not written by the extract "
                        f"stage. Delete it and re-run `dvc repro extract`.")


# ------------------------------------------------------------------------------------------------ outputs
def write_errors_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """Misclassified images: path,true,predicted,prob sorted by path (prob: probability of the prediction)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=("path", "true", "predicted", "prob"), lineterminator="\n")
    writer.writeheader()
    writer.writerows(sorted(rows, key=lambda r: r["path"]))
    write_text(path, buffer.getvalue())


def _save_png(figure: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})


def write_plots(plots_dir: Path, *, y_true: np.ndarray, proba: np.ndarray, classes: Sequence[str],
                ece_bins: int, title: str, split: str = "val") -> None:
    """Held-out plots for DVC (confusion.json, calibration.json, per_class.json) and as PNGs (matplotlib Agg)."""
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
    axes.set(xlim=(0, 1), ylim=(0, 1.1), xlabel="confidence (top-class probability); numbers: images per bin",
             ylabel="accuracy",
             title=f"{title}: held-out {split} calibration, ECE {ece:.3f}")
    axes.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), fontsize="x-small", frameon=False)
    _save_png(figure, plots_dir / "calibration.png")
    plt.close(figure)

    figure, axes = plt.subplots(figsize=(6, max(2.0, 0.35 * len(classes) + 1)))
    axes.barh([p["class"] for p in per_class], [p["accuracy"] for p in per_class], color="tab:blue")
    axes.set(xlim=(0, 1), xlabel="accuracy (recall)", title=f"{title}: held-out {split} accuracy per class")
    axes.invert_yaxis()
    _save_png(figure, plots_dir / "per_class.png")
    plt.close(figure)


# ------------------------------------------------------------------------------------------------ stage
@dataclass(frozen=True)
class Dataset:
    """The features file arranged for the protocol: one row per manifest image (`images`, TTA views averaged)
    plus extra training rows (`extra`, each from image `extra_source`): the TTA views themselves with
    tta_mode "rows", and the augmented training views. A fit on images S uses S's extra rows too (with
    tta_mode "rows" instead of S's averaged rows); evaluation uses the images' own rows."""
    images: dict[str, np.ndarray]  # layer -> [N, D]
    labels: np.ndarray  # [N]
    split: np.ndarray  # [N]
    paths: list[str]  # [N]
    extra: dict[str, np.ndarray]  # layer -> [M, D]
    extra_source: np.ndarray  # [M] image index
    views_replace_images: bool = False  # tta_mode "rows": fit on the views instead of their mean

    @classmethod
    def from_arrays(cls, images: dict[str, np.ndarray], labels: np.ndarray, split: Sequence[str]) -> Dataset:
        """A Dataset of in-memory features {layer: [N, D]} without extra rows (tests, benchmarks)."""
        n = len(labels)
        return cls(images=dict(images), labels=np.asarray(labels, dtype=np.int64), split=np.asarray(split),
                   paths=[str(i) for i in range(n)], extra={k: v[:0] for k, v in images.items()},
                   extra_source=np.zeros(0, dtype=np.int64))

    def rows(self, split: str) -> np.ndarray:
        return np.flatnonzero(self.split == split)

    def eval_set(self, layers: Sequence[str], normalization: str, index: np.ndarray) -> np.ndarray:
        """Normalized features [len(index), D] of images `index`."""
        return normalize_blocks([self.images[layer][index] for layer in layers], normalization)

    def fit_set(self, layers: Sequence[str], normalization: str, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(normalized features [R, D], labels [R]) to fit on images `index`: their rows and extra rows."""
        extra = np.flatnonzero(np.isin(self.extra_source, index))
        own = np.empty(0, dtype=np.int64) if self.views_replace_images and len(extra) else np.asarray(index)
        blocks = [np.concatenate([self.images[layer][own], self.extra[layer][extra]]) for layer in layers]
        labels = np.concatenate([self.labels[own], self.labels[self.extra_source[extra]]])
        return normalize_blocks(blocks, normalization), labels


def arrange(data: FeatureFile) -> Dataset:
    views = views_per_image(data.attrs)
    n = len(data.paths) // views
    images = {layer: (x if views == 1 else x.reshape(n, views, x.shape[1]).mean(1, dtype=np.float32))
              for layer, x in data.features.items()}
    extra = {layer: data.augmented.get(layer, np.zeros((0, x.shape[1]), x.dtype)) for layer, x in images.items()}
    source = data.augmented_source
    if views > 1:
        extra = {layer: np.concatenate([x, extra[layer]]) for layer, x in data.features.items()}
        source = np.concatenate([np.repeat(np.arange(n), views), source])
    return Dataset(images=images, labels=data.labels[::views], split=data.split[::views],
                   paths=data.paths[::views], extra=extra, extra_source=source.astype(np.int64),
                   views_replace_images=views > 1)


def resolve_feature_sets(feature_sets: Sequence[Sequence[str]], attrs: dict[str, Any],
                         stored: Sequence[str], features_path: Path) -> list[tuple[str, ...]]:
    """head.feature_sets with aliases (`mid`) replaced by the stored layer names (attrs layer_aliases);
    HeadError naming the layer when a set asks for one the file does not hold; duplicates dropped."""
    aliases = attrs.get("layer_aliases") or {}
    out: list[tuple[str, ...]] = []
    for layers in feature_sets:
        names = tuple(dict.fromkeys(aliases.get(layer, layer) for layer in layers))
        absent = [layer for layer in names if layer not in stored]
        if absent:
            raise HeadError(f"head.feature_sets: layer(s) {absent} of {list(layers)} not in {features_path}, which "
                            f"holds {list(stored)} (aliases {aliases}); add them to extract.layers or edit "
                            f"head.feature_sets (params.yaml)")
        if names not in out:
            out.append(names)
    return out


def load_checked_features(*, backbone_name: str, features_path: Path, manifest_path: Path,
                          weights_path: Path) -> tuple[FeatureFile, dict[str, str]]:
    """Read every stored layer and check provenance (stages.features.read_checked); also the input hashes."""
    return read_checked(features_path, backbone=backbone_name, manifest_path=manifest_path, weights_path=weights_path)


def selection_folds(dataset: Dataset, rows: np.ndarray, params: HeadParams
                    ) -> tuple[list[tuple[np.ndarray, np.ndarray]], dict[str, Any]]:
    """Index pairs into `rows` to score candidates on, and how they were made (metrics.json "selection")."""
    if params.selection == "val":
        split = dataset.split[rows]
        if not (np.any(split == "train") and np.any(split == "val")):
            raise HeadError("head.selection: val needs train, val and test images (choose on val, report test); "
                            f"the selection rows hold {sorted(set(split.tolist()))}. Use head.selection: cv.")
        return ([(np.flatnonzero(split == "train"), np.flatnonzero(split == "val"))],
                {"method": "val", "fit": "train", "scored": "val"})
    try:
        folds = stratified_folds(dataset.labels[rows], folds=params.folds, seed=params.seed)
    except ProtocolError as exc:
        raise HeadError(str(exc)) from None
    return folds, {"method": "cv", "folds": len(folds), "stratified": True, "seed": params.seed}


def knn_probe(dataset: Dataset, rows: np.ndarray, heldout: np.ndarray, folds: Sequence[tuple[np.ndarray, np.ndarray]],
              *, feature_sets: Sequence[tuple[str, ...]], ks: Sequence[int], n_classes: int
              ) -> tuple[dict[str, Any], np.ndarray]:
    """Cosine k-NN (each layer L2-normalized): the feature set and k chosen on `folds` (its own choice, not the
    linear probe's), then every selection image votes for the held-out ones. Returns ({"k", "layers",
    "selection_accuracy", "sweep"}, held-out probabilities [H, K])."""
    sweep = []
    scored = sum(len(s) for _, s in folds)
    for layers in feature_sets:
        for k in sorted(set(ks)):
            correct = sum(np.sum(knn_proba(dataset.eval_set(layers, "l2", rows[fit]), dataset.labels[rows[fit]],
                                           dataset.eval_set(layers, "l2", rows[score]), k=k,
                                           n_classes=n_classes).argmax(1) == dataset.labels[rows[score]])
                          for fit, score in folds)
            sweep.append({"layers": list(layers), "k": k, "accuracy": float(correct / scored)})
    best = max(enumerate(sweep), key=lambda item: (round(item[1]["accuracy"], 12), -item[0]))[1]
    layers = best["layers"]
    proba = knn_proba(dataset.eval_set(layers, "l2", rows), dataset.labels[rows],
                      dataset.eval_set(layers, "l2", heldout), k=best["k"], n_classes=n_classes)
    return {"k": best["k"], "layers": layers, "selection_accuracy": best["accuracy"], "sweep": sweep}, proba


def few_shot_curve(dataset: Dataset, rows: np.ndarray, heldout: np.ndarray, candidate: Candidate, *,
                   shots: Sequence[int], draws: int, seed: int, max_iter: int) -> list[dict[str, Any]]:
    """Held-out accuracy of logreg on `shots` images per class drawn from the selection images (`draws` seeded
    draws each; the candidate's layers, normalization and C, which the selection images chose)."""
    x_heldout, y_heldout = dataset.eval_set(candidate.layers, candidate.normalization, heldout), dataset.labels[heldout]
    curve = []
    for k in sorted(set(shots)):
        accuracies = []
        for d in range(draws):
            drawn = rows[draw_few_shot(dataset.labels[rows], shots=k, seed=seed + d)]
            model = _pipeline("logreg", candidate.normalization, C=candidate.C, max_iter=max_iter, seed=seed,
                              y=dataset.labels[drawn])
            _fit_recording(model, dataset.eval_set(candidate.layers, candidate.normalization, drawn),
                           dataset.labels[drawn])
            accuracies.append(float(np.mean(model.predict(x_heldout) == y_heldout)))
        curve.append({"shots": k, "draws": draws, **spread(accuracies)})
    return curve


def backbone_export(backbone: Any, weights_path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """The backbone's verified weights with its ImageNet classifier replaced by nn.Identity (as
    stages.backbones.FeatureModel does): (state dict, dotted path of the replaced classifier)."""
    model = build_model(backbone)
    load_weights(model, backbone, weights_path)
    classifier = classifier_path(backbone, model)
    replace_module(model, classifier, nn.Identity())
    return dict(model.state_dict()), classifier


def drop_audited_heldout(dataset: Dataset, audit_path: Path | None) -> tuple[Dataset, dict[str, Any] | None]:
    """The audit stage's decision (reports/<bb>/audit/heldout.json, stages/audit.py: {"policy", "heldout_split",
    "dropped_from_heldout": [paths]}) applied to `dataset`: with policy drop_from_heldout, the held-out images it
    lists (near-duplicates of images outside the held-out split) are removed, with their extra rows, so that
    they are never evaluated; no other row changes. Returns (dataset, {"policy", "dropped_from_heldout"}), or
    (dataset, None) without an audit file."""
    if audit_path is None:
        return dataset, None
    try:
        decision = json.loads(Path(audit_path).read_text(encoding="utf-8"))
        policy, listed = str(decision["policy"]), [str(p) for p in decision["dropped_from_heldout"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise HeadError(f"--audit {audit_path}: not the audit stage's held-out decision ({exc!r}); run "
                        f"`dvc repro audit`") from None
    if policy != "drop_from_heldout" or not listed:
        return dataset, {"policy": policy, "dropped_from_heldout": []}
    heldout = heldout_split(dataset.split)
    drop = (dataset.split == heldout) & np.isin(np.asarray(dataset.paths, dtype=object), listed)
    if drop.sum() == np.sum(dataset.split == heldout):
        raise HeadError(f"--audit {audit_path} drops every {heldout} image; nothing would be evaluated. Set "
                        f"audit.cross_split: report (params.yaml)")
    keep = np.flatnonzero(~drop)
    new_index = np.cumsum(~drop) - 1
    extra = np.flatnonzero(~drop[dataset.extra_source]) if len(dataset.extra_source) else dataset.extra_source
    dropped = sorted(p for p, d in zip(dataset.paths, drop) if d)
    return Dataset(
        images={k: v[keep] for k, v in dataset.images.items()}, labels=dataset.labels[keep],
        split=dataset.split[keep], paths=[dataset.paths[i] for i in keep],
        extra={k: v[extra] for k, v in dataset.extra.items()},
        extra_source=new_index[dataset.extra_source[extra]].astype(np.int64),
        views_replace_images=dataset.views_replace_images), {"policy": policy, "dropped_from_heldout": dropped}


def evaluate_protocol(dataset: Dataset, classes: Sequence[str], params: HeadParams,
                      feature_sets: Sequence[tuple[str, ...]]) -> dict[str, Any]:
    """The whole protocol on a Dataset: choose on the selection rows, refit there, evaluate the held-out split
    once. Returns {"heldout_split", "probe" (Probe), "scores", "selection", "feature_sets" (per set: its best
    candidate refit + held-out metrics), "knn", "few_shot", "predictions" {row: held-out probabilities}}."""
    try:
        heldout_name = heldout_split(dataset.split)
    except ProtocolError as exc:
        raise HeadError(str(exc)) from None
    rows, heldout = selection_rows(dataset.split, heldout_name), dataset.rows(heldout_name)
    absent = sorted(set(range(len(classes))) - set(dataset.labels[rows].tolist()))
    if absent:
        raise HeadError(f"classes {[classes[c] for c in absent]} have no images outside the held-out {heldout_name} "
                        f"split; every class needs training images")
    folds, selection = selection_folds(dataset, rows, params)
    n_classes = len(classes)
    logger.info("selection: %s on %d images (%s), held out: %s (%d images); %d feature set(s) x %d normalization(s) "
                "x %d kind(s) x %d C", selection["method"], len(rows), ", ".join(sorted(set(dataset.split[rows]))),
                heldout_name, len(heldout), len(feature_sets), len(params.normalization), len(params.kind),
                len(params.C))
    scores = select(dataset, rows, folds, kinds=params.kind, feature_sets=feature_sets,
                    normalizations=params.normalization, Cs=params.C, max_iter=params.max_iter, seed=params.seed,
                    n_classes=n_classes)
    best = choose(scores)
    y_heldout = dataset.labels[heldout]
    per_set, predictions, probes = [], {}, {}
    for layers in feature_sets:
        own = choose([s for s in scores if s.candidate.layers == layers])
        probe = fit_candidate(dataset, rows, own.candidate, max_iter=params.max_iter, seed=params.seed)
        proba = probe.predict_proba(dataset.eval_set(layers, "none", heldout))
        probes[layers] = probe
        predictions["layers=" + "+".join(layers)] = proba
        per_set.append({"layers": list(layers), **own.candidate.as_dict(), "selection_accuracy": own.accuracy,
                        "heldout": classification_metrics(proba, y_heldout, classes, ece_bins=params.ece_bins)})
    probe = probes[best.candidate.layers]
    predictions["probe"] = predictions["layers=" + "+".join(best.candidate.layers)]
    knn, knn_prob = knn_probe(dataset, rows, heldout, folds, feature_sets=feature_sets, ks=params.knn_k,
                              n_classes=n_classes)
    knn["heldout"] = classification_metrics(knn_prob, y_heldout, classes, ece_bins=params.ece_bins)
    predictions["knn"] = knn_prob
    few_shot = few_shot_curve(dataset, rows, heldout, best.candidate, shots=params.few_shot,
                              draws=params.few_shot_draws, seed=params.seed, max_iter=params.max_iter)
    few_shot.append({"shots": "all", "draws": 1, **spread([float(np.mean(predictions["probe"].argmax(1) == y_heldout))])})
    selection.update(split="+".join(sorted(set(dataset.split[rows].tolist()))), n=int(len(rows)),
                     accuracy=best.accuracy, log_loss=best.log_loss, chosen=best.candidate.as_dict(),
                     candidates=[s.as_dict() for s in scores])
    return {"heldout_split": heldout_name, "heldout_rows": heldout, "probe": probe, "probes": probes, "best": best,
            "scores": scores,
            "selection": selection, "feature_sets": per_set, "knn": knn, "few_shot": few_shot,
            "predictions": predictions}


def run_head(*, backbone_name: str, features_path: Path, manifest_path: Path, weights_path: Path, raw_dir: Path,
             model_path: Path, reports_dir: Path, params: HeadParams,
             custom: dict[str, Any] | None = None, audit_path: Path | None = None) -> dict[str, Any]:
    """The whole stage: read and check inputs, run the protocol, write reports, plots and the export.
    Returns metrics.json's content."""
    try:
        backbone = get_backbone(backbone_name, custom)
    except KeyError as exc:
        raise HeadError(f"--backbone: {exc.args[0]}") from None
    data, hashes = load_checked_features(backbone_name=backbone_name, features_path=features_path,
                                         manifest_path=manifest_path, weights_path=weights_path)
    classes = list(data.attrs["classes"])
    dataset, audit = drop_audited_heldout(arrange(data), audit_path)  # --audit: the audit stage's decision
    feature_sets = resolve_feature_sets(params.feature_sets, data.attrs, list(dataset.images), features_path)
    result = evaluate_protocol(dataset, classes, params, feature_sets)
    probe, heldout, best = result["probe"], result["heldout_rows"], result["best"]
    layers = list(best.candidate.layers)
    proba = result["predictions"]["probe"]
    y_heldout = dataset.labels[heldout]

    state, classifier = backbone_export(backbone, weights_path)
    provenance = {  # the features file and what it was computed from
        "path": str(features_path), "sha256": sha256_file(features_path),
        "weights": str(weights_path), "manifest": str(manifest_path), **hashes,
        **{key: data.attrs.get(key) for key in ("storage_dtype", "precision", "preprocess", "tta", "tta_mode")},
        "n_images": len(dataset.labels), "augmented_rows": int(len(data.augmented_source))}

    def export_of(chosen: Probe) -> dict[str, Any]:
        """classifier.pt's dict for a fitted probe, checked against the probe on the held-out features."""
        chosen_layers = list(chosen.candidate.layers)
        chosen_features = dataset.eval_set(chosen_layers, "none", heldout)
        head_spec = export_head(chosen)
        verify_export(head_spec, chosen, chosen_features)
        export = build_export(
            backbone_name=backbone_name, backbone_state=state, layers=chosen_layers,
            backbone_spec={"arch": backbone.arch, "classifier": classifier,
                           "build_kwargs": dict(backbone.build_kwargs), "preprocess": data.attrs.get("preprocess"),
                           "tta": list(data.attrs.get("tta") or ["none"]),
                           "precision": data.attrs.get("precision") or "float32"},
            classes=classes, head_spec=head_spec,
            provenance={"features": provenance, "chosen": chosen.candidate.as_dict(),
                        "selection": result["selection"]["method"], "heldout_split": result["heldout_split"],
                        "versions": {"torch": str(torch.__version__), "sklearn": module_version("sklearn")}})
        check_feature_dim(export, int(chosen_features.shape[1]), features_path)
        return export

    export = export_of(probe)
    save_export(model_path, export)
    save_onnx(onnx_path_for(model_path), export, images=read_sample_images(  # checked on held-out images
        raw_dir, [dataset.paths[i] for i in heldout], preprocess_from(export["backbone"]["preprocess"])))
    # The fine-tune starts from a probe on the pooled embedding alone (its network ends in the pooled layer):
    # the best pool-only candidate of the same selection, or the chosen probe when pool alone was not offered.
    save_export(model_path.parent / "probe_pool.pt", export_of(result["probes"].get(("pool",), probe)))

    warnings_ = list(dict.fromkeys([m for s in result["scores"] for m in s.warnings] + probe.warnings))
    metrics = {
        "backbone": backbone_name, "head": best.candidate.kind, "layers": layers,
        "normalization": best.candidate.normalization, "C": best.candidate.C,
        "heldout_split": result["heldout_split"],
        "heldout": next(s["heldout"] for s in result["feature_sets"] if s["layers"] == layers),  # the chosen set's
        "selection": result["selection"], "feature_sets": result["feature_sets"], "knn": result["knn"],
        "few_shot": result["few_shot"],
        "train_seconds": round(probe.train_seconds, 4), "feature_dim": int(sum(probe.block_dims)),
        "n_selection": int(result["selection"]["n"]),
        "n_heldout": int(len(heldout)), "converged": not warnings_, "warnings": warnings_,
        "probabilities": probe.probabilities, "features": provenance}
    if audit is not None:
        metrics["audit"] = {**audit, "n_dropped_from_heldout": len(audit["dropped_from_heldout"])}
    write_json(reports_dir / "metrics.json", metrics)
    counts = {str(split): dict(Counter(classes[label] for label in dataset.labels[dataset.split == split]))
              for split in np.unique(dataset.split)}
    write_text(model_path.parent / "MODEL_CARD.md", model_card(
        backbone_name=backbone_name, metrics=metrics, classes=classes, split_counts=counts,
        preprocess=data.attrs.get("preprocess"), weights_path=weights_path, model_path=model_path))
    write_predictions(reports_dir / "predictions.json", Predictions(
        split=result["heldout_split"], classes=classes, paths=[dataset.paths[i] for i in heldout], labels=y_heldout,
        rows={name: predictions_from_proba(p) for name, p in result["predictions"].items()}))
    predicted = proba.argmax(1)
    write_errors_csv(reports_dir / "errors.csv", [
        {"path": dataset.paths[i], "true": classes[t], "predicted": classes[p], "prob": f"{proba[n, p]:.6f}"}
        for n, (i, t, p) in enumerate(zip(heldout, y_heldout, predicted)) if t != p])
    write_plots(reports_dir / "plots", y_true=y_heldout, proba=proba, classes=classes, ece_bins=params.ece_bins,
                title=f"{backbone_name} {best.candidate.kind}", split=result["heldout_split"])
    return metrics


def model_card(*, backbone_name: str, metrics: dict[str, Any], classes: Sequence[str], split_counts: dict[str, dict[str, int]],
               preprocess: dict[str, Any] | None, weights_path: Path, model_path: Path) -> str:
    """MODEL_CARD.md beside classifier.pt: data, held-out metrics with intervals, provenance, use and limits."""
    heldout, chosen, selection = metrics["heldout"], metrics["selection"]["chosen"], metrics["selection"]
    split = metrics["heldout_split"]
    rows = "\n".join(f"| {escape_md(c)} | " + " | ".join(str(split_counts.get(s, {}).get(c, 0)) for s in SPLITS) +
                     f" | {heldout['per_class'][c]['recall']:.3f} |" for c in classes)
    pre = preprocess or {}
    return f"""# Model card: {backbone_name} + {chosen['kind']} head

`{model_path}`: a frozen ImageNet-pretrained `{backbone_name}` backbone with a {chosen['kind']} head trained on
its cached features ({' + '.join(chosen['layers'])}, {chosen['normalization']}, C = {chosen['C']:g}).

## Held-out performance ({split} split, {heldout['n']} images, never used to choose anything)

| metric | value |
| --- | ---: |
| accuracy [95% Wilson interval] | {heldout['accuracy']:.4f} [{heldout['accuracy_ci_low']:.4f}, {heldout['accuracy_ci_high']:.4f}] |
| mean per-class accuracy | {heldout['mean_class_accuracy']:.4f} |
| macro F1 | {heldout['macro_f1']:.4f} |
| log loss | {heldout['log_loss']:.4f} |
| expected calibration error | {heldout['ece']:.4f} |

Selection: {selection['method']} on the {selection['split']} images ({selection['n']}); selection accuracy
{selection['accuracy']:.4f} over {len(selection['candidates'])} candidates. The chosen setting was then refit on those images.

## Training data

| class | {' | '.join(SPLITS)} | held-out recall |
| --- | {' | '.join('---:' for _ in SPLITS)} | ---: |
{rows}

## Provenance

- backbone weights: `{weights_path}`, sha256 `{metrics['features']['weights_sha256']}`
- features: `{metrics['features']['path']}`, sha256 `{metrics['features']['sha256']}` (precision {metrics['features'].get('precision')}, TTA {metrics['features'].get('tta')})
- manifest sha256 `{metrics['features']['manifest_sha256']}`
- preprocessing: resize short side to {pre.get('resize')} ({pre.get('interpolation')}), centre crop {pre.get('input_size')}, mean {pre.get('mean')}, std {pre.get('std')}

## Intended use and limits

For images like the training images: the same classes, camera or microscope, framing and resolution. It always
answers with one of the {len(classes)} classes above, also for images of none of them (no rejection option); check
the calibration before trusting its probabilities as confidences. The interval above is for images drawn like the
held-out split; on another population (other site, device, time) accuracy can be lower. {len(heldout.get('per_class', {}))}
classes were evaluated on {heldout['n']} images: small classes have wide per-class uncertainty.

## How to run it

```bash
python -m stages.predict path/to/image_or_folder --model {model_path} --topk 3
python -m stages.predict path/to/image_or_folder --model {model_path} --engine onnxruntime  # the .onnx beside it
```
"""


def escape_md(text: str) -> str:
    """A class name safe inside a Markdown table cell."""
    return str(text).replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


# ------------------------------------------------------------------------------------------------ benchmark
def run_benchmark(*, n: int = 10_000, dim: int = 2048, n_classes: int = 10, Cs: Sequence[float] = (
        0.001, 0.01, 0.1, 1.0, 10.0), folds: int = 5, seed: int = 0, max_iter: int = 2000) -> dict[str, Any]:
    """Time the protocol's selection on synthetic float32 features [n, dim]: logreg, standardized, `folds`-fold
    stratified CV over `Cs` (warm-started), then the refit of the chosen C."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_classes, n)
    centres = rng.normal(0.0, 0.05, (n_classes, dim)).astype(np.float32)
    x = centres[y] + rng.normal(0.0, 1.0, (n, dim)).astype(np.float32)
    dataset = Dataset.from_arrays({"pool": x}, y, np.full(n, "train"))
    rows = np.arange(n)
    start, cpu = time.perf_counter(), time.process_time()
    scores = select(dataset, rows, stratified_folds(y, folds=folds, seed=seed), kinds=["logreg"],
                    feature_sets=[("pool",)], normalizations=["standardize"], Cs=Cs, max_iter=max_iter, seed=seed,
                    n_classes=n_classes)
    best = choose(scores)
    fit_candidate(dataset, rows, best.candidate, max_iter=max_iter, seed=seed)
    seconds = time.perf_counter() - start
    return {"seconds": round(seconds, 3), "cpu_seconds": round(time.process_time() - cpu, 3),
            "load_average_1min": round(os.getloadavg()[0], 2), "features": [n, dim], "classes": n_classes,
            "folds": folds, "C": best.candidate.C, "cv_accuracy": best.accuracy,
            "sweep": [s.as_dict() for s in scores], "torch_threads": torch.get_num_threads()}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m stages.head", description=__doc__.split("\n")[0])
    parser.add_argument("--backbone")
    parser.add_argument("--features", type=Path)
    parser.add_argument("--manifest", type=Path)
    parser.add_argument("--weights", type=Path)
    parser.add_argument("--raw", type=Path, help="data/raw: held-out images to check classifier.onnx on")
    parser.add_argument("--model", type=Path)
    parser.add_argument("--reports", type=Path)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--audit", type=Path, default=None,
                        help="reports/<bb>/audit/heldout.json: with audit.cross_split drop_from_heldout, the held-out "
                             "images it lists are left out of the held-out evaluation")
    parser.add_argument("--bench", action="store_true",
                        help="time 5-fold CV over 5 values of C (logreg) on 10,000 x 2048 features and exit")
    args = parser.parse_args(argv)
    if not args.bench:
        missing = [f"--{name}" for name in ("backbone", "features", "manifest", "weights", "raw", "model", "reports")
                   if getattr(args, name) is None]
        if missing:
            parser.error(f"the following arguments are required: {', '.join(missing)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    if args.bench:
        result = run_benchmark()
        print(json.dumps(result, indent=2))
        print(f"logreg {result['folds']}-fold CV over {len(result['sweep'])} values of C + refit on 10,000 x 2048: "
              f"{result['seconds']:.2f} s wall, {result['cpu_seconds']:.2f} s CPU (target < 30 s on 2 cores; "
              f"load average {result['load_average_1min']})")
        return 0
    try:
        params = load_params(args.params)
        metrics = run_head(backbone_name=args.backbone, features_path=args.features, manifest_path=args.manifest,
                           weights_path=args.weights, raw_dir=args.raw, model_path=args.model,
                           reports_dir=args.reports, params=params.head, custom=params.weights.custom, audit_path=args.audit)
    except (ParamError, FeaturesError, WeightsError, ValueError, OSError) as exc:
        logger.error("%s", exc)
        return 1
    heldout = metrics["heldout"]
    logger.info("%s: chose %s by %s (selection accuracy %.4f); held-out %s accuracy %.4f [%.4f, %.4f] on %d "
                "images; wrote %s and %s", args.backbone, metrics["selection"]["chosen"], metrics["selection"]["method"],
                metrics["selection"]["accuracy"], metrics["heldout_split"], heldout["accuracy"],
                heldout["accuracy_ci_low"], heldout["accuracy_ci_high"], heldout["n"], args.reports / "metrics.json",
                args.model)
    if metrics["warnings"]:
        logger.warning("%d convergence warning(s), written to metrics.json", len(metrics["warnings"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
