"""A tiny SD3.5 saved as a local diffusers directory, with activation outliers of the kind real SD3.5 has.

* transformer: inside the last joint block, the image feed-forward's hidden activation reaches ~1e5
  (``ff.net.0.proj`` scaled up, ``ff.net.2`` scaled down by the same factor) while the block's output stays
  in FP16 range: what an FP32 island around that block fixes.
* T5: the last block's feed-forward output ``wo`` reaches ~1e5, so the residual stream past it leaves FP16
  range until the final RMS norm brings it back (the known T5-XXL case).
Weights are edited after ``save_pretrained``-ing the preset, so the model loads through ``from_pretrained``
like a user's real checkpoint.
"""

from __future__ import annotations

from pathlib import Path

SCALE = 1e5


def inject_outliers(pipe, *, transformer: bool = True, t5: bool = True, scale: float = SCALE) -> None:
    import torch

    with torch.no_grad():
        if transformer:
            ff = pipe.transformer.transformer_blocks[-1].ff
            ff.net[0].proj.weight.mul_(scale)
            ff.net[0].proj.bias.mul_(scale)
            ff.net[2].weight.div_(scale)
        if t5:
            pipe.text_encoder_3.encoder.block[-1].layer[-1].DenseReluDense.wo.weight.mul_(scale)


def save_outlier_model(dest: Path, **kwargs) -> Path:
    """``save_pretrained`` of the tiny preset with outliers injected; returns the directory."""
    from sd35trt.core.models import build_pipeline, resolve_model

    pipe = build_pipeline(resolve_model("tiny"))
    inject_outliers(pipe, **kwargs)
    pipe.save_pretrained(dest)
    return dest


def inject_boundary_outliers(pipe, site: str, scale: float = SCALE) -> None:
    """Outliers at an island boundary (#22): ``last_block_output`` puts the last joint block's output stream past
    FP16 range, so it meets ``norm_out`` in FP32; ``context_embedder`` puts the T5/CLIP context embedding past
    it, so the first block receives it."""
    import torch

    with torch.no_grad():
        if site == "last_block_output":
            ff = pipe.transformer.transformer_blocks[-1].ff
            ff.net[2].weight.mul_(scale)
            ff.net[2].bias.mul_(scale)
        elif site == "context_embedder":
            pipe.transformer.context_embedder.weight.mul_(scale)
            pipe.transformer.context_embedder.bias.mul_(scale)
        else:
            raise ValueError(site)


def save_boundary_model(dest: Path, site: str, *, layers: int = 2) -> Path:
    """The tiny preset (its transformer with ``layers`` joint blocks) saved with outliers at ``site``."""
    import torch
    from diffusers import SD3Transformer2DModel

    from sd35trt.core.models import build_pipeline, resolve_model
    from sd35trt.core.presets import PRESET_SEED, TINY

    pipe = build_pipeline(resolve_model("tiny"))
    if layers != TINY.transformer["num_layers"]:
        torch.manual_seed(PRESET_SEED)
        pipe.transformer = SD3Transformer2DModel(**{**TINY.transformer, "num_layers": layers,
                                                    "dual_attention_layers": [0]}).eval().requires_grad_(False)
    inject_boundary_outliers(pipe, site)
    pipe.save_pretrained(dest)
    return dest


def inject_ring_outliers(pipe, value: float = 1e5, inner: int = 48) -> None:
    """Outliers only larger images see: the transformer's position table gets ``value`` in two channels outside
    its centre ``inner`` x ``inner`` patches (1e5: past FP16 itself, so an FP16 table holds inf there). SD3 crops the table's centre to the latent, so calibration at 256 or 512 px
    (16 x 16, 32 x 32 patches) and export's 576x640 check never read them; 1024 px and up do. An overflow past
    calibration's inputs: only the census's range probes (1536 px) can find it."""
    import torch

    embed = pipe.transformer.pos_embed
    size = embed.pos_embed_max_size
    grid = embed.pos_embed.view(1, size, size, -1)
    lo, hi = (size - inner) // 2, (size + inner) // 2
    ring = torch.ones(size, size, dtype=torch.bool)
    ring[lo:hi, lo:hi] = False
    with torch.no_grad():
        grid[0, ring, :2] = value


def save_model(dest: Path, edit=None, *, preset: str = "tiny", clip_only: bool = False, **kwargs) -> Path:
    """``save_pretrained`` of a tiny preset, its weights first edited by ``edit(pipe, **kwargs)``: a directory loaded by
    ``from_pretrained`` like a user's checkpoint. ``clip_only``: saved without T5-XXL (text_encoder_3/tokenizer_3),
    as users who never download it have it."""
    from sd35trt.core.models import build_pipeline, resolve_model

    pipe = build_pipeline(resolve_model(preset))
    if edit is not None:
        edit(pipe, **kwargs)
    if clip_only:
        pipe.text_encoder_3, pipe.tokenizer_3 = None, None
        pipe.register_modules(text_encoder_3=None, tokenizer_3=None)
    pipe.save_pretrained(dest)
    return dest


def inject_stream_outliers(pipe, scale: float = 2e5) -> None:
    """The last joint block overflows inside (``inject_outliers``) and its output stream leaves the margin while it
    stays inside FP16 on calibration traffic (~4e4 at 256-512 px), as SD3.5-Large's block 35 feeding ``norm_out``; T5's
    last feed-forward overflows too. Islands: the block, ``norm_out`` (it receives the stream), T5's layer and final
    norm; the stream between the two transformer islands must stay FP32."""
    import torch

    inject_outliers(pipe)
    with torch.no_grad():
        ff = pipe.transformer.transformer_blocks[-1].ff
        ff.net[2].weight.mul_(scale)
        ff.net[2].bias.mul_(scale)
