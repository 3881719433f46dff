"""Component runners: the same call (spec input names → spec output names, torch tensors in and out) over
PyTorch modules, onnxruntime sessions on exported ONNX, or TensorRT / TensorRT-RTX engines.

The denoising loop only sees ``ComponentRunner``; which backend executes a network is a choice made when
the runners are created (``runners_from_*``), so the loop, the CLI and the comparison are the same code
whatever runs underneath.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sd35trt.errors import ArtifactError, InvalidInputError, RuntimeUnavailableError, check_choice
from sd35trt.manifests import MANIFEST, BundleManifest
from sd35trt.specs import COMPONENTS, SPECS, ComponentSpec, Precision, ShapeRanges
from sd35trt.typecheck import CHECK_RTX

if TYPE_CHECKING:
    import torch


class ComponentRunner:
    """Run one network. ``kind`` and ``precision`` describe it for reports."""

    kind = "base"

    def __init__(self, spec: ComponentSpec, precision: str):
        self.spec = spec
        self.precision = precision

    @property
    def device(self) -> str:
        return "cpu"

    def __call__(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "precision": self.precision}


class TorchRunner(ComponentRunner):
    kind = "torch"

    def __init__(self, spec: ComponentSpec, pipe: Any):
        import torch

        self.module = spec.module(pipe)
        param = next(self.module.parameters())
        self.dtype = param.dtype
        self._device = param.device
        super().__init__(spec, str(self.dtype).removeprefix("torch."))
        self._torch = torch

    @property
    def device(self) -> str:
        return str(self._device)

    def __call__(self, **inputs):
        torch = self._torch
        args = [inputs[n].to(self._device, self.dtype) if inputs[n].is_floating_point() else inputs[n].to(self._device)
                for n in self.spec.input_names]
        with torch.no_grad():
            out = self.module(*args)
        out = out if isinstance(out, tuple) else (out,)
        return {n: o.float() for n, o in zip(self.spec.output_names, out)}


class OrtRunner(ComponentRunner):
    kind = "onnxruntime"

    def __init__(self, spec: ComponentSpec, onnx_path: Path, precision: str, provider: str = "cpu",
                 *, inputs: Sequence[str] | None = None):
        from sd35trt.onnx_utils import ort_session, session_provider

        super().__init__(spec, precision)
        self.inputs = inputs or spec.input_names  # a part's own (sd35trt.parts), or the spec's
        self.path = onnx_path
        self.session = ort_session(onnx_path, provider=provider)
        self.provider = session_provider(self.session)

    def __call__(self, **inputs):
        import torch

        from sd35trt.onnx_utils import run_ort

        feeds = {n: inputs[n].detach().cpu().numpy() for n in self.inputs}
        return {k: torch.from_numpy(v) for k, v in run_ort(self.session, feeds).items()}

    def describe(self):
        return super().describe() | {"onnx": str(self.path), "provider": self.provider}


# TensorRT ``DataType`` member name → torch dtype name: every I/O type an SD3.5 engine can have.
ENGINE_IO_DTYPES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT32": "int32", "INT64": "int64",
                    "BOOL": "bool"}


def io_dtype(trt_dtype: Any, tensor: str, component: str) -> str:
    """The torch dtype name an engine I/O tensor needs; a type sd35trt cannot feed is refused by name."""
    name = getattr(trt_dtype, "name", str(trt_dtype).rsplit(".", 1)[-1])
    if name not in ENGINE_IO_DTYPES:
        raise ArtifactError(f"{component} engine tensor '{tensor}' has data type {name}, which sd35trt cannot feed",
                            hint=f"rebuild the bundle with this sd35trt (engine I/O is one of {', '.join(ENGINE_IO_DTYPES)})")
    return ENGINE_IO_DTYPES[name]


def graph_policy(backend: str, requested: bool) -> str:
    """How ``EngineRunner`` uses CUDA graphs: ``off`` unless asked (``--cuda-graph``); TensorRT-RTX then uses its
    runtime's own ``cuda_graph_strategy`` (a manual capture needs engines built with REQUIRE_USER_ALLOCATION and
    would freeze its dynamic-shape fallback kernels); TensorRT gets a guarded capture (``capture``)."""
    if not requested:
        return "off"
    return "runtime" if backend == "tensorrt-rtx" else "capture"


def profile_problem(tensor: str, shape: tuple[int, ...], profile: list[Any]) -> str | None:
    """Why ``shape`` is outside an engine input's optimisation profile ``[min, opt, max]`` (None when inside)."""
    low, high = tuple(profile[0]), tuple(profile[-1])
    if len(shape) != len(low) or any(s < a or s > b for s, a, b in zip(shape, low, high)):
        return f"input {tensor} shape {tuple(shape)} is outside the engine's profile {low}..{high}"
    return None


