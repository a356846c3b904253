"""The ONNX Runtime engine: the exported graph (stages/engines/graph.py) on ONNX Runtime's CPU execution provider.

float32 only: ONNX Runtime's CPU kernels compute in float32, so its features match torch's eager float32 to
rounding (measured on efficientnet_lite0: max abs difference 2e-5; the extract stage checks every run).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime
import torch

from stages.engines import Candidate


class OnnxRuntimeEngine:
    def __init__(self, graph: Path, layers: tuple[str, ...], candidate: Candidate, *, threads: int) -> None:
        if candidate.engine != "onnxruntime" or candidate.precision != "float32" or candidate.device != "cpu":
            raise ValueError(f"ONNX Runtime runs float32 on the CPU here; got {candidate.name}")
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # errors only
        self.session = onnxruntime.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
        self.candidate, self.layers = candidate, layers
        names = [o.name for o in self.session.get_outputs()]
        if names != list(layers):
            raise ValueError(f"{graph}: outputs {names}, expected the layers {list(layers)}")

    def __call__(self, images: torch.Tensor) -> dict[str, np.ndarray]:
        array = np.ascontiguousarray(images.detach().cpu().numpy(), dtype=np.float32)
        outputs = self.session.run(None, {"images": array})
        return dict(zip(self.layers, outputs))
