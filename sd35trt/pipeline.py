"""The sd35trt denoising loop: SD3's ``__call__`` as numbered steps over swappable component runners.

Tokenizers, scheduler, latent preparation and image post-processing are diffusers' own objects
(``CLIPTokenizer``, ``T5TokenizerFast``, ``FlowMatchEulerDiscreteScheduler``, ``randn_tensor``,
``VaeImageProcessor``); only the five networks go through runners. With torch runners this is the same
math as ``StableDiffusion3Pipeline`` (the test suite checks it), so any difference measured with ONNX or
engine runners is the runners' own.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Any

from sd35trt import log
from sd35trt.errors import InvalidInputError
from sd35trt.models import CLIP_MAX_TOKENS, T5_MAX_TOKENS
from sd35trt.runners import ComponentRunner
from sd35trt.specs import COMPONENTS, ShapeRanges, check_pixels, vae_input


@dataclass(frozen=True)
class GenerateRequest:
    prompt: str
    negative_prompt: str = ""
    steps: int = 28
    guidance: float = 4.5
    seed: int = 0
    height: int = 1024
    width: int = 1024
    batch: int = 1

    def __post_init__(self):
        """Reject bad requests before any work (diffusers' check_inputs, stricter)."""
        if self.steps < 1:
            raise InvalidInputError(f"--steps {self.steps} must be ≥ 1", hint="SD3.5 uses 28-40 steps; e.g. --steps 28")
        if not math.isfinite(self.guidance) or self.guidance < 0:
            raise InvalidInputError(f"--guidance {self.guidance} must be a finite number ≥ 0", hint="e.g. --guidance 4.5")
        if self.batch < 1:
            raise InvalidInputError(f"--batch {self.batch} must be ≥ 1", hint="e.g. --batch 1")
        check_pixels(self.height, "--height")
        check_pixels(self.width, "--width")

    def check(self, ranges: ShapeRanges) -> None:
        """The request must fit the shape ranges the ONNX/engines were built for."""
        problems = ranges.contains(batch=self.batch, height=self.height, width=self.width)
        if problems:
            raise InvalidInputError(f"request outside the exported/engine shape ranges: {'; '.join(problems)}",
                                    hint=f"ranges are batch {ranges.batch}, height {ranges.height}, width {ranges.width}; "
                                         "re-export with wider --height/--width/--batch to go beyond")


@dataclass
class GenerateResult:
    latents: Any
    images: Any  # decoded, in [-1, 1], NCHW float32
    pil: list[Any]
    timings: dict[str, float] = field(default_factory=dict)


class Sd35Loop:
    """Prompt → image with classifier-free guidance and flow matching over ``runners``.

    ``pipe`` supplies tokenizers, scheduler config and VAE config (a pipeline built with no networks
    costs nothing); ``runners`` maps component → ComponentRunner.
    """

    def __init__(self, pipe: Any, runners: dict[str, ComponentRunner], ranges: ShapeRanges | None = None,
                 *, batch_text: bool = True):
        from diffusers import FlowMatchEulerDiscreteScheduler
        from diffusers.image_processor import VaeImageProcessor

        from sd35trt.models import vae_scale_factor

        missing = [c for c in COMPONENTS if c not in runners]
        if missing:
            raise InvalidInputError(f"no runner for {', '.join(missing)}", hint="export/build every component")
        self.pipe = pipe
        self.runners = runners
        self.ranges = ranges or ShapeRanges()
        self.scheduler_config = pipe.scheduler.config
        self.scheduler_class = FlowMatchEulerDiscreteScheduler
        self.vae_config = pipe.vae.config
        self.vae_scale = vae_scale_factor(pipe)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale)
        self.latent_channels = pipe.vae.config.latent_channels
        # One text-encoder call for negative+positive (faster); False encodes them apart as diffusers does,
        # which makes the torch runners bit-identical to StableDiffusion3Pipeline.
        self.batch_text = batch_text
        self._warned: set[tuple[str, str]] = set()

    # 1. text ------------------------------------------------------------------------------------------

    def _tokens(self, tokenizer, prompts: list[str], max_length: int, label: str):
        ids = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                        return_tensors="pt").input_ids
        full = tokenizer(prompts, padding="longest", return_tensors="pt").input_ids
        if full.shape[-1] > ids.shape[-1]:
            removed = tokenizer.batch_decode(full[:, max_length - 1: -1])
            if (label, prompts[0]) not in self._warned:  # CLIP-L and CLIP-G truncate alike: say it once
                self._warned.add((label, prompts[0]))
                dropped = " ".join(removed[0].split())[:80]
                log.warn(f"prompt truncated to {max_length} {label} tokens (as diffusers does); dropped: {dropped!r}")
        return ids

    def encode_prompt(self, prompts: list[str]) -> tuple[Any, Any]:
        """prompt_embeds [B, 77+T5, D] and pooled [B, 768+1280] exactly as SD3's encode_prompt builds them."""
        import torch

        pipe = self.pipe
        clip_l = self.runners["clip_l"](input_ids=self._tokens(pipe.tokenizer, prompts, CLIP_MAX_TOKENS, "CLIP"))
        clip_g = self.runners["clip_g"](input_ids=self._tokens(pipe.tokenizer_2, prompts, CLIP_MAX_TOKENS, "CLIP"))
        t5 = self.runners["t5"](input_ids=self._tokens(pipe.tokenizer_3, prompts, T5_MAX_TOKENS, "T5"))
        t5_embeds = t5["last_hidden_state"].cpu()
        clip_embeds = torch.cat([clip_l["hidden_states"].cpu(), clip_g["hidden_states"].cpu()], dim=-1)
        clip_embeds = torch.nn.functional.pad(clip_embeds, (0, t5_embeds.shape[-1] - clip_embeds.shape[-1]))
        prompt_embeds = torch.cat([clip_embeds, t5_embeds], dim=-2)
        pooled = torch.cat([clip_l["text_embeds"].cpu(), clip_g["text_embeds"].cpu()], dim=-1)
        return prompt_embeds, pooled

    # the whole call -------------------------------------------------------------------------------------

    def __call__(self, request: GenerateRequest, *, progress: bool = True) -> GenerateResult:
        import torch
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import retrieve_timesteps
        from diffusers.utils.torch_utils import randn_tensor

        # 1. check inputs
        request.check(self.ranges)
        timings: dict[str, float] = {}
        batch, cfg = request.batch, request.guidance > 1.0

        # 2. encode prompt (negative and positive in one batch when guidance is on)
        start = time.perf_counter()
        prompts = [request.prompt] * batch
        negatives = [request.negative_prompt] * batch
        if cfg and not self.batch_text:
            (neg_e, neg_p), (pos_e, pos_p) = self.encode_prompt(negatives), self.encode_prompt(prompts)
            embeds, pooled = torch.cat([neg_e, pos_e]), torch.cat([neg_p, pos_p])
        else:
            embeds, pooled = self.encode_prompt(negatives + prompts if cfg else prompts)
        timings["text_encoders_s"] = time.perf_counter() - start

        # 3. prepare latents (diffusers' randn_tensor on a CPU generator: the same noise as the pipeline)
        generator = torch.Generator(device="cpu").manual_seed(request.seed)
        shape = (batch, self.latent_channels, request.height // self.vae_scale, request.width // self.vae_scale)
        latents = randn_tensor(shape, generator=generator, device=torch.device("cpu"), dtype=torch.float32)

        # 4. timesteps
        scheduler = self.scheduler_class.from_config(self.scheduler_config)
        timesteps, _ = retrieve_timesteps(scheduler, request.steps, "cpu")

        # 5. denoise
        start = time.perf_counter()
        step_times = []
        transformer = self.runners["transformer"]
        with _progress(len(timesteps)) if progress else contextlib.nullcontext() as bar:
            for t in timesteps:
                step_start = time.perf_counter()
                model_input = torch.cat([latents] * 2) if cfg else latents
                timestep = t.expand(model_input.shape[0])
                noise = transformer(hidden_states=model_input, encoder_hidden_states=embeds,
                                    pooled_projections=pooled, timestep=timestep)["noise_pred"].cpu()
                if cfg:
                    uncond, text = noise.chunk(2)
                    noise = uncond + request.guidance * (text - uncond)
                latents = scheduler.step(noise, t, latents, return_dict=False)[0]
                step_times.append(time.perf_counter() - step_start)
                if progress:
                    bar.advance()
        timings["denoise_s"] = time.perf_counter() - start
        timings["step_median_s"] = sorted(step_times)[len(step_times) // 2]

        # 6. decode (the pipeline's own scaling and post-processing)
        start = time.perf_counter()
        scaled = vae_input(latents, self.vae_config)
        images = self.runners["vae_decoder"](latent=scaled)["images"].cpu()
        timings["vae_decoder_s"] = time.perf_counter() - start
        pil = self.image_processor.postprocess(images, output_type="pil")
        timings["total_s"] = sum(v for k, v in timings.items() if k != "step_median_s")
        return GenerateResult(latents=latents, images=images, pil=pil, timings={k: round(v, 4) for k, v in timings.items()})


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
