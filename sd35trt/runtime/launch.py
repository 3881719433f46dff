"""The loop a command asks for: runners from ``--bundle``, ``--onnx`` or ``--torch``, the pipeline assets they
need, and the VRAM plan that fits this GPU (``--vram``/``--vram-plan``), in one place for generate, bench and
compare.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sd35trt.core import log
from sd35trt.core.assets import PipelineAssets, load_assets
from sd35trt.core.errors import InvalidInputError
from sd35trt.core.models import ModelSource, resolve_model
from sd35trt.core.shapes import ShapeRanges
from sd35trt.core.specs import COMPONENTS, SPECS, pipeline_attrs, precision_of_dtype
from sd35trt.runtime.pipeline import Sd35Loop
from sd35trt.runtime.request import GenerateRequest, LoopShape
from sd35trt.runtime.runners import (
    ComponentRunner,
    Loader,
    RunnerSet,
    runners_from_bundle,
    runners_from_onnx,
    runners_from_torch,
)
from sd35trt.runtime.vram import VramPlan, choose_plan, gpu_budget


@dataclass(frozen=True)
class LoopOptions:
    """What generate/bench/compare were asked to run on. ``model`` may be None with ``--bundle`` (a bundle
    carries its own tokenizers and configs); when given it must be what the artifacts were built from."""

    model: str | None = None
    bundle: Path | None = None
    onnx: Path | None = None
    torch: bool = False
    precision: str = "auto"  # --onnx: which variant
    provider: str = "auto"  # --onnx: onnxruntime execution provider
    device: str = "auto"  # --torch
    dtype: str = "auto"  # --torch
    cuda_graph: bool = False  # --bundle
    t5: bool = True  # False: CLIP-only (zero T5 embeddings, as diffusers with text_encoder_3=None)
    turbo: bool | None = None  # None: what the model/bundle says
    vram_gib: float | None = None  # the budget; None: the GPU's free memory
    vram_plan: str = "auto"
    vae_tiling: str = "auto"
    lora: str | None = None  # adapters fused into the model (torch), or that the artifacts must have been built with
    # resolved from the above when made: where torch modules run and in which dtype (--device/--dtype: the --torch
    # runner and bench's torch peers), where onnxruntime sessions run (--provider, for --onnx)
    placement: tuple[str, Any] = field(init=False, repr=False, compare=False)
    ort_device: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        """Every option checked and resolved once, here: a LoopOptions that exists is one the runners take as it is."""
        from sd35trt.core.errors import check_choice
        from sd35trt.core.host import pick_placement
        from sd35trt.core.onnx_utils import PROVIDERS, resolve_provider
        from sd35trt.core.targets import RUNNER_VARIANTS
        from sd35trt.runtime.request import TILING
        from sd35trt.runtime.vram import MODES, check_vram

        chosen = [n for n, v in (("--bundle", self.bundle), ("--onnx", self.onnx), ("--torch", self.torch)) if v]
        if len(chosen) != 1:
            raise InvalidInputError("choose exactly one of --bundle, --onnx, --torch",
                                    hint="e.g. --onnx build/tiny (onnxruntime) or --torch")
        check_vram(self.vram_gib)
        for option, value, choices in (("--precision", self.precision, tuple(RUNNER_VARIANTS)),
                                       ("--provider", self.provider, PROVIDERS), ("--vram-plan", self.vram_plan, MODES),
                                       ("--vae-tiling", self.vae_tiling, TILING)):
            check_choice(option, value, choices)
        object.__setattr__(self, "placement", pick_placement(self.device, self.dtype, on_gpu="bf16"))
        object.__setattr__(self, "ort_device", resolve_provider(self.provider) if self.onnx else "cpu")


def open_runners(options: LoopOptions, *, built_from: ModelSource | None = None,
                 loaders: Sequence[Loader] = ()) -> RunnerSet:
    """The runners ``--bundle`` or ``--onnx`` names (lazy: no engine or session is loaded yet), the bundle checked
    for this host, the artifacts checked to be built from ``built_from`` (``--model``) where they record their
    model. ``loaders``: who else opens the bundle's plans (compare's polygraphy twin)."""
    from sd35trt.core.manifests import require_model

    if options.bundle is not None:
        found = runners_from_bundle(options.bundle, cuda_graph=options.cuda_graph, t5=options.t5, loaders=loaders)
    elif options.onnx is None:
        raise InvalidInputError("runners from artifacts need --bundle or --onnx", hint="--torch runs diffusers' modules")
    else:
        found = runners_from_onnx(options.onnx, options.precision, device=options.ort_device, t5=options.t5)
    if built_from is not None and found.model is not None:
        require_model(found.model, built_from.fingerprint(), built_from.id, Path(found.source))
    return found


def loop_assets(options: LoopOptions, source: ModelSource | None, found: RunnerSet) -> PipelineAssets:
    """The bundle's or work dir's own assets, else the model's (``source``, ``--model``)."""
    if found.assets_folder is not None:
        assets = PipelineAssets.load(found.assets_folder)
        if options.turbo is not None:
            assets.turbo = options.turbo
        return assets
    if source is None:
        where = "bundle" if options.bundle else "work dir"
        raise InvalidInputError(f"this {where} carries no tokenizers/configs (built by an older sd35trt)",
                                path=Path(found.source), hint="pass --model with the model it was built from, or rebuild it")
    return load_assets(source)


