"""Export SD3.5 components to ONNX with dynamic shapes, validated against PyTorch in onnxruntime.

``export`` is the one producer of every ONNX variant of a work dir:

* ``onnx/`` FP32 (only when asked: engines never use it);
* ``onnx-fp16/`` every component in FP16 with its FP32 islands (from ``calibrate``'s census, or the recipe's
  known sites when there is no calibration), or whole FP32 where calibrate found islands not enough;
* ``onnx-fp8/`` the calibrated components: ModelOpt's quantizers restored from ``W/calibration/`` into an
  FP16 network, exported as standard Q/DQ with FP8 weights (``fp8_onnx``);
* ``onnx-int4/``, ``onnx-nvfp4/``, ``onnx-mixed/`` a 4-bit or mixed transformer: its quantized Linear layers swapped
  for the 4-bit layers calibrate chose, written as standard 4-bit ``DequantizeLinear`` (``weight_quant``).

Each component is traced with ``torch.onnx.export(dynamo=False)`` straight to a file in a temporary folder
(no in-memory copy of the model: ModelOpt's helper needed 60 GiB for SD3.5-Medium), weights past 2 GB are
consolidated into one ``model.onnx.data``, and the ONNX is validated in onnxruntime at a shape different
from the traced one (FP16 against the FP32 network, TF32 off; FP8 against the fake-quant network) and, when
calibrate recorded it, on held-out pipeline traffic against the FP32 reference outputs (``producers.validation``).
Only then is the folder renamed into place with its manifest.
"""

from __future__ import annotations

import platform
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sd35trt import __version__
from sd35trt.core import log
from sd35trt.core.artifacts import (
    atomic_dir,
    check_disk,
    exclusive,
    file_entries,
    hash_json,
    package_versions,
    recover_interrupted,
    write_json_atomic,
)
from sd35trt.core.errors import ExportValidationError, InvalidInputError, check_choice
from sd35trt.core.manifests import MANIFEST, OnnxManifest, WorkDir, load_current, require_model
from sd35trt.core.models import ModelSource
from sd35trt.core.numerics import Island, fp32_islands, plan_islands
from sd35trt.core.onnx_utils import PROVIDERS
from sd35trt.core.probes import EXPORT_TRACE_SEED, export_dims
from sd35trt.core.shapes import ShapeRanges
from sd35trt.core.specs import ARTIFACT_PRECISIONS, COMPONENTS, SPECS, ComponentSpec, PipeDims, Precision
from sd35trt.core.targets import TargetInfo, exported_variants
from sd35trt.core.wrappers import CastIO
from sd35trt.producers.calibration_state import CalibrationManifest, load_calibration
from sd35trt.producers.islands import island_weights_for, probe_islands
from sd35trt.producers.recipe import DEFAULT_RECIPE, Recipe
from sd35trt.producers.validation import Traffic, load_traffic, validate_onnx

if TYPE_CHECKING:
    import torch

MIN_OPSET, MAX_OPSET, DEFAULT_OPSET = 17, 21, 19


@dataclass(frozen=True)
class ExportConfig:
    """What an export produces; validated before any model is built."""

    components: tuple[str, ...] = COMPONENTS
    opset: int = DEFAULT_OPSET
    ranges: ShapeRanges = field(default_factory=ShapeRanges)
    validate: bool = True
    provider: str = "auto"  # onnxruntime execution provider for validation; not part of the artifact
    target: TargetInfo | None = None  # --gpu: only the variants that target's engines use; None: every variant
    int8: tuple[str, ...] = ()  # --int8: components also exported with INT8 weights (weight-only, no calibration)
    recipe_file: Path = DEFAULT_RECIPE  # --config: INT8's layers (and, uncalibrated, the islands) come from it

    def __post_init__(self):
        if not MIN_OPSET <= self.opset <= MAX_OPSET:
            raise InvalidInputError(f"--opset {self.opset} is not supported",
                                    hint=f"use an opset between {MIN_OPSET} and {MAX_OPSET} (default {DEFAULT_OPSET})")
        check_choice("--provider", self.provider, PROVIDERS)
        unknown = [c for c in self.components if c not in SPECS]
        if unknown:
            raise InvalidInputError(f"unknown component(s) {', '.join(unknown)}", hint=f"choose from {','.join(COMPONENTS)}")
        convolutional = [c for c in self.int8 if not SPECS[c].calibratable]
        if convolutional:
            raise InvalidInputError(f"--int8 {','.join(convolutional)}: INT8 weights are for GEMM networks",
                                    hint=f"choose from {','.join(c for c in COMPONENTS if SPECS[c].calibratable)}")

    def to_dict(self) -> dict[str, Any]:
        return {"components": list(self.components), "opset": self.opset, "ranges": self.ranges.to_dict(),
                **({"int8": list(self.int8)} if self.int8 else {})}


