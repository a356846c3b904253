"""Compute engines of the extract stage: small plug-ins that turn a batch of preprocessed images into features.

Every engine is a callable `engine(images) -> {layer: float32 [B, D]}` for images float32 [B, 3, H, W]
(normalized, as stages.images.eval_transform makes them) with a `candidate` saying what it is:

    torch         the FeatureModel in eager mode (contiguous or channels_last memory, autocast at the
                  precision), optionally torch.compile'd                              (stages/engines/torch.py)
    onnxruntime   the model exported once to ONNX (stages/engines/graph.py), run by ONNX Runtime's CPU
                  execution provider; float32 only                              (stages/engines/onnxruntime.py)
    openvino      the same ONNX graph compiled by OpenVINO for the CPU at f32, or bf16 where the CPU has
                  native bf16                                                     (stages/engines/openvino.py)

`stages/engines/choose.py` decides which one runs: the precision from params or hardware capability alone,
then the fastest measured engine at that precision whose features match eager float32 (`run_views` adds
test-time views and padding the same way for every engine).
"""
from stages.engines.base import ENGINES, Candidate, Engine, run_views

__all__ = ["ENGINES", "Candidate", "Engine", "run_views"]
