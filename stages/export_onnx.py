"""classifier.onnx -- build, save, load, verify (its owner; classifier.pt is stages/export.py).

classifier.onnx is the same classifier as one ONNX graph (torch.onnx.export, dynamo=True), for ONNX Runtime and
anything else that runs ONNX, without torch or this code:

    input  "images"         float32 [N, 3, H, W] (N dynamic): images preprocessed as below
    output "probabilities"  float64 [N, K]: column k is classes[k]
    metadata_props          "format_version", "backbone" (name), "classes" (JSON list), "preprocess" (JSON:
                            input_size, resize, interpolation, mean, std), "layers", "tta" (JSON lists),
                            "precision" (always "float32": see below), "head" (type/output), "temperature"
                            (the softmax temperature the graph already applies; "1.0" for Platt and older heads)

The graph computes classifier_from_export's module: backbone, the TTA views averaged, the layers concatenated,
the L2 blocks and the head. It is put together from two exported parts with the `onnx` library
(onnx.compose.merge_models): the backbone's feature graph (torch.onnx.export once per backbone weights, layers
and input size, cached in `.graphs/` beside the .onnx, as stages/engines/graph.py caches extract's graphs; not
imported from there, so that head and finetune run no engine code) and the small head graph
(`ExportTail`: the layers concatenated, the views averaged, the head; exported per run); with TTA, a
flip-and-concatenate graph in front runs the backbone once over every view. The head keeps its float64
arithmetic (ONNX Runtime's CPU kernels run it; no float32 fallback was needed). The backbone runs in float32 even where the .pt records a bf16/fp16 extract
precision (the .pt then runs it under autocast; ONNX Runtime's CPU kernels lack bf16): parity is checked
against the torch classifier in float32. Preprocessing (not in the graph): decode to RGB, resize the short side
to `resize` with `interpolation`, centre-crop `input_size`, scale to [0, 1], subtract `mean`, divide by `std`
(stages.images.eval_dataset, which also draft-decodes JPEGs at the resize size).

Every write is atomic and checked before it replaces the target: classifier.onnx must give, in ONNX Runtime
(CPUExecutionProvider) on up to ONNX_PARITY_IMAGES real held-out images, the torch classifier's class and
probabilities within ONNX_PARITY_TOLERANCE.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from stages.backbones import FeatureModel, Preprocess, module_version
from stages.export import (FORMAT_VERSION, READABLE_VERSIONS, ExportedClassifier, ExportError, classifier_from_export,
                           preprocess_from)
from stages.images import ImageDecodeError, eval_dataset
from stages.io import atomic_path, quiet_onnx_export, write_json

logger = logging.getLogger(__name__)

ONNX_OPSET = 18
ONNX_INPUT = "images"
ONNX_OUTPUT = "probabilities"
ONNX_PARITY_IMAGES = 16
ONNX_PARITY_TOLERANCE = 1e-4  # largest |probability difference| between ONNX Runtime and torch


# ------------------------------------------------------------------------------------------------ classifier.onnx
def onnx_path_for(path: str | Path) -> Path:
    """classifier.onnx beside a classifier.pt (a .onnx path is returned as it is)."""
    path = Path(path)
    return path if path.suffix == ".onnx" else path.with_suffix(".onnx")


def onnx_metadata(export: dict[str, Any]) -> dict[str, str]:
    """classifier.onnx's metadata_props for a classifier.pt dict: what running it needs without the .pt
    (string values; lists and dicts as JSON)."""
    spec, head = export["backbone"], export["head"]
    layers = list(export["layers"]) if export.get("format_version", FORMAT_VERSION) >= 2 else [export["layer"]]
    return {"format_version": str(FORMAT_VERSION), "backbone": str(spec["name"]),
            "classes": json.dumps([str(c) for c in export["classes"]]),
            "preprocess": json.dumps(preprocess_from(spec["preprocess"]).as_dict()),
            "layers": json.dumps(layers), "tta": json.dumps(list(spec.get("tta") or ["none"])),
            "precision": "float32", "head": f"{head.get('type', 'linear')}/{head.get('output', 'softmax')}",
            "temperature": repr(float(head.get("temperature", 1.0)))}


def read_sample_images(root: str | Path, paths: Sequence[str], preprocess: Preprocess, *,
                       limit: int = ONNX_PARITY_IMAGES) -> torch.Tensor:
    """Up to `limit` of `paths` (relative to `root`, evenly spread) decoded as predict decodes them
    (stages.images.eval_dataset): float32 [N, 3, input_size, input_size]. Undecodable files are skipped."""
    if not paths:
        raise ExportError("no held-out images: classifier.onnx needs real images to check its parity with the "
                          "torch classifier")
    picks = np.unique(np.linspace(0, len(paths) - 1, min(limit, len(paths))).round().astype(int))
    chosen = [str(paths[i]) for i in picks]
    images = eval_dataset(Path(root), chosen, [0] * len(chosen), preprocess)
    tensors = []
    for index in range(len(chosen)):
        try:
            tensors.append(images[index][0])
        except ImageDecodeError:
            continue
    if not tensors:
        raise ExportError(f"no image of {len(paths)} under {root} decodes; classifier.onnx needs real images "
                          f"to check its parity with the torch classifier")
    return torch.stack(tensors)


def verify_onnx(session: Any, classifier: nn.Module, images: torch.Tensor, *,
                tolerance: float = ONNX_PARITY_TOLERANCE) -> float:
    """Run `classifier` (torch) and `session` (an onnxruntime.InferenceSession) on images [N, 3, H, W]; raise
    ExportError unless both choose the same class (wherever torch's top two differ by more than 1e-9) and every
    probability is within `tolerance`. Returns the largest |probability difference|."""
    with torch.inference_mode():
        expected = classifier(images).double().numpy()
    got = np.asarray(session.run([ONNX_OUTPUT], {ONNX_INPUT: images.numpy()})[0], dtype=np.float64)
    if got.shape != expected.shape:
        raise ExportError(f"classifier.onnx gives probabilities of shape {got.shape}; torch gives {expected.shape}")
    top2 = np.sort(expected, axis=1)[:, -2:] if expected.shape[1] > 1 else np.zeros((len(expected), 2))
    differ = int(np.sum((got.argmax(1) != expected.argmax(1)) & ((top2[:, 1] - top2[:, 0]) > 1e-9)))
    largest = float(np.abs(got - expected).max())
    if differ or not largest <= tolerance:
        raise ExportError(f"classifier.onnx disagrees with the torch classifier on {len(images)} held-out images: "
                          f"{differ} different classes, largest probability difference {largest:.3g} "
                          f"(allowed {tolerance:g}); the ONNX export is wrong, not written")
    return largest


class ExportTail(nn.Module):
    """What follows the backbone in classifier.onnx: per layer features [V*N, D_l] (float32; the V views of N
    images stacked view after view, as the flip-and-concatenate graph feeds the backbone) -> probabilities [N, K]
    (float64), as ExportedClassifier.embed + head compute them (features concatenated per view in `layers`
    order, summed over the views in order, divided by V)."""

    def __init__(self, head: nn.Module, *, views: int) -> None:
        super().__init__()
        self.head, self.views = head, int(views)

    def forward(self, *layer_features: torch.Tensor) -> torch.Tensor:
        features = torch.cat([f.float() for f in layer_features], dim=1)  # [V*N, D]
        if self.views > 1:
            per_view = features.reshape(self.views, -1, features.shape[1])
            total = per_view[0]
            for view in range(1, self.views):
                total = total + per_view[view]
            features = total / self.views
        return self.head(features)


def state_sha256(export: dict[str, Any]) -> str:
    """sha256 of what the backbone graph is made of: arch, build kwargs, classifier path and every tensor of
    backbone_state (name, dtype, shape, bytes), in key order."""
    spec = export["backbone"]
    digest = hashlib.sha256(json.dumps([spec["arch"], spec.get("build_kwargs") or {}, spec["classifier"]],
                                       sort_keys=True, default=str).encode())
    for name in sorted(export["backbone_state"]):
        tensor = export["backbone_state"][name]
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _views_graph(tta: Sequence[str], opset: Any, ir_version: int) -> Any:
    """ONNX model: "images" [N, 3, H, W] -> "views" [V*N, 3, H, W], the views of `tta` stacked along the batch
    ("hflip": the last axis reversed, ExportedClassifier.embed's images.flip(-1))."""
    from onnx import TensorProto, helper

    nodes, names = [], []
    initializers = [helper.make_tensor(name, TensorProto.INT64, [1], [value]) for name, value in (
        ("views.flip_starts", -1), ("views.flip_ends", -(2 ** 63)), ("views.flip_axes", 3), ("views.flip_steps", -1))]
    for index, view in enumerate(tta):
        if view == "hflip":
            names.append(f"views.hflip{index}")
            nodes.append(helper.make_node("Slice", ["images", "views.flip_starts", "views.flip_ends", "views.flip_axes",
                                                    "views.flip_steps"], [names[-1]], name=f"views.slice{index}"))
        elif view == "none":
            names.append("images")
        else:
            raise ExportError(f"backbone.tta views must be 'none' or 'hflip'; got {view!r}")
    nodes.append(helper.make_node("Concat", names, ["views"], axis=0, name="views.concat"))
    shape = ["batch", 3, "height", "width"]
    graph = helper.make_graph(nodes, "tta_views", [helper.make_tensor_value_info("images", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("views", TensorProto.FLOAT, ["views", 3, "height",
                                                                                          "width"])],
                              initializer=initializers)
    return helper.make_model(graph, opset_imports=[opset], ir_version=ir_version)


def _tail_model(classifier: ExportedClassifier, features: dict[str, torch.Tensor], views: int) -> Any:
    """ExportTail exported with torch.onnx (dynamo): inputs "tail.<layer>" [V*N, D_l], output ONNX_OUTPUT."""
    tail = ExportTail(classifier.head, views=views).eval()
    example = tuple(features[layer] for layer in classifier.layers)
    batch = torch.export.Dim("rows", min=views)
    with quiet_onnx_export():
        program = torch.onnx.export(tail, example, dynamo=True, opset_version=ONNX_OPSET, verbose=False,
                                    input_names=[f"tail.{layer}" for layer in classifier.layers],
                                    output_names=[ONNX_OUTPUT], dynamic_shapes=(tuple({0: batch} for _ in example),))
    return program.model_proto


class LayerOutputs(nn.Module):
    """FeatureModel's {layer: [B, D]} as a tuple in `layers` order (ONNX outputs are positional)."""

    def __init__(self, features: FeatureModel, layers: Sequence[str]) -> None:
        super().__init__()
        self.features, self.layers = features, tuple(layers)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.features(images)
        return tuple(out[layer] for layer in self.layers)


def backbone_graph_key(export: dict[str, Any], *, layers: Sequence[str], input_size: int) -> dict[str, Any]:
    """What classifier.onnx's backbone part depends on: a change of any value means another cached graph."""
    return {"backbone": str(export["backbone"]["name"]), "state_sha256": state_sha256(export), "layers": list(layers),
            "input_size": int(input_size), "opset": ONNX_OPSET,
            "versions": {name: module_version(name) for name in ("torch", "timm", "onnx", "onnxscript")}}


def backbone_graph_path(cache: Path, key: dict[str, Any]) -> Path:
    """`<cache>/<backbone>-<16 hex digits of the key's sha256>.onnx` (the key is written beside it as .json)."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(cache) / f"{key['backbone']}-{digest}.onnx"


def cached_backbone_graph(features: FeatureModel, *, key: dict[str, Any], cache: Path) -> tuple[Path, bool]:
    """The backbone graph for `key` ("images" float32 [N, 3, H, W] -> one float32 [N, D] output per layer, named
    after it), exported from `features` (eval mode, CPU, float32) with torch.onnx (dynamo) when not in `cache`.
    Other graphs of the same backbone in `cache` are removed (one set of weights is kept). Returns (path, cached)."""
    path = backbone_graph_path(cache, key)
    cached = path.is_file() and path.with_suffix(".json").is_file()
    if not cached:
        size, layers = key["input_size"], tuple(key["layers"])
        example = torch.zeros(2, 3, size, size)
        with quiet_onnx_export():
            program = torch.onnx.export(LayerOutputs(features, layers).eval(), (example,), dynamo=True,
                                        input_names=[ONNX_INPUT], output_names=list(layers),
                                        dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=65536)},),
                                        opset_version=ONNX_OPSET, external_data=False, verbose=False)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path, suffix=".onnx") as tmp:
            program.save(str(tmp))
        write_json(path.with_suffix(".json"), key)
    for other in path.parent.glob(f"{key['backbone']}-*"):
        if other.with_suffix(".onnx") != path:
            other.unlink(missing_ok=True)
    return path, cached


def build_onnx(export: dict[str, Any], classifier: ExportedClassifier, *, example: torch.Tensor,
               graphs: Path) -> tuple[Any, bool]:
    """classifier.onnx's ModelProto for `classifier` (float32 backbone): the cached backbone graph (exported
    into `graphs` when absent), the TTA views graph in front of it and the exported head tail after it, merged.
    example: float32 [B >= 2, 3, H, W] images to trace the tail's input shapes with. Returns (model, whether the
    backbone graph came from the cache)."""
    import onnx
    import onnx.compose

    layers = tuple(classifier.layers)
    key = backbone_graph_key(export, layers=layers, input_size=int(example.shape[-1]))
    path, cached = cached_backbone_graph(classifier.features, key=key, cache=graphs)
    backbone = onnx.load_model(str(path))
    opset = next(o for o in backbone.opset_import if o.domain in ("", "ai.onnx"))
    views = list(classifier.tta) or ["none"]
    with torch.inference_mode():
        features = classifier.features(torch.cat([example.flip(-1) if v == "hflip" else example for v in views]))
    tail = onnx.compose.add_prefix(_tail_model(classifier, features, len(views)), "tail/", rename_outputs=False)
    if views != ["none"]:
        backbone = onnx.compose.merge_models(_views_graph(views, opset, backbone.ir_version), backbone,
                                             io_map=[("views", "images")])
    return onnx.compose.merge_models(backbone, tail, io_map=[(layer, f"tail/tail.{layer}") for layer in layers],
                                     outputs=[ONNX_OUTPUT]), cached


def save_onnx(path: Path, export: dict[str, Any], *, images: torch.Tensor,
              graphs: Path | None = None) -> dict[str, Any]:
    """Write classifier.onnx for a classifier.pt dict, atomically, after checking it in ONNX Runtime.

    images: float32 [N, 3, H, W], preprocessed real images (read_sample_images) for the parity check
    (verify_onnx) against the torch classifier, backbone in float32. graphs: the backbone graph cache (default:
    `.graphs` beside `path`). Returns {"seconds" (export + check), "images", "max_difference",
    "backbone_graph_cached"}."""
    import onnx
    import onnxruntime

    start = time.perf_counter()
    path = Path(path)
    graphs = Path(graphs) if graphs is not None else path.parent / ".graphs"
    classifier = classifier_from_export({**export, "backbone": {**export["backbone"], "precision": "float32"}})
    example = images if len(images) >= 2 else images.repeat(2, 1, 1, 1)  # batch 1 would be specialized
    try:
        model, cached = build_onnx(export, classifier, example=example, graphs=graphs)
    except ExportError:
        raise
    except Exception as exc:  # noqa: BLE001 - torch.export / onnxscript / onnx.compose raise many kinds
        raise ExportError(f"{path}: the ONNX export failed for {classifier.name}: {exc}") from exc
    onnx.helper.set_model_props(model, onnx_metadata(export))
    model.doc_string = (f"{classifier.name} classifier over {len(classifier.classes)} classes: "
                        f"{ONNX_INPUT} float32 [N, 3, H, W] -> {ONNX_OUTPUT} float64 [N, K] (stages/export.py)")
    with atomic_path(path) as tmp:
        onnx.save_model(model, str(tmp))
        session = onnxruntime.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        largest = verify_onnx(session, classifier, images)
    seconds = time.perf_counter() - start
    logger.info("wrote %s in %.1f s (backbone graph %s); ONNX Runtime matches torch on %d held-out images "
                "(largest probability difference %.2g)", path, seconds, "cached" if cached else "exported",
                len(images), largest)
    precision = export["backbone"].get("precision") or "float32"
    if precision != "float32":
        logger.info("%s runs its backbone in float32; %s runs it under %s autocast, as extract did", path.name,
                    path.with_suffix(".pt").name, precision)
    return {"seconds": seconds, "images": int(len(images)), "max_difference": largest,
            "backbone_graph_cached": cached}


class OnnxClassifier:
    """classifier.onnx in ONNX Runtime, used as predict uses an ExportedClassifier: images [B, 3, H, W] ->
    probabilities [B, K] (float64 tensor); `classes`, `preprocess`, `name` come from the model's metadata."""

    def __init__(self, session: Any, metadata: dict[str, str], path: Path) -> None:
        self.session = session
        self.path = path
        version = metadata.get("format_version")
        if version not in {str(v) for v in READABLE_VERSIONS}:
            raise ExportError(f"format_version is {version!r}, this code reads {READABLE_VERSIONS}; "
                              f"re-run the head stage (`dvc repro head`) to export again")
        try:
            self.name = metadata["backbone"]
            self.classes = [str(c) for c in json.loads(metadata["classes"])]
            self.preprocess = preprocess_from(json.loads(metadata["preprocess"]))
        except (KeyError, json.JSONDecodeError, TypeError) as exc:
            raise ExportError(f"its metadata_props lack or garble {exc}; write it with stages/export.py "
                              f"(`dvc repro head`)") from None

    def to(self, device: torch.device) -> OnnxClassifier:
        return self  # the session's providers decide where it runs

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        images = images.detach().cpu().float().contiguous().numpy()
        return torch.from_numpy(np.asarray(self.session.run([ONNX_OUTPUT], {ONNX_INPUT: images})[0]))


def load_onnx(path: str | Path, *, providers: Sequence[str] = ("CPUExecutionProvider",)) -> OnnxClassifier:
    """classifier.onnx (or the one beside a classifier.pt) as an OnnxClassifier in ONNX Runtime."""
    import onnxruntime

    path = onnx_path_for(path)
    if not path.is_file():
        stage = (f"finetune@{path.parent.name}" if path.parent.parent.name == "finetune"
                 else f"head@{path.parent.name}")
        raise ExportError(f"{path} does not exist; run `dvc repro {stage}` to export it (ONNX Runtime runs "
                          f"classifier.onnx, written beside classifier.pt)")
    try:
        session = onnxruntime.InferenceSession(str(path), providers=list(providers))
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own Fail/InvalidProtobuf types
        raise ExportError(f"{path}: ONNX Runtime cannot load it: {exc}") from None
    try:
        return OnnxClassifier(session, dict(session.get_modelmeta().custom_metadata_map), path)
    except ExportError as exc:
        raise ExportError(f"{path}: {exc}") from None
