"""The presets: SD3.5's real architectures (and a tiny one for tests) built from config with random weights from a
fixed seed, and the defaults a request gets from its model (steps, guidance; Turbo's own)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sd35trt.core.tokenizers import tokenizer_recipe

PRESET_SEED = 20241022  # SD3.5's release date: any fixed value works, it only has to never change.

@dataclass(frozen=True)
class PresetConfig:
    """Configuration of every component of a preset; random weights come from ``PRESET_SEED``."""

    name: str
    transformer: dict[str, Any]
    clip_l: dict[str, Any]
    clip_g: dict[str, Any]
    t5: dict[str, Any]
    vae: dict[str, Any]
    scheduler: dict[str, Any] = field(default_factory=lambda: {"num_train_timesteps": 1000, "shift": 3.0})
    real_tokenizers: bool = False  # vocab sizes of the real models; tokenizers are still built in code
    turbo: bool = False  # a distilled few-step model (SD3.5-Large-Turbo): 4 steps, no guidance

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "transformer": self.transformer,
            "clip_l": self.clip_l,
            "clip_g": self.clip_g,
            "t5": self.t5,
            "vae": self.vae,
            "scheduler": self.scheduler,
            "seed": PRESET_SEED,
            "tokenizers": tokenizer_recipe(),
            **({"turbo": True} if self.turbo else {}),
        }


_VAE_BLOCKS = {
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "latent_channels": 16,
    "scaling_factor": 1.5305,
    "shift_factor": 0.0609,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}

# The real SD3.5 architecture at toy size: rms_norm qk-norm and dual-attention blocks as in Medium, a VAE
# with four blocks (scale factor 8, like the real one) so image sizes and shape ranges are the real ones.
TINY = PresetConfig(
    name="tiny",
    transformer={
        "sample_size": 128,
        "patch_size": 2,
        "in_channels": 16,
        "num_layers": 2,
        "attention_head_dim": 16,
        "num_attention_heads": 2,
        "joint_attention_dim": 96,
        "caption_projection_dim": 32,
        "pooled_projection_dim": 96,
        "out_channels": 16,
        "pos_embed_max_size": 96,
        "dual_attention_layers": [0],
        "qk_norm": "rms_norm",
    },
    clip_l={"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 2,
            "projection_dim": 32, "hidden_act": "quick_gelu"},
    clip_g={"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_hidden_layers": 2,
            "projection_dim": 64, "hidden_act": "gelu"},
    t5={"d_model": 96, "d_ff": 128, "d_kv": 16, "num_heads": 4, "num_layers": 2,
        "feed_forward_proj": "gated-gelu", "relative_attention_num_buckets": 32,
        "relative_attention_max_distance": 128},
    vae={**_VAE_BLOCKS, "block_out_channels": [8, 8, 16, 16], "layers_per_block": 1, "norm_num_groups": 4,
         "sample_size": 1024},
)

_REAL_TEXT = {
    "clip_l": {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12,
               "projection_dim": 768, "hidden_act": "quick_gelu"},
    "clip_g": {"hidden_size": 1280, "intermediate_size": 5120, "num_attention_heads": 20, "num_hidden_layers": 32,
               "projection_dim": 1280, "hidden_act": "gelu"},
    "t5": {"d_model": 4096, "d_ff": 10240, "d_kv": 64, "num_heads": 64, "num_layers": 24,
           "feed_forward_proj": "gated-gelu", "relative_attention_num_buckets": 32,
           "relative_attention_max_distance": 128},
    "vae": {**_VAE_BLOCKS, "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2,
            "norm_num_groups": 32, "sample_size": 1024},
}

SD35_MEDIUM = PresetConfig(
    name="sd3.5-medium",
    transformer={
        "sample_size": 128, "patch_size": 2, "in_channels": 16, "num_layers": 24, "attention_head_dim": 64,
        "num_attention_heads": 24, "joint_attention_dim": 4096, "caption_projection_dim": 1536,
        "pooled_projection_dim": 2048, "out_channels": 16, "pos_embed_max_size": 384,
        "dual_attention_layers": list(range(13)), "qk_norm": "rms_norm",
    },
    real_tokenizers=True,
    **_REAL_TEXT,
)

SD35_LARGE = PresetConfig(
    name="sd3.5-large",
    transformer={
        "sample_size": 128, "patch_size": 2, "in_channels": 16, "num_layers": 38, "attention_head_dim": 64,
        "num_attention_heads": 38, "joint_attention_dim": 4096, "caption_projection_dim": 2432,
        "pooled_projection_dim": 2048, "out_channels": 16, "pos_embed_max_size": 192,
        "dual_attention_layers": [], "qk_norm": "rms_norm",
    },
    real_tokenizers=True,
    **_REAL_TEXT,
)

# SD3.5-Large-Turbo: the Large architecture distilled for 4 steps without classifier-free guidance (its model card:
# num_inference_steps=4, guidance_scale=0.0); its scheduler is the same FlowMatchEulerDiscreteScheduler.
SD35_LARGE_TURBO = PresetConfig(name="sd3.5-large-turbo", transformer=SD35_LARGE.transformer, real_tokenizers=True,
                                turbo=True, **_REAL_TEXT)
# The tiny model as a Turbo bundle (tests: batch-1 profiles, guidance 0, 4 steps).
TINY_TURBO = PresetConfig(name="tiny-turbo", transformer=TINY.transformer, clip_l=TINY.clip_l, clip_g=TINY.clip_g,
                          t5=TINY.t5, vae=TINY.vae, turbo=True)

PRESETS = {p.name: p for p in (TINY, TINY_TURBO, SD35_MEDIUM, SD35_LARGE, SD35_LARGE_TURBO)}


@dataclass(frozen=True)
class Defaults:
    """What a request gets when it names no steps or guidance: the model's own recommendation."""

    steps: int
    guidance: float


SD35_DEFAULTS = Defaults(steps=28, guidance=4.5)
TURBO_DEFAULTS = Defaults(steps=4, guidance=0.0)
