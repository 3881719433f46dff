"""``sd35trt doctor``: what this host can run, and which engines of a bundle fit it (and why not)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sd35trt.core.errors import InvalidInputError
from sd35trt.core.host import host_report
from sd35trt.core.manifests import BUNDLE_MANIFEST, BundleManifest
from sd35trt.core.portability import bundle_fit


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
