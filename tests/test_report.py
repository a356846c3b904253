"""Report stage: held-out rows with Wilson intervals, McNemar against the best, few-shot and fine-tune sections,
deltas vs git HEAD, DVC plot records and PNG, clear errors; all from synthetic report files."""
from __future__ import annotations

import csv
import hashlib
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from scipy.stats import binomtest, norm

from stages.evaluation import Predictions, write_predictions
from stages.metrics import accuracy_interval
from stages.params import ParamError, parse_params
from stages.report import ReportError, collect_rows, main

LITE0, LITE1, LITE2 = "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"
SHA = {LITE0: "5793442" + "a" * 57, LITE1: "77cc716" + "b" * 57, LITE2: "9656183" + "c" * 57}
CLASSES = ["ants", "bees"]
N = 60
LABELS = np.array([0, 1] * (N // 2))
PATHS = [f"data/raw/val/{CLASSES[y]}/{i:02d}.jpg" for i, y in enumerate(LABELS)]


def mask(correct_below: int = 50, *, wrong: tuple[int, ...] = (), right: tuple[int, ...] = ()) -> np.ndarray:
    """[N] bool: images 0..correct_below-1 right, then `wrong` flipped to wrong and `right` to right."""
    out = np.arange(N) < correct_below
    out[list(wrong)] = False
    out[list(right)] = True
    return out


# The best row (lite1's probe) gets images 0..49 right. Against it, McNemar's discordant pairs are
# (only the best right, only the row right):
BEST = mask()                                             # 50/60
LITE0_PROBE = mask(wrong=tuple(range(6)), right=(55,))    # 45/60: (6, 1) -> p = 2 * 8/128 = 0.125
LITE0_KNN = mask(wrong=tuple(range(8)))                   # 42/60: (8, 0) -> p = 2/256 = 0.0078125
LITE0_MID = mask(wrong=tuple(range(10)), right=(50, 51, 52, 53))  # 44/60: (10, 4) -> p = 2 * 1471/16384
LITE1_KNN = mask(wrong=(0, 1))                            # 48/60: (2, 0) -> p = 0.5
P_MID = 2 * (1 + 14 + 91 + 364 + 1001) / 2 ** 14          # 2 * P(Binomial(14, 1/2) <= 4)


def heldout(correct: np.ndarray, *, interval: bool = True) -> dict:
    """A held-out block as stages.metrics writes it, for per-image correctness [N]."""
    n, right = len(correct), int(correct.sum())
    recalls = [float(correct[LABELS == c].mean()) for c in range(len(CLASSES))]
    block = {"accuracy": right / n, "correct": right, "n": n, "mean_class_accuracy": float(np.mean(recalls)),
             "macro_f1": right / n - 0.002, "log_loss": 0.3, "ece": 0.05,
             "per_class": {c: {"precision": 0.9, "recall": r} for c, r in zip(CLASSES, recalls)}}
    if interval:
        block["accuracy_ci_low"], block["accuracy_ci_high"] = accuracy_interval(right, n)
    return block


def write_prediction_rows(path: Path, rows: dict[str, np.ndarray], *, split: str = "val") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_predictions(path, Predictions(split=split, classes=CLASSES, paths=PATHS, labels=LABELS, rows={
        name: {"predicted": np.where(correct, LABELS, 1 - LABELS), "confidence": np.full(N, 0.8)}
        for name, correct in rows.items()}))


FEW_SHOT = [{"shots": 1, "draws": 5, "mean": 0.7, "std": 0.05, "min": 0.62, "max": 0.76},
            {"shots": 2, "draws": 5, "mean": 0.72, "std": 0.04, "min": 0.66, "max": 0.78},
            {"shots": 5, "draws": 5, "mean": 0.74, "std": 0.02, "min": 0.7, "max": 0.76},
            {"shots": 10, "draws": 5, "mean": 0.745, "std": 0.01, "min": 0.73, "max": 0.76},
            {"shots": "all", "draws": 1, "mean": 0.75, "std": 0.0, "min": 0.75, "max": 0.75}]


def head_metrics(backbone: str, probe: np.ndarray, *, knn: np.ndarray | None = None,
                 feature_sets: dict[str, np.ndarray] | None = None, layers: str = "pool",
                 interval: bool = True, split: str = "val", **extra) -> dict:
    """metrics.json as head@<bb> writes it: the chosen probe, selection, k-NN, few-shot, one probe per feature set."""
    sets = feature_sets or {layers: probe}
    metrics = {
        "backbone": backbone, "head": "logreg", "layers": layers.split("+"), "normalization": "standardize",
        "C": 0.1, "heldout_split": split, "heldout": heldout(probe, interval=interval),
        "selection": {"method": "cv", "folds": 5, "split": "train", "n": 245, "cv_accuracy": 0.95,
                      "candidates": [{"C": 0.1, "cv_accuracy": 0.95}, {"C": 1.0, "cv_accuracy": 0.94}]},
        "feature_sets": [{"layers": name.split("+"), "kind": "logreg", "normalization": "standardize", "C": 1.0,
                          "cv_accuracy": 0.9 + 0.01 * i, "heldout": heldout(correct)}
                         for i, (name, correct) in enumerate(sets.items())],
        "few_shot": FEW_SHOT, "feature_dim": 1280, "train_seconds": 0.25, "n_train": 245,
        "features": {"path": f"features/{backbone}.h5"}, "warnings": [], "converged": True}
    if knn is not None:
        metrics["knn"] = {"k": 10, "cv_accuracy": 0.93, "heldout": heldout(knn)}
    return {**metrics, **extra}


def write_backbone(reports: Path, backbone: str, probe: np.ndarray, *, knn: np.ndarray | None = None,
                   feature_sets: dict[str, np.ndarray] | None = None, images: int = 400, seconds: float = 20.0,
                   predictions: bool = True, split: str = "val", **metrics_extra) -> None:
    folder = reports / backbone
    folder.mkdir(parents=True, exist_ok=True)
    metrics = head_metrics(backbone, probe, knn=knn, feature_sets=feature_sets, split=split, **metrics_extra)
    (folder / "metrics.json").write_text(json.dumps(metrics))
    if predictions:
        rows = {"probe": probe, **{f"layers={name}": c for name, c in (feature_sets or {}).items()}}
        if knn is not None:
            rows["knn"] = knn
        write_prediction_rows(folder / "predictions.json", rows, split=split)
    (folder / "extract.json").write_text(json.dumps(
        {"images": images, "seconds": seconds, "images_per_second": images / seconds, "device": "cpu",
         "precision": "float32", "batch_size": 32, "compile": False, "channels_last": True}))
    (folder / "weights.json").write_text(json.dumps(
        {"backbone": backbone, "source": "package", "sha256": SHA[backbone], "size": 18826032,
         "verification": "full", "parameters": 3371304}))


def write_finetune(reports: Path, backbone: str, finetune: np.ndarray, probe: np.ndarray, *,
                   predictions: bool = True) -> None:
    folder = reports / "finetune" / backbone
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.json").write_text(json.dumps(
        {"backbone": backbone, "regime": "partial", "heldout_split": "val", "heldout": heldout(finetune),
         "probe_heldout": heldout(probe), "selection": {"method": "train_slice", "n": 49, "epoch": 2,
                                                        "accuracy": 0.96},
         "train_seconds": 95.5, "feature_dim": 1280}))
    if predictions:
        write_prediction_rows(folder / "predictions.json", {"finetune": finetune, "probe": probe})


