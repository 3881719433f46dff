"""What the denoising loop needs besides the networks: tokenizers, the scheduler config and the few VAE/transformer
numbers (``PipelineAssets``), saved beside every work dir and shipped in every bundle."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sd35trt.core.errors import ModelLoadError
from sd35trt.core.models import ModelSource
from sd35trt.core.presets import SD35_DEFAULTS, TURBO_DEFAULTS, Defaults
from sd35trt.core.tokenizers import build_clip_tokenizer, build_t5_tokenizer

ASSETS_FILE = "assets.json"
ASSET_TOKENIZERS = {"clip_l": "tokenizer", "clip_g": "tokenizer_2", "t5": "tokenizer_3"}
ENCODER_ATTRS = {"clip_l": "text_encoder", "clip_g": "text_encoder_2", "t5": "text_encoder_3"}
# The VAE numbers the loop applies, with SD3.5's values where a directory's config leaves one out.
VAE_NUMBERS = {"scaling_factor": 1.5305, "shift_factor": 0.0609, "latent_channels": 16}


@dataclass
class PipelineAssets:
    """Tokenizers, scheduler config and the few VAE/transformer numbers the loop reads: everything a deploy
    host needs besides the engines. Built without any network weights, saved into every bundle
    (``assets/``), so ``generate --bundle`` needs neither the model directory nor diffusers' model classes."""

    tokenizers: dict[str, Any]  # clip_l, clip_g and (unless CLIP-only) t5
    scheduler: dict[str, Any]  # FlowMatchEulerDiscreteScheduler config
    vae: dict[str, Any]  # scaling_factor, shift_factor, latent_channels, block_out_channels
    joint_attention_dim: int  # width of the (zero, without T5) T5 embeddings
    patch_size: int
    turbo: bool = False
    widths: dict[str, int] = field(default_factory=dict)  # each network's hidden width (activation estimates)
    model: dict[str, Any] = field(default_factory=dict)  # ModelSource.describe() of what it came from

    @property
    def vae_scale(self) -> int:
        return 2 ** (len(self.vae["block_out_channels"]) - 1)

    @property
    def defaults(self) -> Defaults:
        return TURBO_DEFAULTS if self.turbo else SD35_DEFAULTS

    @property
    def has_t5(self) -> bool:
        return self.tokenizers.get("t5") is not None

    def without_t5(self) -> PipelineAssets:
        return PipelineAssets({k: v for k, v in self.tokenizers.items() if k != "t5"}, self.scheduler, self.vae,
                              self.joint_attention_dim, self.patch_size, self.turbo, self.widths, self.model)

    def to_dict(self) -> dict[str, Any]:
        return {"scheduler": self.scheduler, "vae": self.vae, "joint_attention_dim": self.joint_attention_dim,
                "patch_size": self.patch_size, "turbo": self.turbo, "tokenizers": sorted(self.tokenizers),
                "widths": self.widths, "model": self.model}

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        for key, tokenizer in self.tokenizers.items():
            tokenizer.save_pretrained(folder / ASSET_TOKENIZERS[key])
        (folder / ASSETS_FILE).write_text(json.dumps(self.to_dict(), indent=2, default=str) + "\n")

    @classmethod
    def load(cls, folder: Path) -> PipelineAssets:
        from transformers import CLIPTokenizer, T5TokenizerFast

        try:
            data = json.loads((folder / ASSETS_FILE).read_text())
            kinds = {"clip_l": CLIPTokenizer, "clip_g": CLIPTokenizer, "t5": T5TokenizerFast}
            tokenizers = {key: kinds[key].from_pretrained(folder / ASSET_TOKENIZERS[key], local_files_only=True)
                          for key in data["tokenizers"]}
            return cls(tokenizers, data["scheduler"], data["vae"], int(data["joint_attention_dim"]),
                       int(data["patch_size"]), bool(data.get("turbo", False)), data.get("widths", {}),
                       data.get("model", {}))
        except (OSError, ValueError, KeyError) as exc:
            raise ModelLoadError(f"pipeline assets are missing or unreadable ({type(exc).__name__}: {str(exc)[:120]})",
                                 path=folder, hint="rebuild the bundle with this sd35trt (sd35trt build --force)") from None

    @classmethod
    def of_configs(cls, tokenizers: dict[str, Any], scheduler: dict[str, Any], transformer: Mapping[str, Any] | None,
                   vae: Mapping[str, Any], encoders: Mapping[str, Mapping[str, Any]],
                   source: ModelSource | None = None) -> PipelineAssets:
        """The assets from the networks' configs, however they were read (a pipeline's, a preset's, a directory's
        JSON): the VAE numbers the loop applies and each network's width (``encoders``: component → config of
        the text encoders present). Without a transformer config, SD3.5's joint width and patch size."""
        widths = {"transformer": transformer["num_attention_heads"] * transformer["attention_head_dim"]} \
            if transformer is not None else {}
        widths |= {key: config.get("hidden_size") or config.get("d_model") or 0 for key, config in encoders.items()}
        widths["vae_decoder"] = max(vae["block_out_channels"])
        numbers = {key: vae.get(key, default) for key, default in VAE_NUMBERS.items()}
        return cls(tokenizers, scheduler, numbers | {"block_out_channels": list(vae["block_out_channels"])},
                   transformer["joint_attention_dim"] if transformer is not None else 4096,
                   transformer.get("patch_size", 2) if transformer is not None else 2,
                   source.turbo if source is not None else False, widths, source.describe() if source is not None else {})

    @classmethod
    def of_pipeline(cls, pipe: Any, source: ModelSource | None = None) -> PipelineAssets:
        tokenizers = {"clip_l": pipe.tokenizer, "clip_g": pipe.tokenizer_2}
        if getattr(pipe, "tokenizer_3", None) is not None and getattr(pipe, "text_encoder_3", None) is not None:
            tokenizers["t5"] = pipe.tokenizer_3
        encoders = {key: getattr(pipe, attr).config.to_dict() for key, attr in ENCODER_ATTRS.items()
                    if getattr(pipe, attr, None) is not None}
        return cls.of_configs(tokenizers, dict(pipe.scheduler.config),
                              pipe.transformer.config if pipe.transformer is not None else None, pipe.vae.config,
                              encoders, source)


