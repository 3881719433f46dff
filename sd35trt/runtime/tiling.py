"""Tiled VAE decode: images larger than the decoder takes whole, decoded in overlapping tiles and blended.

As diffusers' ``AutoencoderKL.tiled_decode``: latent tiles of ``tile`` (by default 1024 px, the VAE's sample
size) overlapping by a quarter, blended with linear ramps across the overlap. Unlike diffusers', every tile here
has exactly the tile size (the last row and column are placed flush with the border), so every call fits an
engine's fixed profile; the blend is a weighted average, which is diffusers' ramp where two tiles meet.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

DEFAULT_TILE_PIXELS = 1024  # SD3.5's VAE sample_size: diffusers' tile_sample_min_size
OVERLAP = 0.25  # diffusers' tile_overlap_factor


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Starts of tiles of length ``tile`` covering ``size`` with at least ``overlap`` in common, the last flush."""
    if size <= tile:
        return [0]
    stride = max(1, tile - overlap)
    starts = list(range(0, size - tile, stride))
    return starts + [size - tile]


def tile_shapes(height: int, width: int, tile: int) -> list[tuple[int, int]]:
    """The distinct (latent) tile shapes a decode of ``height``×``width`` latents makes."""
    return sorted({(min(height, tile), min(width, tile))})


def _ramp(length: int, rise: int, start: bool, end: bool, like: Any) -> Any:
    import torch

    weight = torch.ones(length, dtype=torch.float32, device=like.device)
    steps = (torch.arange(rise, dtype=torch.float32, device=like.device) + 0.5) / rise
    if start and rise:
        weight[:rise] = torch.minimum(weight[:rise], steps)
    if end and rise:
        weight[-rise:] = torch.minimum(weight[-rise:], steps.flip(0))
    return weight


def tiled_decode(decode: Callable[[Any], Any], latents: Any, *, tile: int, scale: int,
                 overlap: float = OVERLAP) -> Any:
    """Decode ``latents`` [B, C, h, w] with ``decode`` on tiles of ``tile``×``tile`` latents (``scale`` pixels
    each); returns the images [B, 3, h·scale, w·scale] in float32."""
    import torch

    _, _, height, width = latents.shape
    step = max(1, int(tile * overlap))
    rows, cols = tile_starts(height, tile, step), tile_starts(width, tile, step)
    out = norm = None
    for y in rows:
        for x in cols:
            piece = decode(latents[:, :, y:y + tile, x:x + tile]).float()
            if out is None:
                batch, channels = piece.shape[:2]
                out = torch.zeros(batch, channels, height * scale, width * scale, device=piece.device)
                norm = torch.zeros(1, 1, height * scale, width * scale, device=piece.device)
            th, tw = piece.shape[-2:]
            rise = step * scale
            wy = _ramp(th, rise, y > 0, y + tile < height, piece)
            wx = _ramp(tw, rise, x > 0, x + tile < width, piece)
            weight = wy[:, None] * wx[None, :]
            out[:, :, y * scale:y * scale + th, x * scale:x * scale + tw] += piece * weight
            norm[:, :, y * scale:y * scale + th, x * scale:x * scale + tw] += weight
    assert out is not None and norm is not None
    return out / norm
