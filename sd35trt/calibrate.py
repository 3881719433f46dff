"""FP8 (E4M3, per-tensor) post-training calibration with ModelOpt on the shipped prompt set.

``calibrate_model`` runs diffusers' own ``StableDiffusion3Pipeline`` denoising loop on the prompts with
ModelOpt quantizers in calibration mode (one pass calibrates every requested component), then writes:

* ``OUT/onnx-fp8/<component>/``: FP8 Q/DQ ONNX (FP8 weight initializers, standard-domain Q/DQ) per
  quantized component;
* ``OUT/onnx-fp16/<component>/``: the FP16 fallback for every component, or FP32 where FP16 overflows
  (NaN/Inf on real traffic, e.g. T5), recorded in the manifest;
* ``OUT/calibration/``: the calibrated scales (``scales.json``, ``amax.pt``), ``calibration.json`` (the
  report) and ``manifest.json`` with the hash of everything calibration depends on.

Deterministic: prompts, seeds and the recipe fully decide the scales (the test suite checks byte
equality). Unchanged inputs skip the whole step without building a model.
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import math
import platform
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sd35trt import __version__, log
from sd35trt.artifacts import (atomic_dir, file_entries, hash_json, package_versions, read_json, recover_interrupted,
                               sha256_file, write_json_atomic)
from sd35trt.errors import ArtifactError, CalibrationError, InvalidInputError, check_choice
from sd35trt.export import ExportConfig, existing_if_current, export_inputs_hash, export_variant, variant_dir
from sd35trt.metrics import error_stats, psnr
from sd35trt.models import ModelSource
from sd35trt.runtime_env import DTYPES
from sd35trt.specs import SPECS, Precision

if TYPE_CHECKING:
    pass

CALIBRATABLE = ("transformer", "clip_l", "clip_g", "t5")
DEFAULT_PROMPTS = Path(__file__).resolve().parent.parent / "calibration" / "prompts.txt"
DEFAULT_RECIPE = Path(__file__).resolve().parent.parent / "calibration" / "fp8.toml"
RECIPE_KEYS = {"version", "format", "algorithm", *CALIBRATABLE}


# --- inputs ------------------------------------------------------------------------------------------


def read_prompts(path: Path, needed: int) -> list[str]:
    """Non-empty lines of a UTF-8 prompt file; every problem is one line naming the file (and line)."""
    if not path.exists():
        raise InvalidInputError("prompts file not found", path=path, hint="pass --prompts FILE (one prompt per line)")
    if not path.is_file():
        raise InvalidInputError("prompts path is not a file", path=path, hint="pass --prompts FILE")
    raw = path.read_bytes()
    if b"\0" in raw:
        raise InvalidInputError("prompts file is binary (contains NUL bytes)", path=path,
                                hint="use a UTF-8 text file with one prompt per line")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise InvalidInputError(f"prompts file is not UTF-8 (line {line}, byte {exc.start})", path=path,
                                hint="re-save it as UTF-8") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise InvalidInputError("prompts file is empty", path=path, hint="add one prompt per line")
    if len(prompts) < needed:
        raise InvalidInputError(f"prompts file has {len(prompts)} prompts, {needed} needed "
                                "(--num-prompts plus --holdout)", path=path,
                                hint=f"lower --num-prompts to {max(1, len(prompts) - 1)} or add prompts")
    return prompts


@dataclass(frozen=True)
class Recipe:
    """The FP8 recipe (calibration/fp8.toml): which modules of each component stay high precision."""

    path: Path
    sha256: str
    version: int
    algorithm: str
    exclude: dict[str, tuple[str, ...]]

    @classmethod
    def load(cls, path: Path) -> Recipe:
        if not path.is_file():
            raise InvalidInputError("FP8 recipe not found", path=path, hint="pass --config calibration/fp8.toml")
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise InvalidInputError(f"FP8 recipe is not valid TOML ({str(exc).splitlines()[0]})", path=path,
                                    hint="fix the syntax; see calibration/fp8.toml for the format") from None
        unknown = set(data) - RECIPE_KEYS
        if unknown:
            raise InvalidInputError(f"FP8 recipe has unknown key(s) {', '.join(sorted(unknown))}", path=path,
                                    hint=f"allowed: {', '.join(sorted(RECIPE_KEYS))}")
        if data.get("format", "fp8_e4m3") != "fp8_e4m3":
            raise InvalidInputError(f"FP8 recipe format '{data['format']}' is not supported", path=path,
                                    hint="use format = \"fp8_e4m3\"")
        if data.get("algorithm", "max") != "max":
            raise InvalidInputError(f"calibration algorithm '{data['algorithm']}' is not supported", path=path,
                                    hint="use algorithm = \"max\" (per-tensor amax)")
        exclude = {}
        for name in CALIBRATABLE:
            section = data.get(name, {})
            patterns = section.get("exclude", []) if isinstance(section, dict) else None
            if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
                raise InvalidInputError(f"[{name}] exclude must be a list of strings", path=path,
                                        hint='e.g. exclude = ["proj_out"]')
            exclude[name] = tuple(patterns)
        return cls(path=path, sha256=sha256_file(path), version=int(data.get("version", 1)),
                   algorithm="max", exclude=exclude)

    def check_patterns(self, component: str, module_names: list[str]) -> None:
        """Every exclude pattern must name at least one module: a typo must not silently quantize."""
        for pattern in self.exclude[component]:
            if not any(fnmatch.fnmatchcase(n, pattern) for n in module_names):
                raise CalibrationError(f"[{component}] exclude pattern '{pattern}' matches no module", path=self.path,
                                       hint=f"fix the name; e.g. {', '.join(module_names[1:4])}, ...")

    def quant_cfg(self, components: tuple[str, ...]) -> dict[str, Any]:
        """ModelOpt config for a ModuleDict of ``{pipeline_attr: network}``: FP8 everywhere but excludes."""
        fp8 = {"num_bits": (4, 3), "axis": None}
        cfg: list[dict[str, Any]] = [
            {"quantizer_name": "*", "enable": False},
            {"quantizer_name": "*weight_quantizer", "cfg": fp8},
            {"quantizer_name": "*input_quantizer", "cfg": fp8},
        ]
        for component in components:
            prefix = SPECS[component].pipeline_attr
            for pattern in self.exclude[component]:
                cfg.append({"quantizer_name": f"{prefix}.{pattern}.*", "enable": False})
        return {"quant_cfg": cfg, "algorithm": self.algorithm}


@dataclass(frozen=True)
class CalibrationConfig:
    prompts_file: Path = DEFAULT_PROMPTS
    num_prompts: int = 32
    steps: int = 8
    seed: int = 0
    components: tuple[str, ...] = ("transformer",)
    recipe_file: Path = DEFAULT_RECIPE
    height: int = 1024
    width: int = 1024
    guidance: float = 4.5
    batch: int = 4  # prompts per pipeline call
    holdout: int = 2  # held-out prompts for the report (never used to calibrate)
    report_steps: int = 0  # denoising steps for the held-out report; 0 = same as --steps
    dtype: str = "auto"  # pipeline dtype while calibrating: auto = fp32 on CPU, fp16 on CUDA
    fp16: bool = True  # also write the FP16 fallback ONNX of every component
    onnx_report: bool = True  # run the FP8/FP16 ONNX in onnxruntime on held-out traffic for the report
    validate: bool = True  # validate the FP8 ONNX against the fake-quant module (export validation)

    def __post_init__(self):
        from sd35trt.specs import check_pixels

        if self.num_prompts < 1:
            raise InvalidInputError(f"--num-prompts {self.num_prompts} must be ≥ 1", hint="e.g. --num-prompts 32")
        if self.steps < 1:
            raise InvalidInputError(f"--steps {self.steps} must be ≥ 1", hint="e.g. --steps 8")
        if self.batch < 1:
            raise InvalidInputError(f"--calib-batch {self.batch} must be ≥ 1", hint="e.g. --calib-batch 4")
        if self.holdout < 1:
            raise InvalidInputError(f"--holdout {self.holdout} must be ≥ 1", hint="the report needs held-out prompts")
        if not math.isfinite(self.guidance) or self.guidance < 0:
            raise InvalidInputError(f"--guidance {self.guidance} must be a finite number ≥ 0", hint="e.g. --guidance 4.5")
        check_pixels(self.height, "--height")
        check_pixels(self.width, "--width")
        check_choice("--dtype", self.dtype, DTYPES)
        bad = [c for c in self.components if c not in CALIBRATABLE]
        if bad:
            raise InvalidInputError(f"cannot calibrate {', '.join(bad)} in FP8", hint=f"choose from {','.join(CALIBRATABLE)}")


@dataclass
class CalibrationResult:
    skipped: bool
    inputs_hash: str
    report: dict[str, Any]
    folder: Path
    seconds: float = 0.0
    exports: list[Any] = field(default_factory=list)


# --- traffic capture -----------------------------------------------------------------------------------


class TrafficRecorder:
    """Record a network's inputs (spec names) while the real pipeline runs: the report's held-out inputs."""

    def __init__(self, pipe: Any, components: tuple[str, ...], limit: int = 64):
        self.calls: dict[str, list[dict[str, Any]]] = {c: [] for c in components}
        self.handles = []
        for name in components:
            spec = SPECS[name]
            network = getattr(pipe, spec.pipeline_attr)
            self.handles.append(network.register_forward_hook(self._hook(name, spec, limit), with_kwargs=True))

    def _hook(self, name, spec, limit):
        def hook(_module, args, kwargs, _output):
            if len(self.calls[name]) >= limit:
                return
            values = dict(zip(spec.input_names, args))
            values.update({k: v for k, v in kwargs.items() if k in spec.input_names})
            self.calls[name].append({k: values[k].detach().float().cpu() if values[k].is_floating_point()
                                     else values[k].detach().cpu() for k in spec.input_names})
        return hook

    def close(self):
        for handle in self.handles:
            handle.remove()


def _chunks(items: list[str], size: int) -> list[list[str]]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def run_pipeline(pipe: Any, prompts: list[str], cfg: CalibrationConfig, *, seed: int, steps: int) -> Any:
    """diffusers' own loop → latents (one call per chunk; generator seeded per chunk)."""
    import torch

    device = pipe._execution_device
    latents = []
    for i, chunk in enumerate(_chunks(prompts, cfg.batch)):
        generator = torch.Generator(device="cpu").manual_seed(seed + i)
        out = pipe(prompt=chunk, negative_prompt=[""] * len(chunk), num_inference_steps=steps,
                   guidance_scale=cfg.guidance, height=cfg.height, width=cfg.width, generator=generator,
                   output_type="latent")
        latents.append(out.images.float().cpu())
        del out
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return torch.cat(latents)


