"""Fine-tune stage on a tiny timm CNN (test_efficientnet, random weights saved to a file) and 32x32 images of two
separable classes: regimes freeze what they should, frozen BatchNorm statistics, LR groups, resume ==
uninterrupted, best checkpoint, early stopping, the protocol (step 0 equals the probe; the epoch is chosen on
selection rows, never on the held-out split), and the CLI's metrics/predictions/export/dvclive outputs."""
from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import yaml
from PIL import Image

from stages.backbones import Backbone, get_backbone
from stages.evaluation import read_predictions
from stages.finetune import (CurveLogger, EpochRecord, FinetuneError, FinetuneNet, apply_regime, build_finetune_net,
                             build_optimizer, init_head_from_probe, load_checkpoint, main, make_loader, param_groups,
                             plan_splits, predict_proba, read_probe, resolve_precision, run_finetune, seed_everything,
                             warmup_cosine)
from stages.images import MANIFEST_FIELDS, ImageDataset, ManifestRow, eval_transform, read_manifest, train_transform
from stages.io import sha256_file
from stages.params import CustomBackbone, FinetuneParams
from stages.export import load_classifier
from stages.export_onnx import load_onnx
from stages.predict import predict_images

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["ants", "bees"]
COLORS = {0: (200, 40, 40), 1: (40, 40, 200)}  # class 0 reddish, class 1 bluish: separable by colour
SPLITS = {"train": 8, "val": 4}  # images per class


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here runs on one torch thread (fixture in conftest.py)."""


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """data/raw/<split>/<class>/*.png, data/prepared/{manifest.csv,classes.json}, models/pretrained/tiny.pth."""
    root = tmp_path_factory.mktemp("finetune")
    rng = np.random.default_rng(0)
    rows = []
    for split, per_class in SPLITS.items():
        for label, name in enumerate(CLASSES):
            for i in range(per_class):
                noise = rng.integers(-40, 40, size=(32, 32, 3))
                pixels = np.clip(np.array(COLORS[label]) + noise, 0, 255).astype(np.uint8)
                rel = f"{split}/{name}/{i:02d}.png"
                (root / "data/raw" / rel).parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels).save(root / "data/raw" / rel)
                rows.append({"path": rel, "class": name, "label": label, "split": split,
                             "sha256": sha256_file(root / "data/raw" / rel), "width": 32, "height": 32})
    prepared = root / "data/prepared"
    prepared.mkdir(parents=True)
    with open(prepared / "manifest.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=MANIFEST_FIELDS)
        writer.writeheader()
        writer.writerows(sorted(rows, key=lambda r: r["path"]))
    (prepared / "classes.json").write_text(json.dumps(CLASSES))
    torch.manual_seed(0)
    weights = root / "models/pretrained/tiny.pth"
    weights.parent.mkdir(parents=True)
    torch.save(timm.create_model("test_efficientnet", pretrained=False).state_dict(), weights)
    return root


def tiny_custom(project: Path) -> dict[str, CustomBackbone]:
    weights = project / "models/pretrained/tiny.pth"
    return {"tiny": CustomBackbone(arch="timm:test_efficientnet", source=str(weights),
                                   sha256=sha256_file(weights), input_size=32, resize=32)}


@pytest.fixture(scope="module")
def backbone(project: Path) -> Backbone:
    return get_backbone("tiny", tiny_custom(project))


def make_net(backbone: Backbone, project: Path, regime: str = "partial", unfreeze_from: str = "blocks.3",
             seed: int = 0, batchnorm: str = "frozen") -> FinetuneNet:
    seed_everything(seed)
    net = build_finetune_net(backbone, project / "models/pretrained/tiny.pth", len(CLASSES))
    apply_regime(net, regime, unfreeze_from, batchnorm=batchnorm)
    return net


def loaders(project: Path, backbone: Backbone, generator: torch.Generator, batch_size: int = 8, workers: int = 0):
    rows = list(csv.DictReader(open(project / "data/prepared/manifest.csv", encoding="utf-8")))

    def dataset(split: str, transform) -> ImageDataset:
        picked = [r for r in rows if r["split"] == split]
        return ImageDataset(project / "data/raw", [r["path"] for r in picked], [int(r["label"]) for r in picked],
                            transform)

    train = make_loader(dataset("train", train_transform(backbone.preprocess)), batch_size=batch_size,
                        shuffle=True, num_workers=workers, generator=generator)
    val = make_loader(dataset("val", eval_transform(backbone.preprocess)), batch_size=batch_size, shuffle=False,
                      num_workers=0, generator=torch.Generator().manual_seed(0))
    return train, val


def train(net: FinetuneNet, project: Path, backbone: Backbone, checkpoints: Path, *, log=None, workers: int = 0,
          fingerprint: str = "test", **overrides) -> tuple:
    settings = {"epochs": 3, "batch_size": 8, "lr_backbone": 0.01, "lr_head": 0.05, "warmup_epochs": 0.5,
                "precision": "float32", "patience": 10, **overrides}
    params = FinetuneParams(**settings)
    generator = torch.Generator().manual_seed(params.seed)
    seed_everything(params.seed)
    train_loader, val_loader = loaders(project, backbone, generator, params.batch_size, workers)
    records: list[EpochRecord] = []

    def log_epoch(record: EpochRecord) -> None:
        records.append(record)
        if log:
            log(record)

    result = run_finetune(net, train_loader, val_loader, params=params, checkpoint_dir=checkpoints,
                          fingerprint=fingerprint, loader_generator=generator, device=torch.device("cpu"),
                          precision="float32", log_epoch=log_epoch)
    return result, records, val_loader


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor], prefix: str) -> dict[str, bool]:
    return {k: not torch.equal(before[k], after[k]) for k in before if k.startswith(prefix)}


# --- regimes -------------------------------------------------------------------------------------------

def test_partial_keeps_earlier_modules_bit_identical_and_their_batchnorm_stats(project, backbone, tmp_path):
    net = make_net(backbone, project, "partial", "blocks.3", batchnorm="train")
    assert set(net.frozen) == {"conv_stem", "bn1", "blocks.0", "blocks.1", "blocks.2"}
    before = snapshot(net)
    train(net, project, backbone, tmp_path, epochs=2)
    after = load_checkpoint(tmp_path / "last.pt")["model"]  # after epoch 2 (`net` holds the best epoch)
    for prefix in ("body.conv_stem.", "body.bn1.", "body.blocks.0.", "body.blocks.1.", "body.blocks.2."):
        flags = changed(before, after, prefix)
        assert flags and not any(flags.values()), prefix  # weights, running_mean/var, num_batches_tracked
    for prefix in ("body.blocks.3.", "body.blocks.4.", "body.conv_head.", "head."):
        assert any(changed(before, after, prefix).values()), prefix
    # trained BatchNorm layers did update their statistics
    assert changed(before, after, "body.bn2.running_mean")["body.bn2.running_mean"]
    assert int(after["body.bn2.num_batches_tracked"]) == 2 * 2  # 2 epochs x 2 batches of 8
    net.train()
    assert not net.body.bn1.training and not net.body.blocks[2].training
    assert net.body.blocks[3].training and net.body.bn2.training and net.body.training


def test_full_changes_every_module_and_head_regime_none_of_the_body(project, backbone, tmp_path):
    net = make_net(backbone, project, "full", batchnorm="train")
    assert net.frozen == ()
    before = snapshot(net)
    train(net, project, backbone, tmp_path / "full", epochs=1)
    after = snapshot(net)
    for prefix in ("body.conv_stem.weight", "body.bn1.running_mean", "body.blocks.0.", "head.weight"):
        assert any(changed(before, after, prefix).values()), prefix

    net = make_net(backbone, project, "head")
    assert net.frozen == ("",)
    before = snapshot(net)
    train(net, project, backbone, tmp_path / "head", epochs=1)
    after = snapshot(net)
    assert not any(changed(before, after, "body.").values())
    assert all(changed(before, after, "head.").values())


def test_frozen_batchnorm_keeps_every_running_statistic_and_still_trains_the_affine_weights(project, backbone,
                                                                                           tmp_path):
    net = make_net(backbone, project, "full")  # batchnorm: frozen (the default)
    before = snapshot(net)
    train(net, project, backbone, tmp_path, epochs=1)
    after = load_checkpoint(tmp_path / "last.pt")["model"]
    stats = [k for k in before if k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert stats and not any(changed(before, after, "").get(k) for k in stats)
    assert changed(before, after, "body.bn2.weight")["body.bn2.weight"]  # the affine part trains
    net.train()
    assert net.training and not any(m.training for m in net.body.modules()
                                    if isinstance(m, torch.nn.modules.batchnorm._BatchNorm))


def test_unknown_unfreeze_from_names_the_parameter(project, backbone):
    net = build_finetune_net(backbone, project / "models/pretrained/tiny.pth", 2)
    with pytest.raises(FinetuneError, match=r"finetune.unfreeze_from must name a module .* e.g. blocks.5, "
                                            r"layer4; got 'layer9'"):
        apply_regime(net, "partial", "layer9", suggestions=("blocks.5", "layer4"))


# --- optimizer and schedule ----------------------------------------------------------------------------

def test_param_groups_have_the_configured_lrs_and_no_decay_on_norms_and_biases(project, backbone):
    net = make_net(backbone, project, "partial", "blocks.4")
    groups = param_groups(net, lr_backbone=1e-4, lr_head=1e-2, weight_decay=0.05)
    by_name = {g["name"]: g for g in groups}
    assert [(n, g["lr"], g["weight_decay"]) for n, g in by_name.items()] == [
        ("backbone", 1e-4, 0.05), ("backbone_no_decay", 1e-4, 0.0), ("head", 1e-2, 0.05),
        ("head_no_decay", 1e-2, 0.0)]
    names = {id(p): n for n, p in net.named_parameters()}
    no_decay = {names[id(p)] for p in by_name["backbone_no_decay"]["params"] + by_name["head_no_decay"]["params"]}
    assert "head.bias" in no_decay and "body.bn2.weight" in no_decay and "body.bn2.bias" in no_decay
    assert all(p.ndim > 1 for p in by_name["backbone"]["params"] + by_name["head"]["params"])
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    grouped = {names[id(p)] for g in groups for p in g["params"]}
    assert grouped == trainable and not any(n.startswith("body.blocks.3.") for n in grouped)

    sgd = build_optimizer(groups, FinetuneParams(optimizer="sgd", momentum=0.8))
    assert isinstance(sgd, torch.optim.SGD) and {g["momentum"] for g in sgd.param_groups} == {0.8}
    adamw = build_optimizer(groups, FinetuneParams(optimizer="adamw"))
    assert isinstance(adamw, torch.optim.AdamW)
    assert [g["lr"] for g in adamw.param_groups] == [1e-4, 1e-4, 1e-2, 1e-2]


def test_warmup_then_cosine_per_step() -> None:
    factor = warmup_cosine(warmup_steps=4, total_steps=12)
    assert [factor(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert factor(8) == pytest.approx(0.5) and factor(12) == pytest.approx(0.0)
    assert warmup_cosine(warmup_steps=0, total_steps=10)(0) == 1.0


def test_precision_auto_on_cpu_follows_the_capability_alone(monkeypatch) -> None:
    cpu = torch.device("cpu")
    monkeypatch.setattr("stages.finetune.read_cpu_capability", lambda: {"native_bfloat16": True})
    chosen, info = resolve_precision("auto", cpu)
    assert chosen == "bfloat16" and info == {"requested": "auto", "rule": "capability", "cpu_native_bf16": True}
    monkeypatch.setattr("stages.finetune.read_cpu_capability", lambda: {"native_bfloat16": False})
    assert resolve_precision("auto", cpu)[0] == "float32"
    assert resolve_precision("bfloat16", cpu)[0] == "bfloat16"  # asked for: honoured (with a warning)
    with pytest.raises(FinetuneError, match="finetune.precision float16 needs a CUDA device"):
        resolve_precision("float16", cpu)


# --- checkpoints, resume, early stopping ---------------------------------------------------------------

@pytest.mark.parametrize("workers", [0, 1])  # augmentation in the main process / seeded worker processes
def test_resume_after_interruption_equals_uninterrupted_run(project, backbone, tmp_path, workers):
    whole = make_net(backbone, project)
    result, records, _ = train(whole, project, backbone, tmp_path / "whole", workers=workers)

    class Interrupted(Exception):
        pass

    def crash_after_epoch_1(record: EpochRecord) -> None:
        if record.epoch == 1:
            raise Interrupted

    with pytest.raises(Interrupted):
        train(make_net(backbone, project), project, backbone, tmp_path / "resumed", log=crash_after_epoch_1,
              workers=workers)
    assert load_checkpoint(tmp_path / "resumed/last.pt")["epoch"] == 1
    resumed = make_net(backbone, project, seed=123)  # a different start: everything must come from last.pt
    result2, records2, _ = train(resumed, project, backbone, tmp_path / "resumed", workers=workers)

    assert result2.resumed_from == 1 and len(records2) == 3  # epoch 1 replayed to the logger, then 2 and 3
    strip = lambda rs: [dataclasses.replace(r, seconds=0.0) for r in rs]  # noqa: E731
    assert strip(records2) == strip(records)
    for key, value in whole.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
    last, last2 = load_checkpoint(tmp_path / "whole/last.pt"), load_checkpoint(tmp_path / "resumed/last.pt")
    for key, value in last["model"].items():
        assert torch.equal(value, last2["model"][key]), key
    assert last["optimizer"]["state"][0]["step"] == last2["optimizer"]["state"][0]["step"] == 3 * 2
    assert result.best_epoch == result2.best_epoch


CURVES = {"train/loss": "train_loss", "train/accuracy": "train_accuracy", "selection/loss": "selection_loss",
          "selection/accuracy": "selection_accuracy", "lr/backbone": "lr_backbone", "lr/head": "lr_head"}


def read_curves(live: Path) -> dict[str, list[tuple[int, float]]]:
    """{name: [(step, value), ...]} from the TSVs the finetune stage's `plots:` entry points at (live/plots/metrics)."""
    curves = {}
    for path in sorted((live / "plots/metrics").rglob("*.tsv")):
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.reader(fh, delimiter="\t"))
        assert rows[0] == ["step", path.stem], path  # dvc plots: x = step, y = the metric's own column
        curves[path.relative_to(live / "plots/metrics").with_suffix("").as_posix()] = [
            (int(step), float(value)) for step, value in rows[1:]]
    return curves


def assert_curves_match(live: Path, records: list[EpochRecord]) -> None:
    """One row per epoch record, step = epoch, the record's values; nothing else in live/ but Live's summary."""
    curves = read_curves(live)
    assert set(curves) == set(CURVES)
    for name, field in CURVES.items():
        assert curves[name] == [(r.epoch, getattr(r, field)) for r in records], name
    assert {p.relative_to(live).as_posix() for p in live.rglob("*") if p.is_file()} == {
        "metrics.json", *(f"plots/metrics/{name}.tsv" for name in CURVES)}  # no dvc.yaml, params.yaml, report
    summary = json.loads((live / "metrics.json").read_text())
    assert summary["step"] == records[-1].epoch
    assert summary["selection"]["accuracy"] == records[-1].selection_accuracy


def test_curves_continue_after_an_interrupted_run_without_duplicate_steps(project, backbone, tmp_path):
    live = tmp_path / "live"

    class Interrupted(Exception):
        pass

    def log_then_crash_after_epoch_2(record: EpochRecord) -> None:
        curves(record)
        if record.epoch == 2:  # last.pt and the curves hold epochs 1 and 2
            raise Interrupted

    with pytest.raises(Interrupted), CurveLogger(live) as curves:
        train(make_net(backbone, project), project, backbone, tmp_path / "checkpoints",
              log=log_then_crash_after_epoch_2)
    assert {name: [step for step, _ in rows] for name, rows in read_curves(live).items()} == {
        name: [1, 2] for name in CURVES}

    with CurveLogger(live) as curves:
        result, records, _ = train(make_net(backbone, project), project, backbone, tmp_path / "checkpoints",
                                   log=curves)
    assert result.resumed_from == 2 and [r.epoch for r in records] == [1, 2, 3]  # 1, 2 replayed, then 3
    assert_curves_match(live, records)


def test_a_checkpoint_of_other_settings_or_resume_false_starts_afresh(project, backbone, tmp_path):
    train(make_net(backbone, project), project, backbone, tmp_path, epochs=1)
    again, records, _ = train(make_net(backbone, project), project, backbone, tmp_path, epochs=1)
    assert again.resumed_from == 1 and len(records) == 1  # same fingerprint: nothing left to train
    other, _, _ = train(make_net(backbone, project), project, backbone, tmp_path, epochs=1, fingerprint="other")
    assert other.resumed_from == 0
    fresh, _, _ = train(make_net(backbone, project), project, backbone, tmp_path, epochs=1, fingerprint="other",
                        resume=False)
    assert fresh.resumed_from == 0


def test_best_checkpoint_is_the_epoch_with_the_best_logged_selection_metric(project, backbone, tmp_path):
    net = make_net(backbone, project, "full")
    result, records, val_loader = train(net, project, backbone, tmp_path, epochs=4, lr_backbone=0.003,
                                        lr_head=0.01)
    best = max(records, key=lambda r: (r.selection_accuracy, -r.selection_loss))
    assert result.best_epoch == best.epoch
    saved = load_checkpoint(tmp_path / "best.pt")
    assert saved["epoch"] == best.epoch and saved["selection"]["accuracy"] == best.selection_accuracy
    for key, value in saved["model"].items():  # the net returned holds the best weights
        assert torch.equal(value, net.state_dict()[key]), key
    probs, labels = predict_proba(net, val_loader, device=torch.device("cpu"))
    assert float((probs.argmax(1) == labels).mean()) == best.selection_accuracy
    assert best.selection_accuracy >= 0.75  # two colour classes: far above chance after a few epochs


def test_early_stopping_stops_after_patience_epochs_without_improvement(project, backbone, tmp_path):
    net = make_net(backbone, project, "head")
    # learning rates far below float32 resolution: the model never changes, so val never improves
    result, records, _ = train(net, project, backbone, tmp_path, epochs=6, patience=2, lr_backbone=0.0,
                               lr_head=1e-30, weight_decay=0.0)
    assert [r.epoch for r in records] == [1, 2, 3] and result.stopped_early and result.best_epoch == 1
    assert load_checkpoint(tmp_path / "last.pt")["stopped"] is True


def val_images(project: Path, backbone: Backbone, rows: list[ManifestRow] | None = None) -> tuple[torch.Tensor,
                                                                                                  np.ndarray]:
    """The val images [N, 3, 32, 32] as evaluation preprocesses them, and their labels [N]."""
    rows = rows or [r for r in read_manifest(project / "data/prepared/manifest.csv") if r.split == "val"]
    transform = eval_transform(backbone.preprocess)
    dataset = ImageDataset(project / "data/raw", [r.path for r in rows], [r.label for r in rows], transform)
    return torch.stack([dataset[i][0] for i in range(len(dataset))]), np.array([r.label for r in rows])


@pytest.mark.parametrize("l2_normalize", [False, True])
def test_at_step_zero_the_net_predicts_the_probe_in_eval_and_in_train_mode(project, backbone, l2_normalize):
    """The lost-probe start: the net the first optimizer step sees (train mode) must compute the probe. A probe
    exported with its StandardScaler folded in has large weights where a feature varies little, so BatchNorm
    re-estimating statistics on the batch moved its logits by tens of nats; frozen statistics keep them exact."""
    net = make_net(backbone, project, "partial", "blocks.3")  # batchnorm: frozen
    images, labels = val_images(project, backbone)
    with torch.no_grad():
        features = net.body.eval()(images).double()
    mean, scale = features.mean(0), features.std(0).clamp_min(1e-3)
    weight = torch.randn(2, features.shape[1], dtype=torch.float64) * 0.1 / scale  # standardization folded in
    bias = -(weight @ mean)
    init_head_from_probe(net, weight, bias)
    net.l2_normalize = l2_normalize
    if l2_normalize:
        features = features * features.shape[1] ** 0.5 / features.norm(dim=1, keepdim=True)
    expected = torch.softmax(features @ weight.T + bias, 1)

    loader = make_loader(ImageDataset(project / "data/raw", *zip(*[(r.path, r.label) for r in read_manifest(
        project / "data/prepared/manifest.csv") if r.split == "val"]), eval_transform(backbone.preprocess)),
        batch_size=3, shuffle=False, num_workers=0, generator=torch.Generator().manual_seed(0))
    probs, got_labels = predict_proba(net, loader, device=torch.device("cpu"))
    np.testing.assert_array_equal(got_labels, labels)
    np.testing.assert_allclose(probs, expected.numpy(), atol=1e-5)
    net.train()
    with torch.no_grad():
        train_mode = torch.softmax(net(images).double(), 1)
    np.testing.assert_allclose(train_mode.numpy(), expected.numpy(), atol=1e-5)

    net.freeze_norm_stats = False  # what fine-tuning did before: batch statistics in train mode
    net.train()
    with torch.no_grad():
        drifted = torch.softmax(net(images).double(), 1)
    assert float((drifted - expected).abs().max()) > 1e-3


def test_probe_init_copies_weights_and_expands_a_binary_probe(project, backbone):
    net = build_finetune_net(backbone, project / "models/pretrained/tiny.pth", 2)
    weight, bias = torch.randn(1, net.head.in_features), torch.tensor([0.3])
    init_head_from_probe(net, weight, bias)
    features = torch.randn(5, net.head.in_features)
    expected = torch.sigmoid(features @ weight.T + bias).squeeze(1)
    assert torch.allclose(torch.softmax(net.head(features), 1)[:, 1], expected, atol=1e-6)
    with pytest.raises(FinetuneError, match=r"probe's linear layer is \(3, 7\)"):
        init_head_from_probe(net, torch.zeros(3, 7), torch.zeros(3))


# --- the stage end to end ------------------------------------------------------------------------------

def write_params(project: Path, **finetune) -> Path:
    weights = project / "models/pretrained/tiny.pth"
    params = {
        "backbones": ["tiny"],
        "weights": {"custom": {"tiny": {"arch": "timm:test_efficientnet", "source": str(weights),
                                        "sha256": sha256_file(weights), "input_size": 32, "resize": 32}}},
        "finetune": {"backbones": ["tiny"], "regime": "partial", "unfreeze_from": "blocks.3", "epochs": 3,
                     "batch_size": 8, "lr_backbone": 0.01, "lr_head": 0.05, "precision": "float32",
                     "num_workers": 0, **finetune},
    }
    path = project / f"params-{len(list(project.glob('params-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def run_main(project: Path, out: Path, params: Path, probe: Path | None = None, backbone: str = "tiny",
             manifest: Path | None = None) -> int:
    manifest = manifest or project / "data/prepared/manifest.csv"
    argv = ["--backbone", backbone, "--raw", str(project / "data/raw"), "--manifest", str(manifest),
            "--weights", str(project / "models/pretrained/tiny.pth"), "--out", str(out / "models"),
            "--reports", str(out / "reports"), "--params", str(params)]
    return main(argv + (["--probe", str(probe)] if probe else []))


def test_main_writes_head_style_metrics_an_export_predict_reads_and_dvclive_curves(project, tmp_path, monkeypatch):
    monkeypatch.setenv("CI", "1")
    assert run_main(project, tmp_path, write_params(project, init_head="random")) == 0
    metrics = json.loads((tmp_path / "reports/metrics.json").read_text())
    assert metrics["heldout_split"] == "val" and metrics["val"] == metrics["heldout"]  # no test images: val
    assert {"accuracy", "accuracy_ci_low", "accuracy_ci_high", "correct", "mean_class_accuracy", "macro_f1",
            "log_loss", "ece", "per_class"} <= set(metrics["heldout"])
    assert set(metrics["heldout"]["per_class"]) == set(CLASSES) and metrics["heldout"]["n"] == 8
    assert "test" not in metrics
    assert (metrics["backbone"], metrics["regime"], metrics["epochs_run"], metrics["feature_dim"]) == (
        "tiny", "partial", 3, 256)
    # the epoch is chosen on a stratified slice of train (15% of 8 per class: 1 each), which then does not train
    assert (metrics["selection"]["method"], metrics["selection"]["n"], metrics["n_fit"]) == ("train_slice", 2, 14)
    assert (metrics["n_train"], metrics["n_val"], metrics["n_test"], metrics["n_heldout"]) == (16, 8, 0, 8)
    selection_accuracy = [float(line.split("\t")[1]) for line in
                          (tmp_path / "reports/live/plots/metrics/selection/accuracy.tsv").read_text().splitlines()[1:]]
    assert len(selection_accuracy) == 3 and metrics["selection"]["accuracy"] == max(selection_accuracy)
    assert metrics["selection"]["epoch"] == metrics["best_epoch"]
    assert metrics["heldout"]["accuracy"] >= 0.75
    assert not (tmp_path / "reports/live/plots/metrics/val").exists()  # the held-out split has no curve
    history = [EpochRecord(**r) for r in load_checkpoint(tmp_path / "models/checkpoints/last.pt")["history"]]
    assert_curves_match(tmp_path / "reports/live", history)
    assert {p.name for p in (tmp_path / "models/checkpoints").iterdir()} == {"best.pt", "last.pt"}
    assert metrics["precision"] == "float32" and metrics["precision_choice"]["rule"] == "capability"

    predictions = read_predictions(tmp_path / "reports/predictions.json")
    assert predictions.split == "val" and set(predictions.rows) == {"finetune", "start"}
    assert int(predictions.correct("finetune").sum()) == metrics["heldout"]["correct"]

    export = torch.load(tmp_path / "models/classifier.pt", weights_only=True)
    assert export["classes"] == CLASSES and export["backbone"]["name"] == "tiny"
    assert export.get("layers", [export.get("layer")]) == ["pool"]
    assert export["head"]["weight"].shape == (2, 256) and "classifier.weight" not in export["backbone_state"]
    model = load_classifier(tmp_path / "models/classifier.pt")  # what `python -m stages.predict` runs
    val = sorted((project / "data/raw/val").rglob("*.png"))
    results = predict_images(model, val, topk=2)
    labels = np.array([CLASSES.index(path.parent.name) for path in val])
    probs = np.array([[next(t["probability"] for t in r["topk"] if t["class"] == c) for c in CLASSES]
                      for r in results])
    assert float((probs.argmax(1) == labels).mean()) == metrics["heldout"]["accuracy"]
    assert -np.log(probs[np.arange(len(labels)), labels]).mean() == pytest.approx(metrics["heldout"]["log_loss"],
                                                                                  abs=1e-5)
    onnx_results = predict_images(load_onnx(tmp_path / "models/classifier.pt"), val, topk=2)  # classifier.onnx
    assert [r["class"] for r in onnx_results] == [r["class"] for r in results]


def probe_export(project: Path, head: dict) -> dict:
    preprocess = get_backbone("tiny", tiny_custom(project)).preprocess.as_dict()
    return {"format_version": 1, "backbone": {"name": "tiny", "preprocess": preprocess}, "classes": CLASSES,
            "layer": "pool", "head": head}


def test_main_starts_from_the_probe_and_rejects_a_mismatched_one(project, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("CI", "1")
    weight = 0.05 * torch.randn(2, 256, dtype=torch.float64)
    bias = torch.tensor([0.1, -0.1], dtype=torch.float64)
    probe = probe_export(project, {"kind": "logreg", "type": "linear", "output": "softmax", "weight": weight,
                                   "bias": bias})
    torch.save(probe, tmp_path / "probe.pt")
    # head regime, learning rates that cannot move float32 weights: the exported head is the probe
    params = write_params(project, init_head="probe", regime="head", lr_head=1e-30, weight_decay=0.0, epochs=1)
    assert run_main(project, tmp_path / "run", params, tmp_path / "probe.pt") == 0
    export = torch.load(tmp_path / "run/models/classifier.pt", weights_only=True)
    assert torch.equal(export["head"]["weight"], weight.float().double())

    # the "probe" row of predictions.json (the net at step 0) is the probe applied to the backbone's features
    backbone = get_backbone("tiny", tiny_custom(project))
    rows = [r for r in read_manifest(project / "data/prepared/manifest.csv") if r.split == "val"]
    images, labels = val_images(project, backbone, rows)
    with torch.no_grad():
        features = build_finetune_net(backbone, project / "models/pretrained/tiny.pth", 2).body.eval()(images)
    expected = torch.softmax(features.double() @ weight.T + bias, 1).numpy()
    predictions = read_predictions(tmp_path / "run/reports/predictions.json")
    assert predictions.paths == [r.path for r in rows] and set(predictions.rows) == {"finetune", "probe"}
    np.testing.assert_array_equal(predictions.rows["probe"]["predicted"], expected.argmax(1))
    np.testing.assert_allclose(predictions.rows["probe"]["confidence"], expected.max(1), atol=2e-6)
    metrics = json.loads((tmp_path / "run/reports/metrics.json").read_text())
    assert metrics["probe_heldout"]["accuracy"] == float((expected.argmax(1) == labels).mean())

    for name, change, message in (
            ("classes", {"classes": ["cats", "dogs"]}, "classes is ['cats', 'dogs'] but the fine-tune needs"),
            ("layer", {"layer": "blocks.3"}, "layers is ['blocks.3'] but the fine-tune needs ['pool']"),
            ("layers", {"layers": ["pool", "mid"]}, "layers is ['pool', 'mid'] but the fine-tune needs ['pool']"),
            ("rbf", {"head": {"kind": "svm_rbf", "type": "rbf_svm"}}, "a 'svm_rbf' head has no linear weight"),
            ("missing", None, "missing.pt not found")):
        if change is not None:
            torch.save({**probe, **change}, tmp_path / f"{name}.pt")
        caplog.clear()
        assert run_main(project, tmp_path / name, params, tmp_path / f"{name}.pt") == 1, name
        assert message in caplog.text, name


def test_probe_logits_from_a_platt_scaled_binary_svm(project):
    svm = {"kind": "linear_svm", "type": "linear", "output": "platt",
           "weight": torch.randn(1, 256, dtype=torch.float64),
           "bias": torch.tensor([0.2], dtype=torch.float64), "platt_a": torch.tensor([-1.5], dtype=torch.float64),
           "platt_b": torch.tensor([0.3], dtype=torch.float64)}
    probe = read_probe_from(project, svm)
    net = build_finetune_net(get_backbone("tiny", tiny_custom(project)), project / "models/pretrained/tiny.pth", 2)
    init_head_from_probe(net, probe.weight, probe.bias)
    x = torch.randn(4, 256, dtype=torch.float64)
    platt = torch.sigmoid(-(svm["platt_a"] * (x @ svm["weight"].T + svm["bias"]) + svm["platt_b"])).squeeze(1)
    assert torch.allclose(torch.softmax(net.head(x.float()), 1)[:, 1].double(), platt, atol=1e-5)


def read_probe_from(project: Path, head: dict):
    path = project / "probe-platt.pt"
    torch.save(probe_export(project, head), path)
    return read_probe(path, backbone="tiny", classes=CLASSES,
                      preprocess=get_backbone("tiny", tiny_custom(project)).preprocess)


def test_main_names_an_unknown_backbone(project, tmp_path, caplog):
    assert run_main(project, tmp_path, write_params(project), backbone="tiny9") == 1
    assert "unknown backbone 'tiny9'" in caplog.text
    assert not (tmp_path / "models").exists()


def test_checkpoint_resumes_when_only_the_list_of_finetuned_backbones_changes(project, tmp_path, monkeypatch):
    monkeypatch.setenv("CI", "1")
    first = write_params(project, init_head="random", regime="head", epochs=1)
    assert run_main(project, tmp_path, first) == 0
    assert json.loads((tmp_path / "reports/metrics.json").read_text())["resumed_from_epoch"] == 0
    raw = yaml.safe_load(first.read_text())
    raw["weights"]["custom"]["tiny2"] = raw["weights"]["custom"]["tiny"]
    raw["backbones"], raw["finetune"]["backbones"] = ["tiny", "tiny2"], ["tiny2", "tiny"]
    more = project / "more-backbones.yaml"
    more.write_text(yaml.safe_dump(raw))
    assert run_main(project, tmp_path, more) == 0  # tiny's training is unchanged: nothing left to train
    metrics = json.loads((tmp_path / "reports/metrics.json").read_text())
    assert (metrics["resumed_from_epoch"], metrics["epochs_run"], metrics["backbone"]) == (1, 1, "tiny")
    assert {name: [step for step, _ in rows] for name, rows in read_curves(tmp_path / "reports/live").items()} == {
        name: [1] for name in CURVES}  # the replayed epoch, once


# --- the protocol: what chooses, what is held out ----------------------------------------------------------

def test_selection_slice_is_stratified_seeded_and_disjoint_from_training():
    classes = ["a", "b", "c"]
    rows = [ManifestRow(f"{split}/{name}/{i:02d}.png", name, k, split, "", 1, 1)
            for split, sizes in (("train", (20, 10, 2)), ("val", (3, 3, 3)))
            for k, (name, n) in enumerate(zip(classes, sizes)) for i in range(n)]
    plan = plan_splits(rows, classes, selection_fraction=0.15, seed=0)
    assert (plan.heldout_split, plan.selection_method) == ("val", "train_slice")
    assert np.bincount(plan.selection.labels).tolist() == [3, 2, 1]  # round(15%), at least 1, never the whole class
    train_paths = {r.path for r in rows if r.split == "train"}
    assert set(plan.selection.paths).isdisjoint(plan.train.paths)
    assert set(plan.selection.paths) | set(plan.train.paths) == train_paths
    assert plan.heldout.paths == [r.path for r in rows if r.split == "val"]
    assert plan_splits(rows, classes, selection_fraction=0.15, seed=0) == plan
    assert plan_splits(rows, classes, selection_fraction=0.15, seed=1).selection != plan.selection

    with_test = [dataclasses.replace(r, split="test") if r.split == "val" else r for r in rows]
    with_test += [ManifestRow(f"val/{name}/x.png", name, k, "val", "", 1, 1) for k, name in enumerate(classes)]
    plan = plan_splits(with_test, classes, selection_fraction=0.15, seed=0)
    assert (plan.heldout_split, plan.selection_method) == ("test", "val")
    assert plan.selection.paths == [f"val/{name}/x.png" for name in classes] and len(plan.train.paths) == 32
    assert plan.heldout.paths == [r.path for r in with_test if r.split == "test"] and len(plan.heldout.paths) == 9

    one = [r for r in rows if not (r.cls == "c" and r.path.endswith("01.png") and r.split == "train")]
    with pytest.raises(FinetuneError, match="at least 2 train images; 'c' has 1"):
        plan_splits(one, classes, selection_fraction=0.15, seed=0)
    with pytest.raises(FinetuneError, match="nothing can be held out"):
        plan_splits([r for r in rows if r.split == "train"], classes, selection_fraction=0.15, seed=0)


def write_layout(project: Path, folder: Path, *, layout: str, poison: bool) -> Path:
    """A manifest over the project's images: "train_val" as made, or "train_val_test" (val becomes test, two train
    images per class become val); `poison` swaps the class of every held-out row. Returns its path."""
    rows = list(csv.DictReader(open(project / "data/prepared/manifest.csv", encoding="utf-8")))
    heldout = "val"
    if layout == "train_val_test":
        heldout = "test"
        for row in rows:
            if row["split"] == "val":
                row["split"] = "test"
            elif row["path"].endswith(("06.png", "07.png")):
                row["split"] = "val"
    for row in rows:
        if poison and row["split"] == heldout:
            row["label"] = 1 - int(row["label"])
            row["class"] = CLASSES[row["label"]]
    folder.mkdir(parents=True)
    with open(folder / "manifest.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=MANIFEST_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    (folder / "classes.json").write_text(json.dumps(CLASSES))
    return folder / "manifest.csv"


@pytest.mark.parametrize("layout, method", [("train_val", "train_slice"), ("train_val_test", "val")])
def test_poisoned_heldout_labels_change_no_choice(project, tmp_path, monkeypatch, layout, method):
    """Held-out labels reach nothing but the reported numbers: the same epochs, curves and chosen epoch with every
    held-out label flipped, and (two classes) exactly the complementary held-out accuracy."""
    monkeypatch.setenv("CI", "1")
    params = write_params(project, init_head="random", regime="full", epochs=3, lr_backbone=0.003, lr_head=0.01,
                          patience=1)
    metrics, curves = {}, {}
    for poison in (False, True):
        manifest = write_layout(project, tmp_path / f"data-{poison}", layout=layout, poison=poison)
        assert run_main(project, tmp_path / f"run-{poison}", params, manifest=manifest) == 0
        metrics[poison] = json.loads((tmp_path / f"run-{poison}/reports/metrics.json").read_text())
        curves[poison] = (tmp_path / f"run-{poison}/reports/live/plots/metrics/selection/accuracy.tsv").read_text()
    clean, poisoned = metrics[False], metrics[True]
    assert clean["selection"]["method"] == method and clean["heldout_split"] == layout.split("_")[-1]
    assert poisoned["selection"] == clean["selection"] and curves[True] == curves[False]
    assert (poisoned["best_epoch"], poisoned["epochs_run"]) == (clean["best_epoch"], clean["epochs_run"])
    assert poisoned["heldout"]["correct"] == clean["heldout"]["n"] - clean["heldout"]["correct"]
    if method == "val":
        assert clean["selection"]["n"] == 4 and "val" not in clean  # val chose the epoch: it is not reported


def test_dvc_yaml_generates_one_finetune_stage_per_listed_backbone_tracking_every_other_key():
    from stages.finetune import parse_args

    stage = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["finetune"]
    assert stage["foreach"] == "${finetune.backbones}"
    tracked = {p for p in stage["do"]["params"] if p.startswith("finetune.")}
    assert tracked == {f"finetune.{f.name}" for f in dataclasses.fields(FinetuneParams) if f.name != "backbones"}
    assert stage["do"]["cmd"][0] == "python -m stages.params"  # refuses unsafe names before the shell sees them
    args = parse_args(stage["do"]["cmd"][-1].replace("${item}", "efficientnet_lite0").split()[3:])
    assert (args.backbone, str(args.out), str(args.reports), str(args.probe)) == (
        "efficientnet_lite0", "models/finetune/efficientnet_lite0", "reports/finetune/efficientnet_lite0",
        "models/efficientnet_lite0/probe_pool.pt")
    outs = [next(iter(o)) if isinstance(o, dict) else o for o in stage["do"]["outs"]]
    assert outs == ["models/finetune/${item}/classifier.pt", "models/finetune/${item}/classifier.onnx",
                    "models/finetune/${item}/checkpoints",
                    "reports/finetune/${item}/predictions.json", "reports/finetune/${item}/live/metrics.json"]
    # the folder CurveLogger's dvclive.Live writes its curves to (<reports>/live/plots/metrics), plotted by step
    assert stage["do"]["plots"] == [{"reports/finetune/${item}/live/plots/metrics": {
        "x": "step", "x_label": "epoch", "cache": False}}]
    assert [next(iter(m)) for m in stage["do"]["metrics"]] == ["reports/finetune/${item}/metrics.json"]
    deps = set(stage["do"]["deps"])
    assert {str(a) for a in (args.raw, args.manifest)} | {"models/pretrained/${item}.pth",
                                                           "models/${item}/probe_pool.pt"} <= deps
    assert {"stages/finetune.py", "stages/evaluation.py", "stages/metrics.py", "stages/export.py"} <= deps
