"""Temperature scaling of the chosen head's probabilities (head.calibration: temperature).

One scalar T > 0 divides the logits before the softmax: the predicted class never changes (accuracy is the same),
only how confident the probabilities are. T is fitted, by minimizing the mean negative log-likelihood, on
out-of-fold logits of the chosen candidate over the selection images: each image's logits come from the
selection fold fit that did not see it (stages/head.py `select` keeps them for the best logit candidate, so the
calibration costs no extra fit). The held-out split fits nothing; its ECE and log loss before and after are
reported. When every out-of-fold prediction is right, T is not identified (the likelihood rises without end as
T -> 0) and stays 1. The chosen setting's final refit on all selection images then carries T into the export
(stages/export.py `head.temperature`), so `predict` outputs calibrated probabilities.

Only the logit kinds (logreg, softmax) are scaled; linear_svm and svm_rbf probabilities already come from Platt
scaling fitted by cross-validation (CalibratedClassifierCV), and the k-NN probe's votes are not exported.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax, softmax

from stages.metrics import expected_calibration_error
from stages.probes import LOGIT_KINDS, Probe, Score

TEMPERATURE_BOUNDS = (1e-2, 1e2)  # the search range of T; a T at either end is flagged in metrics.json


def temperature_nll(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    """Mean negative log-likelihood of softmax(logits [N, K] / temperature) against labels [N]."""
    scaled = log_softmax(np.asarray(logits, dtype=np.float64) / temperature, axis=1)
    return float(-scaled[np.arange(len(labels)), labels].mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray, *,
                    bounds: tuple[float, float] = TEMPERATURE_BOUNDS) -> float:
    """The T in `bounds` minimizing temperature_nll(logits [N, K], labels [N], T). The NLL is convex in 1/T, so
    it has one minimum along log T, which a bounded scalar search finds (scipy minimize_scalar, method bounded)."""
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) == 0:
        raise ValueError("temperature scaling needs at least one out-of-fold logit row")
    result = minimize_scalar(lambda log_t: temperature_nll(logits, labels, float(np.exp(log_t))),
                             bounds=(float(np.log(bounds[0])), float(np.log(bounds[1]))), method="bounded",
                             options={"xatol": 1e-7})
    return float(np.exp(result.x))


def calibration_metrics(logits: np.ndarray, labels: np.ndarray, temperature: float, *,
                        ece_bins: int) -> dict[str, float]:
    """{"ece_before", "ece_after", "log_loss_before", "log_loss_after"} of logits [N, K] without and with T."""
    before = softmax(np.asarray(logits, dtype=np.float64), axis=1)
    after = softmax(np.asarray(logits, dtype=np.float64) / temperature, axis=1)
    return {"ece_before": expected_calibration_error(before, labels, n_bins=ece_bins),
            "ece_after": expected_calibration_error(after, labels, n_bins=ece_bins),
            "log_loss_before": temperature_nll(logits, labels, 1.0),
            "log_loss_after": temperature_nll(logits, labels, temperature)}


def calibrate(probe: Probe, best: Score, labels: np.ndarray, *, method: str,
              ece_bins: int) -> tuple[Probe, dict[str, Any]]:
    """The chosen `probe` (refit on all selection images) with the temperature fitted on `best`'s out-of-fold
    logits (labels: the dataset's [N]), and metrics.json's "calibration" record {"method", "temperature",
    "reason" or "fitted_on", "selection" (ECE and log loss before / after), "at_bound"}. method: head.calibration."""
    kind = best.candidate.kind
    if method == "none" or kind not in LOGIT_KINDS:
        reason = ("head.calibration: none" if method == "none" else
                  f"head.kind {kind}: its probabilities are already Platt-scaled by cross-validation "
                  f"(CalibratedClassifierCV); temperature scaling applies to logreg logits")
        return dataclasses.replace(probe, temperature=1.0), {"method": "none", "temperature": 1.0, "reason": reason}
    if best.out_of_fold is None:
        raise ValueError(f"the selection kept no out-of-fold logits for {best.candidate}; this is a bug in "
                         f"stages/head.py select")
    rows, logits = best.out_of_fold
    y = np.asarray(labels)[rows]
    if np.array_equal(np.asarray(logits).argmax(1), y):  # the NLL keeps falling as T -> 0: T is not identified
        reason = (f"every one of the {len(rows)} out-of-fold predictions is right, so the likelihood keeps rising "
                  f"as T -> 0 and would make every probability 0 or 1; T kept at 1")
        return dataclasses.replace(probe, temperature=1.0), {"method": "none", "temperature": 1.0, "reason": reason}
    temperature = fit_temperature(logits, y)
    record = {"method": "temperature", "temperature": temperature,
              "fitted_on": {"images": int(len(rows)), "logits": "out-of-fold: each selection image scored by the "
                                                                "selection fit that did not see it"},
              "selection": calibration_metrics(logits, y, temperature, ece_bins=ece_bins),
              "at_bound": bool(np.isclose(temperature, TEMPERATURE_BOUNDS, rtol=1e-3).any())}
    return dataclasses.replace(probe, temperature=temperature), record