def decode_latents(pipe: Any, latents: Any) -> Any:
    """The pipeline's own VAE decode step (scale, shift, decode), images in [-1, 1]."""
    import torch

    vae = pipe.vae
    with torch.no_grad():
        z = latents.to(vae.device, vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
        return vae.decode(z, return_dict=False)[0].float().cpu()


# --- the step --------------------------------------------------------------------------------------------


def calibration_inputs_hash(source: ModelSource, cfg: CalibrationConfig, prompts: list[str], recipe: Recipe,
                            export_cfg: ExportConfig) -> str:
    return hash_json({
        "model": source.fingerprint(), "prompts": hash_json(prompts[: cfg.num_prompts + cfg.holdout]),
        "num_prompts": cfg.num_prompts, "steps": cfg.steps, "seed": cfg.seed, "components": list(cfg.components),
        "recipe": recipe.sha256, "height": cfg.height, "width": cfg.width, "guidance": cfg.guidance,
        "batch": cfg.batch, "holdout": cfg.holdout, "report_steps": cfg.report_steps, "toolkit": __version__,
        "dtype": cfg.dtype, "fp16": cfg.fp16, "onnx_report": cfg.onnx_report,
        "export": export_cfg.to_dict(),
    })


def export_config_for(out: Path) -> ExportConfig:
    """FP8/FP16 variants use the FP32 export's opset and shape ranges when it exists."""
    from sd35trt.specs import ShapeRanges

    summary = variant_dir(out, Precision.FP32) / "export.json"
    if summary.is_file():
        data = read_json(summary, "export summary")
        cfg = data.get("config", {})
        return ExportConfig(opset=cfg.get("opset", 19), ranges=ShapeRanges.from_dict(cfg.get("ranges", {})))
    return ExportConfig()


def _outputs_current(out: Path, source: ModelSource, export_cfg: ExportConfig, components: tuple[str, ...],
                     calib_hash: str, fp16: bool) -> bool:
    """True when every FP8/FP16 ONNX this calibration produces exists with matching inputs."""
    from sd35trt.specs import COMPONENTS

    extra = {"calibration_hash": calib_hash}
    for name in components:
        h = export_inputs_hash(source, export_cfg, name, Precision.FP8, extra)
        if existing_if_current(variant_dir(out, Precision.FP8) / name, h) is None:
            return False
    for name in COMPONENTS if fp16 else ():
        h = export_inputs_hash(source, export_cfg, name, Precision.FP16, extra)
        if existing_if_current(variant_dir(out, Precision.FP16) / name, h) is None:
            return False
    return True


def calibrate_model(source: ModelSource, out: Path, cfg: CalibrationConfig, *, device: str = "auto",
                    force: bool = False) -> CalibrationResult:
    """``sd35trt calibrate``. Inputs are validated (prompts, recipe) before any model is built."""
    from sd35trt.specs import COMPONENTS

    prompts = read_prompts(cfg.prompts_file, cfg.num_prompts + cfg.holdout)
    recipe = Recipe.load(cfg.recipe_file)
    export_cfg = export_config_for(out)
    calib_hash = calibration_inputs_hash(source, cfg, prompts, recipe, export_cfg)
    folder = out / "calibration"
    recover_interrupted(folder)
    manifest_path = folder / "manifest.json"
    if not force and manifest_path.is_file():
        try:
            manifest = read_json(manifest_path, "calibration manifest")
        except ArtifactError:
            manifest = {}
        if manifest.get("inputs_hash") == calib_hash and _outputs_current(out, source, export_cfg, cfg.components,
                                                                           calib_hash, cfg.fp16):
            log.info("calibration: inputs unchanged, skipped")
            report = read_json(folder / "calibration.json", "calibration report")
            return CalibrationResult(True, calib_hash, report, folder)

    import torch

    from sd35trt.models import build_pipeline
    from sd35trt.runtime_env import pick_device, pick_dtype

    start = time.perf_counter()
    torch_device = pick_device(device)
    calib_prompts = prompts[: cfg.num_prompts]
    holdout_prompts = prompts[cfg.num_prompts: cfg.num_prompts + cfg.holdout]
    report_steps = cfg.report_steps or cfg.steps
    dtype = pick_dtype(cfg.dtype, torch_device, on_gpu="fp16")  # FP16: the precision the FP8 ONNX is exported in
    export_cfg = ExportConfig(components=export_cfg.components, opset=export_cfg.opset, ranges=export_cfg.ranges,
                              validate=cfg.validate)
    with log.step(f"build {source.id} pipeline on {torch_device} ({str(dtype).removeprefix('torch.')})"):
        pipe = build_pipeline(source, device=torch_device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    for name in cfg.components:  # a recipe typo must fail before minutes of work, not after
        recipe.check_patterns(name, [n for n, _ in getattr(pipe, SPECS[name].pipeline_attr).named_modules()])

    # 1. FP32 reference on held-out prompts: inputs of every network, their outputs, final latents/images.
    with log.step(f"FP32 reference on {len(holdout_prompts)} held-out prompts × {report_steps} steps"):
        recorder = TrafficRecorder(pipe, COMPONENTS[:4])
        ref_latents = run_pipeline(pipe, holdout_prompts, cfg, seed=cfg.seed + 10_000, steps=report_steps)
        recorder.close()
        traffic = recorder.calls
        ref_images = decode_latents(pipe, ref_latents)
        references = {name: [_run_module(SPECS[name].module(pipe), SPECS[name], call) for call in calls]
                      for name, calls in traffic.items()}

    # 2. FP16 fallback for every component; FP32 where FP16 overflows on real traffic.
    fp16_choice: dict[str, Any] = {}
    exports: list[Any] = []
    extra = {"calibration_hash": calib_hash}
    if cfg.fp16:
        for name in COMPONENTS:
            fp16_choice[name] = _fp16_or_safe(pipe, name, traffic.get(name), references.get(name))
        exports = export_variant(
            pipe, source, out, export_cfg, Precision.FP16, extra_inputs=extra, force=force,
            module_for=lambda spec: fp16_choice[spec.name]["module"],
        )
        for item in exports:
            _annotate_fp16(item, fp16_choice[item.component])
        for choice in fp16_choice.values():
            choice.pop("module", None)

    # 3. Calibrate every requested component in one pass of the real denoising loop.
    with log.step(f"calibrate {','.join(cfg.components)}: {cfg.num_prompts} prompts × {cfg.steps} steps "
                  f"at {cfg.height}×{cfg.width}") as calib_timing:
        networks, scales = calibrate_networks(pipe, cfg, recipe, calib_prompts)

    # 4. End to end on held-out prompts: fake-quant FP8 pipeline vs FP32, same seeds.
    with log.step("FP8 (fake-quant) loop on held-out prompts"):
        q_latents = run_pipeline(pipe, holdout_prompts, cfg, seed=cfg.seed + 10_000, steps=report_steps)
        q_images = decode_latents(pipe, q_latents)
    end_to_end = {
        "prompts": holdout_prompts, "steps": report_steps, "reference": "diffusers pipeline, FP32 weights",
        "candidate": "diffusers pipeline with ModelOpt FP8 fake-quant (same seeds)",
        "latents": error_stats(ref_latents.numpy(), q_latents.numpy()).to_dict(),
        "image_psnr_db": [round(psnr(r.numpy(), c.numpy()), 2) for r, c in zip(ref_images, q_images)],
    }

    # 5. Save the calibrated state atomically, then export FP8 ONNX from the quantized modules (in FP16).
    with atomic_dir(folder) as tmp:
        write_json_atomic(tmp / "scales.json", {k: v.hex() for k, v in sorted(scales.items())})
        torch.save({k: v for k, v in networks.state_dict().items() if k.endswith("_amax")}, tmp / "amax.pt")
        state_files = file_entries(tmp)
        fp8_start = time.perf_counter()
        fp8_exports = export_variant(
            pipe, source, out, ExportConfig(components=cfg.components, opset=export_cfg.opset,
                                            ranges=export_cfg.ranges, validate=export_cfg.validate),
            Precision.FP8, extra_inputs=extra, force=True, postprocess=_rewrite_and_count,
            module_for=lambda spec: _fp16_module(SPECS[spec.name].module(pipe)),
        )
        fp8_seconds = time.perf_counter() - fp8_start
        # 6. Report: FP8 and FP16 ONNX in onnxruntime vs the FP32 outputs on held-out traffic.
        components_report = {}
        for name in COMPONENTS[:4] if cfg.onnx_report else ():
            entry: dict[str, Any] = {"calls": len(traffic[name])}
            if name in cfg.components:
                entry["fp8"] = _onnx_vs_reference(variant_dir(out, Precision.FP8) / name / "model.onnx",
                                                  traffic[name], references[name], SPECS[name])
            if cfg.fp16:
                entry["fp16"] = _onnx_vs_reference(variant_dir(out, Precision.FP16) / name / "model.onnx",
                                                   traffic[name], references[name], SPECS[name])
                entry["fp16_export_precision"] = fp16_choice[name]["precision"]
            components_report[name] = entry
        report = {
            "kind": "calibration-report", "toolkit": __version__, "model": source.describe(),
            "random_weights": source.random_weights, "inputs_hash": calib_hash,
            "reference": f"the same pipeline before quantization ({str(dtype).removeprefix('torch.')} on {torch_device})",
            "config": {"prompts_file": str(cfg.prompts_file), "prompts_sha256": sha256_file(cfg.prompts_file),
                       "num_prompts": cfg.num_prompts, "steps": cfg.steps, "seed": cfg.seed,
                       "components": list(cfg.components), "recipe": str(cfg.recipe_file),
                       "recipe_sha256": recipe.sha256, "height": cfg.height, "width": cfg.width,
                       "guidance": cfg.guidance, "batch": cfg.batch, "holdout": cfg.holdout, "dtype": cfg.dtype,
                       "fp16": cfg.fp16, "onnx_report": cfg.onnx_report, "validate": cfg.validate},
            "quantizers": {"enabled": len(scales), "scales_sha256": hash_json({k: v.hex() for k, v in scales.items()})},
            "fp16_fallback": fp16_choice,
            "components": components_report,
            "end_to_end": end_to_end,
            "timings": {"calibration_seconds": round(calib_timing["seconds"], 2),
                        "fp8_export_seconds": round(fp8_seconds, 2),
                        "total_seconds": round(time.perf_counter() - start, 2)},
            "device": torch_device, "host": platform.node(),
            "versions": package_versions("torch", "diffusers", "nvidia-modelopt", "onnx", "onnxruntime"),
        }
        write_json_atomic(tmp / "calibration.json", report)
        write_json_atomic(tmp / "manifest.json", {
            "kind": "calibration", "toolkit": __version__, "inputs_hash": calib_hash, "files": state_files,
            "fp8_onnx": {e.component: e.manifest["files"] for e in fp8_exports},
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        })
    return CalibrationResult(False, calib_hash, report, folder, time.perf_counter() - start, exports + fp8_exports)


def calibrate_networks(pipe: Any, cfg: CalibrationConfig, recipe: Recipe, prompts: list[str]) -> tuple[Any, dict[str, float]]:
    """Insert FP8 quantizers into the requested networks (in place) and calibrate them in one pass of the
    pipeline's own loop over ``prompts``. Returns the ModuleDict of networks and their scales."""
    import modelopt.torch.quantization as mtq
    import torch

    networks = torch.nn.ModuleDict({SPECS[c].pipeline_attr: getattr(pipe, SPECS[c].pipeline_attr)
                                    for c in cfg.components})
    for name in cfg.components:
        recipe.check_patterns(name, [n for n, _ in getattr(pipe, SPECS[name].pipeline_attr).named_modules()])
    torch.manual_seed(cfg.seed)
    with contextlib.redirect_stdout(sys.stderr):  # ModelOpt prints progress; stdout carries results only
        mtq.quantize(networks, recipe.quant_cfg(cfg.components),
                     lambda _m: run_pipeline(pipe, prompts, cfg, seed=cfg.seed, steps=cfg.steps))
    scales = collect_scales(networks)
    bad = [k for k, v in scales.items() if not math.isfinite(v)]
    if bad:
        raise CalibrationError(f"calibration produced NaN/Inf scales for {len(bad)} quantizers (first: {bad[0]})",
                               path=cfg.prompts_file, hint="the model diverges on these prompts; check weights or dtype")
    if not scales:
        raise CalibrationError("no quantizer was calibrated", path=cfg.recipe_file,
                               hint="the recipe excludes every module; loosen its exclude lists")
    return networks, scales


def collect_scales(model: Any) -> dict[str, float]:
    """amax of every enabled quantizer, by name (the calibrated state the determinism test compares)."""
    scales = {}
    for name, module in model.named_modules():
        if type(module).__name__ == "TensorQuantizer" and module.is_enabled and module.amax is not None:
            scales[name] = float(module.amax.float().max())
    return scales


def _run_module(module: Any, spec: Any, call: dict[str, Any]) -> list[Any]:
    import torch

    device = next(module.parameters()).device
    dtype = next(module.parameters()).dtype
    with torch.no_grad():
        out = module(*[call[n].to(device, dtype) if call[n].is_floating_point() else call[n].to(device)
                       for n in spec.input_names])
    out = out if isinstance(out, tuple) else (out,)
    return [o.float().cpu().numpy() for o in out]


def _fp16_module(module: Any) -> Any:
    import torch

    from sd35trt.export import CastIO

    return CastIO(module.half(), torch.float16)


def _fp16_or_safe(pipe: Any, name: str, calls: list | None, refs: list | None) -> dict[str, Any]:
    """An FP16 copy of the network, unless FP16 fails on real traffic: then FP32 (recorded with why).

    Fails = NaN/Inf in any output, or an error against the FP32 outputs beyond the spec's FP16 tolerance:
    transformers' T5 clamps FP16 overflow to finite values, so NaN alone would miss the known T5 case.
    """
    import torch

    from sd35trt.export import CastIO

    spec = SPECS[name]
    network = getattr(pipe, spec.pipeline_attr)
    half = copy.deepcopy(network).half()
    module = CastIO(spec.wrapper(half).eval(), torch.float16)
    tol = spec.tolerances[Precision.FP16]
    for call, ref in zip(calls or [], refs or []):
        for out_name, r, o in zip(spec.output_names, ref, _run_module(module, spec, call)):
            stats = error_stats(r, o)
            if not stats.passes(tol):
                del module, half
                why = ("NaN/Inf" if stats.nonfinite else f"rel-L2 {stats.rel_l2:.3g} > {tol.rel_l2:g}")
                log.warn(f"{name}: FP16 fails on real traffic ({out_name}: {why}); its fallback ONNX stays FP32")
                return {"module": spec.module(pipe), "precision": "fp32",
                        "reason": f"FP16 on held-out traffic: {out_name} {why}"}
    return {"module": module, "precision": "fp16", "reason": "FP16 within tolerance on held-out traffic"}


def _annotate_fp16(item: Any, choice: dict[str, Any]) -> None:
    if item.skipped:
        return
    manifest_path = item.path.parent / "manifest.json"
    manifest = read_json(manifest_path, "export manifest")
    manifest["weights_precision"] = choice["precision"]
    manifest["precision_reason"] = choice["reason"]
    write_json_atomic(manifest_path, manifest)


def _rewrite_and_count(model_path: Path) -> None:
    from sd35trt.fp8_onnx import rewrite_fp8_qdq

    counts = rewrite_fp8_qdq(model_path)
    write_json_atomic(model_path.parent / "fp8_rewrite.json", counts)


def _onnx_vs_reference(path: Path, calls: list, refs: list, spec: Any) -> dict[str, Any]:
    from sd35trt.onnx_utils import ort_session, run_ort

    if not calls:
        return {"calls": 0}
    session = ort_session(path, provider="auto")
    per_call = []
    for call, ref in zip(calls, refs):
        outs = run_ort(session, {k: v.numpy() for k, v in call.items()})
        per_call.append({n: error_stats(r, outs[n]) for n, r in zip(spec.output_names, ref)})
    summary = {}
    for n in spec.output_names:
        rel = [c[n].rel_l2 for c in per_call]
        summary[n] = {"rel_l2_mean": sum(rel) / len(rel), "rel_l2_max": max(rel),
                      "rel_l2_per_call": [round(r, 6) for r in rel],
                      "max_abs": max(c[n].max_abs for c in per_call),
                      "cosine_min": min(c[n].cosine for c in per_call),
                      "nonfinite": sum(c[n].nonfinite for c in per_call)}
    return summary


def format_report(report: dict[str, Any]) -> str:
    """The readable table ``calibrate`` prints on stdout."""
    lines = [f"{'component':<12} {'variant':<6} {'output':<18} {'rel-L2 mean':>11} {'rel-L2 max':>10} "
             f"{'max-abs':>9} {'cos min':>8}"]
    for name, entry in report["components"].items():
        for variant in ("fp8", "fp16"):
            for out, s in (entry.get(variant) or {}).items():
                if not isinstance(s, dict):
                    continue
                lines.append(f"{name:<12} {variant:<6} {out:<18} {s['rel_l2_mean']:>11.4%} {s['rel_l2_max']:>10.4%} "
                             f"{s['max_abs']:>9.3g} {s['cosine_min']:>8.5f}")
    e2e = report["end_to_end"]
    lines.append(f"end to end ({len(e2e['prompts'])} held-out prompts, {e2e['steps']} steps): latents rel-L2 "
                 f"{e2e['latents']['rel_l2']:.4%}, image PSNR {', '.join(f'{p:.1f}' for p in e2e['image_psnr_db'])} dB")
    return "\n".join(lines)
