"""Head stage: a classifier on the cached features, regularization chosen on val, metrics, plots, an export.

    python -m stages.head --backbone NAME --features features/NAME.h5 --manifest data/prepared/manifest.csv \
        --weights models/pretrained/NAME.pth --model models/NAME/classifier.pt --reports reports/NAME
    python -m stages.head --bench        # 10,000 x 2048 features, 5-value C sweep with logreg: seconds

1. Provenance: the features file must name this backbone, the sha256 of this weight file and of this
   manifest, and hold the manifest's images (path + sha256, in order); otherwise ProvenanceError says which
   attribute differs and to re-run `dvc repro extract@NAME`.
2. Features are standardized (StandardScaler fit on the training rows only), then `head.kind`:
     logreg      sklearn LogisticRegression (lbfgs; multinomial, binomial for 2 classes), warm-started along
                 the C sweep
     linear_svm  sklearn LinearSVC                 } probabilities: CalibratedClassifierCV(method="sigmoid",
     svm_rbf     sklearn SVC(kernel="rbf")         }   stratified k-fold, k <= 5, ensemble=False): Platt scaling
                                                       fit on out-of-fold decision values, one refit model
     softmax     a torch nn.Linear trained full batch with L-BFGS on the cached tensors (CUDA when present),
                 loss = mean cross-entropy + |W|^2 / (2 C n): the same objective as logreg
3. Every value of `head.C` is fit on train and scored on val; the best val accuracy wins (ties: the smaller
   C). The head is then refit on train (the sweep's model) or on train+val (`head.refit_on_val`).
   ConvergenceWarnings are recorded per C and written into metrics.json.
4. `head.layers: all` probes every cached layer the same way (reports/NAME/layers.json); the headline
   metrics, plots and export are `head.layer`'s. With `extract.tta_mode: rows` every view's row trains and
   evaluation uses the mean of an image's views (as the exported classifier does).

Outputs (predictions are the argmax of the probabilities everywhere):
    reports/NAME/metrics.json        DVC metrics (val, and test when the test split is non-empty)
    reports/NAME/layers.json         {"layers": [{"layer", "head", "C", "feature_dim", "train_seconds", "val", "test"}]}
    reports/NAME/errors.csv          misclassified val images: path,true,predicted,prob (prob of the prediction)
    reports/NAME/plots/confusion.json, calibration.json, per_class.json (DVC plots) and the same as PNG
    models/NAME/classifier.pt        backbone + preprocessing + head (format: stages/predict.py)
"""
from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
import io
import json
import logging
import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
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
from stages.images import ManifestRow, read_manifest
from stages.io import atomic_path, setup_logging, sha256_file, write_json, write_text
from stages.metrics import classification_metrics, expected_calibration_error
from stages.params import HeadParams, ParamError, load_params
from stages.predict import FORMAT_VERSION, build_head, classifier_from_export

logger = logging.getLogger(__name__)

KINDS = ("logreg", "linear_svm", "svm_rbf", "softmax")
LOGREG_TOL = 1e-5  # lbfgs gradient tolerance on the mean loss; 1e-4 lets warm starts stop at once
CALIBRATION_FOLDS = 5
JSON_ATTRS = ("layers", "preprocess", "classes", "versions", "tta")
SPLITS = ("train", "val", "test")


class HeadError(RuntimeError):
    """The inputs do not allow training a head; the message names the file or parameter and why."""


class ProvenanceError(HeadError):
    """The features file was computed from another backbone, weight file or manifest."""


# ------------------------------------------------------------------------------------------------ features
@dataclass(frozen=True)
class FeatureFile:
    """A features/<bb>.h5 file read into memory: arrays in manifest order, attributes JSON-decoded."""
    path: Path
    features: dict[str, np.ndarray]  # layer -> [N, D] (float16 | float32, as stored)
    labels: np.ndarray  # [N] int64
    split: np.ndarray  # [N] str
    sha256: np.ndarray  # [N] str
    paths: list[str]
    attrs: dict[str, Any]


def _decode_attr(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.generic):
        return value.item()
    return value


def _read_strings(dataset: h5py.Dataset) -> np.ndarray:
    """A fixed-length or variable-length string dataset as a numpy str array [N]."""
    if h5py.check_string_dtype(dataset.dtype) is not None:
        return np.asarray(dataset.asstr()[()], dtype=str)
    return np.asarray(dataset[()]).astype(str)


