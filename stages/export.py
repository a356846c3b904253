"""The exported classifier: `classifier.pt` and `classifier.onnx` -- build, save, load, verify (one owner; the .onnx side is
stages/export_onnx.py).

The head stage writes `models/<bb>/classifier.pt` (and `probe_pool.pt`), the fine-tune stage
`models/finetune/<bb>/classifier.pt`, each with a `classifier.onnx` beside it; `python -m stages.predict` runs
either. Nothing else reads or writes these files.

classifier.pt is a plain dict of tensors and values, loaded with `torch.load(weights_only=True)` only; nothing
pickled is ever executed:

    format_version   FORMAT_VERSION
    backbone         {"name", "arch" ("timm:<name>" | "torchvision:<name>"), "classifier" (dotted path of the
                      ImageNet classifier, replaced by nn.Identity), "build_kwargs", "preprocess" ({"input_size",
                      "resize", "interpolation", "mean", "std"}, as the features file recorded it), "tta"
                      (views whose features are averaged: "none", "hflip"), "precision" (the extract dtype)}
    backbone_state   {key: tensor}: state dict of the backbone with its classifier replaced by nn.Identity
    layers           the probed layers ("pool" or module names, global-average-pooled), concatenated in this order
                     (format_version 1 had one "layer")
    classes          class names; output column k is classes[k]
    head             {"kind", "type": "linear" | "rbf_svm", "output": "softmax" | "platt", float64 tensors}
                     optional "l2_blocks" [D_1, ...]: each layer's block of the features is first scaled to
                              L2 norm sqrt(D_i) (head.normalization l2, l2+standardize)
                     linear:  "weight" [K', D], "bias" [K'] (feature standardization folded in)
                     rbf_svm: "mean" [D], "scale" [D], "support_vectors" [S, D], "dual_coef" [S, P] (one column
                              per one-vs-one pair (i, j), i < j, in scikit-learn order), "intercept" [P],
                              "gamma" (float), "n_classes"
                     platt:   "platt_a" [K'], "platt_b" [K']: p_k = sigmoid(-(a_k s_k + b_k)), normalized over
                              classes (binary: K' = 1 scores class 1; p_0 = 1 - p_1)
                     softmax: optional "temperature" T > 0 (format_version 3; head.calibration temperature):
                              p = softmax(scores / T). Absent, as in every format 1 and 2 file, T = 1: those
                              heads were exported uncalibrated, so T = 1 is exactly what they computed
                     optional "class_weight": "none" | "balanced", how the head's loss weighed the classes
    provenance       where the export came from (features, weights, manifest hashes, chosen C, ...)

Every write is atomic (a temporary file beside the target, then os.replace) and checked before it replaces the
target: classifier.pt must load with weights_only=True (classifier.onnx's parity check: stages/export_onnx.py).
"""
from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stages.backbones import Backbone, FeatureModel, Preprocess, WeightsSource, build_model
from stages.hardware import DTYPES
from stages.io import atomic_path

logger = logging.getLogger(__name__)

FORMAT_VERSION = 3  # 3 added the head's "temperature"; code reading only 1 and 2 would ignore it, so it refuses 3
READABLE_VERSIONS = (1, 2, 3)
PREPROCESS_KEYS = ("input_size", "resize", "interpolation", "mean", "std")


class ExportError(ValueError):
    """A classifier export is missing, of another format version, or inconsistent."""


# ------------------------------------------------------------------------------------------------ heads
class L2Blocks(nn.Module):
    """x [B, sum D_i] -> each block of D_i columns scaled to L2 norm sqrt(D_i) (stages.evaluation.normalize_blocks)."""

    def __init__(self, dims: Sequence[int]) -> None:
        super().__init__()
        self.dims = [int(d) for d in dims]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != sum(self.dims):
            raise ExportError(f"l2_blocks {self.dims} need {sum(self.dims)} features; got {x.shape[1]}")
        blocks = torch.split(x.double(), self.dims, dim=1)
        return torch.cat([b * (b.shape[1] ** 0.5 / b.norm(dim=1, keepdim=True).clamp_min(1e-12)) for b in blocks],
                         dim=1)