@dataclass
class ComponentExport:
    component: str
    precision: str
    path: Path
    skipped: bool
    seconds: float
    manifest: dict[str, Any]


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
    traffic: Traffic | None = None,
) -> dict[str, Any]:
    """Export ``module`` (already wrapped to the spec's signature) into ``dest``/model.onnx and validate it
    against the same module at another shape, and on ``traffic`` when given.

    Returns the per-component record for the manifest. Raises ExportValidationError with every failing
    output's numbers if onnxruntime disagrees with torch beyond the spec's tolerance.
    """
    import torch

    from sd35trt.core.onnx_utils import consolidate_external_data

    device = next(module.parameters()).device
    trace_dims, check_dims = export_dims(spec, ranges, pipe_dims)
    inputs = _to_device(spec.dummy_inputs(pipe_dims, trace_dims, seed=EXPORT_TRACE_SEED), device)
    onnx_path = dest / "model.onnx"
    start = time.perf_counter()
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings(), log.working("tracing to ONNX"):
        # TracerWarnings flag Python branches on shapes; validation at another shape is what proves them safe.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, tuple(inputs[n] for n in spec.input_names), str(onnx_path), dynamo=False,
            opset_version=opset, input_names=spec.input_names, output_names=spec.output_names,
            dynamic_axes=spec.dynamic_axes(), do_constant_folding=True,
        )
    del inputs
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
        record["validation"], record["traffic_check"] = validate_onnx(
            module, spec, pipe_dims, onnx_path, check_dims, precision, provider, traffic)
    return record


def export_inputs_hash(source: ModelSource, config: ExportConfig, component: str, precision: Precision,
                       extra: dict[str, Any] | None = None) -> str:
    return hash_json({
        "model": source.fingerprint(), "component": component, "precision": precision.value,
        "opset": config.opset, "ranges": config.ranges.to_dict(), "toolkit": __version__, **(extra or {}),
    })


# --- what each variant is built from -----------------------------------------------------------------


@dataclass(frozen=True)
class VariantPlan:
    """One ONNX variant of one component: its precision, weights dtype, islands and what its hash covers."""

    component: str
    precision: Precision
    weights: Precision  # FP32 or FP16 (quantized variants: an FP16 network, quantized weight initializers)
    islands: tuple[Island, ...]
    reason: str
    extra: dict[str, Any]
    islands_from_recipe: bool = False  # no calibration: the recipe's upcast patterns, matched against the model


