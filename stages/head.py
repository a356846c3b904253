"""Head stage: heads on the cached features, chosen by an honest protocol, metrics with intervals, an export.

    python -m stages.head --backbone NAME --features features/NAME.h5 --manifest data/prepared/manifest.csv \
        --weights models/pretrained/NAME.pth --raw data/raw --model models/NAME/classifier.pt --reports reports/NAME
    python -m stages.head --bench        # 10,000 x 2048 features, 5-fold CV over 5 values of C: seconds

1. Provenance: the features file must name this backbone, the sha256 of this weight file and of this
   manifest, and hold the manifest's images (path + sha256, in order); otherwise ProvenanceError says which
   attribute differs and to re-run `dvc repro extract@NAME`.
2. Protocol (stages/evaluation.py): the held-out split is test when the manifest has one, else val. Every
   candidate (head.kind x head.feature_sets x head.normalization x head.class_weight x head.C; "balanced" is
   skipped where the selection images' classes are balanced, metrics.json selection.class_weight says so) is
   scored on the other images only:
   stratified k-fold CV (`head.selection: cv`) or train -> val (`val`). The best selection accuracy wins (ties:
   lower log loss, then params order) and is refit on all selection images; the held-out split is predicted
   once, after every choice. Poisoning its labels changes no choice (tests/test_head.py). With more selection
   images than head.selection_max_rows (20,000), the choices are made on a seeded subsample of that many,
   stratified by split and class (a rule by size, never a timing), and the chosen setting is refit on all of
   them; metrics.json `selection.rows` records it. The heads (stages/probes.py): logreg (torch L-BFGS, float32,
   CUDA when present, warm-started along C), linear_svm, svm_rbf (Platt-calibrated).
   Feature sets concatenate pooled layers (`mid`: the backbone's last-but-one stage, attrs layer_aliases);
   normalization: standardize, l2 (each layer to norm sqrt(D)), or l2+standardize. Features stay float32.
   Memory (stages/head_data.py): the file is read lazily, never a whole layer; the choosing rows are read once
   (at most selection_max_rows images); a logreg refit larger than head_data.FIT_IN_MEMORY_BYTES streams its
   rows in chunks (scaler statistics accumulated over chunks); held-out rows are predicted and searched in chunks.
   Calibration (head.calibration: temperature, stages/calibration.py): a logreg head's logits are divided by one
   temperature T fitted on the chosen candidate's out-of-fold selection logits (the folds' own fits, no refit);
   the export applies T, so predict's probabilities are calibrated. metrics.json `calibration` holds T and the
   held-out ECE and log loss before and after; heldout.ece / log_loss stay the uncalibrated values (comparable
   with every other row), heldout.ece_calibrated / log_loss_calibrated are the exported classifier's.
3. From the same cache, no second backbone pass: every feature set's own best candidate (report rows), a cosine
   k-NN probe (feature set and k chosen on the selection folds from one faiss search per fold at the largest k;
   votes weighted exp(similarity / 0.07); exact search up to 50,000 base rows, an inverted-file index above,
   stages/neighbours.py, recorded in metrics.json `knn.search`), and a few-shot curve (head.few_shot images per
   class, head.few_shot_draws seeded draws, logreg with the chosen settings).
4. Augmented training views (extract.augment_views) and TTA view rows (extract.tta_mode: rows) add training rows
   of their image only: a fit on images S uses S's extra rows; a fold never sees its scored images' views.

Outputs (predictions are the argmax of the probabilities everywhere; every accuracy has a 95% Wilson interval):
    reports/NAME/metrics.json        DVC metrics: heldout.* (accuracy, accuracy_ci_low/high, ...), heldout_split,
                                     selection (method, chosen, candidates, class_weight), class_weight,
                                     calibration (T, held-out ECE / log loss before and after), feature_sets, knn,
                                     few_shot
    reports/NAME/predictions.json    held-out predictions per row (probe: calibrated, as exported; knn, layers=...)
    reports/NAME/errors.csv          misclassified held-out images: path,true,predicted,prob (prob of the prediction,
                                     calibrated)
    reports/NAME/plots/confusion.json, calibration.json, per_class.json (DVC plots, held-out) and the same as PNG
    models/NAME/classifier.pt        backbone + preprocessing + head (format: stages/export.py)
    models/NAME/classifier.onnx      the same classifier for ONNX Runtime, checked against it on held-out images
                                     from --raw (decoded as predict decodes them)
    models/NAME/probe_pool.pt        the best probe on the pooled embedding alone: where finetune@NAME starts
    models/NAME/MODEL_CARD.md        what it was trained on, held-out metrics with intervals, provenance, use, limits
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from stages.backbones import (MID_ALIAS, WeightsError, build_model, classifier_path, get_backbone, load_weights,
                              module_version, replace_module)
from stages.io import setup_logging, sha256_file, write_json
from stages import head_data
from stages.features import FeatureReader, FeaturesError, ProvenanceError, open_checked  # noqa: F401 (ProvenanceError: part of head's errors)
from stages.evaluation import (ProtocolError, heldout_split, selection_rows, spread, stratified_folds,
                               stratified_subsample)
from stages.head_data import Dataset, arrange_stored
from stages.metrics import classification_metrics
from stages.head_outputs import write_head_reports
from stages.head_extras import few_shot_curve, knn_probe
from stages.params import HeadParams, ParamError, load_params
from stages.probes import (Candidate, Probe, ProbeError, Score, choose, class_weight_candidates, export_head,
                           fit_recording, probe_pipeline, sweep_C, verify_export)
from stages.calibration import calibrate
from stages.export import build_export, classifier_from_export, preprocess_from, save_export
from stages.export_onnx import onnx_path_for, read_sample_images, save_onnx

logger = logging.getLogger(__name__)

EXPORT_CHECK_ROWS = 8192  # held-out rows the exported head is checked on against the trained probe

class HeadError(FeaturesError):
    """The inputs do not allow training a head; the message names the file or parameter and why."""


def select(dataset: Dataset, rows: np.ndarray, folds: Sequence[tuple[np.ndarray, np.ndarray]], *,
           kinds: Sequence[str], feature_sets: Sequence[tuple[str, ...]], normalizations: Sequence[str],
           Cs: Sequence[float], max_iter: int, seed: int, n_classes: int,
           class_weights: Sequence[str] = ("none",)) -> list[Score]:
    """Score every candidate on `folds` (index pairs into `rows`, the selection images): fit on the fold's fit
    images (plus their augmented / view rows), score its other images. The held-out split never enters. Scores
    come in params order (kind, layers, normalization, class weight, C); the best one, when it is a logit kind,
    keeps its out-of-fold logits (Score.out_of_fold, for temperature scaling), no other does (memory)."""
    scores: list[Score] = []
    for kind, layers, normalization, class_weight in itertools.product(kinds, feature_sets, normalizations,
                                                                       class_weights):
        group = Candidate(kind, tuple(layers), normalization, 0.0, class_weight)
        scores += score_group(dataset, rows, folds, group, Cs=Cs, max_iter=max_iter, seed=seed, n_classes=n_classes)
        best = choose(scores)
        scores = [s if s is best or s.out_of_fold is None else dataclasses.replace(s, out_of_fold=None)
                  for s in scores]
    return scores


def score_group(dataset: Dataset, rows: np.ndarray, folds: Sequence[tuple[np.ndarray, np.ndarray]],
                group: Candidate, *, Cs: Sequence[float], max_iter: int, seed: int, n_classes: int) -> list[Score]:
    """Scores of `group` (a Candidate whose C is ignored) at every C, over every fold; logit kinds with their
    out-of-fold logits (every scored selection image's, from the fit that did not see it)."""
    totals: dict[float, list[Any]] = {}
    scored = np.concatenate([rows[score] for _, score in folds])
    for fit, score in folds:
        tick = time.perf_counter()
        x_fit, y_fit = dataset.fit_set(group.layers, group.normalization, rows[fit])
        x_score = dataset.eval_set(group.layers, group.normalization, rows[score])
        sweep = sweep_C(x_fit, y_fit, x_score, dataset.labels[rows[score]], kind=group.kind,
                        normalization=group.normalization, Cs=Cs, max_iter=max_iter, seed=seed, n_classes=n_classes,
                        class_weight=group.class_weight)
        per_c = (time.perf_counter() - tick) / len(sweep)
        for C, correct, loss, messages, logits in sweep:
            total = totals.setdefault(C, [0.0, 0.0, 0.0, [], []])
            total[0] += correct
            total[1] += loss
            total[2] += per_c
            total[3].extend(messages)
            total[4].append(logits)
    return [Score(candidate=dataclasses.replace(group, C=C), accuracy=t[0] / len(scored), log_loss=t[1] / len(scored),
                  seconds=t[2], warnings=tuple(dict.fromkeys(t[3])),
                  out_of_fold=None if t[4][0] is None else (scored, np.concatenate(t[4])))
            for C, t in totals.items()]


def fit_candidate(dataset: Dataset, rows: np.ndarray, candidate: Candidate, *, max_iter: int, seed: int) -> Probe:
    """Refit `candidate` on the images `rows` (plus their augmented / view rows). A logreg whose float32 features
    would exceed head_data.FIT_IN_MEMORY_BYTES is fitted on them chunk by chunk (head_data.FitRows: the scaler's
    mean and variance accumulated over chunks, then L-BFGS over chunks); any other fit holds them in memory."""
    tick = time.perf_counter()
    streamed = (candidate.kind in ("logreg", "softmax")
                and dataset.fit_bytes(candidate.layers, rows) > head_data.FIT_IN_MEMORY_BYTES)
    if streamed:
        x_fit = dataset.fit_rows(candidate.layers, candidate.normalization, rows)
        y_fit = dataset.fit_labels(x_fit.own, x_fit.extra)
    else:
        x_fit, y_fit = dataset.fit_set(candidate.layers, candidate.normalization, rows)
    try:
        model = probe_pipeline(candidate.kind, candidate.normalization, C=candidate.C, max_iter=max_iter, seed=seed,
                               y=y_fit, class_weight=candidate.class_weight)
    except ProbeError as exc:
        raise HeadError(str(exc)) from None
    if streamed:
        if len(model) > 1:  # the scaler first (statistics over chunks), then the probe on standardized chunks
            x_fit = dataclasses.replace(x_fit, scaler=model[0].fit(x_fit))
        messages = fit_recording(model[-1], x_fit, y_fit)
    else:
        messages = fit_recording(model, x_fit, y_fit)
    for message in messages:
        logger.warning("%s refit: %s", candidate, message)
    return Probe(candidate=candidate, model=model, train_seconds=time.perf_counter() - tick,
                 warnings=[f"refit {candidate.as_dict()}: {m}" for m in messages],
                 block_dims=tuple(dataset.images[layer].shape[1] for layer in candidate.layers))


def predict_rows(dataset: Dataset, index: np.ndarray, probe: Probe) -> np.ndarray:
    """probe's probabilities [len(index), K] for images `index`, read and predicted chunk by chunk."""
    return np.concatenate([probe.predict_proba(x) for x in dataset.iter_eval(probe.candidate.layers, "none", index)])


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


# ------------------------------------------------------------------------------------------------ stage
def resolve_feature_sets(feature_sets: Sequence[Sequence[str]], attrs: dict[str, Any],
                         stored: Sequence[str], features_path: Path, *, no_mid: bool = False) -> list[tuple[str, ...]]:
    """head.feature_sets with aliases (`mid`) replaced by the stored layer names (attrs layer_aliases);
    HeadError naming the layer when a set asks for one the file does not hold; duplicates dropped.
    no_mid: the backbone declares no mid_layer (extract skipped `mid` with a warning), so the sets that ask for it
    are skipped with a warning too, as long as one set is left."""
    aliases = attrs.get("layer_aliases") or {}
    if no_mid and MID_ALIAS not in aliases:
        kept = [layers for layers in feature_sets if MID_ALIAS not in layers]
        if kept and len(kept) < len(feature_sets):
            logger.warning("head.feature_sets: %s skipped: the backbone declares no mid_layer (declare one in "
                           "weights.custom to use it)", [list(s) for s in feature_sets if MID_ALIAS in s])
        feature_sets = kept or feature_sets
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


def load_checked_features(*, backbone_name: str, features_path: Path, manifest_path: Path, weights_path: Path,
                          stack: contextlib.ExitStack | None = None) -> tuple[FeatureReader, dict[str, str]]:
    """Open features_path lazily and check it (stages.features.open_checked: shapes, dtypes and provenance; then
    every value finite, in one chunked pass); returns (reader, input hashes). The file stays open until `stack`
    closes; without one it is closed once checked."""
    with contextlib.ExitStack() as local:
        reader, hashes = (stack or local).enter_context(open_checked(
            features_path, backbone=backbone_name, manifest_path=manifest_path, weights_path=weights_path))
        reader.check_finite()
        return reader, hashes


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
    dropped = sorted(p for p, d in zip(dataset.paths, drop) if d)
    return dataset.without(drop), {"policy": policy, "dropped_from_heldout": dropped}


def choice_rows(dataset: Dataset, rows: np.ndarray, params: HeadParams) -> tuple[np.ndarray, dict[str, Any]]:
    """The selection rows that make the choices: all of `rows`, or, when there are more than
    head.selection_max_rows, a seeded subsample of that many, stratified by split and class (each keeps its
    share and at least head.folds rows where it has them). A rule by size, never by a timing: choosing C, layers,
    normalization and k on 20,000 rows is as sure as on a million, and the chosen setting is refit on every
    selection row. Returns (indices into the dataset, metrics.json's selection "rows" record)."""
    limit = params.selection_max_rows
    if limit is None or len(rows) <= limit:
        return rows, {"available": int(len(rows)), "used": int(len(rows)), "reduction": None}
    split_code = np.unique(dataset.split[rows], return_inverse=True)[1]
    strata = split_code * (int(dataset.labels.max()) + 1) + dataset.labels[rows]
    chooser = rows[stratified_subsample(strata, size=limit, seed=params.seed, min_per_stratum=params.folds)]
    return chooser, {"available": int(len(rows)), "used": int(len(chooser)),
                     "reduction": f"stratified subsample (split x class) of head.selection_max_rows={limit}, "
                                  f"seed {params.seed}; the chosen setting refit on all {len(rows)} selection rows"}


def refit_feature_sets(dataset: Dataset, rows: np.ndarray, heldout: np.ndarray, scores: Sequence[Score], *,
                       feature_sets: Sequence[tuple[str, ...]], classes: Sequence[str], params: HeadParams
                       ) -> tuple[list[dict[str, Any]], dict[str, np.ndarray], dict[tuple[str, ...], Probe]]:
    """Each feature set's own best candidate refit on all selection rows and evaluated once on the held-out rows:
    (per-set records for metrics.json, {"layers=...": held-out probabilities}, {layers: Probe})."""
    per_set, predictions, probes = [], {}, {}
    y_heldout = dataset.labels[heldout]
    for layers in feature_sets:
        own = choose([s for s in scores if s.candidate.layers == layers])
        probe = fit_candidate(dataset, rows, own.candidate, max_iter=params.max_iter, seed=params.seed)
        proba = predict_rows(dataset, heldout, probe)
        probes[layers] = probe
        predictions["layers=" + "+".join(layers)] = proba
        per_set.append({"layers": list(layers), **own.candidate.as_dict(), "selection_accuracy": own.accuracy,
                        "heldout": classification_metrics(proba, y_heldout, classes, ece_bins=params.ece_bins)})
    return per_set, predictions, probes


def protocol_rows(dataset: Dataset, classes: Sequence[str]) -> tuple[str, np.ndarray, np.ndarray]:
    """(held-out split name, selection rows, held-out rows); HeadError when a class has no selection row."""
    try:
        heldout_name = heldout_split(dataset.split)
    except ProtocolError as exc:
        raise HeadError(str(exc)) from None
    rows, heldout = selection_rows(dataset.split, heldout_name), dataset.rows(heldout_name)
    absent = sorted(set(range(len(classes))) - set(dataset.labels[rows].tolist()))
    if absent:
        raise HeadError(f"classes {[classes[c] for c in absent]} have no images outside the held-out {heldout_name} "
                        f"split; every class needs training images")
    return heldout_name, rows, heldout


def evaluate_protocol(dataset: Dataset, classes: Sequence[str], params: HeadParams,
                      feature_sets: Sequence[tuple[str, ...]]) -> dict[str, Any]:
    """The whole protocol on a Dataset: choose on the selection rows (or their subsample, `choice_rows`), refit
    there, calibrate (`calibrate_chosen`), evaluate the held-out split once. Returns {"heldout_split", "probe"
    (the chosen Probe, with its temperature), "calibration", "scores", "selection", "feature_sets" (per set: its
    best candidate refit + held-out metrics, uncalibrated), "knn", "few_shot", "predictions" {row: held-out
    probabilities; "probe": the chosen probe's, calibrated}}."""
    heldout_name, rows, heldout = protocol_rows(dataset, classes)
    chooser_rows, used = choice_rows(dataset, rows, params)
    chooser = dataset.subset(chooser_rows)  # the images that choose, in memory; image i is chooser_rows[i]
    chooser_index = np.arange(len(chooser_rows))
    folds, selection = selection_folds(chooser, chooser_index, params)
    n_classes = len(classes)
    weights, selection["class_weight"] = class_weight_candidates(chooser.labels, params.class_weight,
                                                                 n_classes=n_classes)
    logger.info("selection: %s on %d of %d images (%s), held out: %s (%d images); %d feature set(s) x %d "
                "normalization(s) x %d kind(s) x %d class weight(s) x %d C", selection["method"], len(chooser_rows),
                len(rows), ", ".join(sorted(set(dataset.split[rows]))), heldout_name, len(heldout), len(feature_sets),
                len(params.normalization), len(params.kind), len(weights), len(params.C))
    try:
        scores = select(chooser, chooser_index, folds, kinds=params.kind, feature_sets=feature_sets,
                        normalizations=params.normalization, Cs=params.C, max_iter=params.max_iter,
                        seed=params.seed, n_classes=n_classes, class_weights=weights)
        scores = [s if s.out_of_fold is None else  # out-of-fold rows index the dataset, as every other row index
                  dataclasses.replace(s, out_of_fold=(chooser_rows[s.out_of_fold[0]], s.out_of_fold[1])) for s in scores]
        best = choose(scores)
        per_set, predictions, probes = refit_feature_sets(dataset, rows, heldout, scores, feature_sets=feature_sets,
                                                          classes=classes, params=params)
    except ProbeError as exc:
        raise HeadError(str(exc)) from None
    y_heldout = dataset.labels[heldout]
    probe, predictions["probe"], calibration = calibrate_chosen(dataset, heldout, probes[best.candidate.layers], best,
                                                                classes=classes, params=params)
    knn, predictions["knn"] = knn_probe(dataset, chooser, rows, heldout, folds, feature_sets=feature_sets,
                                        ks=params.knn_k, n_classes=n_classes, seed=params.seed)
    knn["heldout"] = classification_metrics(predictions["knn"], y_heldout, classes, ece_bins=params.ece_bins)
    few_shot = few_shot_curve(dataset, rows, heldout, best.candidate, shots=params.few_shot,
                              draws=params.few_shot_draws, seed=params.seed, max_iter=params.max_iter)
    few_shot.append({"shots": "all", "draws": 1, **spread([float(np.mean(predictions["probe"].argmax(1) == y_heldout))])})
    selection.update(split="+".join(sorted(set(dataset.split[rows].tolist()))), n=int(len(rows)), rows=used,
                     accuracy=best.accuracy, log_loss=best.log_loss, chosen=best.candidate.as_dict(),
                     candidates=[s.as_dict() for s in scores])
    selection["class_weight"]["chosen"] = best.candidate.class_weight
    return {"heldout_split": heldout_name, "heldout_rows": heldout, "probe": probe, "calibration": calibration,
            "probes": probes, "best": best, "scores": scores, "selection": selection, "feature_sets": per_set,
            "knn": knn, "few_shot": few_shot, "predictions": predictions}


def calibrate_chosen(dataset: Dataset, heldout: np.ndarray, probe: Probe, best: Score, *, classes: Sequence[str],
                     params: HeadParams) -> tuple[Probe, np.ndarray, dict[str, Any]]:
    """The chosen probe with its temperature (head.calibration, stages/calibration.py: fitted on the selection's
    out-of-fold logits), its held-out probabilities [H, K] (predicted chunk by chunk), and metrics.json's
    "calibration" record with the held-out ECE and log loss before and after."""
    calibrated, record = calibrate(probe, best, dataset.labels, method=params.calibration, ece_bins=params.ece_bins)
    y_heldout = dataset.labels[heldout]
    pairs = [(probe.predict_proba(x), calibrated.predict_proba(x))
             for x in dataset.iter_eval(best.candidate.layers, "none", heldout)]
    before, after = (np.concatenate([p[i] for p in pairs]) for i in (0, 1))
    measured = {when: classification_metrics(proba, y_heldout, classes, ece_bins=params.ece_bins)
                for when, proba in (("before", before), ("after", after))}
    record["heldout"] = {f"{key}_{when}": measured[when][key] for key in ("ece", "log_loss") for when in measured}
    logger.info("calibration: %s, T = %.4g; held-out ECE %.4f -> %.4f, log loss %.4f -> %.4f", record["method"],
                record["temperature"], *(record["heldout"][k] for k in ("ece_before", "ece_after", "log_loss_before",
                                                                        "log_loss_after")))
    return calibrated, after, record


def export_probe(chosen: Probe, *, dataset: Dataset, heldout: np.ndarray, inputs: dict[str, Any],
                 result: dict[str, Any]) -> dict[str, Any]:
    """classifier.pt's dict for a fitted probe, checked against the probe on (up to EXPORT_CHECK_ROWS) held-out
    features and against the backbone's feature width. `inputs`: backbone, state, classifier, attrs, classes,
    provenance, features_path (run_head's)."""
    layers = list(chosen.candidate.layers)
    features = dataset.eval_set(layers, "none", heldout[:EXPORT_CHECK_ROWS])
    head_spec = export_head(chosen)
    verify_export(head_spec, chosen, features)
    backbone, attrs = inputs["backbone"], inputs["attrs"]
    export = build_export(
        backbone_name=backbone.name, backbone_state=inputs["state"], layers=layers,
        backbone_spec={"arch": backbone.arch, "classifier": inputs["classifier"],
                       "build_kwargs": dict(backbone.build_kwargs), "preprocess": attrs.get("preprocess"),
                       "tta": list(attrs.get("tta") or ["none"]), "precision": attrs.get("precision") or "float32"},
        classes=inputs["classes"], head_spec=head_spec,
        provenance={"features": inputs["provenance"], "chosen": chosen.candidate.as_dict(),
                    "selection": result["selection"]["method"], "heldout_split": result["heldout_split"],
                    "versions": {"torch": str(torch.__version__), "sklearn": module_version("sklearn")}})
    check_feature_dim(export, int(features.shape[1]), inputs["features_path"])
    return export


def head_metrics(result: dict[str, Any], *, backbone_name: str, provenance: dict[str, Any],
                 audit: dict[str, Any] | None) -> dict[str, Any]:
    """metrics.json's content from the protocol's result."""
    probe, best, calibration = result["probe"], result["best"], result["calibration"]
    layers = list(best.candidate.layers)
    warnings_ = list(dict.fromkeys([m for s in result["scores"] for m in s.warnings] + probe.warnings))
    heldout = dict(next(s["heldout"] for s in result["feature_sets"] if s["layers"] == layers))  # the chosen set's
    if calibration["method"] != "none":  # what the exported classifier's probabilities score
        heldout.update(ece_calibrated=calibration["heldout"]["ece_after"],
                       log_loss_calibrated=calibration["heldout"]["log_loss_after"])
    metrics = {
        "backbone": backbone_name, "head": best.candidate.kind, "layers": layers,
        "normalization": best.candidate.normalization, "C": best.candidate.C,
        "class_weight": best.candidate.class_weight, "calibration": calibration,
        "heldout_split": result["heldout_split"], "heldout": heldout,
        "selection": result["selection"], "feature_sets": result["feature_sets"], "knn": result["knn"],
        "few_shot": result["few_shot"],
        "train_seconds": round(probe.train_seconds, 4), "feature_dim": int(sum(probe.block_dims)),
        "probe_device": getattr(probe.model[-1], "device_", "cpu"),
        "n_selection": int(result["selection"]["n"]),
        "n_heldout": int(len(result["heldout_rows"])), "converged": not warnings_, "warnings": warnings_,
        "probabilities": probe.probabilities, "features": provenance}
    if audit is not None:
        metrics["audit"] = {**audit, "n_dropped_from_heldout": len(audit["dropped_from_heldout"])}
    return metrics


def run_head(*, backbone_name: str, features_path: Path, manifest_path: Path, weights_path: Path, raw_dir: Path,
             model_path: Path, reports_dir: Path, params: HeadParams,
             custom: dict[str, Any] | None = None, audit_path: Path | None = None) -> dict[str, Any]:
    """The whole stage: read and check inputs, run the protocol, write reports, plots and the export.
    Returns metrics.json's content."""
    try:
        backbone = get_backbone(backbone_name, custom)
    except KeyError as exc:
        raise HeadError(f"--backbone: {exc.args[0]}") from None
    with contextlib.ExitStack() as stack:  # the features file stays open while rows are read from it
        data, hashes = load_checked_features(backbone_name=backbone_name, features_path=features_path,
                                             manifest_path=manifest_path, weights_path=weights_path, stack=stack)
        classes = list(data.attrs["classes"])
        dataset, audit = drop_audited_heldout(arrange_stored(data), audit_path)  # --audit: the audit's decision
        feature_sets = resolve_feature_sets(params.feature_sets, data.attrs, list(dataset.images), features_path,
                                            no_mid=backbone.mid_layer is None)
        result = evaluate_protocol(dataset, classes, params, feature_sets)
        heldout = result["heldout_rows"]
        state, classifier = backbone_export(backbone, weights_path)
        provenance = {  # the features file and what it was computed from
            "path": str(features_path), "sha256": sha256_file(features_path),
            "weights": str(weights_path), "manifest": str(manifest_path), **hashes,
            **{key: data.attrs.get(key) for key in ("storage_dtype", "precision", "preprocess", "tta", "tta_mode")},
            "n_images": len(dataset.labels), "augmented_rows": int(len(data.augmented_source))}
        inputs = {"backbone": backbone, "state": state, "classifier": classifier, "attrs": data.attrs,
                  "classes": classes, "provenance": provenance, "features_path": features_path}
        export = export_probe(result["probe"], dataset=dataset, heldout=heldout, inputs=inputs, result=result)
        # The fine-tune starts from a probe on the pooled embedding alone (its network ends in the pooled layer):
        # the best pool-only candidate of the same selection (uncalibrated: T = 1, the fine-tune trains its own
        # logits), or the chosen probe when pool alone was not offered (the fine-tune reads its weight and bias only).
        pool_probe = result["probes"].get(("pool",), result["probe"])
        pool_export = export_probe(pool_probe, dataset=dataset, heldout=heldout, inputs=inputs, result=result)
    save_export(model_path, export)
    save_onnx(onnx_path_for(model_path), export, images=read_sample_images(  # checked on held-out images
        raw_dir, [dataset.paths[i] for i in heldout], preprocess_from(export["backbone"]["preprocess"])))
    save_export(model_path.parent / "probe_pool.pt", pool_export)
    metrics = head_metrics(result, backbone_name=backbone_name, provenance=provenance, audit=audit)
    write_json(reports_dir / "metrics.json", metrics)
    write_head_reports(reports_dir, model_path, metrics=metrics, result=result, labels=dataset.labels,
                       split=dataset.split, paths=dataset.paths, classes=classes, params=params,
                       preprocess=data.attrs.get("preprocess"), weights_path=weights_path)
    return metrics


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