class LinearHead(nn.Module):
    """Scores [B, K'] = x [B, D] @ weight.T + bias, in float64 (standardization already folded in)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", weight.double())
        self.register_buffer("bias", bias.double().reshape(-1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x.double(), self.weight, self.bias)


class RBFSVMHead(nn.Module):
    """scikit-learn SVC(kernel="rbf") decision function: [B, 1] for two classes, one-vs-rest [B, K] else.

    Pair p = (i, j), i < j, scores d_p = sum_s dual_coef[s, p] exp(-gamma |x - sv_s|^2) + intercept[p]
    (positive: class i); with more than two classes the pairs are turned into the one-vs-rest votes plus
    bounded confidences that `SVC.decision_function(decision_function_shape="ovr")` returns.
    """

    def __init__(self, *, mean: torch.Tensor, scale: torch.Tensor, support_vectors: torch.Tensor,
                 dual_coef: torch.Tensor, intercept: torch.Tensor, gamma: float, n_classes: int) -> None:
        super().__init__()
        self.register_buffer("mean", mean.double())
        self.register_buffer("scale", scale.double())
        self.register_buffer("support_vectors", support_vectors.double())
        self.register_buffer("dual_coef", dual_coef.double())
        self.register_buffer("intercept", intercept.double())
        self.gamma = float(gamma)
        self.n_classes = int(n_classes)
        pairs = [(i, j) for i in range(self.n_classes) for j in range(i + 1, self.n_classes)]
        if dual_coef.shape[1] != len(pairs) or intercept.numel() != len(pairs):
            raise ExportError(f"rbf_svm head: {self.n_classes} classes need {len(pairs)} one-vs-one columns; "
                              f"got dual_coef {tuple(dual_coef.shape)}, intercept {tuple(intercept.shape)}")
        self.register_buffer("pairs", torch.tensor(pairs, dtype=torch.long).reshape(-1, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = (x.double() - self.mean) / self.scale
        sq = (z * z).sum(1, keepdim=True) + (self.support_vectors ** 2).sum(1) - 2 * z @ self.support_vectors.T
        kernel = torch.exp(-self.gamma * sq.clamp_min(0))  # [B, S]
        pair_scores = kernel @ self.dual_coef + self.intercept  # [B, P]
        if self.n_classes == 2:
            return pair_scores
        first, second = self.pairs[:, 0], self.pairs[:, 1]
        votes = torch.zeros(x.shape[0], self.n_classes, dtype=torch.float64, device=x.device)
        confidence = torch.zeros_like(votes)
        wins_first = (pair_scores >= 0).double()
        votes.index_add_(1, first, wins_first)
        votes.index_add_(1, second, 1 - wins_first)
        confidence.index_add_(1, first, pair_scores)
        confidence.index_add_(1, second, -pair_scores)
        return votes + confidence / (3 * (confidence.abs() + 1))


class SoftmaxOutput(nn.Module):
    """Probabilities [B, K] = softmax(scores [B, K] / temperature) (temperature scaling; 1: plain softmax)."""

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__()
        if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
            raise ExportError(f"head temperature must be a positive finite number; got {temperature!r}")
        self.register_buffer("temperature", torch.tensor(float(temperature), dtype=torch.float64))

    def forward(self, scores: torch.Tensor) -> torch.Tensor:
        return torch.softmax(scores / self.temperature, dim=1)


class PlattOutput(nn.Module):
    """Platt-scaled probabilities as scikit-learn's CalibratedClassifierCV(method="sigmoid") computes them.

    p_k = sigmoid(-(a_k s_k + b_k)); two classes: scores [B, 1] are class 1's, p_0 = 1 - p_1; more classes:
    normalized to sum 1 (uniform where every p_k is 0).
    """

    def __init__(self, a: torch.Tensor, b: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("a", a.double().reshape(-1))
        self.register_buffer("b", b.double().reshape(-1))

    def forward(self, scores: torch.Tensor) -> torch.Tensor:
        p = torch.sigmoid(-(self.a * scores + self.b))
        if p.shape[1] == 1:
            return torch.cat([1 - p, p], dim=1)
        total = p.sum(1, keepdim=True)
        return torch.where(total > 0, p / total.clamp_min(torch.finfo(p.dtype).tiny),
                           torch.full_like(p, 1 / p.shape[1]))


def build_head(spec: dict[str, Any]) -> nn.Module:
    """The head of an export as an nn.Module: features [B, D] -> probabilities [B, K] (float64)."""
    try:
        kind = spec.get("type", "linear")
        if kind == "linear":
            scorer: nn.Module = LinearHead(spec["weight"], spec["bias"])
        elif kind == "rbf_svm":
            scorer = RBFSVMHead(mean=spec["mean"], scale=spec["scale"], support_vectors=spec["support_vectors"],
                                dual_coef=spec["dual_coef"], intercept=spec["intercept"], gamma=spec["gamma"],
                                n_classes=spec["n_classes"])
        else:
            raise ExportError(f"head type must be 'linear' or 'rbf_svm'; got {kind!r}")
        if spec.get("l2_blocks"):
            scorer = nn.Sequential(L2Blocks(spec["l2_blocks"]), scorer)
        output = spec.get("output", "softmax")
        if output == "softmax":
            return nn.Sequential(scorer, SoftmaxOutput(spec.get("temperature", 1.0)))
        if spec.get("temperature", 1.0) != 1.0:
            raise ExportError(f"head temperature applies to softmax outputs only; this {output!r} head has "
                              f"{spec['temperature']!r}")
        if output == "platt":
            return nn.Sequential(scorer, PlattOutput(spec["platt_a"], spec["platt_b"]))
        raise ExportError(f"head output must be 'softmax' or 'platt'; got {output!r}")
    except KeyError as exc:
        raise ExportError(f"head of kind {spec.get('kind')!r} lacks {exc}") from None


# ------------------------------------------------------------------------------------------------ model
class ExportedClassifier(nn.Module):
    """Backbone + head: normalized images [B, 3, H, W] float32 -> class probabilities [B, K] float64.

    Features of the `tta` views are averaged (as extract stored them); the backbone runs under autocast in
    `precision` when that is not float32 (as extract ran it). Images are prepared with
    `stages.images.eval_dataset(root, paths, labels, self.preprocess)`, the extract stage's preprocessing.
    """

    def __init__(self, features: FeatureModel, head: nn.Module, *, layers: Sequence[str], classes: Sequence[str],
                 preprocess: Preprocess, tta: Sequence[str] = ("none",), precision: str = "float32",
                 name: str = "") -> None:
        super().__init__()
        self.name = name
        self.features = features.eval()
        self.head = head
        self.layers = tuple(layers)
        self.classes = list(classes)
        self.preprocess = preprocess
        self.tta = tuple(tta)
        self.precision = precision

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Features [B, D] (float32): `self.layers` concatenated, each averaged over the TTA views."""
        views = [images.flip(-1) if view == "hflip" else images for view in self.tta] or [images]
        dtype = DTYPES.get(self.precision, torch.float32)
        total = None
        for view in views:
            with torch.autocast(images.device.type, dtype=dtype, enabled=dtype != torch.float32):
                outputs = self.features(view)
            out = torch.cat([outputs[layer].float() for layer in self.layers], dim=1)
            total = out if total is None else total + out
        return total / len(views)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(images))