def write_lite0(reports: Path, **kwargs) -> None:
    write_backbone(reports, LITE0, LITE0_PROBE, knn=LITE0_KNN,
                   feature_sets={"pool": LITE0_PROBE, "pool+blocks.5": LITE0_MID}, **kwargs)


def write_lite1(reports: Path, **kwargs) -> None:
    write_backbone(reports, LITE1, BEST, knn=LITE1_KNN, seconds=32.0, interval=False, **kwargs)


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory with params.yaml and reports for lite0 (45/60, three feature-set rows) and lite1 (50/60)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))  # never see an outer repo
    for key in ("GIT_AUTHOR", "GIT_COMMITTER"):
        monkeypatch.setenv(f"{key}_NAME", "Report Test")
        monkeypatch.setenv(f"{key}_EMAIL", "report@example.invalid")
    set_params(tmp_path, [LITE0, LITE1])
    write_lite0(tmp_path / "reports")
    write_lite1(tmp_path / "reports")
    return tmp_path


def set_params(root: Path, backbones: list[str], primary_metric: str = "heldout.accuracy",
               finetune: list[str] | None = None) -> None:
    (root / "params.yaml").write_text(yaml.safe_dump(
        {"backbones": backbones, "report": {"primary_metric": primary_metric},
         "finetune": {"backbones": finetune or []}}))


def run_report(root: Path) -> dict:
    assert main(["--reports", "reports", "--out", "summary", "--params", "params.yaml"]) == 0
    return json.loads((root / "summary" / "summary.json").read_text())


def markdown_of(root: Path) -> str:
    return (root / "summary" / "summary.md").read_text()


def git(root: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=root, check=True, capture_output=True)


def wilson(correct: int, n: int) -> tuple[float, float]:
    """The 95% Wilson score interval by its formula."""
    z, p = norm.ppf(0.975), correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return centre - half, centre + half


