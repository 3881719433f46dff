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
import time
from dataclasses import dataclass, field
from typing import Any

from sd35trt.core import log
from sd35trt.core.assets import PipelineAssets
from sd35trt.core.errors import InvalidInputError, NonFiniteError
from sd35trt.core.shapes import ShapeRanges
from sd35trt.core.specs import COMPONENTS
from sd35trt.core.tokenizers import CLIP_MAX_TOKENS, T5_MAX_TOKENS
from sd35trt.runtime.request import GenerateRequest, LoopShape, PlannedCall
from sd35trt.runtime.runners import ComponentRunner
from sd35trt.runtime.tiling import tiled_decode
from sd35trt.runtime.vram import Need, VramPlan


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

        required = [c for c in COMPONENTS if c != "t5"]
        missing = [c for c in required if c not in runners]
        if missing:
            raise InvalidInputError(f"no runner for {', '.join(missing)}", hint="export/build every component (T5 alone may be left out)")
        self.runners = runners
        # One text-encoder call for negative+positive (faster); False encodes them apart as diffusers does,
        # which makes the torch runners bit-identical to StableDiffusion3Pipeline.
        self.shape = LoopShape(assets, runners, ranges or ShapeRanges(), batch_text, vae_tiling)
        self.assets = self.shape.assets  # without T5's tokenizer when there is no T5 runner
        self.plan = plan
        if plan is not None and plan.streaming_budget is not None:  # before any engine loads
            runners["transformer"].set_streaming_budget(plan.streaming_budget)
        self.scheduler_class = FlowMatchEulerDiscreteScheduler
        self.vae_scale = assets.vae_scale
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale)
        self.latent_channels = assets.vae["latent_channels"]
        self._warned: set[tuple[str, str]] = set()

    @property
    def has_t5(self) -> bool:
        return "t5" in self.runners

    @property
    def device(self) -> str:
        """Where the loop keeps latents and runs the scheduler: the transformer's device."""
        return self.runners["transformer"].device

    @property
    def ranges(self) -> ShapeRanges:
        return self.shape.ranges

    @property
    def batch_text(self) -> bool:
        return self.shape.batch_text

    # what a request will run (each resolves the request, then asks the loop's shape) --------------------------

    def check(self, request: GenerateRequest) -> None:
        """Refuse, before any work, a request some engine's profile would refuse (one line naming it)."""
        self.shape.check(self.shape.resolve(request))

    def planned_calls(self, request: GenerateRequest) -> list[PlannedCall]:
        return self.shape.planned_calls(self.shape.resolve(request))

    def needs(self, request: GenerateRequest) -> dict[str, Need]:
        return self.shape.needs(self.shape.resolve(request))

    def vae_tile(self, request: GenerateRequest) -> int | None:
        return self.shape.vae_tile(request)

    @property
    def vae_batch(self) -> int | None:
        return self.shape.vae_batch

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
        tile = self.shape.vae_tile(request)
        images = []
        for chunk in scaled.split(self.shape.vae_batch or scaled.shape[0]):  # the decoder's profile takes vae_batch images
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

        # 1. check inputs (every engine call against its profile), the request resolved once
        request = self.shape.resolve(request)
        self.shape.check(request)
        timings: dict[str, float] = {}
        batch, cfg, device = request.batch, request.cfg, torch.device(self.device)

        # 2. encode prompt (negative and positive in one batch when guidance is on)
        start = _clock(device)
        prompts = list(request.prompts) or [request.prompt] * batch
        negatives = [request.negative_prompt] * batch
        if cfg and not self.shape.batch_text:
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
