"""Component runners: the same call (spec input names → spec output names, torch tensors in and out) over
PyTorch modules, onnxruntime sessions on exported ONNX, or TensorRT / TensorRT-RTX engines.

The denoising loop only sees ``ComponentRunner``; which backend executes a network is a choice made when
the runners are created (``runners_from_*``), so the loop, the CLI and the comparison are the same code
whatever runs underneath.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from sd35trt.artifacts import read_json
from sd35trt.errors import ArtifactError, InvalidInputError, RuntimeUnavailableError, check_choice
from sd35trt.manifests import MANIFEST, VARIANT_DIRS
from sd35trt.specs import COMPONENTS, SPECS, ComponentSpec, Precision, ShapeRanges

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

    def __init__(self, spec: ComponentSpec, onnx_path: Path, precision: str, provider: str = "cpu"):
        from sd35trt.onnx_utils import ort_session, session_provider

        super().__init__(spec, precision)
        self.path = onnx_path
        self.session = ort_session(onnx_path, provider=provider)
        self.provider = session_provider(self.session)

    def __call__(self, **inputs):
        import torch

        from sd35trt.onnx_utils import run_ort

        feeds = {n: inputs[n].detach().cpu().numpy() for n in self.spec.input_names}
        return {k: torch.from_numpy(v) for k, v in run_ort(self.session, feeds).items()}

    def describe(self):
        return super().describe() | {"onnx": str(self.path), "provider": self.provider}


class EngineRunner(ComponentRunner):
    """A TensorRT or TensorRT-RTX engine with CUDA buffers from torch; CUDA graph when shapes repeat.

    Needs a GPU of the engine's compute capability and the exact runtime version that built it
    (``doctor`` checks both). Written against the TensorRT 10 / TensorRT-RTX 1.x Python API; it cannot
    execute on machines without such a GPU, where ``runners_from_bundle`` refuses with a clear message.
    """

    kind = "engine"

    def __init__(self, spec: ComponentSpec, plan_path: Path, precision: str, module_name: str):
        import importlib

        import torch

        super().__init__(spec, precision)
        trt = importlib.import_module(module_name)
        self._torch = torch
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(plan_path.read_bytes())
        if self.engine is None:
            raise ArtifactError("engine cannot be deserialized (truncated, or built for another GPU/runtime)",
                                path=plan_path, hint="run `sd35trt doctor` on this bundle")
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream()
        self._graph: Any = None
        self._graph_key: tuple | None = None
        self._static: dict[str, Any] = {}

    @property
    def device(self) -> str:
        return "cuda"

    def _bind(self, inputs):
        torch = self._torch
        outputs = {}
        for name in self.spec.input_names:
            # Own copies: a captured CUDA graph keeps reading these addresses, so they must not alias the
            # caller's tensors.
            tensor = inputs[name].to("cuda", torch.float32 if inputs[name].is_floating_point() else None,
                                     copy=True).contiguous()
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor.data_ptr())
            self._static[name] = tensor
        for name in self.spec.output_names:
            shape = tuple(self.context.get_tensor_shape(name))
            out = torch.empty(shape, dtype=torch.float32, device="cuda")
            self.context.set_tensor_address(name, out.data_ptr())
            outputs[name] = out
        return outputs

    def __call__(self, **inputs):
        torch = self._torch
        key = tuple(tuple(inputs[n].shape) for n in self.spec.input_names)
        action = graph_action(self._graph_key, key, self._graph is not None)
        with torch.cuda.stream(self.stream):
            if action == "replay":
                for name in self.spec.input_names:  # same shapes: copy into the captured buffers and replay
                    self._static[name].copy_(inputs[name].to("cuda"))
                self._graph.replay()
                outputs = self._graph_outputs
            else:
                if action == "run":  # new shape: _bind rebinds buffers, so a graph captured on the old ones goes
                    self._graph, self._graph_key = None, key
                outputs = self._bind(inputs)
                if not self.context.execute_async_v3(self.stream.cuda_stream):
                    raise RuntimeUnavailableError(f"{self.spec.name} engine execution failed",
                                                  hint="run `sd35trt doctor` on this bundle")
                if action == "capture":
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, stream=self.stream):
                        self.context.execute_async_v3(self.stream.cuda_stream)
                    self._graph, self._graph_outputs = graph, outputs
        self.stream.synchronize()
        return {k: v.clone() for k, v in outputs.items()}


def graph_action(graph_key: tuple | None, key: tuple, has_graph: bool) -> str:
    """CUDA-graph policy of ``EngineRunner`` per call: ``run`` (first call at a shape, or a new shape: plain
    execution, any graph captured at another shape is dropped since its buffers are rebound), ``capture``
    (second call at the same shape), ``replay`` (later calls at that shape)."""
    if key != graph_key:
        return "run"
    return "replay" if has_graph else "capture"


# --- building runner sets ---------------------------------------------------------------------------------


def runners_from_torch(pipe: Any, components: tuple[str, ...] = COMPONENTS) -> dict[str, ComponentRunner]:
    return {name: TorchRunner(SPECS[name], pipe) for name in components}


def _variant_manifest(root: Path, precision: Precision, name: str) -> dict[str, Any] | None:
    path = root / VARIANT_DIRS[precision] / name / MANIFEST
    return read_json(path, f"{precision.value} ONNX manifest of {name}") if path.is_file() else None


def runners_from_onnx(root: Path, precision: str = "auto", components: tuple[str, ...] = COMPONENTS,
                      provider: str = "cpu") -> tuple[dict[str, ComponentRunner], ShapeRanges]:
    """onnxruntime runners on a work dir's ONNX. ``auto``: FP8 where calibrated, else FP16, else FP32 (the
    precisions an FP8 engine bundle uses); ``fp32``/``fp16``/``fp8`` pick that variant (FP8 falls back to
    FP16 for components that were not calibrated, as engines do). Files are checked against manifests.
    ``provider``: onnxruntime execution provider per session (``onnx_utils.resolve_provider``)."""
    from sd35trt.artifacts import verify_files

    if not root.is_dir():
        raise InvalidInputError("ONNX directory not found", path=root, hint="pass the --out of export/calibrate")
    order = {"auto": (Precision.FP8, Precision.FP16, Precision.FP32), "fp8": (Precision.FP8, Precision.FP16),
             "fp16": (Precision.FP16,), "fp32": (Precision.FP32,)}
    check_choice("--precision", precision, tuple(order))
    runners, ranges = {}, None
    for name in components:
        for candidate in order[precision]:
            manifest = _variant_manifest(root, candidate, name)
            if manifest is None:
                continue
            folder = root / VARIANT_DIRS[candidate] / name
            verify_files(folder, manifest["files"], folder / MANIFEST)
            runners[name] = OrtRunner(SPECS[name], folder / "model.onnx", candidate.value, provider)
            ranges = ranges or _ranges_from_profile(manifest)
            break
        else:
            raise ArtifactError(f"no {'/'.join(p.value for p in order[precision])} ONNX for {name}", path=root,
                                hint="run `sd35trt export` (FP32) and `sd35trt calibrate` (FP16/FP8) first")
    return runners, ranges or ShapeRanges()


def _ranges_from_profile(manifest: dict[str, Any]) -> ShapeRanges | None:
    """The exported shape ranges, recorded in every ONNX manifest's export config."""
    ranges = manifest.get("ranges")
    return ShapeRanges.from_dict(ranges) if ranges else None


