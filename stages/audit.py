"""Audit stage: near-duplicates (and leakage across splits), likely label errors and outliers, from the cached features.

    python -m stages.audit --backbone NAME --features features/NAME.h5 --manifest data/prepared/manifest.csv \
        --weights models/pretrained/NAME.pth --raw data/raw --reports reports/NAME

Runs after extract@NAME and before head@NAME on the features of `audit.layer` (default pool), one row per image
(TTA view rows averaged). The features file is checked as head checks it (stages.features.open_checked: the same
ProvenanceError when it was computed from another manifest, backbone or weight file).

1. Near-duplicates (stages/audit_rules.py, every threshold from the dataset's own distribution): candidates are
   pairs among each image's `audit.duplicate_neighbors` nearest neighbours by feature cosine (stages/neighbours.py:
   faiss, exact up to 50,000 rows, an inverted-file index past them) or by pixel thumbnail (its rotations and
   mirrors searched against every image's whole and 70-80% windows) that stand out from the dataset's other
   neighbour pairs (robust z past `audit.duplicate_z` / 2); each is confirmed by a pixel check (the best
   correlation of crop windows, 70-100% of each side, of either image against the other's whole, rotations,
   mirrors and small tilts, on detail thumbnails) above `audit.duplicate_z` robust z-scores of look-alike pairs
   (images and their k-th pixel neighbour): resizes, re-encodes, crops, rotations, mirrors, colour changes,
   borders and watermarks are found, two photos of one subject are not. Confirmed pairs are joined into groups; a
   group whose images lie in more than one split is leakage
   (reported apart, with its cross-split pairs). Policy `audit.cross_split`: `report` lists them only;
   `drop_from_heldout` also lists the held-out images of every leakage group under `dropped_from_heldout`, and
   head leaves them out of its held-out evaluation (reports/NAME/audit/heldout.json, `python -m stages.head
   --audit`).
2. Likely label errors. Out-of-fold class probabilities of a standardized logistic regression (the head's
   torch L-BFGS probe, stages/probes.py; C = `audit.label_C`, stratified `audit.label_folds`-fold, sklearn
   cross_val_predict) on every labelled image,
   filtered by cleanlab (`cleanlab.filter.find_label_issues`, filter_by = `audit.label_filter`) and ranked by
   self-confidence (the probability of the given label, lowest first): the given label, the suggested label (the
   most probable class) and a score (1 - the probability of the given label). Skipped, saying why, when a class
   has fewer images than the folds need; the other checks still run.
3. Outliers. Score = median cosine distance to the `audit.outlier_k` nearest other images (of any class: an image
   close to another class is a label question, not an outlier); flagged when the robust z-score of the score over
   the dataset ((value - median) / (1.4826 MAD), Iglewicz and Hoaglin's modified z) is above `audit.outlier_z`. This catches
   placeholders and off-topic images that decode fine; the median (not the mean) of the k distances keeps a few
   off-topic images that resemble each other (fewer than k / 2) from hiding one another.

Nothing in data/ is changed: every finding and decision is listed. Outputs (written atomically):
    reports/NAME/audit.json          DVC metrics: counts per kind, flagged fraction, leakage pairs, every finding,
                                     the label check's status, dropped_from_heldout, thresholds, seconds
    reports/NAME/audit.csv           one row per finding: kind,paths,splits,classes,score,suggested_label
    reports/NAME/audit/<kind>.png    contact sheets (duplicates, leakage, label_issues, outliers): thumbnails with
                                     path, split, class and score; "no findings" when a kind has none
    reports/NAME/audit/heldout.json  {"policy", "heldout_split", "dropped_from_heldout": [paths]}: the one decision
                                     head reads (deterministic, so a changed threshold that drops nothing new does
                                     not re-run head)
"""
from __future__ import annotations

import argparse
import csv
import io
import logging
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from threadpoolctl import threadpool_limits

