"""stages.head: every head kind, C sweep, calibration metrics, exported head == trained head, provenance checks,
and the stage end to end on a tiny backbone (metrics, layers, errors.csv, plots, classifier.pt)."""
from __future__ import annotations

import csv
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

from stages import head as hd
from stages.backbones import (IMAGENET_MEAN, IMAGENET_STD, Backbone, Preprocess, WeightsSource, build_feature_model,
                              build_model)
from stages.images import MANIFEST_FIELDS, eval_dataset, read_manifest
from stages.metrics import classification_metrics
from stages.params import HeadParams
from stages.predict import build_head, load_classifier

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
@pytest.mark.parametrize("n_classes", [2, 3])
@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_separates_blobs_and_its_export_reproduces_it(kind: str, n_classes: int) -> None:
    x_train, y_train = blobs(20, n_classes, 12, seed=1)
    x_val, y_val = blobs(20, n_classes, 12, seed=2)
    probe = hd.fit_probe(x_train, y_train, x_val, y_val, kind=kind, Cs=[0.1, 1.0], max_iter=2000, seed=0)
    proba = probe.predict_proba(x_val)
    assert proba.shape == (len(y_val), n_classes) and np.allclose(proba.sum(1), 1)
    assert np.mean(proba.argmax(1) == y_val) >= 0.95
    assert probe.warnings == [] and probe.refit_on == "train" and [p.C for p in probe.sweep] == [0.1, 1.0]

    spec = hd.export_head(probe)  # float64 tensors, scaler folded in (linear kinds)
    exported = build_head(spec)(torch.from_numpy(x_val.astype(np.float64))).numpy()
    np.testing.assert_allclose(exported, proba, rtol=0, atol=1e-10)
    assert hd.verify_export(spec, probe, x_val) < 1e-10
    assert spec["type"] == ("rbf_svm" if kind == "svm_rbf" else "linear")
    if spec["type"] == "linear":
        assert spec["weight"].shape == ((1 if kind == "linear_svm" and n_classes == 2 else n_classes), 12)


def test_softmax_head_matches_sklearn_logistic_regression() -> None:
    """Same objective (mean cross-entropy + |W|^2 / (2 C n)): same probabilities to ~1e-4."""
    x, y = blobs(15, 3, 8, seed=3, spread=1.0)
    x = StandardScaler().fit_transform(x)
    ours = hd.SoftmaxClassifier(0.5, seed=0).fit(x, y)
    reference = LogisticRegression(C=0.5, tol=1e-10, max_iter=10_000).fit(x, y)
    np.testing.assert_allclose(ours.predict_proba(x), reference.predict_proba(x), atol=1e-4)


def test_choose_C_takes_the_best_val_accuracy_and_the_smaller_C_on_ties() -> None:
    points = [hd.SweepPoint(C=c, val_accuracy=a, val_log_loss=0.0, seconds=0.0)
              for c, a in [(10.0, 0.9), (0.1, 0.8), (1.0, 0.9), (0.01, 0.7)]]
    assert hd.choose_C(points).C == 1.0
    assert hd.choose_C(points[:2]).C == 10.0


def test_sweep_picks_the_C_with_the_best_val_accuracy() -> None:
    """A noisy 200-dimensional problem where val accuracy depends on C; compared with cold sklearn fits."""
    rng = np.random.default_rng(3)
    w = np.zeros(200)
    w[:5] = 1.0

    def make(n: int):
        x = rng.normal(0, 1, (n, 200))
        return x, (x @ w + rng.normal(0, 1.0, n) > 0).astype(int)

    (x_train, y_train), (x_val, y_val) = make(40), make(400)
    Cs = [10.0, 1e-4, 1e-2, 1e-1, 1.0, 1e-3]
    probe = hd.fit_probe(x_train, y_train, x_val, y_val, kind="logreg", Cs=Cs, max_iter=2000, seed=0)
    cold = {C: make_pipeline(StandardScaler(), LogisticRegression(C=C, tol=1e-8, max_iter=5000))
            .fit(x_train, y_train).score(x_val, y_val) for C in sorted(Cs)}
    assert {p.C: p.val_accuracy for p in probe.sweep} == cold
    best = max(cold.values())
    assert len(set(cold.values())) > 2 and probe.C == min(C for C, a in cold.items() if a == best)
    swept = probe.sweep[[p.C for p in probe.sweep].index(probe.C)]
    assert probe.model.score(x_val, y_val) == swept.val_accuracy  # refit on train is the sweep's model


