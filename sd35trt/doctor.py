"""``sd35trt doctor``: what this host can run, and which engines of a bundle fit it (and why not)."""

from __future__ import annotations

import importlib
import importlib.util
import shutil
import subprocess
from pathlib import Path
from typing import Any

from sd35trt.backends import local_compute_capability
from sd35trt.errors import InvalidInputError
from sd35trt.manifests import BUNDLE_MANIFEST, BundleManifest


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

    from sd35trt.portability import RUNTIME_MODULES

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


def bundle_fit(manifest: BundleManifest, host: dict[str, Any]) -> tuple[bool, str]:
    """Can this bundle's engines run on this host? (False, why) names the first blocking reason. The bundle's
    ``runtime`` record decides (a version-compatible bundle also runs on the lean runtime)."""
    from sd35trt.portability import RuntimeRecord, runtime_fit
    from sd35trt.targets import RTX_CCS

    record = RuntimeRecord.of_bundle(manifest.data)
    ok, why = runtime_fit(record, host["runtimes"], host["compute_capability"])
    if not ok:
        return False, why
    major, minor = (int(v) for v in host["compute_capability"].split("."))
    if record.backend == "tensorrt-rtx" and (major, minor) not in RTX_CCS:
        return False, (f"TensorRT-RTX does not run on compute capability {major}.{minor} (it supports "
                       f"{', '.join(f'{a}.{b}' for a, b in RTX_CCS)})")
    return True, why


def diagnose(path: Path | None) -> dict[str, Any]:
    host = host_report()
    report: dict[str, Any] = {"host": host}
    if path is None:
        return report
    if not path.is_dir():
        raise InvalidInputError("bundle folder not found", path=path, hint="pass engines/<model>/<target>-<backend>/")
    folders = [path] if (path / BUNDLE_MANIFEST).is_file() else sorted(
        p for p in path.iterdir() if (p / BUNDLE_MANIFEST).is_file())
    if not folders:
        raise InvalidInputError("no bundle manifest found", path=path,
                                hint="pass engines/<model>/<target>-<backend>/ or engines/<model>/")
    siblings = sorted(p for p in folders[0].parent.iterdir() if (p / BUNDLE_MANIFEST).is_file())
    bundles, runnable = {}, []
    for folder in sorted(set(folders) | set(siblings)):
        manifest = BundleManifest.load(folder)
        ok, why = bundle_fit(manifest, host)
        bundles[str(folder)] = {
            "target": manifest.target, "compute_capabilities": manifest.compute_capabilities,
            "backend": f"{manifest.backend} {manifest.backend_version}", "runnable": ok, "why": why,
            "engines": {n: e.precision for n, e in manifest.components.items()},
        }
        if ok:
            runnable.append(str(folder))
    report["bundles"] = bundles
    report["runnable_bundles"] = runnable
    if path in folders and str(path) not in runnable and runnable:
        report["advice"] = f"{path} cannot run here; use {runnable[0]} instead"
    elif not runnable:
        report["advice"] = ("no engine of this bundle can run on this host; run the same loop on the bundle's ONNX: "
                            "sd35trt generate --onnx <work dir> ...")
    return report