def runners_from_bundle(folder: Path) -> tuple[dict[str, ComponentRunner], dict[str, Any]]:
    """Engine runners for a bundle, after checking it fits this host (GPU, compute capability, runtime)."""
    from sd35trt.build import verify_bundle
    from sd35trt.doctor import bundle_fit, host_report

    manifest = verify_bundle(folder)
    ok, why = bundle_fit(manifest, host_report())
    if not ok:
        onnx_dirs = sorted({str(Path(e["onnx"]["path"]).parent.parent.parent) for e in manifest["components"].values()})
        raise RuntimeUnavailableError(
            f"the engines of this bundle cannot run on this host: {why}", path=folder,
            hint=f"run the same loop on the bundle's ONNX instead: --onnx {onnx_dirs[0] if onnx_dirs else '<work dir>'} "
                 f"(or run on a GPU with compute capability {', '.join(manifest['compute_capabilities'])})")
    module = "tensorrt_rtx_bindings" if manifest["backend"] == "tensorrt-rtx" else "tensorrt"
    runners = {name: EngineRunner(SPECS[name], folder / e["file"], e["precision"], module)
               for name, e in manifest["components"].items()}
    return runners, manifest


def ranges_of_bundle(manifest: dict[str, Any]) -> ShapeRanges:
    """Shape ranges every engine of a bundle accepts: the exported ranges recorded per component."""
    recorded = [e.get("ranges") for e in manifest["components"].values()]
    if not recorded or any(r is None for r in recorded) or any(r != recorded[0] for r in recorded):
        raise ArtifactError("bundle manifest lacks consistent shape ranges for its engines",
                            hint="rebuild the bundle from one export (sd35trt build --force)")
    return ShapeRanges.from_dict(recorded[0])
