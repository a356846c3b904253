"""Quality benchmark: every accuracy lever on every dataset given, measured on held-out images by the protocol.

    python -m stages.bench_quality DATASET_DIR [DATASET_DIR ...] [--backbone efficientnet_lite0] [--work DIR]
    make bench-quality     # hymenoptera_data and pbc_blood_cells from ../shared/datasets

Per dataset: `prepare` (default params: a dataset without split folders gets a stratified held-out test split),
`weights`, then two extractions of the backbone (stages.extract, in this process):
  main   layers [pool, mid], TTA views [none, hflip] stored as rows, extract.augment_views augmented training views
  large  layers [pool, mid] at input size x RESOLUTION_SCALE (a lever: resolution)
and one row per lever, each through stages.head.evaluate_protocol (choices by cross-validation on the
non-held-out images only; the held-out split is predicted once):

  baseline          pool features, standardize, logreg, C chosen by CV
  l2 / l2+std       feature normalization
  multi-layer       pool + mid concatenated
  hflip TTA         features averaged over the image and its mirror (train and held-out)
  flip rows         both views as training rows, held-out averaged
  aug views         + augmented training views as extra rows
  resolution        input size x RESOLUTION_SCALE
  linear_svm / svm_rbf / softmax   head kind
  default params    the candidate set params.yaml's defaults offer (what `make run` does)
  combined          flip rows + augmented views, with the default candidate set

Columns: held-out accuracy [95% Wilson interval]; McNemar p against the baseline on the same images; the
selection (CV) accuracy; "auto": whether the protocol, offered the baseline and the lever, picks the lever (it
compares their CV accuracies, never the held-out ones); seconds (extraction share included where the lever needs
one; levers that share the main extraction get an apportioned share of its seconds, an estimate). A lever
becomes a default only where it wins across datasets; see README.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from stages import extract, prepare, weights
from stages.evaluation import mcnemar_exact
from stages.features import FeatureFile, read_features
from stages.head import HeadError, evaluate_protocol
from stages.head_data import Dataset, arrange
from stages.io import setup_logging, write_json
from stages.metrics import accuracy_interval
from stages.params import HeadParams, load_params

logger = logging.getLogger(__name__)

RESOLUTION_SCALE = 1.25
AUGMENT_VIEWS = 2
BASELINE = dict(kind=("logreg",), feature_sets=(("pool",),), normalization=("standardize",))




def write_params_yaml(path: Path, *, backbone: str, extract: dict[str, Any], base: Path) -> Path:
    """A params.yaml for one extraction: the repository's params with `backbones` and `extract` overridden."""
    raw = yaml.safe_load(base.read_text(encoding="utf-8"))
    raw["backbones"] = [backbone]
    raw["finetune"]["backbones"] = []
    raw["extract"] = {**raw.get("extract", {}), **extract}
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return path


def run_stage(module: Any, argv: list[str]) -> None:
    code = module.main(argv)
    if code != 0:
        raise RuntimeError(f"python -m {module.__name__} {' '.join(argv)} exited with {code}")


def extract_variant(*, name: str, raw: Path, work: Path, backbone: str, weights_path: Path, base_params: Path,
                    extract_params: dict[str, Any]) -> tuple[FeatureFile, float]:
    """Run stages.extract with `extract_params` into work/<name>.h5; (features read back, seconds)."""
    params = write_params_yaml(work / f"params-{name}.yaml", backbone=backbone, extract=extract_params,
                               base=base_params)
    out = work / f"{name}.h5"
    tick = time.perf_counter()
    run_stage(extract, ["--backbone", backbone, "--raw", str(raw), "--manifest", str(work / "prepared/manifest.csv"),
                        "--weights", str(weights_path), "--out", str(out), "--report", str(work / f"{name}.json"),
                        "--params", str(params)])
    return read_features(out), time.perf_counter() - tick