def read_features(path: str | Path, layers: Sequence[str] | None = None) -> FeatureFile:
    """Read `layers` (default: every stored layer) and the row arrays of a features file."""
    path = Path(path)
    try:
        handle = h5py.File(path, "r")
    except FileNotFoundError:
        raise HeadError(f"{path} does not exist; run `dvc repro extract` first") from None
    except OSError as exc:
        raise HeadError(f"{path} is not a readable HDF5 features file ({exc}); re-run `dvc repro extract`") from None
    with handle:
        attrs = {key: _decode_attr(value) for key, value in handle.attrs.items()}
        for key in JSON_ATTRS:
            if isinstance(attrs.get(key), str):
                attrs[key] = json.loads(attrs[key])
        missing = [name for name in ("features", "labels", "split", "sha256", "path") if name not in handle]
        if missing:
            raise HeadError(f"{path} lacks dataset(s) {', '.join(missing)}; re-run `dvc repro extract`")
        in_file = list(handle["features"].keys())
        declared = [layer for layer in attrs.get("layers") or [] if layer in in_file]
        stored = declared + [layer for layer in in_file if layer not in declared]  # extract.layers order
        wanted = list(layers) if layers is not None else stored
        absent = [layer for layer in wanted if layer not in stored]
        if absent:
            raise HeadError(f"head.layer(s) {absent} not in {path}, which holds {stored}; add them to "
                            f"extract.layers or set head.layer to a stored layer (params.yaml)")
        data = FeatureFile(
            path=path, features={layer: handle["features"][layer][()] for layer in wanted},
            labels=handle["labels"][()],
            split=_read_strings(handle["split"]), sha256=_read_strings(handle["sha256"]),
            paths=[str(p) for p in _read_strings(handle["path"])], attrs=attrs)
    check_arrays(data)
    return dataclasses.replace(data, labels=data.labels.astype(np.int64))


def check_arrays(data: FeatureFile) -> None:
    """Raise HeadError unless every array has the contract's shape and dtype: features/<layer> [N, D] in the
    file's storage_dtype (float16 | float32) and finite, labels [N] integer, split and sha256 [N]; N = rows of `path`."""
    def fail(what: str, found: Any, expected: str) -> None:
        raise HeadError(f"{data.path}: {what} is {found} but expected {expected}; the file is damaged or was not "
                        f"written by the extract stage. Delete it and re-run `dvc repro extract`.")

    n = len(data.paths)
    for name, values in (("labels", data.labels), ("split", data.split), ("sha256", data.sha256)):
        if values.shape != (n,):
            fail(f"the shape of dataset {name}", values.shape, f"({n},), one entry per row of dataset path")
    if data.labels.dtype.kind not in "iu":
        fail("the dtype of dataset labels", data.labels.dtype, "an integer dtype (int64)")
    storage = data.attrs.get("storage_dtype")
    for layer, values in data.features.items():
        if values.ndim != 2 or values.shape[0] != n:
            fail(f"the shape of features/{layer}", values.shape, f"({n}, D): one row per row of dataset path")
        allowed = [storage] if storage in ("float16", "float32") else ["float16", "float32"]
        if values.dtype.name not in allowed:
            fail(f"the dtype of features/{layer}", values.dtype.name,
                 f"{' or '.join(allowed)} (attribute storage_dtype is {storage!r})")
        bad = int(values.size - np.count_nonzero(np.isfinite(values)))
        if bad:
            fail(f"the number of NaN or infinite values in features/{layer}", bad, "0")


