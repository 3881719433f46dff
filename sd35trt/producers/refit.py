"""``sd35trt refit``: one refittable base bundle, many LoRA adapters, no engine build on the deploy host.

A bundle built with ``build --refittable`` (``BuilderFlag.REFIT``; ``--strip-weights`` adds ``STRIP_PLAN``: the
plans ship without their refittable weights) is refit with the weights of an ONNX exported from the same model
with the adapter fused (``export --lora``): TensorRT's ``Refitter`` and ``OnnxParserRefitter`` read every weight
from that ONNX into the engine, which is then serialized whole into a new bundle keyed on the adapter. For FP8
engines the ONNX carries its own calibration's scales (a calibration made with the adapter), so a refit engine
computes what a build from that ONNX would.

Nothing here can execute on the machines of this project (no GPU TensorRT runs on; see the README): the calls
are written against TensorRT 11.4 / TensorRT-RTX 1.7 and type-checked against both by ``make lint``.
"""

from __future__ import annotations

import mmap
import shutil
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sd35trt.core import log, trt_api
from sd35trt.core.artifacts import atomic_dir, sha256_file, write_buffer_atomic, write_json_atomic
from sd35trt.core.errors import ArtifactError, InvalidInputError
from sd35trt.core.manifests import BUNDLE_MANIFEST, BundleManifest, EngineEntry, OnnxManifest, PlanFile, WorkDir
from sd35trt.core.models import model_slug
from sd35trt.core.specs import Precision

if TYPE_CHECKING:  # `make lint` checks the engine code against these stubs (core.trt_api)
    from sd35trt.core.trt_api import trt  # noqa: F401  (the functions below bind it at run time only)

REFIT_MODES = ("none", "refit", "stripped")


