"""stages.predict: the exported classifier rebuilt from classifier.pt (weights_only) predicts the held-out (test)
images as the head stage did, end to end through the real extract stage; CLI output (text, --json, --topk); refusals."""
from __future__ import annotations

import argparse
import csv
import json
import os
from pathlib import Path

import pytest
import torch
import yaml

from stages import extract as extract_stage
from stages import export as export_format
from stages.export_onnx import onnx_path_for
from stages import features, predict
from stages.images import read_manifest
from test_head import make_project, run_stage  # tests/ is on sys.path under pytest

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def build(root: Path, *, head: dict, extract: dict) -> dict:
    """Tiny project -> the real extract stage -> the head stage; returns the project with "model" added."""
    project = make_project(root, head=head)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["extract"].update(extract)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    assert extract_stage.main(["--backbone", "tiny", "--raw", str(project["raw"]),
                               "--manifest", str(project["manifest"]), "--weights", str(project["weights"]),
                               "--out", str(project["features"]),
                               "--report", str(root / "reports" / "tiny" / "extract.json"),
                               "--params", str(root / "params.yaml")]) == 0
    assert run_stage(project) == 0
    project["model"] = root / "models" / "tiny" / "classifier.pt"
    return project


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Layers pool + blocks.3, TTA none+hflip averaged; an svm_rbf head on blocks.3."""
    torch.set_num_threads(1)
    return build(tmp_path_factory.mktemp("predict"), head={"kind": ["svm_rbf"], "feature_sets": [["blocks.3"]],
                                                            "normalization": ["standardize"], "C": [1.0, 10.0]},
                 extract={"tta": ["none", "hflip"]})


def run_cli(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    code = predict.main(argv)
    return code, capsys.readouterr().out


def test_predictions_on_heldout_images_equal_the_head_stage(project: dict, capsys: pytest.CaptureFixture) -> None:
    reports = project["root"] / "reports" / "tiny"
    code, out = run_cli([str(project["raw"] / "test"), "--model", str(project["model"]), "--json"], capsys)
    assert code == 0
    result = json.loads(out)
    assert result["backbone"] == "tiny" and result["classes"] == ["ants", "bees"]
    confusion = json.loads((reports / "plots" / "confusion.json").read_text())
    val_paths = sorted((project["raw"] / "test").rglob("*.jpg"))
    assert [p["path"] for p in result["predictions"]] == [str(p) for p in val_paths]
    assert [p["class"] for p in result["predictions"]] == [c["predicted"] for c in confusion]
    with open(reports / "errors.csv", newline="") as fh:
        errors = {row["path"]: float(row["prob"]) for row in csv.DictReader(fh)}
    for prediction, path in zip(result["predictions"], val_paths):
        rel = path.relative_to(project["raw"]).as_posix()
        if rel in errors:
            assert prediction["probability"] == pytest.approx(errors[rel], abs=1e-5)
        top = prediction["topk"]
        assert len(top) == 2 and top[0]["class"] == prediction["class"]
        assert sum(t["probability"] for t in top) == pytest.approx(1)
    metrics = json.loads((reports / "metrics.json").read_text())
    assert (metrics["head"], metrics["layers"], metrics["features"]["tta"]) == ("svm_rbf", ["blocks.3"],
                                                                               ["none", "hflip"])
    assert metrics["probabilities"].startswith("Platt sigmoid: CalibratedClassifierCV(stratified k-fold")


def test_export_is_plain_tensors_and_rebuilds_the_head_kind(project: dict) -> None:
    export = torch.load(project["model"], weights_only=True)
    assert export["head"]["type"] == "rbf_svm" and export["head"]["support_vectors"].dtype == torch.float64
    assert export["backbone"]["tta"] == ["none", "hflip"] and export["layers"] == ["blocks.3"]
    assert export["provenance"]["features"]["manifest_sha256"] == json.loads(
        (project["root"] / "reports" / "tiny" / "metrics.json").read_text())["features"]["manifest_sha256"]
    classifier = export_format.classifier_from_export(export)
    assert isinstance(classifier.head[0], export_format.RBFSVMHead) and classifier.tta == ("none", "hflip")


def test_text_output_with_topk_for_one_image(project: dict, capsys: pytest.CaptureFixture) -> None:
    image = sorted((project["raw"] / "test" / "bees").glob("*.jpg"))[0]
    code, out = run_cli([str(image), "--model", str(project["model"]), "--topk", "1"], capsys)
    assert code == 0
    path, _, rest = out.strip().rpartition(": ")
    name, probability = rest.split(" ")
    assert path == str(image) and name in ("ants", "bees") and 0.5 <= float(probability) <= 1


def test_an_undecodable_file_is_reported_and_the_rest_predicted(project: dict, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    good = sorted((project["raw"] / "val" / "ants").glob("*.jpg"))[0]
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.jpg").write_bytes(good.read_bytes())
    (tmp_path / "broken.png").write_bytes(b"not an image")
    (tmp_path / "notes.txt").write_text("ignored: not an image extension")
    code, out = run_cli([str(tmp_path), "--model", str(project["model"]), "--json"], capsys)
    assert code == 1
    predictions = json.loads(out)["predictions"]
    assert [Path(p["path"]).name for p in predictions] == ["broken.png", "a.jpg"]
    assert predictions[0]["error"] == "not an image: no decoder recognises its contents"
    assert predictions[1]["class"] in ("ants", "bees")


def test_other_format_versions_and_pickled_objects_are_refused(project: dict, tmp_path: Path) -> None:
    export = torch.load(project["model"], weights_only=True)
    torch.save({**export, "format_version": 99}, tmp_path / "future.pt")
    with pytest.raises(export_format.ExportError,
                       match=r"future.pt: format_version is 99, this code reads \(1, 2, 3\)"):
        export_format.load_classifier(tmp_path / "future.pt")
    torch.save({**export, "extra": argparse.Namespace(x=1)}, tmp_path / "pickled.pt")
    with pytest.raises(export_format.ExportError, match=r"refused to load .*pickled.pt: not a plain tensor export"):
        export_format.load_classifier(tmp_path / "pickled.pt")


def test_without_model_the_only_export_is_used_and_several_are_refused(project: dict, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(export_format.ExportError, match=r"no models/\*/classifier.pt found"):
        predict.default_model_path()
    for name in ("a", "b"):
        (tmp_path / "models" / name).mkdir(parents=True)
        os.symlink(project["model"], tmp_path / "models" / name / "classifier.pt")
    with pytest.raises(export_format.ExportError, match="several exported classifiers: models/a/classifier.pt, "
                                                  "models/b/classifier.pt; choose one with --model"):
        predict.default_model_path()
    (tmp_path / "models" / "b" / "classifier.pt").unlink()
    assert predict.default_model_path() == Path("models/a/classifier.pt")


def test_tta_rows_train_on_every_view_and_predict_with_their_mean(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture) -> None:
    """extract.tta_mode rows: the head trains on both views' rows and evaluates (and predict predicts) with the
    views' mean features; a features file claiming another layout is refused."""
    project = build(tmp_path, head={"kind": "logreg", "C": [1.0], "feature_sets": [["pool"]]},
                    extract={"tta": ["none", "hflip"], "tta_mode": "rows"})
    metrics = json.loads((tmp_path / "reports" / "tiny" / "metrics.json").read_text())
    assert (metrics["n_selection"], metrics["n_heldout"], metrics["features"]["tta_mode"]) == (24, 4, "rows")
    code, out = run_cli([str(project["raw"] / "test"), "--model", str(project["model"]), "--json"], capsys)
    confusion = json.loads((tmp_path / "reports" / "tiny" / "plots" / "confusion.json").read_text())
    assert code == 0 and [p["class"] for p in json.loads(out)["predictions"]] == [c["predicted"] for c in confusion]

    data = features.read_features(project["features"])
    data.attrs["tta"] = ["none", "hflip", "vflip"]
    with pytest.raises(features.ProvenanceError, match=r"the number of rows is 56 but expected 84 \(28 images in "):
        features.check_provenance(data, backbone="tiny", weights_path="w", weights_sha256=data.attrs["weights_sha256"],
                              manifest_path=project["manifest"], manifest_sha256=data.attrs["manifest_sha256"],
                              manifest=read_manifest(project["manifest"]))