# ------------------------------------------------------------------------------------------------ rows
def test_rows_intervals_and_paired_tests_against_the_best(project: Path) -> None:
    summary = run_report(project)

    assert (summary["heldout_split"], summary["primary_metric"], summary["alpha"]) == ("val", "heldout.accuracy", 0.05)
    assert list(summary["rows"]) == [LITE0, f"{LITE0} k-NN", f"{LITE0} @pool", f"{LITE0} @pool+blocks.5",
                                     LITE1, f"{LITE1} k-NN"]
    assert summary["best"] == LITE1 and summary["best_value"] == 50 / 60

    # lite1's metrics carry no interval: the report computes Wilson's from 50/60 (scipy == the formula)
    best = summary["rows"][LITE1]
    scipy_ci = binomtest(50, 60).proportion_ci(confidence_level=0.95, method="wilson")
    assert best["heldout"] == pytest.approx({"accuracy": 50 / 60, "accuracy_ci_low": scipy_ci.low,
                                             "accuracy_ci_high": scipy_ci.high, "n": 60}, abs=1e-12)
    assert (best["heldout"]["accuracy_ci_low"], best["heldout"]["accuracy_ci_high"]) == pytest.approx(wilson(50, 60))
    assert (best["vs_best_p"], best["indistinguishable_from_best"]) == (1.0, 1)

    vs_best = {name: (row["vs_best_p"], row["indistinguishable_from_best"]) for name, row in summary["rows"].items()}
    assert vs_best == {LITE0: (pytest.approx(0.125), 1), f"{LITE0} k-NN": (pytest.approx(0.0078125), 0),
                       f"{LITE0} @pool": (pytest.approx(0.125), 1),
                       f"{LITE0} @pool+blocks.5": (pytest.approx(P_MID), 1),
                       LITE1: (1.0, 1), f"{LITE1} k-NN": (pytest.approx(0.5), 1)}
    assert P_MID == pytest.approx(binomtest(4, 14, 0.5).pvalue)

    probe = summary["rows"][LITE0]
    assert probe["heldout"] == pytest.approx(
        {"accuracy": 0.75, "accuracy_ci_low": wilson(45, 60)[0], "accuracy_ci_high": wilson(45, 60)[1], "n": 60})
    assert (probe["kind"], probe["head"], probe["C"], probe["layers"], probe["normalization"]) == \
        ("probe", "logreg", 0.1, "pool", "standardize")
    assert probe["selection"] == {"method": "cv", "folds": 5, "split": "train", "n": 245, "accuracy": 0.95}
    assert (probe["mean_class_accuracy"], probe["ece"], probe["feature_dim"]) == (0.75, 0.05, 1280)
    assert probe["extract"] == {"images": 400, "seconds": 20.0, "images_per_second": 20.0,
                                "seconds_per_1000_images": 50.0, "device": "cpu", "precision": "float32"}
    assert probe["weights"] == {"sha256": SHA[LITE0][:12], "verification": "full"}
    knn = summary["rows"][f"{LITE0} k-NN"]
    assert (knn["kind"], knn["k"], knn["layers"], knn["selection"]["accuracy"]) == ("k-NN", 10, "pool", 0.93)
    mid = summary["rows"][f"{LITE0} @pool+blocks.5"]
    assert (mid["kind"], mid["layers"], mid["C"], mid["selection"]["accuracy"]) == \
        ("layers", "pool+blocks.5", 1.0, 0.91)
    assert summary["rows"][f"{LITE0} @pool"]["kind"] == "layers (chosen)"
    assert not any(name.startswith(f"{LITE1} @") for name in summary["rows"])  # one feature set: no layer rows

    md = markdown_of(project)
    low, high = scipy_ci.low, scipy_ci.high
    assert f"| **{LITE1}** | probe | 0.833 [{low:.3f}, {high:.3f}] | 0.833 | 0.050 | " \
           f"logreg, C=0.1, pool, standardize | 0.950 (cv) | 80.0 | 1280 | `{SHA[LITE1][:12]}` full | best |" in md
    assert f"| {LITE0} | probe | 0.750 [{wilson(45, 60)[0]:.3f}, {wilson(45, 60)[1]:.3f}] |" in md
    assert f"| {LITE0} k-NN | k-NN | 0.700 " in md and "| k=10, cosine, pool | 0.930 (cv) | 50.0 | - |" in md
    rows = {line.split(" | ")[0][2:]: line.rstrip(" |").rsplit(" | ", 1)[1] for line in md.splitlines()
            if line.startswith(("| efficientnet", "| **efficientnet"))}
    assert rows == {LITE0: "0.125 ≈ best", f"{LITE0} k-NN": "0.008", f"{LITE0} @pool": "0.125 ≈ best",
                    f"{LITE0} @pool+blocks.5": f"{P_MID:.3f} ≈ best", f"**{LITE1}**": "best",
                    f"{LITE1} k-NN": "0.500 ≈ best"}
    assert "Held-out split: **val**, 60 images. Every number in this report is measured on it, and nothing was " \
           "chosen on it." in md
    assert "were chosen by 5-fold stratified cross-validation on the train images (245 images), then refit on " \
           "them." in md
    assert "rows marked ≈ are not distinguishable from the best (p ≥ 0.05, alpha 0.05)" in md


def test_comparison_plot_records_and_png(project: Path) -> None:
    run_report(project)
    points = json.loads((project / "summary" / "comparison.json").read_text())
    assert [(p["row"], p["kind"], p["seconds_per_1000_images"], p["heldout_split"], p["heldout_accuracy"], p["best"])
            for p in points] == [
        (LITE0, "probe", 50.0, "val", 0.75, False), (f"{LITE0} k-NN", "k-NN", 50.0, "val", 0.7, False),
        (f"{LITE0} @pool", "layers (chosen)", 50.0, "val", 0.75, False),
        (f"{LITE0} @pool+blocks.5", "layers", 50.0, "val", 44 / 60, False),
        (LITE1, "probe", 80.0, "val", 50 / 60, True), (f"{LITE1} k-NN", "k-NN", 80.0, "val", 0.8, False)]
    best = points[4]
    assert (best["heldout_accuracy_ci_low"], best["heldout_accuracy_ci_high"]) == pytest.approx(wilson(50, 60))
    with Image.open(project / "summary" / "comparison.png") as png:
        assert (png.format, png.size) == ("PNG", (700, 450))


