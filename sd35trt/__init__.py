"""sd35trt: Stable Diffusion 3.5 → validated ONNX → FP8/FP16 TensorRT engines, with manifests and comparisons.

Layers, each importing only those below it (tests/test_layers.py reads the imports): ``core`` (errors, artifacts
and typed manifests, specs, targets, model sources, numerics, host facts) ← ``producers`` (calibrate, export,
parts, builder, build, refit) and ``runtime`` (engine session, runners, pipeline, VRAM plans, timing) ← ``checks``
(compare, selftest, doctor) ← ``cli`` (the only place typer is used). Heavy dependencies (torch, diffusers,
ModelOpt, onnxruntime, TensorRT) are imported inside the functions that need them.
"""

__version__ = "0.1.0"
