"""The sd35trt denoising loop: SD3's ``__call__`` as numbered steps over swappable component runners.

Tokenizers, scheduler, latent preparation and image post-processing are diffusers' own objects
(``CLIPTokenizer``, ``T5TokenizerFast``, ``FlowMatchEulerDiscreteScheduler``, ``randn_tensor``,
``VaeImageProcessor``); only the five networks go through runners. With torch runners this is the same math as
``StableDiffusion3Pipeline`` (the test suite checks it bit for bit), so any difference measured with ONNX or
engine runners is the runners' own. As in diffusers, the latents, the guidance combine and the scheduler step
stay on the execution device (no host copy per step), the negative and positive prompts share one text-encoder
call, and without T5 the T5 embeddings are zeros (``text_encoder_3=None``).
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field, replace
from typing import Any

from sd35trt.core import log
from sd35trt.core.assets import PipelineAssets
from sd35trt.core.errors import InvalidInputError, NonFiniteError, check_seed
from sd35trt.core.presets import Defaults
from sd35trt.core.specs import COMPONENTS, SPECS, ShapeRanges, check_pixels
from sd35trt.core.tokenizers import CLIP_MAX_TOKENS, T5_MAX_TOKENS
from sd35trt.runtime.runners import ComponentRunner
from sd35trt.runtime.tiling import DEFAULT_TILE_PIXELS, tile_shapes, tiled_decode
from sd35trt.runtime.vram import Need, VramPlan

TILING = ("auto", "on", "off")
MAX_STEPS, MAX_GUIDANCE, MAX_BATCH = 500, 100.0, 16  # past these SD3.5 gives garbage, or runs for hours


@dataclass(frozen=True)
class GenerateRequest:
    """One generation. ``steps``/``guidance`` left as None take the model's own defaults (28 and 4.5;
    SD3.5-Large-Turbo: 4 and 0)."""

    prompt: str
    negative_prompt: str = ""
    steps: int | None = None
    guidance: float | None = None
    seed: int = 0
    height: int = 1024
    width: int = 1024
    batch: int = 1
    # A micro-batch of different images (generate --prompts): one prompt and one seed per image, each image's noise
    # drawn from its own seed, so an image is the same whatever batch it ran in (and `generate --prompt P --seed S`
    # makes it alone). Empty: ``batch`` images of ``prompt`` from one generator seeded ``seed``, as diffusers does.
    prompts: tuple[str, ...] = ()
    seeds: tuple[int, ...] = ()

    def __post_init__(self):
        if (self.prompts or self.seeds) and not len(self.prompts) == len(self.seeds) == self.batch:
            raise ValueError(f"prompts ({len(self.prompts)}) and seeds ({len(self.seeds)}) must be one per image "
                             f"of the batch ({self.batch})")
        for seed in self.seeds:
            check_seed(seed)
        """Reject bad requests before any work (diffusers' check_inputs, stricter: bounds past which SD3.5 can only
        give garbage or run for hours)."""
        if self.steps is not None and self.steps < 1:
            raise InvalidInputError(f"--steps {self.steps} must be ≥ 1", hint="SD3.5 uses 28-40 steps; e.g. --steps 28")
        if self.steps is not None and self.steps > MAX_STEPS:
            raise InvalidInputError(f"--steps {self.steps} is more than {MAX_STEPS}", hint="SD3.5 uses 28-40 steps")
        if self.guidance is not None and (not math.isfinite(self.guidance) or self.guidance < 0):
            raise InvalidInputError(f"--guidance {self.guidance} must be a finite number ≥ 0", hint="e.g. --guidance 4.5")
        if self.guidance is not None and self.guidance > MAX_GUIDANCE:
            raise InvalidInputError(f"--guidance {self.guidance:g} is more than {MAX_GUIDANCE:g}: the noise estimate "
                                    "overflows to NaN", hint="SD3.5 uses 3.5-7; e.g. --guidance 4.5")
        if not 1 <= self.batch <= MAX_BATCH:
            raise InvalidInputError(f"--batch {self.batch} is outside 1..{MAX_BATCH}", hint="e.g. --batch 1")
        check_seed(self.seed)
        check_pixels(self.height, "--height")
        check_pixels(self.width, "--width")

    def resolved(self, defaults: Defaults) -> GenerateRequest:
        return replace(self, steps=defaults.steps if self.steps is None else self.steps,
                       guidance=defaults.guidance if self.guidance is None else self.guidance)

    @property
    def cfg(self) -> bool:
        """Classifier-free guidance, as diffusers decides it (``guidance_scale > 1``)."""
        return (self.guidance if self.guidance is not None else 0.0) > 1.0


@dataclass(frozen=True)
class PlannedCall:
    """One network call the loop will make for a request: the symbolic dims and its input shapes."""

    component: str
    dims: dict[str, int]
    shapes: dict[str, tuple[int, ...]]


@dataclass
class GenerateResult:
    latents: Any
    images: Any  # decoded, in [-1, 1], NCHW float32 on the CPU
    pil: list[Any]
    timings: dict[str, float] = field(default_factory=dict)
    plan: dict[str, Any] | None = None


class Sd35Loop:
    """Prompt → image with classifier-free guidance and flow matching over ``runners``.

    ``assets`` supplies tokenizers, scheduler and VAE configuration (``PipelineAssets``: from a pipeline, a
    model without weights, or a bundle's ``assets/``); ``runners`` maps component → ComponentRunner (T5 may be
    absent: CLIP-only). ``plan`` (a ``VramPlan``) decides which runners stay loaded; ``vae_tiling`` is
    ``auto`` (tiles only for images larger than the decoder takes), ``on`` or ``off``.
    """

    def __init__(self, assets: PipelineAssets, runners: dict[str, ComponentRunner], ranges: ShapeRanges | None = None,
                 *, batch_text: bool = True, plan: VramPlan | None = None, vae_tiling: str = "auto"):
        from diffusers import FlowMatchEulerDiscreteScheduler
        from diffusers.image_processor import VaeImageProcessor

        if vae_tiling not in TILING:
            raise InvalidInputError(f"--vae-tiling {vae_tiling} is not one of {', '.join(TILING)}", hint="e.g. --vae-tiling auto")
        required = [c for c in COMPONENTS if c != "t5"]
        missing = [c for c in required if c not in runners]
        if missing:
            raise InvalidInputError(f"no runner for {', '.join(missing)}", hint="export/build every component (T5 alone may be left out)")
        self.assets = assets if "t5" in runners else assets.without_t5()
        self.runners = runners
        self.ranges = ranges or ShapeRanges()
        self.plan = plan
        self.vae_tiling = vae_tiling
        self.scheduler_class = FlowMatchEulerDiscreteScheduler
        self.vae_scale = assets.vae_scale
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale)
        self.latent_channels = assets.vae["latent_channels"]
        # One text-encoder call for negative+positive (faster); False encodes them apart as diffusers does,
        # which makes the torch runners bit-identical to StableDiffusion3Pipeline.
        self.batch_text = batch_text
        self._warned: set[tuple[str, str]] = set()

    @property
    def has_t5(self) -> bool:
        return "t5" in self.runners

    @property
    def device(self) -> str:
        """Where the loop keeps latents and runs the scheduler: the transformer's device."""
        return self.runners["transformer"].device

    # 0. what a request will run --------------------------------------------------------------------------

    def vae_tile(self, request: GenerateRequest) -> int | None:
        """Latent tile side of the VAE decode (None: decoded whole)."""
        side = self.ranges.vae_side
        profile = self.runners["vae_decoder"].profile
        if profile is not None and "latent" in profile:
            side = min(profile["latent"][-1][2], profile["latent"][-1][3]) * self.vae_scale
        needed = max(request.height, request.width) > side
        if self.vae_tiling == "off" or (self.vae_tiling == "auto" and not needed):
            if needed:
                raise InvalidInputError(f"{request.height}x{request.width} is larger than the VAE decoder takes whole "
                                        f"({side} px per side) and --vae-tiling is off", hint="use --vae-tiling auto")
            return None
        return min(side, DEFAULT_TILE_PIXELS) // self.vae_scale

    def planned_calls(self, request: GenerateRequest) -> list[PlannedCall]:
        """Every network call ``__call__`` makes for ``request``, with its input shapes: what the engine
        profiles are checked against before any work (``check``)."""
        request = request.resolved(self.assets.defaults)
        batch, cfg = request.batch, request.cfg
        text_batches = [2 * batch] if cfg and self.batch_text else [batch, batch] if cfg else [batch]
        lat_h, lat_w = request.height // self.vae_scale, request.width // self.vae_scale
        calls = []
        encoders = ("clip_l", "clip_g", "t5") if self.has_t5 else ("clip_l", "clip_g")

        def call(name: str, dims: dict[str, int]) -> PlannedCall:
            spec = SPECS[name]
            profile = self.runners[name].profile or {}
            shapes = {t.name: tuple(dims[d] if isinstance(d, str) and d in dims else _static(profile, t.name, i, d)
                                    for i, d in enumerate(t.shape)) for t in spec.inputs}
            return PlannedCall(name, dims, shapes)

        for n in text_batches:
            for name in encoders:
                calls.append(call(name, SPECS[name].concrete_dims(self.vae_scale, batch=n, height=request.height,
                                                                  width=request.width)))
        calls.append(call("transformer", SPECS["transformer"].concrete_dims(
            self.vae_scale, batch=2 * batch if cfg else batch, height=request.height, width=request.width)))
        tile = self.vae_tile(request)
        for th, tw in tile_shapes(lat_h, lat_w, tile) if tile else [(lat_h, lat_w)]:
            for images in sorted({len(c) for c in _chunks(list(range(batch)), self.vae_batch or batch)}):
                calls.append(call("vae_decoder", SPECS["vae_decoder"].concrete_dims(
                    self.vae_scale, batch=images, height=th * self.vae_scale, width=tw * self.vae_scale)))
        return calls

    @property
    def vae_batch(self) -> int | None:
        """Images per VAE decoder call: its profile's largest batch (None: any, a torch module)."""
        profile = self.runners["vae_decoder"].profile
        return int(profile["latent"][-1][0]) if profile is not None and "latent" in profile else None

    def check(self, request: GenerateRequest) -> None:
        """Refuse, before any work, a request some engine's profile would refuse (one line naming it)."""
        request = request.resolved(self.assets.defaults)
        problems = self.ranges.contains(batch=request.batch, height=request.height, width=request.width)
        for planned in [] if problems else self.planned_calls(request):
            problems += [f"{planned.component}: {why}" for why in self.runners[planned.component].accepts(planned.shapes)]
        if problems:
            raise InvalidInputError(f"request outside the exported/engine shape ranges: {'; '.join(dict.fromkeys(problems))}",
                                    hint=f"ranges are batch {self.ranges.batch}, height {self.ranges.height}, width "
                                         f"{self.ranges.width}; re-export with wider --height/--width/--batch to go beyond")

    def needs(self, request: GenerateRequest) -> dict[str, Need]:
        """What each network needs on the GPU for ``request`` (the VRAM plan's input): its weights, and its activations
        at the request's shapes, or at its profile's largest shapes for an engine, which allocates for those
        whatever it runs (static allocation: ``device_memory_size_v2``)."""
        found: dict[str, Need] = {}
        for planned in self.planned_calls(request):
            runner = self.runners[planned.component]
            spec = SPECS[planned.component]
            width = self.assets.widths.get(planned.component, 0)
            dims, at = planned.dims, "the request's shapes"
            if runner.static_activations and runner.profile:
                dims = spec.dims_of({name: shapes[-1] for name, shapes in runner.profile.items()}, self.vae_scale)
                at = "the profile's largest shapes (static allocation)"
            act = spec.activation_bytes(dims, width)
            old = found.get(planned.component)
            found[planned.component] = Need(planned.component, runner.weight_bytes,
                                            max(act, old.activations if old else 0), runner.streamable, at)
        return found

    def _finite(self, tensor: Any, what: str, request: GenerateRequest) -> None:
        """NaN/Inf in ``what`` stops the run before an image is written (it would be black), naming the likely cause:
        the guidance scale, the LoRA adapters fused into the model, the runner's reduced precision, or the weights."""
        import torch

        if bool(torch.isfinite(tensor).all()):
            return
        stage = what.split("'")[0].removeprefix("the ")
        component = {"text encoders": "clip_l", "transformer": "transformer", "VAE decoder": "vae_decoder"}[stage]
        runner = self.runners.get(component)
        precision = getattr(runner, "precision", "")
        lora = self.assets.model.get("lora") if isinstance(self.assets.model, dict) else None
        if request.guidance is not None and request.guidance > 20:
            cause = f"--guidance {request.guidance:g} is far past SD3.5's 3.5-7: use a smaller one"
        elif lora:
            cause = "the LoRA adapters fused into the model: try a smaller :scale, or the model without them"
        elif precision in ("fp16", "fp8"):
            cause = (f"an FP16 overflow in the {stage} ({precision}) outside its FP32 islands: run `sd35trt compare` "
                     "on these artifacts, or the same request with --torch")
        else:
            cause = f"the {stage} weights of this model (NaN/Inf in the checkpoint?): check the download"
        raise NonFiniteError(f"{what} are NaN/Inf ({request.height}x{request.width}, {request.steps} steps, guidance "
                             f"{request.guidance:g}); no image written", hint=f"likely cause: {cause}")

    # 1. text ---------------------------------------------------------------------------------------------

    def _tokens(self, tokenizer, prompts: list[str], max_length: int, label: str):
        ids = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                        return_tensors="pt").input_ids
        for prompt in dict.fromkeys(prompts):  # each distinct prompt once: its own text, never a padding row
            dropped = truncated_text(tokenizer, prompt, max_length)
            if dropped and (label, prompt) not in self._warned:  # CLIP-L and CLIP-G truncate alike: say it once
                self._warned.add((label, prompt))
                log.warn(f"prompt truncated to {max_length} {label} tokens (as diffusers does); dropped: "
                         f"{_clip_text(dropped)!r}")
        return ids

    def _loaded(self, name: str) -> ComponentRunner:
        """The runner of ``name``, loaded; under a sequential plan every other runner is released first."""
        runner = self.runners[name]
        if self.plan is not None and self.plan.sequential:
            for other, loaded in self.runners.items():
                if other != name and loaded.loaded:
                    loaded.unload()
        runner.load()
        return runner

    def encode_prompt(self, prompts: list[str]) -> tuple[Any, Any]:
        """prompt_embeds [B, 77+T5, D] and pooled [B, 768+1280] exactly as SD3's encode_prompt builds them, on
        the execution device."""
        import torch

        device = self.device
        tokenizers = self.assets.tokenizers
        clip_l = self._loaded("clip_l")(input_ids=self._tokens(tokenizers["clip_l"], prompts, CLIP_MAX_TOKENS, "CLIP"))
        clip_l = {k: v.to(device) for k, v in clip_l.items()}
        clip_g = self._loaded("clip_g")(input_ids=self._tokens(tokenizers["clip_g"], prompts, CLIP_MAX_TOKENS, "CLIP"))
        clip_g = {k: v.to(device) for k, v in clip_g.items()}
        if self.has_t5:
            t5_embeds = self._loaded("t5")(input_ids=self._tokens(tokenizers["t5"], prompts, T5_MAX_TOKENS, "T5"))[
                "last_hidden_state"].to(device)
        else:  # diffusers with text_encoder_3=None
            t5_embeds = torch.zeros(len(prompts), T5_MAX_TOKENS, self.assets.joint_attention_dim, device=device)
        clip_embeds = torch.cat([clip_l["hidden_states"], clip_g["hidden_states"]], dim=-1)
        clip_embeds = torch.nn.functional.pad(clip_embeds, (0, t5_embeds.shape[-1] - clip_embeds.shape[-1]))
        prompt_embeds = torch.cat([clip_embeds, t5_embeds], dim=-2)
        pooled = torch.cat([clip_l["text_embeds"], clip_g["text_embeds"]], dim=-1)
        return prompt_embeds, pooled

    # 6. decode ---------------------------------------------------------------------------------------------

    def decode(self, latents: Any, request: GenerateRequest) -> Any:
        """The pipeline's own un-scaling, then the VAE decoder whole or in tiles; images on the CPU."""
        import torch

        vae = self._loaded("vae_decoder")
        scaled = latents / self.assets.vae["scaling_factor"] + self.assets.vae["shift_factor"]
        tile = self.vae_tile(request)
        images = []
        for chunk in scaled.split(self.vae_batch or scaled.shape[0]):  # the decoder's profile takes vae_batch images
            if tile is None:  # a copy: an engine's output buffer is overwritten by its next call
                images.append(vae(latent=chunk.contiguous())["images"].to("cpu", torch.float32, copy=True))
            else:
                images.append(tiled_decode(lambda z: vae(latent=z.contiguous())["images"], chunk, tile=tile,
                                           scale=self.vae_scale).cpu())
        return torch.cat(images)

    # the whole call -------------------------------------------------------------------------------------

    def __call__(self, request: GenerateRequest, *, progress: bool = True) -> GenerateResult:
        import torch
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift, retrieve_timesteps
        from diffusers.utils.torch_utils import randn_tensor

        # 1. check inputs (every engine call against its profile)
        request = request.resolved(self.assets.defaults)
        self.check(request)
        timings: dict[str, float] = {}
        batch, cfg, device = request.batch, request.cfg, torch.device(self.device)

        # 2. encode prompt (negative and positive in one batch when guidance is on)
        start = _clock(device)
        prompts = list(request.prompts) or [request.prompt] * batch
        negatives = [request.negative_prompt] * batch
        if cfg and not self.batch_text:
            (neg_e, neg_p), (pos_e, pos_p) = self.encode_prompt(negatives), self.encode_prompt(prompts)
            embeds, pooled = torch.cat([neg_e, pos_e]), torch.cat([neg_p, pos_p])
        else:
            embeds, pooled = self.encode_prompt(negatives + prompts if cfg else prompts)
        self._finite(embeds, "the text encoders' embeddings", request)
        timings["text_encoders_s"] = _clock(device) - start

        # 3. prepare latents (diffusers' randn_tensor from a CPU generator, then on the device: the pipeline's noise)
        shape = (batch, self.latent_channels, request.height // self.vae_scale, request.width // self.vae_scale)
        if request.seeds:  # one generator per image: its noise does not depend on the batch it runs in
            latents = torch.cat([randn_tensor((1, *shape[1:]), generator=torch.Generator(device="cpu").manual_seed(s),
                                              device=device, dtype=torch.float32) for s in request.seeds])
        else:
            generator = torch.Generator(device="cpu").manual_seed(request.seed)
            latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)


        # 4. timesteps (on the device; dynamic shifting as the pipeline computes it)
        scheduler = self.scheduler_class.from_config(self.assets.scheduler)
        kwargs = {}
        if scheduler.config.get("use_dynamic_shifting", None):
            patch = self.assets.patch_size
            kwargs["mu"] = calculate_shift((shape[2] // patch) * (shape[3] // patch),
                                           scheduler.config.get("base_image_seq_len", 256),
                                           scheduler.config.get("max_image_seq_len", 4096),
                                           scheduler.config.get("base_shift", 0.5), scheduler.config.get("max_shift", 1.16))
        timesteps, _ = retrieve_timesteps(scheduler, request.steps, device, **kwargs)

        # 5. denoise: latents, guidance and the scheduler step stay on the device
        transformer = self._loaded("transformer")
        start = _clock(device)
        steps = _StepTimer(device)
        guidance = request.guidance
        with _progress(len(timesteps)) if progress else contextlib.nullcontext() as bar:
            for t in timesteps:
                steps.begin()
                model_input = torch.cat([latents] * 2) if cfg else latents
                timestep = t.expand(model_input.shape[0])
                noise = transformer(hidden_states=model_input, encoder_hidden_states=embeds, pooled_projections=pooled,
                                    timestep=timestep)["noise_pred"]
                if cfg:
                    uncond, text = noise.chunk(2)
                    noise = uncond + guidance * (text - uncond)
                latents = scheduler.step(noise, t, latents, return_dict=False)[0]
                steps.end()
                if progress:
                    bar.advance()
        timings["denoise_s"] = _clock(device) - start
        self._finite(latents, "the transformer's latents", request)
        step_times = steps.seconds()
        timings["step_median_s"] = sorted(step_times)[len(step_times) // 2]

        # 6. decode (the pipeline's own scaling and post-processing)
        start = _clock(device)
        images = self.decode(latents, request)
        self._finite(images, "the VAE decoder's image", request)
        timings["vae_decoder_s"] = _clock(device) - start
        if self.plan is not None and self.plan.sequential:
            self.runners["vae_decoder"].unload()
        pil = self.image_processor.postprocess(images, output_type="pil")
        timings["total_s"] = sum(v for k, v in timings.items() if k != "step_median_s")
        return GenerateResult(latents=latents.cpu(), images=images, pil=pil,
                              timings={k: round(v, 4) for k, v in timings.items()},
                              plan=self.plan.to_dict() if self.plan is not None else None)


def _chunks(items: list[Any], size: int) -> list[list[Any]]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def _static(profile: dict[str, Any], tensor: str, index: int, dim: Any) -> int:
    """A fixed width of an input shape: from the engine's profile (every shape in it has it), else -1."""
    if isinstance(dim, int):
        return dim
    shapes = profile.get(tensor)
    return int(shapes[0][index]) if shapes else -1


def truncated_text(tokenizer: Any, prompt: str, max_length: int) -> str:
    """The part of ``prompt`` past ``max_length`` tokens (special tokens included), cut from the prompt itself at
    the first token the text encoder never sees. Empty when the prompt fits."""
    encoded = tokenizer(prompt, add_special_tokens=True, return_offsets_mapping=True)
    if len(encoded.input_ids) <= max_length:
        return ""
    kept = [end for start, end in encoded.offset_mapping[: max_length - 1] if end > start]
    return prompt[max(kept, default=0):].strip()


def _clip_text(text: str, limit: int = 80) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _clock(device: Any) -> float:
    """A wall clock that waits for the device (so stage times are real on a GPU)."""
    if getattr(device, "type", device) == "cuda":
        import torch

        torch.cuda.synchronize()
    return time.perf_counter()


class _StepTimer:
    """Per-step times without a host sync per step: CUDA events on a GPU (read once, after the loop)."""

    def __init__(self, device: Any):
        self.cuda = getattr(device, "type", device) == "cuda"
        self.marks: list[Any] = []

    def _mark(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        import torch

        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def begin(self) -> None:
        self.marks.append([self._mark(), None])

    def end(self) -> None:
        self.marks[-1][1] = self._mark()

    def seconds(self) -> list[float]:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            return [a.elapsed_time(b) / 1000.0 for a, b in self.marks]
        return [b - a for a, b in self.marks]


class _progress:
    """A rich progress bar on stderr, one tick per denoising step."""

    def __init__(self, total: int):
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(TextColumn("denoise"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                                 TimeElapsedColumn(), console=log.console, transient=True)
        self.total = total

    def __enter__(self):
        self.progress.start()
        self.task = self.progress.add_task("denoise", total=self.total)
        return self

    def advance(self):
        self.progress.advance(self.task)

    def __exit__(self, *exc):
        self.progress.stop()
        return False
