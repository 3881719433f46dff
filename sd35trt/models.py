"""SD3.5 model sources: the ``tiny`` preset, the real SD3.5 shapes with random weights, or a local directory.

Every source yields diffusers' own ``StableDiffusion3Pipeline`` built from diffusers/transformers classes, so
export, calibration, the denoising loop and the comparison all run the same code whatever the weights are.
Presets are built from config with random weights from a fixed seed (no download is possible here); a path
is loaded with ``from_pretrained``. ``ModelSource.fingerprint`` identifies the weights for manifests.
"""

from __future__ import annotations

import hashlib
import json
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sd35trt.errors import ModelLoadError

if TYPE_CHECKING:
    import torch
    from diffusers import StableDiffusion3Pipeline

PRESET_SEED = 20241022  # SD3.5's release date: any fixed value works, it only has to never change.
CLIP_MAX_TOKENS = 77
T5_MAX_TOKENS = 256

# Sub-folders of a diffusers-format SD3.5 directory, in pipeline order.
PIPELINE_FOLDERS = {
    "transformer": "transformer",
    "text_encoder": "text_encoder",
    "text_encoder_2": "text_encoder_2",
    "text_encoder_3": "text_encoder_3",
    "vae": "vae",
    "tokenizer": "tokenizer",
    "tokenizer_2": "tokenizer_2",
    "tokenizer_3": "tokenizer_3",
    "scheduler": "scheduler",
}


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

PRESETS = {p.name: p for p in (TINY, SD35_MEDIUM, SD35_LARGE)}


@dataclass(frozen=True)
class ModelSource:
    """What ``--model`` names: a preset (random weights) or a local diffusers directory (real weights)."""

    id: str
    preset: PresetConfig | None = None
    path: Path | None = None

    @property
    def random_weights(self) -> bool:
        return self.preset is not None

    @property
    def slug(self) -> str:
        return model_slug({"id": self.id, "path": str(self.path) if self.path else None})

    def fingerprint(self) -> str:
        """sha256 over everything that decides the weights: preset config + seed, or the directory's files.

        For a directory the configs are hashed by content and weight files by name and size: hashing tens of
        GB of safetensors on every command would cost minutes, and a changed checkpoint changes its size or
        its index in practice. ``sd35trt bundle verify`` hashes what was actually built.
        """
        digest = hashlib.sha256()
        if self.preset is not None:
            digest.update(json.dumps(self.preset.to_dict(), sort_keys=True).encode())
        else:
            assert self.path is not None
            for file in sorted(p for p in self.path.rglob("*") if p.is_file()):
                rel = file.relative_to(self.path).as_posix()
                digest.update(rel.encode())
                if file.suffix in {".json", ".txt", ".model"}:
                    digest.update(file.read_bytes())
                else:
                    digest.update(str(file.stat().st_size).encode())
        return digest.hexdigest()

    def describe(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "random_weights": self.random_weights,
            "fingerprint": self.fingerprint(),
            **({"config": self.preset.to_dict()} if self.preset else {"path": str(self.path)}),
        }


def model_slug(described: dict[str, Any]) -> str:
    """A file-system-safe folder name for a model, from ``ModelSource.describe()`` (as manifests store it)."""
    name = Path(described["path"]).name if described.get("path") else described["id"]
    return "".join(c if c.isalnum() or c in "-._" else "_" for c in name) or "model"


def resolve_model(model: str) -> ModelSource:
    """Turn ``--model`` into a ModelSource, checking a directory has every component before any heavy work."""
    if model in PRESETS:
        return ModelSource(id=model, preset=PRESETS[model])
    path = Path(model).expanduser()
    if not path.exists():
        raise ModelLoadError(
            f"unknown model '{model}'",
            hint=f"use one of {', '.join(PRESETS)} or a path to a local diffusers-format SD3.5 directory",
        )
    if not path.is_dir():
        raise ModelLoadError("model path is not a directory", path=path,
                             hint="pass a diffusers-format SD3.5 directory (with model_index.json)")
    if not (path / "model_index.json").is_file():
        raise ModelLoadError("not a diffusers model directory: model_index.json is missing", path=path,
                             hint="pass the folder that holds model_index.json, transformer/, vae/, ...")
    missing = [folder for folder in PIPELINE_FOLDERS.values() if not (path / folder).is_dir()]
    if missing:
        raise ModelLoadError(f"model directory lacks component folder(s) {', '.join(missing)}", path=path,
                             hint="download the complete SD3.5 diffusers repository (all text encoders included)")
    return ModelSource(id=str(path.resolve()), path=path.resolve())


# --- tokenizers -------------------------------------------------------------------------------------------


