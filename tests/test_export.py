"""stages.export: classifier.onnx computes what classifier.pt computes (linear and RBF-SVM heads, L2 blocks over
two layers, TTA) on real decoded images; its metadata is enough to run it; the head stage writes it; predict's
onnxruntime engine prints what the torch engine prints; a missing or mismatching .onnx is a clear error."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

from stages import export as ex
from stages import export_onnx as exo
from stages import predict
from stages.backbones import (IMAGENET_MEAN, IMAGENET_STD, Backbone, WeightsSource, build_model, classifier_path,
                              replace_module)
from test_head import TINY_ARCH, make_project, run_stage, write_features  # tests/ is on sys.path under pytest

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning",
                                        "ignore::FutureWarning")
CLASSES = ["ants", "bees", "wasps"]
POOL_DIM, MID_DIM = 256, 48  # timm test_efficientnet: pooled embedding, blocks.3


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here runs on one torch thread (fixture in conftest.py)."""


@pytest.fixture(scope="module")
def stage(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The head stage on a tiny project: logreg on pool + blocks.3 with per-layer L2 (l2_blocks [256, 48])."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    project = make_project(tmp_path_factory.mktemp("export"), mislabeled=1, head={
        "kind": ["logreg"], "C": [1.0], "feature_sets": [["pool", "blocks.3"]], "normalization": ["l2+standardize"]})
    write_features(project)
    assert run_stage(project) == 0
    torch.set_num_threads(threads)
    project["model"] = project["root"] / "models" / "tiny" / "classifier.pt"
    project["onnx"] = project["model"].with_suffix(".onnx")
    return project


def tiny_export(head: dict, *, layers: list[str], tta: list[str]) -> dict:
    """A classifier.pt dict around the seeded tiny backbone (random weights) and `head`."""
    torch.manual_seed(0)
    backbone = Backbone(name="tiny", arch=TINY_ARCH, classifier=None, weights=WeightsSource(filename=""),
                        preprocess=None)  # type: ignore[arg-type]
    model = build_model(backbone)
    classifier = classifier_path(backbone, model)
    replace_module(model, classifier, torch.nn.Identity())
    preprocess = {"input_size": 32, "resize": 36, "interpolation": "bilinear", "mean": list(IMAGENET_MEAN),
                  "std": list(IMAGENET_STD)}
    return ex.build_export(backbone_name="tiny", backbone_state=dict(model.state_dict()), layers=layers,
                           backbone_spec={"arch": TINY_ARCH, "classifier": classifier, "build_kwargs": {},
                                          "preprocess": preprocess, "tta": tta, "precision": "float32"},
                           classes=CLASSES, head_spec=head, provenance={})


def head_for(kind: str, features: torch.Tensor, l2_blocks: list[int] | None = None) -> dict:
    """A three-class head on features [N, D] whose classes differ across the N images: weights scaled by the
    features' spread (the tiny random backbone's features barely vary), seeded."""
    rng = torch.Generator().manual_seed(1)
    x = ex.L2Blocks(l2_blocks)(features) if l2_blocks else features.double()
    mean, scale = x.mean(0), x.std(0).clamp_min(1e-6)
    blocks = {"l2_blocks": l2_blocks} if l2_blocks else {}
    if kind == "linear":
        weight = torch.randn(3, x.shape[1], generator=rng, dtype=torch.float64) * 1.5 / x.shape[1] ** 0.5 / scale
        return {"kind": "logreg", "type": "linear", "output": "softmax", "weight": weight, "bias": -weight @ mean,
                **blocks}
    z = (x - mean) / scale
    owner = torch.tensor([0, 0, 1, 1, 2, 2])  # support vectors: two images per class; pairs (0, 1), (0, 2), (1, 2)
    dual = torch.stack([(owner == i).double() - (owner == j).double() for i, j in ((0, 1), (0, 2), (1, 2))], 1)
    return {"kind": "svm_rbf", "type": "rbf_svm", "output": "platt", "n_classes": 3, "gamma": 1.0 / x.shape[1],
            "mean": mean, "scale": scale, "support_vectors": z[[0, 5, 10, 15, 3, 8]],
            "dual_coef": dual * 3,
            "intercept": torch.randn(3, generator=rng, dtype=torch.float64) * 0.1,
            "platt_a": -torch.rand(3, generator=rng, dtype=torch.float64) * 2 - 1,
            "platt_b": torch.randn(3, generator=rng, dtype=torch.float64) * 0.1, **blocks}