def test_outputs_are_byte_identical_for_identical_inputs(project: Path) -> None:
    def digests() -> dict[str, str]:
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (project / "summary").iterdir()
                if p.is_file()}

    run_report(project)
    first = digests()
    shutil.rmtree(project / "summary")
    run_report(project)
    assert digests() == first
    assert set(first) == {"summary.md", "summary.json", "comparison.json", "comparison.png", "report.html"}


def test_few_shot_table(project: Path) -> None:
    summary = run_report(project)
    assert summary["few_shot"][LITE0] == {
        "1": {"draws": 5, "mean": 0.7, "std": 0.05, "min": 0.62, "max": 0.76},
        "2": {"draws": 5, "mean": 0.72, "std": 0.04, "min": 0.66, "max": 0.78},
        "5": {"draws": 5, "mean": 0.74, "std": 0.02, "min": 0.7, "max": 0.76},
        "10": {"draws": 5, "mean": 0.745, "std": 0.01, "min": 0.73, "max": 0.76},
        "all": {"draws": 1, "mean": 0.75, "std": 0.0, "min": 0.75, "max": 0.75}}
    section = markdown_of(project).split("## Few-shot")[1].split("\n## ")[0]
    table = section.split(f"### {LITE0}\n\n")[1].split("\n\n")[0].splitlines()
    assert table == ["| Images per class | Accuracy | [min, max] | Draws |", "| ---: | ---: | ---: | ---: |",
                     "| 1 | 0.700 ± 0.050 | [0.620, 0.760] | 5 |", "| 2 | 0.720 ± 0.040 | [0.660, 0.780] | 5 |",
                     "| 5 | 0.740 ± 0.020 | [0.700, 0.760] | 5 |", "| 10 | 0.745 ± 0.010 | [0.730, 0.760] | 5 |",
                     "| all | 0.750 | - | 1 |"]
    assert f"### {LITE1}" in section


# ------------------------------------------------------------------------------------------------ fine-tune
def test_finetune_that_beats_its_probe(project: Path) -> None:
    finetune = LITE0_PROBE.copy()
    finetune[[0, 1, 2, 3, 4, 5, 50, 51]] = True  # 53/60; only the fine-tune right on 8, only the probe on 0
    write_finetune(project / "reports", LITE0, finetune, LITE0_PROBE)
    set_params(project, [LITE0, LITE1], finetune=[LITE0])
    summary = run_report(project)

    row = summary["rows"][f"{LITE0} fine-tune"]
    assert list(summary["rows"])[-1] == f"{LITE0} fine-tune" and summary["best"] == f"{LITE0} fine-tune"
    verdict = dict(row["vs_probe"])
    assert verdict.pop("probe") == pytest.approx({"accuracy": 0.75, "accuracy_ci_low": wilson(45, 60)[0],
                                                  "accuracy_ci_high": wilson(45, 60)[1], "n": 60})
    assert verdict == pytest.approx({"gain": 8 / 60, "p_value": 2 / 256, "test": "mcnemar", "beats_probe": 1,
                                     "probe_better": 0})
    assert (row["kind"], row["regime"], row["selection"]["epoch"], "extract" in row) == \
        ("fine-tune", "partial", 2, False)
    md = markdown_of(project)
    assert (f"- Fine-tuning {LITE0} gained 13.3 points over its probe (p = 0.008; fine-tune 0.883 "
            f"[{wilson(53, 60)[0]:.3f}, {wilson(53, 60)[1]:.3f}], probe 0.750 [{wilson(45, 60)[0]:.3f}, "
            f"{wilson(45, 60)[1]:.3f}] on the same 60 held-out val images).") in md
    assert f"| **{LITE0} fine-tune** | fine-tune |" in md and "| partial, epoch 2 | 0.960 (train_slice) | - |" in md
    assert f"The {LITE0} fine-tune's epoch was chosen on train_slice (49 images)." in md
    assert f"| {LITE1} | probe | 0.833" in md and "| 0.008 |\n" in md  # lite1 (50/60) now differs from the best


def test_finetune_within_the_interval_says_the_probe_is_as_good(project: Path) -> None:
    finetune = LITE0_PROBE.copy()
    finetune[[0, 1]] = True
    finetune[10] = False  # 46/60: (2, 1) discordant -> p = 1.0
    write_finetune(project / "reports", LITE0, finetune, LITE0_PROBE)
    set_params(project, [LITE0, LITE1], finetune=[LITE0])
    summary = run_report(project)

    verdict = summary["rows"][f"{LITE0} fine-tune"]["vs_probe"]
    assert (verdict["gain"], verdict["p_value"], verdict["beats_probe"], verdict["probe_better"]) == \
        (pytest.approx(1 / 60), 1.0, 0, 0)
    assert (f"- Fine-tuning {LITE0} did not beat its probe by more than the interval (fine-tune 0.767 "
            f"[{wilson(46, 60)[0]:.3f}, {wilson(46, 60)[1]:.3f}], probe 0.750 [{wilson(45, 60)[0]:.3f}, "
            f"{wilson(45, 60)[1]:.3f}] on the same 60 held-out val images; +1.7 points, p = 1.000); the probe is as "
            f"good and costs seconds (the fine-tune took 96 s).") in markdown_of(project)


