"""What a bundle's engines need at run time, recorded when they are built and checked on the deploy host.

Plain TensorRT engines run only on the TensorRT version that built them and on the GPU architecture they were
built for. ``sd35trt build --portable`` builds full-TensorRT engines version-compatible
(``BuilderFlag.VERSION_COMPATIBLE`` with ``EXCLUDE_LEAN_RUNTIME``): by TensorRT's API, such plans execute on the
lean runtime of the same version (``tensorrt-lean``, a 44 MB wheel with no builder), so deploy hosts need not
carry the full library. ``--hardware-compat ampere+`` (``HardwareCompatibilityLevel.AMPERE_PLUS``) lets one
engine run on every GPU from Ampere on. Every bundle manifest holds the result under ``runtime``; ``doctor``
compares it with the host (the record itself, ``manifests.RuntimeRecord``). Pure functions: tested here without a GPU.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sd35trt.core.errors import InvalidInputError, check_choice
from sd35trt.core.targets import RTX_CCS

if TYPE_CHECKING:
    from sd35trt.core.manifests import BundleManifest, RuntimeRecord

HARDWARE_COMPAT = ("none", "ampere+")


def check_portability(backend: str, portable: bool, hardware_compat: str, *, fp8_components: list[str],
                      build_cc: tuple[int, int] | None) -> None:
    """One line for a combination the backend cannot build, before any engine is built."""
    check_choice("--hardware-compat", hardware_compat, HARDWARE_COMPAT)
    if backend == "tensorrt-rtx" and (portable or hardware_compat != "none"):
        raise InvalidInputError("--portable and --hardware-compat are for full TensorRT engines; TensorRT-RTX "
                                "engines already run on every compute capability of their target (its runtime "
                                "compiles them for the GPU it finds) and need the TensorRT-RTX version that built them",
                                hint="drop the option, or build with --backend tensorrt on a GPU host")
    if hardware_compat == "ampere+":
        if fp8_components:
            raise InvalidInputError(f"--hardware-compat ampere+ engines must also run on Ampere, which has no FP8 "
                                    f"({', '.join(fp8_components)} would be FP8)",
                                    hint="add --precision fp16, or build per target without --hardware-compat")
        if build_cc is not None and build_cc < (8, 0):
            raise InvalidInputError(f"--hardware-compat ampere+ needs an Ampere or newer GPU to build on; this one is "
                                    f"SM{build_cc[0]}{build_cc[1]}", hint="build on an Ampere or newer host")


def runtime_fit(record: RuntimeRecord, installed: dict[str, str | None], host_cc: str | None) -> tuple[bool, str]:
    """Can a host with ``installed`` runtime modules (module → version or None) and GPU ``host_cc`` run these
    engines? (False, the first blocking reason)."""
    if host_cc is None:
        return False, "no CUDA GPU on this host"
    if record.hardware_compatibility == "ampere+":
        major = int(host_cc.split(".")[0])
        if major < 8:
            return False, f"engines are Ampere-and-newer (ampere+), this GPU is compute capability {host_cc}"
    elif host_cc not in record.compute_capabilities:
        return False, f"built for compute capability {', '.join(record.compute_capabilities)}, this GPU is {host_cc}"
    present = {m: installed.get(m) for m in record.modules if installed.get(m)}
    if not present:
        return False, f"no runtime for these engines is installed (need {' or '.join(f'{m} {record.version}' for m in record.modules)})"
    for module, version in present.items():
        if version == record.version:
            return True, f"runs on {module} {version}" + (" (version-compatible plans)" if record.version_compatible else "")
    found = ", ".join(f"{m} {v}" for m, v in present.items())
    return False, (f"built with {record.backend} {record.version}, installed {found}: the plans need that exact "
                   "version" + ("'s runtime (lean or full)" if record.version_compatible else ""))


def runtime_module(record: RuntimeRecord, installed: dict[str, str | None]) -> str | None:
    """The installed module to deserialize these plans with (the full runtime first), or None."""
    return next((m for m in record.modules if installed.get(m) == record.version), None)


def bundle_fit(manifest: BundleManifest, host: dict[str, Any]) -> tuple[bool, str]:
    """Can this bundle's engines run on this host? (False, why) names the first blocking reason. The bundle's
    ``runtime`` record decides (a version-compatible bundle also runs on the lean runtime)."""
    record = manifest.runtime_record
    ok, why = runtime_fit(record, host["runtimes"], host["compute_capability"])
    if not ok:
        return False, why
    major, minor = (int(v) for v in host["compute_capability"].split("."))
    if record.backend == "tensorrt-rtx" and (major, minor) not in RTX_CCS:
        return False, (f"TensorRT-RTX does not run on compute capability {major}.{minor} (it supports "
                       f"{', '.join(f'{a}.{b}' for a, b in RTX_CCS)})")
    return True, why
