"""The engine interface: what a candidate is, and how test-time views run through any engine.

(Kept out of the package's __init__: importing the submodule stages.engines.torch rebinds the package attribute
`torch`, which would shadow the torch library in __init__'s own namespace.)
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

ENGINES = ("torch", "onnxruntime", "openvino")


@dataclass(frozen=True)
class Candidate:
    """One way to compute the features: engine, device, precision, memory layout, torch.compile."""
    engine: str  # one of ENGINES
    device: str  # "cpu" | "cuda"
    precision: str  # "float32" | "bfloat16" | "float16"
    layout: str = "contiguous"  # torch: "contiguous" | "channels_last"; graph engines: "graph"
    compile: bool = False

    @property
    def name(self) -> str:
        parts = [self.engine, self.device, self.precision, self.layout]
        return "+".join(parts + (["compile"] if self.compile else []))

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Engine(Protocol):
    candidate: Candidate

    def __call__(self, images: torch.Tensor) -> dict[str, np.ndarray]:
        """images float32 [B, 3, H, W] -> {layer: float32 [B, D]}."""


def run_views(engine: Callable[[torch.Tensor], dict[str, np.ndarray]], images: torch.Tensor, *,
              views: Sequence[str], pad_to: int | None = None) -> dict[str, np.ndarray]:
    """Run `images` [B, 3, H, W] through `engine` once per test-time view ("none", "hflip": mirrored width).

    Returns {layer: float32 [B, V, D]}. `pad_to`: zero-pad the batch to this many images (rows are independent
    in eval mode), so that a compiled model sees one shape and never recompiles for the last, smaller batch.
    """
    n = images.shape[0]
    if pad_to and n < pad_to:
        images = torch.cat([images, images.new_zeros((pad_to - n, *images.shape[1:]))])
    per_view = []
    for view in views:
        out = engine(images.flip(3) if view == "hflip" else images)
        per_view.append({layer: np.asarray(value[:n], dtype=np.float32) for layer, value in out.items()})
    return {layer: np.stack([v[layer] for v in per_view], axis=1) for layer in per_view[0]}