class EngineRunner(ComponentRunner):
    """A TensorRT or TensorRT-RTX engine on the caller's CUDA stream, I/O dtypes read from the engine.

    Needs a GPU of the engine's compute capability and the exact runtime version that built it
    (``doctor`` checks both). Written against the TensorRT 11 / TensorRT-RTX 1.7 Python API (type stubs in
    ../shared/typings); it cannot execute on machines without such a GPU, where ``runners_from_bundle``
    refuses with a clear message. Every TensorRT call's result is checked and named.
    """

    kind = "engine"

    def __init__(self, spec: ComponentSpec, plan_path: Path, precision: str, module_name: str, backend: str,
                 *, cuda_graph: bool = False, inputs: Sequence[str] | None = None,
                 outputs: Sequence[str] | None = None):
        import importlib

        import torch

        super().__init__(spec, precision)
        # a part of a component (sd35trt.parts) takes and gives its own tensors; a whole engine the spec's
        self.inputs, self.outputs = inputs or spec.input_names, outputs or spec.output_names
        self.plan_path, self.backend = plan_path, backend  # compare runs polygraphy's TrtRunner on the same plan
        if TYPE_CHECKING:  # `make lint` checks this against TensorRT 11.4's and TensorRT-RTX 1.7's API (typings/)
            if CHECK_RTX:
                import tensorrt_rtx_bindings as trt
            else:
                import tensorrt_bindings as trt
        else:
            trt = importlib.import_module(module_name)
        self._torch = torch
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(plan_path.read_bytes())
        if self.engine is None:
            raise ArtifactError("engine cannot be deserialized (truncated, or built for another GPU/runtime)",
                                path=plan_path, hint="run `sd35trt doctor` on this bundle")
        self.graphs = graph_policy(backend, cuda_graph)
        # TensorRT-RTX only (graph_policy): its runtime's own CUDA-graph strategy; the RTX type-check pass checks it
        if self.graphs == "runtime" and (CHECK_RTX or not TYPE_CHECKING):
            config = self.engine.create_runtime_config()
            config.cuda_graph_strategy = trt.CudaGraphStrategy.WHOLE_GRAPH_CAPTURE
            self.context = self.engine.create_execution_context(config)
        else:
            self.context = self.engine.create_execution_context()
        if self.context is None:
            raise RuntimeUnavailableError(f"{spec.name}: TensorRT could not create an execution context", path=plan_path,
                                          hint="the GPU may be out of memory; run `sd35trt doctor` on this bundle")
        names = (*self.inputs, *self.outputs)
        self.dtypes = {n: getattr(torch, io_dtype(self.engine.get_tensor_dtype(n), n, spec.name)) for n in names}
        self.profiles = {n: self.engine.get_tensor_profile_shape(n, 0) for n in self.inputs}
        self._graph: Any = None
        self._graph_key: tuple | None = None
        self._graph_outputs: dict[str, Any] = {}
        self._static: dict[str, Any] = {}

    @property
    def device(self) -> str:
        return "cuda"

    def _bind(self, inputs):
        torch = self._torch
        for name in self.inputs:
            # Own copies in the engine's dtype: a captured CUDA graph keeps reading these addresses.
            tensor = inputs[name].to("cuda", self.dtypes[name], copy=True).contiguous()
            if not self.context.set_input_shape(name, tuple(tensor.shape)):
                why = profile_problem(name, tuple(tensor.shape), self.profiles[name]) or \
                    f"input {name} shape {tuple(tensor.shape)} was refused"
                raise InvalidInputError(f"{self.spec.name} engine: {why}",
                                        hint="request a size inside the bundle's shape ranges (see its manifest)")
            self._address(name, tensor)
            self._static[name] = tensor
        outputs = {}
        for name in self.outputs:
            dims = self.context.get_tensor_shape(name)
            shape = tuple(dims[i] for i in range(len(dims)))
            if any(d < 0 for d in shape):
                raise RuntimeUnavailableError(f"{self.spec.name} engine: output {name} shape {shape} is unresolved",
                                              hint="an input shape was not accepted; run `sd35trt doctor`")
            outputs[name] = torch.empty(shape, dtype=self.dtypes[name], device="cuda")
            self._address(name, outputs[name])
        return outputs

    def _address(self, name: str, tensor: Any) -> None:
        if not self.context.set_tensor_address(name, tensor.data_ptr()):
            raise RuntimeUnavailableError(f"{self.spec.name} engine: TensorRT refused the buffer of {name}",
                                          hint="run `sd35trt doctor` on this bundle")

    def _execute(self, stream: Any) -> None:
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeUnavailableError(f"{self.spec.name} engine execution failed",
                                          hint="run `sd35trt doctor` on this bundle")

    def __call__(self, **inputs):
        torch = self._torch
        stream = torch.cuda.current_stream()  # the caller's: its input writes and our reads stay ordered
        key = tuple(tuple(inputs[n].shape) for n in self.inputs)
        action = graph_action(self._graph_key, key, self._graph is not None) if self.graphs == "capture" else "run"
        if action == "replay":
            for name in self.inputs:  # same shapes: copy into the captured buffers and replay
                self._static[name].copy_(inputs[name].to("cuda", self.dtypes[name]))
            self._graph.replay()
            outputs = self._graph_outputs
        else:
            if action == "run":  # new shape: _bind rebinds buffers, so a graph captured on the old ones goes
                self._graph, self._graph_key = None, key
            outputs = self._bind(inputs)
            self._execute(stream)
            if action == "capture":
                self._capture(outputs)
        # float32 out, like every runner; integers (a part's token ids) as they are
        return {k: v.to(torch.float32, copy=True) if v.is_floating_point() else v.clone() for k, v in outputs.items()}

    def _capture(self, outputs: dict[str, Any]) -> None:
        """Capture one execution; on any failure fall back to plain execution for good, with one warning."""
        torch = self._torch
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._execute(torch.cuda.current_stream())  # the capture stream
            self._graph, self._graph_outputs = graph, outputs
        except Exception as exc:  # noqa: BLE001 - any capture failure means "no graphs here", not a failed run
            from sd35trt import log

            log.warn(f"{self.spec.name}: CUDA graph capture failed ({str(exc)[:120]}); running without CUDA graphs")
            self.graphs, self._graph = "off", None


