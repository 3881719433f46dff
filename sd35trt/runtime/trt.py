"""TensorRT / TensorRT-RTX under ``EngineSession``: the only runtime module that calls TensorRT.

Written against the TensorRT 11.4 and TensorRT-RTX 1.7 Python APIs (``make lint`` type-checks it against both
stubs in ``typings/``). No machine here can execute an engine (CI has no GPU; TensorRT-RTX refuses the GPU
machine's compute capability 9.0; full TensorRT is not installable), so everything around these calls is
backend-independent and runs in CI through ``sd35trt.runtime.onnxrt``.

* one ``Logger`` and ``Runtime`` per backend module for the whole process;
* plans are memory-mapped, never copied into Python bytes (``deserialize_cuda_engine`` takes a buffer);
* contexts are ``USER_MANAGED``: ``EngineSession`` hands them the bundle's one shared activation block;
* TensorRT-RTX's runtime cache (its JIT-compiled kernels) is read from and written back beside the plan;
* a weight-streaming budget for engines built with ``build --weight-streaming``;
* execution failures raise ``EngineExecutionError`` (a failure inside TensorRT: exit 1, traceback kept).
"""

from __future__ import annotations

import mmap
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sd35trt.core import log, trt_api
from sd35trt.core.errors import ArtifactError, RuntimeUnavailableError
from sd35trt.core.trt_api import CHECK_RTX
from sd35trt.runtime.session import IO_DTYPES, TensorInfo

# TensorRT ``DataType`` member name → torch dtype name
TRT_TYPES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT32": "int32", "INT64": "int64", "BOOL": "bool"}


class EngineExecutionError(RuntimeError):
    """TensorRT refused or failed an execution: a failure inside the library, reported with its traceback."""


if TYPE_CHECKING:  # `make lint` checks this file against TensorRT 11.4's and TensorRT-RTX 1.7's API (typings/)
    from sd35trt.core.trt_api import trt


@cache
def process_runtime(module_name: str) -> tuple[Any, Any]:
    """The process's one (logger, runtime) for a backend module; the logger keeps the last errors it saw."""
    if not TYPE_CHECKING:  # the backend's own module at run time; mypy reads the stubs' ``trt`` above
        trt = trt_api.load(module_name)
    logger = trt_api.make_logger(trt, module_name, forward_warnings=True)
    return logger, trt.Runtime(logger)


def runtime_words(module_name: str) -> str:
    """The backend's own last error message (its compute-capability refusal, say), for one error line."""
    logger, _ = process_runtime(module_name)
    return " | ".join(logger.errors[-2:]) or "no message from the runtime"


def graph_mode(backend: str, requested: bool) -> str:
    """How an engine uses CUDA graphs: ``off`` unless asked (``--cuda-graph``); TensorRT-RTX then uses its runtime's
    own ``cuda_graph_strategy`` (a manual capture would freeze its dynamic-shape fallback kernels); TensorRT gets
    ``EngineSession``'s capture after a warm run."""
    if not requested:
        return "off"
    return "runtime" if backend == "tensorrt-rtx" else "capture"


