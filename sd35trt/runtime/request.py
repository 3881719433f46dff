"""What one run asks for and what it will run, before any loop exists: the request (``GenerateRequest``, resolved
once against the model's defaults) and the loop's shape (``LoopShape``: assets, runner profiles, ranges), from
which the network calls, the profile check and the VRAM needs follow as plain functions of data. ``open_loop``
plans VRAM from these, then builds the loop with its plan; ``doctor`` and the torch runner's plan use them with
runners that only carry sizes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from sd35trt.core.assets import PipelineAssets
from sd35trt.core.errors import InvalidInputError, check_seed
from sd35trt.core.presets import Defaults
from sd35trt.core.shapes import ShapeRanges, check_pixels
from sd35trt.core.specs import SPECS
from sd35trt.runtime.runners import ComponentRunner
from sd35trt.runtime.tiling import DEFAULT_TILE_PIXELS, tile_shapes
from sd35trt.runtime.vram import Need

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
        """Steps and guidance the model's defaults where not given: what every call plan and check reads."""
        return replace(self, steps=defaults.steps if self.steps is None else self.steps,
                       guidance=defaults.guidance if self.guidance is None else self.guidance)

    @property
    def is_resolved(self) -> bool:
        return self.steps is not None and self.guidance is not None

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


@dataclass(frozen=True)
class LoopShape:
    """What decides the network calls of a request: the pipeline assets (VAE scale, defaults, widths; without T5's
    tokenizer when no T5 runner is given: CLIP-only), each runner's profile, weights and activation policy (sizes are
    enough: no engine is loaded), the shape ranges, text batching and VAE tiling. Its methods take a request already
    ``resolve``d, once, by whoever runs it."""

    assets: PipelineAssets
    runners: dict[str, ComponentRunner]
    ranges: ShapeRanges = field(default_factory=ShapeRanges)
    batch_text: bool = True  # one text-encoder call for negative and positive prompts
    vae_tiling: str = "auto"

    def __post_init__(self):
        if "t5" not in self.runners:
            object.__setattr__(self, "assets", self.assets.without_t5())
        if self.vae_tiling not in TILING:
            raise InvalidInputError(f"--vae-tiling {self.vae_tiling} is not one of {', '.join(TILING)}",
                                    hint="e.g. --vae-tiling auto")

    @property
    def has_t5(self) -> bool:
        return "t5" in self.runners

    @property
    def vae_scale(self) -> int:
        return self.assets.vae_scale

    def resolve(self, request: GenerateRequest) -> GenerateRequest:
        return request.resolved(self.assets.defaults)

    # what a request will run --------------------------------------------------------------------------

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
        _require_resolved(request)
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
        _require_resolved(request)
        problems = self.ranges.contains(batch=request.batch, height=request.height, width=request.width)
        for planned in [] if problems else self.planned_calls(request):
            problems += [f"{planned.component}: {why}" for why in self.runners[planned.component].accepts(planned.shapes)]
        if problems:
            raise InvalidInputError(f"request outside the exported/engine shape ranges: {'; '.join(dict.fromkeys(problems))}",
                                    hint=f"ranges are batch {self.ranges.batch}, height {self.ranges.height}, width "
                                         f"{self.ranges.width}; re-export with wider --height/--width/--batch to go beyond")

    def needs(self, request: GenerateRequest, *, fitted: bool = False) -> dict[str, Need]:
        """What each network needs on the GPU for ``request`` (the VRAM plan's input): its weights, and its activations
        at the request's shapes, or at its profile's largest shapes for an engine, which allocates for those
        whatever it runs (static allocation: ``device_memory_size_v2``). ``fitted``: as if every engine's profile
        ended at this request (doctor's rebuild estimate)."""
        found: dict[str, Need] = {}
        for planned in self.planned_calls(request):
            runner = self.runners[planned.component]
            spec = SPECS[planned.component]
            width = self.assets.widths.get(planned.component, 0)
            at_max = bool(runner.static_activations and runner.profile and not fitted)
            dims = spec.dims_of({name: shapes[-1] for name, shapes in runner.profile.items()}, self.vae_scale) \
                if at_max else planned.dims
            act = spec.activation_bytes(dims, width)
            old = found.get(planned.component)
            found[planned.component] = Need(planned.component, runner.weight_bytes,
                                            max(act, old.activations if old else 0), runner.streamable, at_max)
        return found


def _chunks(items: list[Any], size: int) -> list[list[Any]]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def _static(profile: Mapping[str, Any], tensor: str, index: int, dim: Any) -> int:
    """A fixed width of an input shape: from the engine's profile (every shape in it has it), else -1."""
    if isinstance(dim, int):
        return dim
    shapes = profile.get(tensor)
    return int(shapes[0][index]) if shapes else -1




def _require_resolved(request: GenerateRequest) -> None:
    if not request.is_resolved:
        raise ValueError("resolve the request first (LoopShape.resolve): steps and guidance are the model's defaults")