def plan_variants(requested: str, components: tuple[str, ...], calibration: CalibrationManifest | None,
                  recipe_islands: dict[str, list[Island]], target: TargetInfo | None = None,
                  int8: tuple[str, ...] = (), int8_recipe: dict[str, str] | None = None) -> list[VariantPlan]:
    """Which variants ``--precision`` asks for, with the islands and weights each is built with.

    ``auto`` (what engines use): FP16 for every component and FP8 for the calibrated ones (``fp8`` alone:
    the calibrated ones, an error when none of ``components`` is calibrated), and INT8 for those ``int8`` names;
    ``target`` keeps what that GPU's engines use (``targets.exported_variants``). FP16 takes the calibration's
    islands and its FP16/FP32 decision; without a calibration, the recipe's known sites; INT8 the same islands
    (its weights FP16 around them, the recipe's quantized Linear layers in INT8; ``int8_recipe`` per component: the
    digest of what INT8 reads of the recipe, part of its inputs hash)."""
    calibrated = set(calibration.components) if calibration else set()
    quant = calibration.format if calibration else Precision.FP8
    names = [v.strip() for v in requested.split(",") if v.strip()]
    if "int8" in names and not int8:
        raise InvalidInputError("--precision int8 without --int8", hint="name the components, e.g. --int8 clip_l,clip_g")
    pairs = exported_variants(requested, components, calibrated, target, quant, int8)
    asked = [n for n in names if n in ("fp8", "int4", "nvfp4", "mixed")]
    if asked and "auto" not in names and components and (not calibrated & set(components) or asked != [quant.value]):
        raise InvalidInputError(f"no {'/'.join(asked)} calibration for {', '.join(components)} in this work dir"
                                + (f" (it is calibrated to {quant.value})" if calibrated else ""),
                                hint=f"run `sd35trt calibrate --format {asked[0]} --components "
                                     f"{','.join(c for c in components if SPECS[c].calibratable) or 'transformer'}` "
                                     "with this --out first")
    plans = []
    for c, precision in pairs:
        if precision is Precision.FP32:
            plans.append(VariantPlan(c, Precision.FP32, Precision.FP32, (), "asked for", {}))
        elif precision in (Precision.FP16, Precision.INT8):
            if calibration is not None:
                islands, decision = tuple(calibration.islands.get(c, [])), calibration.fp16.get(c)
                weights, reason = (decision.precision, decision.reason) if decision else (Precision.FP16, "not checked")
                source = f"calibration {calibration.inputs_hash[:12]}"
            else:
                islands, weights, source = tuple(recipe_islands.get(c, [])), Precision.FP16, "recipe (no calibration)"
                reason = "no calibration: FP16 with the recipe's known FP32 islands only (run calibrate for the census)"
            if precision is Precision.INT8:  # the census may ask for FP32 weights; INT8 keeps its islands instead
                weights, reason = Precision.FP16, f"--int8: INT8 weights outside the FP32 islands (FP16: {reason})"
            if weights is Precision.FP32:
                islands = ()
            int8_extra = {"recipe_int8": (int8_recipe or {}).get(c, "")} if precision is Precision.INT8 else {}
            plans.append(VariantPlan(c, precision, weights, islands, reason, {
                "fp32_islands": [i.to_dict() for i in islands],
                "weights_precision": "int8" if precision is Precision.INT8 else weights.value,
                "islands_from": source, **int8_extra}, islands_from_recipe=calibration is None))
        else:
            assert calibration is not None
            islands = tuple(calibration.islands.get(c, []))
            plans.append(VariantPlan(c, precision, Precision.FP16, islands, "calibrated", {
                "calibration_hash": calibration.inputs_hash, "fp32_islands": [i.to_dict() for i in islands]}))
    return plans


def _param_bytes(network: Any, weights: Precision) -> int:
    return sum(p.numel() for p in network.parameters()) * (4 if weights is Precision.FP32 else 2)


# --- the step ----------------------------------------------------------------------------------------


def export_model(source: ModelSource, out: Path, config: ExportConfig, *, device: str = "auto",
                 force: bool = False, precision: str = "auto") -> list[ComponentExport]:
    """``sd35trt export``: the ONNX variants ``precision`` names (see ``plan_variants``), one pipeline per
    variant with just the needed networks, built directly in the variant's dtype (lean at real size)."""
    from sd35trt.core.host import DEVICES

    check_choice("--device", device, DEVICES)
    work = WorkDir(out)
    with exclusive(work.root / "onnx", "export"):  # concurrent `make engines` on one work dir take turns
        return _export_locked(source, work, config, device, force, precision)