def test_head_stage_writes_an_onnx_model_that_matches_the_export_on_heldout_images(stage: dict) -> None:
    export = ex.load_export(stage["model"])
    assert export["layers"] == ["pool", "blocks.3"] and export["head"]["l2_blocks"] == [POOL_DIM, MID_DIM]
    classifier = ex.classifier_from_export(export)
    test_paths = sorted(str(p.relative_to(stage["raw"])) for p in (stage["raw"] / "test").rglob("*.jpg"))
    images = exo.read_sample_images(stage["raw"], test_paths, classifier.preprocess)
    assert images.shape == (4, 3, 32, 32) and images.dtype == torch.float32
    session = onnxruntime.InferenceSession(str(stage["onnx"]), providers=["CPUExecutionProvider"])
    assert exo.verify_onnx(session, classifier, images) <= 1e-6
    (inputs,), (outputs,) = session.get_inputs(), session.get_outputs()
    assert (inputs.name, inputs.type, inputs.shape[1:]) == ("images", "tensor(float)", [3, 32, 32])
    assert isinstance(inputs.shape[0], str) and outputs.name == "probabilities"  # dynamic batch
    for n in (1, 3):
        probabilities = session.run(None, {"images": images[:n].numpy()})[0]
        assert probabilities.shape == (n, 2) and np.allclose(probabilities.sum(1), 1)


@pytest.mark.parametrize("case", ["linear", "rbf_svm", "linear+l2_blocks"])
def test_onnx_matches_torch_for_every_head_type(case: str, stage: dict, tmp_path: Path) -> None:
    """Three classes; rbf_svm: one-vs-one votes + Platt; l2 blocks over two layers with hflip TTA."""
    kind, layers, tta = {"linear": ("linear", ["pool"], ["none"]), "rbf_svm": ("rbf_svm", ["pool"], ["none"]),
                         "linear+l2_blocks": ("linear", ["pool", "blocks.3"], ["none", "hflip"])}[case]
    placeholder = {"type": "linear", "weight": torch.zeros(3, 1), "bias": torch.zeros(3)}
    embedding = ex.classifier_from_export(tiny_export(placeholder, layers=layers, tta=tta))
    paths = sorted(str(p.relative_to(stage["raw"])) for p in stage["raw"].rglob("*.jpg"))
    images = exo.read_sample_images(stage["raw"], paths, embedding.preprocess)
    with torch.inference_mode():
        features = embedding.embed(images)
    export = tiny_export(head_for(kind, features, [POOL_DIM, MID_DIM] if len(layers) == 2 else None),
                         layers=layers, tta=tta)
    classifier = ex.classifier_from_export(export)
    assert len(images) == exo.ONNX_PARITY_IMAGES
    report = exo.save_onnx(tmp_path / "classifier.onnx", export, images=images)
    assert report["images"] == 16 and report["max_difference"] <= exo.ONNX_PARITY_TOLERANCE
    with torch.inference_mode():
        expected = classifier(images).numpy()
    got = exo.load_onnx(tmp_path / "classifier.pt")(images).numpy()  # the .onnx beside a .pt
    assert got.dtype == np.float64 and (got.argmax(1) == expected.argmax(1)).all()
    np.testing.assert_allclose(got, expected, rtol=0, atol=exo.ONNX_PARITY_TOLERANCE)
    assert len(set(expected.argmax(1).tolist())) > 1 and expected.max() < 0.9999  # not a degenerate check


