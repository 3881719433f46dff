"""The shapes users ask engines for: image sizes in steps of 64 px, ``Range`` (min/opt/max of one axis) and
``ShapeRanges`` (batch, height, width, T5 tokens, the VAE's side), parsed from the CLI's ``MIN:OPT:MAX`` and checked
against what SD3.5 and the model take. ``ComponentSpec`` (``specs``) turns them into per-tensor shapes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sd35trt.core.errors import InvalidInputError
from sd35trt.core.tokenizers import T5_MAX_TOKENS

PIXEL_STEP = 64  # engines are built for sizes in steps of 64 px, as SD3.5 is trained on
MIN_PIXELS, MAX_PIXELS = 512, 1536  # SD3's ~1 MP aspect buckets reach 1536 px per side (1536x640)
OPT_PIXELS = 1024
DEFAULT_VAE_SIDE = 1024  # the VAE decoder's profile stops here by default; larger images are tiled (ShapeRanges)


@dataclass(frozen=True)
class Range:
    min: int
    opt: int
    max: int

    def __post_init__(self):
        if not (self.min <= self.opt <= self.max):
            raise InvalidInputError(f"range {self.min}:{self.opt}:{self.max} is not ordered min ≤ opt ≤ max",
                                    hint="pass MIN:OPT:MAX with MIN ≤ OPT ≤ MAX")

    @classmethod
    def parse(cls, text: str, option: str) -> Range:
        """Parse ``N`` or ``MIN:MAX`` or ``MIN:OPT:MAX`` (opt defaults to max)."""
        example = "1:1:4" if "batch" in option else "512:1024:1024"
        try:
            values = [int(v) for v in str(text).split(":")]
        except ValueError:
            raise InvalidInputError(f"{option} '{text}' is not N, MIN:MAX or MIN:OPT:MAX of integers",
                                    hint=f"e.g. {option} {example}") from None
        if len(values) == 1:
            return cls(values[0], values[0], values[0])
        if len(values) == 2:
            return cls(values[0], values[1], values[1])
        if len(values) == 3:
            return cls(*values)
        raise InvalidInputError(f"{option} '{text}' has {len(values)} fields",
                                hint=f"use N, MIN:MAX or MIN:OPT:MAX, e.g. {option} {example}")

    def scaled(self, factor: int) -> Range:
        return Range(self.min * factor, self.opt * factor, self.max * factor)

    def __str__(self) -> str:
        return f"{self.min}:{self.opt}:{self.max}"


@dataclass(frozen=True)
class ShapeRanges:
    """What engines must accept: images per prompt (batch), pixel height/width, T5 tokens.

    With classifier-free guidance the text encoders and the transformer see twice the images (negative and
    positive prompt in one call), without it (guidance ≤ 1, Turbo) the images as they are, and compare's and
    diffusers' own loop encode one prompt at a time: their profiles take batch 1 up to twice the largest
    batch, optimised for the doubled batch unless ``cfg`` is off (a Turbo bundle).

    The VAE decoder's profile is narrower by default: one image (``vae_batch``) of at most 1024 px per side
    (``vae_max``; larger images are decoded in tiles, more images one after another). A TensorRT engine allocates
    its activation memory for the largest shape of its profile whatever it is asked to run (static allocation), and
    the VAE decoder's is the largest of all: about 2.6 KB per output pixel (measured, SD3.5 VAE, BF16), so the
    profile of 4 images at 1536² would hold 23 GiB for a decode that needs 2.6 GiB at one 1024² image.
    """

    batch: Range = Range(1, 1, 4)
    height: Range = Range(MIN_PIXELS, OPT_PIXELS, MAX_PIXELS)
    width: Range = Range(MIN_PIXELS, OPT_PIXELS, MAX_PIXELS)
    t5_tokens: Range = Range(T5_MAX_TOKENS, T5_MAX_TOKENS, T5_MAX_TOKENS)
    cfg: bool = True  # optimise the text encoders and the transformer for guidance (the opt batch doubled)
    vae_max: int = 0  # the VAE decoder's largest side in pixels (0: DEFAULT_VAE_SIDE, within the height/width range)
    vae_batch: int = 1  # images per VAE decoder call

    def __post_init__(self):
        if self.batch.min < 1 or self.batch.max > 16:
            raise InvalidInputError(f"--batch {self.batch} is outside 1..16", hint="use e.g. --batch 1:1:4")
        for option, rng in (("--height", self.height), ("--width", self.width)):
            for value in (rng.min, rng.opt, rng.max):
                check_pixels(value, option)
        if self.t5_tokens.min < 1 or self.t5_tokens.max > T5_MAX_TOKENS:
            raise InvalidInputError(f"--t5-tokens {self.t5_tokens} is outside 1..{T5_MAX_TOKENS}",
                                    hint=f"SD3.5 uses up to {T5_MAX_TOKENS} T5 tokens")
        if self.vae_max:
            check_pixels(self.vae_max, "--vae-max")
            if self.vae_max < max(self.height.min, self.width.min):
                raise InvalidInputError(f"--vae-max {self.vae_max} is below the smallest image side "
                                        f"{max(self.height.min, self.width.min)}", hint="raise it, or leave it out")
        if not 1 <= self.vae_batch <= self.batch.max:
            raise InvalidInputError(f"--vae-batch {self.vae_batch} is outside 1..{self.batch.max} (the --batch maximum)",
                                    hint="e.g. --vae-batch 1")

    @property
    def vae_side(self) -> int:
        """The largest side the VAE decoder takes whole: ``vae_max``, else 1024 px within the image range."""
        if self.vae_max:
            return self.vae_max
        largest, smallest = max(self.height.max, self.width.max), max(self.height.min, self.width.min)
        return max(min(largest, DEFAULT_VAE_SIDE), smallest)

    def vae_range(self, which: Range) -> Range:
        top = min(which.max, self.vae_side)
        return Range(which.min, min(which.opt, top), top)

    def to_dict(self) -> dict[str, Any]:
        return {"batch": str(self.batch), "height": str(self.height), "width": str(self.width),
                "t5_tokens": str(self.t5_tokens), "cfg": self.cfg, "vae_max": self.vae_max, "vae_batch": self.vae_batch,
                "vae_side": self.vae_side}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ShapeRanges:
        """What ``to_dict`` wrote; a record from before the VAE profile was narrowed (no ``vae_batch``) means what
        it meant then: the VAE decoder took the whole batch, up to the image ranges' own maximum."""
        fixed = ("cfg", "vae_max", "vae_batch", "vae_side")
        ranges = {k: Range.parse(v, f"--{k.replace('_', '-')}") for k, v in data.items() if k not in fixed}
        if "vae_batch" in data:
            return cls(**ranges, cfg=bool(data.get("cfg", True)), vae_max=int(data.get("vae_max", 0)),
                       vae_batch=int(data["vae_batch"]))
        default = cls()
        batch = ranges.get("batch", default.batch)
        height, width = ranges.get("height", default.height), ranges.get("width", default.width)
        return cls(**ranges, cfg=bool(data.get("cfg", True)),
                   vae_max=int(data.get("vae_max", 0) or max(height.max, width.max)), vae_batch=batch.max)

    def contains(self, *, batch: int, height: int, width: int, t5_tokens: int = T5_MAX_TOKENS) -> list[str]:
        """Reasons a concrete request falls outside these ranges (empty when it fits)."""
        problems = []
        for name, value, rng in (("batch", batch, self.batch), ("height", height, self.height),
                                 ("width", width, self.width), ("T5 tokens", t5_tokens, self.t5_tokens)):
            if not rng.min <= value <= rng.max:
                problems.append(f"{name} {value} outside {rng.min}..{rng.max}")
        return problems


