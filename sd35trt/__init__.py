"""sd35trt: Stable Diffusion 3.5 → validated ONNX → FP8/FP16 TensorRT engines, with manifests and comparisons.

The package is a library; the command line lives in ``sd35trt.cli``. Heavy dependencies (torch, diffusers,
ModelOpt, onnxruntime, TensorRT) are imported inside the functions that need them.
"""

__version__ = "0.1.0"
