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

import importlib
import mmap
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sd35trt.core import log
from sd35trt.core.artifacts import atomic_dir, sha256_file, write_bytes_atomic, write_json_atomic
from sd35trt.core.errors import ArtifactError, InvalidInputError, RuntimeUnavailableError
from sd35trt.core.manifests import BUNDLE_MANIFEST, BundleManifest, OnnxManifest, WorkDir
from sd35trt.core.models import model_slug
from sd35trt.core.specs import Precision
from sd35trt.core.typecheck import CHECK_RTX

REFIT_MODES = ("none", "refit", "stripped")


def refit_plan(plan: Path, onnx: Path, module_name: str, dest: Path) -> int:
    """Refit one engine from ``onnx`` and write it whole to ``dest``; returns its size."""
    if TYPE_CHECKING:
        if CHECK_RTX:
            import tensorrt_rtx_bindings as trt
        else:
            import tensorrt_bindings as trt
    else:
        trt = importlib.import_module(module_name)
    logger = trt.Logger(trt.Logger.WARNING)
    runtime = trt.Runtime(logger)
    with open(plan, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        engine: trt.ICudaEngine | None = runtime.deserialize_cuda_engine(mapped)
    if engine is None:
        raise ArtifactError("the runtime cannot load this engine to refit it", path=plan,
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
    write_bytes_atomic(dest, bytes(memoryview(serialized)))  # type: ignore[arg-type]
    return dest.stat().st_size


def refit_bundle(bundle: Path, work: Path, engines_root: Path, adapters_sha: list[str]) -> Path:
    """A new bundle: ``bundle``'s refittable engines with the weights of ``work``'s ONNX (exported with the
    adapters ``adapters_sha``), in ``engines_root/<model with its LoRA>/<target>-<backend>/``."""
    from sd35trt.core.host import host_report
    from sd35trt.core.portability import RuntimeRecord, bundle_fit, runtime_module

    base = BundleManifest.load(bundle)
    base.verify()
    entries = {n: e for n, e in base.components.items() if e.refit}
    if not entries:
        raise InvalidInputError("this bundle has no refittable engine", path=bundle,
                                hint="build it with `sd35trt build --refittable` (or --strip-weights)")
    host = host_report()
    ok, why = bundle_fit(base, host)
    if not ok:
        raise RuntimeUnavailableError(f"this bundle cannot be refit on this host: {why}", path=bundle,
                                      hint="refit on a GPU the bundle was built for, with its runtime installed")
    module = runtime_module(RuntimeRecord.of_bundle(base.data), host["runtimes"])
    assert module is not None
    sources = {}
    for name, entry in entries.items():
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
        sources[name] = onnx
    model = next(iter(sources.values())).model
    folder = engines_root / model_slug(model) / base.folder.name
    start = time.perf_counter()
    components = dict(base.components)
    with atomic_dir(folder) as tmp:
        for name, entry in base.components.items():
            plans = []
            for plan in entry.plans:
                if name in sources:
                    log.info(f"  refit {name}: {plan.file} from {sources[name].onnx_path}")
                    size = refit_plan(base.folder / plan.file, sources[name].onnx_path, module, tmp / plan.file)
                    plans.append(replace(plan, sha256=sha256_file(tmp / plan.file), bytes=size))
                else:  # not refittable: the base engine as it is (it does not depend on the adapter)
                    (tmp / plan.file).write_bytes((base.folder / plan.file).read_bytes())
                    plans.append(plan)
            components[name] = replace(entry, plans=tuple(plans),
                                       refit={**(entry.refit or {}), "refit_from": str(sources[name].onnx_path)}
                                       if name in sources else entry.refit)
        if (base.folder / "assets").is_dir():
            import shutil

            shutil.copytree(base.folder / "assets", tmp / "assets")
        manifest = replace(base, folder=folder, model=model, components=components,
                           extra={**base.extra, "refit_of": str(bundle), "refit_seconds": round(time.perf_counter() - start, 2)})
        write_json_atomic(tmp / BUNDLE_MANIFEST, manifest.to_dict())
    return folder


def describe_refit(mode: str, plan_bytes: int) -> dict[str, Any] | None:
    """The manifest's ``refit`` record of an engine built in ``mode``."""
    if mode == "none":
        return None
    return {"mode": "refit", "stripped": mode == "stripped", "plan_bytes": plan_bytes,
            "note": "refit on the deploy host with `sd35trt refit BUNDLE --onnx W --lora ...`"
                    + ("; the plan ships without its refittable weights" if mode == "stripped" else "")}
