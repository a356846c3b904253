"""stages.head: every head kind and normalization, the selection protocol (poisoned held-out labels change no
choice), k-NN and few-shot, exported head == trained head, provenance checks, and the stage end to end on a tiny
backbone (metrics, predictions, errors.csv, plots, classifier.pt)."""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from stages import evaluation
from stages import head as hd
from stages import neighbours, plots, probes
from stages.backbones import (IMAGENET_MEAN, IMAGENET_STD, Backbone, Preprocess, WeightsSource, build_feature_model,
                              build_model)
from stages.images import MANIFEST_FIELDS, eval_dataset, read_manifest
from stages.metrics import classification_metrics
from stages.params import HeadParams
from stages.export import build_head, load_classifier

KINDS = ("logreg", "linear_svm", "svm_rbf", "softmax")
TINY_ARCH = "timm:test_efficientnet"
TINY_LAYERS = ("pool", "blocks.3")


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here runs on one torch thread (fixture in conftest.py)."""


def blobs(n_per_class: int, n_classes: int, dim: int, *, seed: int, spread: float = 4.0):
    """Gaussian blobs: centres N(0, spread^2), unit noise; features [n, dim] float32, labels [n]."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(100).normal(0, spread, (n_classes, dim))
    y = np.repeat(np.arange(n_classes), n_per_class)
    return (centres[y] + rng.normal(0, 1, (len(y), dim))).astype(np.float32), y


# ------------------------------------------------------------------------------------------------ heads
def arrays(x: np.ndarray, y: np.ndarray, split: str = "train", layer: str = "pool") -> hd.Dataset:
    return hd.Dataset.from_arrays({layer: x}, y, [split] * len(y))


def fit(x: np.ndarray, y: np.ndarray, kind: str, C: float, normalization: str = "standardize",
        max_iter: int = 2000) -> hd.Probe:
    return hd.fit_candidate(arrays(x, y), np.arange(len(y)), hd.Candidate(kind, ("pool",), normalization, C),
                            max_iter=max_iter, seed=0)


@pytest.mark.parametrize("n_classes", [2, 3])
@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_separates_blobs_and_its_export_reproduces_it(kind: str, n_classes: int) -> None:
    x_train, y_train = blobs(20, n_classes, 12, seed=1)
    x_val, y_val = blobs(20, n_classes, 12, seed=2)
    probe = fit(x_train, y_train, kind, 1.0)
    proba = probe.predict_proba(x_val)
    assert proba.shape == (len(y_val), n_classes) and np.allclose(proba.sum(1), 1)
    assert np.mean(proba.argmax(1) == y_val) >= 0.95
    assert probe.warnings == []

    spec = hd.export_head(probe)  # float64 tensors, scaler folded in (linear kinds)
    exported = build_head(spec)(torch.from_numpy(x_val.astype(np.float64))).numpy()
    # the probe normalizes in float32 (as features are stored), the export in float64: equal to float32 rounding
    np.testing.assert_allclose(exported, proba, rtol=0, atol=1e-7)
    assert hd.verify_export(spec, probe, x_val) < 1e-7
    assert spec["type"] == ("rbf_svm" if kind == "svm_rbf" else "linear")
    if spec["type"] == "linear":
        assert spec["weight"].shape == ((1 if kind == "linear_svm" and n_classes == 2 else n_classes), 12)


@pytest.mark.parametrize("normalization", ["standardize", "l2", "l2+standardize"])
@pytest.mark.parametrize("kind", ["logreg", "svm_rbf"])
def test_two_layer_feature_sets_export_their_normalization(kind: str, normalization: str) -> None:
    """Concatenated layers with per-layer L2: the exported head (L2Blocks + folded scaler) equals the probe."""
    x_a, y = blobs(15, 3, 6, seed=10)
    x_b = np.random.default_rng(11).normal(0, 50, (len(y), 4)).astype(np.float32)  # another scale entirely
    dataset = hd.Dataset.from_arrays({"pool": x_a, "mid": x_b}, y, ["train"] * len(y))
    candidate = hd.Candidate(kind, ("pool", "mid"), normalization, 1.0)
    probe = hd.fit_candidate(dataset, np.arange(len(y)), candidate, max_iter=2000, seed=0)
    raw = np.concatenate([x_a, x_b], axis=1)
    spec = hd.export_head(probe)
    assert spec.get("l2_blocks") == ([6, 4] if "l2" in normalization else None)
    assert hd.verify_export(spec, probe, raw) < 1e-7  # float32 normalization in the probe, float64 in the export
    blocks = evaluation.normalize_blocks([x_a, x_b], "l2")
    np.testing.assert_allclose(np.linalg.norm(blocks[:, :6], axis=1), np.sqrt(6), rtol=1e-6)  # float32
    np.testing.assert_allclose(np.linalg.norm(blocks[:, 6:], axis=1), np.sqrt(4), rtol=1e-6)  # float32


def test_torch_linear_probe_matches_sklearn_logistic_regression() -> None:
    """Same objective (mean cross-entropy + |W|^2 / (2 C n)): same probabilities to ~1e-4."""
    x, y = blobs(15, 3, 8, seed=3, spread=1.0)
    x = StandardScaler().fit_transform(x)
    ours = probes.LinearProbe(0.5).fit(x.astype(np.float32), y)
    reference = LogisticRegression(C=0.5, tol=1e-10, max_iter=10_000).fit(x, y)
    np.testing.assert_allclose(ours.predict_proba(x), reference.predict_proba(x), atol=1e-4)


def test_linear_probe_fits_float16_rows_in_chunks_to_the_whole_batch_solution(monkeypatch) -> None:
    """Float16 features (as stored) are fitted chunk by chunk, each chunk converted to float32: the same objective
    as the whole float32 batch, so the same probe; the float16 array itself is never copied whole."""
    x, y = blobs(40, 3, 8, seed=5, spread=1.0)
    x16 = StandardScaler().fit_transform(x).astype(np.float16)
    whole = probes.LinearProbe(0.5).fit(x16.astype(np.float32), y)
    monkeypatch.setattr(probes, "FIT_CHUNK_ROWS", 7)  # 120 rows: 18 chunks, the last one short
    seen = []
    original = np.asarray

    def spy(a, *args, **kwargs):
        if isinstance(a, np.ndarray) and a.dtype == np.float16 and kwargs.get("dtype") is np.float32:
            seen.append(len(a))
        return original(a, *args, **kwargs)

    monkeypatch.setattr(probes.np, "asarray", spy)
    chunked = probes.LinearProbe(0.5).fit(x16, y)
    monkeypatch.setattr(probes.np, "asarray", original)
    assert seen and max(seen) == 7
    np.testing.assert_allclose(chunked.coef_, whole.coef_, atol=1e-4)
    np.testing.assert_allclose(chunked.predict_proba(x16), whole.predict_proba(x16), atol=1e-5)