def test_finetune_without_predictions_compares_intervals(project: Path) -> None:
    finetune = np.ones(N, dtype=bool)  # 60/60 vs 45/60: the intervals do not overlap
    write_finetune(project / "reports", LITE0, finetune, LITE0_PROBE, predictions=False)
    set_params(project, [LITE0, LITE1], finetune=[LITE0])
    summary = run_report(project)
    row = summary["rows"][f"{LITE0} fine-tune"]
    assert (row["vs_probe"]["test"], row["vs_probe"]["beats_probe"], "p_value" in row["vs_probe"]) == \
        ("intervals", 1, False)
    assert "vs_best_p" not in row and "vs_best_p" not in summary["rows"][LITE0]  # the best has no predictions
    md = markdown_of(project)
    assert f"- Fine-tuning {LITE0} gained 25.0 points over its probe (no per-image predictions for a paired test; " \
           f"compared by interval overlap;" in md
    assert f"reports/finetune/{LITE0}/predictions.json not found: the paired tests of its rows are n/a" in md


def test_missing_finetune_report_names_its_stage(project: Path) -> None:
    with pytest.raises(ReportError, match=rf"reports/finetune/{LITE1}/metrics.json not found: it is written by "
                                          rf"stage 'finetune@{LITE1}'"):
        collect_rows(Path("reports"), [LITE0, LITE1], finetune_backbones=[LITE1])


# ------------------------------------------------------------------------------------------------ missing / odd inputs
def test_missing_optional_inputs_keep_the_row_with_n_a(project: Path) -> None:
    metrics = head_metrics(LITE0, LITE0_PROBE)
    for key in ("knn", "few_shot", "feature_sets", "selection"):
        metrics.pop(key, None)
    (project / "reports" / LITE0 / "metrics.json").write_text(json.dumps(metrics))
    (project / "reports" / LITE0 / "predictions.json").unlink()
    summary = run_report(project)

    assert list(summary["rows"]) == [LITE0, LITE1, f"{LITE1} k-NN"]
    row = summary["rows"][LITE0]
    assert "vs_best_p" not in row and "indistinguishable_from_best" not in row and "selection" not in row
    assert row["heldout"]["accuracy"] == 0.75 and list(summary["few_shot"]) == [LITE1]
    md = markdown_of(project)
    assert f"| {LITE0} | probe | 0.750 [" in md and "| - | 50.0 | 1280 | `" in md
    assert md.split(f"| {LITE0} | probe |")[1].split("\n")[0].endswith("| n/a |")
    assert f"- reports/{LITE0}/predictions.json not found: the paired tests of its rows are n/a " \
           f"(re-run `dvc repro head@{LITE0}`)." in md
    assert f"### {LITE0}" not in md


def test_predictions_that_disagree_with_metrics_are_not_tested(project: Path) -> None:
    write_prediction_rows(project / "reports" / LITE0 / "predictions.json",
                          {"probe": BEST, "knn": LITE0_KNN})  # stale: the probe row is not the 45/60 of metrics.json
    summary = run_report(project)
    assert "vs_best_p" not in summary["rows"][LITE0]
    assert summary["rows"][f"{LITE0} k-NN"]["vs_best_p"] == pytest.approx(0.0078125)
    md = markdown_of(project)
    assert f"- {LITE0}: reports/{LITE0}/predictions.json row 'probe' (50/60 correct on val) disagrees with its " \
           f"metrics.json; its paired test is n/a" in md
    assert f"- {LITE0} @pool: reports/{LITE0}/predictions.json has no row 'layers=pool'" in md


def test_rows_on_different_heldout_splits_are_not_tested(project: Path) -> None:
    write_backbone(project / "reports", LITE1, BEST, knn=LITE1_KNN, split="test")
    summary = run_report(project)
    assert summary["heldout_split"] == "mixed: test, val"
    assert not any("vs_best_p" in row for row in summary["rows"].values())
    md = markdown_of(project)
    assert (f"**Rows were evaluated on different held-out splits** (test: {LITE1}, {LITE1} k-NN; val: {LITE0}, "
            f"{LITE0} k-NN, {LITE0} @pool, {LITE0} @pool+blocks.5), so their accuracies are not comparable and no "
            f"paired test was run.") in md
    assert md.count("| n/a |") == 5


@pytest.mark.parametrize(("name", "stage"), [("metrics.json", "head"), ("extract.json", "extract"),
                                             ("weights.json", "weights")])
def test_missing_report_names_the_file_and_the_stage_to_run(project: Path, name: str, stage: str,
                                                            capsys) -> None:
    (project / "reports" / LITE1 / name).unlink()
    expected = (f"reports/{LITE1}/{name} not found: it is written by stage '{stage}@{LITE1}'. "
                f"Run `dvc repro {stage}@{LITE1}`")
    with pytest.raises(ReportError, match=expected.replace("(", r"\(").replace(".", r"\.")):
        collect_rows(Path("reports"), [LITE0, LITE1])
    assert main(["--reports", "reports", "--out", "summary"]) == 1
    assert expected in capsys.readouterr().err


