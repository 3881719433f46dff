"""onnxruntime under ``EngineSession``: an IOBinding over the session's own preallocated torch buffers.

The same session lifecycle, buffers and chaining as TensorRT engines, with onnxruntime executing: how CI runs
the engine session without a GPU, and how ``generate --onnx`` runs on a GPU host with onnxruntime-gpu.
onnxruntime accepts any shape, so the exported optimisation profile (what engines will be built with) is
enforced here too: a call an engine would refuse fails here first.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sd35trt.runtime.session import TensorInfo, profile_problem

# onnxruntime's type strings → torch dtype names
ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(bfloat16)": "bfloat16",
             "tensor(int32)": "int32", "tensor(int64)": "int64", "tensor(bool)": "bool"}


class OrtAdapter:
    graph_mode = "off"

    def __init__(self, onnx_path: Path, provider: str = "cpu", profile: Mapping[str, Sequence[Sequence[int]]] | None = None):
        import numpy as np

        from sd35trt.core.onnx_utils import ort_session, session_provider

        self.path = onnx_path
        self.session = ort_session(onnx_path, provider=provider)
        self.provider = session_provider(self.session)
        self.device = "cuda" if self.provider == "cuda" else "cpu"
        self.binding = self.session.io_binding()
        self._inputs = {i.name for i in self.session.get_inputs()}
        self._profile = {k: [tuple(s) for s in v] for k, v in (profile or {}).items()}
        self._np = np

    def tensors(self) -> list[TensorInfo]:
        return [TensorInfo(t.name, True, ORT_TYPES.get(t.type, t.type)) for t in self.session.get_inputs()] + \
               [TensorInfo(t.name, False, ORT_TYPES.get(t.type, t.type)) for t in self.session.get_outputs()]

    def profile(self, name: str) -> list[tuple[int, ...]] | None:
        return self._profile.get(name)

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        profile = self._profile.get(name)
        return profile is None or profile_problem(name, shape, profile) is None

    def output_shape(self, name: str) -> tuple[int, ...] | None:
        return None

    def run_unbound(self, inputs: dict[str, Any]) -> dict[str, Any]:
        import torch

        names = [o.name for o in self.session.get_outputs()]
        outs = self.session.run(names, {k: v.detach().cpu().numpy() for k, v in inputs.items()})
        return {n: torch.from_numpy(o) for n, o in zip(names, outs)}

    def bind(self, name: str, tensor: Any) -> None:
        dtype = self._np.dtype(str(tensor.dtype).removeprefix("torch."))
        device = tensor.device.type
        index = tensor.device.index or 0
        if name in self._inputs:
            self.binding.bind_input(name, device, index, dtype, tuple(tensor.shape), tensor.data_ptr())
        else:
            self.binding.bind_output(name, device, index, dtype, tuple(tensor.shape), tensor.data_ptr())

    def execute(self, stream: Any) -> None:
        if stream is not None:  # onnxruntime's CUDA provider runs on its own stream: hand over explicitly
            stream.synchronize()
        self.session.run_with_iobinding(self.binding)

    def keep_compiled(self) -> None:
        return None  # nothing compiled to keep

    def device_memory(self) -> int:
        return 0  # onnxruntime's arena manages its own

    def use_device_memory(self, pointer: int, size: int) -> None:
        raise NotImplementedError("onnxruntime manages its own device memory")

    def close(self) -> None:
        self.binding.clear_binding_inputs()
        self.binding.clear_binding_outputs()
        del self.binding, self.session
