"""The loop a command asks for: runners from ``--bundle``, ``--onnx`` or ``--torch``, the pipeline assets they
need, and the VRAM plan that fits this GPU (``--vram``/``--vram-plan``), in one place for generate, bench and
compare.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sd35trt.core import log
from sd35trt.core.assets import PipelineAssets, load_assets
from sd35trt.core.errors import InvalidInputError
from sd35trt.core.models import resolve_model
from sd35trt.core.specs import COMPONENTS, SPECS, pipeline_attrs
from sd35trt.runtime.pipeline import GenerateRequest, Sd35Loop
from sd35trt.runtime.runners import ComponentRunner, RunnerSet, runners_from_bundle, runners_from_onnx, runners_from_torch
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

    def check(self) -> None:
        from sd35trt.runtime.vram import check_vram

        chosen = [n for n, v in (("--bundle", self.bundle), ("--onnx", self.onnx), ("--torch", self.torch)) if v]
        if len(chosen) != 1:
            raise InvalidInputError("choose exactly one of --bundle, --onnx, --torch",
                                    hint="e.g. --onnx build/tiny (onnxruntime) or --torch")
        check_vram(self.vram_gib)


def _assets(options: LoopOptions, found: RunnerSet | None) -> PipelineAssets:
    """The bundle's or work dir's own assets, else the model's (checked to be what the artifacts came from)."""
    from sd35trt.core.manifests import require_model

    source = resolve_model(options.model, turbo=options.turbo, lora=options.lora) if options.model else None
    if found is not None and source is not None and found.model is not None:
        require_model(found.model, source.fingerprint(), source.id, Path(found.source))
    if found is not None and found.assets_folder is not None:
        assets = PipelineAssets.load(found.assets_folder)
        if options.turbo is not None:
            assets.turbo = options.turbo
        return assets
    if source is None:
        where = "bundle" if options.bundle else "work dir"
        raise InvalidInputError(f"this {where} carries no tokenizers/configs (built by an older sd35trt)",
                                path=Path(found.source) if found else None,
                                hint="pass --model with the model it was built from, or rebuild it")
    return load_assets(source)


def open_loop(options: LoopOptions, request: GenerateRequest, *, batch_text: bool = True) -> Sd35Loop:
    """Runners, assets and VRAM plan for ``request``; the returned loop is checked against every engine profile."""
    options.check()
    budget = gpu_budget(options.vram_gib)
    if options.torch:
        return _torch_loop(options, request, budget, batch_text)
    if options.bundle is not None:
        found = runners_from_bundle(options.bundle, cuda_graph=options.cuda_graph, t5=options.t5)
    else:
        assert options.onnx is not None
        found = runners_from_onnx(options.onnx, options.precision, provider=options.provider, t5=options.t5)
    assets = _assets(options, found)
    loop = Sd35Loop(assets, found.runners, found.ranges, batch_text=batch_text, vae_tiling=options.vae_tiling)
    loop.check(request)
    devices = {r.device for r in found.runners.values()} if options.onnx else {"cuda"}
    if budget is not None and "cuda" in devices:
        loop.plan = choose_plan(loop.needs(request), budget, options.vram_plan)
        if loop.plan.mode == "streaming":
            found.runners["transformer"].set_streaming_budget(loop.plan.streaming_budget)
        log.info(loop.plan.summary())
    return loop


def _torch_loop(options: LoopOptions, request: GenerateRequest, budget: int | None, batch_text: bool) -> Sd35Loop:
    """diffusers' modules: the plan is chosen from their weights counted on the meta device, then the pipeline is
    built where the plan wants it (on the GPU for a resident plan, on the CPU to be moved stage by stage)."""
    from sd35trt.core.host import pick_device, pick_dtype
    from sd35trt.core.models import build_pipeline, weight_bytes

    if options.model is None:
        raise InvalidInputError("--torch needs --model", hint="e.g. --torch --model tiny")
    source = resolve_model(options.model, turbo=options.turbo, lora=options.lora)
    device = pick_device(options.device)
    dtype = pick_dtype(options.dtype, device, on_gpu="bf16")
    attrs = pipeline_attrs(options.t5 and source.has_t5)
    assets = load_assets(source, t5="text_encoder_3" in attrs)
    plan: VramPlan | None = None
    if device == "cuda" and budget is not None:
        sizes = weight_bytes(source, dtype, attrs)
        sized_runners = {c: ComponentRunner(SPECS[c], str(dtype), weight_bytes=sizes[SPECS[c].pipeline_attr])
                     for c in COMPONENTS if SPECS[c].pipeline_attr in attrs}
        plan = choose_plan(Sd35Loop(assets, sized_runners, batch_text=batch_text).needs(request), budget, options.vram_plan)
        if plan.mode == "streaming":
            raise InvalidInputError("weight streaming is for engines; the torch runner has resident and sequential plans",
                                    hint="use --vram-plan sequential, or a larger --vram")
        log.info(plan.summary())
    offload = plan is not None and plan.sequential
    # Presets initialise each network in FP32 before casting it (the same weights in every dtype), so under a
    # memory cap (--vram) they are built on the CPU and moved: the FP32 transformer alone may exceed the cap.
    on_cpu = offload or options.vram_gib is not None
    pipe = build_pipeline(source, device="cpu" if on_cpu else device, dtype=dtype, components=attrs)
    runners = runners_from_torch(pipe, device=device, offload=offload)
    loop = Sd35Loop(assets, runners, batch_text=batch_text, plan=plan, vae_tiling=options.vae_tiling)
    loop.check(request)
    return loop


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
        from sd35trt.core.host import pick_device, pick_dtype
        from sd35trt.core.models import build_pipeline

        if self.pipe is None:  # once: the model (its LoRA files hashed) and its pipeline serve every peer and batch
            source = resolve_model(self.options.model or "tiny", turbo=self.options.turbo, lora=self.options.lora)
            device = pick_device(self.options.device)
            attrs = pipeline_attrs(self.options.t5 and source.has_t5)
            self.pipe = build_pipeline(source, device=device, dtype=pick_dtype(self.options.dtype, device, on_gpu="bf16"),
                                       components=attrs)
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