def check_provenance(data: FeatureFile, *, backbone: str, weights_path: str | Path, weights_sha256: str,
                     manifest_path: str | Path, manifest_sha256: str, manifest: Sequence[ManifestRow]) -> None:
    """Raise ProvenanceError unless `data` was extracted by `backbone` with these weights from this manifest."""
    def fail(attribute: str, expected: Any, found: Any, what: str) -> None:
        raise ProvenanceError(
            f"{data.path}: {attribute} is {found!r} but expected {expected!r} ({what}); the features were "
            f"computed from other inputs. Re-run `dvc repro extract@{backbone}`.")

    attrs = data.attrs
    if attrs.get("backbone") != backbone:
        fail("attribute backbone", backbone, attrs.get("backbone"), "--backbone")
    if attrs.get("weights_sha256") != weights_sha256:
        fail("attribute weights_sha256", weights_sha256, attrs.get("weights_sha256"), f"sha256 of {weights_path}")
    if attrs.get("manifest_sha256") != manifest_sha256:
        fail("attribute manifest_sha256", manifest_sha256, attrs.get("manifest_sha256"),
             f"sha256 of {manifest_path}")
    views = views_per_image(attrs)
    if len(data.paths) != len(manifest) * views:
        fail("the number of rows", len(manifest) * views, len(data.paths),
             f"{len(manifest)} images in {manifest_path} x {views} stored view(s)")
    for index, row in enumerate(manifest):
        for r in range(index * views, (index + 1) * views):
            found = (data.paths[r], str(data.sha256[r]), int(data.labels[r]), str(data.split[r]))
            if found != (row.path, row.sha256, row.label, row.split):
                fail(f"row {r} (path, sha256, label, split)", (row.path, row.sha256, row.label, row.split),
                     found, f"image {index} of {manifest_path}")


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
class SweepPoint:
    """One value of C: fit on train, scored on val."""
    C: float
    val_accuracy: float
    val_log_loss: float
    seconds: float
    warnings: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {"C": self.C, "val_accuracy": self.val_accuracy, "val_log_loss": self.val_log_loss,
                "seconds": round(self.seconds, 4), "converged": not self.warnings}


@dataclass
class Probe:
    """A fitted head: `model` (StandardScaler + classifier) maps features [N, D] to probabilities [N, K]."""
    kind: str
    model: Pipeline
    C: float
    sweep: list[SweepPoint]
    refit_on: str  # "train" | "train+val"
    train_seconds: float
    warnings: list[str] = field(default_factory=list)
    probabilities: str = "softmax"  # how predict_proba is made: "softmax" or the Platt calibration used

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        return self.model.predict_proba(np.asarray(features, dtype=np.float64))


def choose_C(points: Sequence[SweepPoint]) -> SweepPoint:
    """The point with the highest val accuracy; among equal ones the smallest C."""
    return min(points, key=lambda p: (-p.val_accuracy, p.C))


def calibration_folds(y: np.ndarray, kind: str) -> int:
    """Folds for the SVM kinds' Platt calibration: at most 5, at most the smallest class count."""
    smallest = int(np.bincount(y).min())
    if kind in ("linear_svm", "svm_rbf") and smallest < 2:
        raise HeadError(f"head.kind {kind} calibrates its probabilities by cross-validation and needs at least 2 "
                        f"training images per class; the smallest class has {smallest}. Use head.kind logreg.")
    return max(2, min(CALIBRATION_FOLDS, smallest))