def preprocess_from(spec: dict[str, Any]) -> Preprocess:
    """A Preprocess from an export's `backbone.preprocess` dict (or the ONNX metadata's `preprocess`)."""
    missing = [key for key in PREPROCESS_KEYS if key not in spec]
    if missing:
        raise ExportError(f"backbone.preprocess lacks {', '.join(missing)}")
    return Preprocess(input_size=int(spec["input_size"]), resize=int(spec["resize"]),
                      interpolation=str(spec["interpolation"]), mean=tuple(map(float, spec["mean"])),
                      std=tuple(map(float, spec["std"])))


def classifier_from_export(export: dict[str, Any]) -> ExportedClassifier:
    """Rebuild an ExportedClassifier (eval mode, CPU) from the dict `torch.load` returned."""
    version = export.get("format_version") if isinstance(export, dict) else None
    if version not in READABLE_VERSIONS:
        raise ExportError(f"format_version is {version!r}, this code reads {READABLE_VERSIONS}; "
                          f"re-run the head stage (`dvc repro head`) to export again")
    try:
        spec, state = export["backbone"], export["backbone_state"]
        layers = list(export["layers"]) if version >= 2 else [export["layer"]]
        classes, head_spec = export["classes"], export["head"]
    except KeyError as exc:
        raise ExportError(f"the export lacks {exc}") from None
    preprocess = preprocess_from(spec["preprocess"])
    backbone = Backbone(name=spec["name"], arch=spec["arch"], weights=WeightsSource(filename=""),
                        preprocess=preprocess, classifier=spec["classifier"],
                        build_kwargs=dict(spec.get("build_kwargs") or {}))
    features = FeatureModel(build_model(backbone), spec["classifier"], tuple(layers))
    try:
        features.model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ExportError(f"backbone_state does not fit {spec['arch']}: {exc}") from None
    for parameter in features.parameters():
        parameter.requires_grad_(False)
    return ExportedClassifier(features, build_head(head_spec), layers=layers, classes=classes,
                              preprocess=preprocess, tta=spec.get("tta") or ("none",),
                              precision=spec.get("precision") or "float32", name=spec["name"]).eval()


