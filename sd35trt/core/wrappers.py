"""The torch side of each spec: wrappers that give a network exactly the ONNX signature of its ``ComponentSpec``
(input/output names and order, no dict outputs), eager text attention for tracing, and ``CastIO`` (FP32
inputs/outputs around an FP16 network)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def _eager_attention(encoder):
    """Text encoders trace with eager attention: the legacy exporter's SDPA symbolic mixes a float32 mask
    into FP16 graphs (LayerNorm float/half type error in onnxruntime). Same math, float rounding aside."""
    if getattr(encoder.config, "_attn_implementation", "eager") != "eager":
        encoder.set_attn_implementation("eager")
    return encoder


def eager_text_attention(pipe) -> None:
    """Every loaded text encoder of ``pipe`` on eager attention, as its ONNX is traced. A step that runs the
    pipeline and traces or wraps it calls this first, so its loops never switch attention halfway (that made
    a calibration worker's scales differ from one process's in the last bits)."""
    for attr in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        if getattr(pipe, attr, None) is not None:
            _eager_attention(getattr(pipe, attr))


def clip_wrapper(encoder):
    import torch

    encoder = _eager_attention(encoder)

    class ClipTextEncoder(torch.nn.Module):
        """Pooled projection + penultimate hidden states: what SD3's ``_get_clip_prompt_embeds`` reads."""

        def __init__(self):
            super().__init__()
            self.encoder = encoder

        def forward(self, input_ids):
            out = self.encoder(input_ids, output_hidden_states=True)
            return out[0], out.hidden_states[-2]

    return ClipTextEncoder()


def t5_wrapper(encoder):
    import torch

    encoder = _eager_attention(encoder)

    class T5TextEncoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = encoder

        def forward(self, input_ids):
            return self.encoder(input_ids)[0]

    return T5TextEncoder()


def transformer_wrapper(transformer):
    import torch

    class MMDiT(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.transformer = transformer

        def forward(self, hidden_states, encoder_hidden_states, pooled_projections, timestep):
            return self.transformer(hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states,
                                    pooled_projections=pooled_projections, timestep=timestep,
                                    return_dict=False)[0]

    return MMDiT()


def vae_decoder_wrapper(vae):
    import torch

    class VaeDecoder(torch.nn.Module):
        """``vae.decode`` on already scaled/shifted latents (the loop applies scaling like diffusers does)."""

        def __init__(self):
            super().__init__()
            self.vae = vae

        def forward(self, latent):
            return self.vae.decode(latent, return_dict=False)[0]

    return VaeDecoder()


class CastIO:
    """Wrap a module running in ``dtype`` so its ONNX keeps float32 inputs/outputs (like keep_io_types)."""

    def __new__(cls, module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
        import torch

        class CastedIO(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.inner = module

            def forward(self, *args):
                args = [a.to(dtype) if a.is_floating_point() else a for a in args]
                out = self.inner(*args)
                if isinstance(out, tuple):
                    return tuple(o.float() for o in out)
                return out.float()

        return CastedIO().eval()
