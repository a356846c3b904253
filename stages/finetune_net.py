"""The network a fine-tune trains (stages/finetune.py): a backbone's body with a new linear head, the regime that
decides which of it trains, the head stage's linear probe it may start from, and the classifier.pt it ends as.

A net built here and started from its probe computes exactly the probe before any update (tests/test_finetune.py
checks it in eval and in train mode); `apply_regime` keeps frozen modules (and, with `batchnorm: frozen`, every
BatchNorm layer) in eval mode, so their running statistics never change.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stages.backbones import (Backbone, Preprocess, build_model, classifier_path, load_weights, module_version,
                              replace_module)
from stages.export import PREPROCESS_KEYS, ExportError, build_export, load_export
from stages.io import sha256_file


class FinetuneError(RuntimeError):
    """Inputs or settings do not allow fine-tuning; the message says which file or parameter and why."""


# ------------------------------------------------------------------------------------------------ model
class FinetuneNet(nn.Module):
    """`body` maps images [B, 3, H, W] to pooled embeddings [B, D]; `head` (nn.Linear) maps them to logits [B, K].

    `frozen` lists body modules that stay in eval mode whenever the net is put in train mode (their
    BatchNorm statistics and dropout behave as at inference). `freeze_norm_stats`: every BatchNorm layer of the
    body also stays in eval mode (normalizes with its running statistics, which never change; its affine weight
    and bias still train where the regime trains them). `l2_normalize`: embeddings are scaled to L2 norm sqrt(D)
    before the head (a probe fit with head.normalization l2 or l2+standardize).
    """

    def __init__(self, body: nn.Module, head: nn.Linear) -> None:
        super().__init__()
        self.body = body
        self.head = head
        self.frozen: tuple[str, ...] = ()
        self.freeze_norm_stats = False
        self.l2_normalize = False

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        embeddings = self.body(images).flatten(1)
        if self.l2_normalize:
            norm = embeddings.float().norm(dim=1, keepdim=True).clamp_min(1e-12)
            embeddings = embeddings * (embeddings.shape[1] ** 0.5 / norm).to(embeddings.dtype)
        return self.head(embeddings)

    def train(self, mode: bool = True) -> FinetuneNet:
        super().train(mode)
        if mode:
            for name in self.frozen:
                (self.body.get_submodule(name) if name else self.body).train(False)
            if self.freeze_norm_stats:
                for module in self.body.modules():
                    if isinstance(module, nn.modules.batchnorm._BatchNorm):
                        module.train(False)
        return self


def build_finetune_net(backbone: Backbone, weights_path: str | Path, num_classes: int) -> FinetuneNet:
    """The backbone with verified weights and its ImageNet classifier replaced by a new nn.Linear(D, num_classes).

    The new head is initialised from the global torch RNG (seed first).
    """
    model = build_model(backbone)
    load_weights(model, backbone, weights_path)
    path = classifier_path(backbone, model)
    old = model.get_submodule(path)
    if not isinstance(old, nn.Linear):
        raise FinetuneError(f"{backbone.name}: the classifier {path!r} is a {type(old).__name__}, not nn.Linear; "
                            f"cannot read the embedding size")
    replace_module(model, path, nn.Identity())
    return FinetuneNet(model, nn.Linear(old.in_features, num_classes))


def init_head_from_probe(net: FinetuneNet, weight: torch.Tensor, bias: torch.Tensor) -> None:
    """Copy a linear probe's weight [K, D] and bias [K] into the head (a binary probe's [1, D] is made [2, D])."""
    weight, bias = weight.float(), bias.float().reshape(-1)
    if weight.shape[0] == 1 and net.head.out_features == 2:  # sigmoid(z) == softmax([-z/2, z/2])[1]
        weight, bias = torch.cat([-weight / 2, weight / 2]), torch.cat([-bias / 2, bias / 2])
    if tuple(weight.shape) != tuple(net.head.weight.shape) or bias.shape != net.head.bias.shape:
        raise FinetuneError(f"the probe's linear layer is {tuple(weight.shape)} but the fine-tune head needs "
                            f"{tuple(net.head.weight.shape)} (classes x embedding size)")
    with torch.no_grad():
        net.head.weight.copy_(weight)
        net.head.bias.copy_(bias)


def apply_regime(net: FinetuneNet, regime: str, unfreeze_from: str, *, batchnorm: str = "frozen",
                 suggestions: Sequence[str] = ()) -> dict[str, int]:
    """Set `requires_grad`, the eval-mode list `net.frozen` and `net.freeze_norm_stats` (`batchnorm` "frozen")
    for `regime`; return parameter counts.

    partial: parameters owned by `unfreeze_from` and every module after it in `named_modules()` order train;
    parameters owned by earlier modules (including the containers above `unfreeze_from`) are frozen, and every
    earlier module that is not such a container stays in eval mode.
    """
    body_modules = list(net.body.named_modules())
    if regime == "full":
        first = 0
    elif regime == "head":
        first = len(body_modules)
    else:
        names = [name for name, _ in body_modules]
        if unfreeze_from not in names:
            hint = ", ".join(suggestions) or ", ".join(n for n, _ in net.body.named_children())
            raise FinetuneError(f"finetune.unfreeze_from must name a module of the backbone, e.g. {hint}; "
                                f"got {unfreeze_from!r}. Edit params.yaml.")
        first = names.index(unfreeze_from)
    target = body_modules[first][0] if first < len(body_modules) else None
    frozen = []
    for index, (name, module) in enumerate(body_modules):
        trainable = index >= first
        for parameter in module.parameters(recurse=False):
            parameter.requires_grad_(trainable)
        is_ancestor = target is not None and (name == "" or target.startswith(name + "."))
        if not trainable and not is_ancestor and not any(name.startswith(f + ".") or f == "" for f in frozen):
            frozen.append(name)
    for parameter in net.head.parameters():
        parameter.requires_grad_(True)
    net.frozen = tuple(frozen)
    net.freeze_norm_stats = batchnorm == "frozen"
    count = {True: 0, False: 0}
    for parameter in net.parameters():
        count[parameter.requires_grad] += parameter.numel()
    return {"trainable_parameters": count[True], "frozen_parameters": count[False]}


# ------------------------------------------------------------------------------------- probe and export
@dataclass(frozen=True)
class Probe:
    """The head stage's linear probe as logits = g(features) @ weight.T + bias, where g scales each embedding to L2
    norm sqrt(D) when `l2_normalize`, else is the identity (feature standardization folded into weight/bias)."""
    weight: torch.Tensor  # [K, D] (or [1, D]: the logit of class 1 of a binary probe)
    bias: torch.Tensor  # [K] (or [1])
    kind: str
    sha256: str
    l2_normalize: bool = False


def probe_logits(head: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of logits from an exported linear head (stages/export.py format).

    softmax output: the scores are the logits. platt output (linear_svm): p_k = sigmoid(-(a_k s_k + b_k)), so
    the logit is -(a_k s_k + b_k) -- exact for two classes, the usual approximation for one-vs-rest.
    """
    weight, bias = head["weight"].double(), head["bias"].double().reshape(-1)
    if head.get("output", "softmax") == "platt":
        a, b = head["platt_a"].double().reshape(-1), head["platt_b"].double().reshape(-1)
        weight, bias = -a[:, None] * weight, -(a * bias + b)
    return weight, bias


