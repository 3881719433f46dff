"""The producers: calibrate, export (FP16/FP8/4-bit ONNX), parts, the TensorRT builder (trt_builder) and the bundle step."""

import warnings

# ModelOpt 0.47 warns on every import that transformers >= 5.15 is untested and advises
# `pip install -U nvidia-modelopt[hf]`, whose extra pins transformers < 5.15: following it would break the pinned
# stack this project tests (transformers 5.17 in requirements.lock). Silenced here, where ModelOpt is used.
warnings.filterwarnings("ignore", message=r"transformers \S+ is not tested with current version of modelopt")
