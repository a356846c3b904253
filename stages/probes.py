"""Probes on cached features: the heads the protocol chooses among, how they are fitted, and their export.

    logreg      multinomial logistic regression as a torch nn.Linear (`LinearProbe`): full-batch L-BFGS in
                float32 on CUDA when present, else the CPU; scikit-learn's LogisticRegression objective; warm
                starts along the C sweep. `softmax` names the same probe (older params files).
    linear_svm  sklearn LinearSVC                 } probabilities: CalibratedClassifierCV(method="sigmoid",
    svm_rbf     sklearn SVC(kernel="rbf")         }   stratified k-fold, k <= 5, ensemble=False)

A probe is a Pipeline ([StandardScaler] + classifier) over `stages.evaluation.normalize_blocks` of its candidate's
layers; `export_head` turns a fitted one into classifier.pt's head (stages/export.py), `verify_export` checks it.
Memory: features stay float32 as stored (the scaler keeps float32 and accumulates its statistics over row slices,
ChunkedStandardScaler; no float64 copy of a feature matrix).
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from scipy.special import softmax as np_softmax
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.calibration import CalibratedClassifierCV
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import log_loss
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC, LinearSVC
from threadpoolctl import threadpool_limits
from torch import nn

from stages.evaluation import normalize_blocks
from stages.export import build_head
from stages.params import ParamError


class ProbeError(ValueError):
    """The training rows do not allow this probe; the message names the parameter and what to change."""


KINDS = ("logreg", "linear_svm", "svm_rbf", "softmax")
LOGREG_TOL = 1e-5  # lbfgs gradient tolerance on the mean loss; 1e-4 lets warm starts stop at once
CALIBRATION_FOLDS = 5
LOGIT_BLOCK_ROWS = 8192  # rows per float64 block when computing logits
FIT_CHUNK_ROWS = 65536  # rows per float32 chunk when LinearProbe fits features not stored as a float32 array
STATS_CHUNK_ROWS = 16384  # rows per slice when ChunkedStandardScaler accumulates the mean and variance


class LinearProbe(ClassifierMixin, BaseEstimator):
    """Multinomial logistic regression as a torch nn.Linear, trained full batch with L-BFGS.

    Minimizes mean cross-entropy + |W|^2 / (2 C n) (scikit-learn's LogisticRegression objective divided by
    C n; the bias is not penalized) in float32, on CUDA when present (`device="auto"`), else the CPU's torch
    threads. Zero-initialized, or warm-started from the previous fit when `warm_start` (the C sweep), so the
    result is deterministic. Features X [N, D] float32 (not copied on the CPU), standardized by the caller; any other
    X (float16 as stored, or a lazily read array that slices by rows) is fitted full batch too, its loss and gradient
    summed over FIT_CHUNK_ROWS-row chunks converted to float32 one at a time (memory: one chunk, not a float32 copy).
    `coef_` [K, D] and `intercept_` [K] are float64 copies of the trained layer; `device_` is where it trained.
    On the CPU it fits on one torch thread: each step is two skinny products ([N, D] x [D, K]) bound by memory,
    where a second thread bought little on a quiet 2-core machine and made a C sweep 3-5x slower on a loaded one
    (8,000 x 1,472, 10 classes: 5.7 s on one thread, 18.7 s on two, same run); it also keeps the numbers
    independent of the core count.
    """

    def __init__(self, C: float = 1.0, *, max_iter: int = 2000, tol: float = LOGREG_TOL,
                 warm_start: bool = False, device: str = "auto") -> None:
        self.C = C
        self.max_iter = max_iter
        self.tol = tol
        self.warm_start = warm_start
        self.device = device

    def fit(self, X: np.ndarray, y: np.ndarray) -> LinearProbe:
        self.classes_, targets = np.unique(np.asarray(y), return_inverse=True)
        device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if self.device == "auto"
                              else self.device)
        whole = isinstance(X, np.ndarray) and X.dtype == np.float32  # as_tensor shares it on the CPU: no copy
        chunk_rows = len(X) if whole else FIT_CHUNK_ROWS
        chunks = [(start, min(len(X), start + chunk_rows)) for start in range(0, len(X), max(1, chunk_rows))]
        features = torch.as_tensor(X, device=device) if whole else None
        target = torch.as_tensor(targets, device=device)
        layer = nn.Linear(X.shape[1], len(self.classes_), device=device)
        with torch.no_grad():
            previous = getattr(self, "coef_", None)
            if self.warm_start and previous is not None and previous.shape == tuple(layer.weight.shape):
                layer.weight.copy_(torch.as_tensor(previous))
                layer.bias.copy_(torch.as_tensor(self.intercept_))
            else:
                layer.weight.zero_()
                layer.bias.zero_()
        penalty = 1.0 / (2.0 * self.C * len(X))
        optimizer = torch.optim.LBFGS(layer.parameters(), lr=1, max_iter=self.max_iter, tolerance_grad=self.tol,
                                      tolerance_change=1e-12, history_size=20, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            if features is not None:
                loss = nn.functional.cross_entropy(layer(features), target) + penalty * layer.weight.square().sum()
                loss.backward()
                return loss
            # chunked: the same mean loss and gradient, summed over row chunks converted to float32 one at a time
            total = penalty * layer.weight.square().sum()
            total.backward()
            total = total.detach()
            for start, stop in chunks:
                block = torch.as_tensor(np.asarray(X[start:stop], dtype=np.float32), device=device)
                loss = nn.functional.cross_entropy(layer(block), target[start:stop], reduction="sum") / len(X)
                loss.backward()
                total = total + loss.detach()
            return total

        threads = torch.get_num_threads()
        try:  # one CPU thread: see the class docstring
            if device.type == "cpu":
                torch.set_num_threads(1)
            optimizer.step(closure)
        finally:
            torch.set_num_threads(threads)
        state = optimizer.state[layer.weight]
        self.n_iter_ = int(state.get("n_iter", 0))
        self.device_ = str(device)
        max_eval = optimizer.param_groups[0]["max_eval"]  # torch stops at either limit
        if self.n_iter_ >= self.max_iter or int(state.get("func_evals", 0)) >= max_eval:
            warnings.warn(f"logreg head: L-BFGS reached max_iter={self.max_iter} before the gradient fell below "
                          f"{self.tol} (C={self.C}); increase head.max_iter", ConvergenceWarning, stacklevel=2)
        self.coef_ = layer.weight.detach().cpu().double().numpy()
        self.intercept_ = layer.bias.detach().cpu().double().numpy()
        return self

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        """Logits [N, K] (float64), computed in row blocks so no float64 copy of X is ever whole."""
        X = np.asarray(X)
        out = np.empty((len(X), len(self.intercept_)))
        for start in range(0, len(X), LOGIT_BLOCK_ROWS):
            block = np.asarray(X[start:start + LOGIT_BLOCK_ROWS], dtype=np.float64)
            out[start:start + len(block)] = block @ self.coef_.T + self.intercept_
        return out

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        return np_softmax(self.decision_function(X), axis=1)

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.classes_[self.predict_proba(X).argmax(1)]


class ChunkedStandardScaler(StandardScaler):
    """StandardScaler whose fit accumulates the mean and variance over STATS_CHUNK_ROWS-row slices of X
    (scikit-learn's partial_fit: float64 accumulators, a float64 temporary of one slice only), so X may be any
    array that slices by rows (stages.head_data.FitRows) and is never copied whole in float64. With at most
    STATS_CHUNK_ROWS rows it is StandardScaler.fit exactly; transform is StandardScaler's (float32 stays float32)."""

    def fit(self, X: Any, y: Any = None, sample_weight: Any = None) -> ChunkedStandardScaler:
        self._reset()
        for start in range(0, len(X), STATS_CHUNK_ROWS):
            self.partial_fit(X[start:start + STATS_CHUNK_ROWS])
        return self


def make_head(kind: str, *, C: float, max_iter: int, seed: int, calibration_folds: int = CALIBRATION_FOLDS) -> Any:
    """An unfitted scikit-learn classifier with `predict_proba` for `head.kind` (features standardized)."""
    if kind in ("logreg", "softmax"):
        return LinearProbe(C, max_iter=max_iter, warm_start=True)
    if kind == "linear_svm":
        base: Any = LinearSVC(C=C, max_iter=max_iter, random_state=seed)
    elif kind == "svm_rbf":
        base = SVC(kernel="rbf", C=C, gamma="scale", random_state=seed)
    else:
        raise ParamError(f"head.kind must be one of {', '.join(KINDS)}; got {kind!r}. Edit params.yaml.")
    folds = StratifiedKFold(n_splits=calibration_folds, shuffle=True, random_state=seed)
    return CalibratedClassifierCV(base, method="sigmoid", cv=folds, ensemble=False)


def fit_recording(estimator: Any, X: np.ndarray, y: np.ndarray) -> list[str]:
    """Fit `estimator`; return the ConvergenceWarning messages it raised (other warnings pass through).

    scikit-learn estimators fit with one BLAS thread: their solvers make many small BLAS calls and a threaded
    BLAS pays a thread hand-off on each (on 2 shared cores a logreg sweep took 21 s with 2 threads, 3.4 s with
    one). The torch LinearProbe keeps torch's threads: its work is two large matrix products per step.
    """
    final = estimator[-1] if isinstance(estimator, Pipeline) else estimator
    limit = None if isinstance(final, LinearProbe) else 1
    with threadpool_limits(limits=limit, user_api="blas"), warnings.catch_warnings(record=True) as caught:
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
        raise ProbeError(f"head.kind {kind} calibrates its probabilities by cross-validation and needs at least 2 "
                        f"training images per class; the smallest class has {smallest}. Use head.kind logreg.")
    return max(2, min(CALIBRATION_FOLDS, smallest))


def probe_pipeline(kind: str, normalization: str, *, C: float, max_iter: int, seed: int, y: np.ndarray) -> Pipeline:
    steps = [ChunkedStandardScaler()] if "standardize" in normalization else []
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
            pipeline = probe_pipeline(kind, normalization, C=C, max_iter=max_iter, seed=seed, y=y_fit)
        else:
            pipeline[-1].set_params(C=C)
        messages = fit_recording(pipeline, x_fit, y_fit)
        proba = pipeline.predict_proba(x_score)
        results.append((C, float(np.sum(proba.argmax(1) == y_score)),
                        float(log_loss(y_score, proba, labels=labels, normalize=False)), messages))
    return results



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
        raise ProbeError(f"the exported {probe.candidate.kind} head disagrees with the trained one on {differ} images "
                        f"(largest probability difference {largest:.3g}); this is a bug in stages/probes.py")
    return largest