from stages.evaluation import ProtocolError, heldout_split
from stages.features import READ_CHUNK_ROWS, FeaturesError, open_checked, views_per_image
from stages.audit_rules import (WINDOW_SIDE, Thumbs, candidate_pairs, confirm_threshold, feature_evidence,
                                gray_square, null_pairs, pixel_evidence, pixel_neighbours, pixel_similarity, robust_z,
                                thumbnail_windows)
from stages.images import ImageDecodeError, load_rgb
from stages.io import atomic_path, progress, setup_logging, write_json, write_text
from stages.neighbours import cosine_search
from stages.params import AuditParams, ParamError, load_params
from stages.probes import ChunkedStandardScaler, LinearProbe

logger = logging.getLogger(__name__)

KINDS = ("duplicates", "leakage", "label_issues", "outliers")
THUMB = 96  # contact sheet thumbnail side, pixels
CSV_FIELDS = ("kind", "paths", "splits", "classes", "score", "suggested_label")
READ_CHUNK = 1024  # images decoded at a time for the pixel squares
THUMBS_CACHED = 64  # crop-window descriptors (1 MB each) kept while confirming pairs


class AuditError(FeaturesError):
    """The inputs do not allow the audit; the message names the file or parameter and why."""


@dataclass(frozen=True)
class Rows:
    """The features file as the audit uses it: one row per image (TTA view rows averaged)."""
    features: np.ndarray  # [N, D] float32, L2-normalized
    labels: np.ndarray  # [N] int64
    split: np.ndarray  # [N] str
    paths: list[str]  # [N]
    classes: list[str]


