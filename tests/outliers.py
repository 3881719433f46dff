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

    from sd35trt.core.models import PRESET_SEED, TINY, build_pipeline, resolve_model

    pipe = build_pipeline(resolve_model("tiny"))
    if layers != TINY.transformer["num_layers"]:
        torch.manual_seed(PRESET_SEED)
        pipe.transformer = SD3Transformer2DModel(**{**TINY.transformer, "num_layers": layers,
                                                    "dual_attention_layers": [0]}).eval().requires_grad_(False)
    inject_boundary_outliers(pipe, site)
    pipe.save_pretrained(dest)
    return dest
