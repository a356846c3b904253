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
from sklearn.utils.class_weight import compute_class_weight
from threadpoolctl import threadpool_limits
from torch import nn

from stages.evaluation import normalize_blocks
from stages.export import build_head
from stages.params import ParamError


class ProbeError(ValueError):
    """The training rows do not allow this probe; the message names the parameter and what to change."""


KINDS = ("logreg", "linear_svm", "svm_rbf", "softmax")
LOGIT_KINDS = ("logreg", "softmax")  # kinds whose probabilities are softmax(logits): temperature scaling applies
BALANCED_RATIO = 1.05  # largest / smallest class count up to which "balanced" class weights are all about 1
LOGREG_TOL = 1e-5  # lbfgs gradient tolerance on the mean loss; 1e-4 lets warm starts stop at once
CALIBRATION_FOLDS = 5
LOGIT_BLOCK_ROWS = 8192  # rows per float64 block when computing logits
FIT_CHUNK_ROWS = 65536  # rows per float32 chunk when LinearProbe fits features not stored as a float32 array
STATS_CHUNK_ROWS = 16384  # rows per slice when ChunkedStandardScaler accumulates the mean and variance


class LinearProbe(ClassifierMixin, BaseEstimator):
    """Multinomial logistic regression as a torch nn.Linear, trained full batch with L-BFGS.

    Minimizes (sum_i w_i CE_i + |W|^2 / (2 C)) / n, the mean cross-entropy plus the L2 penalty (scikit-learn's
    LogisticRegression objective with sample weights w, divided by C n; the bias is not penalized), in float32, on
    CUDA when present (`device="auto"`), else the CPU's torch threads. w_i = 1, or with `class_weight="balanced"`
    n / (K n_c) for a row of class c (scikit-learn's formula; the weights still sum to n), times `fit`'s
    `sample_weight`. Zero-initialized, or warm-started from the previous fit when `warm_start` (the C sweep), so the
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
                 warm_start: bool = False, device: str = "auto", class_weight: str | None = None) -> None:
        self.C = C
        self.max_iter = max_iter
        self.tol = tol
        self.warm_start = warm_start
        self.device = device
        self.class_weight = class_weight

    def row_weights(self, targets: np.ndarray, sample_weight: np.ndarray | None) -> np.ndarray | None:
        """Weights [N] of the rows' losses (class index targets [N]): `class_weight` "balanced" gives class c
        n / (K n_c) (scikit-learn's formula, so they sum to n), times `sample_weight`; None when all are 1."""
        if self.class_weight in (None, "none") and sample_weight is None:
            return None
        if self.class_weight not in (None, "none", "balanced"):
            raise ValueError(f"LinearProbe class_weight must be None, 'none' or 'balanced'; got {self.class_weight!r}")
        weights = np.ones(len(targets))
        if self.class_weight == "balanced":
            weights = compute_class_weight("balanced", classes=np.arange(len(self.classes_)), y=targets)[targets]
        if sample_weight is not None:
            weights = weights * np.asarray(sample_weight, dtype=np.float64).reshape(-1)
        return weights

    def fit(self, X: np.ndarray, y: np.ndarray, sample_weight: np.ndarray | None = None) -> LinearProbe:
        self.classes_, targets = np.unique(np.asarray(y), return_inverse=True)
        device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if self.device == "auto"
                              else self.device)
        weights = self.row_weights(targets, sample_weight)
        layer = nn.Linear(X.shape[1], len(self.classes_), device=device)
        with torch.no_grad():
            previous = getattr(self, "coef_", None)
            if self.warm_start and previous is not None and previous.shape == tuple(layer.weight.shape):
                layer.weight.copy_(torch.as_tensor(previous))
                layer.bias.copy_(torch.as_tensor(self.intercept_))
            else:
                layer.weight.zero_()
                layer.bias.zero_()
        optimizer = torch.optim.LBFGS(layer.parameters(), lr=1, max_iter=self.max_iter, tolerance_grad=self.tol,
                                      tolerance_change=1e-12, history_size=20, line_search_fn="strong_wolfe")
        closure = self._closure(optimizer, layer, X, torch.as_tensor(targets, device=device),
                                None if weights is None else torch.as_tensor(weights, dtype=torch.float32,
                                                                             device=device))
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

    def _closure(self, optimizer: torch.optim.Optimizer, layer: nn.Linear, X: np.ndarray, target: torch.Tensor,
                 weights: torch.Tensor | None) -> Any:
        """L-BFGS's closure: the loss (sum of weighted row cross-entropies + |W|^2 / (2 C)) / n and its gradient.
        Float32 X is used whole (no copy on the CPU); any other X chunk by chunk (FIT_CHUNK_ROWS rows at a time,
        converted to float32), the chunks' losses and gradients summed: the same objective."""
        device, n = target.device, len(X)
        whole = isinstance(X, np.ndarray) and X.dtype == np.float32  # as_tensor shares it on the CPU: no copy
        features = torch.as_tensor(X, device=device) if whole else None
        chunk_rows = n if whole else FIT_CHUNK_ROWS
        chunks = [(start, min(n, start + chunk_rows)) for start in range(0, n, max(1, chunk_rows))]
        penalty = 1.0 / (2.0 * self.C * n)

        def data_loss(block: torch.Tensor, start: int, stop: int) -> torch.Tensor:
            per_row = nn.functional.cross_entropy(layer(block), target[start:stop], reduction="none")
            return (per_row if weights is None else per_row * weights[start:stop]).sum() / n

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            total = penalty * layer.weight.square().sum()
            if features is not None:
                total = total + data_loss(features, 0, n)
                total.backward()
                return total
            total.backward()
            total = total.detach()
            for start, stop in chunks:
                block = torch.as_tensor(np.asarray(X[start:stop], dtype=np.float32), device=device)
                loss = data_loss(block, start, stop)
                loss.backward()
                total = total + loss.detach()
            return total

        return closure

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


