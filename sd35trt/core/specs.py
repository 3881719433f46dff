"""One ``ComponentSpec`` per exported network: the single place a name, an axis or a shape range lives.

Export (input/output names, dynamic axes, dummy inputs), validation and comparison (tolerances), engine
optimisation profiles (min/opt/max shapes) and the runtime (binding names, dtypes) all read these specs.
Shape ranges are user-facing (batch, image height/width, T5 tokens) and turned into per-tensor shapes here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any

from sd35trt.core.errors import InvalidInputError
from sd35trt.core.shapes import Range, ShapeRanges
from sd35trt.core.tokenizers import CLIP_MAX_TOKENS, T5_MAX_TOKENS
from sd35trt.core.wrappers import clip_wrapper, t5_wrapper, transformer_wrapper, vae_decoder_wrapper

if TYPE_CHECKING:
    import torch
    from diffusers import StableDiffusion3Pipeline

class Precision(str, Enum):
    FP32 = "fp32"
    FP16 = "fp16"
    FP8 = "fp8"  # E4M3 weights and activations, per-tensor scales (ModelOpt max calibration)
    INT4 = "int4"  # weight-only INT4, blocks of up to 128 input channels, AWQ (activations FP16)
    NVFP4 = "nvfp4"  # weight-only FP4 (E2M1), FP8 scales per 16 weights and one FP32 scale (activations FP16)
    MIXED = "mixed"  # FP8 GEMMs, and INT4 weight-only (AWQ) in the layers chosen to meet a size budget
    INT8 = "int8"  # weight-only INT8, one scale per output channel (activations FP16); no calibration: asked per component
    BF16 = "bf16"  # diffusers' modules on the GPU (the torch runner, its peers); never an ONNX or engine precision

    @property
    def quantized(self) -> bool:
        """A calibrated format (its ONNX carries Q/DQ nodes); FP16/FP32 are plain casts."""
        return self in QUANTIZED

    @property
    def low_bit(self) -> bool:
        """Weights stored below 16 bits (a calibrated format, or INT8 weight-only): a GPU must run its GEMMs."""
        return self in QUANTIZED or self is Precision.INT8

    def __str__(self) -> str:  # "fp8" in messages and f-strings, as in manifests (Python's default: "Precision.FP8")
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


QUANTIZED = (Precision.FP8, Precision.INT4, Precision.NVFP4, Precision.MIXED)
# What ONNX variants, engines and their manifests may carry (BF16 runs only as torch modules).
ARTIFACT_PRECISIONS = (Precision.FP32, Precision.FP16, Precision.INT8, *QUANTIZED)


def precision_of_dtype(dtype: Any) -> Precision:
    """The precision a torch module runs in, from its dtype (``torch.bfloat16`` → BF16)."""
    name = str(dtype).removeprefix("torch.")
    return {"float32": Precision.FP32, "float16": Precision.FP16, "bfloat16": Precision.BF16}[name]


@dataclass(frozen=True)
class Tolerance:
    """Pass when rel-L2 ≤ ``rel_l2`` and max-abs ≤ ``max_abs``·max(1, max|ref|) and nothing is NaN/Inf."""

    rel_l2: float
    max_abs: float

    def scaled_max_abs(self, ref_absmax: float) -> float:
        return self.max_abs * max(1.0, ref_absmax)


# Activation estimates (16-bit activations) for VRAM plans; see ComponentSpec.activation_bytes. Measured with torch's
# allocator on the H200, SD3.5-Medium shapes, BF16, 1024² (bench/activation_peaks.py, docs/BENCHMARKS.md round 9):
# transformer 0.334 GiB at batch 2 (26 bytes per token-channel), CLIP-L 0.038 GiB at batch 2 (345), VAE decoder
# 2.38 GiB (2550 bytes per pixel); rounded up.
ACTIVATION_PER_TOKEN_CHANNEL = 27.0
TEXT_ACTIVATION_PER_TOKEN_CHANNEL = 360.0
VAE_ACTIVATION_PER_PIXEL = 2600.0

# Axes that vary at run time; every other string in a TensorSpec shape is a width read off the model config.
DYNAMIC_DIMS = ("batch", "latent_height", "latent_width", "height", "width", "t5_tokens", "text_tokens")


@dataclass(frozen=True)
class TensorSpec:
    """One ONNX input or output: name, dtype and symbolic shape (strings are dynamic axes)."""

    name: str
    dtype: str  # numpy dtype name
    shape: tuple[str | int, ...]  # DYNAMIC_DIMS names, config width names, or fixed ints
    value_range: tuple[float, float] | None = None  # uniform dummy values (else standard normal)


@dataclass(frozen=True)
class ComponentSpec:
    name: str
    pipeline_attr: str  # attribute of StableDiffusion3Pipeline holding the network
    description: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    wrapper: Callable[[Any], torch.nn.Module]  # network -> module with exactly the ONNX signature
    tolerances: dict[Precision, Tolerance] = field(default_factory=dict)
    # Exact, export-only rewrites of the network for the shape ranges being exported (see crop_pos_embed).
    export_context: Callable[[Any, ShapeRanges, PipeDims], Any] | None = None
    calibratable: bool = False  # ModelOpt FP8 calibration applies (the VAE decoder stays FP16: conv-bound)
    cfg_batch: bool = True  # sees the classifier-free-guidance batch (2x images); the VAE sees the images
    # Modules that run as one FP32 island when an activation inside them leaves FP16 range (regexes over
    # dotted module names; see numerics.plan_islands). SD3's joint block, as NVIDIA's demo upcasts it; T5's
    # sub-layer, since TensorRT-RTX 1.7 crashes building an FP32 T5 attention inside an FP16 graph.
    island_units: tuple[str, ...] = ()
    # GPU activation memory of one call, for VRAM plans (``activation_bytes``): bytes per token per channel of
    # the network's width (transformer, text encoders) or per output pixel (VAE decoder).
    activation_factor: float = ACTIVATION_PER_TOKEN_CHANNEL

    def activation_bytes(self, dims: dict[str, int], width: int) -> int:
        """Estimated activation memory of one call at ``dims`` for a network ``width`` channels wide."""
        batch = dims["batch"]
        if self.name == "vae_decoder":
            return int(self.activation_factor * batch * dims["height"] * dims["width"])
        if self.name == "transformer":
            tokens = (dims["latent_height"] // 2) * (dims["latent_width"] // 2) + dims["text_tokens"]
        else:
            tokens = dims["t5_tokens"] if self.name == "t5" else CLIP_MAX_TOKENS

        return int(self.activation_factor * batch * tokens * width)

    def dims_of(self, shapes: dict[str, Any], vae_scale: int) -> dict[str, int]:
        """The symbolic dims of a call with these input shapes (e.g. a profile's max shapes): what
        ``activation_bytes`` takes."""
        dims: dict[str, int] = {}
        for tensor in self.inputs:
            shape = shapes.get(tensor.name)
            for symbol, value in zip(tensor.shape, shape if shape is not None else ()):
                if isinstance(symbol, str) and symbol in DYNAMIC_DIMS:
                    dims[symbol] = int(value)
        for side in ("height", "width"):
            if f"latent_{side}" in dims:
                dims.setdefault(side, dims[f"latent_{side}"] * vae_scale)
        if "text_tokens" in dims:
            dims.setdefault("t5_tokens", dims["text_tokens"] - CLIP_MAX_TOKENS)
        return dims

    def exporting(self, pipe: StableDiffusion3Pipeline, ranges: ShapeRanges, pipe_dims: PipeDims):
        if self.export_context is None:
            return contextlib.nullcontext()
        return self.export_context(getattr(pipe, self.pipeline_attr), ranges, pipe_dims)

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    @property
    def io_dtypes(self) -> dict[str, str]:
        """Every input's and output's dtype name: what an engine session of the whole network must have."""
        return {t.name: t.dtype for t in (*self.inputs, *self.outputs)}

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {t.name: {i: d for i, d in enumerate(t.shape) if d in DYNAMIC_DIMS}
                for t in (*self.inputs, *self.outputs)}

    def module(self, pipe: StableDiffusion3Pipeline) -> torch.nn.Module:
        network = getattr(pipe, self.pipeline_attr)
        if network is None:
            raise InvalidInputError(f"component {self.name} was not loaded",
                                    hint="build the pipeline with this component")
        # eval() on the wrapper matters: torch.onnx.export restores the wrapper's training flag recursively
        # afterwards, which would switch dropout on in the wrapped network (T5 has dropout 0.1).
        return self.wrapper(network).eval()

    # -- shapes ----------------------------------------------------------------------------------------

    def dim_ranges(self, ranges: ShapeRanges, pipe_dims: PipeDims) -> dict[str, Range]:
        """min/opt/max of every symbolic dim of this component under ``ranges``: every call the loop can make
        fits (batch from 1: one prompt without guidance, or encoded apart as diffusers does; up to twice the
        images with guidance), optimised for the doubled batch when the bundle expects guidance."""
        lat = pipe_dims.vae_scale
        batch = ranges.batch
        if self.cfg_batch:
            batch = Range(batch.min, batch.opt * (2 if ranges.cfg else 1), batch.max * 2)
        else:  # the VAE decoder: at most vae_batch images per call
            batch = Range(batch.min, min(batch.opt, ranges.vae_batch), ranges.vae_batch)
        height, width = (ranges.vae_range(ranges.height), ranges.vae_range(ranges.width)) if not self.cfg_batch \
            else (ranges.height, ranges.width)
        return {
            "batch": batch,
            "latent_height": Range(height.min // lat, height.opt // lat, height.max // lat),
            "latent_width": Range(width.min // lat, width.opt // lat, width.max // lat),
            "height": height,
            "width": width,
            "t5_tokens": ranges.t5_tokens,
            "text_tokens": Range(CLIP_MAX_TOKENS + ranges.t5_tokens.min, CLIP_MAX_TOKENS + ranges.t5_tokens.opt,
                                 CLIP_MAX_TOKENS + ranges.t5_tokens.max),
        }

    def concrete_dims(self, pipe_dims: PipeDims | int, *, batch: int, height: int, width: int,
                      t5_tokens: int = T5_MAX_TOKENS) -> dict[str, int]:
        """Symbolic dims of one call of this network (``batch``: the call's own batch; ``pipe_dims``: the
        pipeline's dims or just its VAE scale factor)."""
        lat = pipe_dims if isinstance(pipe_dims, int) else pipe_dims.vae_scale
        return {
            "batch": batch,
            "latent_height": height // lat, "latent_width": width // lat, "height": height, "width": width,
            "t5_tokens": t5_tokens, "text_tokens": CLIP_MAX_TOKENS + t5_tokens,
        }

    def resolve(self, tensor: TensorSpec, dims: dict[str, int], pipe_dims: PipeDims) -> tuple[int, ...]:
        return tuple(dims[d] if d in DYNAMIC_DIMS else pipe_dims.resolve(d) for d in tensor.shape)

    def profile(self, ranges: ShapeRanges, pipe_dims: PipeDims) -> dict[str, tuple[tuple[int, ...], ...]]:
        """Optimisation profile: input name -> (min, opt, max) shapes."""
        dim_ranges = self.dim_ranges(ranges, pipe_dims)
        profile = {}
        for tensor in self.inputs:
            shapes = []
            for which in ("min", "opt", "max"):
                dims = {k: getattr(v, which) for k, v in dim_ranges.items()}
                shapes.append(self.resolve(tensor, dims, pipe_dims))
            profile[tensor.name] = tuple(shapes)
        return profile

    def dummy_inputs(self, pipe_dims: PipeDims, dims: dict[str, int], *, seed: int = 0) -> dict[str, Any]:
        """Random inputs of the right dtype/range: token ids within the vocabulary, timesteps in [0, 1000]."""
        import torch

        generator = torch.Generator().manual_seed(seed)
        tensors = {}
        for tensor in self.inputs:
            shape = self.resolve(tensor, dims, pipe_dims)
            if tensor.dtype == "int64":
                high = pipe_dims.vocab[self.name]
                tensors[tensor.name] = torch.randint(0, high, shape, generator=generator, dtype=torch.int64)
            elif tensor.value_range is not None:
                low, high = tensor.value_range
                tensors[tensor.name] = low + torch.rand(shape, generator=generator) * (high - low)
            else:
                tensors[tensor.name] = torch.randn(shape, generator=generator)
        return tensors


@dataclass(frozen=True)
class PipeDims:
    """Static widths read off the loaded pipeline (hidden sizes, channels, vocab sizes, VAE scale)."""

    vae_scale: int
    widths: dict[str, int]
    vocab: dict[str, int]

    def resolve(self, dim: int | str) -> int:
        return dim if isinstance(dim, int) else self.widths[dim]

    @classmethod
    def from_pipeline(cls, pipe: StableDiffusion3Pipeline) -> PipeDims:
        from sd35trt.core.models import vae_scale_factor

        widths: dict[str, int] = {}
        # Dummy token ids stay inside what the tokenizer can emit (and the embedding table holds).
        vocab = {key: min(enc.config.vocab_size, len(tok)) for key, enc, tok in (
            ("clip_l", pipe.text_encoder, pipe.tokenizer), ("clip_g", pipe.text_encoder_2, pipe.tokenizer_2),
            ("t5", pipe.text_encoder_3, pipe.tokenizer_3)) if enc is not None}
        if pipe.transformer is not None:
            cfg = pipe.transformer.config
            widths.update(joint_dim=cfg.joint_attention_dim, pooled_dim=cfg.pooled_projection_dim,
                          latent_channels=cfg.in_channels)
        else:
            widths.update(latent_channels=pipe.vae.config.latent_channels)
        for key, enc in (("clip_l", pipe.text_encoder), ("clip_g", pipe.text_encoder_2)):
            if enc is not None:
                widths[f"{key}_hidden"] = enc.config.hidden_size
                widths[f"{key}_proj"] = enc.config.projection_dim
        if pipe.text_encoder_3 is not None:
            widths["t5_hidden"] = pipe.text_encoder_3.config.d_model
        return cls(vae_scale=vae_scale_factor(pipe), widths=widths, vocab=vocab)


@contextlib.contextmanager
def crop_pos_embed(transformer, ranges: ShapeRanges, pipe_dims: PipeDims):
    """Export the MMDiT with its position-embedding table cropped to the largest size the engine accepts.

    SD3 keeps a ``pos_embed_max_size``² table (384² × 1536 values, 0.45 GB in FP16, for Medium) and crops
    its centre at run time. An engine whose profile stops at 1024 px only ever reads the centre 64² window,
    yet would carry the whole table as a constant. Cropping to that window (size kept of the same parity
    as the original, so diffusers' centring arithmetic selects the same rows) is exact for every size in
    the profile and shrinks the ONNX and both engines. The network is restored afterwards.
    """
    patch_embed = getattr(transformer, "pos_embed", None)
    full = getattr(patch_embed, "pos_embed_max_size", None)
    if not full or getattr(patch_embed, "pos_embed", None) is None:
        yield
        return
    patch = patch_embed.patch_size
    need = max(-(-ranges.height.max // (pipe_dims.vae_scale * patch)), -(-ranges.width.max // (pipe_dims.vae_scale * patch)))
    size = need + (full - need) % 2
    if size >= full:
        yield
        return
    start = (full - size) // 2
    table = patch_embed.pos_embed
    cropped = table.reshape(1, full, full, -1)[:, start:start + size, start:start + size, :]
    patch_embed.pos_embed = cropped.reshape(1, size * size, -1).contiguous()
    patch_embed.pos_embed_max_size = size
    try:
        yield
    finally:
        patch_embed.pos_embed = table
        patch_embed.pos_embed_max_size = full


_TEXT_TOL = {Precision.FP32: Tolerance(1e-4, 1e-3), Precision.FP16: Tolerance(2e-2, 0.1),
             Precision.FP8: Tolerance(0.1, 1.0), Precision.INT8: Tolerance(0.05, 0.5)}


def _clip_spec(name: str, attr: str, key: str, description: str) -> ComponentSpec:
    return ComponentSpec(
        name=name, pipeline_attr=attr, description=description,
        inputs=(TensorSpec("input_ids", "int64", ("batch", CLIP_MAX_TOKENS)),),
        outputs=(TensorSpec("text_embeds", "float32", ("batch", f"{key}_proj")),
                 TensorSpec("hidden_states", "float32", ("batch", CLIP_MAX_TOKENS, f"{key}_hidden"))),
        wrapper=clip_wrapper, tolerances=_TEXT_TOL, calibratable=True, activation_factor=TEXT_ACTIVATION_PER_TOKEN_CHANNEL,
        island_units=(r"text_model\.encoder\.layers\.\d+",),
    )


SPECS: dict[str, ComponentSpec] = {
    "transformer": ComponentSpec(
        name="transformer", pipeline_attr="transformer", description="MMDiT denoiser (SD3Transformer2DModel)",
        inputs=(
            TensorSpec("hidden_states", "float32", ("batch", "latent_channels", "latent_height", "latent_width")),
            TensorSpec("encoder_hidden_states", "float32", ("batch", "text_tokens", "joint_dim")),
            TensorSpec("pooled_projections", "float32", ("batch", "pooled_dim")),
            TensorSpec("timestep", "float32", ("batch",), value_range=(0.0, 1000.0)),
        ),
        outputs=(TensorSpec("noise_pred", "float32", ("batch", "latent_channels", "latent_height", "latent_width")),),
        wrapper=transformer_wrapper,
        tolerances={Precision.FP32: Tolerance(1e-4, 1e-3), Precision.FP16: Tolerance(1e-2, 0.05),
                    Precision.FP8: Tolerance(0.08, 0.5), Precision.INT4: Tolerance(0.08, 0.5),
                    Precision.NVFP4: Tolerance(0.1, 0.5), Precision.MIXED: Tolerance(0.08, 0.5),
                    Precision.INT8: Tolerance(0.05, 0.5)},
        export_context=crop_pos_embed, calibratable=True, island_units=(r"transformer_blocks\.\d+",),
    ),
    "clip_l": _clip_spec("clip_l", "text_encoder", "clip_l", "CLIP ViT-L/14 text encoder"),
    "clip_g": _clip_spec("clip_g", "text_encoder_2", "clip_g", "OpenCLIP ViT-bigG/14 text encoder"),
    "t5": ComponentSpec(
        name="t5", pipeline_attr="text_encoder_3", description="T5-XXL v1.1 encoder",
        inputs=(TensorSpec("input_ids", "int64", ("batch", "t5_tokens")),),
        outputs=(TensorSpec("last_hidden_state", "float32", ("batch", "t5_tokens", "t5_hidden")),),
        wrapper=t5_wrapper, tolerances=_TEXT_TOL, calibratable=True, activation_factor=TEXT_ACTIVATION_PER_TOKEN_CHANNEL,
        island_units=(r"encoder\.block\.\d+\.layer\.\d+",),
    ),
    "vae_decoder": ComponentSpec(
        name="vae_decoder", pipeline_attr="vae", description="AutoencoderKL decoder (16 latent channels)",
        inputs=(TensorSpec("latent", "float32", ("batch", "latent_channels", "latent_height", "latent_width")),),
        outputs=(TensorSpec("images", "float32", ("batch", 3, "height", "width")),),
        wrapper=vae_decoder_wrapper, cfg_batch=False, activation_factor=VAE_ACTIVATION_PER_PIXEL,
        island_units=(r"decoder\.up_blocks\.\d+\.resnets\.\d+", r"decoder\.mid_block"),
        # Convolutions sum differently in onnxruntime and torch: 1e-4 rel-L2 measured at ~9e-5, so 5e-4.
        tolerances={Precision.FP32: Tolerance(5e-4, 2e-3), Precision.FP16: Tolerance(1e-2, 0.05),
                    Precision.FP8: Tolerance(0.08, 0.5)},
    ),
}

COMPONENTS = tuple(SPECS)
CALIBRATABLE = tuple(name for name, spec in SPECS.items() if spec.calibratable)


def parse_format(text: str, option: str = "--format") -> Precision:
    """A calibrated format by name (fp8 | int4 | nvfp4 | mixed), one line otherwise."""
    names = tuple(p.value for p in QUANTIZED)
    if text not in names:
        raise InvalidInputError(f"{option} '{text}' is not one of {', '.join(names)}", hint=f"e.g. {option} int4")
    return Precision(text)


def with_t5(components: Iterable[str], t5: bool) -> tuple[str, ...]:
    """``components`` in order, T5 left out unless ``t5`` (CLIP-only: zero T5 embeddings, as diffusers with
    ``text_encoder_3=None``)."""
    return tuple(c for c in components if t5 or c != "t5")


def pipeline_attrs(t5: bool) -> set[str]:
    """The pipeline attributes of every component, T5's only with ``t5``: what ``build_pipeline`` materialises."""
    return {SPECS[c].pipeline_attr for c in with_t5(COMPONENTS, t5)}


def vae_input(latents: Any, vae_config: Any) -> Any:
    """Final latents → what the VAE decoder network takes (SD3's un-scaling, as the pipeline does it)."""
    return latents / vae_config.scaling_factor + vae_config.shift_factor


def parse_int8(text: str) -> tuple[str, ...]:
    """``--int8 clip_l,clip_g``: the GEMM networks whose weights INT8 stores (empty: none)."""
    return parse_components(text, CALIBRATABLE, option="--int8") if text.strip() else ()


def parse_components(text: str | None, allowed: tuple[str, ...] = COMPONENTS, *,
                     option: str = "--components") -> tuple[str, ...]:
    """``--components a,b`` (or the ``option`` named) → ordered tuple, rejecting unknown names with the valid ones."""
    if text is None or text.strip() in ("", "all"):
        return allowed
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in SPECS]
    if unknown:
        raise InvalidInputError(f"unknown component(s) {', '.join(unknown)} in {option}",
                                hint=f"choose from {','.join(allowed)}")
    not_allowed = [n for n in names if n not in allowed]
    if not_allowed:
        raise InvalidInputError(f"component(s) {', '.join(not_allowed)} not supported by {option}",
                                hint=f"choose from {','.join(allowed)}")
    return tuple(n for n in COMPONENTS if n in names)
