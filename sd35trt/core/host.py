"""Facts about the host: which torch device to use, whether a CUDA GPU is present and what it is, which
TensorRT runtimes are installed. Nothing here builds or runs an engine."""

from __future__ import annotations

import importlib
import importlib.util
import shutil
import subprocess
from typing import TYPE_CHECKING, Any

from sd35trt.core.errors import InvalidInputError, check_choice

if TYPE_CHECKING:
    from sd35trt.core.targets import GpuTarget, TargetInfo

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


def pick_placement(device: str, dtype: str, *, on_gpu: str) -> tuple[str, Any]:
    """``--device`` and ``--dtype`` together: where a torch run goes and in which dtype (``pick_device``,
    ``pick_dtype``)."""
    placed = pick_device(device)
    return placed, pick_dtype(dtype, placed, on_gpu=on_gpu)


def detect_device(device: str) -> str:
    """``pick_device`` without importing torch when no NVIDIA driver is present (for skip decisions)."""
    check_choice("--device", device, DEVICES)
    if device != "auto":
        return device
    return "cuda" if local_compute_capability() is not None else "cpu"


def compute_dtype_name(dtype: str, device: str) -> str:
    """The compute dtype of calibration loops: ``auto`` is BF16 on CUDA (SD3.5's training precision, no
    FP16 overflow) and FP32 on CPU; FP16 only when asked."""
    check_choice("--dtype", dtype, DTYPES)
    if dtype != "auto":
        return dtype
    return "bf16" if device.startswith("cuda") else "fp32"


def strict_fp32() -> None:
    """FP32 means FP32: no TF32 in matmuls or cuDNN convolutions (torch's cuDNN default is TF32, which put an
    SD3.5-Medium "FP32" reference 1.9e-4 rel-L2 away from FP64, against 7.8e-7 without it)."""
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")


def computing(device: str, dtype_name: str):
    """Autocast to ``dtype_name`` on ``device`` (weights stay FP32); nothing for FP32."""
    import contextlib

    import torch

    if dtype_name == "fp32":
        return contextlib.nullcontext()
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype_name]
    return torch.autocast(device_type="cuda" if device.startswith("cuda") else "cpu", dtype=dtype)


def local_compute_capability() -> tuple[int, int] | None:
    import os

    if not os.path.exists("/dev/nvidiactl") and not shutil.which("nvidia-smi"):
        return None  # no NVIDIA driver here: answer without importing torch (seconds on a CPU box)
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    return tuple(torch.cuda.get_device_capability(0))  # type: ignore[return-value]


def resolve_target(target: GpuTarget) -> TargetInfo:
    """The named target, or for ``auto`` the one of this host's GPU (its own compute capability)."""
    from sd35trt.core.targets import TARGETS, GpuTarget, TargetInfo, target_for_cc

    if target is not GpuTarget.AUTO:
        return TARGETS[target]
    cc = local_compute_capability()
    if cc is None:
        raise InvalidInputError("--gpu auto needs a local CUDA GPU and none was found",
                                hint="name the target: --gpu ada|hopper|blackwell|ampere|turing")
    found = target_for_cc(cc)
    if found is None:
        raise InvalidInputError(f"local GPU SM{cc[0]}{cc[1]} is not a supported target",
                                hint="supported: SM75, SM80, SM86, SM89, SM90, SM100, SM120")
    return TargetInfo(found, (cc,), TARGETS[found].example_gpus)


def host_report() -> dict[str, Any]:
    cc = local_compute_capability()
    report: dict[str, Any] = {"gpu": None, "compute_capability": f"{cc[0]}.{cc[1]}" if cc else None,
                              "driver": None, "runtimes": {}}
    if cc is not None:
        import torch

        report["gpu"] = torch.cuda.get_device_name(0)
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20)
            if out.returncode == 0 and out.stdout.strip():
                name, driver = [x.strip() for x in out.stdout.splitlines()[0].split(",", 1)]
                report["gpu"] = report["gpu"] or name
                report["driver"] = driver
        except (OSError, subprocess.TimeoutExpired):
            pass
    from importlib import metadata

    from sd35trt.core.manifests import RUNTIME_MODULES

    for modules in RUNTIME_MODULES.values():
        for module in modules:  # versions from the installed distributions: importing TensorRT takes seconds
            report["runtimes"][module] = _module_version(module, metadata)
    return report


def _module_version(module: str, metadata: Any) -> str | None:
    if importlib.util.find_spec(module) is None:
        return None
    for dist in metadata.packages_distributions().get(module, []):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return str(getattr(importlib.import_module(module), "__version__", "unknown"))
