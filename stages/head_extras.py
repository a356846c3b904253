"""More from the head stage's cached features, beside the chosen probe: the cosine k-NN probe and the few-shot
curve (stages/head.py runs them; `dataset` is its Dataset, stages/head_data.py: `eval_set`, `iter_eval`, `subset`
and `labels`; `chooser` the in-memory Dataset of the images that choose)."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from stages.evaluation import draw_few_shot, spread
from stages.neighbours import cosine_search, cosine_search_rows, knn_vote
from stages.probes import Candidate, fit_recording, probe_pipeline


def knn_probe(dataset: Any, chooser: Any, rows: np.ndarray, heldout: np.ndarray,
              folds: Sequence[tuple[np.ndarray, np.ndarray]], *, feature_sets: Sequence[tuple[str, ...]],
              ks: Sequence[int], n_classes: int, seed: int) -> tuple[dict[str, Any], np.ndarray]:
    """Cosine k-NN (each layer L2-normalized): the feature set and k chosen on `folds` (index pairs into
    `chooser`, the images that choose, in memory; its own choice, not the linear probe's), one neighbour search per
    fold and feature set at the largest k, reused for every k. Then every selection image (`rows`) votes for the
    held-out ones (both read in chunks, stages.neighbours.cosine_search_rows). Returns ({"k", "layers",
    "selection_accuracy", "sweep", "search"}, held-out probabilities [H, K])."""
    ks = sorted(set(int(k) for k in ks))
    sweep: list[dict[str, Any]] = []
    scored = sum(len(s) for _, s in folds)
    for layers in feature_sets:
        correct = np.zeros(len(ks))
        for fit_rows, score_rows in folds:
            found = cosine_search(chooser.eval_set(layers, "l2", fit_rows), chooser.eval_set(layers, "l2", score_rows),
                                  k=ks[-1], seed=seed, in_place=True)  # eval_set's arrays are new
            for j, k in enumerate(ks):
                votes = knn_vote(found, chooser.labels[fit_rows], k=k, n_classes=n_classes)
                correct[j] += np.sum(votes.argmax(1) == chooser.labels[score_rows])
        sweep += [{"layers": list(layers), "k": k, "accuracy": float(c / scored)} for k, c in zip(ks, correct)]
    best = max(enumerate(sweep), key=lambda item: (round(item[1]["accuracy"], 12), -item[0]))[1]
    layers = best["layers"]
    found = cosine_search_rows(lambda r: dataset.eval_set(layers, "l2", rows[r]), len(rows),
                               lambda r: dataset.eval_set(layers, "l2", heldout[r]), len(heldout),
                               k=best["k"], seed=seed)
    proba = knn_vote(found, dataset.labels[rows], k=best["k"], n_classes=n_classes)
    return {"k": best["k"], "layers": layers, "selection_accuracy": best["accuracy"], "sweep": sweep,
            "search": found.search}, proba


def few_shot_curve(dataset: Any, rows: np.ndarray, heldout: np.ndarray, candidate: Candidate, *,
                   shots: Sequence[int], draws: int, seed: int, max_iter: int) -> list[dict[str, Any]]:
    """Held-out accuracy of logreg on `shots` images per class drawn from the selection images (`draws` seeded
    draws each; the candidate's layers, normalization and C, which the selection images chose). The drawn images
    are read once; every model then predicts the held-out images in one chunked pass."""
    drawn = {(k, d): rows[draw_few_shot(dataset.labels[rows], shots=k, seed=seed + d)]
             for k in sorted(set(shots)) for d in range(draws)}
    union = np.unique(np.concatenate(list(drawn.values())))
    few = dataset.subset(union)
    models = {}
    for key, images in drawn.items():
        local = np.searchsorted(union, images)
        models[key] = probe_pipeline("logreg", candidate.normalization, C=candidate.C, max_iter=max_iter,
                                     seed=seed, y=few.labels[local], class_weight=candidate.class_weight)
        fit_recording(models[key], few.eval_set(candidate.layers, candidate.normalization, local), few.labels[local])
    correct = dict.fromkeys(drawn, 0)
    y_heldout, start = dataset.labels[heldout], 0
    for x in dataset.iter_eval(candidate.layers, candidate.normalization, heldout):
        for key, model in models.items():
            correct[key] += int(np.sum(model.predict(x) == y_heldout[start:start + len(x)]))
        start += len(x)
    return [{"shots": k, "draws": draws, **spread([correct[(k, d)] / len(heldout) for d in range(draws)])}
            for k in sorted(set(shots))]