def test_auto_engine_takes_the_checked_onnx_beside_the_export_else_torch(project: dict, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    model = project["model"]
    assert predict.resolve_engine("auto", model, device="auto") == "onnxruntime"
    assert predict.resolve_engine("auto", onnx_path_for(model), device="auto") == "onnxruntime"
    assert predict.resolve_engine("auto", model, device="cuda") == "torch"
    assert predict.resolve_engine("torch", model, device="auto") == "torch"
    alone = tmp_path / "classifier.pt"
    alone.write_bytes(model.read_bytes())  # no classifier.onnx beside it
    assert predict.resolve_engine("auto", alone, device="auto") == "torch"


def test_many_images_decode_in_workers_with_the_same_results_and_bad_files_reported(
        project: dict, tmp_path: Path) -> None:
    images = sorted((project["raw"]).rglob("*.jpg"))
    paths = []
    for i in range(predict.PARALLEL_DECODE_MIN):
        target = tmp_path / f"{i:03d}.jpg"
        target.write_bytes(images[i % len(images)].read_bytes())
        paths.append(target)
    (tmp_path / "030.jpg").write_bytes(b"broken")
    model = export_format.load_classifier(project["model"])
    parallel = predict.predict_images(model, paths, batch_size=8)
    serial = predict.predict_images(model, paths[:predict.PARALLEL_DECODE_MIN - 1], batch_size=8)  # below: no workers
    assert parallel[30]["error"].startswith("not an image") and "class" not in parallel[30]
    assert [r.get("class") for r in parallel[:-1]] == [r.get("class") for r in serial]  # same order, same answers
    assert [r.get("probability", 0) for r in parallel[:-1]] == pytest.approx([r.get("probability", 0) for r in serial],
                                                                          abs=1e-12)  # batch shapes differ
    assert all("class" in r for i, r in enumerate(parallel) if i != 30)