def fit_probe(x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray, *,
              kind: str, Cs: Sequence[float], max_iter: int, seed: int, refit_on_val: bool = False,
              n_classes: int | None = None) -> Probe:
    """Sweep C (ascending; logreg and softmax warm-start from the previous C) on train -> val, pick with
    `choose_C`, and return the head refit on train (the sweep's model) or on train + val.

    x_* [N, D] features (any float dtype; standardized here, scaler fit on the rows the head is fit on),
    y_* [N] labels 0..K-1 (K = n_classes, default: the largest label + 1); every class must occur in y_train.
    """
    start = time.perf_counter()
    if n_classes is None:
        n_classes = int(max(y_train.max(), y_val.max())) + 1
    absent = sorted(set(range(n_classes)) - set(np.unique(y_train).tolist()))
    if absent:
        raise HeadError(f"classes {absent} have no training images; every class needs some")
    folds = calibration_folds(y_train, kind)
    scaler = StandardScaler().fit(np.asarray(x_train, dtype=np.float64))
    train = scaler.transform(np.asarray(x_train, dtype=np.float64))
    val = scaler.transform(np.asarray(x_val, dtype=np.float64))
    labels = np.arange(n_classes)
    points, models = [], []
    estimator = None
    for C in sorted(set(float(c) for c in Cs)):
        tick = time.perf_counter()
        if estimator is None or not getattr(estimator, "warm_start", False):
            estimator = make_head(kind, C=C, max_iter=max_iter, seed=seed, calibration_folds=folds)
        else:
            estimator.set_params(C=C)
        messages = _fit_recording(estimator, train, y_train)
        proba = estimator.predict_proba(val)
        points.append(SweepPoint(C=C, val_accuracy=float(np.mean(proba.argmax(1) == y_val)),
                                 val_log_loss=float(log_loss(y_val, proba, labels=labels)),
                                 seconds=time.perf_counter() - tick, warnings=tuple(messages)))
        models.append(copy.deepcopy(estimator))
        for message in messages:
            logger.warning("%s C=%g: %s", kind, C, message)
    best = choose_C(points)
    model = make_pipeline(scaler, models[points.index(best)])
    refit_on = "train"
    refit_warnings: list[str] = []
    if refit_on_val:
        both = np.concatenate([x_train, x_val]).astype(np.float64)
        y_both = np.concatenate([y_train, y_val])
        folds = calibration_folds(y_both, kind)
        model = make_pipeline(StandardScaler(), make_head(kind, C=best.C, max_iter=max_iter, seed=seed,
                                                          calibration_folds=folds))
        refit_warnings = _fit_recording(model, both, y_both)
        refit_on = "train+val"
    notes = [f"C={p.C:g}: {m}" for p in points for m in p.warnings]
    notes += [f"refit C={best.C:g} on train+val: {m}" for m in refit_warnings]
    probabilities = ("softmax" if kind in ("logreg", "softmax") else
                     f"Platt sigmoid: CalibratedClassifierCV({folds}-fold stratified, ensemble=False)")
    return Probe(kind=kind, model=model, C=best.C, sweep=points, refit_on=refit_on,
                 train_seconds=time.perf_counter() - start, warnings=notes, probabilities=probabilities)


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
def _fold_scaler(weight: np.ndarray, bias: np.ndarray, scaler: StandardScaler) -> tuple[np.ndarray, np.ndarray]:
    """(W, b) acting on standardized features -> (W', b') acting on raw features [.., D]."""
    folded = weight / scaler.scale_
    return folded, bias - folded @ scaler.mean_


def export_head(probe: Probe) -> dict[str, Any]:
    """The head as float64 tensors for classifier.pt (see stages/predict.py for the format)."""
    scaler, estimator = probe.model[0], probe.model[-1]
    spec: dict[str, Any] = {"kind": probe.kind, "C": probe.C}
    if probe.kind in ("logreg", "softmax"):
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
    if probe.kind == "linear_svm":
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
    spec.update(type="rbf_svm", mean=torch.from_numpy(scaler.mean_.astype(np.float64)),
                scale=torch.from_numpy(scaler.scale_.astype(np.float64)),
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
        raise HeadError(f"the exported {probe.kind} head disagrees with the trained one on {differ} images "
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
        raise HeadError(f"{features_path}: features/{model.layer} has {dim} columns but layer {model.layer} of "
                        f"{model.name} gives {produced}; the file is damaged or was not written by the extract "
                        f"stage. Delete it and re-run `dvc repro extract`.")


def build_export(*, backbone_name: str, backbone_state: dict[str, torch.Tensor], backbone_spec: dict[str, Any],
                 layer: str, classes: Sequence[str], head_spec: dict[str, Any],
                 provenance: dict[str, Any]) -> dict[str, Any]:
    """The classifier.pt dict: plain values and tensors only (torch.load(weights_only=True))."""
    return {"format_version": FORMAT_VERSION, "backbone": {"name": backbone_name, **backbone_spec},
            "backbone_state": backbone_state, "layer": layer, "classes": list(classes), "head": head_spec,
            "provenance": provenance}


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
                ece_bins: int, title: str) -> None:
    """Val plots for DVC (confusion.json, calibration.json, per_class.json) and as PNGs (matplotlib Agg)."""
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
    axes.set_title(f"{title}: val confusion")
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
             title=f"{title}: val calibration, ECE {ece:.3f}")
    axes.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), fontsize="x-small", frameon=False)
    _save_png(figure, plots_dir / "calibration.png")
    plt.close(figure)

    figure, axes = plt.subplots(figsize=(6, max(2.0, 0.35 * len(classes) + 1)))
    axes.barh([p["class"] for p in per_class], [p["accuracy"] for p in per_class], color="tab:blue")
    axes.set(xlim=(0, 1), xlabel="accuracy (recall)", title=f"{title}: val accuracy per class")
    axes.invert_yaxis()
    _save_png(figure, plots_dir / "per_class.png")
    plt.close(figure)