def view_dataset(data: FeatureFile, views: int, *, mode: str, augmented: bool) -> Dataset:
    """A Dataset from a file holding `views` TTA rows per image (none, hflip): mode "first" (the plain view),
    "average" (both views averaged), "rows" (both as training rows, held-out averaged); augmented rows or not."""
    base = arrange(dataclasses.replace(data, attrs={**data.attrs, "tta_mode": "rows"}))
    n = len(base.labels)
    if mode != "rows":
        images = {layer: (x.reshape(n, views, -1)[:, 0] if mode == "first" else x.reshape(n, views, -1).mean(1))
                  for layer, x in data.features.items()}
        base = dataclasses.replace(base, images=images, views_replace_images=False,
                                   extra={layer: x[:0] for layer, x in images.items()},
                                   extra_source=np.zeros(0, dtype=np.int64))
    if augmented and len(data.augmented_source):
        if mode == "average":
            raise ValueError("augmented views are single views; combine them with mode first or rows")
        keep = base.extra_source
        base = dataclasses.replace(
            base, extra={layer: np.concatenate([base.extra[layer], data.augmented[layer]]) for layer in base.images},
            extra_source=np.concatenate([keep, data.augmented_source]).astype(np.int64))
    return base


def lever_row(name: str, dataset: Dataset, classes: Sequence[str], params: HeadParams, *, seconds: float = 0.0
              ) -> dict[str, Any]:
    feature_sets = [tuple(dataset_layer(dataset, layer) for layer in layers) for layers in params.feature_sets]
    tick = time.perf_counter()
    result = evaluate_protocol(dataset, classes, params, feature_sets)
    heldout = result["heldout_rows"]
    proba = result["predictions"]["probe"]
    correct = proba.argmax(1) == dataset.labels[heldout]
    low, high = accuracy_interval(int(correct.sum()), len(correct))
    return {"lever": name, "accuracy": float(correct.mean()), "ci_low": low, "ci_high": high, "n": int(len(correct)),
            "selection_accuracy": float(result["best"].accuracy), "chosen": result["selection"]["chosen"],
            "correct": correct, "seconds": round(time.perf_counter() - tick + seconds, 1),
            "heldout_split": result["heldout_split"]}


def dataset_layer(dataset: Dataset, layer: str) -> str:
    """`mid` -> the stored middle layer (the one layer that is not pool)."""
    if layer != "mid":
        return layer
    others = [name for name in dataset.images if name != "pool"]
    if len(others) != 1:
        raise HeadError(f"cannot tell which stored layer is mid: {others}")
    return others[0]


