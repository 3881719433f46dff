"""Component runners: the same call (spec input names → spec output names, torch tensors in and out) over
PyTorch modules, onnxruntime on exported ONNX, or TensorRT / TensorRT-RTX engines.

The denoising loop only sees ``ComponentRunner``; which backend executes a network is a choice made when the
runners are created (``runners_from_*``). Every runner can ``load()`` and ``unload()`` (the VRAM plan keeps only
some resident), knows the shapes it accepts (``profile``) and what it weighs. Engine and onnxruntime runners
are thin adapters over one ``EngineSession`` each: their outputs live in the session's buffers, valid until the
runner's next call.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sd35trt.core.errors import ArtifactError, InvalidInputError, RuntimeUnavailableError, VariantMissingError
from sd35trt.core.manifests import MANIFEST, BundleManifest, OnnxManifest, PlanFile, WorkDir
from sd35trt.core.shapes import ShapeRanges
from sd35trt.core.specs import ARTIFACT_PRECISIONS, COMPONENTS, SPECS, ComponentSpec, Precision, precision_of_dtype
from sd35trt.core.targets import RUNNER_VARIANTS, runner_variant
from sd35trt.runtime.session import EngineSession, SharedDeviceMemory, profile_problem

if TYPE_CHECKING:
    import torch


Profile = Mapping[str, Sequence[Sequence[int]]]  # input name -> [min, opt, max] shapes


class ComponentRunner:
    """Run one network. ``kind`` and ``precision`` describe it for reports; ``weight_bytes`` is what it holds
    on its device while loaded; ``profile`` the shapes it accepts (None: any). ``static_activations``: its
    activation memory is sized once for the largest shape of its profile (a TensorRT engine), not per call."""

    kind = "base"
    streamable = False  # an engine built with weight streaming
    static_activations = False

    def __init__(self, spec: ComponentSpec, precision: Precision, *, profile: Profile | None = None,
                 weight_bytes: int = 0):
        self.spec = spec
        self.precision = precision
        self.profile = profile
        self.weight_bytes = weight_bytes

    @property
    def device(self) -> str:
        return "cpu"

    @property
    def loaded(self) -> bool:
        return True

    def load(self) -> None:
        return None

    def unload(self) -> None:
        return None

    def set_streaming_budget(self, budget: int | None) -> None:
        """Bytes of weights kept resident under weight streaming (engines built for it; others ignore it)."""
        return None

    def accepts(self, shapes: dict[str, tuple[int, ...]]) -> list[str]:
        """Why these input shapes would be refused (empty when they fit the profile)."""
        if self.profile is None:
            return []
        return [why for name, shape in shapes.items() if name in self.profile
                for why in [profile_problem(name, shape, self.profile[name])] if why]

    def __call__(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "precision": self.precision}


class TorchRunner(ComponentRunner):
    """diffusers' own module. ``offload`` (the sequential VRAM plan): kept on the CPU, moved to ``device`` for
    its stage only, as diffusers' model CPU offload does."""

    kind = "torch"

    def __init__(self, spec: ComponentSpec, pipe: Any, *, device: str | None = None, offload: bool = False):
        import torch

        self.module = spec.module(pipe)
        param = next(self.module.parameters())
        self.dtype = param.dtype
        self._device = torch.device(device) if device else param.device
        if self._device.type == "cuda" and self._device.index is None:  # "cuda" is the current GPU, by index
            self._device = torch.device("cuda", torch.cuda.current_device())
        self.offload = offload
        weights = sum(p.numel() * p.element_size() for p in self.module.parameters())
        super().__init__(spec, precision_of_dtype(self.dtype), weight_bytes=weights)
        self._torch = torch
        if offload:
            self.unload()
        elif param.device != self._device:
            self.module.to(self._device)

    @property
    def device(self) -> str:
        return str(self._device)

    @property
    def loaded(self) -> bool:
        return next(self.module.parameters()).device == self._device

    def load(self) -> None:
        if not self.loaded:
            self.module.to(self._device)

    def unload(self) -> None:
        if self.offload and self._device.type != "cpu":
            self.module.to("cpu")
            self._torch.cuda.empty_cache()

    def __call__(self, **inputs):
        torch = self._torch
        self.load()
        args = [inputs[n].to(self._device, self.dtype) if inputs[n].is_floating_point() else inputs[n].to(self._device)
                for n in self.spec.input_names]
        with torch.no_grad():
            out = self.module(*args)
        out = out if isinstance(out, tuple) else (out,)
        return {n: o.float() for n, o in zip(self.spec.output_names, out)}

    def describe(self):
        return super().describe() | ({"offload": True} if self.offload else {})