def test_old_or_broken_reports_are_a_clear_error(project: Path) -> None:
    old = {"backbone": LITE0, "head": "logreg", "C": 0.1, "feature_dim": 1280, "train_seconds": 0.2,
           "val": {"accuracy": 0.9, "mean_class_accuracy": 0.9, "ece": 0.04}}
    (project / "reports" / LITE0 / "metrics.json").write_text(json.dumps(old))
    with pytest.raises(ReportError, match=rf"reports/{LITE0}/metrics.json lacks 'heldout_split', 'heldout.accuracy', "
                                          rf"'heldout.n', .*Re-run `dvc repro --force head@{LITE0}`"):
        collect_rows(Path("reports"), [LITE0])
    (project / "reports" / LITE1 / "extract.json").write_text("{not json")
    with pytest.raises(ReportError, match=rf"reports/{LITE1}/extract.json is not valid JSON"):
        collect_rows(Path("reports"), [LITE1])


def test_head_warnings_are_carried_into_the_summary(project: Path) -> None:
    write_lite0(project / "reports", warnings=["C=10: lbfgs failed to converge (status=1)", "C=1: lbfgs failed"])
    run_report(project)
    assert (f"- {LITE0}: 2 warning(s), e.g. 'C=10: lbfgs failed to converge (status=1)' "
            f"(all in reports/{LITE0}/metrics.json)") in markdown_of(project)


def test_ece_after_temperature_scaling_and_balanced_class_weights_are_shown_beside_the_probe(project: Path) -> None:
    write_lite0(project / "reports", heldout={**heldout(LITE0_PROBE), "ece_calibrated": 0.02},
                class_weight="balanced", calibration={"method": "temperature", "temperature": 1.7})
    summary = run_report(project)
    probe = summary["rows"][LITE0]
    assert (probe["ece"], probe["ece_calibrated"], probe["temperature"], probe["class_weight"]) == (
        0.05, 0.02, 1.7, "balanced")
    assert "ece_calibrated" not in summary["rows"][LITE1]  # not calibrated: its ECE alone
    line = next(row for row in markdown_of(project).splitlines() if row.startswith(f"| {LITE0} | probe"))
    assert "| 0.050 → 0.020 |" in line and "balanced class weights" in line
    assert "ECE a → b: before → after the probe's temperature scaling" in markdown_of(project)
    page = (project / "summary" / "report.html").read_text()
    assert '<td data-value="0.05">0.050 → 0.020</td>' in page


def test_only_params_backbones_are_listed(project: Path) -> None:
    write_backbone(project / "reports", LITE2, np.ones(N, dtype=bool))  # stale: LITE2 is no longer in params
    set_params(project, [LITE1])
    summary = run_report(project)
    assert list(summary["rows"]) == [LITE1, f"{LITE1} k-NN"]


# ------------------------------------------------------------------------------------------------ best / params
def test_best_ties_break_on_mean_class_accuracy_then_name(project: Path) -> None:
    write_backbone(project / "reports", LITE0, BEST)  # 50/60 like lite1's probe
    metrics = json.loads((project / "reports" / LITE0 / "metrics.json").read_text())
    metrics["heldout"]["mean_class_accuracy"] = 0.84
    (project / "reports" / LITE0 / "metrics.json").write_text(json.dumps(metrics))
    summary = run_report(project)
    assert summary["rows"][LITE1]["mean_class_accuracy"] == pytest.approx(50 / 60)
    assert summary["best"] == LITE0  # same accuracy, higher mean-class accuracy (0.84 > 0.833)

    metrics["heldout"]["mean_class_accuracy"] = 0.8
    (project / "reports" / LITE0 / "metrics.json").write_text(json.dumps(metrics))
    assert run_report(project)["best"] == LITE1

    metrics["heldout"]["mean_class_accuracy"] = 50 / 60
    (project / "reports" / LITE0 / "metrics.json").write_text(json.dumps(metrics))
    assert run_report(project)["best"] == LITE0  # a full tie: the first name


def test_primary_metric_mean_class_accuracy(project: Path) -> None:
    set_params(project, [LITE0, LITE1], primary_metric="heldout.mean_class_accuracy")
    summary = run_report(project)
    assert (summary["primary_metric"], summary["best"], summary["best_value"]) == \
        ("heldout.mean_class_accuracy", LITE1, pytest.approx(50 / 60))


@pytest.mark.parametrize("old", ["val.accuracy", "test.accuracy", "val.mean_class_accuracy"])
def test_val_and_test_primary_metrics_are_rejected_with_the_reason(project: Path, old: str, capsys) -> None:
    with pytest.raises(ParamError, match=r"report\.primary_metric must be one of 'heldout\.accuracy', "
                                         r"'heldout\.mean_class_accuracy', 'heldout\.macro_f1'; got .*val\.\* and "
                                         r"test\.\* keys no longer exist.*measured on the held-out split only"):
        parse_params({"backbones": [LITE0], "report": {"primary_metric": old}}, known_backbones=[LITE0])
    set_params(project, [LITE0, LITE1], primary_metric=old)
    assert main(["--reports", "reports", "--out", "summary"]) == 1
    assert f"e.g. `primary_metric: heldout.{old.split('.')[1]}`" in capsys.readouterr().err
    assert not (project / "summary" / "summary.json").exists()


