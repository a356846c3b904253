"""Prepare stage: scan data/raw, decode every image once, quarantine bad files, split, and measure mean/std.

Outputs (all written atomically):
- data/prepared/manifest.csv: `path,class,label,split,sha256,width,height`, rows sorted by path, only images
  that decode; width/height of the decoded image after EXIF orientation. Same inputs and params give a
  byte-identical file.
- data/prepared/classes.json: the sorted class names (label = index); data/prepared/stats.json: the exact
  per-channel mean/std of the training pixels after resize(short side) + centre crop to `stats_size`.
- reports/prepare/quarantine.json: every file that is not a usable image, with the reason.
- reports/prepare/summary.json (DVC metrics): images per split and class, n_bad, n_duplicates, mean, std,
  warnings (non-JPEG formats, converted colour modes, EXIF rotations, ...) and the normalization each
  backbone will use.

Splits. The evaluation protocol (stages/evaluation.py) reports only the held-out split, test when the manifest has
test rows, else val, and selects by cross-validation on the rest, so val is optional and a held-out split is not.
Split folders (train, val/valid/validation, test) are kept. A split without a folder is drawn from train, per class
(round half up of its distinct files x the fraction; at least one in the held-out split, so every class is in
train and held out, and a class with a single distinct file is an error), seeded by (seed, class), keeping
identical files together:
val when val_fraction > 0; test when test_fraction > 0 and the dataset has neither a val/ nor a test/ folder. The
defaults (val_fraction 0, test_fraction 0.2) give a `<class>/<image>` tree train + a held-out test split; a
train/val tree (hymenoptera) stays as it is, val held out. With no val/ or test/ folder and both fractions 0 nothing
would be held out: an error. The same file in two split folders is kept in the first of train, val, test only
(no leakage).
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import io
import logging
import math
import os
import time
import zlib
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch

from stages.backbones import get_backbone
from stages.images import IMAGE_EXTENSIONS, MANIFEST_FIELDS, ImageDecodeError, load_rgb, stats_transform
from stages.io import progress, setup_logging, write_json, write_text
from stages.labels import LabelsError, read_labels
from stages.params import DataParams, ParamError, Params, PrepareParams, load_params

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
SPLIT_FOLDERS = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
JPEG_FORMATS = frozenset({"JPEG", "MPO"})  # MPO: camera JPEGs with an extra preview image
TINY_SIDE = 32  # images with a side below this (pixels) are reported
MAX_LISTED_WARNINGS = 200
MODE_NAMES = {"P": "palette", "L": "grayscale", "LA": "grayscale with alpha", "PA": "palette with alpha",
              "RGBA": "RGB with alpha", "CMYK": "CMYK", "YCbCr": "YCbCr", "1": "1-bit", "I": "32-bit integer",
              "I;16": "16-bit grayscale", "I;16B": "16-bit grayscale", "I;16L": "16-bit grayscale",
              "F": "32-bit float", "LAB": "Lab", "HSV": "HSV"}


class PrepareError(ValueError):
    """The dataset cannot be prepared (layout, too few classes, an empty split)."""


@dataclass(frozen=True)
class Candidate:
    """A file found under the raw folder: POSIX path relative to it, class folder, split folder (or None)."""
    path: str
    cls: str
    split: str | None


@dataclass(frozen=True)
class Decoded:
    """What one decode returns. `reason` is set when the file is not a usable image.

    Pixel sums are over the uint8 pixels after stats_transform: exact integers, per channel (R, G, B).
    """
    path: str
    sha256: str
    reason: str | None = None
    width: int = 0
    height: int = 0
    format: str | None = None
    mode: str | None = None
    rotated: bool = False
    pixel_sum: tuple[int, int, int] = (0, 0, 0)
    pixel_sumsq: tuple[int, int, int] = (0, 0, 0)
    n_pixels: int = 0  # per channel


@dataclass
class Scan:
    """The raw tree: image candidates, files rejected without decoding, hidden files skipped."""
    candidates: list[Candidate]
    rejected: list[dict[str, Any]]
    n_hidden: int
    split_folders: tuple[str, ...]  # the splits that have folders; empty for a <class>/<image> tree
    classes: tuple[str, ...] = field(default=())


# ----------------------------------------------------------------------------------------------- scan
def scan_tree(raw: Path) -> Scan:
    """List `raw` as `<split>/<class>/<image>` or `<class>/<image>` (files deeper in a class folder count).

    Hidden files and folders (.DS_Store, .git) are skipped. Files outside a class folder or without an
    image extension are rejected with a reason. Raises PrepareError for a missing folder or a mixed layout.
    """
    if not raw.is_dir():
        raise PrepareError(f"raw data folder {raw} does not exist; run the data stage first "
                           f"(`dvc repro data`).")
    files: list[PurePosixPath] = []
    for dirpath, dirnames, filenames in os.walk(raw):
        dirnames[:] = sorted(d for d in dirnames if d != "__MACOSX")
        base = PurePosixPath(Path(dirpath).relative_to(raw).as_posix())
        files += [base / name for name in filenames]
    n_hidden = sum(1 for f in files if _hidden(f))
    files = sorted((f for f in files if not _hidden(f)), key=str)
    top_dirs = sorted({f.parts[0] for f in files if len(f.parts) > 1})
    split_dirs = [d for d in top_dirs if d.lower() in SPLIT_FOLDERS]
    if split_dirs and len(split_dirs) != len(top_dirs):
        others = [d for d in top_dirs if d not in split_dirs]
        raise PrepareError(f"{raw}: mixed layout: split folders {split_dirs} next to other folders {others}. "
                           f"Expected either <split>/<class>/<image> (splits: {', '.join(SPLIT_FOLDERS)}) "
                           f"or <class>/<image>.")
    depth = 2 if split_dirs else 1
    candidates, rejected = [], []
    for f in files:
        path = str(f)
        if len(f.parts) <= depth:
            where = "a split folder" if split_dirs and len(f.parts) == 2 else "the dataset root"
            expected = "<split>/<class>/<image>" if split_dirs else "<class>/<image>"
            rejected.append({"path": path, "reason": f"not inside a class folder (it is in {where}; "
                                                     f"expected {expected})"})
            continue
        split = SPLIT_FOLDERS[f.parts[0].lower()] if split_dirs else None
        cls = f.parts[depth - 1]
        suffix = f.suffix.lower()
        if suffix not in IMAGE_EXTENSIONS:
            rejected.append({"path": path, "class": cls, "split": split,
                             "reason": (f"extension {suffix!r} is not an image extension"
                                        if suffix else "no file extension")
                                       + f" (allowed: {', '.join(sorted(IMAGE_EXTENSIONS))})"})
            continue
        candidates.append(Candidate(path, cls, split))
    classes = tuple(sorted({c.cls for c in candidates}))  # folders holding only non-image files are no class
    return Scan(candidates, rejected, n_hidden, tuple(sorted({SPLIT_FOLDERS[d.lower()] for d in split_dirs},
                                                             key=SPLITS.index)), classes)


def scan_labels(raw: Path, data: DataParams) -> Scan:
    """List the images that the labels file `data.labels` names (stages/labels.py), with their class and split.

    Rows with a non-image extension are rejected with a reason (as in scan_tree); image files under `raw` that
    the file does not list are left out and counted in the log. Raises PrepareError for a bad file or row, and
    for a row with more than one label (multi-label datasets are not supported yet).
    """
    try:
        rows = read_labels(raw, data.labels, data.label_columns)
    except LabelsError as exc:
        raise PrepareError(str(exc)) from None
    candidates, rejected = [], []
    for row in rows:
        if len(row.labels) > 1:
            raise PrepareError(f"{raw / data.labels}: row {row.row}: {row.path!r} has {len(row.labels)} labels "
                               f"{list(row.labels)}; multi-label datasets are not supported yet (one label a row).")
        suffix = PurePosixPath(row.path).suffix.lower()
        if suffix not in IMAGE_EXTENSIONS:
            rejected.append({"path": row.path, "class": row.labels[0], "split": row.split,
                             "reason": f"extension {suffix!r} is not an image extension (allowed: "
                                       f"{', '.join(sorted(IMAGE_EXTENSIONS))})"})
            continue
        candidates.append(Candidate(row.path, row.labels[0], row.split))
    listed = {row.path for row in rows}
    unlisted = sum(1 for p in raw.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS
                   and p.relative_to(raw).as_posix() not in listed)
    if unlisted:
        logger.warning("%d image file(s) under %s are not listed in %s: left out", unlisted, raw, data.labels)
    split_folders = tuple(s for s in SPLITS if any(c.split == s for c in candidates))
    if split_folders and any(c.split is None for c in candidates):
        raise PrepareError(f"{raw / data.labels}: some rows have a split and some do not; fill in "
                           f"{data.label_columns.split!r} on every row.")
    return Scan(sorted(candidates, key=lambda c: c.path), sorted(rejected, key=lambda r: r["path"]), 0,
                split_folders, tuple(sorted({c.cls for c in candidates})))


def _hidden(path: PurePosixPath) -> bool:
    return any(part.startswith(".") for part in path.parts)


# --------------------------------------------------------------------------------------------- decode
def decode_image(path: Path, *, stats_size: int) -> Decoded:
    """Read `path` once: sha256 of its bytes, decode (EXIF-oriented 8-bit RGB), and pixel sums for mean/std.

    Never raises for a bad image: the reason goes into `Decoded.reason`.
    """
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    name = path.as_posix()
    if not data:
        return Decoded(name, digest, reason="empty file (0 bytes)")
    try:
        image, facts = load_rgb(io.BytesIO(data))
    except ImageDecodeError as exc:
        return Decoded(name, digest, reason=str(exc))
    pixels = stats_transform(stats_size)(image).to(torch.int64)  # [3, S, S], values 0..255
    return Decoded(name, digest, width=facts["width"], height=facts["height"], format=facts["format"],
                   mode=facts["mode"], rotated=facts["rotated"],
                   pixel_sum=tuple(pixels.sum(dim=(1, 2)).tolist()),
                   pixel_sumsq=tuple((pixels * pixels).sum(dim=(1, 2)).tolist()),
                   n_pixels=pixels.shape[1] * pixels.shape[2])


class _DecodeDataset(torch.utils.data.Dataset):
    """Decodes files for DataLoader workers; item i is `decode_image(root / paths[i])`."""

    def __init__(self, root: Path, paths: Sequence[str], stats_size: int) -> None:
        self.root, self.paths, self.stats_size = root, list(paths), stats_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Decoded:
        decoded = decode_image(self.root / self.paths[index], stats_size=self.stats_size)
        return dataclasses.replace(decoded, path=self.paths[index])


def _as_is(item: Decoded) -> Decoded:
    return item


def resolve_workers(num_workers: int | str) -> int:
    """`auto`: every CPU core this process may use (0, i.e. in-process, on a single core)."""
    if num_workers == "auto":
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        return cores if cores > 1 else 0
    return int(num_workers)


def decode_all(raw: Path, paths: Sequence[str], *, stats_size: int, num_workers: int) -> list[Decoded]:
    """Decode every file of `paths` (relative to `raw`) in `num_workers` DataLoader worker processes, in order."""
    loader = torch.utils.data.DataLoader(_DecodeDataset(raw, paths, stats_size), batch_size=None,
                                         num_workers=min(num_workers, len(paths)), collate_fn=_as_is)
    return list(progress(loader, total=len(paths), desc="decode", unit="img"))


# ---------------------------------------------------------------------------------------------- split
def stratified_split(groups: Sequence[tuple[str, str]], *, val_fraction: float, test_fraction: float,
                     seed: int) -> dict[str, str]:
    """Assign each (key, class) group to train/val/test, stratified per class.

    Per class, round-half-up(n * fraction) groups go to test and to val (at least one stays in train); the
    held-out split (test when test_fraction > 0, else val) gets at least one group of every class, so each
    class is in train and held out; a class with a single group raises PrepareError. Which groups is a
    permutation of the keys in sorted order drawn from (seed, class name). Returns {key: split}.
    """
    by_class: dict[str, list[str]] = defaultdict(list)
    for key, cls in groups:
        by_class[cls].append(key)
    held = "test" if test_fraction > 0 else "val" if val_fraction > 0 else None
    alone = sorted(cls for cls, keys in by_class.items() if len(keys) < 2)
    if held and alone:
        raise PrepareError(f"class(es) {alone} have a single distinct image: it cannot be both in train and in the "
                           f"held-out {held} split. Add images of these classes (or remove them).")
    assignment = {}
    for cls, keys in sorted(by_class.items()):
        keys = sorted(keys)
        n = len(keys)
        n_test = min(max(math.floor(n * test_fraction + 0.5), int(held == "test")), n - 1)
        n_val = min(max(math.floor(n * val_fraction + 0.5), int(held == "val")), n - 1 - n_test)
        rng = np.random.default_rng([seed, zlib.crc32(cls.encode("utf-8"))])
        order = rng.permutation(n)
        for rank, index in enumerate(order):
            assignment[keys[index]] = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
    return assignment


def drawn_splits(split_folders: Sequence[str], params: PrepareParams) -> tuple[str, ...]:
    """The splits stratified out of train: val when it has no folder and val_fraction > 0; test when
    test_fraction > 0 and there is no folder to hold out (neither val/ nor test/)."""
    drawn = []
    if "val" not in split_folders and params.val_fraction > 0:
        drawn.append("val")
    if not {"val", "test"} & set(split_folders) and params.test_fraction > 0:
        drawn.append("test")
    return tuple(drawn)


def check_heldout(split_folders: Sequence[str], params: PrepareParams, *, raw: Path) -> None:
    """Raise PrepareError when neither val nor test would exist: no folder for them and nothing to draw."""
    if {"val", "test"} & set(split_folders) or drawn_splits(split_folders, params):
        return
    layout = f"split folders: {', '.join(split_folders)}" if split_folders else "no split folders"
    raise PrepareError(
        f"{raw}: nothing would be held out for evaluation: the dataset has no val/ or test/ folder ({layout}) and "
        f"prepare.test_fraction and prepare.val_fraction are both 0. Set prepare.test_fraction in params.yaml, "
        f"e.g. `test_fraction: 0.2` (a stratified held-out test split), or add a test/ folder to the dataset.")


def assign_splits(records: Sequence[tuple[Candidate, Decoded]], *, split_folders: Sequence[str],
                  params: PrepareParams) -> tuple[dict[str, str], list[dict[str, Any]], str]:
    """Split the decodable images; return ({path: split}, duplicate groups, how the split was made).

    Identical files (same sha256) never end up in two splits: with split folders, a file present in
    several is kept in the first of train, val, test and dropped from the others (its entry in the
    returned duplicate groups says so); a stratified split moves whole groups of identical files.
    """
    by_hash: dict[str, list[tuple[Candidate, Decoded]]] = defaultdict(list)
    for cand, dec in records:
        by_hash[dec.sha256].append((cand, dec))
    splits: dict[str, str] = {}
    duplicates = []
    for digest, members in sorted(by_hash.items(), key=lambda kv: kv[1][0][0].path):
        keep_split = min((c.split or "train" for c, _ in members), key=SPLITS.index)
        for cand, _ in members:
            if cand.split is None or cand.split == keep_split:
                splits[cand.path] = cand.split or "train"
        if len(members) > 1:
            paths = [c.path for c, _ in members]
            duplicates.append({"sha256": digest, "paths": paths, "classes": sorted({c.cls for c, _ in members}),
                               "kept": [p for p in paths if p in splits],
                               "dropped": [p for p in paths if p not in splits]})
    method = "folders" if split_folders else "stratified"
    drawn = drawn_splits(split_folders, params)
    if drawn:  # no folder for this split: draw it from train, stratified, identical files together
        groups = [(digest, members[0][0].cls) for digest, members in by_hash.items()
                  if splits.get(members[0][0].path) == "train"]
        assignment = stratified_split(groups, seed=params.seed,
                                      val_fraction=params.val_fraction if "val" in drawn else 0.0,
                                      test_fraction=params.test_fraction if "test" in drawn else 0.0)
        for digest, split in assignment.items():
            for cand, _ in by_hash[digest]:
                if splits.get(cand.path) == "train":
                    splits[cand.path] = split
        if split_folders:
            method = f"folders ({', '.join(split_folders)}); {' and '.join(drawn)} drawn from train, stratified"
    return splits, duplicates, method


# ------------------------------------------------------------------------------------------ mean/std
def combine_stats(decoded: Iterable[Decoded]) -> dict[str, Any]:
    """Exact per-channel mean and (population) std in [0, 1] units from per-image integer pixel sums.

    With S = sum of pixel values, Q = sum of squares and N = pixel count (per channel, 0..255 units):
    mean = S / (255 N), var = (N Q - S^2) / (255 N)^2, computed in exact rational arithmetic.
    """
    total = [0, 0, 0]
    total_sq = [0, 0, 0]
    n = 0
    count = 0
    for d in decoded:
        total = [a + b for a, b in zip(total, d.pixel_sum)]
        total_sq = [a + b for a, b in zip(total_sq, d.pixel_sumsq)]
        n += d.n_pixels
        count += 1
    if n == 0:
        raise PrepareError("no training pixels to compute mean/std from")
    mean = [float(Fraction(s, 255 * n)) for s in total]
    std = [math.sqrt(Fraction(n * q - s * s, (255 * n) ** 2)) for s, q in zip(total, total_sq)]
    return {"mean": mean, "std": std, "n_images": count, "n_pixels": n}


# ------------------------------------------------------------------------------------------- reports
def image_warnings(cand: Candidate, dec: Decoded, *, usual_format: str = "JPEG") -> list[str]:
    """Things a user may want to look at in a valid image (it is kept): format, colour mode, rotation, size.

    `usual_format` is the dataset's most common format: only images in another format are flagged, so a
    PNG dataset does not flag every image.
    """
    issues = []
    fmt = "JPEG" if dec.format in JPEG_FORMATS else dec.format
    if fmt != usual_format:
        issues.append(f"non-{usual_format} format ({dec.format})")
    if dec.mode != "RGB":
        issues.append(f"{MODE_NAMES.get(str(dec.mode), 'unusual')} mode ({dec.mode}) converted to 8-bit RGB")
    if dec.rotated:
        issues.append("EXIF orientation applied (width/height are after rotation)")
    suffix = PurePosixPath(cand.path).suffix.lower()
    expected = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".gif": "GIF", ".bmp": "BMP", ".webp": "WEBP",
                ".tif": "TIFF", ".tiff": "TIFF"}.get(suffix)
    if expected and dec.format != expected and not (expected == "JPEG" and dec.format in JPEG_FORMATS):
        issues.append(f"extension {suffix} but {dec.format} contents")
    if min(dec.width, dec.height) < TINY_SIDE:
        issues.append(f"tiny image ({dec.width}x{dec.height}), upscaled for features")
    return issues


def normalization_report(params: Params, dataset: dict[str, Any]) -> dict[str, Any]:
    """For each backbone in params: whether it normalizes with its pretrained or the dataset mean/std."""
    mode = params.prepare.normalization
    report = {}
    for name in params.backbones:
        pre = get_backbone(name, params.weights.custom).preprocess
        if mode == "dataset":
            report[name] = {"uses": "dataset", "mean": dataset["mean"], "std": dataset["std"]}
        else:
            report[name] = {"uses": "pretrained", "mean": list(pre.mean), "std": list(pre.std)}
    # "pretrained": the backbone keeps the mean/std it was trained with (prepare.normalization: backbone);
    # "dataset": every backbone uses this dataset's mean/std (prepare.normalization: dataset).
    return {"mode": mode, "backbones": report}


@dataclass
class Prepared:
    """Everything prepare writes, built by `prepare_dataset` and written by `write_outputs`."""
    manifest: list[dict[str, Any]]
    classes: list[str]
    stats: dict[str, Any]
    summary: dict[str, Any]
    quarantine: list[dict[str, Any]]


def prepare_dataset(raw: Path, params: Params, *, num_workers: int) -> Prepared:
    """Scan, decode, quarantine, split, de-duplicate and measure `raw`; raise PrepareError when unusable."""
    p = params.prepare
    scan = scan_labels(raw, params.data) if params.data.labels else scan_tree(raw)
    check_heldout(scan.split_folders, p, raw=raw)  # before decoding: it depends on the layout and params only
    decoded = decode_all(raw, [c.path for c in scan.candidates], stats_size=p.stats_size,
                         num_workers=num_workers)
    valid, quarantine = sort_decoded(scan, decoded)
    classes = list(scan.classes)
    if len(classes) < 2:
        raise PrepareError(f"{raw}: found {len(classes)} class folder(s) {classes}; a classifier needs at "
                           f"least 2 (layout <class>/<image> or <split>/<class>/<image>).")
    splits, duplicates, method = assign_splits(valid, split_folders=scan.split_folders, params=p)
    kept = [(c, d) for c, d in valid if c.path in splits]
    counts = {s: Counter(c.cls for c, _ in kept if splits[c.path] == s) for s in SPLITS}
    check_split_counts(counts, classes, raw=raw, scan=scan, params=p,
                       n_valid=len(valid), n_quarantined=len(quarantine), method=method)
    label = {c: i for i, c in enumerate(classes)}
    manifest = [{"path": c.path, "class": c.cls, "label": label[c.cls], "split": splits[c.path],
                 "sha256": d.sha256, "width": d.width, "height": d.height}
                for c, d in sorted(kept, key=lambda cd: cd[0].path)]
    train_stats = combine_stats(d for c, d in kept if splits[c.path] == "train")
    stats = {**train_stats, "split": "train", "units": "RGB in [0, 1]", "stats_size": p.stats_size,
             "transform": f"resize short side to {p.stats_size} (bilinear, antialiased), centre crop "
                          f"{p.stats_size}x{p.stats_size}"}
    warnings = dataset_warnings(kept, counts, classes, duplicates, raw=raw)
    summary = {
        "n_images": len(manifest),
        "n_classes": len(classes),
        "classes": classes,
        "split_method": method,
        "splits": {s: {"total": counts[s].total(), **{c: counts[s][c] for c in classes}} for s in SPLITS},
        "n_bad": len(quarantine),
        "n_hidden_skipped": scan.n_hidden,
        "n_duplicates": sum(len(g["paths"]) - 1 for g in duplicates),
        "n_duplicates_dropped": sum(len(g["dropped"]) for g in duplicates),
        "mean": stats["mean"],
        "std": stats["std"],
        "stats_size": p.stats_size,
        "normalization": normalization_report(params, stats),
        "n_warnings": len(warnings),
        "warnings": warnings[:MAX_LISTED_WARNINGS],
        "duplicates": duplicates[:MAX_LISTED_WARNINGS],
    }
    return Prepared(manifest, classes, stats, summary, quarantine)


def sort_decoded(scan: Scan, decoded: Sequence[Decoded]) -> tuple[list[tuple[Candidate, Decoded]], list[dict[str, Any]]]:
    """Split the decoded candidates into valid ones and the quarantine (scan rejects + undecodable), sorted by path."""
    quarantine = [{"path": r["path"], "class": r.get("class"), "split": r.get("split"), "sha256": None,
                   "reason": r["reason"]} for r in scan.rejected]
    valid: list[tuple[Candidate, Decoded]] = []
    for cand, dec in zip(scan.candidates, decoded):
        if dec.reason is None:
            valid.append((cand, dec))
        else:
            quarantine.append({"path": cand.path, "class": cand.cls, "split": cand.split, "sha256": dec.sha256,
                               "reason": dec.reason})
    quarantine.sort(key=lambda q: q["path"])
    for q in quarantine:
        logger.warning("quarantined %s: %s", q["path"], q["reason"])
    return valid, quarantine


def check_split_counts(counts: dict[str, Counter], classes: Sequence[str], *, raw: Path, scan: Scan,
                       params: PrepareParams, n_valid: int, n_quarantined: int, method: str) -> None:
    """Raise PrepareError when a split that must exist is empty or a class has no training image."""
    drawn = drawn_splits(scan.split_folders, params)
    required = {"train"} | set(scan.split_folders) | set(drawn)
    for split in SPLITS:
        if split in required and not counts[split]:
            fix = (f"Add images, or raise prepare.{split}_fraction (each class gives round-half-up(its distinct "
                   f"files x {split}_fraction) to {split})" if split in drawn else "Add images")
            raise PrepareError(
                f"{raw}: the {split} split has no images ({n_valid} valid images in all, {n_quarantined} "
                f"quarantined; split from {method}). {fix}.")
    no_train = [c for c in classes if not counts["train"][c]]
    if no_train:
        raise PrepareError(f"{raw}: class(es) {no_train} have no valid training images; every class needs "
                           f"some (see reports/prepare/quarantine.json for files that were rejected).")
    held = "test" if counts["test"] else "val"
    no_heldout = [c for c in classes if not counts[held][c]]
    if no_heldout:
        raise PrepareError(f"{raw}: class(es) {no_heldout} have no valid image in the held-out {held} split; "
                           f"every class needs some there too, or its recall cannot be measured. Add images of "
                           f"these classes to {held} (see reports/prepare/quarantine.json for rejected files).")


def dataset_warnings(kept: Sequence[tuple[Candidate, Decoded]], counts: dict[str, Counter], classes: Sequence[str],
                     duplicates: Sequence[dict[str, Any]], *, raw: Path) -> list[dict[str, Any]]:
    """Per-image warnings (unusual format, size, ...), classes missing from val/test, identical files across
    classes; each logged."""
    formats = Counter("JPEG" if d.format in JPEG_FORMATS else d.format for _, d in kept)
    usual = min(formats, key=lambda f: (-formats[f], f != "JPEG", str(f)))  # ties: JPEG, then by name
    warnings: list[dict[str, Any]] = []
    for cand, dec in kept:
        if issues := image_warnings(cand, dec, usual_format=usual):
            warnings.append({"path": cand.path, "issues": issues})
    for split in ("val", "test"):
        missing = [c for c in classes if counts[split].total() and not counts[split][c]]
        if missing:
            warnings.append({"path": None, "issues": [f"class(es) {missing} have no {split} images"]})
    for group in duplicates:
        if len(group["classes"]) > 1:
            warnings.append({"path": None, "issues": [f"identical files under different classes "
                                                      f"{group['classes']}: {group['paths']}"]})
    for w in warnings:
        logger.warning("%s: %s", w["path"] or raw, "; ".join(w["issues"]))
    return warnings


def manifest_csv(rows: Sequence[dict[str, Any]]) -> str:
    """The manifest as CSV text: header MANIFEST_FIELDS, '\\n' line endings, rows as given."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=MANIFEST_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def write_outputs(prepared: Prepared, *, out: Path, reports: Path) -> None:
    """Write manifest.csv, classes.json, stats.json under `out` and summary/quarantine under `reports`."""
    write_text(out / "manifest.csv", manifest_csv(prepared.manifest))
    write_json(out / "classes.json", prepared.classes)
    write_json(out / "stats.json", prepared.stats)
    write_json(reports / "quarantine.json", {"n_bad": len(prepared.quarantine), "files": prepared.quarantine})
    write_json(reports / "summary.json", prepared.summary)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--raw", type=Path, required=True, help="the dataset tree (data/raw)")
    parser.add_argument("--out", type=Path, required=True, help="folder for manifest.csv, classes.json, stats.json")
    parser.add_argument("--reports", type=Path, required=True, help="folder for summary.json, quarantine.json")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    start = time.perf_counter()
    try:
        params = load_params(args.params)
        workers = resolve_workers(params.prepare.num_workers)
        prepared = prepare_dataset(args.raw, params, num_workers=workers)
        write_outputs(prepared, out=args.out, reports=args.reports)
    except (ParamError, PrepareError, OSError) as exc:  # OSError: an output could not be written
        logger.error("%s", exc)
        return 1
    s = prepared.summary
    seconds = time.perf_counter() - start
    logger.info("%d images (%s), %d classes, %d quarantined, %d duplicates, %d warnings; mean %s std %s; "
                "%.1fs with %d workers", s["n_images"],
                ", ".join(f"{k} {v['total']}" for k, v in s["splits"].items()), s["n_classes"], s["n_bad"],
                s["n_duplicates"], s["n_warnings"], [round(m, 4) for m in s["mean"]],
                [round(x, 4) for x in s["std"]], seconds, workers)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