def _export_locked(source: ModelSource, work: WorkDir, config: ExportConfig, device: str, force: bool,
                   precision: str) -> list[ComponentExport]:
    calibration = load_calibration(work)
    if calibration is not None:
        require_model(calibration.model, source.fingerprint(), source.id, work.calibration)
    recipe = _recipe(config, calibration)
    recipe_islands = {c: [Island(p, 0.0, f"recipe: upcast '{p}' (known FP16 overflow site)") for p in recipe.upcast[c]]
                      for c in recipe.upcast}
    plans = plan_variants(precision, config.components, calibration, recipe_islands, config.target,
                          tuple(c for c in config.int8 if c in config.components),
                          {c: recipe.int8_digest(c) for c in config.int8})
    write_assets(source, work)
    hashes = {(p.component, p.precision): export_inputs_hash(source, config, p.component, p.precision, p.extra)
              for p in plans}
    current = {key: None if force else load_current(work.onnx_folder(key[1], key[0]), h, "export manifest")
               for key, h in hashes.items()}
    todo = [p for p in plans if current[(p.component, p.precision)] is None]
    traffic = load_traffic(work, calibration) if todo and config.validate else {}
    results: list[ComponentExport] = []
    fp8_attrs = {SPECS[c].pipeline_attr for c in calibration.components} if calibration else set()
    for variant in ARTIFACT_PRECISIONS:
        group = [p for p in plans if p.precision is variant]
        if group:
            results += _export_group(source, work, config, group, hashes, current, traffic, device, fp8_attrs, recipe,
                                     calibration.margin if calibration is not None else recipe.margin,
                                     calibration.extra.get("probe_ranges") if calibration is not None else None)
    return results


def _recipe(config: ExportConfig, calibration: CalibrationManifest | None) -> Recipe:
    """The recipe export reads (``--config``, default the shipped one): INT8 takes its layers from it. Where calibrate
    recorded the recipe it used, one that differs from it is one line naming that one, with ``--int8`` or an explicit
    ``--config`` (without either, nothing of it is read: the calibration decided the rest)."""
    recipe = Recipe.load(config.recipe_file)
    if calibration is not None and (config.int8 or config.recipe_file != DEFAULT_RECIPE) and \
            calibration.extra.get("recipe_digest") not in (None, recipe.calibration_digest):
        raise InvalidInputError(f"this work dir was calibrated with another recipe ({calibration.extra.get('recipe')})",
                                path=recipe.path, hint="pass that one with --config (INT8 takes its layers from the "
                                                       "recipe), or re-run calibrate with this one")
    return recipe


def write_assets(source: ModelSource, work: WorkDir) -> Path:
    """``W/assets/``: the tokenizers and scheduler/VAE configs the denoising loop needs (``PipelineAssets``), read
    without any weights; ``build`` ships them in every bundle, so a deploy host needs no model directory."""
    from sd35trt.core.assets import load_assets

    folder = work.root / "assets"
    inputs = hash_json({"model": source.fingerprint(), "toolkit": __version__, "turbo": source.turbo})
    recover_interrupted(folder)
    if load_current(folder, inputs, "assets manifest") is not None:
        return folder
    with atomic_dir(folder) as tmp:
        load_assets(source).save(tmp)
        write_json_atomic(tmp / MANIFEST, {"kind": "pipeline-assets", "toolkit": __version__, "inputs_hash": inputs,
                                           "model": source.describe(), "files": file_entries(tmp)})
    return folder


def _resolve_islands(plan: VariantPlan, network: Any) -> list[Island]:
    """Calibration islands are module names already (each must exist in the network: one line naming the one
    that does not); the recipe's (no calibration) are patterns, applied when the model has them (SD3.5-Large's
    block 35)."""
    names = [n for n, _ in network.named_modules()]
    if plan.islands_from_recipe:
        return plan_islands({}, names, margin=float("inf"), upcast=tuple(i.module for i in plan.islands))
    missing = [i.module for i in plan.islands if i.module not in set(names)]
    if missing:
        raise ExportValidationError(f"the calibration names FP32 island {missing[0]}, which this {plan.component} "
                                    "does not have", hint="the calibration state was edited or comes from another "
                                    "model layout; remove its calibration/ folder and calibrate this model")
    return list(plan.islands)