def make_head(kind: str, *, C: float, max_iter: int, seed: int, calibration_folds: int = CALIBRATION_FOLDS,
              class_weight: str = "none") -> Any:
    """An unfitted scikit-learn classifier with `predict_proba` for `head.kind` (features standardized);
    class_weight "none" or "balanced" (head.class_weight) weighs its training loss."""
    weight = None if class_weight == "none" else class_weight
    if kind in LOGIT_KINDS:
        return LinearProbe(C, max_iter=max_iter, warm_start=True, class_weight=weight)
    if kind == "linear_svm":
        base: Any = LinearSVC(C=C, max_iter=max_iter, random_state=seed, class_weight=weight)
    elif kind == "svm_rbf":
        base = SVC(kernel="rbf", C=C, gamma="scale", random_state=seed, class_weight=weight)
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
    """One setting the protocol may choose: head kind, feature set (layers concatenated), normalization, C,
    class weight ("none" or "balanced")."""
    kind: str
    layers: tuple[str, ...]
    normalization: str
    C: float
    class_weight: str = "none"

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "layers": list(self.layers), "normalization": self.normalization, "C": self.C,
                "class_weight": self.class_weight}


@dataclass(frozen=True)
class Score:
    """A candidate's selection score: accuracy and mean log loss over the selection folds' scored rows.
    `out_of_fold`: (dataset rows [S], their logits [S, K] float32 from the fits that did not see them), kept by the
    selection for its best logit-producing candidate only (temperature scaling); None otherwise."""
    candidate: Candidate
    accuracy: float
    log_loss: float
    seconds: float
    warnings: tuple[str, ...] = ()
    out_of_fold: tuple[np.ndarray, np.ndarray] | None = field(default=None, compare=False, repr=False)

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
    temperature: float = 1.0  # logit kinds: probabilities softmax(logits / temperature) (stages/calibration.py)

    @property
    def probabilities(self) -> str:
        """How predict_proba is made: softmax (with the temperature) or the Platt calibration used."""
        if self.candidate.kind in LOGIT_KINDS:
            return "softmax" if self.temperature == 1.0 else f"softmax(logits / T), T = {self.temperature:.6g}"
        return "Platt sigmoid: CalibratedClassifierCV(stratified k-fold, ensemble=False)"

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        """features [N, D]: the candidate's layers concatenated, as stored (normalized here)."""
        blocks = np.split(np.asarray(features), np.cumsum(self.block_dims)[:-1], axis=1)
        x = normalize_blocks(blocks, self.candidate.normalization)
        if self.candidate.kind in LOGIT_KINDS and self.temperature != 1.0:
            return np_softmax(self.model.decision_function(x) / self.temperature, axis=1)
        return self.model.predict_proba(x)


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