# ------------------------------------------------------------------------------------------------ stage
def views_per_image(attrs: dict[str, Any]) -> int:
    """Rows the features file holds per image: one per TTA view with tta_mode "rows", else one."""
    tta = attrs.get("tta") or ["none"]
    return len(tta) if attrs.get("tta_mode") == "rows" else 1


@dataclass(frozen=True)
class Dataset:
    """The features file arranged for the head. With tta_mode "rows" every view row trains (`train_*`) and
    evaluation uses the views' mean (`images`); otherwise both are the stored rows."""
    train_x: dict[str, np.ndarray]  # layer -> [R, D] every stored row of a train image
    train_y: np.ndarray  # [R]
    images: dict[str, np.ndarray]  # layer -> [N, D] one row per manifest image (views averaged)
    labels: np.ndarray  # [N]
    split: np.ndarray  # [N]
    paths: list[str]  # [N]

    def rows(self, split: str) -> np.ndarray:
        return np.flatnonzero(self.split == split)


def arrange(data: FeatureFile) -> Dataset:
    views = views_per_image(data.attrs)
    train = data.split == "train"
    images = {layer: (x if views == 1 else x.reshape(-1, views, x.shape[1]).mean(1, dtype=np.float32))
              for layer, x in data.features.items()}
    return Dataset(train_x={layer: x[train] for layer, x in data.features.items()}, train_y=data.labels[train],
                   images=images, labels=data.labels[::views], split=data.split[::views], paths=data.paths[::views])


def _layer_entry(probe: Probe, layer: str, metrics: dict[str, dict[str, Any]], feature_dim: int) -> dict[str, Any]:
    entry = {"layer": layer, "head": probe.kind, "C": probe.C, "feature_dim": feature_dim,
             "train_seconds": round(probe.train_seconds, 4)}
    for split, values in metrics.items():
        entry[split] = {k: v for k, v in values.items() if k != "per_class"}
    return entry


def load_checked_features(*, backbone_name: str, features_path: Path, manifest_path: Path, weights_path: Path,
                          params: HeadParams) -> tuple[FeatureFile, dict[str, str]]:
    """Read the layers the head needs and check their provenance; also return the input hashes."""
    for path, hint in ((manifest_path, "dvc repro prepare"), (weights_path, f"dvc repro weights@{backbone_name}")):
        if not path.is_file():
            raise HeadError(f"{path} does not exist; run `{hint}`")
    manifest = read_manifest(manifest_path)
    hashes = {"manifest_sha256": sha256_file(manifest_path), "weights_sha256": sha256_file(weights_path)}
    data = read_features(features_path, None if params.layers == "all" else [params.layer])
    if params.layer not in data.features:
        raise HeadError(f"head.layer {params.layer!r} is not in {features_path}, which holds "
                        f"{list(data.features)}; add it to extract.layers or change head.layer (params.yaml)")
    check_provenance(data, backbone=backbone_name, weights_path=weights_path, manifest_path=manifest_path,
                     manifest=manifest, **hashes)
    classes = data.attrs.get("classes") or []
    if len(classes) < 2 or data.labels.max(initial=0) >= len(classes):
        raise HeadError(f"{features_path}: attribute classes {classes} does not name every label "
                        f"0..{data.labels.max(initial=0)}; re-run `dvc repro extract@{backbone_name}`")
    return data, hashes


