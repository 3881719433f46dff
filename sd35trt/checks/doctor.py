"""``sd35trt doctor``: what this host can run, and which engines of a bundle fit it (and why not)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sd35trt.core.errors import InvalidInputError, Sd35TrtError
from sd35trt.core.host import host_report
from sd35trt.core.manifests import BUNDLE_MANIFEST, STATIC_ACTIVATIONS, BundleManifest
from sd35trt.core.portability import bundle_fit

if TYPE_CHECKING:
    from sd35trt.runtime.vram import VramPlan


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
        try:
            manifest = BundleManifest.load(folder)
        except Sd35TrtError as err:
            if folder in folders:
                raise  # the bundle asked about: its own problem, one line
            bundles[str(folder)] = {"runnable": False, "why": f"its manifest cannot be read: {err}"}
            continue  # a broken sibling is reported, never the error of the bundle that was asked about
        ok, why = bundle_fit(manifest, host)
        record = manifest.runtime_record
        bundles[str(folder)] = {
            "target": manifest.target, "compute_capabilities": manifest.compute_capabilities,
            "backend": f"{manifest.backend} {manifest.backend_version}", "runnable": ok, "why": why,
            "engines": {n: e.precision for n, e in manifest.components.items()},
            "host_code": ("allowed: version-compatible plans carry the runtime's code; sd35trt lets TensorRT load it "
                          "only after the plan's sha256 matched the manifest" if record.version_compatible else
                          "none: plain plans, loaded with host code disallowed"),
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


def vram_report(folder: Path, budget_gib: float | None, *, height: int = 1024, width: int = 1024, batch: int = 1,
                t5: bool = True) -> dict[str, Any]:
    """What each VRAM plan needs for one image of ``height``×``width`` on this bundle (the model's default steps
    and guidance), from its manifest alone: engine sizes as built, activations estimated
    (``ComponentSpec.activation_bytes``); the plan chosen for ``budget_gib`` (the GPU's free memory by default),
    or why none fits."""
    from sd35trt.core.assets import PipelineAssets, load_assets
    from sd35trt.core.models import resolve_model
    from sd35trt.core.specs import SPECS
    from sd35trt.runtime.request import GenerateRequest, LoopShape
    from sd35trt.runtime.runners import ComponentRunner
    from sd35trt.runtime.vram import GIB, all_peaks, gpu_budget, in_gib

    manifest = BundleManifest.load(folder)
    assets_dir = folder / BUNDLE_MANIFEST.replace("manifest.json", "assets")
    if (assets_dir / "assets.json").is_file():
        assets = PipelineAssets.load(assets_dir)
    else:  # a bundle from before assets existed: the preset it names, or its model directory
        assets = load_assets(resolve_model(manifest.model.get("path") or manifest.model["id"],
                                           turbo=manifest.turbo or None))
    missing = [c for c in SPECS if c != "t5" and c not in manifest.components]
    if missing:  # built with --components: some engines of an image are elsewhere
        return {"plan": None, "why": f"the bundle has no {', '.join(missing)} engine (built with --components): "
                                     "an image needs every network, so there is no plan for this bundle alone"}
    sized_runners = {name: ComponentRunner(SPECS[name], entry.precision, profile=entry.profile, weight_bytes=entry.bytes)
                 for name, entry in manifest.components.items() if t5 or name != "t5"}

    for name, entry in manifest.components.items():
        if name in sized_runners:
            sized_runners[name].streamable = entry.weight_streaming
            sized_runners[name].static_activations = True  # an engine holds its profile's largest activations
    shape = LoopShape(assets, sized_runners)
    request = shape.resolve(GenerateRequest(prompt="", height=height, width=width, batch=batch))
    needs = shape.needs(request)
    report: dict[str, Any] = {
        "request": {"height": height, "width": width, "batch": batch, "steps": request.steps,
                    "guidance": request.guidance, "t5": "t5" in sized_runners},
        "bundle_gib": round(sum(n.weights for n in needs.values()) / GIB, 2),
        "plans_gib": in_gib(all_peaks(needs)),
        "needs": {k: v.to_dict() for k, v in needs.items()},
        "activations": "estimated (ComponentSpec.activation_bytes) at each engine's profile maximum, what static "
                       "allocation holds whatever the request; TensorRT reports its own when the engine loads",
        "activation_memory": manifest.runtime.get("activation_memory", STATIC_ACTIVATIONS)}
    budget = gpu_budget(budget_gib)
    if budget is None:
        report["plan"] = None
        report["why"] = "no CUDA GPU here and no --vram: the plans' needs are above"
        return report
    plan, error = _plan_or_why(needs, budget)
    report |= {"plan": plan.to_dict()} if plan is not None else {"plan": None, "error": error}
    report["transformer_room"] = _room_report(needs, budget)
    report["fitted_ranges"] = _fitted_report(shape.needs(request, fitted=True), budget, height=height, width=width,
                                             batch=batch)
    return report


def _fitted_report(needs: dict[str, Any], budget: int, *, height: int, width: int, batch: int) -> dict[str, Any]:
    """The plans of this bundle's engines rebuilt with shape ranges that end at the request (an engine holds
    activation memory for its profile's largest shapes): the ``make engines`` knobs and what they would need."""
    from sd35trt.runtime.vram import GIB, all_peaks, in_gib

    ranges = {"BATCH": f"1:1:{batch}", "HEIGHT": f"{min(512, height)}:{height}:{height}",
              "WIDTH": f"{min(512, width)}:{width}:{width}"}
    report: dict[str, Any] = {
        "make": " ".join(f"{k}={v}" for k, v in ranges.items()),
        "plans_gib": in_gib(all_peaks(needs)),
        "estimated": "the same weights, activations at this request's shapes (ComponentSpec.activation_bytes); "
                     "export and build again with these ranges to get such engines"}
    plan, error = _plan_or_why(needs, budget)
    report |= {"plan": plan.mode, "peak_gib": round(plan.peak / GIB, 2)} if plan is not None else {"plan": None, "error": error}
    return report


def _plan_or_why(needs: dict[str, Any], budget: int) -> tuple[VramPlan | None, str]:
    """The plan ``choose_plan`` picks for ``budget``, or None and its one line why none fits."""
    from sd35trt.runtime.vram import choose_plan

    try:
        return choose_plan(needs, budget), ""
    except Sd35TrtError as err:
        return None, str(err)


# The mixed recipe's size model counts the transformer's weights; its engine is up to ~3 % larger (SD3.5-Large and
# Medium FP8: the model's 8.18 and 2.14 GiB against the 8.27 and 2.2 GiB the built bundles imply, docs/BENCHMARKS.md).
ENGINE_OVER_WEIGHTS = 1.03


def _room_report(needs: dict[str, Any], budget: int) -> dict[str, Any]:
    """How large a transformer engine each plan fits on this card, and the ``--max-transformer-gib`` that aims at
    it (``calibrate --format mixed``, ``make engines QUANT=mixed MIXED_GIB=``): resident is faster, sequential
    (one network at a time) leaves the transformer more room."""
    from sd35trt.runtime.vram import GIB, transformer_room

    room = transformer_room(needs, budget)
    report: dict[str, Any] = {f"{mode}_gib": None if size is None else round(size / GIB, 2) for mode, size in room.items()}
    report["mixed_gib"] = {mode: math.floor(size / ENGINE_OVER_WEIGHTS / GIB * 100) / 100
                           for mode, size in room.items() if size is not None}
    report["for"] = ("`make engines QUANT=mixed MIXED_GIB=<mixed_gib of the plan you want>` (the transformer's weights; "
                     f"its engine runs up to {ENGINE_OVER_WEIGHTS - 1:.0%} larger)")
    return report
