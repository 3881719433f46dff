"""Export SD3.5 components to ONNX with dynamic shapes, validated against PyTorch in onnxruntime.

One path serves every variant: the FP32 export, the FP16 fallback and the FP8 Q/DQ model (a ModelOpt-
quantised torch module). Each component is traced with ``torch.onnx.export(dynamo=False)`` straight to a
file in a temporary folder (no in-memory copy of the model: that is what made ModelOpt's helper need
60 GiB for SD3.5-Medium), weights past 2 GB are consolidated into one ``model.onnx.data``, the ONNX is run
in onnxruntime at a shape different from the traced one and compared output by output with the same torch
module, and only then is the folder renamed into place with its manifest.
"""

from __future__ import annotations

import platform
import warnings
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from sd35trt import __version__, log
from sd35trt.artifacts import atomic_dir, file_entries, recover_interrupted, hash_json, package_versions, read_json, write_json_atomic
from sd35trt.errors import ArtifactError, ExportValidationError, InvalidInputError, check_choice
from sd35trt.metrics import error_stats
from sd35trt.onnx_utils import PROVIDERS
from sd35trt.models import ModelSource
from sd35trt.specs import COMPONENTS, SPECS, ComponentSpec, PipeDims, Precision, ShapeRanges

if TYPE_CHECKING:
    import torch

MIN_OPSET, MAX_OPSET, DEFAULT_OPSET = 17, 21, 19
VARIANT_DIRS = {Precision.FP32: "onnx", Precision.FP16: "onnx-fp16", Precision.FP8: "onnx-fp8"}
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class ExportConfig:
    """What an export produces; validated before any model is built."""

    components: tuple[str, ...] = COMPONENTS
    opset: int = DEFAULT_OPSET
    ranges: ShapeRanges = field(default_factory=ShapeRanges)
    validate: bool = True
    provider: str = "auto"  # onnxruntime execution provider for validation; not part of the artifact

    def __post_init__(self):
        if not MIN_OPSET <= self.opset <= MAX_OPSET:
            raise InvalidInputError(f"--opset {self.opset} is not supported",
                                    hint=f"use an opset between {MIN_OPSET} and {MAX_OPSET} (default {DEFAULT_OPSET})")
        check_choice("--provider", self.provider, PROVIDERS)
        unknown = [c for c in self.components if c not in SPECS]
        if unknown:
            raise InvalidInputError(f"unknown component(s) {', '.join(unknown)}", hint=f"choose from {','.join(COMPONENTS)}")

    def to_dict(self) -> dict[str, Any]:
        return {"components": list(self.components), "opset": self.opset, "ranges": self.ranges.to_dict()}


@dataclass
class ComponentExport:
    component: str
    precision: str
    path: Path
    skipped: bool
    seconds: float
    manifest: dict[str, Any]


def variant_dir(out: Path, precision: Precision) -> Path:
    return out / VARIANT_DIRS[precision]


def trace_and_check_dims(spec: ComponentSpec, ranges: ShapeRanges, pipe_dims: PipeDims) -> tuple[dict, dict]:
    """Trace at the small end of every range; validate at a shape that differs in every dim that can vary.

    Validating at another shape is what proves the axes are really dynamic (a traced constant would pass
    at the trace shape and fail here).
    """
    def pick(rng, step, prefer_other_than):
        for value in (rng.min + step, rng.max, rng.opt):
            if rng.min <= value <= rng.max and value != prefer_other_than:
                return value
        return prefer_other_than

    trace = spec.concrete_dims(pipe_dims, batch=ranges.batch.min, height=ranges.height.min,
                               width=ranges.width.min, t5_tokens=ranges.t5_tokens.opt)
    batch = pick(ranges.batch, 1, ranges.batch.min)
    check = spec.concrete_dims(
        pipe_dims, batch=batch, height=pick(ranges.height, 64, ranges.height.min),
        width=pick(ranges.width, 128, ranges.width.min), t5_tokens=pick(ranges.t5_tokens, -64, ranges.t5_tokens.opt))
    return trace, check