def test_refit_on_val_fits_train_plus_val() -> None:
    x_train, y_train = blobs(10, 2, 6, seed=4)
    x_val, y_val = blobs(10, 2, 6, seed=5)
    probe = hd.fit_probe(x_train, y_train, x_val, y_val, kind="logreg", Cs=[1.0], max_iter=2000, seed=0,
                         refit_on_val=True)
    scaler = probe.model[0]
    assert probe.refit_on == "train+val" and scaler.n_samples_seen_ == 40
    np.testing.assert_allclose(scaler.mean_, np.concatenate([x_train, x_val]).mean(0), rtol=1e-6)


def test_convergence_warnings_are_recorded_not_hidden() -> None:
    x_train, y_train = blobs(20, 3, 10, seed=6, spread=0.5)
    x_val, y_val = blobs(10, 3, 10, seed=7, spread=0.5)
    probe = hd.fit_probe(x_train, y_train, x_val, y_val, kind="logreg", Cs=[1.0, 100.0], max_iter=2, seed=0)
    assert len(probe.warnings) == 2 and probe.warnings[0].startswith("C=1: ")
    assert "max_iter" in probe.warnings[0] or "iterations" in probe.warnings[0]
    assert [p.as_dict()["converged"] for p in probe.sweep] == [False, False]


def test_svm_kinds_need_two_training_images_per_class() -> None:
    x, y = blobs(3, 2, 4, seed=8)
    y[0] = 1  # class 0 now has 2 images, class 1 has 4
    x_val, y_val = blobs(2, 2, 4, seed=9)
    hd.fit_probe(x, y, x_val, y_val, kind="svm_rbf", Cs=[1.0], max_iter=100, seed=0)  # 2-fold calibration
    with pytest.raises(hd.HeadError, match="at least 2 training images per class; the smallest class has 1"):
        hd.fit_probe(np.delete(x, 1, 0), np.delete(y, 1), x_val, y_val, kind="linear_svm", Cs=[1.0],
                     max_iter=100, seed=0)


# ------------------------------------------------------------------------------------------------ metrics
def test_ece_of_a_toy_equals_the_hand_computed_value() -> None:
    """10 predictions: 4 at confidence 0.9 with 3 right, 6 at 0.6 with 3 right (15 bins: 0.9 in (13/15, 14/15],
    0.6 in (8/15, 9/15]). ECE = 0.4 * |0.75 - 0.9| + 0.6 * |0.5 - 0.6| = 0.06 + 0.06 = 0.12."""
    probs = np.array([[0.9, 0.1]] * 4 + [[0.6, 0.4]] * 6)
    labels = np.array([0, 0, 0, 1] + [0, 0, 0, 1, 1, 1])
    metrics = classification_metrics(probs, labels, ["a", "b"], ece_bins=15)
    assert metrics["ece"] == pytest.approx(0.12, abs=1e-12)
    assert metrics["accuracy"] == 0.6
    bins = hd.calibration_bins(probs.max(1), probs.argmax(1) == labels, n_bins=15)
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


def make_project(root: Path, *, n_train: int = 8, n_val: int = 4, n_test: int = 2,
                 head: dict | None = None) -> dict:
    """data/raw/<split>/<class>/*.jpg for classes ants (0) and bees (1), the manifest, tiny random weights
    (timm test_efficientnet, 32x32 input) and a params.yaml declaring them as the custom backbone `tiny`."""
    raw = root / "data" / "raw"
    classes = ["ants", "bees"]
    rows = []
    for split, count in (("train", n_train), ("val", n_val), ("test", n_test)):
        for label, name in enumerate(classes):
            for i in range(count):
                rel = f"{split}/{name}/{name}{i:02d}.jpg"
                rows.append([rel, name, label, split, save_image(raw / rel, label, len(rows)), 40, 48])
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
              "head": {"kind": "logreg", "C": [0.1, 1.0], **(head or {})}}
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
                    "--model", str(root / "models" / "tiny" / "classifier.pt"),
                    "--reports", str(root / "reports" / "tiny"),
                    "--params", str(root / "params.yaml")])


@pytest.fixture
def project(tmp_path: Path) -> dict:
    project = make_project(tmp_path)
    write_features(project)
    return project