def bench_dataset(root: Path, *, backbone: str, work: Path, base_params: Path) -> list[dict[str, Any]]:
    """Every lever on one dataset folder: rows for the table (with per-image correctness for McNemar)."""
    work.mkdir(parents=True, exist_ok=True)
    run_stage(prepare, ["--raw", str(root), "--out", str(work / "prepared"), "--reports", str(work / "prepare"),
                        "--params", str(base_params)])
    weights_path = work / f"{backbone}.pth"
    run_stage(weights, ["--backbone", backbone, "--out", str(weights_path), "--report", str(work / "weights.json"),
                        "--params", str(base_params)])
    main, main_seconds = extract_variant(
        name="main", raw=root, work=work, backbone=backbone, weights_path=weights_path, base_params=base_params,
        extract_params={"layers": ["pool", "mid"], "tta": ["none", "hflip"], "tta_mode": "rows",
                        "augment_views": AUGMENT_VIEWS})
    size = int(main.attrs["preprocess"]["input_size"])
    large, large_seconds = extract_variant(
        name="large", raw=root, work=work, backbone=backbone, weights_path=weights_path, base_params=base_params,
        extract_params={"layers": ["pool", "mid"], "tta": ["none"], "tta_mode": "average",
                        "input_size": int(round(size * RESOLUTION_SCALE / 8) * 8)})
    classes = list(main.attrs["classes"])
    n_views = len(main.attrs.get("tta") or ["none"])
    plain = view_dataset(main, n_views, mode="first", augmented=False)
    defaults = load_params(base_params).head
    base = HeadParams(**{**dataclasses.asdict(defaults), **BASELINE})

    def with_(**changes: Any) -> HeadParams:
        return dataclasses.replace(base, **changes)

    share = main_seconds / (1 + 1 + AUGMENT_VIEWS * 0.8)  # rough per-view share of the main extraction
    rows = [lever_row("baseline (pool, standardize, logreg)", plain, classes, base, seconds=share)]
    rows.append(lever_row("normalization l2", plain, classes, with_(normalization=("l2",)), seconds=share))
    rows.append(lever_row("normalization l2+standardize", plain, classes, with_(normalization=("l2+standardize",)),
                          seconds=share))
    rows.append(lever_row("multi-layer pool+mid", plain, classes, with_(feature_sets=(("pool", "mid"),)),
                          seconds=share))
    rows.append(lever_row("hflip TTA (averaged)", view_dataset(main, n_views, mode="average", augmented=False),
                          classes, base, seconds=2 * share))
    rows.append(lever_row("flip views as training rows", view_dataset(main, n_views, mode="rows", augmented=False),
                          classes, base, seconds=2 * share))
    if len(main.augmented_source):
        rows.append(lever_row(f"{AUGMENT_VIEWS} augmented views per train image",
                              view_dataset(main, n_views, mode="first", augmented=True), classes, base,
                              seconds=main_seconds - share))
    rows.append(lever_row(f"resolution {large.attrs['preprocess']['input_size']} px",
                          arrange(large), classes, base, seconds=large_seconds))
    for kind in ("linear_svm", "svm_rbf", "softmax"):
        rows.append(lever_row(f"head {kind}", plain, classes, with_(kind=(kind,)), seconds=share))
    rows.append(lever_row("default params (protocol chooses)", plain, classes, defaults, seconds=share))
    if len(main.augmented_source):
        rows.append(lever_row("combined: flip rows + augmented views, default params",
                              view_dataset(main, n_views, mode="rows", augmented=True), classes, defaults,
                              seconds=main_seconds))
    baseline = rows[0]
    for row in rows:
        test = mcnemar_exact(row["correct"], baseline["correct"])
        row["p_vs_baseline"] = test["p_value"]
        row["auto_picks_lever"] = row["selection_accuracy"] > baseline["selection_accuracy"]
        row["dataset"] = root.name
    return rows


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    header = ("| dataset | lever | held-out acc [95% CI] | vs baseline (McNemar p) | selection (CV) acc | "
              "auto picks lever | protocol's choice | seconds |")
    lines = [header, "|" + "---|" * 8]
    for r in rows:
        chosen = r["chosen"]
        choice = f"{chosen['kind']} {'+'.join(chosen['layers'])} {chosen['normalization']} C={chosen['C']:g}"
        delta = r["accuracy"] - next(b["accuracy"] for b in rows if b["dataset"] == r["dataset"])
        lines.append(f"| {r['dataset']} ({r['heldout_split']}, n={r['n']}) | {r['lever']} | {r['accuracy']:.4f} "
                     f"[{r['ci_low']:.3f}, {r['ci_high']:.3f}] | {delta:+.4f} (p={r['p_vs_baseline']:.3f}) | "
                     f"{r['selection_accuracy']:.4f} | {'yes' if r['auto_picks_lever'] else 'no'} | {choice} | "
                     f"{r['seconds']:.0f} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m stages.bench_quality", description=__doc__.split("\n")[0])
    parser.add_argument("datasets", nargs="+", type=Path, help="image folders (<class>/<image> or <split>/<class>/...)")
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--work", type=Path, default=Path("bench_quality"), help="scratch folder (features, splits)")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="defaults to start from")
    parser.add_argument("--out", type=Path, default=None, help="also write the rows as JSON here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    os.environ.setdefault("CI", "1")  # no progress bars inside the table's run
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for root in args.datasets:
        if not root.is_dir():
            logger.error("%s is not a folder of images", root)
            return 1
        rows += bench_dataset(root, backbone=args.backbone, work=args.work / root.name, base_params=args.params)
    table = format_table(rows)
    print(table)
    print(f"\n{args.backbone}; held-out split per dataset as shown; total {time.perf_counter() - start:.0f} s")
    if args.out:
        write_json(args.out, {"backbone": args.backbone, "table": table, "rows": [
            {k: v for k, v in r.items() if k != "correct"} for r in rows]})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