def test_metadata_carries_what_running_the_model_needs(stage: dict) -> None:
    export = ex.load_export(stage["model"])
    metadata = {p.key: p.value for p in onnx.load(str(stage["onnx"])).metadata_props}
    assert metadata == {"format_version": "3", "backbone": "tiny", "classes": json.dumps(["ants", "bees"]),
                        "preprocess": json.dumps(export["backbone"]["preprocess"]),
                        "layers": json.dumps(["pool", "blocks.3"]), "tta": json.dumps(["none"]),
                        "precision": "float32", "head": "linear/softmax",
                        "temperature": repr(export["head"]["temperature"])}
    assert export["head"]["temperature"] != 1.0  # the head stage calibrated it
    model = exo.load_onnx(stage["onnx"])
    torch_model = ex.classifier_from_export(export)
    assert (model.name, model.classes, model.preprocess) == ("tiny", torch_model.classes, torch_model.preprocess)


def test_predict_with_onnxruntime_prints_what_torch_prints(stage: dict, capsys: pytest.CaptureFixture) -> None:
    folder = str(stage["raw"] / "val")
    outputs = {}
    for engine in ("torch", "onnxruntime"):
        assert predict.main([folder, "--model", str(stage["model"]), "--engine", engine, "--json"]) == 0
        outputs[engine] = json.loads(capsys.readouterr().out)
    torch_out, onnx_out = outputs["torch"], outputs["onnxruntime"]
    assert onnx_out["model"] == str(stage["onnx"]) and torch_out["model"] == str(stage["model"])
    assert (torch_out["engine"], onnx_out["engine"]) == ("torch", "onnxruntime")
    assert {k: v for k, v in onnx_out.items() if k not in ("model", "engine", "predictions")} == {
        k: v for k, v in torch_out.items() if k not in ("model", "engine", "predictions")}
    assert len(torch_out["predictions"]) == 8
    for a, b in zip(torch_out["predictions"], onnx_out["predictions"]):
        assert (a["path"], a["class"], [t["class"] for t in a["topk"]]) == (
            b["path"], b["class"], [t["class"] for t in b["topk"]])
        assert a["probability"] == pytest.approx(b["probability"], abs=1e-6)
    assert predict.main([folder, "--model", str(stage["onnx"]), "--engine", "onnxruntime", "--topk", "1"]) == 0
    text = capsys.readouterr().out.splitlines()
    assert text == [f"{p['path']}: {p['class']} {p['probability']:.4f}" for p in torch_out["predictions"]]