def open_loop(options: LoopOptions, request: GenerateRequest, *, batch_text: bool = True) -> Sd35Loop:
    """Runners, assets and VRAM plan for ``request``; the returned loop is checked against every engine profile."""
    # 1. the model resolved once (the options were checked when made); the GPU's budget
    source = resolve_model(options.model, turbo=options.turbo, lora=options.lora) if options.model else None
    budget = gpu_budget(options.vram_gib)
    # 2. what the loop will run, as data: the artifacts' runners (nothing loaded yet), or the torch modules' sizes
    modules = torch_modules(options, source, sized=budget is not None) if options.torch else None
    if modules is not None:
        assets, runners, ranges, on_gpu = modules.assets, modules.sized, None, modules.device == "cuda"
    else:
        found = open_runners(options, built_from=source)
        assets, runners, ranges = loop_assets(options, source, found), found.runners, found.ranges
        on_gpu = "cuda" in ({r.device for r in runners.values()} if options.onnx else {"cuda"})
    # 3. the request resolved once and checked against every profile
    shape = LoopShape(assets, runners, ranges or ShapeRanges(), batch_text, options.vae_tiling)
    request = shape.resolve(request)
    shape.check(request)
    # 4. the VRAM plan from the shape's needs (GPU runs only)
    plan = choose_plan(shape.needs(request), budget, options.vram_plan) if on_gpu and budget is not None else None
    if plan is not None:
        log.info(plan.summary())
    # 5. the loop, given its plan (the transformer's streaming budget) at construction; torch modules built for it
    if modules is not None:
        runners = modules.build(plan)
    return Sd35Loop(assets, runners, ranges, batch_text=batch_text, plan=plan, vae_tiling=options.vae_tiling)


@dataclass
class _TorchModules:
    """``--torch``: diffusers' modules of one model (``torch_modules``). Their sizes are counted on the meta device
    first (``sized``: runners that carry weight bytes only), so the VRAM plan is chosen before ``build`` puts the
    pipeline where the plan wants it (on the GPU for a resident plan, on the CPU to be moved stage by stage)."""

    options: LoopOptions
    source: ModelSource
    device: str
    dtype: Any
    attrs: tuple[str, ...]
    assets: PipelineAssets
    sized: dict[str, ComponentRunner]

    def build(self, plan: VramPlan | None) -> dict[str, ComponentRunner]:
        from sd35trt.core.models import build_pipeline

        if plan is not None and plan.mode == "streaming":
            raise InvalidInputError("weight streaming is for engines; the torch runner has resident and sequential plans",
                                    hint="use --vram-plan sequential, or a larger --vram")
        offload = plan is not None and plan.sequential
        # Presets initialise each network in FP32 before casting it (the same weights in every dtype), so under a
        # memory cap (--vram) they are built on the CPU and moved: the FP32 transformer alone may exceed the cap.
        on_cpu = offload or self.options.vram_gib is not None
        pipe = build_pipeline(self.source, device="cpu" if on_cpu else self.device, dtype=self.dtype, components=self.attrs)
        return runners_from_torch(pipe, device=self.device, offload=offload)