def refit_plan(plan: Path, onnx: Path, module_name: str, dest: Path, *, sha256: str, size: int) -> int:
    """Refit one engine from ``onnx`` and write it whole to ``dest``; returns its size. The plan's bytes are checked
    against the manifest's sha256 as they are mapped (``artifacts.check_mapped``)."""
    from sd35trt.core.artifacts import check_mapped

    if not TYPE_CHECKING:  # the backend's own module at run time; mypy reads the stubs' ``trt``
        trt = trt_api.load(module_name)
    logger = trt_api.make_logger(trt, module_name)
    runtime = trt.Runtime(logger)
    with open(plan, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        check_mapped(plan, mapped, sha256, size)
        engine: trt.ICudaEngine | None = runtime.deserialize_cuda_engine(mapped)
    if engine is None:
        words = " | ".join(logger.problems[-2:]) or "no message from the runtime"
        raise ArtifactError(f"the runtime cannot load this engine to refit it: {words}", path=plan,
                            hint="refit on a GPU the bundle was built for (sd35trt doctor)")
    refitter = trt.Refitter(engine, logger)
    parser = trt.OnnxParserRefitter(refitter, logger)
    if not parser.refit_from_file(str(onnx)):
        errors = "; ".join(str(parser.get_error(i).desc()) for i in range(parser.num_errors))[:300]
        raise ArtifactError(f"the ONNX does not fit this engine's weights ({errors})", path=onnx,
                            hint="export it from the model the bundle was built from, with the same --precision")
    missing = refitter.get_missing_weights()
    if missing:
        raise ArtifactError(f"the ONNX lacks {len(missing)} of the engine's weights (first: {missing[0]})", path=onnx,
                            hint="export the same component and precision the engine was built from")
    if not refitter.refit_cuda_engine():
        raise RuntimeError(f"TensorRT failed to refit {plan.name}")  # inside the library: traceback kept
    config = engine.create_serialization_config()
    config.clear_flag(trt.SerializationFlag.EXCLUDE_WEIGHTS)  # a stripped plan is written whole once refit
    config.set_flag(trt.SerializationFlag.INCLUDE_REFIT)
    serialized = engine.serialize_with_config(config)
    # IHostMemory has the buffer protocol (not in the stubs): written as it is, no copy into Python bytes
    write_buffer_atomic(dest, memoryview(serialized))  # type: ignore[arg-type]
    return dest.stat().st_size


def refit_bundle(bundle: Path, work: Path, engines_root: Path, adapters_sha: list[str],
                 runtime_for: Callable[[BundleManifest], str]) -> Path:
    """A new bundle: ``bundle``'s refittable engines with the weights of ``work``'s ONNX (exported with the
    adapters ``adapters_sha``; none: the base weights, which a weight-stripped bundle needs before it runs), in
    ``engines_root/<model>/<target>-<backend>/``. An engine built in parts is refit part by part from the same cut
    of that ONNX (``parts.write_parts``): TensorRT names the weights it folded by a running counter, which differs
    between a part graph and the whole one, so a part refit from the whole ONNX would miss weights.
    ``runtime_for`` (``runtime.runners.check_bundle_host``, given by the command) names the runtime module that runs
    the bundle here, or refuses in the runtime's own words."""
    base = BundleManifest.load(bundle)
    entries = {n: e for n, e in base.components.items() if e.refit}
    if not entries:
        raise InvalidInputError("this bundle has no refittable engine", path=bundle,
                                hint="build it with `sd35trt build --refittable` (or --strip-weights)")
    module = runtime_for(base)  # the runtime's own refusal where it refuses this GPU
    sources = {name: _refit_source(work, name, entry, adapters_sha) for name, entry in entries.items()}
    model = next(iter(sources.values())).model
    folder = engines_root / model_slug(model) / base.folder.name
    start = time.perf_counter()
    components = dict(base.components)
    with atomic_dir(folder) as tmp:
        for name, entry in base.components.items():
            if name not in sources:  # not refittable: the base engine as it is (it does not depend on the adapter)
                for plan in entry.plans:
                    shutil.copyfile(base.folder / plan.file, tmp / plan.file)
                continue
            graphs = _part_graphs(sources[name], entry, tmp / ".parts" / name)
            plans = []
            for plan, graph in zip(entry.plans, graphs):
                log.info(f"  refit {name}: {plan.file} from {graph}")
                size = refit_plan(base.folder / plan.file, graph, module, tmp / plan.file, sha256=plan.sha256,
                                  size=plan.bytes)
                plans.append(replace(plan, sha256=sha256_file(tmp / plan.file), bytes=size))
            shutil.rmtree(tmp / ".parts", ignore_errors=True)
            components[name] = refitted(entry, tuple(plans), sources[name].onnx_path)
        if (base.folder / "assets").is_dir():
            shutil.copytree(base.folder / "assets", tmp / "assets")
        manifest = replace(base, folder=folder, model=model, components=components,
                           extra={**base.extra, "refit_of": str(bundle), "refit_seconds": round(time.perf_counter() - start, 2)})
        write_json_atomic(tmp / BUNDLE_MANIFEST, manifest.to_dict())
    return folder


def refitted(entry: EngineEntry, plans: tuple[PlanFile, ...], onnx: Path) -> EngineEntry:
    """The manifest entry of an engine after refit: its new plans, whole (a refit plan carries its weights, so it is
    no longer stripped), and where the weights came from."""
    return replace(entry, plans=plans, refit={**(entry.refit or {}), "stripped": False, "refit_from": str(onnx),
                                              "plan_bytes": sum(p.bytes for p in plans)})


def _refit_source(work: Path, name: str, entry: EngineEntry, adapters_sha: list[str]) -> OnnxManifest:
    """The ONNX an engine is refit from: exported with exactly these adapters, with the engine's shape profile."""
    folder = WorkDir(work).onnx_folder(Precision(entry.precision), name)
    onnx = OnnxManifest.load(folder, name, Precision(entry.precision))
    onnx.verify()
    lora = [a["sha256"] for a in onnx.model.get("lora", [])]
    if lora != adapters_sha:
        raise InvalidInputError(f"{name} ONNX was exported with LoRA {lora or 'none'}, not the adapters given",
                                path=folder, hint="export with the same --lora first: sd35trt export --lora ...")
    if onnx.profile != entry.profile:
        raise InvalidInputError(f"{name} ONNX has other shape ranges than the engine", path=folder,
                                hint="export with the ranges the bundle was built with")
    return onnx


def _part_graphs(source: OnnxManifest, entry: EngineEntry, folder: Path) -> list[Path]:
    """One ONNX per plan of ``entry``: the whole graph, or the same parts the build cut (checked by their tensors)."""
    if not entry.parted:
        return [source.onnx_path]
    from sd35trt.producers.parts import write_parts

    cut = write_parts(source.onnx_path, len(entry.plans), source.profile, folder)
    for (path, part), plan in zip(cut, entry.plans):
        if tuple(part.inputs) != plan.inputs or tuple(part.outputs) != plan.outputs:
            raise ArtifactError(f"the {entry.name} ONNX cuts into other parts than the engine was built from "
                                f"({path.name}: inputs {list(part.inputs)} vs {list(plan.inputs or ())})", path=source.onnx_path,
                                hint="export the refit ONNX with the same sd35trt and shape ranges as the bundle")
    return [path for path, _ in cut]


def describe_refit(mode: str, plan_bytes: int) -> dict[str, Any] | None:
    """The manifest's ``refit`` record of an engine built in ``mode``."""
    if mode == "none":
        return None
    return {"mode": "refit", "stripped": mode == "stripped", "plan_bytes": plan_bytes,
            "note": "refit on the deploy host with `sd35trt refit BUNDLE --onnx W --lora ...`"
                    + ("; the plan ships without its refittable weights" if mode == "stripped" else "")}
