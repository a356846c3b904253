"""Audit benchmark: copy a dataset, plant known problems, run the audit on its features, measure recall/precision.

    python -m stages.bench_audit ../shared/datasets/hymenoptera_data ../shared/datasets/pbc_blood_cells \
        [--backbone efficientnet_lite0] [--work bench_audit] [--out bench_audit/results.json]

Per dataset (the first other dataset given supplies the off-topic images):
1. Copy it into <work>/<name>/raw and plant, with a fixed seed (`plant_problems`):
   - near-duplicates: DUPLICATE_FRACTION of the images get a copy made by ONE of: resizing to 50-90%, re-encoding
     at JPEG quality 60-90, a small crop (3-8% of each side in total) or a slight colour change (saturation and
     brightness x0.85-1.15); with split folders half of the copies go into the other split folder (leakage),
     without them prepare's stratified split decides (identical files only are kept together);
   - label flips: FLIP_FRACTION of the training images (every image without split folders) moved to another
     class folder;
   - off-topic images: N_OFF_TOPIC images of the other dataset and N_PLACEHOLDERS drawn placeholders ("image not
     found" card, flat grey) in random training class folders.
   Originals of duplicates, flipped and off-topic images are disjoint, so each kind is measured on its own.
2. prepare, weights, extract (stages.prepare/weights/extract in this process, params.yaml defaults), then the
   audit (stages.audit.run_audit, params.yaml `audit:` defaults).
3. Recall and precision per kind:
   - duplicates: a planted pair is found when original and copy are in one reported group (within or across
     splits); precision over the reported pairs, a pair being right when both are copies of one picture.
     Pairs of two untouched images are duplicates the dataset already had: listed, not counted either way.
   - label errors: recall among the top 2 x (number flipped) findings (the issue's target) and over all findings;
     precision of all findings (an untouched image flagged counts against it).
   - outliers: recall over the planted off-topic images; precision over the outlier list with the dataset's own
     outliers (untouched images flagged) counted against it.
"""
from __future__ import annotations

import argparse
import logging
import os
import random
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageEnhance

from stages import audit, extract, prepare, weights
from stages.images import IMAGE_EXTENSIONS, load_rgb
from stages.io import setup_logging, write_json
from stages.params import load_params

logger = logging.getLogger(__name__)

SPLIT_FOLDERS = ("train", "val", "valid", "validation", "test")
DUPLICATE_FRACTION = 0.08  # of the images get a near-duplicate copy
FLIP_FRACTION = 0.04  # of the training images get a wrong class folder (the issue: 3-5%)
N_OFF_TOPIC = 4  # images of another dataset
N_PLACEHOLDERS = 2  # drawn placeholders
TRANSFORMS = ("resize", "jpeg", "crop", "colour")


@dataclass
class Planted:
    """What was planted, as paths relative to the corrupted copy's root."""
    duplicates: list[tuple[str, str, str]] = field(default_factory=list)  # (original, copy, transform)
    flipped: list[tuple[str, str, str]] = field(default_factory=list)  # (path after the move, true class, given)
    off_topic: list[tuple[str, str]] = field(default_factory=list)  # (path, what)

    def touched(self) -> set[str]:
        return ({c for _, c, _ in self.duplicates} | {p for p, _, _ in self.flipped}
                | {p for p, _ in self.off_topic})