def probe_pipeline(kind: str, normalization: str, *, C: float, max_iter: int, seed: int, y: np.ndarray,
                   class_weight: str = "none") -> Pipeline:
    steps = [ChunkedStandardScaler()] if "standardize" in normalization else []
    return make_pipeline(*steps, make_head(kind, C=C, max_iter=max_iter, seed=seed, class_weight=class_weight,
                                           calibration_folds=calibration_folds(y, kind)))


def class_weight_candidates(y: np.ndarray, requested: Sequence[str], *, n_classes: int
                            ) -> tuple[list[str], dict[str, Any]]:
    """The class weights worth scoring for selection labels y [M]: `requested` (head.class_weight), less
    "balanced" when "none" is also requested and the classes are balanced (largest count at most BALANCED_RATIO x
    the smallest: every balanced weight is within 2.5% of 1, the same fit at twice the cost). Returns (the
    weights to score, metrics.json's record {"requested", "scored", "class_counts", "reason"})."""
    counts = np.bincount(np.asarray(y), minlength=n_classes)
    smallest, largest = int(counts.min()), int(counts.max())
    scored, reason = list(requested), "every requested class weight is scored"
    if "balanced" in scored and "none" in scored and largest <= BALANCED_RATIO * smallest:
        scored.remove("balanced")
        reason = (f"balanced skipped: the selection images' classes are balanced ({smallest} to {largest} per "
                  f"class, ratio <= {BALANCED_RATIO}), so its weights would all be about 1")
    return scored, {"requested": list(requested), "scored": scored,
                    "class_counts": {"min": smallest, "max": largest}, "reason": reason}


def sweep_C(x_fit: np.ndarray, y_fit: np.ndarray, x_score: np.ndarray, y_score: np.ndarray, *, kind: str,
            normalization: str, Cs: Sequence[float], max_iter: int, seed: int, n_classes: int,
            class_weight: str = "none") -> list[tuple[float, float, float, list[str], np.ndarray | None]]:
    """Fit every C (ascending; logreg and softmax warm-start from the previous C) on x_fit [M, D] and score
    x_score [S, D]: [(C, correct count, summed log loss, convergence warnings, logits [S, K] float32 of the logit
    kinds, else None)]. x_* already normalized."""
    labels = np.arange(n_classes)
    results, pipeline = [], None
    for C in sorted(set(float(c) for c in Cs)):
        if pipeline is None or not getattr(pipeline[-1], "warm_start", False):
            pipeline = probe_pipeline(kind, normalization, C=C, max_iter=max_iter, seed=seed, y=y_fit,
                                      class_weight=class_weight)
        else:
            pipeline[-1].set_params(C=C)
        messages = fit_recording(pipeline, x_fit, y_fit)
        logits = pipeline.decision_function(x_score) if kind in LOGIT_KINDS else None
        proba = np_softmax(logits, axis=1) if logits is not None else pipeline.predict_proba(x_score)
        results.append((C, float(np.sum(proba.argmax(1) == y_score)),
                        float(log_loss(y_score, proba, labels=labels, normalize=False)), messages,
                        None if logits is None else logits.astype(np.float32)))
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
    spec: dict[str, Any] = {"kind": candidate.kind, "C": candidate.C, "normalization": candidate.normalization,
                            "class_weight": candidate.class_weight}
    if "l2" in candidate.normalization:
        spec["l2_blocks"] = [int(d) for d in probe.block_dims]
    if candidate.kind in LOGIT_KINDS:
        weight, bias = estimator.coef_, np.atleast_1d(estimator.intercept_)
        if weight.shape[0] == 1:  # binary logreg: p1 = sigmoid(z) = softmax([0, z])[1]
            weight, bias = np.vstack([np.zeros_like(weight), weight]), np.concatenate([[0.0], bias])
        weight, bias = _fold_scaler(weight, bias, scaler)
        spec.update(type="linear", output="softmax", weight=torch.from_numpy(weight), bias=torch.from_numpy(bias),
                    temperature=float(probe.temperature))
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

