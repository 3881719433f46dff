"""One engine session per compiled network, whatever executes it.

``EngineSession`` owns what TensorRT's demo and polygraphy's ``TrtRunner`` own for an engine — its own stream
ordered with the caller's both ways, I/O checked against what the caller expects when it loads, buffers
allocated once per shape and reused (stable addresses, nothing allocated per step), the activation memory
shared with the other engines of a bundle, a CUDA graph captured only after a warm run — and leaves the
calls that differ to a small ``Adapter``: ``sd35trt.runtime.trt`` for TensorRT / TensorRT-RTX engines
(the only module that touches TensorRT) and ``sd35trt.runtime.onnxrt`` for onnxruntime's IOBinding, which is
how CI drives this very code without a GPU.

Outputs are the session's own buffers: valid until the session's next ``run``, as with TensorRT's demo.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from sd35trt.core import log
from sd35trt.core.errors import ArtifactError, InvalidInputError

# Torch dtype names an engine's I/O may have (every type an SD3.5 engine or one of its parts uses).
IO_DTYPES = ("float32", "float16", "bfloat16", "int32", "int64", "bool")


@dataclass(frozen=True)
class TensorInfo:
    """One I/O tensor of a compiled network as its runtime reports it."""

    name: str
    is_input: bool
    dtype: str  # a torch dtype name from IO_DTYPES


class Adapter(Protocol):
    """What an execution backend does for ``EngineSession``: one loaded network and its execution context."""

    device: str  # "cuda" or "cpu": where its buffers live
    graph_mode: str  # "off" | "runtime" (the backend captures graphs itself) | "capture" (we capture)

    def tensors(self) -> list[TensorInfo]: ...

    def profile(self, name: str) -> list[tuple[int, ...]] | None: ...  # [min, opt, max], None: any shape

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool: ...

    def output_shape(self, name: str) -> tuple[int, ...] | None: ...  # None: known after a run only

    def run_unbound(self, inputs: dict[str, Any]) -> dict[str, Any]: ...  # outputs it allocates (first call)

    def bind(self, name: str, tensor: Any) -> None: ...

    def execute(self, stream: Any) -> None: ...

    def keep_compiled(self) -> None: ...  # persist what the backend compiled for a new shape (TensorRT-RTX)

    def device_memory(self) -> int: ...  # activation memory the context needs (0: managed by the backend)

    def use_device_memory(self, pointer: int, size: int) -> None: ...

    def close(self) -> None: ...


def profile_problem(tensor: str, shape: tuple[int, ...], profile: Sequence[Sequence[int]]) -> str | None:
    """Why ``shape`` is outside an input's optimisation profile ``[min, opt, max]`` (None when inside)."""
    low, high = tuple(profile[0]), tuple(profile[-1])
    if len(shape) != len(low) or any(s < a or s > b for s, a, b in zip(shape, low, high)):
        return f"input {tensor} shape {tuple(shape)} is outside the engine's profile {low}..{high}"
    return None


def graph_action(graph_key: tuple | None, key: tuple, has_graph: bool) -> str:
    """CUDA-graph policy per call in ``capture`` mode: ``run`` (first call at a shape, or a new shape: plain
    execution, warming the engine; a graph of another shape is dropped), ``capture`` (second call at the same
    shape: executed, then captured), ``replay`` (later calls at that shape)."""
    if key != graph_key:
        return "run"
    return "replay" if has_graph else "capture"


class SharedDeviceMemory:
    """One activation block for every engine of a bundle: engines run one after another, so the block is
    sized by the largest context and handed to each (TensorRT's ``USER_MANAGED`` allocation). Growing it
    rebinds every session that uses it (between executions)."""

    def __init__(self):
        self.size = 0
        self._block: Any = None
        self._users: list[EngineSession] = []

    def attach(self, session: EngineSession, needed: int) -> None:
        if session not in self._users:
            self._users.append(session)
        if needed > self.size:
            import torch

            for user in self._users:  # nothing may still run on the old block
                user.synchronize()
            # the old block goes back first: old and new at once is what a card that fits one of them lacks
            self._block, self.size = None, 0
            torch.cuda.empty_cache()
            self._block = torch.empty(needed, dtype=torch.uint8, device="cuda")
            self.size = needed
            log.info(f"  shared activation memory: {needed / 2**30:.2f} GiB")
        for user in self._users:
            user._use_block(self._block.data_ptr(), self.size)

    def detach(self, session: EngineSession) -> None:
        if session in self._users:
            self._users.remove(session)
        if not self._users:
            self._block, self.size = None, 0