def _byte_alphabet() -> list[str]:
    """GPT-2/CLIP byte-level alphabet: 256 printable stand-ins for the 256 byte values."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes, extra = keep[:], 0
    for byte in range(256):
        if byte not in keep:
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def build_clip_tokenizer(vocab_size: int | None = None):
    """A real ``CLIPTokenizer`` with a byte-level vocabulary and no merges (weights are random anyway).

    With ``vocab_size`` (the real models' 49408) the vocabulary is padded with unused pieces so token ids
    have the real range; the ids the tokenizer emits stay below 514.
    """
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {}
    for char in _byte_alphabet():
        vocab[char] = len(vocab)
    for char in _byte_alphabet():
        vocab[char + "</w>"] = len(vocab)
    if vocab_size is not None:
        while len(vocab) < vocab_size - 2:
            vocab[f"<unused{len(vocab)}>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=CLIP_MAX_TOKENS)


def build_t5_tokenizer(vocab_size: int | None = None):
    """A real ``T5TokenizerFast`` (unigram) over printable characters."""
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(c, -1.0) for c in string.printable[:94]] + [("▁" + c, -1.5) for c in string.ascii_letters]
    if vocab_size is not None:
        pieces += [(f"<unused{i}>", -100.0) for i in range(len(pieces), vocab_size)]
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=T5_MAX_TOKENS)


# --- pipelines --------------------------------------------------------------------------------------------


def build_pipeline(source: ModelSource, *, device: str = "cpu", dtype: torch.dtype | None = None,
                   components: set[str] | None = None) -> StableDiffusion3Pipeline:
    """Build diffusers' ``StableDiffusion3Pipeline`` for ``source``.

    ``components`` (pipeline attribute names) limits which networks are materialised; the others are None,
    so exporting only the transformer at real size never allocates T5-XXL. Models are created directly on
    ``device`` (random init on a GPU takes seconds where CPU init of T5-XXL takes minutes) with a fixed
    seed per component, so a component's weights don't depend on which others were built.
    """
    import torch
    from diffusers import StableDiffusion3Pipeline

    quiet_libraries()
    dtype = dtype or torch.float32
    wanted = set(components) if components is not None else {
        "transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "vae"}
    if source.path is not None:
        return _load_local(source.path, device=device, dtype=dtype, wanted=wanted)

    preset = source.preset
    assert preset is not None
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    clip_vocab = 49408 if preset.real_tokenizers else None
    t5_vocab = 32128 if preset.real_tokenizers else None
    tokenizer = build_clip_tokenizer(clip_vocab)
    tokenizer_2 = build_clip_tokenizer(clip_vocab)
    tokenizer_3 = build_t5_tokenizer(t5_vocab)

    def seeded(index: int, make):
        torch.manual_seed(PRESET_SEED + index)
        with torch.device(device):
            model = make()
        return model.to(dtype=dtype).eval().requires_grad_(False)

    def clip(cfg: dict[str, Any], tok):
        config = CLIPTextConfig(vocab_size=len(tok), max_position_embeddings=CLIP_MAX_TOKENS,
                                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                pad_token_id=tok.pad_token_id, **cfg)
        return CLIPTextModelWithProjection(config)

    def t5():
        config = T5Config(vocab_size=len(tokenizer_3), is_encoder_decoder=False, use_cache=False, **preset.t5)
        model = T5EncoderModel(config)
        return model

    parts: dict[str, Any] = {
        "transformer": seeded(0, lambda: SD3Transformer2DModel(**preset.transformer))
        if "transformer" in wanted else None,
        "text_encoder": seeded(1, lambda: clip(preset.clip_l, tokenizer)) if "text_encoder" in wanted else None,
        "text_encoder_2": seeded(2, lambda: clip(preset.clip_g, tokenizer_2)) if "text_encoder_2" in wanted else None,
        "text_encoder_3": seeded(3, t5) if "text_encoder_3" in wanted else None,
        "vae": seeded(4, lambda: AutoencoderKL(**preset.vae)) if "vae" in wanted else None,
    }
    if parts["vae"] is None:
        # The pipeline reads the VAE's config (scale factor, shift); a config-only stand-in would be a second
        # source of truth, so a tiny-size VAE is cheap enough to always build for presets.
        parts["vae"] = seeded(4, lambda: AutoencoderKL(**preset.vae))
    return StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**preset.scheduler),
        tokenizer=tokenizer, tokenizer_2=tokenizer_2, tokenizer_3=tokenizer_3, **parts,
    )


def quiet_libraries() -> None:
    """diffusers/transformers log notices per model; sd35trt reports what matters itself."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()


def _load_local(path: Path, *, device: str, dtype: torch.dtype, wanted: set[str]) -> StableDiffusion3Pipeline:
    from diffusers import StableDiffusion3Pipeline

    skip = {name: None for name in ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3")
            if name not in wanted}
    try:
        pipe = StableDiffusion3Pipeline.from_pretrained(path, torch_dtype=dtype, local_files_only=True, **skip)
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"cannot load the diffusers pipeline: {first}", path=path,
                             hint="check the directory is a complete SD3.5 download") from exc
    return pipe.to(device)


def vae_scale_factor(pipe: StableDiffusion3Pipeline) -> int:
    return 2 ** (len(pipe.vae.config.block_out_channels) - 1)