class TensorRTAdapter:
    """One deserialized engine and its execution context."""

    device = "cuda"

    def __init__(self, plan_path: Path, module_name: str, backend: str, *, sha256: str, size: int,
                 host_code: bool = False, cuda_graph: bool = False, runtime_cache: Path | None = None,
                 streaming_budget: int | None = None):
        from sd35trt.core.artifacts import check_mapped

        if not TYPE_CHECKING:  # as in process_runtime
            trt = trt_api.load(module_name)
        self.path, self.module_name, self.backend = plan_path, module_name, backend
        self._trt = trt
        runtime: trt.Runtime = process_runtime(module_name)[1]
        with open(plan_path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            # the bytes TensorRT deserializes are the bytes whose sha256 is checked against the manifest
            self.checked = check_mapped(plan_path, mapped, sha256, size)
            # A version-compatible plan carries the runtime's own code (the lean runtime runs it): TensorRT refuses it
            # unless host code is allowed, which sd35trt does only for such a plan, after the check above.
            runtime.engine_host_code_allowed = host_code
            try:
                engine: trt.ICudaEngine | None = runtime.deserialize_cuda_engine(mapped)
            finally:
                runtime.engine_host_code_allowed = False
        if engine is None:
            raise ArtifactError(f"{backend} cannot load this engine: {runtime_words(module_name)}", path=plan_path,
                                hint="run `sd35trt doctor` on this bundle; rebuild it for this GPU and runtime")
        self.engine: trt.ICudaEngine = engine
        if streaming_budget is not None:
            if self.engine.streamable_weights_size == 0:
                raise RuntimeUnavailableError("this engine was not built for weight streaming", path=plan_path,
                                              hint="rebuild with `sd35trt build --weight-streaming`, or choose another --vram plan")
            self.engine.weight_streaming_budget_v2 = streaming_budget
        # TensorRT-RTX: its own CUDA-graph strategy (a manual capture would freeze its dynamic-shape fallback
        # kernels); TensorRT: EngineSession captures after a warm run.
        self.graph_mode = graph_mode(backend, cuda_graph)
        config = self.engine.create_runtime_config()
        config.set_execution_context_allocation_strategy(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        self._cache, self._cache_path = None, runtime_cache
        if CHECK_RTX or not TYPE_CHECKING:
            if backend == "tensorrt-rtx":
                if cuda_graph:
                    config.cuda_graph_strategy = trt.CudaGraphStrategy.WHOLE_GRAPH_CAPTURE
                self._cache = self._runtime_cache(config)
        context: trt.IExecutionContext | None = self.engine.create_execution_context(config)
        if context is None:
            raise RuntimeUnavailableError(f"{backend} could not create an execution context: {runtime_words(module_name)}",
                                          path=plan_path, hint="the GPU may be out of memory: choose a smaller --vram plan")
        self.context: trt.IExecutionContext = context

    def _runtime_cache(self, config: Any) -> Any:
        """TensorRT-RTX compiles kernels for the GPU it finds on first use; the cache beside the plan keeps them
        for the next process (rejected by the runtime itself on another GPU, driver or version)."""
        if not (CHECK_RTX or not TYPE_CHECKING):
            return None
        cache = config.create_runtime_cache()
        if self._cache_path is not None and self._cache_path.is_file():
            if not cache.deserialize(self._cache_path.read_bytes()):
                log.info(f"  {self._cache_path.name}: runtime cache from another GPU/driver/version, recompiling")
        config.set_runtime_cache(cache)
        return cache

    def tensors(self) -> list[TensorInfo]:
        trt, engine = self._trt, self.engine
        found = []
        for index in range(engine.num_io_tensors):
            name = engine.get_tensor_name(index)
            kind = engine.get_tensor_dtype(name).name
            found.append(TensorInfo(name, engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT,
                                    TRT_TYPES.get(kind, kind if kind in IO_DTYPES else f"TensorRT {kind}")))
        return found

    def profile(self, name: str) -> list[tuple[int, ...]] | None:
        return [tuple(d[i] for i in range(len(d))) for d in self.engine.get_tensor_profile_shape(name, 0)]

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        return bool(self.context.set_input_shape(name, shape))

    def output_shape(self, name: str) -> tuple[int, ...] | None:
        dims = self.context.get_tensor_shape(name)
        shape = tuple(dims[i] for i in range(len(dims)))
        if any(d < 0 for d in shape):
            raise EngineExecutionError(f"{self.path.name}: output {name} shape {shape} is unresolved after the input shapes")
        return shape

    def run_unbound(self, inputs: dict[str, Any]) -> dict[str, Any]:
        raise EngineExecutionError("TensorRT knows output shapes before it runs")

    def bind(self, name: str, tensor: Any) -> None:
        if not self.context.set_tensor_address(name, tensor.data_ptr()):
            raise EngineExecutionError(f"{self.path.name}: TensorRT refused the buffer of {name}")

    def execute(self, stream: Any) -> None:
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise EngineExecutionError(f"{self.path.name}: execute_async_v3 failed: {runtime_words(self.module_name)}")

    def device_memory(self) -> int:
        """The context's activation memory: with static allocation the largest over the engine's profile, whatever
        the shapes of a call (what the VRAM plan counts for an engine: ``vram.Need.activations`` at the profile max)."""
        return int(self.engine.device_memory_size_v2)

    def use_device_memory(self, pointer: int, size: int) -> None:
        self.context.set_device_memory(pointer, size)

    def keep_compiled(self) -> None:
        """TensorRT-RTX compiles kernels for this GPU the first time a shape runs: write its runtime cache now (after
        each new shape's first run), not only on close, which a resident run never reaches before the process ends."""
        if self._cache is None or self._cache_path is None:
            return
        try:
            from sd35trt.core.artifacts import write_bytes_atomic

            write_bytes_atomic(self._cache_path, bytes(memoryview(self._cache.serialize())))  # type: ignore[arg-type]
        except OSError as err:  # a read-only bundle still runs; it recompiles next time
            log.warn(f"could not keep the runtime cache {self._cache_path}: {err.strerror}")
            self._cache_path = None

    def close(self) -> None:
        self.keep_compiled()
        del self.context, self.engine