class ChainRunner(ComponentRunner):
    """A component built in parts (``sd35trt.parts``): its part engines back to back on the caller's stream,
    each fed the component's inputs and the earlier parts' outputs it names."""

    kind = "engine"

    def __init__(self, spec: ComponentSpec, parts: list[Any]):
        super().__init__(spec, parts[0].precision)
        self.parts = parts

    @property
    def device(self) -> str:
        return self.parts[0].device

    def __call__(self, **inputs):
        return run_chain(self.parts, inputs, self.spec.output_names)

    def describe(self):
        return super().describe() | {"parts": len(self.parts)}


def run_chain(parts: list[Any], inputs: dict[str, Any], outputs: Sequence[str]) -> dict[str, Any]:
    """Run callables with ``inputs``/``outputs`` names one after another, each on the tensors named so far."""
    known = dict(inputs)
    for part in parts:
        known.update(part(**{n: known[n] for n in part.inputs}))
    return {n: known[n] for n in outputs}


def graph_action(graph_key: tuple | None, key: tuple, has_graph: bool) -> str:
    """CUDA-graph capture policy of ``EngineRunner`` (``capture`` mode) per call: ``run`` (first call at a shape,
    or a new shape: plain execution, any graph captured at another shape is dropped since its buffers are
    rebound), ``capture`` (second call at the same shape), ``replay`` (later calls at that shape)."""
    if key != graph_key:
        return "run"
    return "replay" if has_graph else "capture"


# --- building runner sets ---------------------------------------------------------------------------------


