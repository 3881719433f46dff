"""SD3.5 model sources: the ``tiny`` preset, the real SD3.5 shapes with random weights, or a local directory.

Every source yields diffusers' own ``StableDiffusion3Pipeline`` built from diffusers/transformers classes, so
export, calibration, the denoising loop and the comparison all run the same code whatever the weights are.
Presets are built from config with random weights from a fixed seed (no download is possible here); a path
is loaded with ``from_pretrained``. ``ModelSource.fingerprint`` identifies the weights for manifests.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import string
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sd35trt.core.errors import ModelLoadError

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


def looks_turbo(path: Path) -> bool:
    """A local directory is a Turbo model when its folder name or a config's ``_name_or_path`` says so (the
    Turbo and Large configs are otherwise identical); ``--turbo`` says so explicitly."""
    if "turbo" in path.name.lower():
        return True
    for config in (path / "model_index.json", path / "transformer" / "config.json"):
        try:
            if "turbo" in str(json.loads(config.read_text()).get("_name_or_path", "")).lower():
                return True
        except (OSError, ValueError):
            continue
    return False


@dataclass(frozen=True)
class ModelSource:
    """What ``--model`` names: a preset (random weights) or a local diffusers directory (real weights)."""

    id: str
    preset: PresetConfig | None = None
    path: Path | None = None
    turbo: bool = False
    adapters: tuple[Any, ...] = ()  # core.lora.Adapter: LoRA fused into the networks before anything else

    @property
    def defaults(self) -> Defaults:
        return TURBO_DEFAULTS if self.turbo else SD35_DEFAULTS

    @property
    def has_t5(self) -> bool:
        """A local directory may come without T5-XXL (users who run CLIP-only never download it)."""
        return self.path is None or (self.path / "text_encoder_3").is_dir()

    @property
    def random_weights(self) -> bool:
        return self.preset is not None

    @property
    def slug(self) -> str:
        return model_slug(self.describe(fingerprint=False))

    def config(self, folder: str) -> dict[str, Any]:
        """A network's config: a preset's, or the directory's ``<folder>/config.json`` ({} if unreadable: loading
        the network reports a broken one). ``folder``: transformer, vae, text_encoder, text_encoder_2, text_encoder_3."""
        if self.preset is not None:
            keys = {"transformer": "transformer", "vae": "vae", "text_encoder": "clip_l", "text_encoder_2": "clip_g",
                    "text_encoder_3": "t5"}
            return dict(getattr(self.preset, keys[folder]))
        assert self.path is not None
        try:
            data = json.loads((self.path / folder / "config.json").read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def transformer_config(self) -> dict[str, Any]:
        return self.config("transformer")

    def largest_side(self) -> int | None:
        """The largest image side in pixels this model's transformer takes: SD3 crops its position table
        (``pos_embed_max_size`` patches per side) to the latent, so a larger image has no positions (None: no
        limit known)."""
        transformer, vae = self.transformer_config(), self.config("vae")
        patches = transformer.get("pos_embed_max_size")
        if not patches or not vae.get("block_out_channels"):
            return None
        return int(patches) * int(transformer.get("patch_size", 2)) * 2 ** (len(vae["block_out_channels"]) - 1)

    def fingerprint(self) -> str:
        """sha256 over everything that decides the weights: preset config + seed, or every file of the directory.

        A directory's files are hashed by content (edited weights are another model, whatever their size); the
        sha256 of each file is kept in the per-user cache by its size, modification time and inode
        (``artifacts.known_sha256``), so tens of GB are read once per model, not by every command. Hidden files
        and folders (``.cache/``, editor state) are not the model.
        """
        from sd35trt.core.artifacts import known_sha256

        digest = hashlib.sha256()
        if self.preset is not None:
            digest.update(json.dumps(self.preset.to_dict(), sort_keys=True).encode())
        else:
            assert self.path is not None
            files = sorted(p for p in self.path.rglob("*") if p.is_file() and not any(
                part.startswith(".") for part in p.relative_to(self.path).parts))
            for file in files:
                digest.update(file.relative_to(self.path).as_posix().encode())
                digest.update(known_sha256(file).encode())
        if self.adapters:  # a model with LoRA fused is another model (never mixed with the base's artifacts)
            digest.update(json.dumps([[a.sha256, a.scale] for a in self.adapters]).encode())
        return digest.hexdigest()

    def describe(self, *, fingerprint: bool = True) -> dict[str, Any]:
        return {
            "id": self.id,
            "random_weights": self.random_weights,
            **({"fingerprint": self.fingerprint()} if fingerprint else {}),
            **({"config": self.preset.to_dict()} if self.preset else {"path": str(self.path)}),
            **({"turbo": True} if self.turbo else {}),
            **({"lora": [a.describe() for a in self.adapters]} if self.adapters else {}),
        }


def model_slug(described: dict[str, Any]) -> str:
    """A file-system-safe folder name for a model, from ``ModelSource.describe()`` (as manifests store it); a
    model with LoRA adapters fused gets its own (``tiny-lora-1a2b3c4d``), so bundles never overwrite the base's."""
    name = Path(described["path"]).name if described.get("path") else described["id"]
    if described.get("lora"):
        name += "-lora-" + hashlib.sha256(json.dumps([[a["sha256"], a["scale"]] for a in described["lora"]]).encode()
                                          ).hexdigest()[:8]
    return "".join(c if c.isalnum() or c in "-._" else "_" for c in name) or "model"