def test_primary_metric_default_and_unknown_value() -> None:
    assert parse_params({"backbones": [LITE0]}, known_backbones=[LITE0]).report.primary_metric == "heldout.accuracy"
    with pytest.raises(ParamError, match=r"report\.primary_metric must be one of .*; got 'accuracy'\. Edit params"):
        parse_params({"backbones": [LITE0], "report": {"primary_metric": "accuracy"}}, known_backbones=[LITE0])


# ------------------------------------------------------------------------------------------------ git
def test_outputs_do_not_depend_on_git_and_point_to_dvc_metrics_diff(project: Path) -> None:
    """Changes since the last commit are `dvc metrics diff`'s: the numbers do not depend on git state (an undeclared
    input would leave `dvc status` clean while the outputs are stale). Only the page's provenance names the commit
    the run was made from."""
    def outputs() -> dict[str, bytes]:
        return {p.name: p.read_bytes() for p in (project / "summary").iterdir() if p.is_file()}

    run_report(project)
    alone = outputs()
    git(project, "init", "-q")
    (project / "summary" / "summary.json").write_text(json.dumps({"rows": {LITE0: {"heldout": {"accuracy": 0.1}}}}))
    git(project, "add", "summary/summary.json")
    git(project, "commit", "-q", "-m", "an older run")
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project, capture_output=True, text=True).stdout.strip()
    run_report(project)
    in_git = outputs()
    assert in_git.pop("report.html") != alone.pop("report.html") and in_git == alone
    assert f"<td>{commit} with uncommitted changes</td>" in page_of(project)
    assert "Changes since the last commit: `dvc metrics diff`" in markdown_of(project)


# ------------------------------------------------------------------------------------------------ page
# Image paths with spaces, unicode and URL syntax ('#', '?', '%'): the page must quote them in links.
PAGE_PATHS = ["val/ants/00 ant.jpg", "val/bees/été 🐝 01.jpg", "val/ants/odd #1?%.jpg"]
HOSTILE = '<script>window.__pwned = 1</script>"&'


def write_page_inputs(root: Path, backbones: list[str], *, classes: list[str] = CLASSES,
                      paths: list[str] = PAGE_PATHS) -> None:
    """What the page shows beside the metrics: 32x32 JPEGs in data/raw with a manifest of their sha256, each
    backbone's errors.csv (every image, class[0] predicted as class[1]), confusion.json and calibration.png, the
    prepare summary and a quarantined file."""
    raw, reports = root / "data" / "raw", root / "reports"
    manifest = [("path", "class", "label", "split", "sha256", "width", "height")]
    for i, path in enumerate(paths):
        (raw / path).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (32, 32), (40 * i, 120, 200 - 40 * i)).save(raw / path, quality=90)
        manifest.append((path, classes[0], 0, "val", hashlib.sha256((raw / path).read_bytes()).hexdigest(), 32, 32))
    write_csv(root / "data" / "prepared" / "manifest.csv", manifest)
    for backbone in backbones:
        plots = reports / backbone / "plots"
        plots.mkdir(parents=True, exist_ok=True)
        write_csv(reports / backbone / "errors.csv", [("path", "true", "predicted", "prob")] + [
            (p, classes[0], classes[1], f"{0.5 + 0.1 * i:.6f}") for i, p in enumerate(paths)])
        (plots / "confusion.json").write_text(json.dumps(
            [{"actual": classes[0], "predicted": classes[1]}] * 3 + [{"actual": classes[1], "predicted": classes[1]}]
            * 5))
        Image.new("RGB", (60, 40), "white").save(plots / "calibration.png")
    (reports / "prepare").mkdir(parents=True, exist_ok=True)
    (reports / "prepare" / "summary.json").write_text(json.dumps(
        {"n_images": 8, "split_method": "folders", "n_bad": 1,
         "splits": {"train": {"total": 5, classes[0]: 2, classes[1]: 3}, "val": {"total": 3, classes[0]: 3}}}))
    (reports / "prepare" / "quarantine.json").write_text(json.dumps(
        {"n_bad": 1, "files": [{"path": "train/ants/broken <b>.jpg", "reason": "cannot identify image file"}]}))