def imbalanced(counts: tuple[int, ...], dim: int, *, seed: int, shift: float = 1.0):
    """Overlapping classes of `counts` rows each: N(shift * e_c, 1) features [n, dim] float32, labels [n]."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(len(counts)), counts)
    return (rng.normal(0, 1, (len(y), dim)) + np.eye(len(counts), dim)[y] * shift).astype(np.float32), y


def test_balanced_class_weights_match_sklearn_and_lift_the_small_classes_recall() -> None:
    """class_weight="balanced" weighs class c by n / (K n_c) in the loss, as scikit-learn does: the same
    coefficients as LogisticRegression(class_weight="balanced"), and the small classes are found more often."""
    x, y = imbalanced((60, 12, 6), 6, seed=3)
    x = StandardScaler().fit_transform(x).astype(np.float32)
    plain = probes.LinearProbe(0.5).fit(x, y)
    balanced = probes.LinearProbe(0.5, class_weight="balanced").fit(x, y)
    reference = LogisticRegression(C=0.5, tol=1e-10, max_iter=10_000, class_weight="balanced").fit(x, y)
    np.testing.assert_allclose(balanced.coef_, reference.coef_, atol=1e-3)
    np.testing.assert_allclose(balanced.intercept_, reference.intercept_, atol=1e-3)
    np.testing.assert_allclose(balanced.predict_proba(x), reference.predict_proba(x), atol=1e-3)
    assert np.abs(balanced.coef_ - plain.coef_).max() > 0.1  # the weights changed the fit
    recall = {name: [np.mean(m.predict(x)[y == c] == c) for c in range(3)] for name, m in
              (("plain", plain), ("balanced", balanced))}
    assert recall["balanced"][2] > recall["plain"][2] and recall["balanced"][1] > recall["plain"][1]
    weights = np.where(y == 2, 3.0, 1.0)  # per-row sample weights, as scikit-learn's fit(sample_weight=)
    np.testing.assert_allclose(probes.LinearProbe(0.5).fit(x, y, sample_weight=weights).coef_,
                               LogisticRegression(C=0.5, tol=1e-10, max_iter=10_000).fit(
                                   x, y, sample_weight=weights).coef_, atol=1e-3)


def test_class_weights_apply_to_the_chunked_fit_of_float16_rows(monkeypatch) -> None:
    x, y = imbalanced((50, 10, 5), 6, seed=4)
    x16 = StandardScaler().fit_transform(x).astype(np.float16)
    whole = probes.LinearProbe(0.5, class_weight="balanced").fit(x16.astype(np.float32), y)
    monkeypatch.setattr(probes, "FIT_CHUNK_ROWS", 8)  # 65 rows: 9 chunks, each with its rows' weights
    chunked = probes.LinearProbe(0.5, class_weight="balanced").fit(x16, y)
    np.testing.assert_allclose(chunked.coef_, whole.coef_, atol=1e-4)
    assert np.abs(chunked.coef_ - probes.LinearProbe(0.5).fit(x16, y).coef_).max() > 0.1


def imbalanced_dataset() -> tuple[hd.Dataset, list[str]]:
    """3 overlapping classes of 90, 24 and 12 images; every third image of each class is held out (val)."""
    x, y = imbalanced((90, 24, 12), 8, seed=5, shift=1.2)
    split = np.array(["train", "train", "val"] * (len(y) // 3))
    return hd.Dataset.from_arrays({"pool": x}, y, split), ["a", "b", "c"]


def test_balanced_class_weight_is_a_candidate_where_the_classes_are_imbalanced() -> None:
    params = HeadParams(C=(0.1, 1.0), feature_sets=(("pool",),), normalization=("standardize",), knn_k=(5,),
                        few_shot=(1,), few_shot_draws=1)
    dataset, classes = imbalanced_dataset()
    result = hd.evaluate_protocol(dataset, classes, params, [("pool",)])
    record = result["selection"]["class_weight"]
    assert record["scored"] == ["none", "balanced"] and record["class_counts"] == {"min": 8, "max": 60}
    assert [(c["class_weight"], c["C"]) for c in result["selection"]["candidates"]] == [
        ("none", 0.1), ("none", 1.0), ("balanced", 0.1), ("balanced", 1.0)]
    chosen = result["best"].candidate
    assert record["chosen"] == chosen.class_weight == result["selection"]["chosen"]["class_weight"]
    assert result["probe"].model[-1].class_weight == (None if chosen.class_weight == "none" else "balanced")
    assert hd.export_head(result["probe"])["class_weight"] == chosen.class_weight
    only_none = hd.evaluate_protocol(dataset, classes, dataclasses.replace(params, class_weight=("none",)),
                                     [("pool",)])
    assert {c["class_weight"] for c in only_none["selection"]["candidates"]} == {"none"}

    balanced, _ = protocol_dataset()  # 20 train images per class: balanced weights would all be 1
    skipped = hd.evaluate_protocol(balanced, classes, params, [("pool",)])["selection"]
    assert skipped["class_weight"]["scored"] == ["none"] and "balanced skipped" in skipped["class_weight"]["reason"]
    assert len(skipped["candidates"]) == 2
    alone = hd.evaluate_protocol(balanced, classes, dataclasses.replace(params, class_weight=("balanced",)),
                                 [("pool",)])["selection"]  # asked for alone: scored anyway
    assert {c["class_weight"] for c in alone["candidates"]} == {"balanced"}


def test_choose_takes_the_best_accuracy_then_the_lower_log_loss_then_params_order() -> None:
    def score(C: float, accuracy: float, loss: float) -> hd.Score:
        return hd.Score(hd.Candidate("logreg", ("pool",), "standardize", C), accuracy, loss, 0.0)

    scores = [score(0.1, 0.8, 0.1), score(1.0, 0.9, 0.3), score(10.0, 0.9, 0.2), score(100.0, 0.9, 0.2)]
    assert hd.choose(scores).candidate.C == 10.0
    assert hd.choose(scores[:2]).candidate.C == 1.0


def test_cross_validation_scores_equal_cold_sklearn_fits_on_the_same_folds() -> None:
    """A noisy 200-dimensional problem where CV accuracy depends on C: warm-started sweep == cold fits."""
    rng = np.random.default_rng(3)
    w = np.zeros(200)
    w[:5] = 1.0
    x = rng.normal(0, 1, (120, 200))
    y = (x @ w + rng.normal(0, 1.0, 120) > 0).astype(int)
    Cs = [10.0, 1e-4, 1e-2, 1e-1, 1.0, 1e-3]
    folds = evaluation.stratified_folds(y, folds=5, seed=0)
    scores = hd.select(arrays(x, y), np.arange(len(y)), folds, kinds=["logreg"], feature_sets=[("pool",)],
                       normalizations=["standardize"], Cs=Cs, max_iter=2000, seed=0, n_classes=2)
    cold = {C: np.mean([np.sum(make_pipeline(StandardScaler(), LogisticRegression(C=C, tol=1e-8, max_iter=5000))
                               .fit(x[f], y[f]).predict(x[s]) == y[s]) for f, s in folds]) * len(folds) / len(y)
            for C in sorted(Cs)}
    ours = {s.candidate.C: s.accuracy for s in scores}
    assert ours.keys() == cold.keys() and len(set(cold.values())) > 2
    for C in cold:
        assert ours[C] == pytest.approx(cold[C], abs=1 / len(y) + 1e-9)  # warm start: at most one image differs


def test_convergence_warnings_are_recorded_not_hidden() -> None:
    x, y = blobs(20, 3, 10, seed=6, spread=0.5)
    probe = fit(x, y, "logreg", 100.0, max_iter=2)
    assert len(probe.warnings) == 1 and probe.warnings[0].startswith("refit {")
    assert "max_iter" in probe.warnings[0] or "iterations" in probe.warnings[0]


def test_svm_kinds_need_two_training_images_per_class() -> None:
    x, y = blobs(3, 2, 4, seed=8)
    y[0] = 1  # class 0 now has 2 images, class 1 has 4
    fit(x, y, "svm_rbf", 1.0, max_iter=100)  # 2-fold calibration
    with pytest.raises(hd.HeadError, match="at least 2 training images per class; the smallest class has 1"):
        fit(np.delete(x, 1, 0), np.delete(y, 1), "linear_svm", 1.0, max_iter=100)


# ------------------------------------------------------------------------------------------------ protocol
def protocol_dataset(seed: int = 0) -> tuple[hd.Dataset, list[str]]:
    """3 classes; `pool` separates them weakly, `mid` adds signal; 60 train, 30 held-out (val) images."""
    x, y = blobs(30, 3, 10, seed=seed, spread=0.3)
    mid = np.random.default_rng(seed + 1).normal(0, 1, (len(y), 4)) + np.eye(3, 4)[y] * 3.0
    split = np.array(["train", "train", "val"] * 30)
    return hd.Dataset.from_arrays({"pool": x, "mid": mid.astype(np.float32)}, y, split), ["a", "b", "c"]


def test_poisoned_heldout_labels_change_no_choice() -> None:
    """The held-out rows never reach a fit or a choice: scrambling their labels leaves every choice as it was
    (and only the held-out metrics move)."""
    dataset, classes = protocol_dataset()
    params = HeadParams(C=(0.01, 0.1, 1.0), feature_sets=(("pool",), ("pool", "mid")), knn_k=(1, 5, 15),
                        few_shot=(1, 5), few_shot_draws=3)
    feature_sets = [("pool",), ("pool", "mid")]
    clean = hd.evaluate_protocol(dataset, classes, params, feature_sets)
    labels = dataset.labels.copy()
    held = dataset.rows("val")
    labels[held] = (labels[held] + 1) % 3
    poisoned = hd.evaluate_protocol(dataclasses.replace(dataset, labels=labels), classes, params, feature_sets)
    assert clean["heldout_split"] == poisoned["heldout_split"] == "val"
    assert clean["selection"]["chosen"] == poisoned["selection"]["chosen"]
    assert clean["probe"].temperature == poisoned["probe"].temperature != 1.0  # fitted on selection rows only
    def without_time(candidates: list[dict]) -> list[dict]:
        return [{k: v for k, v in c.items() if k != "seconds"} for c in candidates]

    assert without_time(clean["selection"]["candidates"]) == without_time(poisoned["selection"]["candidates"])
    assert clean["knn"]["k"] == poisoned["knn"]["k"] and clean["knn"]["sweep"] == poisoned["knn"]["sweep"]
    assert [s["C"] for s in clean["feature_sets"]] == [s["C"] for s in poisoned["feature_sets"]]
    for row in clean["predictions"]:  # same models, same predictions; only the truth changed
        np.testing.assert_array_equal(clean["predictions"][row], poisoned["predictions"][row])
    assert clean["feature_sets"][0]["heldout"]["accuracy"] != poisoned["feature_sets"][0]["heldout"]["accuracy"]
    assert clean["selection"]["n"] == 60 and clean["predictions"]["probe"].shape == (30, 3)


def test_more_selection_rows_than_the_limit_choose_on_a_stratified_subsample_and_refit_on_all() -> None:
    """head.selection_max_rows: the choices come from a seeded subsample of the selection rows (split x class
    kept), never a held-out row; the chosen setting is refit on every selection row; metrics say so."""
    dataset, classes = protocol_dataset()
    split = np.array(["train", "val", "test"] * 30)
    dataset = dataclasses.replace(dataset, split=split)
    params = HeadParams(C=(0.1, 1.0), folds=2, feature_sets=(("pool",),), knn_k=(1, 5), few_shot=(1,),
                        few_shot_draws=1, selection_max_rows=30)
    chooser, used = hd.choice_rows(dataset, hd.selection_rows(dataset.split), params)
    assert used["available"] == 60 and used["used"] == len(chooser) == 30 and "seed 0" in used["reduction"]
    assert not np.isin(chooser, dataset.rows("test")).any()
    assert sorted(np.bincount(dataset.labels[chooser] * 2 + (dataset.split[chooser] == "val"))) == [5] * 6
    np.testing.assert_array_equal(chooser, hd.choice_rows(dataset, hd.selection_rows(dataset.split), params)[0])
    result = hd.evaluate_protocol(dataset, classes, params, [("pool",)])
    assert result["selection"]["rows"] == used and result["selection"]["n"] == 60
    assert len(result["scores"]) == 2 * len(params.normalization)
    assert all(abs(s.accuracy * 30 - round(s.accuracy * 30)) < 1e-9 for s in result["scores"])  # 30 rows scored
    refit = hd.fit_candidate(dataset, hd.selection_rows(dataset.split), result["best"].candidate, max_iter=2000, seed=0)
    held = dataset.eval_set(("pool",), "none", dataset.rows("test"))
    calibrated = dataclasses.replace(refit, temperature=result["probe"].temperature)  # T from the 30 that chose
    assert result["calibration"]["fitted_on"]["images"] == 30 and result["probe"].temperature != 1.0
    np.testing.assert_allclose(result["probe"].predict_proba(held), calibrated.predict_proba(held))  # refit on all 60
    everything = hd.evaluate_protocol(dataset, classes, dataclasses.replace(params, selection_max_rows=None), [("pool",)])
    assert everything["selection"]["rows"] == {"available": 60, "used": 60, "reduction": None}


def test_stratified_subsample_keeps_each_share_and_a_minimum_per_stratum() -> None:
    strata = np.repeat([0, 1, 2], [900, 95, 5])
    drawn = evaluation.stratified_subsample(strata, size=100, seed=1, min_per_stratum=3)
    assert np.bincount(strata[drawn]).tolist() == [90, 10, 3] and np.all(np.diff(drawn) > 0)
    np.testing.assert_array_equal(drawn, evaluation.stratified_subsample(strata, size=100, seed=1, min_per_stratum=3))
    assert not np.array_equal(drawn, evaluation.stratified_subsample(strata, size=100, seed=2, min_per_stratum=3))
    np.testing.assert_array_equal(evaluation.stratified_subsample(strata[:50], size=100, seed=0), np.arange(50))


def test_the_test_split_is_held_out_when_there_is_one_and_val_then_selects() -> None:
    dataset, classes = protocol_dataset()
    split = np.array(["train", "val", "test"] * 30)
    dataset = dataclasses.replace(dataset, split=split)
    result = hd.evaluate_protocol(dataset, classes, HeadParams(C=(1.0,), feature_sets=(("pool",),), knn_k=(5,),
                                                               few_shot=(1,), few_shot_draws=1), [("pool",)])
    assert result["heldout_split"] == "test" and result["selection"]["split"] == "train+val"
    assert result["selection"]["n"] == 60 and len(result["heldout_rows"]) == 30
    by_val = hd.evaluate_protocol(dataset, classes, HeadParams(C=(0.01, 1.0), selection="val", feature_sets=(
        ("pool",),), knn_k=(5,), few_shot=(1,), few_shot_draws=1), [("pool",)])
    assert by_val["selection"]["method"] == "val" and by_val["selection"]["n"] == 60  # refit on train+val
    with pytest.raises(hd.HeadError, match="head.selection: val needs train, val and test"):
        hd.evaluate_protocol(protocol_dataset()[0], classes, HeadParams(selection="val"), [("pool",)])


def test_the_concatenated_layer_wins_where_it_carries_the_signal() -> None:
    dataset, classes = protocol_dataset()
    result = hd.evaluate_protocol(dataset, classes, HeadParams(C=(0.1, 1.0), knn_k=(5,), few_shot=(1,),
                                                               few_shot_draws=1), [("pool",), ("pool", "mid")])
    sets = {tuple(s["layers"]): s for s in result["feature_sets"]}
    assert sets[("pool", "mid")]["selection_accuracy"] > sets[("pool",)]["selection_accuracy"]
    assert result["selection"]["chosen"]["layers"] == ["pool", "mid"]
    assert set(result["predictions"]) == {"probe", "knn", "layers=pool", "layers=pool+mid"}


def test_augmented_rows_train_only_with_their_own_image() -> None:
    x, y = blobs(4, 2, 3, seed=12)
    extra = np.arange(6 * 3, dtype=np.float32).reshape(6, 3)
    dataset = dataclasses.replace(arrays(x, y), extra={"pool": extra}, extra_source=np.array([0, 0, 5, 6, 7, 7]))
    features, labels = dataset.fit_set(("pool",), "none", np.array([0, 1, 7]))
    np.testing.assert_array_equal(features, np.concatenate([x[[0, 1, 7]], extra[[0, 1, 4, 5]]]))
    np.testing.assert_array_equal(labels, np.concatenate([y[[0, 1, 7]], y[[0, 0, 7, 7]]]))
    views = dataclasses.replace(dataset, views_replace_images=True)
    assert len(views.fit_set(("pool",), "none", np.array([0, 7]))[1]) == 4  # the views replace the mean row


def test_knn_votes_by_similarity_and_few_shot_draws_repeat_by_seed() -> None:
    fit_x = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    fit_y = np.array([0, 0, 1])
    proba = neighbours.knn_proba(fit_x, fit_y, np.array([[0.2, 1.0]]), k=3, n_classes=2)
    sims = np.array([0.2, 0.2 * 0.9 + 0.1, 1.0]) / np.linalg.norm([0.2, 1.0]) / np.linalg.norm(fit_x, axis=1)
    weights = np.exp(sims / neighbours.KNN_TEMPERATURE)
    np.testing.assert_allclose(proba[0], [weights[:2].sum() / weights.sum(), weights[2] / weights.sum()], rtol=1e-5)
    y = np.repeat([0, 1, 2], [5, 3, 1])
    first = evaluation.draw_few_shot(y, shots=2, seed=4)
    np.testing.assert_array_equal(first, evaluation.draw_few_shot(y, shots=2, seed=4))
    assert np.bincount(y[first]).tolist() == [2, 2, 1]
    assert not np.array_equal(first, evaluation.draw_few_shot(y, shots=2, seed=5)) or len(set(
        tuple(evaluation.draw_few_shot(y, shots=2, seed=s)) for s in range(6))) > 1


def test_no_heldout_split_is_an_error_naming_the_fix() -> None:
    x, y = blobs(5, 2, 3, seed=13)
    with pytest.raises(hd.HeadError, match="prepare.test_fraction"):
        hd.evaluate_protocol(arrays(x, y), ["a", "b"], HeadParams(), [("pool",)])


# ------------------------------------------------------------------------------------------------ metrics
def test_ece_of_a_toy_equals_the_hand_computed_value() -> None:
    """10 predictions: 4 at confidence 0.9 with 3 right, 6 at 0.6 with 3 right (15 bins: 0.9 in (13/15, 14/15],
    0.6 in (8/15, 9/15]). ECE = 0.4 * |0.75 - 0.9| + 0.6 * |0.5 - 0.6| = 0.06 + 0.06 = 0.12."""
    probs = np.array([[0.9, 0.1]] * 4 + [[0.6, 0.4]] * 6)
    labels = np.array([0, 0, 0, 1] + [0, 0, 0, 1, 1, 1])
    metrics = classification_metrics(probs, labels, ["a", "b"], ece_bins=15)
    assert metrics["ece"] == pytest.approx(0.12, abs=1e-12)
    assert metrics["accuracy"] == 0.6
    bins = plots.calibration_bins(probs.max(1), probs.argmax(1) == labels, n_bins=15)
    assert [(b["bin"], b["count"], b["accuracy"]) for b in bins] == [(8, 6, 0.5), (13, 4, 0.75)]
    assert [b["confidence"] for b in bins] == pytest.approx([0.6, 0.9])

    calibrated = np.array([[0.8, 0.2]] * 5 + [[0.4, 0.6]] * 5)  # 4 of 5 right at 0.8, 3 of 5 at 0.6
    labels = np.array([0, 0, 0, 0, 1] + [1, 1, 1, 0, 0])
    assert classification_metrics(calibrated, labels, ["a", "b"], ece_bins=15)["ece"] == pytest.approx(0, abs=1e-12)


# ------------------------------------------------------------------------------------------------ a tiny project
def save_image(path: Path, label: int, seed: int) -> str:
    """A 40x48 noisy image, reddish for class 0 and bluish for class 1; returns the sha256 of the file."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 120, (48, 40, 3))
    pixels[..., 0 if label == 0 else 2] += 120
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.astype(np.uint8)).save(path, quality=95)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_project(root: Path, *, n_train: int = 8, n_val: int = 4, n_test: int = 2, mislabeled: int = 0,
                 head: dict | None = None) -> dict:
    """data/raw/<split>/<class>/*.jpg for classes ants (0) and bees (1), the manifest, tiny random weights
    (timm test_efficientnet, 32x32 input) and a params.yaml declaring them as the custom backbone `tiny`.
    mislabeled: the first this many train images of each class look like the other class (so that some
    out-of-fold predictions are wrong and a temperature can be fitted)."""
    raw = root / "data" / "raw"
    classes = ["ants", "bees"]
    rows = []
    for split, count in (("train", n_train), ("val", n_val), ("test", n_test)):
        for label, name in enumerate(classes):
            for i in range(count):
                rel = f"{split}/{name}/{name}{i:02d}.jpg"
                looks = 1 - label if split == "train" and i < mislabeled else label
                rows.append([rel, name, label, split, save_image(raw / rel, looks, len(rows)), 40, 48])
    prepared = root / "data" / "prepared"
    prepared.mkdir(parents=True)
    with open(prepared / "manifest.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(MANIFEST_FIELDS)
        writer.writerows(sorted(rows))
    (prepared / "classes.json").write_text(json.dumps(classes))
    torch.manual_seed(0)
    model = build_model(Backbone(name="tiny", arch=TINY_ARCH, classifier=None, weights=WeightsSource(filename=""),
                                 preprocess=None))  # type: ignore[arg-type]
    weights = root / "models" / "pretrained" / "tiny.pth"
    weights.parent.mkdir(parents=True)
    torch.save(model.state_dict(), weights)
    sha = hashlib.sha256(weights.read_bytes()).hexdigest()
    params = {"backbones": ["tiny"],
              "weights": {"custom": {"tiny": {"arch": TINY_ARCH, "source": str(weights), "sha256": sha,
                                              "input_size": 32, "resize": 36,
                                              "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}}},
              "extract": {"layers": list(TINY_LAYERS), "precision": "float32", "compile": "off", "num_workers": 0,
                          "batch_size": 8},
              "head": {"kind": "logreg", "C": [0.1, 1.0], "feature_sets": [["pool"], ["pool", "blocks.3"]],
                       **(head or {})}}
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    backbone = Backbone(name="tiny", arch=TINY_ARCH, classifier=None, weights=WeightsSource(filename="tiny.pth"),
                        preprocess=Preprocess(input_size=32, resize=36, interpolation="bilinear",
                                              mean=IMAGENET_MEAN, std=IMAGENET_STD))
    return {"root": root, "raw": raw, "manifest": prepared / "manifest.csv", "weights": weights,
            "backbone": backbone, "classes": classes, "features": root / "features" / "tiny.h5"}


def write_features(project: dict, *, layers=TINY_LAYERS, **attrs) -> Path:
    """features/tiny.h5 in the extract stage's layout (contract in the project notes), computed one image at a
    time with stages.backbones.build_feature_model over stages.images.eval_dataset."""
    backbone = project["backbone"]
    manifest = read_manifest(project["manifest"])
    model = build_feature_model(backbone, project["weights"], tuple(layers))
    images = eval_dataset(project["raw"], [r.path for r in manifest], [r.label for r in manifest],
                          backbone.preprocess)
    with torch.inference_mode():
        outs = [model(images[i][0][None]) for i in range(len(images))]
    out = project["features"]
    out.parent.mkdir(parents=True, exist_ok=True)
    defaults = {"backbone": "tiny", "weights_sha256": hashlib.sha256(project["weights"].read_bytes()).hexdigest(),
                "layers": json.dumps(list(layers)), "preprocess": json.dumps(backbone.preprocess.as_dict()),
                "storage_dtype": "float32", "precision": "float32", "n_images": len(manifest),
                "manifest_sha256": hashlib.sha256(project["manifest"].read_bytes()).hexdigest(),
                "classes": json.dumps(project["classes"]), "versions": "{}", "tta": '["none"]', "tta_mode": "average"}
    with h5py.File(out, "w") as h5:
        for layer in layers:
            h5.create_dataset(f"features/{layer}", data=torch.cat([o[layer] for o in outs]).numpy(),
                              track_times=False)
        h5.create_dataset("labels", data=np.array([r.label for r in manifest], dtype=np.int64))
        h5.create_dataset("split", data=np.array([r.split.encode() for r in manifest], dtype="S5"))
        h5.create_dataset("sha256", data=np.array([r.sha256.encode() for r in manifest], dtype="S64"))
        h5.create_dataset("path", data=[r.path for r in manifest], dtype=h5py.string_dtype("utf-8"))
        for key, value in {**defaults, **attrs}.items():
            h5.attrs[key] = value
    return out


def run_stage(project: dict) -> int:
    root = project["root"]
    return hd.main(["--backbone", "tiny", "--features", str(project["features"]),
                    "--manifest", str(project["manifest"]), "--weights", str(project["weights"]),
                    "--raw", str(project["raw"]), "--model", str(root / "models" / "tiny" / "classifier.pt"),
                    "--reports", str(root / "reports" / "tiny"),
                    "--params", str(root / "params.yaml")])


@pytest.fixture
def project(tmp_path: Path) -> dict:
    project = make_project(tmp_path, mislabeled=1)  # an error or two out of fold: the temperature is fitted
    write_features(project)
    return project


def test_stage_writes_metrics_predictions_errors_plots_and_an_export_that_predicts_the_same(project: dict) -> None:
    params = yaml.safe_load((project["root"] / "params.yaml").read_text())
    params["head"]["feature_sets"] = [["pool"], ["pool", "blocks.3"]]
    params["head"]["normalization"] = ["standardize", "l2+standardize"]
    (project["root"] / "params.yaml").write_text(yaml.safe_dump(params))
    assert run_stage(project) == 0
    reports = project["root"] / "reports" / "tiny"

    metrics = json.loads((reports / "metrics.json").read_text())
    assert (metrics["backbone"], metrics["head"], metrics["heldout_split"]) == ("tiny", "logreg", "test")
    assert metrics["feature_dim"] == {"pool": 256, "pool+blocks.3": 304}["+".join(metrics["layers"])]
    assert (metrics["n_selection"], metrics["n_heldout"]) == (24, 4)  # train + val choose, test is held out
    selection = metrics["selection"]
    assert (selection["method"], selection["folds"], selection["split"]) == ("cv", 5, "train+val")
    assert len(selection["candidates"]) == 2 * 2 * 2  # feature sets x normalizations x C; balanced classes:
    assert selection["class_weight"]["scored"] == ["none"] and "balanced skipped" in selection["class_weight"]["reason"]
    assert selection["chosen"] == {"kind": metrics["head"], "layers": metrics["layers"], "class_weight": "none",
                                   "normalization": metrics["normalization"], "C": metrics["C"]}
    heldout, scaling = metrics["heldout"], metrics["calibration"]
    assert set(heldout) == {"accuracy", "accuracy_ci_low", "accuracy_ci_high", "correct", "mean_class_accuracy",
                            "macro_f1", "log_loss", "ece", "per_class", "n", "ece_calibrated", "log_loss_calibrated"}
    assert scaling["method"] == "temperature" and scaling["fitted_on"]["images"] == 24
    assert (heldout["ece"], heldout["ece_calibrated"]) == (scaling["heldout"]["ece_before"],
                                                           scaling["heldout"]["ece_after"])
    assert metrics["probabilities"] == f"softmax(logits / T), T = {scaling['temperature']:.6g}"
    assert heldout["n"] == 4 and heldout["accuracy_ci_low"] <= heldout["accuracy"] <= heldout["accuracy_ci_high"]
    assert metrics["features"]["manifest_sha256"] == hashlib.sha256(project["manifest"].read_bytes()).hexdigest()
    assert [s["layers"] for s in metrics["feature_sets"]] == [["pool"], ["pool", "blocks.3"]]
    assert metrics["knn"]["k"] in (1, 5, 10, 20) and metrics["knn"]["heldout"]["n"] == 4
    assert [p["shots"] for p in metrics["few_shot"]] == [1, 2, 5, 10, "all"]
    assert metrics["few_shot"][-1]["mean"] == heldout["accuracy"]

    test_rows = [r for r in read_manifest(project["manifest"]) if r.split == "test"]
    predictions = evaluation.read_predictions(reports / "predictions.json")
    assert predictions.split == "test" and predictions.paths == [r.path for r in test_rows]
    assert set(predictions.rows) == {"probe", "knn", "layers=pool", "layers=pool+blocks.3"}
    assert np.mean(predictions.correct("probe")) == heldout["accuracy"]

    confusion = json.loads((reports / "plots" / "confusion.json").read_text())
    assert [c["actual"] for c in confusion] == [r.cls for r in test_rows]
    assert np.mean([c["actual"] == c["predicted"] for c in confusion]) == heldout["accuracy"]
    calibration = json.loads((reports / "plots" / "calibration.json").read_text())
    assert sum(b["count"] for b in calibration) == 4
    per_class = json.loads((reports / "plots" / "per_class.json").read_text())
    assert [p["class"] for p in per_class] == ["ants", "bees"]
    for name in ("confusion.png", "calibration.png", "per_class.png"):
        assert (reports / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    with open(reports / "errors.csv", newline="") as fh:
        errors = list(csv.DictReader(fh))
    wrong = sorted((r.path, c["actual"], c["predicted"]) for r, c in zip(test_rows, confusion)
                   if c["actual"] != c["predicted"])
    assert [(e["path"], e["true"], e["predicted"]) for e in errors] == wrong

    export = torch.load(project["root"] / "models" / "tiny" / "classifier.pt", weights_only=True)
    assert export["format_version"] == 3 and export["classes"] == ["ants", "bees"]
    assert (export["head"]["temperature"], export["head"]["class_weight"]) == (scaling["temperature"], "none")
    assert export["layers"] == metrics["layers"] and export["head"]["normalization"] == metrics["normalization"]
    assert export["backbone"]["preprocess"]["input_size"] == 32
    assert export["head"]["weight"].shape == (2, metrics["feature_dim"])
    classifier = load_classifier(project["root"] / "models" / "tiny" / "classifier.pt")
    images = eval_dataset(project["raw"], [r.path for r in test_rows], [0] * len(test_rows), classifier.preprocess)
    with torch.inference_mode():
        probabilities = classifier(torch.stack([images[i][0] for i in range(len(images))])).numpy()
    assert [project["classes"][k] for k in probabilities.argmax(1)] == [c["predicted"] for c in confusion]
    np.testing.assert_allclose(probabilities.max(1), predictions.rows["probe"]["confidence"], atol=1e-5)

    pool = torch.load(project["root"] / "models" / "tiny" / "probe_pool.pt", weights_only=True)
    pool_set = next(s for s in metrics["feature_sets"] if s["layers"] == ["pool"])
    assert pool["layers"] == ["pool"] and pool["provenance"]["chosen"]["C"] == pool_set["C"]  # fine-tune's start
    card = (project["root"] / "models" / "tiny" / "MODEL_CARD.md").read_text()
    assert f"accuracy [95% Wilson interval] | {heldout['accuracy']:.4f} [{heldout['accuracy_ci_low']:.4f}" in card
    assert "## Held-out performance (test split, 4 images" in card and "| ants | 8 | 4 | 2 |" in card
    assert metrics["features"]["weights_sha256"] in card and "python -m stages.predict" in card
    assert f"T = {scaling['temperature']:.4g}, fitted on the out-of-fold logits of 24 selection images" in card
    assert f"{heldout['ece']:.4f} before, {heldout['ece_calibrated']:.4f} after temperature scaling" in card
    assert pool["head"]["temperature"] == 1.0  # the fine-tune's start is the uncalibrated pool probe


def test_the_export_of_a_two_layer_l2_probe_predicts_what_the_head_evaluated(project: dict) -> None:
    params = yaml.safe_load((project["root"] / "params.yaml").read_text())
    params["head"].update(feature_sets=[["pool", "blocks.3"]], normalization=["l2"], C=[1.0])
    (project["root"] / "params.yaml").write_text(yaml.safe_dump(params))
    assert run_stage(project) == 0
    reports = project["root"] / "reports" / "tiny"
    predictions = evaluation.read_predictions(reports / "predictions.json")
    classifier = load_classifier(project["root"] / "models" / "tiny" / "classifier.pt")
    assert classifier.layers == ("pool", "blocks.3")
    images = eval_dataset(project["raw"], predictions.paths, [0] * len(predictions.paths), classifier.preprocess)
    with torch.inference_mode():
        probabilities = classifier(torch.stack([images[i][0] for i in range(len(images))])).numpy()
    np.testing.assert_array_equal(probabilities.argmax(1), predictions.rows["probe"]["predicted"])
    np.testing.assert_allclose(probabilities.max(1), predictions.rows["probe"]["confidence"], atol=1e-5)


# ------------------------------------------------------------------------------------------------ provenance
def provenance_error(project: dict) -> str:
    with pytest.raises(hd.ProvenanceError) as caught:
        hd.load_checked_features(backbone_name="tiny", features_path=project["features"],
                                 manifest_path=project["manifest"], weights_path=project["weights"])
    return str(caught.value)


def test_features_from_another_backbone_are_refused(project: dict) -> None:
    write_features(project, backbone="resnet50")
    message = provenance_error(project)
    assert message.startswith(f"{project['features']}: attribute backbone is 'resnet50' but expected 'tiny'")
    assert message.endswith("Re-run `dvc repro extract@tiny`.")


def test_a_stale_manifest_is_detected(project: dict) -> None:
    text = project["manifest"].read_text()
    project["manifest"].write_text(text.replace("ants00.jpg,ants,0,train", "ants00.jpg,ants,0,val"))
    expected = hashlib.sha256(project["manifest"].read_bytes()).hexdigest()
    assert f"attribute manifest_sha256 is '{hashlib.sha256(text.encode()).hexdigest()}' but expected '{expected}' " \
           f"(sha256 of {project['manifest']})" in provenance_error(project)


def test_other_weights_are_detected(project: dict) -> None:
    write_features(project, weights_sha256="0" * 64)
    assert f"attribute weights_sha256 is '{'0' * 64}'" in provenance_error(project)


def test_rows_that_do_not_match_the_manifest_are_detected(project: dict) -> None:
    with h5py.File(project["features"], "r+") as h5:
        sha = h5["sha256"][()]
        sha[3] = b"f" * 64
        h5["sha256"][...] = sha
    row = read_manifest(project["manifest"])[3]
    message = provenance_error(project)
    assert f"row 3 (path, sha256, label, split) is ({row.path!r}, '{'f' * 64}', {row.label}, {row.split!r}) " \
           f"but expected ({row.path!r}, {row.sha256!r}, {row.label}, {row.split!r})" in message
    assert "Re-run `dvc repro extract@tiny`" in message


def test_main_reports_a_missing_layer_and_exits_1(project: dict, caplog: pytest.LogCaptureFixture) -> None:
    params = yaml.safe_load((project["root"] / "params.yaml").read_text())
    params["head"]["feature_sets"] = [["pool"], ["pool", "blocks.5"]]  # a layer extract did not store
    (project["root"] / "params.yaml").write_text(yaml.safe_dump(params))
    assert run_stage(project) == 1
    assert "head.feature_sets: layer(s) ['blocks.5'] of ['pool', 'blocks.5'] not in" in caplog.text
    assert "add them to extract.layers or edit head.feature_sets" in caplog.text


def test_feature_sets_asking_for_mid_are_skipped_when_the_backbone_declares_none(tmp_path: Path) -> None:
    """A custom backbone without mid_layer: extract skips `mid` with a warning, and so does head; a set naming a
    layer that is not stored stays an error."""
    attrs, features = {"layer_aliases": {}}, tmp_path / "tiny.h5"
    sets = hd.resolve_feature_sets([["pool"], ["pool", "mid"]], attrs, ["pool"], features, no_mid=True)
    assert sets == [("pool",)]
    with pytest.raises(hd.HeadError, match=r"layer\(s\) \['mid'\] of \['pool', 'mid'\] not in"):
        hd.resolve_feature_sets([["pool"], ["pool", "mid"]], attrs, ["pool"], features)  # mid declared, not stored
    with pytest.raises(hd.HeadError, match=r"layer\(s\) \['mid'\]"):
        hd.resolve_feature_sets([["pool", "mid"]], attrs, ["pool"], features, no_mid=True)  # nothing left


# ------------------------------------------------------------------------------------------------ scale
def write_views_file(path: Path, *, n: int = 60, views: int = 2, augmented_every: int = 3) -> None:
    """A float16 features file with `views` TTA view rows per image (tta_mode rows), augmented rows for every
    `augmented_every`-th image, two layers whose classes separate, a third of the images held out (test)."""
    rng = np.random.default_rng(7)
    labels = np.arange(n) % 3
    centres = {"pool": rng.normal(0, 2, (3, 8)), "mid": rng.normal(0, 2, (3, 4))}
    source = np.arange(0, n, augmented_every, dtype=np.int64)
    with h5py.File(path, "w") as h5:
        for layer, centre in centres.items():
            rows = np.repeat(centre[labels], views, axis=0) + rng.normal(0, 1, (n * views, centre.shape[1]))
            h5.create_dataset(f"features/{layer}", data=rows.astype(np.float16), chunks=(16, centre.shape[1]))
            h5.create_dataset(f"augmented/{layer}", data=(centre[labels[source]] + rng.normal(
                0, 1, (len(source), centre.shape[1]))).astype(np.float16), chunks=(8, centre.shape[1]))
        h5["augmented_source"] = source
        h5["labels"] = np.repeat(labels, views).astype(np.int64)
        h5["split"] = np.repeat(np.where((np.arange(n) // 3) % 3 == 2, b"test", b"train").astype("S5"), views)
        h5["sha256"] = np.array([f"{i // views:064x}".encode() for i in range(n * views)], dtype="S64")
        h5.create_dataset("path", data=np.array([f"c/{i // views:03d}.jpg" for i in range(n * views)], dtype=object),
                          dtype=h5py.string_dtype("utf-8"))
        h5.attrs.update(layers=json.dumps(["pool", "mid"]), storage_dtype="float16", classes=json.dumps(list("abc")),
                        tta=json.dumps(["none", "hflip"][:views]), tta_mode="rows" if views > 1 else "average")


def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every chunked path on: refits read their rows in chunks, and every chunk is a few rows."""
    from stages import head_data

    monkeypatch.setattr(head_data, "FIT_IN_MEMORY_BYTES", 0)
    monkeypatch.setattr(head_data, "EVAL_CHUNK_ROWS", 7)
    monkeypatch.setattr(probes, "FIT_CHUNK_ROWS", 13)
    monkeypatch.setattr(probes, "STATS_CHUNK_ROWS", 11)
    monkeypatch.setattr(neighbours, "SEARCH_CHUNK_ROWS", 9)


@pytest.mark.parametrize("views", [1, 2])
def test_the_lazy_chunked_protocol_equals_the_in_memory_one(tmp_path: Path, views: int,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The stage reads the file lazily (head_data.arrange_stored) and refits, predicts and searches in chunks: the
    same rows, choices and predictions as the whole file in memory (head_data.arrange), TTA view rows and augmented
    rows included, audited held-out images dropped the same way."""
    from stages import head_data
    from stages.features import open_features, read_features

    path = tmp_path / "f.h5"
    write_views_file(path, views=views)
    params = HeadParams(C=(0.1, 1.0), feature_sets=(("pool",), ("pool", "mid")), knn_k=(1, 5), few_shot=(1, 2),
                        few_shot_draws=2, folds=3)
    sets = [("pool",), ("pool", "mid")]
    memory = head_data.arrange(read_features(path))
    expected = hd.evaluate_protocol(memory, list("abc"), params, sets)
    with open_features(path) as reader:
        lazy = head_data.arrange_stored(reader)
        index = np.array([0, 4, 5, 30, 56])
        for normalization in ("none", "l2+standardize"):
            np.testing.assert_array_equal(lazy.fit_set(("pool", "mid"), normalization, index)[0],
                                          memory.fit_set(("pool", "mid"), normalization, index)[0])
            np.testing.assert_array_equal(lazy.eval_set(("mid",), normalization, index),
                                          memory.eval_set(("mid",), normalization, index))
        drop = np.isin(np.arange(60), [2, 5, 8])
        np.testing.assert_array_equal(lazy.without(drop).fit_set(("pool",), "none", index)[0],
                                      memory.without(drop).fit_set(("pool",), "none", index)[0])
        small_chunks(monkeypatch)
        got = hd.evaluate_protocol(lazy, list("abc"), params, sets)
    assert got["selection"]["chosen"] == expected["selection"]["chosen"]
    assert [s.accuracy for s in got["scores"]] == [s.accuracy for s in expected["scores"]]
    assert got["knn"]["sweep"] == expected["knn"]["sweep"] and got["knn"]["search"] == expected["knn"]["search"]
    np.testing.assert_array_equal(got["predictions"]["knn"], expected["predictions"]["knn"])
    for row in expected["predictions"]:
        np.testing.assert_allclose(got["predictions"][row], expected["predictions"][row], rtol=0, atol=1e-4)
    assert [p["mean"] for p in got["few_shot"]] == [p["mean"] for p in expected["few_shot"]]
    for layers, probe in expected["probes"].items():
        if len(probe.model) > 1:  # the scaler's statistics, accumulated over chunks of 11 rows
            np.testing.assert_allclose(got["probes"][layers].model[0].mean_, probe.model[0].mean_, rtol=1e-10)
            np.testing.assert_allclose(got["probes"][layers].model[0].var_, probe.model[0].var_, rtol=1e-8)


def test_a_streamed_refit_sees_only_float32_chunks_and_never_copies_the_features_whole(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A refit past head_data.FIT_IN_MEMORY_BYTES: LinearProbe gets row chunks of float32 (never float64), the
    scaler statistics come from row slices, and the traced peak stays below one copy of the features."""
    import tracemalloc

    x, y = blobs(3000, 10, 64, seed=21, spread=0.3)  # 30,000 x 64 float32: 7.7 MB
    dataset = arrays(x, y)
    candidate = hd.Candidate("logreg", ("pool",), "l2+standardize", 1.0)
    in_memory = hd.fit_candidate(dataset, np.arange(len(y)), candidate, max_iter=2000, seed=0)
    small_chunks(monkeypatch)
    monkeypatch.setattr(probes, "FIT_CHUNK_ROWS", 2048)
    monkeypatch.setattr(probes, "STATS_CHUNK_ROWS", 2048)
    seen: list[tuple[int, np.dtype]] = []
    slicing = hd.head_data.FitRows.__getitem__

    def spy(self, key):
        out = slicing(self, key)
        seen.append((len(out), out.dtype))
        return out

    monkeypatch.setattr(hd.head_data.FitRows, "__getitem__", spy)
    tracemalloc.start()
    try:
        streamed = hd.fit_candidate(dataset, np.arange(len(y)), candidate, max_iter=2000, seed=0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert {dtype for _, dtype in seen} == {np.dtype(np.float32)} and max(n for n, _ in seen) == 2048
    assert peak < 0.75 * x.nbytes, f"{peak / 1e6:.1f} MB traced for {x.nbytes / 1e6:.1f} MB of features"
    held = x[:500]  # chunked sums round differently, so L-BFGS may stop one step apart (gradient tolerance 1e-5)
    np.testing.assert_allclose(streamed.predict_proba(held), in_memory.predict_proba(held), rtol=0, atol=1e-3)


def test_a_damaged_file_is_refused_before_anything_is_trained(project: dict, caplog: pytest.LogCaptureFixture) -> None:
    """Read lazily, the stage still checks every value first: the same message as a whole-file read, no outputs."""
    with h5py.File(project["features"], "r+") as h5:
        values = h5["features/pool"][()]
        values[[1, 5], 3] = np.nan
        h5["features/pool"][...] = values
    assert run_stage(project) == 1
    assert "the number of NaN or infinite values in features/pool is 2 but expected 0" in caplog.text
    assert not (project["root"] / "reports" / "tiny" / "metrics.json").exists()