def resolve_model(model: str, *, turbo: bool | None = None, lora: str | None = None) -> ModelSource:
    """Turn ``--model`` into a ModelSource, checking a directory has every component before any heavy work.
    ``turbo`` (``--turbo``) overrides what the preset or directory says; ``lora`` (``--lora``) names adapters to
    fuse (each file checked now)."""
    source = _resolve(model, turbo)
    if lora:
        from dataclasses import replace

        from sd35trt.core.lora import parse_adapters

        source = replace(source, adapters=parse_adapters(lora))
    return source


def _resolve(model: str, turbo: bool | None) -> ModelSource:
    if model in PRESETS:
        preset = PRESETS[model]
        return ModelSource(id=model, preset=preset, turbo=preset.turbo if turbo is None else turbo)
    path = Path(model).expanduser()
    if not path.exists():
        looks_like_path = "/" in model or model.startswith((".", "~"))
        raise ModelLoadError(
            f"no such model directory '{model}'" if looks_like_path else f"unknown model '{model}'",
            hint=f"use one of {', '.join(PRESETS)} or a path to a local diffusers-format SD3.5 directory",
        )
    if not path.is_dir():
        raise ModelLoadError("model path is not a directory", path=path,
                             hint="pass a diffusers-format SD3.5 directory (with model_index.json)")
    if not (path / "model_index.json").is_file():
        raise ModelLoadError("not a diffusers model directory: model_index.json is missing", path=path,
                             hint="pass the folder that holds model_index.json, transformer/, vae/, ...")
    index = _read_config(path / "model_index.json", path)
    kind = index.get("_class_name")
    if kind is not None and kind not in SD3_PIPELINES:
        raise ModelLoadError(f"model_index.json names a {kind}, not an SD3/SD3.5 pipeline", path=path,
                             hint="pass a Stable Diffusion 3.5 diffusers directory")
    optional = {"text_encoder_3", "tokenizer_3"}  # CLIP-only directories: no T5-XXL
    missing = [folder for folder in PIPELINE_FOLDERS.values() if not (path / folder).is_dir() and folder not in optional]
    if (path / "text_encoder_3").is_dir() != (path / "tokenizer_3").is_dir():
        missing.append("tokenizer_3" if (path / "text_encoder_3").is_dir() else "text_encoder_3")
    if missing:
        raise ModelLoadError(f"model directory lacks component folder(s) {', '.join(missing)}", path=path,
                             hint="download the complete SD3.5 diffusers repository (text_encoder_3/tokenizer_3 may "
                                  "both be left out for CLIP-only use)")
    for config in CONFIG_FILES:  # a truncated or hand-edited config is one line now, not a traceback at load time
        if (path / config).is_file():
            _read_config(path / config, path)
    resolved = path.resolve()
    return ModelSource(id=str(resolved), path=resolved, turbo=looks_turbo(resolved) if turbo is None else turbo)