# ------------------------------------------------------------------------------------------------ core
def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows of x [N, D] scaled to unit L2 norm (float32; zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def nearest_neighbours(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k nearest other rows of unit vectors x [N, D] by inner product (= cosine similarity), through
    stages.neighbours.cosine_search (exact up to its EXACT_MAX_ROWS, an inverted-file index past it):
    (similarities [N, k] descending, indices [N, k]; -inf / -1 where fewer than k other rows were found)."""
    n = len(x)
    k = int(min(k, n - 1))
    if k < 1:
        return np.zeros((n, 0), np.float32), np.zeros((n, 0), np.int64)
    unit = np.array(x, dtype=np.float32, order="C", copy=True)  # one copy, searched against itself in place
    found = cosine_search(unit, unit, k=k + 1, seed=0, in_place=True)
    del unit
    sims, idx = found.similarity, found.index
    other = (idx != np.arange(n)[:, None]) & (idx >= 0)  # the row itself, wherever it ranks (ties with a copy)
    order = np.argsort(~other, axis=1, kind="stable")[:, :k]  # the other rows first, in rank order
    keep = np.take_along_axis(other, order, axis=1)
    out_s = np.where(keep, np.take_along_axis(sims, order, axis=1), -np.inf).astype(np.float32)
    out_i = np.where(keep, np.take_along_axis(idx, order, axis=1), -1)
    return out_s, out_i


def confirm_pairs(pairs: Sequence[tuple[int, int, float, float]], thumbs: Callable[[int], Thumbs | None], *,
                  min_correlation: float) -> list[tuple[int, int, float, float]]:
    """The candidate pairs (i, j, feature z, pixel z) whose pixel similarity (stages.audit_rules.pixel_similarity)
    is above min_correlation: (i, j, feature z, correlation). thumbs(row): an image's descriptor, None when it could
    not be read (its pairs are not confirmed)."""
    out = []
    for i, j, feature_z, _ in pairs:
        a = thumbs(i)
        b = thumbs(j) if a is not None else None
        if b is None:
            continue
        correlation = pixel_similarity(a, b)
        if correlation > min_correlation:
            out.append((i, j, feature_z, round(correlation, 4)))
    return out


def group_pairs(pairs: Sequence[tuple[int, ...]], n: int) -> list[list[int]]:
    """Connected components (sorted lists of row indices, two or more rows each) of the pairs' graph on n rows."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if not pairs:
        return []
    a = np.array([p[0] for p in pairs])
    b = np.array([p[1] for p in pairs])
    graph = coo_matrix((np.ones(len(a)), (a, b)), shape=(n, n))
    _, component = connected_components(graph, directed=False)
    groups: dict[int, list[int]] = {}
    for row in np.unique(np.concatenate([a, b])):
        groups.setdefault(int(component[row]), []).append(int(row))
    return sorted((sorted(g) for g in groups.values() if len(g) > 1), key=lambda g: g[0])


def describe_groups(groups: Sequence[Sequence[int]], pairs: Sequence[tuple[int, int, float, float]],
                    rows: Rows) -> list[dict[str, Any]]:
    """Each group as a finding: paths, splits, classes, cross_split, the weakest confirmed link (min cosine, min
    pixel correlation), and its cross-split pairs."""
    out = []
    for group in groups:
        members = set(group)
        links = [p for p in pairs if p[0] in members]
        cross = [{"paths": [rows.paths[i], rows.paths[j]], "splits": [str(rows.split[i]), str(rows.split[j])],
                  "cosine": round(c, 4), "pixel_correlation": d}
                 for i, j, c, d in links if rows.split[i] != rows.split[j]]
        splits = sorted({str(rows.split[i]) for i in group})
        out.append({"paths": [rows.paths[i] for i in group], "splits": [str(rows.split[i]) for i in group],
                    "classes": [rows.classes[rows.labels[i]] for i in group], "cross_split": len(splits) > 1,
                    "score": round(min(c for _, _, c, _ in links), 4),
                    "pixel_correlation": min(d for *_, d in links), "cross_split_pairs": cross})
    return out


def heldout_drops(duplicates: Sequence[dict[str, Any]], heldout: str) -> list[str]:
    """Paths of the held-out images in every group that also has images outside the held-out split (sorted):
    evaluated there, they measure memory of their copies rather than generalisation."""
    return sorted(p for g in duplicates if any(s != heldout for s in g["splits"])
                  for p, s in zip(g["paths"], g["splits"]) if s == heldout)


def out_of_fold_proba(x: np.ndarray, y: np.ndarray, *, folds: int, C: float, seed: int) -> np.ndarray:
    """Out-of-fold class probabilities [N, K] of StandardScaler + the head's logistic probe (stages.probes.LinearProbe:
    scikit-learn's LogisticRegression objective at C, torch L-BFGS in float32 on one CPU thread, or CUDA) on
    x [N, D], labels y [N], stratified `folds`-fold (each row predicted by the model fitted without it)."""
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline

    model = make_pipeline(ChunkedStandardScaler(), LinearProbe(C=C, max_iter=1000))  # statistics over row slices
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    with threadpool_limits(limits=1, user_api="blas"):
        return cross_val_predict(model, np.asarray(x, dtype=np.float32), y, cv=splitter, method="predict_proba")


def label_issues(proba: np.ndarray, y: np.ndarray, *, filter_by: str = "low_self_confidence"
                 ) -> list[tuple[int, int, float]]:
    """cleanlab's likely label errors from out-of-fold probabilities proba [N, K] and given labels y [N] (cleanlab
    filter `filter_by`), most likely first: (row, suggested label, score = 1 - probability of the given label)."""
    from cleanlab.filter import find_label_issues

    ranked = find_label_issues(labels=y, pred_probs=proba, filter_by=filter_by,
                               return_indices_ranked_by="self_confidence")
    return [(int(i), int(proba[i].argmax()), round(float(1.0 - proba[i, y[i]]), 4)) for i in ranked]


def label_check_skip(y: np.ndarray, classes: Sequence[str], folds: int) -> str | None:
    """Why the label check cannot run (a class with fewer images than the folds need), else None."""
    counts = np.bincount(y, minlength=len(classes))
    present = [(classes[c], int(n)) for c, n in enumerate(counts) if n > 0]
    if len(present) < 2:
        return f"only {len(present)} class has images; the label check compares classes"
    small = [(name, n) for name, n in present if n < folds]
    if small:
        listed = ", ".join(f"{name} ({n})" for name, n in small)
        return (f"class(es) {listed} have fewer images than audit.label_folds = {folds}, which out-of-fold "
                f"probabilities need per class; add images or lower audit.label_folds (params.yaml)")
    return None


def outlier_scores(x: np.ndarray, *, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(score [N], robust z [N]) of unit rows x [N, D]: score = the median cosine distance of x[i] to its k nearest
    other rows (the median, so that a few off-topic images that resemble each other, fewer than k / 2, do not hide
    one another); z = the robust z-score of the score over the dataset (stages.audit_rules.robust_z). (On log(score)
    the same ranking gave a shorter flagged list that missed off-topic photos in hymenoptera_data: bench_audit.)
    Fewer than 3 rows: all 0."""
    if len(x) < 3:
        return np.zeros(len(x)), np.zeros(len(x))
    sims, idx = nearest_neighbours(x, k)
    scores = np.nanmedian(np.where(idx >= 0, 1.0 - sims.astype(np.float64), np.nan), axis=1)
    return scores, robust_z(scores)


# ------------------------------------------------------------------------------------------------ findings
class GraySquares:
    """Every image's gray square (stages.audit_rules.gray_square: WINDOW_SIDE px, uint8, 4 KiB an image), decoded
    once from raw, READ_CHUNK images at a time, into an unnamed temporary file that the pixel search and the
    confirmation read back (the page cache holds them, not the process). `readable` [N]: False for an image that
    could not be read (warned; its square is zeros and its pairs stay unconfirmed). Use as a context manager."""

    def __init__(self, raw: Path, paths: Sequence[str]) -> None:
        self.readable = np.ones(len(paths), bool)
        self._file = tempfile.TemporaryFile()
        for start in progress(range(0, len(paths), READ_CHUNK), desc="audit: pixel squares", unit="chunk"):
            block = np.zeros((len(paths[start:start + READ_CHUNK]), WINDOW_SIDE, WINDOW_SIDE), np.uint8)
            for r, path in enumerate(paths[start:start + READ_CHUNK]):
                try:
                    block[r] = gray_square(load_rgb(raw / path, draft_size=WINDOW_SIDE)[0])
                except (ImageDecodeError, OSError) as exc:
                    logger.warning("%s: cannot be read for the duplicate check (%s); its pairs stay unconfirmed",
                                   path, exc)
                    self.readable[start + r] = False
            self._file.write(block.tobytes())
        self._file.flush()

    def read(self, start: int, stop: int) -> np.ndarray:
        """The squares of images start..stop-1: uint8 [stop - start, S, S]."""
        self._file.seek(start * WINDOW_SIDE ** 2)
        data = self._file.read((stop - start) * WINDOW_SIDE ** 2)
        return np.frombuffer(data, np.uint8).reshape(-1, WINDOW_SIDE, WINDOW_SIDE)

    def thumbs(self, index: int) -> Thumbs | None:
        """The crop-window descriptor of one image (stages.audit_rules.thumbnail_windows; None if unreadable)."""
        return thumbnail_windows(self.read(index, index + 1)[0]) if self.readable[index] else None

    def __enter__(self) -> GraySquares:
        return self

    def __exit__(self, *exc: object) -> None:
        self._file.close()


def find_duplicates(rows: Rows, *, raw: Path, params: AuditParams) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Near-duplicate groups (stages/audit_rules.py): candidates from the feature and the pixel neighbour lists,
    confirmed by the crop-window pixel check against the dataset's own null. Returns (groups, the rule's numbers).
    Memory: the images' gray squares are on disk (GraySquares); the pixel search keeps ~3.5 KB an image
    (pixel_neighbours) and the confirmation at most THUMBS_CACHED crop-window descriptors (1 MB each)."""
    n, k, z = len(rows.paths), params.duplicate_neighbors, params.duplicate_z
    with GraySquares(raw, rows.paths) as squares, threadpool_limits(limits=1, user_api="blas"):
        pixel_s, pixel_i = pixel_neighbours(squares.read, squares.readable, k, seed=params.seed)
        pixel = {key: v for key, v in pixel_evidence(pixel_s, pixel_i).items()
                 if squares.readable[key[0]] and squares.readable[key[1]]}
        pairs = candidate_pairs(feature_evidence(*nearest_neighbours(rows.features, k)), pixel, z=z)
        null = null_pairs(pixel_i, seed=params.seed)
        thumbs = lru_cache(maxsize=THUMBS_CACHED)(squares.thumbs)  # pairs come sorted: each image's run together
        null_values = [pixel_similarity(thumbs(a), thumbs(b)) for a, b in null
                       if squares.readable[a] and squares.readable[b]]
        threshold = confirm_threshold(null_values, z=z)
        confirmed = [(i, j, float(rows.features[i] @ rows.features[j]), r)  # (i, j, cosine, pixel correlation)
                     for i, j, _, r in confirm_pairs(pairs, thumbs, min_correlation=threshold)]
    logger.info("near-duplicates: %d candidate pair(s), %d confirmed by the pixel check (correlation > %.4f: %g "
                "robust z above %d look-alike pairs)", len(pairs), len(confirmed), threshold, z, len(null_values))
    rule = {"candidate_pairs": len(pairs), "pixel_correlation_threshold": round(threshold, 4),
            "null_pairs": len(null_values)}
    return describe_groups(group_pairs(confirmed, n), confirmed, rows), rule


def check_labels(rows: Rows, params: AuditParams) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """({"status": "ran" | "skipped", "reason", ...}, label findings most likely first)."""
    reason = label_check_skip(rows.labels, rows.classes, params.label_folds)
    if reason:
        logger.warning("label check skipped: %s", reason)
        return {"status": "skipped", "reason": reason}, []
    proba = out_of_fold_proba(rows.features, rows.labels, folds=params.label_folds, C=params.label_C,
                              seed=params.seed)
    issues = label_issues(proba, rows.labels, filter_by=params.label_filter)
    check = {"status": "ran", "reason": None, "folds": params.label_folds, "C": params.label_C,
             "filter": params.label_filter,
             "out_of_fold_accuracy": round(float(np.mean(proba.argmax(1) == rows.labels)), 4)}
    _, near = nearest_neighbours(rows.features, params.outlier_k) if issues else (None, None)

    def example(i: int, label: int) -> str | None:  # the nearest image labelled `label` (shown beside the finding)
        return next((rows.paths[j] for j in near[i] if j >= 0 and rows.labels[j] == label), None)

    return check, [{"path": rows.paths[i], "split": str(rows.split[i]), "given": rows.classes[rows.labels[i]],
                    "suggested": rows.classes[s], "score": score, "suggested_example": example(i, s)}
                   for i, s, score in issues]


def find_outliers(rows: Rows, params: AuditParams) -> list[dict[str, Any]]:
    """Images far from every other image (robust z of the score above audit.outlier_z), largest z first; each
    with its nearest other image (shown beside it in the report)."""
    scores, z = outlier_scores(rows.features, k=params.outlier_k)
    flagged = np.flatnonzero(z > params.outlier_z)
    _, idx = nearest_neighbours(rows.features, 1) if len(flagged) else (None, None)
    return [{"path": rows.paths[i], "split": str(rows.split[i]), "class": rows.classes[rows.labels[i]],
             "score": round(float(scores[i]), 4), "z": round(float(z[i]), 2),
             "nearest": rows.paths[int(idx[i, 0])] if idx[i, 0] >= 0 else None}
            for i in flagged[np.argsort(-z[flagged], kind="stable")]]


def audit_rows(rows: Rows, *, raw: Path, params: AuditParams) -> dict[str, Any]:
    """Every check on `rows`: the audit.json content (without provenance and seconds)."""
    try:
        heldout = heldout_split(rows.split)
    except ProtocolError:
        heldout = None
    timings: dict[str, float] = {}
    tick = time.perf_counter()
    duplicates, duplicate_rule = find_duplicates(rows, raw=raw, params=params)
    timings["duplicates"] = time.perf_counter() - tick
    tick = time.perf_counter()
    label_check, issues = check_labels(rows, params)
    timings["label_issues"] = time.perf_counter() - tick
    tick = time.perf_counter()
    outliers = find_outliers(rows, params)
    timings["outliers"] = time.perf_counter() - tick
    within = [g for g in duplicates if not g["cross_split"]]
    leakage = [g for g in duplicates if g["cross_split"]]
    leakage_pairs = [p for g in leakage for p in g["cross_split_pairs"]]
    dropped = heldout_drops(duplicates, heldout) if heldout and params.cross_split == "drop_from_heldout" else []
    flagged = ({p for g in duplicates for p in g["paths"]} | {f["path"] for f in issues}
               | {f["path"] for f in outliers})
    return {
        "n_images": len(rows.paths), "heldout_split": heldout, "policy": params.cross_split,
        "counts": {"duplicate_groups": len(within), "duplicate_images": sum(len(g["paths"]) for g in within),
                   "leakage_groups": len(leakage), "leakage_pairs": len(leakage_pairs),
                   "label_issues": len(issues), "outliers": len(outliers), "dropped_from_heldout": len(dropped),
                   "flagged_images": len(flagged)},
        "flagged_fraction": round(len(flagged) / max(1, len(rows.paths)), 4),
        "label_check": label_check, "leakage_pairs": leakage_pairs, "dropped_from_heldout": dropped,
        "duplicates": duplicates, "label_issues": issues, "outliers": outliers, "duplicate_rule": duplicate_rule,
        "seconds": {k: round(v, 3) for k, v in timings.items()}}


# ------------------------------------------------------------------------------------------------ outputs
def findings_csv(report: dict[str, Any]) -> str:
    """audit.csv: one row per finding (paths, splits and classes of a group joined with ';')."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for g in report["duplicates"]:
        writer.writerow({"kind": "leakage" if g["cross_split"] else "duplicates", "paths": ";".join(g["paths"]),
                         "splits": ";".join(g["splits"]), "classes": ";".join(g["classes"]), "score": g["score"],
                         "suggested_label": ""})
    for f in report["label_issues"]:
        writer.writerow({"kind": "label_issues", "paths": f["path"], "splits": f["split"], "classes": f["given"],
                         "score": f["score"], "suggested_label": f["suggested"]})
    for f in report["outliers"]:
        writer.writerow({"kind": "outliers", "paths": f["path"], "splits": f["split"], "classes": f["class"],
                         "score": f["z"], "suggested_label": ""})
    return buffer.getvalue()


def sheet_tiles(report: dict[str, Any], kind: str) -> list[tuple[str, list[str]]]:
    """(path, caption lines) per thumbnail of a kind's contact sheet, in the report's order."""
    if kind in ("duplicates", "leakage"):
        tiles = []
        for n, g in enumerate(g for g in report["duplicates"] if g["cross_split"] == (kind == "leakage")):
            for path, split, cls in zip(g["paths"], g["splits"], g["classes"]):
                tiles.append((path, [f"group {n + 1}  cos {g['score']:.3f}", f"{split} / {cls}", path]))
        return tiles
    if kind == "label_issues":
        return [(f["path"], [f"{f['given']} -> {f['suggested']}", f"score {f['score']:.3f}  {f['split']}",
                             f["path"]]) for f in report["label_issues"]]
    return [(f["path"], [f"z {f['z']:.1f}  dist {f['score']:.3f}", f"{f['split']} / {f['class']}", f["path"]])
            for f in report["outliers"]]


def _fit_text(draw: ImageDraw.ImageDraw, text: str, font: Any, width: int) -> str:
    """text shortened from the left ("...tail") until it fits `width` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength("..." + text, font=font) > width:
        text = text[1:]
    return "..." + text


def contact_sheet(raw: Path, tiles: Sequence[tuple[str, list[str]]], *, title: str, max_tiles: int,
                  columns: int = 6) -> Image.Image:
    """A PIL image of up to max_tiles thumbnails (THUMB px) with caption lines under each; a small card saying
    "no findings" when tiles is empty. Images that cannot be read get a grey tile."""
    font = ImageFont.load_default()
    cell_w, line_h = THUMB + 64, 12
    cell_h = THUMB + 6 + 3 * line_h + 8
    shown = list(tiles)[:max_tiles]
    rows = max(1, -(-len(shown) // columns))
    width = cell_w * (columns if shown else 3)
    sheet = Image.new("RGB", (width, 24 + (rows * cell_h if shown else 30)), "white")
    draw = ImageDraw.Draw(sheet)
    more = f" (first {len(shown)} of {len(tiles)})" if len(tiles) > len(shown) else ""
    draw.text((6, 6), _fit_text(draw, title + more, font, width - 12), fill="black", font=font)
    if not shown:
        draw.text((6, 30), "no findings", fill=(90, 90, 90), font=font)
        return sheet
    for n, (path, lines) in enumerate(shown):
        x, y = (n % columns) * cell_w, 24 + (n // columns) * cell_h
        try:
            image, _ = load_rgb(raw / path, draft_size=THUMB)
            image.thumbnail((THUMB, THUMB))
        except (ImageDecodeError, OSError):
            image = Image.new("RGB", (THUMB, THUMB), (200, 200, 200))
        sheet.paste(image, (x + (cell_w - image.width) // 2, y + (THUMB - image.height) // 2))
        for i, line in enumerate(lines):
            draw.text((x + 4, y + THUMB + 6 + i * line_h), _fit_text(draw, line, font, cell_w - 8), fill="black",
                      font=font)
    return sheet


def write_contact_sheets(out_dir: Path, report: dict[str, Any], *, raw: Path, backbone: str, max_tiles: int) -> None:
    """out_dir/<kind>.png for every kind (a "no findings" card for an empty one)."""
    titles = {"duplicates": "near-duplicates within a split", "leakage": "near-duplicates across splits (leakage)",
              "label_issues": "likely label errors (given -> suggested)",
              "outliers": "outliers (far from every other image; robust z)"}
    for kind in KINDS:
        sheet = contact_sheet(raw, sheet_tiles(report, kind), title=f"{backbone}: {titles[kind]}",
                              max_tiles=max_tiles)
        with atomic_path(out_dir / f"{kind}.png") as tmp:
            sheet.save(tmp, format="PNG")


# ------------------------------------------------------------------------------------------------ stage
def read_rows(*, backbone: str, features_path: Path, manifest_path: Path, weights_path: Path, layer: str) -> Rows:
    """The checked features of `layer` (an alias such as mid is resolved), one L2-normalized row per image: read
    lazily (stages.features.open_checked), READ_CHUNK_ROWS rows at a time, each chunk's TTA views averaged and its
    rows normalized into one float32 [N, D] array (memory: that array plus a chunk; no whole copy as stored)."""
    with open_checked(features_path, backbone=backbone, manifest_path=manifest_path,
                      weights_path=weights_path) as (reader, _):
        aliases = reader.attrs.get("layer_aliases") or {}
        stored = list(reader.attrs.get("layers") or [])
        name = aliases.get(layer, layer)
        if name not in stored or name not in reader.layers:
            raise AuditError(f"audit.layer {layer!r} is not in {features_path}, which holds {stored} (aliases "
                             f"{aliases}); set audit.layer to one of them or add it to extract.layers (params.yaml)")
        reader.check_finite([name])  # every value, before anything is computed (read_features' message)
        views = views_per_image(reader.attrs)
        n = reader.n_rows // views
        x = np.empty((n, reader.dims([name])[name]), dtype=np.float32)
        for start, chunk in reader.iter_chunks([name], chunk_rows=views * max(1, READ_CHUNK_ROWS // views)):
            block = chunk[name]
            if views > 1:
                block = block.reshape(-1, views, block.shape[1]).mean(1, dtype=np.float32)
            x[start // views:start // views + len(block)] = l2_normalize(block)
        return Rows(features=x, labels=reader.labels[::views], split=reader.split[::views],
                    paths=reader.paths[::views], classes=list(reader.attrs["classes"]))


def run_audit(*, backbone: str, features_path: Path, manifest_path: Path, weights_path: Path, raw: Path,
              reports_dir: Path, params: AuditParams) -> dict[str, Any]:
    """The whole stage: read and check the features, run every check, write audit.json, audit.csv, the contact
    sheets and audit/heldout.json. Returns audit.json's content."""
    start = time.perf_counter()
    rows = read_rows(backbone=backbone, features_path=features_path, manifest_path=manifest_path,
                     weights_path=weights_path, layer=params.layer)
    report = {"backbone": backbone, "layer": params.layer, **audit_rows(rows, raw=raw, params=params),
              "thresholds": {"duplicate_neighbors": params.duplicate_neighbors, "duplicate_z": params.duplicate_z,
                             "outlier_k": params.outlier_k, "outlier_z": params.outlier_z}}
    tick = time.perf_counter()
    write_contact_sheets(reports_dir / "audit", report, raw=raw, backbone=backbone, max_tiles=params.sheet_max)
    report["seconds"]["contact_sheets"] = round(time.perf_counter() - tick, 3)
    report["seconds"]["total"] = round(time.perf_counter() - start, 3)
    write_json(reports_dir / "audit" / "heldout.json", {
        "policy": params.cross_split, "heldout_split": report["heldout_split"],
        "dropped_from_heldout": report["dropped_from_heldout"]})
    write_text(reports_dir / "audit.csv", findings_csv(report))
    write_json(reports_dir / "audit.json", report)
    return report


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m stages.audit", description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", required=True)
    parser.add_argument("--features", type=Path, required=True, help="features/<backbone>.h5")
    parser.add_argument("--manifest", type=Path, required=True, help="data/prepared/manifest.csv")
    parser.add_argument("--weights", type=Path, required=True, help="the verified weight file (provenance check)")
    parser.add_argument("--raw", type=Path, required=True, help="data/raw: the images (pixel check, contact sheets)")
    parser.add_argument("--reports", type=Path, required=True, help="reports/<backbone>")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    try:
        params = load_params(args.params).audit
        report = run_audit(backbone=args.backbone, features_path=args.features, manifest_path=args.manifest,
                           weights_path=args.weights, raw=args.raw, reports_dir=args.reports, params=params)
    except (ParamError, FeaturesError, ValueError, OSError) as exc:
        logger.error("%s", exc)
        return 1
    c = report["counts"]
    logger.info("%s: %d image(s): %d near-duplicate group(s) within a split, %d across splits (%d pair(s)), "
                "%d likely label error(s)%s, %d outlier(s); %.1f%% flagged; %.1f s; wrote %s",
                args.backbone, report["n_images"], c["duplicate_groups"], c["leakage_groups"], c["leakage_pairs"],
                c["label_issues"], "" if report["label_check"]["status"] == "ran" else " (label check skipped)",
                c["outliers"], 100 * report["flagged_fraction"], report["seconds"]["total"],
                args.reports / "audit.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