class CastIO:
    """Wrap a module running in ``dtype`` so its ONNX keeps float32 inputs/outputs (like keep_io_types)."""

    def __new__(cls, module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
        import torch

        class CastedIO(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.inner = module

            def forward(self, *args):
                args = [a.to(dtype) if a.is_floating_point() else a for a in args]
                out = self.inner(*args)
                if isinstance(out, tuple):
                    return tuple(o.float() for o in out)
                return out.float()

        return CastedIO().eval()


def _to_device(tensors: dict[str, Any], device: Any) -> dict[str, Any]:
    return {k: v.to(device) for k, v in tensors.items()}


def export_component(
    module: torch.nn.Module,
    spec: ComponentSpec,
    pipe_dims: PipeDims,
    dest: Path,
    *,
    opset: int,
    ranges: ShapeRanges,
    precision: Precision,
    validate: bool = True,
    provider: str = "auto",
    postprocess: Callable[[Path], None] | None = None,
) -> dict[str, Any]:
    """Export ``module`` (already wrapped to the spec's signature) into ``dest``/model.onnx and validate it.

    Returns the per-component record for the manifest. Raises ExportValidationError with every failing
    output's numbers if onnxruntime disagrees with torch beyond the spec's tolerance.
    """
    import torch

    from sd35trt.onnx_utils import consolidate_external_data

    device = next(module.parameters()).device
    trace_dims, check_dims = trace_and_check_dims(spec, ranges, pipe_dims)
    inputs = _to_device(spec.dummy_inputs(pipe_dims, trace_dims, seed=1), device)
    onnx_path = dest / "model.onnx"
    start = time.perf_counter()
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        # TracerWarnings flag Python branches on shapes; validation at another shape is what proves them safe.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(
            module, tuple(inputs[n] for n in spec.input_names), str(onnx_path), dynamo=False,
            opset_version=opset, input_names=spec.input_names, output_names=spec.output_names,
            dynamic_axes=spec.dynamic_axes(), do_constant_folding=True,
        )
    consolidate_external_data(onnx_path)
    if postprocess is not None:
        postprocess(onnx_path)
    export_seconds = time.perf_counter() - start

    record: dict[str, Any] = {
        "component": spec.name,
        "precision": precision.value,
        "opset": opset,
        "inputs": [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape)} for t in spec.inputs],
        "outputs": [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape)} for t in spec.outputs],
        "dynamic_axes": spec.dynamic_axes(),
        "ranges": ranges.to_dict(),
        "profile": {k: [list(s) for s in v] for k, v in spec.profile(ranges, pipe_dims).items()},
        "trace_dims": trace_dims,
        "export_seconds": round(export_seconds, 3),
    }
    if validate:
        record["validation"] = validate_onnx(module, spec, pipe_dims, onnx_path, check_dims, precision, provider)
    return record


def validate_onnx(module: torch.nn.Module, spec: ComponentSpec, pipe_dims: PipeDims, onnx_path: Path,
                  dims: dict[str, int], precision: Precision, provider: str = "auto") -> dict[str, Any]:
    """Run torch and onnxruntime on the same inputs; check every output; raise with all failures at once.

    ``auto`` validates on onnxruntime's CUDA execution provider when onnxruntime-gpu and a GPU are present:
    at SD3.5 size an FP16 graph on the CPU provider costs ~3× its weight bytes of host memory."""
    import torch

    from sd35trt.onnx_utils import ort_session, run_ort, session_provider

    device = next(module.parameters()).device
    inputs = spec.dummy_inputs(pipe_dims, dims, seed=2)
    start = time.perf_counter()
    with torch.no_grad():
        expected = module(*[inputs[n].to(device) for n in spec.input_names])
    expected = expected if isinstance(expected, tuple) else (expected,)
    session = ort_session(onnx_path, provider=provider)
    used = session_provider(session)
    actual = run_ort(session, {k: v.numpy() for k, v in inputs.items()})
    del session
    tol = spec.tolerances[precision]
    results, failures = {}, []
    for name, ref in zip(spec.output_names, expected):
        stats = error_stats(ref.float().cpu().numpy(), actual[name])
        results[name] = stats.to_dict() | {"passed": stats.passes(tol)}
        if not stats.passes(tol):
            failures.append(f"{name}: {stats} (allowed rel-L2 {tol.rel_l2:g}, max-abs "
                            f"{tol.scaled_max_abs(stats.ref_absmax):.3g})")
    if failures:
        raise ExportValidationError(
            f"{spec.name} {precision.value} ONNX differs from PyTorch at dims {dims}: " + "; ".join(failures),
            path=onnx_path, hint="report this with the manifest; try another --opset")
    return {"dims": dims, "provider": used, "outputs": results, "tolerance": {"rel_l2": tol.rel_l2, "max_abs": tol.max_abs},
            "seconds": round(time.perf_counter() - start, 3)}


def export_inputs_hash(source: ModelSource, config: ExportConfig, component: str, precision: Precision,
                       extra: dict[str, Any] | None = None) -> str:
    return hash_json({
        "model": source.fingerprint(), "component": component, "precision": precision.value,
        "opset": config.opset, "ranges": config.ranges.to_dict(), "toolkit": __version__, **(extra or {}),
    })


def existing_if_current(folder: Path, inputs_hash: str) -> dict[str, Any] | None:
    """The manifest of a finished artifact whose inputs are unchanged, else None (re-run needed)."""
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        return None
    try:
        manifest = read_json(manifest_path, "export manifest")
    except ArtifactError:
        return None
    if manifest.get("inputs_hash") != inputs_hash:
        return None
    if any(not (folder / rel).is_file() or (folder / rel).stat().st_size != e["bytes"]
           for rel, e in manifest.get("files", {}).items()):
        return None
    return manifest