def probe_layers(dataset: Dataset, classes: Sequence[str], params: HeadParams
                 ) -> tuple[dict[str, Probe], dict[str, dict[str, dict[str, Any]]]]:
    """Fit a head per layer (C chosen on val) and evaluate it: ({layer: probe}, {layer: {split: metrics}})."""
    val, y = dataset.rows("val"), dataset.labels
    if len(dataset.train_y) == 0 or len(val) == 0:
        raise HeadError(f"the manifest has {len(dataset.rows('train'))} train and {len(val)} val images; the head "
                        f"needs both (C is chosen on val). Set prepare.val_fraction > 0 or add a val/ folder.")
    evaluated = [s for s in ("val", "test") if len(dataset.rows(s))]
    probes, metrics = {}, {}
    for layer, features in dataset.images.items():
        logger.info("%s head on %s [%d x %d], C in %s", params.kind, layer, len(dataset.train_y),
                    features.shape[1], list(params.C))
        probe = fit_probe(dataset.train_x[layer], dataset.train_y, features[val], y[val], kind=params.kind,
                          Cs=params.C, max_iter=params.max_iter, seed=params.seed,
                          refit_on_val=params.refit_on_val, n_classes=len(classes))
        probes[layer] = probe
        metrics[layer] = {s: classification_metrics(probe.predict_proba(features[dataset.rows(s)]),
                                                    y[dataset.rows(s)], classes, ece_bins=params.ece_bins)
                          for s in evaluated}
        logger.info("%s: C=%g, val accuracy %.4f, %.2fs", layer, probe.C, metrics[layer]["val"]["accuracy"],
                    probe.train_seconds)
    return probes, metrics