SD3_PIPELINES = ("StableDiffusion3Pipeline",)
CONFIG_FILES = ("transformer/config.json", "vae/config.json", "text_encoder/config.json", "text_encoder_2/config.json",
                "text_encoder_3/config.json", "scheduler/scheduler_config.json")


def _read_config(file: Path, model: Path) -> dict[str, Any]:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ModelLoadError(f"{file.relative_to(model)} is not valid JSON ({type(exc).__name__})", path=model,
                             hint="the download is incomplete or the file was edited: fetch it again") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{file.relative_to(model)} is not a JSON object", path=model,
                             hint="the download is incomplete or the file was edited: fetch it again")
    return data


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


# The tokenizers of presets are built in code (no hub), with whole-word pieces for the words of the shipped
# prompt set, so a prompt costs about as many tokens as with SD3.5's real tokenizers (one per common word), not
# one per character: truncation at 77 CLIP / 256 T5 tokens then happens where it would for real users.
TOKENIZER_WORDS = 1500
TOKENIZER_RECIPE = f"CLIP: byte-level + calibration/clip_merges.txt; T5: {TOKENIZER_WORDS} prompt-set words; v2"


def tokenizer_recipe() -> str:
    """What decides the presets' tokenizers (part of every preset's fingerprint)."""
    from sd35trt.core.artifacts import sha256_file
    from sd35trt.core.prompts import CALIBRATION_DIR, DEFAULT_PROMPTS

    return f"{TOKENIZER_RECIPE}; merges {sha256_file(CALIBRATION_DIR / 'clip_merges.txt')[:12]}; " \
           f"prompts {sha256_file(DEFAULT_PROMPTS)[:12]}"


def _prompt_words(limit: int = TOKENIZER_WORDS) -> list[str]:
    """The most frequent words of calibration/prompts.txt (ties broken alphabetically: deterministic)."""
    import collections
    import re

    from sd35trt.core.prompts import DEFAULT_PROMPTS

    counts = collections.Counter(re.findall(r"[a-z]+", DEFAULT_PROMPTS.read_text(encoding="utf-8").lower()))
    return [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if len(w) > 1][:limit]


def _clip_merges() -> list[tuple[str, str]]:
    """BPE merges learned on the shipped prompt set (``calibration/make_clip_merges.py`` writes them with
    tokenizers' own BpeTrainer and CLIP's pre-tokenization): its words become single tokens, as they mostly are
    in SD3.5's real CLIP vocabulary."""
    from sd35trt.core.prompts import CALIBRATION_DIR

    lines = (CALIBRATION_DIR / "clip_merges.txt").read_text(encoding="utf-8").splitlines()
    return [tuple(line.split(" ", 1)) for line in lines if line and not line.startswith("#")]  # type: ignore[misc]


def build_clip_tokenizer(vocab_size: int | None = None):
    """A real ``CLIPTokenizer``: a byte-level vocabulary plus BPE merges learned on the prompt set.

    With ``vocab_size`` (the real models' 49408) the vocabulary is padded with unused pieces so token ids
    have the real range.
    """
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {}
    for char in _byte_alphabet():
        vocab[char] = len(vocab)
    for char in _byte_alphabet():
        vocab[char + "</w>"] = len(vocab)
    merges = _clip_merges()
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    if vocab_size is not None:
        while len(vocab) < vocab_size - 2:
            vocab[f"<unused{len(vocab)}>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=CLIP_MAX_TOKENS)


def build_t5_tokenizer(vocab_size: int | None = None):
    """A real ``T5TokenizerFast`` (unigram) over printable characters and the prompt set's words."""
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(c, -1.0) for c in string.printable[:94]] + [("▁" + c, -1.5) for c in string.ascii_letters]
    pieces += [("▁" + w, -1.0) for w in _prompt_words()]
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
    if source.adapters and device != "meta":  # fuse in FP32 (the adapters' deltas added exactly), then cast
        from dataclasses import replace

        from sd35trt.core.lora import fuse_adapters

        pipe = build_pipeline(replace(source, adapters=()), device=device, dtype=torch.float32, components=components)
        fuse_adapters(pipe, source.adapters)
        return pipe.to(dtype=dtype) if dtype != torch.float32 else pipe
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


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """Loading a model directory without diffusers' "Loading pipeline components" bars, its deprecation
    FutureWarnings and transformers' notices: a directory loads as quietly as a preset (sd35trt logs the step)."""
    import warnings

    import diffusers
    import transformers

    quiet_libraries()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", UserWarning)
            yield
    finally:
        diffusers.utils.logging.enable_progress_bar()
        transformers.utils.logging.enable_progress_bar()