def torch_modules(options: LoopOptions, source: ModelSource | None, *, sized: bool) -> _TorchModules:
    """``--torch``: the model's modules counted on the meta device (``sized``: only where a VRAM plan will be chosen)."""
    from sd35trt.core.models import weight_bytes

    if source is None:
        raise InvalidInputError("--torch needs --model", hint="e.g. --torch --model tiny")
    device, dtype = options.placement
    attrs = pipeline_attrs(options.t5 and source.has_t5)
    sizes = weight_bytes(source, dtype, attrs) if sized and device == "cuda" else {}
    runners = {c: ComponentRunner(SPECS[c], precision_of_dtype(dtype), weight_bytes=sizes.get(SPECS[c].pipeline_attr, 0))
               for c in COMPONENTS if SPECS[c].pipeline_attr in attrs}
    return _TorchModules(options, source, device, dtype, attrs, load_assets(source, t5="text_encoder_3" in attrs), runners)


# --- bench peers: what users would run instead, on the same pipeline -------------------------------------


class TorchPeers:
    """PyTorch peers of one model on one pipeline (built once, BF16 on the GPU): ``torch`` (diffusers' modules,
    eager), ``compile`` (the transformer under ``torch.compile``) and ``torchao-fp8`` (torchao's float8 dynamic
    activation + weight quantization of the transformer's Linear layers, per row, then ``torch.compile``; the
    recipe's high-precision modules — embedders, final norm, proj_out — are left out, as in sd35trt's own FP8).
    torchao rewrites the transformer in place, so it is the last peer."""

    def __init__(self, options: LoopOptions):
        self.options, self.pipe, self.compiled, self.quantized = options, None, None, None

    def _base(self, request: GenerateRequest) -> Sd35Loop:
        from sd35trt.core.models import build_pipeline

        if self.pipe is None:  # once: the model (its LoRA files hashed) and its pipeline serve every peer and batch
            source = resolve_model(self.options.model or "tiny", turbo=self.options.turbo, lora=self.options.lora)
            device, dtype = self.options.placement
            attrs = pipeline_attrs(self.options.t5 and source.has_t5)
            self.pipe = build_pipeline(source, device=device, dtype=dtype, components=attrs)
            self.assets = load_assets(source, t5="text_encoder_3" in attrs)
        loop = Sd35Loop(self.assets, runners_from_torch(self.pipe))
        loop.check(request)
        return loop

    def torch(self, request: GenerateRequest) -> Sd35Loop:
        return self._base(request)

    def compile(self, request: GenerateRequest) -> Sd35Loop:
        import torch

        loop = self._base(request)
        runner = loop.runners["transformer"]
        if self.compiled is None:
            self.compiled = torch.compile(runner.module)  # type: ignore[attr-defined]
        runner.module = self.compiled  # type: ignore[attr-defined]
        return loop

    def torchao_fp8(self, request: GenerateRequest) -> Sd35Loop:
        import fnmatch

        import torch

        try:
            from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_
        except ImportError:
            raise InvalidInputError("the torchao-fp8 peer needs torchao", hint="pip install 'sd35trt[peers]'") from None
        loop = self._base(request)
        runner = loop.runners["transformer"]
        if self.quantized is None:
            keep = ("pos_embed*", "context_embedder*", "time_text_embed*", "norm_out*", "proj_out")

            def quantizable(module: Any, name: str) -> bool:
                return isinstance(module, torch.nn.Linear) and not any(fnmatch.fnmatchcase(name, k) for k in keep)

            quantize_(self.pipe.transformer, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()),
                      filter_fn=quantizable)
            self.quantized = torch.compile(SPECS["transformer"].module(self.pipe))
        runner.module = self.quantized  # type: ignore[attr-defined]
        return loop

    def opener(self, name: str):
        return {"torch": self.torch, "compile": self.compile, "torchao-fp8": self.torchao_fp8}[name]
