"""The OpenVINO engine: the exported graph (stages/engines/graph.py) compiled by OpenVINO for the CPU.

The precision is the candidate's, set as INFERENCE_PRECISION_HINT ("f32" or "bf16") and read back from the
compiled model. bf16 is built only where the CPU runs it natively (avx512_bf16/amx_bf16, stages/hardware.py):
elsewhere OpenVINO either silently compiles f32 (AVX2: float32 rows under a bfloat16 label) or emulates bf16
(AVX-512 without bf16: slow, and rows torch's bf16 path would not give), so the engine refuses to build.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import openvino
import torch

from stages.engines import Candidate
from stages.hardware import read_cpu_capability

HINTS = {"float32": "f32", "bfloat16": "bf16"}
TYPES = {"float32": openvino.Type.f32, "bfloat16": openvino.Type.bf16}


class OpenVinoEngine:
    def __init__(self, graph: Path, layers: tuple[str, ...], candidate: Candidate, *, threads: int) -> None:
        if candidate.engine != "openvino" or candidate.precision not in HINTS or candidate.device != "cpu":
            raise ValueError(f"OpenVINO runs float32 or bfloat16 on the CPU here; got {candidate.name}")
        if candidate.precision == "bfloat16" and not read_cpu_capability()["native_bfloat16"]:
            raise ValueError(f"{candidate.name}: this CPU has no native bf16 (avx512_bf16/amx_bf16); OpenVINO would "
                             f"compile f32 or emulate bf16 instead")
        core = openvino.Core()
        config = {"INFERENCE_PRECISION_HINT": HINTS[candidate.precision], "PERFORMANCE_HINT": "LATENCY",
                  "INFERENCE_NUM_THREADS": threads}
        self.compiled = core.compile_model(core.read_model(str(graph)), "CPU", config)
        actual = self.compiled.get_property("INFERENCE_PRECISION_HINT")
        if actual != TYPES[candidate.precision]:
            raise ValueError(f"OpenVINO compiled {graph} at {actual}, not {TYPES[candidate.precision]}: this CPU "
                             f"cannot run it natively")
        self.request = self.compiled.create_infer_request()
        self.candidate, self.layers = candidate, layers
        self.outputs = [self.compiled.output(i) for i in range(len(layers))]
        names = [o.get_any_name() for o in self.outputs]
        if names != list(layers):
            raise ValueError(f"{graph}: outputs {names}, expected the layers {list(layers)}")

    def __call__(self, images: torch.Tensor) -> dict[str, np.ndarray]:
        array = np.ascontiguousarray(images.detach().cpu().numpy(), dtype=np.float32)
        result = self.request.infer({0: array})
        return {layer: np.array(result[output], dtype=np.float32) for layer, output in zip(self.layers, self.outputs)}