class SessionRunner(ComponentRunner):
    """One ``EngineSession``: a TensorRT / TensorRT-RTX engine (``plan``: its file, ``backend``), or onnxruntime on
    an ONNX file (``onnx``), or one of a component's parts, with its own ``inputs``/``outputs``. An engine built
    for weight streaming runs under ``streaming_budget`` bytes of resident weights once it is set (before load)."""

    def __init__(self, spec: ComponentSpec, session: EngineSession, kind: str, precision: Precision, *,
                 profile: Profile | None, weight_bytes: int, plan: Path | None = None, plan_file: PlanFile | None = None,
                 onnx: Path | None = None, backend: str | None = None, streamable: bool = False,
                 static_activations: bool = False):
        super().__init__(spec, precision, profile=profile, weight_bytes=weight_bytes)
        self.session, self.kind, self.streamable = session, kind, streamable
        self.plan, self.plan_file, self.onnx, self.backend = plan, plan_file, onnx, backend
        self.static_activations = static_activations
        self.streaming_budget: int | None = None

    def set_streaming_budget(self, budget: int | None) -> None:
        if self.loaded:
            raise RuntimeError("the weight-streaming budget is set before the engine loads")
        self.streaming_budget = budget if self.streamable else None

    @property
    def inputs(self) -> tuple[str, ...]:
        return self.session.inputs

    @property
    def outputs(self) -> tuple[str, ...]:
        return self.session.outputs

    @property
    def device(self) -> str:
        return self.session.device

    @property
    def loaded(self) -> bool:
        return self.session.loaded

    def load(self) -> None:
        self.session.load()

    def unload(self) -> None:
        self.session.unload()

    def __call__(self, **inputs):
        return self.session.run({n: inputs[n] for n in self.session.inputs})

    def describe(self):
        provider = getattr(self.session.adapter, "provider", None)
        extra = {"provider": provider} if provider else {}
        where = {"plan": str(self.plan), "backend": self.backend} if self.plan else {"onnx": str(self.onnx)}
        return super().describe() | where | extra


class ChainRunner(ComponentRunner):
    """A component built in parts (``sd35trt.producers.parts``): its part sessions back to back, each fed the
    component's inputs and the earlier parts' outputs it names, in their own dtype (no float32 round trip)."""

    def __init__(self, spec: ComponentSpec, parts: list[SessionRunner]):
        super().__init__(spec, parts[0].precision, profile=_chain_profile(spec, parts),
                         weight_bytes=sum(p.weight_bytes for p in parts))
        self.parts, self.kind = parts, parts[0].kind
        self.streamable = any(p.streamable for p in parts)
        self.static_activations = any(p.static_activations for p in parts)

    def set_streaming_budget(self, budget: int | None) -> None:
        """The component's budget shared by its parts in proportion to their weights (each part gets its share,
        not the whole: a part given as much as it weighs would simply not stream)."""
        for part, share in zip(self.parts, split_budget(budget, [p.weight_bytes if p.streamable else 0 for p in self.parts])):
            part.set_streaming_budget(share)

    @property
    def device(self) -> str:
        return self.parts[0].device

    @property
    def loaded(self) -> bool:
        return all(p.loaded for p in self.parts)

    def load(self) -> None:
        for part in self.parts:
            part.load()

    def unload(self) -> None:
        for part in self.parts:
            part.unload()

    def __call__(self, **inputs):
        return run_chain(self.parts, inputs, self.spec.output_names)

    def describe(self):
        return super().describe() | {"parts": len(self.parts)}