def read_probe(path: Path, *, backbone: str, classes: Sequence[str], preprocess: Preprocess) -> Probe:
    """The head stage's export at `path`, checked to fit this fine-tune: same backbone, classes and
    preprocessing, the pooled layer alone, a linear head."""
    if not path.is_file():
        raise FinetuneError(f"{path} not found: finetune.init_head probe starts from the head stage's linear probe; "
                            f"run `dvc repro head@{backbone}` first or set `init_head: random` in params.yaml")
    try:
        export = load_export(path)  # weights_only=True: a pickled object is refused
    except ExportError as exc:
        raise FinetuneError(str(exc)) from None
    head, info = export.get("head") or {}, export.get("backbone") or {}
    layers = list(export.get("layers") or [export.get("layer")])  # format 2: "layers"; format 1: one "layer"
    found = {"backbone": info.get("name"), "classes": list(export.get("classes") or []), "layers": layers}
    expected = {"backbone": backbone, "classes": list(classes), "layers": ["pool"]}
    for key in expected:
        if found[key] != expected[key]:
            raise FinetuneError(f"{path}: {key} is {found[key]!r} but the fine-tune needs {expected[key]!r}; "
                                f"pass --probe models/{backbone}/classifier.pt, probe the pooled layer alone and "
                                f"re-run `dvc repro head@{backbone}`, or set `finetune.init_head: random`")
    recorded = info.get("preprocess")
    if recorded and {k: recorded.get(k) for k in PREPROCESS_KEYS} != preprocess.as_dict():
        raise FinetuneError(f"{path}: the probe was fit on features preprocessed as {recorded} but the fine-tune "
                            f"uses {preprocess.as_dict()}; re-run `dvc repro head@{backbone}`")
    if head.get("type", "linear") != "linear" or not isinstance(head.get("weight"), torch.Tensor):
        raise FinetuneError(f"{path}: a {head.get('kind')!r} head has no linear weight/bias to start from; use "
                            f"head.kind logreg, linear_svm or softmax, or set `finetune.init_head: random`")
    weight, bias = probe_logits(head)
    blocks = [int(d) for d in head.get("l2_blocks") or []]
    if blocks and blocks != [weight.shape[1]]:
        raise FinetuneError(f"{path}: l2_blocks {blocks} do not match the probe's {weight.shape[1]} features")
    return Probe(weight=weight, bias=bias, kind=str(head.get("kind")), sha256=sha256_file(path),
                 l2_normalize=bool(blocks))


def export_classifier(net: FinetuneNet, backbone: Backbone, *, preprocess: Preprocess, classes: Sequence[str],
                      provenance: dict[str, Any]) -> dict[str, Any]:
    """The classifier.pt dict (stages/export.py): the fine-tuned backbone's state (classifier removed) + a
    float64 linear softmax head; run in float32 without TTA, as the final evaluation ran."""
    head_spec: dict[str, Any] = {"kind": "finetune", "type": "linear", "output": "softmax",
                                 "weight": net.head.weight.detach().cpu().double(),
                                 "bias": net.head.bias.detach().cpu().double()}
    if net.l2_normalize:
        head_spec["l2_blocks"] = [net.head.in_features]
    return build_export(
        backbone_name=backbone.name,
        backbone_spec={"arch": backbone.arch, "classifier": classifier_path(backbone, build_model(backbone)),
                       "build_kwargs": dict(backbone.build_kwargs), "preprocess": preprocess.as_dict(),
                       "tta": ["none"], "precision": "float32"},
        backbone_state={k: v.detach().cpu().clone() for k, v in net.body.state_dict().items()},
        layers=["pool"], classes=classes, head_spec=head_spec,
        provenance={**provenance, "versions": {"torch": str(torch.__version__), "timm": module_version("timm")}})