def check_model_side(ranges: ShapeRanges, largest: int | None, model: str) -> None:
    """Refuse ranges past the largest side ``model`` takes (``ModelSource.largest_side``) before any work: an
    engine would accept the shape and then fail inside the network."""
    if largest is None:
        return
    top = max(ranges.height.max, ranges.width.max)
    if top > largest:
        raise InvalidInputError(f"--height/--width reach {top} px, but {model} takes at most {largest} px per side "
                                "(its transformer's position table, pos_embed_max_size)",
                                hint=f"keep the --height/--width maximum at {largest} or below")


def check_pixels(value: int, option: str) -> None:
    """Reject sizes SD3.5 can't take, suggesting the nearest valid one (diffusers' check_inputs does the same)."""
    if value % 16 != 0:
        nearest = max(MIN_PIXELS, min(MAX_PIXELS, round(value / PIXEL_STEP) * PIXEL_STEP))
        raise InvalidInputError(f"{option} {value} is not divisible by 16",
                                hint=f"SD3.5 needs multiples of 16 (VAE ×8, patch ×2); try {nearest}")
    if not MIN_PIXELS // 2 <= value <= 2 * MAX_PIXELS:
        raise InvalidInputError(f"{option} {value} is outside {MIN_PIXELS // 2}..{2 * MAX_PIXELS} px",
                                hint=f"SD3.5 is trained for about 1 megapixel, {MIN_PIXELS}..{MAX_PIXELS} px per side")