def _load_local(path: Path, *, device: str, dtype: torch.dtype, wanted: set[str]) -> StableDiffusion3Pipeline:
    from diffusers import StableDiffusion3Pipeline

    skip: dict[str, Any] = {name: None for name in ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3")
                            if name not in wanted}
    if not (path / "text_encoder_3").is_dir():  # a CLIP-only download
        skip.update(text_encoder_3=None, tokenizer_3=None)
    try:
        with quiet_loading():
            pipe = StableDiffusion3Pipeline.from_pretrained(path, dtype=dtype, local_files_only=True, **skip)
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"cannot load the diffusers pipeline: {first}", path=path,
                             hint="check the directory is a complete SD3.5 download") from exc
    return pipe.to(device)


def island_weights(source: ModelSource, attr: str, islands: list[Any], device: str) -> tuple[dict[str, Any], str]:
    """The FP32 weights of the modules in ``islands`` (``numerics.Island``) of network ``attr``, for an export that
    builds the network in FP16: an island must compute with its FP32 weights, not FP16-rounded (or overflowed) ones.
    A directory without LoRA: the island's tensors read from its safetensors files, as stored. Otherwise (presets,
    LoRA fused in FP32): that network built in FP32, its island tensors kept. Returns (tensors by full name, where
    they came from)."""
    if not islands:
        return {}, "no islands"
    prefixes = tuple(i.module + "." for i in islands)
    if source.path is not None and not source.adapters:
        found = _stored_tensors(source.path / attr, prefixes)
        if found:
            return found, f"read from {attr}/*.safetensors"
    import torch

    from sd35trt.core.numerics import island_state

    pipe = build_pipeline(source, device=device, dtype=torch.float32, components={attr})
    tensors = {k: v.cpu() for k, v in island_state(getattr(pipe, attr), islands).items()}
    del pipe
    return tensors, f"the {attr} network built in FP32"


def _stored_tensors(folder: Path, prefixes: tuple[str, ...]) -> dict[str, Any]:
    """Tensors whose names start with ``prefixes`` from a network folder's safetensors files, upcast to FP32."""
    from safetensors import safe_open

    found = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                if key.startswith(prefixes):
                    found[key] = handle.get_tensor(key).float()
    return found


def vae_scale_factor(pipe: StableDiffusion3Pipeline) -> int:
    return 2 ** (len(pipe.vae.config.block_out_channels) - 1)


# --- what the denoising loop needs besides the networks ---------------------------------------------------

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


def weight_bytes(source: ModelSource, dtype: Any, components: set[str] | None = None) -> dict[str, int]:
    """Bytes of each network's weights in ``dtype`` (pipeline attribute → bytes), counted on the meta device:
    what a torch run will hold on the GPU, known before any weight is created or read."""
    import torch

    if source.preset is not None:
        pipe = build_pipeline(source, device="meta", dtype=dtype, components=components)
        networks = {a: getattr(pipe, a) for a in ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "vae")}
    else:
        assert source.path is not None
        from diffusers import AutoencoderKL, SD3Transformer2DModel
        from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

        path, networks = source.path, {}
        with torch.device("meta"):
            networks["transformer"] = SD3Transformer2DModel.from_config(SD3Transformer2DModel.load_config(path / "transformer"))
            networks["vae"] = AutoencoderKL.from_config(AutoencoderKL.load_config(path / "vae"))
            for attr in ("text_encoder", "text_encoder_2"):
                networks[attr] = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(path / attr))
            if source.has_t5:
                networks["text_encoder_3"] = T5EncoderModel(T5Config.from_pretrained(path / "text_encoder_3"))
    size = torch.tensor([], dtype=dtype).element_size()
    wanted = components if components is not None else set(networks)
    return {attr: sum(p.numel() for p in net.parameters()) * size for attr, net in networks.items()
            if net is not None and attr in wanted}
