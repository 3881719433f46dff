"""Facts about the host: which torch device to use, whether a CUDA GPU is present and what it is."""

from __future__ import annotations

from sd35trt.errors import InvalidInputError, check_choice

DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "fp32", "fp16", "bf16")


def pick_device(device: str) -> str:
    """``auto`` → ``cuda`` when torch sees a GPU, else ``cpu``; ``cuda`` without a GPU is a user error."""
    check_choice("--device", device, DEVICES)
    import torch

    has_cuda = torch.cuda.is_available()
    if device == "cuda" and not has_cuda:
        raise InvalidInputError("--device cuda requested but torch sees no CUDA GPU", hint="use --device cpu")
    if device == "auto":
        return "cuda" if has_cuda else "cpu"
    return device


def pick_dtype(dtype: str, device: str, *, on_gpu: str):
    """The torch dtype for ``dtype`` on ``device``; ``auto`` is FP32 on CPU and ``on_gpu`` on CUDA."""
    check_choice("--dtype", dtype, DTYPES)
    import torch

    name = on_gpu if dtype == "auto" and device.startswith("cuda") else "fp32" if dtype == "auto" else dtype
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]