def _export_group(source: ModelSource, work: WorkDir, config: ExportConfig, group: list[VariantPlan],
                  hashes: dict, current: dict, traffic: dict[str, Traffic], device: str,
                  fp8_attrs: set[str], recipe: Recipe, margin: float,
                  probed_ranges: dict[str, Any] | None) -> list[ComponentExport]:
    """Export one precision's components; builds the pipeline only if something is to do."""
    precision = group[0].precision
    todo = [p for p in group if current[(p.component, p.precision)] is None]
    pipes = _group_pipelines(source, work, todo, precision, device, fp8_attrs) if todo else {}
    results = []
    for plan in group:
        name = plan.component
        folder = work.onnx_folder(precision, name)
        recover_interrupted(folder)  # a killed earlier run may have left a temp folder or a backup
        key = (name, precision)
        if current[key] is not None:
            log.info(f"  {name} {precision.value}: unchanged, skipped")
            results.append(ComponentExport(name, precision.value, folder / "model.onnx", True, 0.0, current[key]))
            continue
        pipe = pipes[plan.weights if not precision.quantized else Precision.FP16]
        results.append(_export_one(source, config, plan, pipe, folder, hashes[key], traffic, recipe, margin,
                                   probed_ranges))
    _write_group_summary(work.variant(precision), source, config, precision, results)
    return results


def _group_pipelines(source: ModelSource, work: WorkDir, todo: list[VariantPlan], precision: Precision, device: str,
                     fp8_attrs: set[str]) -> dict[Precision, Any]:
    """The pipelines one precision's exports read, by weights dtype (FP32, FP16), with only the networks to export;
    a quantized precision's networks restored from the calibration state (FP8 quantizers, or 4-bit layers)."""
    import torch

    from sd35trt.core.host import pick_device, strict_fp32
    from sd35trt.core.models import build_pipeline

    strict_fp32()
    torch_device = pick_device(device)
    by_weights: dict[Precision, set[str]] = {}
    for plan in todo:
        by_weights.setdefault(plan.weights, set()).add(SPECS[plan.component].pipeline_attr)
    if precision.quantized:  # the calibration state covers every calibrated network at once
        by_weights = {Precision.FP16: fp8_attrs}
    pipes: dict[Precision, Any] = {}
    for weights, attrs in by_weights.items():
        dtype = torch.float32 if weights is Precision.FP32 else torch.float16
        with log.step(f"build {source.id} pipeline ({', '.join(sorted(attrs))}) on {torch_device}, {weights}"):
            pipes[weights] = build_pipeline(source, device=torch_device, dtype=dtype, components=attrs)
    if precision in (Precision.FP8, Precision.MIXED):
        from sd35trt.producers.quantize import restore_quantized

        networks = restore_quantized(pipes[Precision.FP16], work.calibration / "quant_state.pt")
        networks.half()  # amax buffers in FP16, as the Q/DQ scales are exported
    if precision in (Precision.INT4, Precision.NVFP4, Precision.MIXED):
        # 4-bit: each quantized Linear swapped for the layer its ONNX will hold (mixed: the layers the size budget
        # chose, their FP8 quantizers leaving with them)
        from sd35trt.producers.quantize import restore_4bit

        restore_4bit(pipes[Precision.FP16], work.calibration,
                     Precision.INT4 if precision is Precision.MIXED else precision)
    return pipes


