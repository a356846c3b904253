"""stages.calibration: the fitted temperature undoes a known miscalibration, lowers the ECE on other images drawn
the same way, and is only applied to logit heads; stages.head calibrates the chosen probe on out-of-fold logits."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.special import softmax

from stages import calibration as cal
from stages import head as hd
from stages.metrics import expected_calibration_error
from stages.params import HeadParams
from stages.probes import Candidate, Probe, Score
from test_head import protocol_dataset  # tests/ is on sys.path under pytest


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here runs on one torch thread (fixture in conftest.py)."""


def draw(n: int, *, seed: int, n_classes: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """True logits [n, K] and labels drawn from softmax(true logits): logits that are calibrated by construction."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 2.0, (n, n_classes))
    labels = (softmax(logits, axis=1).cumsum(1) > rng.random((n, 1))).argmax(1)
    return logits, labels


@pytest.mark.parametrize("scale", [0.4, 3.0])
def test_the_fitted_temperature_undoes_a_known_scaling_of_calibrated_logits(scale: float) -> None:
    """Logits scale x the calibrated ones (3: overconfident, 0.4: underconfident) need T = scale."""
    logits, labels = draw(6000, seed=1)
    temperature = cal.fit_temperature(scale * logits, labels)
    assert temperature == pytest.approx(scale, rel=0.05)
    assert cal.temperature_nll(scale * logits, labels, temperature) < cal.temperature_nll(scale * logits, labels, 1.0)
    assert cal.fit_temperature(logits, labels) == pytest.approx(1.0, rel=0.05)  # already calibrated: T about 1


def test_the_temperature_fitted_on_some_images_lowers_the_ece_on_others() -> None:
    fit_logits, fit_labels = draw(4000, seed=2)
    new_logits, new_labels = draw(4000, seed=3)
    temperature = cal.fit_temperature(3.0 * fit_logits, fit_labels)
    measured = cal.calibration_metrics(3.0 * new_logits, new_labels, temperature, ece_bins=15)
    assert measured["ece_before"] > 0.1 and measured["ece_after"] < 0.03
    assert measured["log_loss_after"] < measured["log_loss_before"]
    assert measured["ece_before"] == pytest.approx(
        expected_calibration_error(softmax(3.0 * new_logits, axis=1), new_labels, n_bins=15))
    # argmax is unchanged: the predictions, and so the accuracy, are the same
    np.testing.assert_array_equal((new_logits / temperature).argmax(1), new_logits.argmax(1))


def test_perfectly_separated_logits_are_sharpened_and_empty_logits_are_an_error() -> None:
    logits = np.array([[4.0, 0.0], [0.0, 4.0]] * 10)
    temperature = cal.fit_temperature(logits, np.array([0, 1] * 10))
    assert cal.TEMPERATURE_BOUNDS[0] <= temperature < 0.2  # every image right: sharper is always better
    with pytest.raises(ValueError, match="at least one out-of-fold logit row"):
        cal.fit_temperature(np.zeros((0, 2)), np.zeros(0, dtype=int))


def test_calibrate_keeps_t_at_1_when_no_out_of_fold_prediction_is_wrong() -> None:
    """With no error to learn from, the fitted T runs to its bound (0 or 1 probabilities): the head keeps T = 1."""
    logits = np.array([[4.0, 0.0], [0.0, 4.0]] * 10, dtype=np.float32)
    labels = np.array([0, 1] * 10)
    best = Score(Candidate(kind="logreg", layers=("pool",), normalization="none", C=1.0), accuracy=1.0,
                 log_loss=0.02, seconds=0.0, out_of_fold=(np.arange(20), logits))
    probe = Probe(candidate=best.candidate, model=None, train_seconds=0.0)
    calibrated, record = cal.calibrate(probe, best, labels, method="temperature", ece_bins=15)
    assert calibrated.temperature == 1.0 and record["method"] == "none" and "20 out-of-fold" in record["reason"]
    labels[0] = 1  # one error: the temperature is fitted
    calibrated, record = cal.calibrate(probe, best, labels, method="temperature", ece_bins=15)
    assert record["method"] == "temperature" and calibrated.temperature == record["temperature"] != 1.0


def protocol(**head) -> dict:
    dataset, classes = protocol_dataset()
    params = HeadParams(C=(0.01, 1.0), feature_sets=(("pool",),), knn_k=(5,), few_shot=(1,), few_shot_draws=1,
                        **head)
    return hd.evaluate_protocol(dataset, classes, params, [("pool",)])


def test_the_protocol_fits_the_temperature_on_the_chosen_candidates_out_of_fold_logits() -> None:
    result = protocol()
    best, record = result["best"], result["calibration"]
    rows, logits = best.out_of_fold
    assert sorted(rows.tolist()) == hd.selection_rows(protocol_dataset()[0].split).tolist()  # every selection row
    assert [s for s in result["scores"] if s.out_of_fold is not None] == [best]  # the others were dropped
    labels = protocol_dataset()[0].labels
    assert record["temperature"] == pytest.approx(cal.fit_temperature(logits, labels[rows]))
    assert record["temperature"] == result["probe"].temperature
    assert np.mean(logits.argmax(1) == labels[rows]) == pytest.approx(best.accuracy)  # the scored logits
    assert record["selection"]["log_loss_after"] <= record["selection"]["log_loss_before"]
    assert set(record["heldout"]) == {"ece_before", "ece_after", "log_loss_before", "log_loss_after"}
    layers = "layers=" + "+".join(best.candidate.layers)
    np.testing.assert_array_equal(result["predictions"]["probe"].argmax(1), result["predictions"][layers].argmax(1))
    assert not np.allclose(result["predictions"]["probe"], result["predictions"][layers])  # calibrated, not raw

    off = protocol(calibration="none")
    assert off["calibration"] == {"method": "none", "temperature": 1.0, "reason": "head.calibration: none",
                                  "heldout": off["calibration"]["heldout"]}
    assert off["calibration"]["heldout"]["ece_before"] == off["calibration"]["heldout"]["ece_after"]
    np.testing.assert_array_equal(off["predictions"]["probe"], off["predictions"][layers])


def test_svm_probabilities_are_left_to_their_platt_scaling() -> None:
    result = protocol(kind=("linear_svm",))
    assert result["calibration"]["method"] == "none" and result["probe"].temperature == 1.0
    assert "Platt" in result["calibration"]["reason"]
    assert result["best"].out_of_fold is None