def write_csv(path: Path, rows: list[tuple]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        csv.writer(fh, lineterminator="\n").writerows(rows)


def page_of(root: Path) -> str:
    return (root / "summary" / "report.html").read_text(encoding="utf-8")


def test_page_is_self_contained_with_one_table_row_per_summary_row(project: Path) -> None:
    write_page_inputs(project, [LITE0, LITE1])
    summary = run_report(project)
    html = page_of(project)

    assert html.count("<tr data-row=") == len(summary["rows"])
    for name, row in summary["rows"].items():
        assert f'<tr data-row="{name}"' in html
        assert f'data-value="{row["heldout"]["accuracy"]}"' in html
    assert 'class="best"><td class="text" data-value="efficientnet_lite1">efficientnet_lite1 ★' in html
    # nothing is loaded from anywhere: plots and thumbnails are data: URIs, links go to the images in data/raw
    assert "http://" not in html and "https://" not in html and "//cdn" not in html
    assert html.count('src="data:image/jpeg;base64,') == 2 * len(PAGE_PATHS)  # two backbones' galleries
    assert html.count('src="data:image/png;base64,') == 3  # comparison + 2 calibration plots
    assert 'href="../data/raw/val/bees/%C3%A9t%C3%A9%20%F0%9F%90%9D%2001.jpg"' in html
    assert 'href="../data/raw/val/ants/odd%20%231%3F%25.jpg"' in html
    # worst first: the most confident mistake (the last path, p 0.7) leads the gallery
    gallery = html.split('id="bb-efficientnet_lite0"')[1]
    assert gallery.index("odd #1?%.jpg") < gallery.index("00 ant.jpg")
    assert "broken &lt;b&gt;.jpg" in html and "cannot identify image file" in html  # quarantine, escaped
    assert "Dataset audit" not in html  # no audit.json: no section


def test_thumbnails_are_made_once_and_cached(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from stages import report_html

    write_page_inputs(project, [LITE0, LITE1])
    run_report(project)
    first = page_of(project)
    thumbs = sorted((project / "summary" / "thumbs").iterdir())
    manifest = (project / "data" / "prepared" / "manifest.csv").read_text(encoding="utf-8")
    assert len(thumbs) == len(PAGE_PATHS)  # one per image, shared by both galleries, named by the image's sha256
    assert all(thumb.name.split("-")[0] in manifest for thumb in thumbs)

    def no_encoding(*args, **kwargs):
        raise AssertionError("a cached thumbnail was made again")

    monkeypatch.setattr(report_html, "make_thumbnail", no_encoding)
    run_report(project)
    assert page_of(project) == first


def test_html_in_names_paths_and_notes_is_escaped(project: Path) -> None:
    classes = [HOSTILE, "bees"]
    write_page_inputs(project, [LITE0, LITE1], classes=classes, paths=[f"val/{HOSTILE}/x.jpg"])
    metrics_path = project / "reports" / LITE0 / "metrics.json"
    metrics = json.loads(metrics_path.read_text())
    metrics["warnings"] = [HOSTILE]
    metrics["heldout"]["per_class"] = {HOSTILE: {"recall": 0.5}, "bees": {"recall": 1.0}}
    metrics_path.write_text(json.dumps(metrics))
    run_report(project)
    html = page_of(project)

    assert HOSTILE not in html and html.count("<script") == 1  # only the page's own sorter
    assert "&lt;script&gt;window.__pwned = 1&lt;/script&gt;&quot;&amp;" in html


def test_missing_head_report_writes_a_page_that_says_why(project: Path, capsys) -> None:
    (project / "reports" / LITE1 / "metrics.json").unlink()
    assert main(["--reports", "reports", "--out", "summary", "--params", "params.yaml"]) == 1
    html = page_of(project)
    assert "The report could not be built" in html
    assert f"reports/{LITE1}/metrics.json not found: it is written by stage &#x27;head@{LITE1}&#x27;" in html
    assert "<tr data-row=" not in html


def test_audit_findings_are_shown_when_the_audit_ran(project: Path) -> None:
    write_page_inputs(project, [LITE0, LITE1])
    (project / "reports" / LITE0 / "audit.json").write_text(json.dumps({  # as stages/audit.py writes it
        "counts": {"duplicate_groups": 0, "duplicate_images": 0, "leakage_groups": 1, "leakage_pairs": 1,
                   "label_issues": 1, "outliers": 0, "dropped_from_heldout": 0, "flagged_images": 3},
        "flagged_fraction": 0.375, "label_check": {"status": "ran"},
        "duplicates": [{"paths": PAGE_PATHS[:2], "splits": ["train", "val"], "classes": ["ants", "bees"],
                        "cross_split": True, "score": 0.97}],
        "label_issues": [{"path": PAGE_PATHS[2], "split": "train", "given": "ants", "suggested": "bees",
                          "score": 0.9}],
        "outliers": []}))
    run_report(project)
    html = page_of(project)
    audit = html.split('<section id="audit">')[1].split("</section>")[0]
    assert "Audit on efficientnet_lite0 features" in audit and "Audit on efficientnet_lite1" not in audit
    assert audit.count('<div class="finding leak">') == 1 and audit.count("<img ") == 3
    assert "given: ants; suggested: bees; score: 0.900" in audit and "score: 0.970" in audit
    assert "cross_split" not in audit.split("Near-duplicates within a split")[1]
    assert "within a split</h4><p>None found.</p>" in audit and "class)</h4><p>None found.</p>" in audit


def test_paths_outside_data_raw_get_no_thumbnail(project: Path) -> None:
    write_page_inputs(project, [LITE0, LITE1])
    secret = project / "secret.jpg"
    Image.new("RGB", (8, 8)).save(secret)
    write_csv(project / "reports" / LITE0 / "errors.csv",
              [("path", "true", "predicted", "prob"), ("../../secret.jpg", "ants", "bees", "0.9")])
    run_report(project)
    gallery = page_of(project).split('id="bb-efficientnet_lite0"')[1].split("</section>")[0]
    assert "image not available" in gallery and "<img" not in gallery.split("Misclassified")[1]


def test_report_starts_without_torch() -> None:
    """The report stage reads JSON/CSV and draws with matplotlib: importing it must not pull torch in (seconds)."""
    code = "import sys, stages.report; print(sorted(m for m in ('torch', 'torchvision') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1]).stdout
    assert out.strip() == "[]"