@dataclass
class _Buffers:
    inputs: dict[str, Any]
    outputs: dict[str, Any]


@dataclass
class SessionStats:
    """Counted by ``EngineSession`` (the tests read them): allocations happen once per shape, never per run."""

    runs: int = 0
    allocations: int = 0
    binds: int = 0
    captures: int = 0
    replays: int = 0
    shapes: list[tuple] = field(default_factory=list)


class EngineSession:
    """A compiled network behind ``open_adapter``, loaded on ``load()`` and released on ``unload()``.

    ``inputs``/``outputs`` are the names the caller uses, ``dtypes`` what it expects each to be (None for a
    name whose dtype is the engine's own business, e.g. a tensor carried between parts); both are checked
    against the engine when it loads. ``keep_shapes`` buffer sets are kept (most recent first)."""

    def __init__(self, name: str, open_adapter: Callable[[], Adapter], inputs: Sequence[str], outputs: Sequence[str],
                 *, dtypes: Mapping[str, str | None] | None = None, memory: SharedDeviceMemory | None = None,
                 keep_shapes: int = 2, where: Any = None, device: str = "cuda"):
        self.name, self.inputs, self.outputs = name, tuple(inputs), tuple(outputs)
        self.expected = dict(dtypes or {})
        self._open, self._memory, self._keep, self._where = open_adapter, memory, keep_shapes, where
        self._device = device  # where the adapter will put its buffers (known before it loads)
        self.adapter: Adapter | None = None
        self.dtypes: dict[str, str] = {}
        self.stats = SessionStats()
        self._buffers: OrderedDict[tuple, _Buffers] = OrderedDict()
        self._bound: tuple | None = None
        self._stream: Any = None
        self._graph: Any = None
        self._graph_key: tuple | None = None

    # -- lifecycle -----------------------------------------------------------------------------------------

    @property
    def loaded(self) -> bool:
        return self.adapter is not None

    @property
    def device(self) -> str:
        return self.adapter.device if self.adapter is not None else self._device

    def load(self) -> EngineSession:
        if self.adapter is not None:
            return self
        adapter = self._open()
        try:
            self.dtypes = self._check_io(adapter.tensors())
        except BaseException:
            adapter.close()
            raise
        self.adapter = adapter
        if adapter.device == "cuda":
            import torch

            self._stream = torch.cuda.Stream()  # never the legacy default stream: ordering is explicit
        if self._memory is not None and adapter.device_memory() > 0:
            self._memory.attach(self, adapter.device_memory())
        return self

    def unload(self) -> None:
        if self.adapter is None:
            return
        self.synchronize()
        if self._memory is not None:
            self._memory.detach(self)
        self._buffers.clear()
        self._bound, self._graph, self._graph_key = None, None, None
        self.adapter.close()
        device, self.adapter, self._stream = self.adapter.device, None, None
        if device == "cuda":  # torch's cached blocks go back, so the next engine's own allocation finds the memory
            import torch

            torch.cuda.empty_cache()

    def synchronize(self) -> None:
        if self._stream is not None:
            self._stream.synchronize()

    def _use_block(self, pointer: int, size: int) -> None:
        assert self.adapter is not None
        self.adapter.use_device_memory(pointer, size)
        self._graph, self._graph_key = None, None  # a captured graph holds the old block's addresses

    def _check_io(self, tensors: list[TensorInfo]) -> dict[str, str]:
        """The engine's I/O against what the caller expects: one line naming what differs."""
        have_in = [t.name for t in tensors if t.is_input]
        have_out = [t.name for t in tensors if not t.is_input]
        problems = []
        if sorted(have_in) != sorted(self.inputs):
            problems.append(f"inputs {have_in}, expected {list(self.inputs)}")
        if not set(self.outputs) <= set(have_out):
            problems.append(f"outputs {have_out}, expected {list(self.outputs)}")
        found = {t.name: t.dtype for t in tensors}
        for name, dtype in found.items():
            want = self.expected.get(name)
            if dtype not in IO_DTYPES:
                problems.append(f"{name} is {dtype}, which sd35trt cannot feed")
            elif want is not None and dtype != want:
                problems.append(f"{name} is {dtype}, expected {want}")
        if problems:
            raise ArtifactError(f"{self.name} engine does not match its component: {'; '.join(problems)}",
                                path=self._where, hint="rebuild the bundle from this sd35trt's ONNX (sd35trt build --force)")
        return found

    # -- running -------------------------------------------------------------------------------------------

    def run(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """Copy ``inputs`` into this shape's buffers, execute on the session's stream (after the caller's
        pending work; the caller's stream then waits for it) and return the output buffers."""
        import torch

        adapter = self.load().adapter
        assert adapter is not None
        key = tuple(tuple(inputs[n].shape) for n in self.inputs)
        self.stats.runs += 1
        caller = torch.cuda.current_stream() if self._stream is not None else None
        with torch.cuda.stream(self._stream) if self._stream is not None else contextlib.nullcontext():
            if self._stream is not None:
                self._stream.wait_stream(caller)
            new_shape = key not in self._buffers
            buffers, done = self._buffers_for(key, inputs)
            if not done:
                for name in self.inputs:
                    buffers.inputs[name].copy_(inputs[name], non_blocking=True)
                self._execute(adapter, key)
            if new_shape:  # the backend compiled for this shape: keep it for the next process
                adapter.keep_compiled()
        if caller is not None:
            caller.wait_stream(self._stream)
        return dict(buffers.outputs)

    def _execute(self, adapter: Adapter, key: tuple) -> None:
        action = graph_action(self._graph_key, key, self._graph is not None) if adapter.graph_mode == "capture" else "run"
        if action == "replay":
            self._graph.replay()
            self.stats.replays += 1
            return
        if action == "run":
            self._graph, self._graph_key = None, key
        adapter.execute(self._stream)
        if action == "capture":
            self._capture(adapter)

    def _buffers_for(self, key: tuple, inputs: dict[str, Any]) -> tuple[_Buffers, bool]:
        """This shape's buffers, allocated on its first call and bound whenever the shape changes; ``True``
        when that first call already computed the outputs (a backend that knows output shapes only after a
        run: onnxruntime)."""
        adapter = self.adapter
        assert adapter is not None
        found = self._buffers.get(key)
        if found is not None:
            self._buffers.move_to_end(key)
            if self._bound != key:
                self._set_shapes(key)
                self._bind(key, found)
            return found, False
        import torch

        self._set_shapes(key)
        device = adapter.device
        ins = {n: torch.empty(s, dtype=getattr(torch, self.dtypes[n]), device=device) for n, s in zip(self.inputs, key)}
        shapes = {n: adapter.output_shape(n) for n in self.outputs}
        done = any(s is None for s in shapes.values())
        if done:
            for name in self.inputs:
                ins[name].copy_(inputs[name])
            first = adapter.run_unbound(ins)
            outs = {n: first[n].to(device=device, dtype=getattr(torch, self.dtypes[n])).clone() for n in self.outputs}
        else:
            outs = {n: torch.empty(shape, dtype=getattr(torch, self.dtypes[n]), device=device)
                    for n, shape in shapes.items() if shape is not None}
        self.stats.allocations += 1
        self.stats.shapes.append(key)
        buffers = _Buffers(ins, outs)
        self._buffers[key] = buffers
        while len(self._buffers) > self._keep:
            old, _ = self._buffers.popitem(last=False)
            if old == self._graph_key:
                self._graph, self._graph_key = None, None
        self._bind(key, buffers)
        return buffers, done

    def _set_shapes(self, key: tuple) -> None:
        adapter = self.adapter
        assert adapter is not None
        for name, shape in zip(self.inputs, key):
            if not adapter.set_input_shape(name, shape):
                profile = adapter.profile(name)
                why = (profile_problem(name, shape, profile) if profile else None) or f"input {name} shape {shape} was refused"
                raise InvalidInputError(f"{self.name} engine: {why}",
                                        hint="request a size inside the bundle's shape ranges (see its manifest)")

    def _bind(self, key: tuple, buffers: _Buffers) -> None:
        adapter = self.adapter
        assert adapter is not None
        for name, tensor in (*buffers.inputs.items(), *buffers.outputs.items()):
            adapter.bind(name, tensor)
        self._bound = key
        self.stats.binds += 1

    def _capture(self, adapter: Adapter) -> None:
        """Capture one execution on the session's stream; any failure means plain execution from now on."""
        import torch

        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=self._stream):
                adapter.execute(self._stream)
            self._graph = graph
            self.stats.captures += 1
        except Exception as exc:  # noqa: BLE001 - a failed capture means "no graphs here", not a failed run
            log.warn(f"{self.name}: CUDA graph capture failed ({str(exc)[:120]}); running without CUDA graphs")
            adapter.graph_mode, self._graph = "off", None