def split_budget(budget: int | None, weights: list[int]) -> list[int | None]:
    """A weight-streaming budget shared among parts in proportion to their streamable weights (None: no streaming)."""
    total = sum(weights)
    if budget is None or total == 0:
        return [None] * len(weights)
    return [budget * w // total if w else None for w in weights]


def _chain_profile(spec: ComponentSpec, parts: list[SessionRunner]) -> Profile | None:
    """The component inputs' profiles, from the first part that takes each."""
    found: dict[str, Sequence[Sequence[int]]] = {}
    for part in parts:
        for name, shapes in (part.profile or {}).items():
            if name in spec.input_names:
                found.setdefault(name, shapes)
    return found or None


def run_chain(parts: Sequence[Any], inputs: dict[str, Any], outputs: Sequence[str]) -> dict[str, Any]:
    """Run callables with ``inputs``/``outputs`` names one after another, each on the tensors named so far."""
    known = dict(inputs)
    for part in parts:
        known.update(part(**{n: known[n] for n in part.inputs}))
    return {n: known[n] for n in outputs}


# --- building runner sets ---------------------------------------------------------------------------------


@dataclass
class RunnerSet:
    """The runners of one generate/bench/compare, with what the loop needs to know about where they came from."""

    runners: dict[str, ComponentRunner]
    ranges: ShapeRanges
    source: str  # "torch" | the work dir | the bundle folder
    assets_folder: Path | None = None  # a bundle's own tokenizers and configs
    bundle: BundleManifest | None = None
    model: dict[str, Any] | None = None  # what the artifacts were built from


def runners_from_torch(pipe: Any, components: tuple[str, ...] = COMPONENTS, *, device: str | None = None,
                       offload: bool = False) -> dict[str, ComponentRunner]:
    """diffusers' modules of ``pipe``; components the pipeline lacks (T5 in a CLIP-only pipeline) are left out."""
    return {name: TorchRunner(SPECS[name], pipe, device=device, offload=offload) for name in components
            if getattr(pipe, SPECS[name].pipeline_attr, None) is not None}


def ort_runner(spec: ComponentSpec, onnx_path: Path, precision: Precision, device: str, profile: Profile | None, *,
               inputs: Sequence[str] | None = None, outputs: Sequence[str] | None = None,
               weight_bytes: int = 0) -> SessionRunner:
    """An onnxruntime runner on ``device`` (``cpu`` or ``cuda``: a provider already resolved, ``resolve_provider``)."""
    from sd35trt.runtime.onnxrt import OrtAdapter

    whole = inputs is None
    names_in, names_out = tuple(inputs or spec.input_names), tuple(outputs or spec.output_names)
    dtypes = spec.io_dtypes if whole else {}
    session = EngineSession(spec.name, lambda: OrtAdapter(onnx_path, device, profile), names_in, names_out,
                            dtypes=dtypes, where=onnx_path, device=device)
    return SessionRunner(spec, session, "onnxruntime", precision, profile=profile, weight_bytes=weight_bytes,
                         onnx=onnx_path)


def runners_from_onnx(root: Path, precision: str = "auto", components: tuple[str, ...] = COMPONENTS,
                      device: str = "cpu", *, t5: bool = True) -> RunnerSet:
    """onnxruntime runners on ``device`` (``cpu`` or ``cuda``) for a work dir's ONNX, the variant per component
    chosen by ``targets.runner_variant`` (the engines' own policy; ``precision`` is a key of ``RUNNER_VARIANTS``);
    files are checked against their manifests, and every call against the profile the engines will be built with.
    ``t5=False``: CLIP-only (T5 embeddings are zeros). ``LoopOptions`` checks and resolves the user's words."""
    if not root.is_dir():
        raise InvalidInputError("ONNX directory not found", path=root, hint="pass the --out of export/calibrate")
    work = WorkDir(root)
    runners: dict[str, ComponentRunner] = {}
    ranges, model = None, None
    clip_only = work.clip_only()
    for name in components:
        if name == "t5" and (not t5 or clip_only):
            continue
        have = {p for p in ARTIFACT_PRECISIONS if (work.onnx_folder(p, name) / MANIFEST).is_file()}
        chosen = runner_variant(name, precision, have)
        if chosen is None:
            raise VariantMissingError(f"no {'/'.join(p.value for p in RUNNER_VARIANTS[precision])} ONNX for {name}", path=root,
                                hint=f"run `sd35trt calibrate --out {root}` then `sd35trt export --out {root}` (`--precision fp32` for FP32) first")
        manifest = OnnxManifest.load(work.onnx_folder(chosen, name), name, chosen)
        manifest.verify()
        runners[name] = ort_runner(SPECS[name], manifest.onnx_path, chosen, device, manifest.profile,
                                   weight_bytes=sum(e["bytes"] for e in manifest.files.values()))
        ranges = ranges or manifest.shape_ranges
        model = model or manifest.model
    asked = Precision(precision) if precision != "auto" else None
    if asked is not None and asked.low_bit and not any(r.precision == precision for r in runners.values()):
        raise VariantMissingError(  # else --precision int8 would run FP16 everywhere without a word
            f"no {precision} ONNX for any component", path=root, hint=f"run `sd35trt export --out {root} --int8 clip_l,clip_g`"
            if asked is Precision.INT8 else f"run `sd35trt calibrate --out {root} --format {precision}`, then `sd35trt export --out {root}`")
    assets = work.root / "assets"
    return RunnerSet(runners, ranges or ShapeRanges(), str(root), assets if assets.is_dir() else None, model=model)


# Another engine loader to ask for its refusal (compare's polygraphy TrtRunner): (name, (plan path, its manifest entry)
# -> the refusal, or None when it loads).
Loader = tuple[str, Callable[[Path, PlanFile], "str | None"]]


def check_bundle_host(manifest: BundleManifest, *, loaders: Sequence[Loader] = ()) -> str:
    """The installed runtime module that runs this bundle here, or one line why it cannot (with the ONNX to use
    instead). Where a GPU and the runtime are present but sd35trt's table says no (TensorRT-RTX on compute
    capability 9.0), the runtime itself is asked — through sd35trt's own engine loader and every other ``loaders``
    (compare adds polygraphy's ``TrtRunner``) — and their refusals are the message: a table is never the authority
    over the runtime."""
    from sd35trt.core.host import host_report
    from sd35trt.core.portability import bundle_fit, runtime_module

    host = host_report()
    ok, why = bundle_fit(manifest, host)
    module = runtime_module(manifest.runtime_record, host["runtimes"])
    if ok:
        assert module is not None
        return module
    work_dirs = sorted({str(e.work_dir.root) for e in manifest.components.values() if e.work_dir})
    hint = (f"run the same loop on the bundle's ONNX instead: --onnx {work_dirs[0] if work_dirs else '<work dir>'} "
            f"(or run on a GPU with compute capability {', '.join(manifest.compute_capabilities)})")
    if module is not None and host["compute_capability"] is not None:
        refusals = runtime_refusals(manifest, module, loaders)
        if not refusals:
            return module  # the runtime loads it: our table was too strict
        raise RuntimeUnavailableError(f"the engines of this bundle cannot run on this host: {'; '.join(refusals)} "
                                      f"(sd35trt predicted: {why})", path=manifest.folder, hint=hint)
    raise RuntimeUnavailableError(f"the engines of this bundle cannot run on this host: {why}", path=manifest.folder,
                                  hint=hint)


def runtime_refusals(manifest: BundleManifest, module: str, loaders: Sequence[Loader] = ()) -> list[str]:
    """What the runtime says when the bundle's first plan is loaded, through sd35trt's adapter and each of
    ``loaders`` (empty: every loader loaded it)."""
    from sd35trt.runtime.trt import TensorRTAdapter

    plan = next(iter(manifest.components.values())).plans[0]
    path = manifest.folder / plan.file
    refusals = []
    try:
        TensorRTAdapter(path, module, manifest.backend, sha256=plan.sha256, size=plan.bytes,
                        host_code=manifest.runtime_record.version_compatible).close()
    except ArtifactError as err:
        refusals.append(f"sd35trt: {err.what}")
    for name, load in loaders:
        refused = load(path, plan)
        if refused:
            refusals.append(f"{name}: {refused}")
    return refusals


def runners_from_bundle(folder: Path, *, cuda_graph: bool = False, t5: bool = True, check_host: bool = True,
                        loaders: Sequence[Loader] = ()) -> RunnerSet:
    """Engine runners for a bundle: its manifest validated (every field, every path inside the bundle), refused
    when it cannot run as it is (weight-stripped plans not refit yet) or on this host (``check_host``: the
    runtime's own words where it is installed). Plans are not hashed here: each is checked against the manifest
    when its engine loads, on the very bytes deserialized (``artifacts.check_mapped``, cached by file stamp), so a
    Large bundle's 20 GB are not read twice before the first step. The engines load lazily (the VRAM plan decides
    which stay resident) and share one activation block."""
    from sd35trt.runtime.trt import TensorRTAdapter

    folder = folder.absolute()  # every engine runner names its plan by a path that holds from any directory
    manifest = BundleManifest.load(folder)
    check_refit(manifest)
    # no host check: tests and plans on hosts that cannot run it take the bundle's own module
    module = check_bundle_host(manifest, loaders=loaders) if check_host else manifest.runtime_record.modules[0]
    host_code = manifest.runtime_record.version_compatible
    memory = SharedDeviceMemory()
    cache = folder / "runtime-cache" if manifest.backend == "tensorrt-rtx" else None
    runners: dict[str, ComponentRunner] = {}
    for name, entry in manifest.components.items():
        if name == "t5" and not t5:
            continue
        spec = SPECS[name]
        engines: list[SessionRunner] = []
        for plan in entry.plans:
            path = folder / plan.file
            runner: SessionRunner | None = None

            def opener(path=path, plan=plan, runner_of=lambda: runner):
                return TensorRTAdapter(path, module, manifest.backend, sha256=plan.sha256, size=plan.bytes,
                                       host_code=host_code, cuda_graph=cuda_graph,
                                       streaming_budget=runner_of().streaming_budget,
                                       runtime_cache=cache / f"{path.stem}.cache" if cache else None)

            dtypes = spec.io_dtypes if plan.inputs is None else {}
            session = EngineSession(name, opener, plan.inputs or spec.input_names, plan.outputs or spec.output_names,
                                    dtypes=dtypes, memory=memory, where=path)
            runner = SessionRunner(spec, session, "engine", entry.precision, profile=plan.profile or entry.profile,
                                   weight_bytes=plan.bytes, plan=path, plan_file=plan, backend=manifest.backend,
                                   streamable=entry.weight_streaming, static_activations=True)
            engines.append(runner)
        runners[name] = ChainRunner(spec, engines) if entry.parted else engines[0]
    assets = folder / "assets"
    return RunnerSet(runners, manifest.shape_ranges, str(folder), assets if assets.is_dir() else None,
                     bundle=manifest, model=manifest.model)


def check_refit(manifest: BundleManifest) -> None:
    """A bundle built with ``--strip-weights`` has plans without their weights: it must be refit first (running it
    as it is gives zeros or garbage, with no error from TensorRT)."""
    stripped = [n for n, e in manifest.components.items() if e.refit and e.refit.get("stripped")]
    if stripped:
        raise ArtifactError(f"the {', '.join(stripped)} engine(s) of this bundle are weight-stripped and not refit yet",
                            path=manifest.folder,
                            hint=f"refit it first: sd35trt refit {manifest.folder} --onnx <the work dir it was built from>")