def _export_one(source: ModelSource, config: ExportConfig, plan: VariantPlan, pipe: Any, folder: Path,
                inputs_hash: str, traffic: dict[str, Traffic], recipe: Recipe, margin: float,
                probed_ranges: dict[str, Any] | None) -> ComponentExport:
    """One component's ONNX in one precision, into ``folder`` atomically: its FP32 islands (probed on the inputs
    its engine accepts where calibrate did not), the export, its validation and its manifest."""
    name, spec, precision = plan.component, SPECS[plan.component], plan.precision
    network = getattr(pipe, spec.pipeline_attr)
    check_disk(folder.parent, int(_param_bytes(network, plan.weights) * 1.1) + (64 << 20), f"{name} {precision.value} ONNX")
    module, reference = _module_and_reference(spec, pipe, plan)
    islands = _resolve_islands(plan, network)
    low = next(network.parameters()).dtype
    pipe_dims = PipeDims.from_pipeline(pipe)
    probed: list[str] | str = []
    weights: dict[str, Any] = {}
    weights_from = "no islands"
    if precision is not Precision.FP32 and plan.weights is not Precision.FP32:
        weights, weights_from = island_weights_for(source, spec, islands, weights, str(network.device))
        if probed_ranges == config.ranges.to_dict():
            probed = "calibrate's census probed these ranges (calibration/census.json)"
        else:  # other ranges than calibrate probed, or no calibration: probe them in this precision now
            text = traffic[name].calls[0] if name == "transformer" and name in traffic and traffic[name].calls else None
            with log.step(f"{name} {precision.value}: FP32 islands on the inputs its engine accepts"), \
                    spec.exporting(pipe, config.ranges, pipe_dims):
                islands, probed = probe_islands(network, module, spec, pipe_dims, config.ranges, islands, margin,
                                                low, text, weights)
            weights, more = island_weights_for(source, spec, islands, weights, str(network.device))
            weights_from = more or weights_from
    # INT8 swapped in last: the islands probed above keep their weights out of it
    layers = _swap_int8(network, name, islands, recipe) if precision is Precision.INT8 else None
    label = f"export {name} ({precision.value}" + (f", {len(islands)} FP32 island(s)" if islands else "") + \
        (", FP32 weights" if plan.weights is Precision.FP32 and precision is Precision.FP16 else "") + \
        f", opset {opset_for(precision, config.opset)})"
    with log.step(label) as timing, atomic_dir(folder) as tmp:
        # FP32/FP8 validate inside the islands (their reference is the traced network itself); FP16
        # validates after, against the FP32 network (the same weights upcast in place).
        with spec.exporting(pipe, config.ranges, pipe_dims), fp32_islands(network, islands, low, weights):
            record = export_component(
                module, spec, pipe_dims, tmp, opset=opset_for(precision, config.opset), ranges=config.ranges,
                precision=precision, validate=config.validate and reference is None, provider=config.provider,
                postprocess=POSTPROCESS.get(precision), traffic=traffic.get(name))
        if config.validate and reference is not None:
            _, check_dims = export_dims(spec, config.ranges, pipe_dims)
            record["validation"], record["traffic_check"] = validate_onnx(
                reference(), spec, pipe_dims, tmp / "model.onnx", check_dims, precision, config.provider,
                traffic.get(name))
        described = OnnxManifest(
            folder=folder, component=name, precision=precision, model=source.describe(), inputs_hash=inputs_hash,
            files=file_entries(tmp), profile=record["profile"], ranges=record["ranges"], inputs=record["inputs"],
            outputs=record["outputs"], weights_precision=plan.extra.get("weights_precision", plan.weights.value),
            fp32_islands=[i.to_dict() for i in islands], calibration_hash=plan.extra.get("calibration_hash"),
            data={"kind": "onnx", "toolkit": __version__, **record, **plan.extra, "precision_reason": plan.reason,
                  "island_probes": probed, "island_weights": weights_from, **({"layers": layers} if layers else {}),
                  "versions": package_versions("torch", "diffusers", "transformers", "onnx", "onnxruntime",
                                               "nvidia-modelopt"),
                  "host": platform.node(), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        manifest = described.to_dict()
        write_json_atomic(tmp / MANIFEST, manifest)
    if reference is not None:  # the FP16 network was upcast in place to validate; it is not used again
        setattr(pipe, spec.pipeline_attr, None)
    return ComponentExport(name, precision.value, folder / "model.onnx", False, timing["seconds"], manifest)


def _write_group_summary(root: Path, source: ModelSource, config: ExportConfig, precision: Precision,
                         results: list[ComponentExport]) -> None:
    """``onnx*/export.json``: what one precision's export did per component; untouched when nothing changed."""
    if all(r.skipped for r in results) and (root / "export.json").is_file():
        return  # nothing changed: leave every byte as it was
    write_json_atomic(root / "export.json", {
        "kind": "onnx-export", "toolkit": __version__, "precision": precision.value, "model": source.describe(),
        "config": config.to_dict(),
        "components": {r.component: {"skipped": r.skipped, "seconds": round(r.seconds, 3),
                                     "inputs_hash": r.manifest["inputs_hash"], "files": r.manifest["files"],
                                     "validation": r.manifest.get("validation"),
                                     "traffic_check": r.manifest.get("traffic_check")} for r in results},
    })


def _module_and_reference(spec: ComponentSpec, pipe: Any, plan: VariantPlan) -> tuple[Any, Any]:
    """The module to trace, and (FP16 only) a function giving the FP32 network to validate against: the
    same weights upcast in place after the trace, so no second copy of the model is ever held."""
    import torch

    network_module = spec.module(pipe)
    if plan.precision is Precision.FP32 or plan.weights is Precision.FP32:
        return network_module, None
    module = CastIO(network_module, torch.float16)
    if plan.precision.low_bit:
        return module, None  # validated against the fake-quant network itself

    def reference():
        getattr(pipe, spec.pipeline_attr).float()
        return spec.wrapper(getattr(pipe, spec.pipeline_attr)).eval()

    return module, reference


def _rewrite_and_count(model_path: Path) -> None:
    from sd35trt.producers.fp8_onnx import rewrite_fp8_qdq

    counts = rewrite_fp8_qdq(model_path)
    write_json_atomic(model_path.parent / "fp8_rewrite.json", counts)


def _rewrite_4bit(model_path: Path) -> None:
    from sd35trt.producers.weight_quant import rewrite_4bit

    counts = rewrite_4bit(model_path)
    write_json_atomic(model_path.parent / "4bit_rewrite.json", counts)


def _rewrite_mixed(model_path: Path) -> None:
    _rewrite_and_count(model_path)
    _rewrite_4bit(model_path)


def _count_int8(model_path: Path) -> None:
    from sd35trt.producers.weight_quant import count_int8_weights

    write_json_atomic(model_path.parent / "int8_weights.json", count_int8_weights(model_path))


def _swap_int8(network: Any, component: str, islands: list[Island], recipe: Recipe) -> dict[str, str]:
    """``--int8``: the recipe's quantized Linear layers of ``network`` outside ``islands`` swapped for their INT8
    weight-only ``QuantizedLinear`` (the fake-quant network the ONNX is traced from and validated against). Returns
    what each Linear got and why, for the manifest."""
    from sd35trt.producers.quantize import int8_layers
    from sd35trt.producers.weight_quant import swap_in

    recipe.check_patterns(component, [name for name, _ in network.named_modules()])  # a typo must not quantize
    table = int8_layers(network, component, recipe, islands)
    chosen = [layer for layer, got in table.items() if got.startswith("int8")]
    swap_in(network, dict.fromkeys(chosen), "int8")
    log.info(f"  {component}: {len(chosen)} of {len(table)} Linear layers with INT8 weights")
    return table


POSTPROCESS = {Precision.FP8: _rewrite_and_count, Precision.INT4: _rewrite_4bit, Precision.NVFP4: _rewrite_4bit,
               Precision.MIXED: _rewrite_mixed, Precision.INT8: _count_int8}


def opset_for(precision: Precision, opset: int) -> int:
    """4-bit weights need block-wise DequantizeLinear (opset 21; NVFP4's rewrite raises it to 23 afterwards); INT8's
    FP16 scales need opset 19."""
    if precision in (Precision.INT4, Precision.NVFP4, Precision.MIXED):
        return max(opset, 21)
    return max(opset, 19) if precision is Precision.INT8 else opset
