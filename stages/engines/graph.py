"""The backbone's feature model exported once to ONNX, for the graph engines (ONNX Runtime, OpenVINO).

One graph per (weights sha256, layers, input size, torch/onnx versions), cached as
`<cache>/<backbone>-<key hash>.onnx` with the key beside it (`.json`): later runs, and every engine, load the
same file instead of exporting again. The graph has input "images" float32 [N, 3, H, W] (N dynamic) and one
output per stored layer, named after it, float32 [N, D], from one forward pass (stages.backbones.FeatureModel).
Exported with `torch.onnx.export(..., dynamo=True)`.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stages.backbones import module_version
from stages.io import atomic_path, quiet_onnx_export, write_json

logger = logging.getLogger(__name__)

OPSET = 18


class LayerTuple(nn.Module):
    """FeatureModel's {layer: [B, D]} as a tuple in `layers` order (ONNX outputs are positional)."""

    def __init__(self, model: nn.Module, layers: tuple[str, ...]) -> None:
        super().__init__()
        self.model, self.layers = model, layers

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model(images)
        return tuple(out[layer] for layer in self.layers)


def graph_key(*, backbone: str, weights_sha256: str, layers: tuple[str, ...], input_size: int) -> dict[str, Any]:
    """What the exported graph depends on: a change of any value means another file."""
    return {"backbone": backbone, "weights_sha256": weights_sha256, "layers": list(layers), "input_size": input_size,
            "opset": OPSET, "versions": {name: module_version(name) for name in ("torch", "timm", "onnx", "onnxscript")}}


def graph_path(cache: Path, key: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(cache) / f"{key['backbone']}-{digest}.onnx"


def export_graph(model: nn.Module, *, key: dict[str, Any], cache: Path) -> tuple[Path, dict[str, Any]]:
    """The cached graph for `key`, exporting `model` (a frozen FeatureModel on the CPU, eval mode, float32,
    contiguous) when absent. Returns (path, {"cached": bool, "export_seconds": float})."""
    path = graph_path(cache, key)
    if path.is_file() and path.with_suffix(".json").is_file():
        return path, {"cached": True, "export_seconds": 0.0, "path": str(path)}
    start = time.perf_counter()
    layers = tuple(key["layers"])
    size = key["input_size"]
    wrapper = LayerTuple(model.to("cpu", memory_format=torch.contiguous_format), layers).eval()
    example = torch.zeros(2, 3, size, size)
    batch = torch.export.Dim("batch", min=1, max=65536)
    path.parent.mkdir(parents=True, exist_ok=True)
    with quiet_onnx_export():
        program = torch.onnx.export(wrapper, (example,), dynamo=True, input_names=["images"],
                                    output_names=list(layers), dynamic_shapes=({0: batch},), opset_version=OPSET,
                                    external_data=False, verbose=False)
    with atomic_path(path, suffix=".onnx") as tmp:
        program.save(str(tmp))
    write_json(path.with_suffix(".json"), key)
    seconds = time.perf_counter() - start
    logger.info("exported %s to ONNX in %.1f s: %s", key["backbone"], seconds, path)
    return path, {"cached": False, "export_seconds": round(seconds, 2), "path": str(path)}