# ------------------------------------------------------------------------------------------------ classifier.pt
def build_export(*, backbone_name: str, backbone_state: dict[str, torch.Tensor], backbone_spec: dict[str, Any],
                 layers: Sequence[str], classes: Sequence[str], head_spec: dict[str, Any],
                 provenance: dict[str, Any]) -> dict[str, Any]:
    """The classifier.pt dict: plain values and tensors only (torch.load(weights_only=True)).

    backbone_spec: {"arch", "classifier", "build_kwargs", "preprocess", "tta", "precision"} (see the module
    docstring); head_spec: the `head` entry."""
    return {"format_version": FORMAT_VERSION, "backbone": {"name": backbone_name, **backbone_spec},
            "backbone_state": backbone_state, "layers": list(layers), "classes": list(classes), "head": head_spec,
            "provenance": provenance}


def save_export(path: Path, export: dict[str, Any]) -> None:
    """Write a classifier.pt dict atomically and check that it loads with weights_only=True."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:  # a file object: the zip records are named archive/..., not after the random
            torch.save(export, fh)  # temporary file, so the same export gives the same bytes (and DVC hash)
        torch.load(tmp, map_location="cpu", weights_only=True)  # the contract: plain tensors and values only


def load_export(path: str | Path) -> dict[str, Any]:
    """The dict in a classifier.pt, loaded with `torch.load(weights_only=True)` (a pickled object is refused)."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path} does not exist; run `dvc repro head` to export a classifier")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - UnpicklingError, RuntimeError, zipfile errors
        raise ExportError(f"refused to load {path}: not a plain tensor export "
                          f"(loaded with weights_only=True): {exc}") from None


def load_classifier(path: str | Path) -> ExportedClassifier:
    """Load `models/<bb>/classifier.pt` with `torch.load(weights_only=True)` and rebuild the classifier."""
    export = load_export(path)
    try:
        return classifier_from_export(export)
    except ExportError as exc:
        raise ExportError(f"{path}: {exc}") from None