def backbone_export(backbone: Any, weights_path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """The backbone's verified weights with its ImageNet classifier replaced by nn.Identity (as
    stages.backbones.FeatureModel does): (state dict, dotted path of the replaced classifier)."""
    model = build_model(backbone)
    load_weights(model, backbone, weights_path)
    classifier = classifier_path(backbone, model)
    replace_module(model, classifier, nn.Identity())
    return dict(model.state_dict()), classifier


def run_head(*, backbone_name: str, features_path: Path, manifest_path: Path, weights_path: Path,
             model_path: Path, reports_dir: Path, params: HeadParams,
             custom: dict[str, Any] | None = None) -> dict[str, Any]:
    """The whole stage: read and check inputs, fit (per layer), evaluate, write reports, plots and the export.
    Returns metrics.json's content."""
    try:
        backbone = get_backbone(backbone_name, custom)
    except KeyError as exc:
        raise HeadError(f"--backbone: {exc.args[0]}") from None
    data, hashes = load_checked_features(backbone_name=backbone_name, features_path=features_path,
                                         manifest_path=manifest_path, weights_path=weights_path, params=params)
    classes = list(data.attrs["classes"])
    dataset = arrange(data)
    probes, layer_metrics = probe_layers(dataset, classes, params)
    probe, features = probes[params.layer], dataset.images[params.layer]
    val, y_val = dataset.rows("val"), dataset.labels[dataset.rows("val")]
    val_proba = probe.predict_proba(features[val])

    head_spec = export_head(probe)
    verify_export(head_spec, probe, features[val])
    state, classifier = backbone_export(backbone, weights_path)
    provenance = {  # the features file and what it was computed from
        "path": str(features_path), "sha256": sha256_file(features_path),
        "weights": str(weights_path), "manifest": str(manifest_path), **hashes,
        **{key: data.attrs.get(key) for key in ("storage_dtype", "precision", "preprocess", "tta", "tta_mode")},
        "n_images": len(dataset.labels)}
    export = build_export(
        backbone_name=backbone_name, backbone_state=state, layer=params.layer,
        backbone_spec={"arch": backbone.arch, "classifier": classifier, "build_kwargs": dict(backbone.build_kwargs),
                       "preprocess": data.attrs.get("preprocess"), "tta": list(data.attrs.get("tta") or ["none"]),
                       "precision": data.attrs.get("precision") or "float32"},
        classes=classes, head_spec=head_spec,
        provenance={"features": provenance, "head": params.kind, "C": probe.C, "refit_on": probe.refit_on,
                    "versions": {"torch": str(torch.__version__), "sklearn": module_version("sklearn")}})
    check_feature_dim(export, int(features.shape[1]), features_path)
    with atomic_path(model_path) as tmp:
        with open(tmp, "wb") as fh:  # a file object: the zip records are named archive/..., not after the random
            torch.save(export, fh)  # temporary file, so the same export gives the same bytes (and DVC hash)
        torch.load(tmp, map_location="cpu", weights_only=True)  # the contract: plain tensors and values only

    metrics = {
        "backbone": backbone_name, "head": params.kind, "layer": params.layer, "C": probe.C,
        "train_seconds": round(probe.train_seconds, 4), "feature_dim": int(features.shape[1]),
        "n_train": len(dataset.rows("train")), "n_val": len(val), "n_test": len(dataset.rows("test")),
        "refit_on": probe.refit_on, "converged": not probe.warnings, "warnings": probe.warnings,
        "probabilities": probe.probabilities, "sweep": [p.as_dict() for p in probe.sweep],
        "features": provenance, **layer_metrics[params.layer]}
    if probe.refit_on == "train+val":
        metrics["note"] = "head.refit_on_val: the head was refit on train+val, so val metrics are not held out"
    write_json(reports_dir / "metrics.json", metrics)
    write_json(reports_dir / "layers.json", {"layers": [
        _layer_entry(probes[layer], layer, layer_metrics[layer], dataset.images[layer].shape[1])
        for layer in dataset.images]})
    predicted = val_proba.argmax(1)
    write_errors_csv(reports_dir / "errors.csv", [
        {"path": dataset.paths[i], "true": classes[t], "predicted": classes[p], "prob": f"{val_proba[n, p]:.6f}"}
        for n, (i, t, p) in enumerate(zip(val, y_val, predicted)) if t != p])
    write_plots(reports_dir / "plots", y_true=y_val, proba=val_proba, classes=classes,
                ece_bins=params.ece_bins, title=f"{backbone_name} {params.kind}")
    return metrics


# ------------------------------------------------------------------------------------------------ benchmark
def run_benchmark(*, n: int = 10_000, dim: int = 2048, n_classes: int = 10, Cs: Sequence[float] = (
        0.001, 0.01, 0.1, 1.0, 10.0), seed: int = 0, max_iter: int = 2000) -> dict[str, Any]:
    """Time a logreg C sweep on synthetic float32 features [n, dim] (80% train, 20% val), scaler included."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_classes, n)
    centres = rng.normal(0.0, 0.05, (n_classes, dim)).astype(np.float32)
    x = centres[y] + rng.normal(0.0, 1.0, (n, dim)).astype(np.float32)
    cut = int(0.8 * n)
    start, cpu = time.perf_counter(), time.process_time()
    probe = fit_probe(x[:cut], y[:cut], x[cut:], y[cut:], kind="logreg", Cs=Cs, max_iter=max_iter, seed=seed)
    seconds = time.perf_counter() - start
    return {"seconds": round(seconds, 3), "cpu_seconds": round(time.process_time() - cpu, 3),
            "load_average_1min": round(os.getloadavg()[0], 2), "features": [n, dim], "classes": n_classes,
            "C": probe.C,
            "val_accuracy": max(p.val_accuracy for p in probe.sweep), "sweep": [p.as_dict() for p in probe.sweep],
            "torch_threads": torch.get_num_threads()}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m stages.head", description=__doc__.split("\n")[0])
    parser.add_argument("--backbone")
    parser.add_argument("--features", type=Path)
    parser.add_argument("--manifest", type=Path)
    parser.add_argument("--weights", type=Path)
    parser.add_argument("--model", type=Path)
    parser.add_argument("--reports", type=Path)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--bench", action="store_true", help="time a 10,000 x 2048 logreg C sweep and exit")
    args = parser.parse_args(argv)
    if not args.bench:
        missing = [f"--{name}" for name in ("backbone", "features", "manifest", "weights", "model", "reports")
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
        print(f"logreg C sweep on 10,000 x 2048: {result['seconds']:.2f} s wall, {result['cpu_seconds']:.2f} s CPU "
              f"(target < 10 s on 2 cores; load average {result['load_average_1min']})")
        return 0
    try:
        params = load_params(args.params)
        metrics = run_head(backbone_name=args.backbone, features_path=args.features, manifest_path=args.manifest,
                           weights_path=args.weights, model_path=args.model, reports_dir=args.reports,
                           params=params.head, custom=params.weights.custom)
    except (ParamError, HeadError, WeightsError, ValueError, OSError) as exc:
        logger.error("%s", exc)
        return 1
    summary = ", ".join(f"{s} accuracy {metrics[s]['accuracy']:.4f}" for s in ("val", "test") if s in metrics)
    logger.info("%s %s C=%g: %s; wrote %s and %s", args.backbone, metrics["head"], metrics["C"], summary,
                args.reports / "metrics.json", args.model)
    if metrics["warnings"]:
        logger.warning("%d convergence warning(s), written to metrics.json", len(metrics["warnings"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
