"""Facts about the host: which torch device to use, whether a CUDA GPU is present and what it is."""

from __future__ import annotations

from sd35trt.errors import InvalidInputError

DEVICES = ("auto", "cpu", "cuda")


def pick_device(device: str) -> str:
    """``auto`` → ``cuda`` when torch sees a GPU, else ``cpu``; ``cuda`` without a GPU is a user error."""
    if device not in DEVICES:
        raise InvalidInputError(f"--device '{device}' is not one of {', '.join(DEVICES)}", hint="use auto, cpu or cuda")
    import torch

    has_cuda = torch.cuda.is_available()
    if device == "cuda" and not has_cuda:
        raise InvalidInputError("--device cuda requested but torch sees no CUDA GPU", hint="use --device cpu")
    if device == "auto":
        return "cuda" if has_cuda else "cpu"
    return device
