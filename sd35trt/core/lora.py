"""LoRA style adapters, fused into the model before anything is measured.

``--lora adapter.safetensors[:scale][,more]`` names one or more adapters; each becomes part of the model a
``ModelSource`` describes (its sha256 and scale are in the fingerprint, so every calibration, ONNX and bundle
built with it is keyed on it and never reused for another). ``fuse_adapters`` uses diffusers' own SD3 LoRA
loader (``load_lora_weights`` + ``fuse_lora``, PEFT underneath) on the FP32 networks, then removes the adapter
layers: FP8 scales are then measured on the fused weights, as ModelOpt's diffusers example advises ("fuse LoRA
before quantization"). Bad files are refused in one line naming the file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sd35trt.core.errors import InvalidInputError, ModelLoadError

# Networks of StableDiffusion3Pipeline an SD3 LoRA file may hold weights for (diffusers' key prefixes).
LORA_PREFIXES = {"transformer": "transformer", "text_encoder": "text_encoder", "text_encoder_2": "text_encoder_2"}


@dataclass(frozen=True)
class Adapter:
    path: Path
    scale: float
    sha256: str
    networks: tuple[str, ...]  # pipeline attributes the file has weights for

    @property
    def name(self) -> str:
        return f"lora_{self.sha256[:12]}"

    def describe(self) -> dict[str, Any]:
        return {"file": self.path.name, "sha256": self.sha256, "scale": self.scale, "networks": list(self.networks)}


def _safetensors_keys(path: Path) -> list[str]:
    """The tensor names of a safetensors file (``safe_open`` reads its header alone)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return list(handle.keys())
    except (OSError, SafetensorError):
        raise InvalidInputError("LoRA adapter is not a safetensors file", path=path,
                                hint="pass the .safetensors file diffusers' save_lora_weights (or a trainer) wrote") from None


MAX_SCALE = 10.0  # past this a LoRA's deltas swamp the model's weights: garbage, or NaN


def _check_finite(path: Path, keys: list[str]) -> None:
    """Every LoRA tensor is finite: a NaN in an adapter makes every image NaN (a black PNG), never an error later."""
    import torch
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        for key in keys:
            if not bool(torch.isfinite(handle.get_tensor(key).float()).all()):
                raise InvalidInputError(f"LoRA adapter holds NaN/Inf weights ({key})", path=path,
                                        hint="the file is damaged or was trained to divergence: use another adapter")


def parse_adapters(text: str | None) -> tuple[Adapter, ...]:
    """``a.safetensors[:scale][,b.safetensors[:scale]]`` → adapters, each file checked: it exists, is
    safetensors, and holds LoRA weights for SD3's transformer or text encoders."""
    from sd35trt.core.artifacts import sha256_file

    adapters = []
    for item in (text or "").split(","):
        item = item.strip()
        if not item:
            continue
        location, scale = item, 1.0
        head, sep, tail = item.rpartition(":")
        if sep and head and not Path(item).expanduser().is_file():  # a ':' may also be part of the path itself
            try:
                location, scale = head, float(tail)
            except ValueError:
                if Path(head).expanduser().is_file():
                    raise InvalidInputError(f"LoRA scale '{tail}' is not a number", path=Path(head),
                                            hint="pass --lora adapter.safetensors:0.8") from None
        if not math.isfinite(scale) or abs(scale) > MAX_SCALE:
            raise InvalidInputError(f"LoRA scale {scale:g} is outside -{MAX_SCALE:g}..{MAX_SCALE:g}", path=Path(location),
                                    hint="LoRA scales are about 0..1.5; e.g. --lora adapter.safetensors:0.8")
        path = Path(location).expanduser()
        if not path.is_file():
            raise InvalidInputError("LoRA adapter not found", path=path, hint="pass --lora path/to/adapter.safetensors[:scale]")
        keys = _safetensors_keys(path)
        lora = [k for k in keys if "lora" in k.lower()]
        if not lora:
            raise InvalidInputError("this safetensors file holds no LoRA weights (no lora_A/lora_B or lora_down/lora_up "
                                    "keys)", path=path, hint="pass a LoRA adapter, not a model checkpoint")
        _check_finite(path, lora)
        networks = tuple(attr for attr, prefix in LORA_PREFIXES.items()
                         if any(k.startswith(prefix + ".") for k in lora))
        adapters.append(Adapter(path.resolve(), scale, sha256_file(path), networks or ("transformer",)))
    return tuple(adapters)


def fuse_adapters(pipe: Any, adapters: tuple[Adapter, ...]) -> None:
    """Load every adapter with diffusers' SD3 LoRA loader into the networks ``pipe`` has, fuse them at their
    scales and drop the adapter layers (the fused weights stay). A pipeline built with some networks only (export
    builds the text encoders apart from the transformer) gets each adapter's weights for those networks; an
    adapter with none for them is skipped there. An adapter whose shapes do not match, or that matches no layer,
    is refused in one line naming its file."""
    present = [attr for attr in LORA_PREFIXES if getattr(pipe, attr, None) is not None]
    loaded = [a for a in adapters if set(a.networks) & set(present)]
    if not loaded:
        return
    import diffusers

    for adapter in loaded:
        targets = [attr for attr in present if attr in adapter.networks]
        before = _peft_layers(pipe, targets)
        level = diffusers.utils.logging.get_verbosity()
        diffusers.utils.logging.set_verbosity(diffusers.utils.logging.CRITICAL)  # its own traceback before it raises
        try:
            _load_into(pipe, adapter, targets)
        except (ValueError, RuntimeError, KeyError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise ModelLoadError(f"LoRA adapter does not fit this model ({first})", path=adapter.path,
                                 hint="use an adapter trained for this SD3.5 model (same architecture and size)") from None
        finally:
            diffusers.utils.logging.set_verbosity(level)
        if _peft_layers(pipe, targets) == before:
            raise ModelLoadError("LoRA adapter matched no layer of this model", path=adapter.path,
                                 hint="use an adapter trained for this SD3.5 model (its keys name other modules)")
    names = [a.name for a in loaded]
    pipe.set_adapters(names, adapter_weights=[a.scale for a in loaded])
    pipe.fuse_lora(components=present, lora_scale=1.0, adapter_names=names)
    pipe.unload_lora_weights()


def _load_into(pipe: Any, adapter: Adapter, targets: list[str]) -> None:
    """diffusers' ``load_lora_weights`` network by network: it loads into the transformer and both CLIP encoders
    unconditionally, and a pipeline built without one of them (``None``) has no loader to call."""
    state, metadata = pipe.lora_state_dict(str(adapter.path), return_lora_metadata=True)
    for attr in targets:
        if attr == "transformer":
            pipe.load_lora_into_transformer(state, transformer=pipe.transformer, adapter_name=adapter.name,
                                            metadata=metadata, _pipeline=pipe)
        else:
            pipe.load_lora_into_text_encoder(state, network_alphas=None, text_encoder=getattr(pipe, attr), prefix=attr,
                                             lora_scale=pipe.lora_scale, adapter_name=adapter.name, metadata=metadata,
                                             _pipeline=pipe)


def _peft_layers(pipe: Any, attrs: list[str]) -> int:
    """How many adapter layers the networks ``attrs`` of the pipeline hold (PEFT's tuner layers)."""
    count = 0
    for attr in attrs:
        network = getattr(pipe, attr, None)
        if network is not None:
            count += sum(1 for m in network.modules() if type(m).__module__.startswith("peft.tuners"))
    return count
