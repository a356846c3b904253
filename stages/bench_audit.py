"""Audit benchmark: copy a dataset, plant known problems, run the audit on its features, measure recall/precision.

    python -m stages.bench_audit ../shared/datasets/hymenoptera_data ../shared/datasets/pbc_blood_cells \
        [--generated 60] [--trials 5] [--backbone efficientnet_lite0] [--work bench_audit] [--out results.json]

Datasets: every folder given, plus (unless --generated 0) a generated set of drawn shapes (stages/bench_audit_plant.py,
5 classes x --generated images) that no rule was tuned on.
1. Images (stages/bench_audit_plant.py, fixed seed): the dataset copied into <work>/<name>/raw with near-duplicate
   copies of DUPLICATE_FRACTION of its images (resize, JPEG 30-95, crop to 70-100%, rotation, mirror, colour jitter,
   border, watermark; with split folders every other copy in another split: leakage) and a pool of OFF_TOPIC_POOL
   off-topic images (the other datasets' images, generated textures, drawn placeholders) in training folders.
2. prepare, weights, extract in this process (params.yaml defaults). Cached: when <work>/<name>/planted.json was
   written for the same source, seed and planting version and the features file exists, steps 1-2 are skipped.
3. --trials trials on the rows (stages.audit.read_rows): each keeps OFF_TOPIC_RATE x n of the off-topic pool (the
   rest left out) and flips FLIP_RATE x n labels of untouched images, half to the class whose feature centroid is
   nearest the true one ("similar"), half to the farthest ("dissimilar"; the same class with two classes). A flip
   on the rows is what moving the file to another class folder gives: features do not depend on the label. Then
   stages.audit.audit_rows with params.yaml `audit:` and the scores:
   - duplicates: a planted pair is found when original and copy are in one reported group; precision over the
     reported pairs (right when both are copies of one picture). Pairs of two untouched images are duplicates the
     dataset already had: listed, not counted. From trial 0 (the copies are the same in every trial).
   - label errors: recall of the flipped images in the review list, the first ceil(REVIEW_FRACTION x n) label
     findings; precision of that list.
   - outliers: recall of the kept off-topic images among the first ceil(OUTLIER_FRACTION x n) outliers; precision
     of the whole flagged list (untouched images flagged count against it).
   Counts are pooled over trials; intervals are 95% Wilson (stages.metrics.accuracy_interval). Targets (issue 24)
   print as PASS/FAIL on the point estimate.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from stages import audit, extract, prepare, weights
from stages.bench_audit_plant import TRANSFORMS, Planted, plant_images, write_generated_set
from stages.io import setup_logging, write_json
from stages.metrics import accuracy_interval
from stages.params import load_params

logger = logging.getLogger(__name__)

PLANT_VERSION = 2  # bump when bench_audit_plant changes what it writes: cached features are then re-made
OFF_TOPIC_RATE = 0.004  # of the images: off-topic images kept per trial (at least one)
FLIP_RATE = 0.01  # of the images: labels flipped per trial (at least one)
REVIEW_FRACTION = 0.02  # label errors: the review list is the first 2% of the findings
OUTLIER_FRACTION = 0.01  # outliers: recall among the first 1%
TARGETS = {"duplicates.recall": 0.95, "duplicates.precision": 0.9, "labels.recall": 0.8, "outliers.recall": 0.8}


def run_stage(module: Any, argv: list[str]) -> None:
    code = module.main(argv)
    if code != 0:
        raise RuntimeError(f"python -m {module.__name__} {' '.join(argv)} exited with {code}")


# ------------------------------------------------------------------------------------------------ images + features
def prepare_features(root: Path, *, others: list[Path], backbone: str, work: Path, params_path: Path,
                     seed: int) -> tuple[Planted, audit.Rows]:
    """Planted images and their features (cached, see the module doc): (what was planted, the audit's rows)."""
    work.mkdir(parents=True, exist_ok=True)
    raw, features, weights_path = work / "raw", work / f"{backbone}.h5", work / f"{backbone}.pth"
    manifest = work / "prepared" / "manifest.csv"
    key = {"version": PLANT_VERSION, "source": str(root.resolve()), "seed": seed,
           "others": [str(o.resolve()) for o in others], "backbone": backbone}
    record = work / "planted.json"
    cached = json.loads(record.read_text()) if record.is_file() else {}
    if cached.get("key") == key and features.is_file():
        planted = Planted(duplicates=[tuple(d) for d in cached["duplicates"]],
                          off_topic=[tuple(o) for o in cached["off_topic"]])
        logger.info("%s: planted images and features reused from %s", root.name, work)
    else:
        record.unlink(missing_ok=True)
        planted = plant_images(root, raw, others=others, seed=seed)
        run_stage(prepare, ["--raw", str(raw), "--out", str(work / "prepared"), "--reports", str(work / "prepare"),
                            "--params", str(params_path)])
        run_stage(weights, ["--backbone", backbone, "--out", str(weights_path), "--report",
                            str(work / "weights.json"), "--params", str(params_path)])
        run_stage(extract, ["--backbone", backbone, "--raw", str(raw), "--manifest", str(manifest), "--weights",
                            str(weights_path), "--out", str(features), "--report", str(work / "extract.json"),
                            "--params", str(params_path)])
        write_json(record, {"key": key, **planted.as_json()})
    rows = audit.read_rows(backbone=backbone, features_path=features, manifest_path=manifest,
                           weights_path=weights_path, layer=load_params(params_path).audit.layer)
    return planted, rows


# ------------------------------------------------------------------------------------------------ trials
def class_neighbours(features: np.ndarray, labels: np.ndarray, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(most similar other class [K], least similar other class [K]) by cosine of the class mean features."""
    centroids = audit.l2_normalize(np.stack([features[labels == c].mean(0) for c in range(n_classes)]))
    sims = centroids @ centroids.T
    np.fill_diagonal(sims, np.nan)
    return np.nanargmax(sims, axis=1), np.nanargmin(sims, axis=1)


def make_trial(rows: audit.Rows, planted: Planted, *, seed: int) -> tuple[audit.Rows, dict[str, Any]]:
    """One trial's rows: OFF_TOPIC_RATE x n off-topic images kept (the rest of the pool left out) and FLIP_RATE x n
    untouched images relabelled (half to the nearest class, half to the farthest). Returns (rows, truth)."""
    rng = random.Random(seed)
    index = {p: i for i, p in enumerate(rows.paths)}
    pool = sorted(index[p] for p, _ in planted.off_topic if p in index)
    originals = {index[o] for o, _, _ in planted.duplicates if o in index}
    touched = {index[p] for p in planted.touched() if p in index} | originals
    n = len(rows.paths) - len(pool)
    kept_off = sorted(rng.sample(pool, min(len(pool), max(1, round(OFF_TOPIC_RATE * n)))))
    keep = np.array(sorted(set(range(len(rows.paths))) - set(pool) | set(kept_off)))
    clean = [i for i in range(len(rows.paths)) if i not in touched]
    flips = rng.sample(clean, max(1, round(FLIP_RATE * n)))
    similar, dissimilar = class_neighbours(rows.features[clean], rows.labels[clean], len(rows.classes))
    labels = rows.labels.copy()
    truth_flips = []
    for k, i in enumerate(flips):
        kind = "similar" if k % 2 == 0 else "dissimilar"
        labels[i] = (similar if kind == "similar" else dissimilar)[rows.labels[i]]
        truth_flips.append({"path": rows.paths[i], "true": rows.classes[rows.labels[i]],
                            "given": rows.classes[labels[i]], "kind": kind})
    trial = dataclasses.replace(rows, features=rows.features[keep], labels=labels[keep], split=rows.split[keep],
                                paths=[rows.paths[i] for i in keep])
    return trial, {"off_topic": [rows.paths[i] for i in kept_off], "flips": truth_flips}


# ------------------------------------------------------------------------------------------------ scoring
def rate(hits: int, n: int) -> dict[str, Any]:
    """{"hits", "n", "value", "low", "high"}: a proportion with its 95% Wilson interval (value 1.0 when n = 0)."""
    low, high = accuracy_interval(hits, n)
    return {"hits": int(hits), "n": int(n), "value": hits / n if n else 1.0, "low": low, "high": high}


def score_duplicates(report: dict[str, Any], planted: Planted) -> dict[str, Any]:
    """Recall over planted pairs (original and copy in one reported group), precision over reported pairs."""
    truth = {c: o for o, c, _ in planted.duplicates}  # copy -> original
    new_pictures = set(truth) | {p for p, _ in planted.off_topic}
    groups = [g["paths"] for g in report["duplicates"]]
    group_of = {p: i for i, paths in enumerate(groups) for p in paths}
    found = [(o, c, how) for o, c, how in planted.duplicates if c in group_of and group_of.get(o) == group_of[c]]
    right, false_pairs, preexisting = 0, [], []
    for paths in groups:
        for a_i, a in enumerate(paths):
            for b in paths[a_i + 1:]:
                if truth.get(a, a) == truth.get(b, b):
                    right += 1
                elif a not in new_pictures and b not in new_pictures:
                    preexisting.append([a, b])  # two pictures the dataset already had
                else:
                    false_pairs.append([a, b])
    by = {h: rate(sum(1 for *_, x in found if x == h), sum(1 for *_, x in planted.duplicates if x == h))
          for h in TRANSFORMS}
    missed = sorted(set(planted.duplicates) - set(found))
    return {"recall": rate(len(found), len(planted.duplicates)), "precision": rate(right, right + len(false_pairs)),
            "recall_by_transform": by, "missed": [{"original": o, "copy": c, "transform": h} for o, c, h in missed],
            "false_pairs": false_pairs, "preexisting_pairs": preexisting}


def score_labels(report: dict[str, Any], truth: dict[str, Any]) -> dict[str, Any]:
    """Flipped images in the review list (the first ceil(REVIEW_FRACTION x n) label findings)."""
    if report["label_check"]["status"] != "ran":
        return {"skipped": report["label_check"]["reason"]}
    review = [f["path"] for f in report["label_issues"]][:math.ceil(REVIEW_FRACTION * report["n_images"])]
    flipped = {f["path"]: f["kind"] for f in truth["flips"]}
    hits = [p for p in review if p in flipped]
    return {"planted": len(flipped), "review": len(review), "found": len(hits), "findings": len(report["label_issues"]),
            "by_kind": {k: [sum(1 for p in hits if flipped[p] == k), sum(1 for v in flipped.values() if v == k)]
                        for k in ("similar", "dissimilar")}}


def score_outliers(report: dict[str, Any], truth: dict[str, Any]) -> dict[str, Any]:
    """Kept off-topic images among the first ceil(OUTLIER_FRACTION x n) outliers, and the flagged list's precision."""
    listed = [f["path"] for f in report["outliers"]]
    top = listed[:math.ceil(OUTLIER_FRACTION * report["n_images"])]
    off = set(truth["off_topic"])
    return {"planted": len(off), "found_top": len(off & set(top)), "flagged": len(listed),
            "flagged_right": len(off & set(listed)), "other_flagged": sorted(set(listed) - off)}


def pool_trials(labels: list[dict[str, Any]], outliers: list[dict[str, Any]]) -> dict[str, Any]:
    """Counts summed over trials as rates with intervals."""
    out: dict[str, Any] = {}
    if labels and all("skipped" not in t for t in labels):
        out["labels"] = {"recall": rate(sum(t["found"] for t in labels), sum(t["planted"] for t in labels)),
                         "precision": rate(sum(t["found"] for t in labels), sum(t["review"] for t in labels)),
                         "recall_by_kind": {k: rate(sum(t["by_kind"][k][0] for t in labels),
                                                    sum(t["by_kind"][k][1] for t in labels))
                                            for k in ("similar", "dissimilar")},
                         "findings_per_trial": [t["findings"] for t in labels]}
    else:
        out["labels"] = {"skipped": next((t["skipped"] for t in labels if "skipped" in t), "no trials")}
    out["outliers"] = {"recall": rate(sum(t["found_top"] for t in outliers), sum(t["planted"] for t in outliers)),
                       "precision": rate(sum(t["flagged_right"] for t in outliers),
                                         sum(t["flagged"] for t in outliers)),
                       "flagged_recall": rate(sum(t["flagged_right"] for t in outliers),
                                              sum(t["planted"] for t in outliers)),
                       "other_flagged": sorted({p for t in outliers for p in t["other_flagged"]})}
    return out


def bench_dataset(root: Path, *, others: list[Path], backbone: str, work: Path, params_path: Path, trials: int,
                  seed: int = 0) -> dict[str, Any]:
    """Planted images and features (cached), then `trials` audits on trial rows, scored and pooled."""
    planted, rows = prepare_features(root, others=others, backbone=backbone, work=work, params_path=params_path,
                                     seed=seed)
    params = load_params(params_path).audit
    labels, outliers, seconds, duplicates = [], [], [], None
    for t in range(trials):
        trial, truth = make_trial(rows, planted, seed=1000 * seed + t)
        tick = time.perf_counter()
        report = audit.audit_rows(trial, raw=work / "raw", params=params)
        seconds.append(time.perf_counter() - tick)
        if duplicates is None:
            duplicates = score_duplicates(report, planted)
            write_json(work / "trial0_audit.json", report)
        labels.append(score_labels(report, truth))
        outliers.append(score_outliers(report, truth))
    return {"dataset": root.name, "images": len(rows.paths), "trials": trials,
            "audit_seconds": round(float(np.mean(seconds)), 1), "duplicates": duplicates,
            **pool_trials(labels, outliers)}


# ------------------------------------------------------------------------------------------------ table
def cell(r: dict[str, Any]) -> str:
    return f"{r['value']:.3f} [{r['low']:.2f}, {r['high']:.2f}] ({r['hits']}/{r['n']})"


def verdict(value: float, target: float) -> str:
    return f"{'PASS' if value >= target else 'FAIL'} (>= {target:g})"


def format_table(results: Sequence[dict[str, Any]]) -> str:
    lines = ["| dataset | kind | recall [95% CI] | precision [95% CI] | target | notes |",
             "|---|---|---|---|---|---|"]
    for r in results:
        d, lab, o = r["duplicates"], r["labels"], r["outliers"]
        name = f"{r['dataset']} ({r['images']} imgs, {r['trials']} trials)"
        by = ", ".join(f"{h} {v['hits']}/{v['n']}" for h, v in d["recall_by_transform"].items())
        ok = verdict(d["recall"]["value"], TARGETS["duplicates.recall"]) + " / " + verdict(
            d["precision"]["value"], TARGETS["duplicates.precision"])
        lines.append(f"| {name} | near-duplicates | {cell(d['recall'])} | {cell(d['precision'])} | {ok} | "
                     f"found by transform: {by}; {len(d['preexisting_pairs'])} pre-existing pair(s) |")
        if "skipped" in lab:
            lines.append(f"| {name} | label flips | skipped | | | {lab['skipped']} |")
        else:
            kinds = ", ".join(f"{k} {v['hits']}/{v['n']}" for k, v in lab["recall_by_kind"].items())
            lines.append(f"| {name} | label flips (top {REVIEW_FRACTION:.0%}) | {cell(lab['recall'])} | "
                         f"{cell(lab['precision'])} | {verdict(lab['recall']['value'], TARGETS['labels.recall'])} | "
                         f"found by flip: {kinds} |")
        lines.append(f"| {name} | outliers (top {OUTLIER_FRACTION:.0%}) | {cell(o['recall'])} | "
                     f"{cell(o['precision'])} (flagged) | {verdict(o['recall']['value'], TARGETS['outliers.recall'])}"
                     f" | flagged recall {cell(o['flagged_recall'])}; {len(o['other_flagged'])} untouched image(s) "
                     f"flagged |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m stages.bench_audit", description=__doc__.split("\n")[0])
    parser.add_argument("datasets", nargs="*", type=Path, help="image folders (<class>/<image> or <split>/<class>/...)")
    parser.add_argument("--generated", type=int, default=60, help="images per class of the generated set (0: none)")
    parser.add_argument("--trials", type=int, default=5, help="trials (off-topic and flip draws) per dataset")
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--work", type=Path, default=Path("bench_audit"), help="scratch folder (and feature cache)")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="defaults to use")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    os.environ.setdefault("CI", "1")  # no progress bars inside the table's run
    for root in args.datasets:
        if not root.is_dir():
            logger.error("%s is not a folder of images", root)
            return 1
    datasets = list(args.datasets)
    if args.generated > 0:
        datasets.append(write_generated_set(args.work / "generated_source" / "generated_shapes",
                                            per_class=args.generated, seed=args.seed))
    results = []
    for i, root in enumerate(datasets):
        others = [d for d in args.datasets if d != root]
        results.append(bench_dataset(root, others=others, backbone=args.backbone, work=args.work / root.name,
                                     params_path=args.params, trials=args.trials, seed=args.seed + i))
    table = format_table(results)
    print(table)
    print(f"\n{args.backbone}; audit seconds per trial: "
          + ", ".join(f"{r['dataset']} {r['audit_seconds']}" for r in results))
    if args.out:
        write_json(args.out, {"backbone": args.backbone, "table": table, "results": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