def load_assets(source: ModelSource, *, t5: bool = True) -> PipelineAssets:
    """The loop's assets of ``source`` without building or loading a network: tokenizers built in code (presets)
    or read from the directory, and the scheduler/VAE/transformer configs."""
    if source.preset is not None:
        preset = source.preset
        vocab = (49408, 32128) if preset.real_tokenizers else (None, None)
        tokenizers = {"clip_l": build_clip_tokenizer(vocab[0]), "clip_g": build_clip_tokenizer(vocab[0])}
        if t5:
            tokenizers["t5"] = build_t5_tokenizer(vocab[1])
        from diffusers import FlowMatchEulerDiscreteScheduler

        scheduler = dict(FlowMatchEulerDiscreteScheduler(**preset.scheduler).config)
        return PipelineAssets.of_configs(tokenizers, scheduler, preset.transformer, preset.vae,
                                         {"clip_l": preset.clip_l, "clip_g": preset.clip_g, "t5": preset.t5}, source)
    assert source.path is not None
    from transformers import CLIPTokenizer, T5TokenizerFast

    path = source.path
    try:
        tokenizers = {"clip_l": CLIPTokenizer.from_pretrained(path / "tokenizer", local_files_only=True),
                      "clip_g": CLIPTokenizer.from_pretrained(path / "tokenizer_2", local_files_only=True)}
        if t5 and source.has_t5:
            tokenizers["t5"] = T5TokenizerFast.from_pretrained(path / "tokenizer_3", local_files_only=True)
        scheduler = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
        vae_cfg = json.loads((path / "vae" / "config.json").read_text())
        transformer = json.loads((path / "transformer" / "config.json").read_text())
    except (OSError, ValueError) as exc:
        missing = getattr(exc, "filename", None)
        what = f"{Path(missing).relative_to(path) if str(missing).startswith(str(path)) else missing} is missing" \
            if isinstance(exc, FileNotFoundError) and missing else f"{type(exc).__name__}: {str(exc)[:160]}"
        raise ModelLoadError(f"cannot read the model's tokenizers or configs ({what})", path=path,
                             hint="check the directory is a complete SD3.5 download") from None
    encoders = {key: json.loads((path / folder / "config.json").read_text()) for key, folder in ENCODER_ATTRS.items()
                if (path / folder / "config.json").is_file()}
    return PipelineAssets.of_configs(tokenizers, {k: v for k, v in scheduler.items() if not k.startswith("_")},
                                     transformer, vae_cfg, encoders, source)