def test_a_missing_onnx_names_the_file_and_the_stage_to_run(stage: dict, tmp_path: Path,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    model = tmp_path / "models" / "tiny" / "classifier.pt"
    model.parent.mkdir(parents=True)
    shutil.copy(stage["model"], model)
    image = str(next((stage["raw"] / "val").rglob("*.jpg")))
    with caplog.at_level(logging.ERROR):
        assert predict.main([image, "--model", str(model), "--engine", "onnxruntime"]) == 1
    assert f"{model.with_suffix('.onnx')} does not exist; run `dvc repro head@tiny`" in caplog.text
    with pytest.raises(ex.ExportError, match=r"finetune/tiny/classifier.onnx does not exist; run `dvc repro "
                                             r"finetune@tiny`"):
        exo.load_onnx(tmp_path / "models" / "finetune" / "tiny" / "classifier.pt")
    caplog.clear()
    with caplog.at_level(logging.ERROR):  # the torch engine given a .onnx
        assert predict.main([image, "--model", str(stage["onnx"]), "--engine", "torch"]) == 1
    assert f"{stage['onnx']} is an ONNX model: run it with --engine onnxruntime" in caplog.text


def test_a_disagreeing_onnx_model_is_refused_and_not_written(stage: dict, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    export = ex.load_export(stage["model"])
    classifier = ex.classifier_from_export(export)
    images = exo.read_sample_images(stage["raw"], ["val/ants/ants00.jpg", "val/bees/bees00.jpg"],
                                   classifier.preprocess)
    session = onnxruntime.InferenceSession(str(stage["onnx"]), providers=["CPUExecutionProvider"])
    other = ex.classifier_from_export({**export, "head": {**export["head"], "bias": -export["head"]["bias"] * 50}})
    with pytest.raises(ex.ExportError, match=r"classifier.onnx disagrees with the torch classifier on 2 held-out "
                                             r"images: \d different classes, largest probability difference"):
        exo.verify_onnx(session, other, images)

    def wrong(*args, **kwargs):  # as if the exporter had produced a different graph
        raise ex.ExportError("classifier.onnx disagrees with the torch classifier")

    monkeypatch.setattr(exo, "verify_onnx", wrong)
    target = tmp_path / "classifier.onnx"
    with pytest.raises(ex.ExportError, match="disagrees"):
        exo.save_onnx(target, export, images=images)
    # neither the model nor a temporary file: only the backbone graph cache (complete files, kept for the next run)
    assert [p.name for p in tmp_path.iterdir()] == [".graphs"]
    assert {p.suffix for p in (tmp_path / ".graphs").iterdir()} == {".onnx", ".json"}


def test_the_temperature_travels_in_both_files_and_predict_applies_it_in_every_engine(
        stage: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A softmax head with temperature T: classifier.pt (torch), classifier.onnx (ONNX Runtime) and predict with
    either engine give softmax(logits / T); a format 2 export, which has no temperature, computes T = 1."""
    placeholder = {"type": "linear", "weight": torch.zeros(3, 1), "bias": torch.zeros(3)}
    embedding = ex.classifier_from_export(tiny_export(placeholder, layers=["pool"], tta=["none"]))
    folder = stage["raw"] / "val"
    paths = sorted(str(p.relative_to(stage["raw"])) for p in folder.rglob("*.jpg"))
    images = exo.read_sample_images(stage["raw"], paths, embedding.preprocess)
    with torch.inference_mode():
        features = embedding.embed(images)
    head = head_for("linear", features)
    logits = torch.nn.functional.linear(features.double(), head["weight"], head["bias"])
    temperature = 2.5
    expected = torch.softmax(logits / temperature, dim=1).numpy()
    export = tiny_export({**head, "temperature": temperature}, layers=["pool"], tta=["none"])
    with torch.inference_mode():
        np.testing.assert_allclose(ex.classifier_from_export(export)(images).numpy(), expected, rtol=0, atol=1e-12)
        older = ex.classifier_from_export({**export, "format_version": 2, "head": head})  # no "temperature"
        np.testing.assert_allclose(older(images).numpy(), torch.softmax(logits, dim=1).numpy(), rtol=0, atol=1e-12)
    assert np.abs(expected - torch.softmax(logits, dim=1).numpy()).max() > 0.01  # T makes a visible difference
    model = tmp_path / "models" / "tiny" / "classifier.pt"
    model.parent.mkdir(parents=True)
    ex.save_export(model, export)
    exo.save_onnx(model.with_suffix(".onnx"), export, images=images)
    np.testing.assert_allclose(exo.load_onnx(model)(images).numpy(), expected, rtol=0, atol=1e-6)
    for engine in ("torch", "onnxruntime"):
        assert predict.main([str(folder), "--model", str(model), "--engine", engine, "--json", "--topk", "3"]) == 0
        predictions = json.loads(capsys.readouterr().out)["predictions"]
        got = np.array([[next(t["probability"] for t in p["topk"] if t["class"] == name) for name in CLASSES]
                        for p in predictions])
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6, err_msg=engine)


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan")])
def test_a_temperature_that_is_not_positive_is_refused(temperature: float) -> None:
    head = {"type": "linear", "weight": torch.zeros(3, 4), "bias": torch.zeros(3), "temperature": temperature}
    with pytest.raises(ex.ExportError, match="head temperature must be a positive finite number"):
        ex.build_head(head)