def runners_from_torch(pipe: Any, components: tuple[str, ...] = COMPONENTS) -> dict[str, ComponentRunner]:
    return {name: TorchRunner(SPECS[name], pipe) for name in components}


def runners_from_onnx(root: Path, precision: str = "auto", components: tuple[str, ...] = COMPONENTS,
                      provider: str = "cpu") -> tuple[dict[str, ComponentRunner], ShapeRanges]:
    """onnxruntime runners on a work dir's ONNX. ``auto``: FP8 where calibrated, else FP16, else FP32 (the
    precisions an FP8 engine bundle uses); ``fp32``/``fp16``/``fp8`` pick that variant (FP8 falls back to
    FP16 for components that were not calibrated, as engines do). Files are checked against manifests.
    ``provider``: onnxruntime execution provider per session (``onnx_utils.resolve_provider``)."""
    from sd35trt.manifests import OnnxManifest, WorkDir

    if not root.is_dir():
        raise InvalidInputError("ONNX directory not found", path=root, hint="pass the --out of export/calibrate")
    order = {"auto": (Precision.FP8, Precision.FP16, Precision.FP32), "fp8": (Precision.FP8, Precision.FP16),
             "fp16": (Precision.FP16,), "fp32": (Precision.FP32,)}
    check_choice("--precision", precision, tuple(order))
    runners: dict[str, ComponentRunner] = {}
    ranges = None
    work = WorkDir(root)
    for name in components:
        for candidate in order[precision]:
            folder = work.onnx_folder(candidate, name)
            if not (folder / MANIFEST).is_file():
                continue
            manifest = OnnxManifest.load(folder, name, candidate)
            manifest.verify()
            runners[name] = OrtRunner(SPECS[name], manifest.onnx_path, candidate.value, provider)
            ranges = ranges or (ShapeRanges.from_dict(manifest.ranges) if manifest.ranges else None)
            break
        else:
            raise ArtifactError(f"no {'/'.join(p.value for p in order[precision])} ONNX for {name}", path=root,
                                hint="run `sd35trt calibrate` then `sd35trt export` (`--precision fp32` for FP32) with this --out first")
    return runners, ranges or ShapeRanges()


def runners_from_bundle(folder: Path, *, cuda_graph: bool = False) -> tuple[dict[str, ComponentRunner], BundleManifest]:
    """Engine runners for a bundle, after checking it fits this host (GPU, compute capability, runtime)."""
    from sd35trt.build import verify_bundle
    from sd35trt.doctor import bundle_fit, host_report
    from sd35trt.portability import RuntimeRecord, runtime_module

    manifest = verify_bundle(folder)
    host = host_report()
    ok, why = bundle_fit(manifest, host)
    if not ok:
        work_dirs = sorted({str(e.work_dir.root) for e in manifest.components.values() if e.work_dir})
        raise RuntimeUnavailableError(
            f"the engines of this bundle cannot run on this host: {why}", path=folder,
            hint=f"run the same loop on the bundle's ONNX instead: --onnx {work_dirs[0] if work_dirs else '<work dir>'} "
                 f"(or run on a GPU with compute capability {', '.join(manifest.compute_capabilities)})")
    module = runtime_module(RuntimeRecord.of_bundle(manifest.data), host["runtimes"])
    assert module is not None  # bundle_fit found it
    runners: dict[str, ComponentRunner] = {}
    for name, entry in manifest.components.items():
        engines = [EngineRunner(SPECS[name], folder / p.file, entry.precision, module, manifest.backend,
                                cuda_graph=cuda_graph, inputs=p.inputs, outputs=p.outputs) for p in entry.plans]
        runners[name] = ChainRunner(SPECS[name], engines) if entry.parted else engines[0]
    return runners, manifest


def ranges_of_bundle(manifest: BundleManifest) -> ShapeRanges:
    """Shape ranges every engine of a bundle accepts: the exported ranges recorded per component."""
    recorded = [e.ranges for e in manifest.components.values()]
    if not recorded or any(r is None for r in recorded) or any(r != recorded[0] for r in recorded):
        raise ArtifactError("bundle manifest lacks consistent shape ranges for its engines",
                            hint="rebuild the bundle from one export (sd35trt build --force)")
    first = recorded[0]
    assert first is not None
    return ShapeRanges.from_dict(first)
