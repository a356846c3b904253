"""The torch engine: the FeatureModel in eval mode under inference_mode, autocast at the candidate's precision."""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from stages.engines import Candidate
from stages.hardware import DTYPES
from stages.params import ParamError

LAYOUTS = ("contiguous", "channels_last")


def resolve_device(requested: str) -> str:
    """`extract.device` -> "cuda" or "cpu"; asking for CUDA without one fails clearly."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise ParamError("extract.device is 'cuda' but torch sees no CUDA device; "
                         "use `device: auto` or `device: cpu`.")
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


def fix_cuda_algorithms() -> None:
    """Fixed cuDNN algorithms and no TF32, so that a resumed run (or another engine) gives the same bytes."""
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.allow_tf32 = False  # float32 means float32
    torch.backends.cuda.matmul.allow_tf32 = False


def compile_model(model: nn.Module) -> Callable:
    """torch.compile for inference: inductor with weight freezing (constant-folds and prepacks weights)."""
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True
    return torch.compile(model, dynamic=False)


class TorchEngine:
    """`model` (a FeatureModel, frozen, eval mode) on the candidate's device, memory layout and precision.

    Several TorchEngines may share one model: each call puts the model in its own layout first (a no-op when it
    is already there). `compiled`: the model after torch.compile (candidate.compile)."""

    def __init__(self, model: nn.Module, candidate: Candidate, *, compiled: Callable | None = None) -> None:
        if candidate.engine != "torch" or candidate.layout not in LAYOUTS:
            raise ValueError(f"not a torch candidate: {candidate.name}")
        self.model, self.candidate, self.compiled = model, candidate, compiled
        self.memory_format = torch.channels_last if candidate.layout == "channels_last" else torch.contiguous_format

    def place(self) -> None:
        """Move the model to this engine's device and memory format (in place)."""
        self.model.to(device=self.candidate.device, memory_format=self.memory_format)

    def __call__(self, images: torch.Tensor) -> dict[str, np.ndarray]:
        if self.compiled is None:
            self.place()
        batch = images.to(self.candidate.device, non_blocking=True).contiguous(memory_format=self.memory_format)
        precision = self.candidate.precision
        with torch.inference_mode(), torch.autocast(self.candidate.device, dtype=DTYPES[precision],
                                                    enabled=precision != "float32"):
            out = (self.model if self.compiled is None else self.compiled)(batch)
        return {layer: value.float().cpu().numpy() for layer, value in out.items()}