def export_variant(
    pipe: Any,
    source: ModelSource,
    out: Path,
    config: ExportConfig,
    precision: Precision,
    *,
    module_for: Callable[[ComponentSpec], torch.nn.Module] | None = None,
    extra_inputs: dict[str, Any] | None = None,
    postprocess: Callable[[Path], None] | None = None,
    force: bool = False,
) -> list[ComponentExport]:
    """Export ``config.components`` of ``pipe`` at ``precision`` under ``out``/<variant>/<component>/.

    ``module_for`` supplies the module to trace (calibration passes FP16 or fake-quantised ones); by default
    the pipeline's own network in the dtype it is loaded in. A component whose inputs hash is unchanged
    is skipped. Each component is swapped in atomically with its manifest; ``export.json`` summarises.
    """
    pipe_dims = PipeDims.from_pipeline(pipe) if pipe is not None else None  # None: every component is current
    root = variant_dir(out, precision)
    results = []
    for name in config.components:
        spec = SPECS[name]
        folder = root / name
        recover_interrupted(folder)  # a killed earlier run may have left a temp folder or a backup
        inputs_hash = export_inputs_hash(source, config, name, precision, extra_inputs)
        if not force and (manifest := existing_if_current(folder, inputs_hash)) is not None:
            log.info(f"  {name} {precision.value}: unchanged, skipped")
            results.append(ComponentExport(name, precision.value, folder / "model.onnx", True, 0.0, manifest))
            continue
        module = module_for(spec) if module_for else spec.module(pipe)
        with log.step(f"export {name} ({precision.value}, opset {config.opset})") as timing, atomic_dir(folder) as tmp, \
                spec.exporting(pipe, config.ranges, pipe_dims):
            record = export_component(module, spec, pipe_dims, tmp, opset=config.opset, ranges=config.ranges,
                                      precision=precision, validate=config.validate, provider=config.provider,
                                      postprocess=postprocess)
            manifest = {
                "kind": "onnx", "toolkit": __version__, "inputs_hash": inputs_hash,
                "model": source.describe(), **record, **(extra_inputs or {}),
                "files": file_entries(tmp), "versions": package_versions("torch", "diffusers", "transformers", "onnx",
                                                                       "onnxruntime", "nvidia-modelopt"),
                "host": platform.node(), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
            write_json_atomic(tmp / MANIFEST, manifest)
        results.append(ComponentExport(name, precision.value, folder / "model.onnx", False, timing["seconds"], manifest))
    if all(r.skipped for r in results) and (root / "export.json").is_file():
        return results  # nothing changed: leave every byte as it was
    write_json_atomic(root / "export.json", {
        "kind": "onnx-export", "toolkit": __version__, "precision": precision.value, "model": source.describe(),
        "config": config.to_dict(),
        "components": {r.component: {"skipped": r.skipped, "seconds": round(r.seconds, 3),
                                     "inputs_hash": r.manifest["inputs_hash"], "files": r.manifest["files"],
                                     "validation": r.manifest.get("validation")} for r in results},
    })
    return results


def export_model(source: ModelSource, out: Path, config: ExportConfig, *, device: str = "auto",
                 force: bool = False, precision: Precision = Precision.FP32) -> list[ComponentExport]:
    """``sd35trt export``: build the pipeline with just the needed networks and export them.

    FP32 by default; ``precision=FP16`` builds the networks directly in FP16 (no FP32 copy ever exists,
    which is what keeps real-size exports lean) and writes the ``onnx-fp16`` variant with FP32 I/O.
    """
    from sd35trt.runtime_env import DEVICES

    check_choice("--device", device, DEVICES)
    if precision not in (Precision.FP32, Precision.FP16):
        raise InvalidInputError(f"export --precision {precision.value} is not supported",
                                hint="FP8 ONNX comes from `sd35trt calibrate`")
    if not force and all(existing_if_current(variant_dir(out, precision) / c,
                                             export_inputs_hash(source, config, c, precision)) is not None
                         for c in config.components):
        # Nothing to do: answer from the manifests without building any model.
        return export_variant(None, source, out, config, precision)

    import torch

    from sd35trt.models import build_pipeline
    from sd35trt.runtime_env import pick_device

    dtype = torch.float16 if precision is Precision.FP16 else torch.float32
    attrs = {SPECS[c].pipeline_attr for c in config.components}
    torch_device = pick_device(device)
    with log.step(f"build {source.id} pipeline ({', '.join(config.components)}) on {torch_device}"):
        pipe = build_pipeline(source, device=torch_device, dtype=dtype, components=attrs)
    module_for = (lambda spec: CastIO(spec.module(pipe), torch.float16)) if precision is Precision.FP16 else None
    return export_variant(pipe, source, out, config, precision, force=force, module_for=module_for)