def list_images(root: Path) -> list[str]:
    """Image files under root (relative POSIX paths, sorted), hidden files skipped."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                  if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                  and not any(part.startswith(".") for part in p.relative_to(root).parts))


def class_of(rel: str) -> str:
    return rel.split("/")[-2]


def near_duplicate(image: Image.Image, how: str, rng: random.Random) -> tuple[Image.Image, int]:
    """A near-duplicate of an RGB image made by `how` (one of TRANSFORMS) and the JPEG quality to save it at."""
    if how == "resize":
        scale = rng.uniform(0.5, 0.9)
        return image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                            Image.Resampling.BILINEAR), 95
    if how == "jpeg":
        return image, rng.randint(60, 90)
    if how == "crop":
        total = rng.uniform(0.03, 0.08)  # of each side, split at random between its two ends
        left, top = rng.uniform(0, total), rng.uniform(0, total)
        w, h = image.size
        box = (round(left * w), round(top * h), round(w - (total - left) * w), round(h - (total - top) * h))
        return image.crop(box), 95
    if how == "colour":
        image = ImageEnhance.Color(image).enhance(rng.uniform(0.85, 1.15))
        return ImageEnhance.Brightness(image).enhance(rng.uniform(0.85, 1.15)), 95
    raise ValueError(f"unknown transform {how!r}; one of {TRANSFORMS}")


def placeholder(kind: int, size: tuple[int, int] = (300, 300)) -> Image.Image:
    """A drawn placeholder: 0 = an "image not found" card (grey frame, crossed box, text), 1 = flat grey."""
    if kind == 1:
        return Image.new("RGB", size, (128, 128, 128))
    image = Image.new("RGB", size, (245, 245, 245))
    draw = ImageDraw.Draw(image)
    w, h = size
    draw.rectangle((w * 0.3, h * 0.2, w * 0.7, h * 0.55), outline=(170, 170, 170), width=4)
    draw.line((w * 0.3, h * 0.2, w * 0.7, h * 0.55), fill=(170, 170, 170), width=4)
    draw.line((w * 0.3, h * 0.55, w * 0.7, h * 0.2), fill=(170, 170, 170), width=4)
    draw.text((w * 0.22, h * 0.68), "Image not found", fill=(90, 90, 90))
    return image


def plant_problems(source: Path, dest: Path, *, other: Path | None, seed: int = 0,
                   duplicate_fraction: float = DUPLICATE_FRACTION, flip_fraction: float = FLIP_FRACTION,
                   n_off_topic: int = N_OFF_TOPIC, n_placeholders: int = N_PLACEHOLDERS) -> Planted:
    """Copy `source` to `dest` and plant near-duplicates, label flips and off-topic images (see the module doc)."""
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(source, dest, ignore=shutil.ignore_patterns(".*"))
    rng = random.Random(seed)
    images = [p for p in list_images(dest) if p.lower().endswith((".jpg", ".jpeg"))]
    split_layout = images[0].split("/")[0] in SPLIT_FOLDERS
    splits = sorted({p.split("/")[0] for p in images}) if split_layout else [""]
    classes = sorted({class_of(p) for p in images})
    train = [p for p in images if not split_layout or p.startswith("train/")]
    pool = list(images)
    rng.shuffle(pool)
    n_dup = max(2, round(duplicate_fraction * len(images)))
    originals, pool = pool[:n_dup], pool[n_dup:]
    planted = Planted()
    for i, original in enumerate(originals):
        how = TRANSFORMS[i % len(TRANSFORMS)]
        folder = Path(original).parent.as_posix()
        if split_layout and i % 2 == 1 and len(splits) > 1:  # every other copy goes into another split folder
            split = original.split("/")[0]
            folder = f"{rng.choice([s for s in splits if s != split])}/{class_of(original)}"
        image, _ = load_rgb(dest / original)
        copy, quality = near_duplicate(image, how, rng)
        rel = f"{folder}/{Path(original).stem}_copy.jpg"
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        copy.save(dest / rel, quality=quality)
        planted.duplicates.append((original, rel, how))
    n_flip = max(1, round(flip_fraction * len(train)))
    flips = [p for p in pool if p in set(train)][:n_flip]
    for rel in flips:
        true = class_of(rel)
        given = rng.choice([c for c in classes if c != true])
        moved = f"{Path(rel).parent.parent.as_posix()}/{given}/{Path(rel).name}".lstrip("./")
        if (dest / moved).exists():
            moved = moved.replace(Path(rel).name, f"flipped_{Path(rel).name}")
        os.replace(dest / rel, dest / moved)
        planted.flipped.append((moved, true, given))
    train_folders = sorted({Path(p).parent.as_posix() for p in train})
    others = [p for p in list_images(other) if p.lower().endswith((".jpg", ".jpeg"))] if other else []
    for i, rel in enumerate(rng.sample(others, min(n_off_topic, len(others)))):
        target = f"{rng.choice(train_folders)}/offtopic_{i}{Path(rel).suffix}"
        shutil.copyfile(other / rel, dest / target)
        planted.off_topic.append((target, f"{other.name}/{rel}"))
    for k in range(n_placeholders):
        target = f"{rng.choice(train_folders)}/placeholder_{k}.jpg"
        placeholder(k % 2).save(dest / target, quality=90)
        planted.off_topic.append((target, ["drawn 'image not found' card", "flat grey"][k % 2]))
    return planted


# ------------------------------------------------------------------------------------------------ scoring
def score_duplicates(report: dict[str, Any], planted: Planted) -> dict[str, Any]:
    """Recall over planted pairs (original and copy in one reported group), precision over reported pairs."""
    truth = {c: o for o, c, _ in planted.duplicates}  # copy -> original
    new_pictures = set(truth) | {p for p, _ in planted.off_topic}  # flipped images are still their own pictures

    def picture(path: str) -> str:
        return truth.get(path, path)

    groups = [g["paths"] for g in report["duplicates"]]
    group_of = {p: i for i, paths in enumerate(groups) for p in paths}
    found = [(o, c, how) for o, c, how in planted.duplicates if c in group_of and group_of.get(o) == group_of[c]]
    right = wrong = 0
    preexisting, false_pairs = [], []
    for paths in groups:
        for a_i, a in enumerate(paths):
            for b in paths[a_i + 1:]:
                if a not in new_pictures and b not in new_pictures and picture(a) != picture(b):
                    preexisting.append((a, b))  # two pictures the dataset already had
                elif picture(a) == picture(b):
                    right += 1
                else:
                    wrong += 1
                    false_pairs.append((a, b))
    missed = sorted(set(planted.duplicates) - set(found))
    return {"planted": len(planted.duplicates), "found": len(found), "recall": len(found) / len(planted.duplicates),
            "reported_pairs": right + wrong, "precision": right / (right + wrong) if right + wrong else 1.0,
            "missed": [{"original": o, "copy": c, "transform": h} for o, c, h in missed],
            "false_pairs": false_pairs, "preexisting_pairs": preexisting,
            "recall_by_transform": {h: sum(1 for *_, x in found if x == h) / max(1, sum(
                1 for *_, x in planted.duplicates if x == h)) for h in TRANSFORMS},
            "cross_split_planted_found": sum(1 for g in report["duplicates"] if g["cross_split"])}


def score_labels(report: dict[str, Any], planted: Planted) -> dict[str, Any]:
    """Recall of the flipped images among the top 2 x (number flipped) label findings and among all findings."""
    if report["label_check"]["status"] != "ran":
        return {"planted": len(planted.flipped), "skipped": report["label_check"]["reason"]}
    ranked = [f["path"] for f in report["label_issues"]]  # best first
    flipped = {p for p, _, _ in planted.flipped}
    top = ranked[:2 * len(flipped)]
    suggested = {f["path"]: f["suggested"] for f in report["label_issues"]}
    right_suggestion = sum(1 for p, true, _ in planted.flipped if suggested.get(p) == true)
    return {"planted": len(flipped), "found_in_top_2x": len(flipped & set(top)),
            "recall_top_2x": len(flipped & set(top)) / len(flipped), "findings": len(ranked),
            "recall_all": len(flipped & set(ranked)) / len(flipped),
            "precision_all": len(flipped & set(ranked)) / len(ranked) if ranked else 1.0,
            "suggested_true_class": right_suggestion,
            "missed": sorted(flipped - set(top))}


def score_outliers(report: dict[str, Any], planted: Planted) -> dict[str, Any]:
    """Recall over the planted off-topic images; precision over the outlier list (untouched ones count against)."""
    listed = [f["path"] for f in report["outliers"]]
    off = {p for p, _ in planted.off_topic}
    hits = off & set(listed)
    return {"planted": len(off), "found": len(hits), "recall": len(hits) / len(off), "listed": len(listed),
            "precision": len(hits) / len(listed) if listed else 1.0, "missed": sorted(off - hits),
            "other_listed": sorted(set(listed) - off)}


# ------------------------------------------------------------------------------------------------ run
def run_stage(module: Any, argv: list[str]) -> None:
    code = module.main(argv)
    if code != 0:
        raise RuntimeError(f"python -m {module.__name__} {' '.join(argv)} exited with {code}")


def bench_dataset(root: Path, *, other: Path | None, backbone: str, work: Path, params_path: Path,
                  seed: int = 0) -> dict[str, Any]:
    """Plant problems in a copy of `root`, run prepare/weights/extract/audit on it, score every kind."""
    work.mkdir(parents=True, exist_ok=True)
    raw = work / "raw"
    planted = plant_problems(root, raw, other=other, seed=seed)
    run_stage(prepare, ["--raw", str(raw), "--out", str(work / "prepared"), "--reports", str(work / "prepare"),
                        "--params", str(params_path)])
    weights_path = work / f"{backbone}.pth"
    run_stage(weights, ["--backbone", backbone, "--out", str(weights_path), "--report", str(work / "weights.json"),
                        "--params", str(params_path)])
    features = work / f"{backbone}.h5"
    tick = time.perf_counter()
    run_stage(extract, ["--backbone", backbone, "--raw", str(raw), "--manifest", str(work / "prepared/manifest.csv"),
                        "--weights", str(weights_path), "--out", str(features), "--report", str(work / "extract.json"),
                        "--params", str(params_path)])
    extract_seconds = time.perf_counter() - tick
    tick = time.perf_counter()
    report = audit.run_audit(backbone=backbone, features_path=features, manifest_path=work / "prepared/manifest.csv",
                             weights_path=weights_path, raw=raw, reports_dir=work / "reports",
                             params=load_params(params_path).audit)
    audit_seconds = time.perf_counter() - tick
    result = {"dataset": root.name, "images": report["n_images"], "heldout_split": report["heldout_split"],
              "extract_seconds": round(extract_seconds, 1), "audit_seconds": round(audit_seconds, 1),
              "duplicates": score_duplicates(report, planted), "labels": score_labels(report, planted),
              "outliers": score_outliers(report, planted)}
    write_json(work / "planted.json", {"duplicates": planted.duplicates, "flipped": planted.flipped,
                                       "off_topic": planted.off_topic})
    return result


def format_table(results: Sequence[dict[str, Any]]) -> str:
    lines = ["| dataset | kind | planted | recall | precision | target | notes |", "|---|---|---:|---:|---:|---|---|"]
    for r in results:
        d, lab, o = r["duplicates"], r["labels"], r["outliers"]
        name = f"{r['dataset']} ({r['images']} imgs)"
        by = ", ".join(f"{h} {v:.2f}" for h, v in d["recall_by_transform"].items())
        lines.append(f"| {name} | near-duplicates | {d['planted']} | {d['recall']:.3f} | {d['precision']:.3f} | "
                     f"R >= 0.95, P >= 0.95 | recall by transform: {by}; {d['cross_split_planted_found']} "
                     f"cross-split groups; {len(d['preexisting_pairs'])} pre-existing pair(s) |")
        if "skipped" in lab:
            lines.append(f"| {name} | label errors | {lab['planted']} | skipped | | | {lab['skipped']} |")
        else:
            lines.append(f"| {name} | label errors | {lab['planted']} | {lab['recall_top_2x']:.3f} (top 2x) | "
                         f"{lab['precision_all']:.3f} (all {lab['findings']}) | >= 0.80 in top 2x | recall over all "
                         f"findings {lab['recall_all']:.3f}; suggested label = true class for "
                         f"{lab['suggested_true_class']}/{lab['planted']} |")
        lines.append(f"| {name} | outliers | {o['planted']} | {o['recall']:.3f} | {o['precision']:.3f} | "
                     f">= 0.80 | {o['listed']} listed; {len(o['other_listed'])} untouched image(s) listed |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m stages.bench_audit", description=__doc__.split("\n")[0])
    parser.add_argument("datasets", nargs="+", type=Path, help="image folders (<class>/<image> or <split>/<class>/...)")
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--work", type=Path, default=Path("bench_audit"), help="scratch folder")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="defaults to use")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    os.environ.setdefault("CI", "1")  # no progress bars inside the table's run
    results = []
    for i, root in enumerate(args.datasets):
        if not root.is_dir():
            logger.error("%s is not a folder of images", root)
            return 1
        others = [d for d in args.datasets if d != root]
        results.append(bench_dataset(root, other=others[0] if others else None, backbone=args.backbone,
                                     work=args.work / root.name, params_path=args.params, seed=args.seed + i))
    table = format_table(results)
    print(table)
    print(f"\n{args.backbone}; audit seconds: " + ", ".join(f"{r['dataset']} {r['audit_seconds']}" for r in results))
    if args.out:
        write_json(args.out, {"backbone": args.backbone, "table": table, "results": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
