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
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sd35trt.core.errors import ModelLoadError
from sd35trt.core.presets import PRESET_SEED, PRESETS, SD35_DEFAULTS, TURBO_DEFAULTS, Defaults, PresetConfig
from sd35trt.core.tokenizers import CLIP_MAX_TOKENS, build_clip_tokenizer, build_t5_tokenizer

if TYPE_CHECKING:
    import torch
    from diffusers import StableDiffusion3Pipeline

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
    assert source.preset is not None
    return _build_preset(source.preset, device=device, dtype=dtype, wanted=wanted)


def _build_preset(preset: PresetConfig, *, device: str, dtype: torch.dtype, wanted: set[str]) -> StableDiffusion3Pipeline:
    """A preset's pipeline from config: each network created on ``device`` from its own fixed seed (random
    weights), tokenizers built in code; networks not ``wanted`` are None (the VAE is always built)."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
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

    # A preset's random weights depend on the device they are drawn on, so they are drawn again there; a directory's
    # (with its LoRA fused) do not: built on the CPU, the FP32 copy does not sit on the GPU beside the FP16 export
    # (SD3.5-Large: 32 GB more)
    where = device if source.path is None else "cpu"
    pipe = build_pipeline(source, device=where, dtype=torch.float32, components={attr})
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
