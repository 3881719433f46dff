"""EngineSession's CUDA paths on a real GPU (marked gpu; skipped without one): stream ordering with the caller both
ways, buffers reused across steps, a CUDA graph captured after a warm run and replayed with new inputs, and the
shared activation block growing and rebinding. The backend here is a small torch module behind the Adapter
protocol — not TensorRT, which cannot run on the machines of this project — so what is tested is the session's
own code, which the TensorRT adapter plugs into unchanged."""

from __future__ import annotations

import pytest
import torch

from sd35trt.runtime.session import EngineSession, SharedDeviceMemory, TensorInfo

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


class TorchModuleAdapter:
    """x -> gelu(x @ W) into the bound output buffer, on the stream the session hands it."""

    device = "cuda"

    def __init__(self, width: int, scratch: int, graph_mode: str = "off"):
        self.graph_mode = graph_mode
        self.weight = torch.randn(width, width, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
        self.scratch, self.blocks, self.bound = scratch, [], {}

    def tensors(self):
        return [TensorInfo("x", True, "float32"), TensorInfo("y", False, "float32")]

    def profile(self, name):
        return None

    def set_input_shape(self, name, shape):
        self.shape = shape
        return True

    def output_shape(self, name):
        return self.shape

    def run_unbound(self, inputs):
        raise AssertionError("shapes are known before a run")

    def bind(self, name, tensor):
        self.bound[name] = tensor

    def execute(self, stream):
        assert torch.cuda.current_stream() == stream, "executes on the session's own stream"
        torch.matmul(self.bound["x"], self.weight, out=self.bound["y"])
        torch.nn.functional.gelu(self.bound["y"], out=self.bound["y"])  # in place: no allocation

    def keep_compiled(self):
        return None

    def device_memory(self):
        return self.scratch

    def use_device_memory(self, pointer, size):
        self.blocks.append((pointer, size))

    def close(self):
        self.bound.clear()


def _reference(adapter, x):
    return torch.nn.functional.gelu(x @ adapter.weight)


def test_stream_ordering_both_ways_and_stable_buffers():
    adapter = TorchModuleAdapter(1024, 0)
    session = EngineSession("net", lambda: adapter, ["x"], ["y"], dtypes={"x": "float32", "y": "float32"})
    caller = torch.cuda.Stream()
    with torch.cuda.stream(caller):
        for step in range(5):
            x = torch.randn(64, 1024, device="cuda")
            for _ in range(20):  # keep the caller's stream busy: the session must wait for this write
                x = x * 1.0001
            y = session.run({"x": x})["y"]
            expected = _reference(adapter, x)  # on the caller's stream, after run(): must see the finished output
            assert torch.allclose(y, expected, atol=1e-3, rtol=1e-3), step
            if step == 0:
                ptr = y.data_ptr()
            assert y.data_ptr() == ptr
    torch.cuda.synchronize()
    assert session.stats.allocations == 1 and session.stats.runs == 5


def test_cuda_graph_is_captured_after_a_warm_run_and_replayed_with_new_inputs():
    adapter = TorchModuleAdapter(512, 0, graph_mode="capture")
    session = EngineSession("net", lambda: adapter, ["x"], ["y"], dtypes={"x": "float32", "y": "float32"})
    for step in range(4):
        x = torch.randn(32, 512, device="cuda")
        y = session.run({"x": x})["y"]
        assert torch.allclose(y, _reference(adapter, x), atol=1e-3, rtol=1e-3), step
    assert session.stats.captures == 1 and session.stats.replays == 2, session.stats
    session.run({"x": torch.randn(16, 512, device="cuda")})  # a new shape: plain run, the old graph dropped
    assert session.stats.replays == 2


def test_one_activation_block_grows_freeing_the_old_first_and_unload_returns_cached_memory():
    """The shared block is sized by the largest context and rebinds every session; growing frees the old block before
    allocating the new one (old and new at once is what a card that fits one lacks), and an unloaded session hands
    torch's cached blocks back (the next engine's own cudaMalloc finds the memory)."""
    torch.cuda.empty_cache()
    before = torch.cuda.memory_reserved()  # what earlier tests of this process still hold
    memory = SharedDeviceMemory()
    small, large = TorchModuleAdapter(256, 64 << 20), TorchModuleAdapter(256, 256 << 20)
    a = EngineSession("a", lambda: small, ["x"], ["y"], memory=memory).load()
    assert memory.size == 64 << 20 and small.blocks[-1][1] == 64 << 20
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    b = EngineSession("b", lambda: large, ["x"], ["y"], memory=memory).load()
    assert memory.size == 256 << 20, "sized by the largest context"
    assert small.blocks[-1] == large.blocks[-1] == (small.blocks[-1][0], 256 << 20), "both use the one block"
    assert torch.cuda.max_memory_allocated() - base < (256 + 32) << 20, "never the old and the new block at once"
    b.unload()
    a.unload()
    assert memory.size == 0
    assert torch.cuda.memory_reserved() - before < (64 << 20), "cached blocks handed back on unload"