def test_stage_writes_metrics_layers_errors_plots_and_an_export_that_predicts_the_same(project: dict) -> None:
    params = yaml.safe_load((project["root"] / "params.yaml").read_text())
    params["head"]["layers"] = "all"
    (project["root"] / "params.yaml").write_text(yaml.safe_dump(params))
    assert run_stage(project) == 0
    reports = project["root"] / "reports" / "tiny"

    metrics = json.loads((reports / "metrics.json").read_text())
    assert (metrics["backbone"], metrics["head"], metrics["layer"]) == ("tiny", "logreg", "pool")
    assert metrics["feature_dim"] == 256
    assert (metrics["n_train"], metrics["n_val"], metrics["n_test"]) == (16, 8, 4)
    assert metrics["C"] in (0.1, 1.0) and [p["C"] for p in metrics["sweep"]] == [0.1, 1.0]
    assert set(metrics["val"]) == {"accuracy", "mean_class_accuracy", "macro_f1", "log_loss", "ece", "per_class", "n"}
    assert set(metrics["val"]["per_class"]) == {"ants", "bees"} and metrics["test"]["n"] == 4
    assert metrics["features"]["manifest_sha256"] == hashlib.sha256(project["manifest"].read_bytes()).hexdigest()
    assert metrics["val"]["accuracy"] >= 0.75  # red vs blue images through a random tiny network

    layers = json.loads((reports / "layers.json").read_text())["layers"]
    assert [(e["layer"], e["feature_dim"]) for e in layers] == [("pool", 256), ("blocks.3", 48)]
    assert layers[0]["val"]["accuracy"] == metrics["val"]["accuracy"] and "per_class" not in layers[1]["val"]

    confusion = json.loads((reports / "plots" / "confusion.json").read_text())
    val_rows = [r for r in read_manifest(project["manifest"]) if r.split == "val"]
    assert [c["actual"] for c in confusion] == [r.cls for r in val_rows]
    assert np.mean([c["actual"] == c["predicted"] for c in confusion]) == metrics["val"]["accuracy"]
    calibration = json.loads((reports / "plots" / "calibration.json").read_text())
    assert sum(b["count"] for b in calibration) == 8
    per_class = json.loads((reports / "plots" / "per_class.json").read_text())
    assert [p["class"] for p in per_class] == ["ants", "bees"]
    for name in ("confusion.png", "calibration.png", "per_class.png"):
        assert (reports / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    with open(reports / "errors.csv", newline="") as fh:
        errors = list(csv.DictReader(fh))
    wrong = sorted((r.path, c["actual"], c["predicted"]) for r, c in zip(val_rows, confusion)
                   if c["actual"] != c["predicted"])
    assert [(e["path"], e["true"], e["predicted"]) for e in errors] == wrong
    assert all(0.5 <= float(e["prob"]) <= 1 for e in errors)

    export = torch.load(project["root"] / "models" / "tiny" / "classifier.pt", weights_only=True)
    assert export["format_version"] == 1 and export["classes"] == ["ants", "bees"] and export["layer"] == "pool"
    assert export["backbone"]["preprocess"]["input_size"] == 32 and export["head"]["weight"].shape == (2, 256)
    classifier = load_classifier(project["root"] / "models" / "tiny" / "classifier.pt")
    images = eval_dataset(project["raw"], [r.path for r in val_rows], [0] * len(val_rows), classifier.preprocess)
    with torch.inference_mode():
        probabilities = classifier(torch.stack([images[i][0] for i in range(len(images))])).numpy()
    assert [project["classes"][k] for k in probabilities.argmax(1)] == [c["predicted"] for c in confusion]
    for error in errors:
        row = [r.path for r in val_rows].index(error["path"])
        assert probabilities[row].max() == pytest.approx(float(error["prob"]), abs=1e-5)


# ------------------------------------------------------------------------------------------------ provenance
def provenance_error(project: dict) -> str:
    params = HeadParams(C=(1.0,))
    with pytest.raises(hd.ProvenanceError) as caught:
        hd.load_checked_features(backbone_name="tiny", features_path=project["features"],
                                 manifest_path=project["manifest"], weights_path=project["weights"], params=params)
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
    params["head"]["layer"] = "blocks.5"
    (project["root"] / "params.yaml").write_text(yaml.safe_dump(params))
    assert run_stage(project) == 1
    assert "head.layer(s) ['blocks.5'] not in" in caplog.text and "add them to extract.layers" in caplog.text
