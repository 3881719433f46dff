"""Post-training calibration with ModelOpt — FP8 (E4M3, per-tensor), INT4 AWQ, NVFP4 or mixed FP8/INT4 — and the
FP16-range census.

``calibrate_model`` runs diffusers' own ``StableDiffusion3Pipeline`` loop with FP32 weights (on a GPU the
loop computes in BF16 under autocast, SD3.5's training precision, which cannot overflow) and writes the
calibration state into ``W/calibration/`` and nothing else; ``sd35trt export`` builds the FP16 and quantized ONNX
from it. In order:

1. Reference on held-out prompts (``producers.reference``): the inputs every network sees (traffic), an activation
   census of every module, and per-component outputs on that traffic in FP32 with TF32 off (the honest reference).
2. FP32 islands per component (``sd35trt.core.numerics.plan_islands``): recipe ``upcast`` sites ∪ census.
3. ModelOpt calibration of the requested components on the calibration prompts (islands excluded); for mixed,
   the budget's per-layer choice on the held-out traffic (``producers.mixed``).
4. The quantized fake-quant networks and the FP16 networks (with their islands) vs the FP32 reference on the
   held-out traffic; a component whose FP16 run still fails is FP32 as a last resort, with why.
5. ``quant_state.pt`` (ModelOpt state + amax), the 4-bit state (``producers.quantize.FourBitState``),
   ``scales.json``, ``census.json``, ``traffic.pt``, ``calibration.json`` (the report) and ``manifest.json``
   (``CalibrationManifest``), swapped in atomically.

Deterministic: prompts, seeds and the recipe fully decide the scales (the test suite checks byte
equality). Unchanged inputs skip the whole step without building a model.
"""

from __future__ import annotations

import contextlib
import math
import platform
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from sd35trt import __version__
from sd35trt.core import log
from sd35trt.core.artifacts import (
    atomic_dir,
    file_entries,
    hash_json,
    package_versions,
    recover_interrupted,
    save_torch,
    sha256_file,
    write_json_atomic,
)
from sd35trt.core.errors import CalibrationError, InvalidInputError, check_choice, check_seed
from sd35trt.core.host import DTYPES
from sd35trt.core.manifests import WorkDir, load_current
from sd35trt.core.metrics import error_stats, psnr
from sd35trt.core.models import ModelSource
from sd35trt.core.numerics import Island, plan_islands
from sd35trt.core.prompts import DEFAULT_PROMPTS, read_prompts
from sd35trt.core.specs import CALIBRATABLE, COMPONENTS, SPECS, PipeDims, Precision, pipeline_attrs
from sd35trt.core.wrappers import eager_text_attention
from sd35trt.producers.calibration_state import CalibrationManifest
from sd35trt.producers.mixed import plan_mix, ranking_compute, resolve_budget, transformer_sizes
from sd35trt.producers.quantize import (
    FourBitState,
    collect_scales,
    int4_layers_of,
    nvfp4_layers,
    quant_state,
    undo_awq,
)
from sd35trt.producers.recipe import DEFAULT_RECIPE, Recipe
from sd35trt.producers.reference import (
    HeldOut,
    calibration_loop,
    check_calls,
    decode_latents,
    fp16_decision,
    held_out_reference,
    probe_ranges,
    prompt_batches,
    run_pipeline,
)
from sd35trt.producers.shards import SINGLE, Shard, check_shards, from_environment, gather, process_group, run_workers, share
from sd35trt.producers.weight_quant import swapped

MAX_HOLDOUT = 64  # held-out prompts: each is a full FP32 reference run and a fake-quant run

def calibration_size(source: ModelSource) -> tuple[int, int, int]:
    """(prompts, steps, pixels per side) by model size. A test-size model (the tiny preset, or a directory whose
    transformer is narrower than SD3.5-Medium's 1536 channels: one saved from the tiny preset): 8 × 4 at 512²
    (seconds on 2 CPU cores; its attention at 1024² is what costs there). Real SD3.5: 32 prompts (TensorRT's
    demo calibrates on 32) × 20 steps (ModelOpt's diffusers example README: 20 of its 30) at 1024², SD3.5's
    training resolution, batch 4. A Turbo model calibrates on the traffic it serves: its own 4 steps."""
    config = source.transformer_config()
    width = int(config.get("num_attention_heads", 0)) * int(config.get("attention_head_dim", 0))
    prompts, steps, size = (8, 4, 512) if 0 < width < TEST_SIZE_WIDTH else (32, 20, 1024)
    return prompts, min(steps, source.defaults.steps), size


# Transformer width (heads x head dim) below which a model is a test-size one (SD3.5-Medium: 24 x 64 = 1536).
TEST_SIZE_WIDTH = 1024


# --- inputs ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CalibrationConfig:
    prompts_file: Path = DEFAULT_PROMPTS
    num_prompts: int = 32
    steps: int = 20
    seed: int = 0
    components: tuple[str, ...] = ("transformer",)
    recipe_file: Path = DEFAULT_RECIPE
    height: int = 1024
    width: int = 1024
    guidance: float = 4.5
    batch: int = 4  # prompts per pipeline call
    holdout: int = 2  # held-out prompts for the report (never used to calibrate)
    report_steps: int = 0  # denoising steps for the held-out report; 0 = same as --steps
    dtype: str = "auto"  # compute dtype of the loops: auto = BF16 on CUDA, FP32 on CPU (weights stay FP32)
    t5: bool = True  # False: CLIP-only traffic (zero T5 embeddings), for bundles that ship without T5
    format: Precision = Precision.FP8  # fp8 | int4 (AWQ, weight-only) | nvfp4 (weight-only FP4) | mixed: --format
    max_transformer_gib: float | None = None  # mixed: the transformer's weights budget (None: midway FP8/INT4)
    awq_calls: int = 16  # int4/mixed: transformer calls of the loop that AWQ's scale search runs on (spread)

    def __post_init__(self):
        from sd35trt.core.shapes import check_pixels

        if self.num_prompts < 1:
            raise InvalidInputError(f"--num-prompts {self.num_prompts} must be ≥ 1", hint="e.g. --num-prompts 32")
        if self.steps < 1:
            raise InvalidInputError(f"--steps {self.steps} must be ≥ 1", hint="e.g. --steps 20")
        if self.batch < 1:
            raise InvalidInputError(f"--calib-batch {self.batch} must be ≥ 1", hint="e.g. --calib-batch 4")
        if not 1 <= self.holdout <= MAX_HOLDOUT:
            raise InvalidInputError(f"--holdout {self.holdout} is outside 1..{MAX_HOLDOUT}",
                                    hint="the report needs a few held-out prompts (each is a whole reference run); "
                                         "e.g. --holdout 2")
        if not math.isfinite(self.guidance) or not 0 <= self.guidance <= 100:
            raise InvalidInputError(f"--guidance {self.guidance} must be a number in 0..100", hint="e.g. --guidance 4.5")
        check_seed(self.seed)
        check_pixels(self.height, "--height")
        check_pixels(self.width, "--width")
        check_choice("--dtype", self.dtype, DTYPES)
        bad = [c for c in self.components if c not in CALIBRATABLE]
        if bad:
            raise InvalidInputError(f"cannot calibrate {', '.join(bad)} in FP8", hint=f"choose from {','.join(CALIBRATABLE)}")
        if not self.t5 and "t5" in self.components:
            raise InvalidInputError("--components names t5 but --no-t5 leaves T5 out", hint="drop one of them")
        if not self.format.quantized:
            raise InvalidInputError(f"--format {self.format.value} is not a calibrated format",
                                    hint="choose fp8, int4, nvfp4 or mixed")
        if self.awq_calls < 1:
            raise InvalidInputError(f"--awq-calls {self.awq_calls} must be ≥ 1", hint="e.g. --awq-calls 16")
        if self.max_transformer_gib is not None and (self.format is not Precision.MIXED
                                                     or not 0 < self.max_transformer_gib < math.inf):
            raise InvalidInputError(f"--max-transformer-gib {self.max_transformer_gib:g} needs --format mixed and a "
                                    "size in GiB above 0", hint="e.g. --format mixed --max-transformer-gib 5")
        if self.format is not Precision.FP8 and self.components != ("transformer",):
            raise InvalidInputError(f"--format {self.format.value} quantizes the transformer only (4-bit text encoders "
                                    "are not supported)", hint="use --components transformer")


@dataclass
class CalibrationResult:
    skipped: bool
    inputs_hash: str
    report: dict[str, Any]
    folder: Path
    seconds: float = 0.0


# --- the step --------------------------------------------------------------------------------------------


def calibration_inputs_hash(source: ModelSource, cfg: CalibrationConfig, prompts: list[str], recipe: Recipe,
                            device: str) -> str:
    from sd35trt.core.host import compute_dtype_name

    return hash_json({
        "model": source.fingerprint(), "prompts": hash_json(prompts[: cfg.num_prompts + cfg.holdout]),
        "num_prompts": cfg.num_prompts, "steps": cfg.steps, "seed": cfg.seed, "components": list(cfg.components),
        "recipe": recipe.calibration_digest, "height": cfg.height, "width": cfg.width, "guidance": cfg.guidance,
        "batch": cfg.batch, "holdout": cfg.holdout, "report_steps": cfg.report_steps, "toolkit": __version__,
        "compute": [device.split(":")[0], compute_dtype_name(cfg.dtype, device)],
        **({} if cfg.t5 else {"t5": False}), **({} if cfg.format is Precision.FP8 else {"format": cfg.format.value}),
        **({} if cfg.max_transformer_gib is None else {"max_transformer_gib": cfg.max_transformer_gib}),
        **({"awq_calls": cfg.awq_calls} if cfg.format in (Precision.INT4, Precision.MIXED) else {}),
    })


def calibrate_model(source: ModelSource, out: Path, cfg: CalibrationConfig, *, device: str = "auto",
                    force: bool = False, shards: int = 1) -> CalibrationResult | None:
    """``sd35trt calibrate``. Inputs are validated (prompts, recipe, shards) before any model is built.

    ``shards`` > 1 runs the calibration loop in that many spawned workers (``sd35trt.producers.shards``); under torchrun
    the launcher's processes are the workers. Returns None on a worker that is not rank 0."""
    from sd35trt.core.artifacts import exclusive
    from sd35trt.core.host import detect_device

    prompts = read_prompts(cfg.prompts_file, cfg.num_prompts + cfg.holdout)
    recipe = Recipe.load(cfg.recipe_file)
    target_device = detect_device(device)
    launched = from_environment()
    if launched is not None and shards not in (1, launched.world):
        raise InvalidInputError(f"--shards {shards} differs from the launcher's {launched.world} processes",
                                hint="leave --shards out under torchrun; its --nproc-per-node decides")
    workers = launched.world if launched is not None else shards
    check_shards(workers, len(prompt_batches(prompts[: cfg.num_prompts], cfg.batch)), target_device)
    if workers > 1 and cfg.format is not Precision.FP8:
        raise InvalidInputError(f"--shards {workers} with --format {cfg.format.value}: sharded calibration merges FP8 "
                                "amax only (AWQ's scale search runs in one process)", hint="use --shards 1")
    calib_hash = calibration_inputs_hash(source, cfg, prompts, recipe, target_device)
    folder = WorkDir(out).calibration
    if launched is not None:  # torchrun: rank 0 decides and writes, every rank calibrates its shard
        with process_group(launched, target_device), \
                (exclusive(folder, "calibrate") if launched.main else contextlib.nullcontext()):
            done = share(launched, _current(folder, calib_hash, force) if launched.main else None)
            if done is not None:
                return done if launched.main else None
            return _calibrate(source, folder, cfg, prompts, recipe, calib_hash, device, launched)
    with exclusive(folder, "calibrate"):
        done = _current(folder, calib_hash, force)
        if done is not None:
            return done
        if workers == 1:
            return _calibrate(source, folder, cfg, prompts, recipe, calib_hash, device, SINGLE)
        start = time.perf_counter()
        log.info(f"calibrate: {workers} workers ({'NCCL, one GPU each' if target_device == 'cuda' else 'gloo on CPU'}), "
                 f"prompt batches shared round-robin")
        run_workers(_calibrate_shard, workers, (source, folder, cfg, prompts, recipe, calib_hash, device))
        from sd35trt.core.artifacts import read_json

        return CalibrationResult(False, calib_hash, read_json(folder / "calibration.json", "calibration report"),
                                 folder, time.perf_counter() - start)


def _current(folder: Path, calib_hash: str, force: bool) -> CalibrationResult | None:
    """The finished calibration with these inputs (the step is then skipped), or None."""
    from sd35trt.core.artifacts import read_json

    recover_interrupted(folder)
    if force or load_current(folder, calib_hash, "calibration manifest") is None:
        return None
    log.info("calibration: inputs unchanged, skipped")
    return CalibrationResult(True, calib_hash, read_json(folder / "calibration.json", "calibration report"), folder)


def _calibrate_shard(shard: Shard, init_method: str, *args: Any) -> None:
    """A spawned worker of ``calibrate --shards N``."""
    source, folder, cfg, prompts, recipe, calib_hash, device = args
    from sd35trt.core.host import detect_device

    with process_group(shard, detect_device(device), init_method):
        _calibrate(source, folder, cfg, prompts, recipe, calib_hash, device, shard)


def _calibrate(source: ModelSource, folder: Path, cfg: CalibrationConfig, prompts: list[str], recipe: Recipe,
               calib_hash: str, device: str, shard: Shard) -> CalibrationResult | None:
    """The step itself, on one worker (``shard``; SINGLE without sharding): every worker builds the pipeline
    and calibrates its share of the prompts; rank 0 alone runs the reference, checks and writes."""
    import torch

    from sd35trt.core.host import compute_dtype_name, computing, pick_device, strict_fp32
    from sd35trt.core.models import build_pipeline

    strict_fp32()
    start = time.perf_counter()
    torch_device = pick_device(device)
    compute = compute_dtype_name(cfg.dtype, torch_device)
    calib_prompts = prompts[: cfg.num_prompts]
    holdout_prompts = prompts[cfg.num_prompts: cfg.num_prompts + cfg.holdout]
    report_steps = cfg.report_steps or cfg.steps
    attrs = pipeline_attrs(cfg.t5 and source.has_t5)
    with log.step(f"build {source.id} pipeline on {torch_device} (FP32 weights, {compute} compute"
                  f"{'' if 'text_encoder_3' in attrs else ', CLIP-only: zero T5 embeddings'})"):
        pipe = build_pipeline(source, device=torch_device, dtype=torch.float32, components=attrs)
    pipe.set_progress_bar_config(disable=True)
    eager_text_attention(pipe)
    present = tuple(c for c in COMPONENTS if SPECS[c].pipeline_attr in attrs)
    module_names = {name: [n for n, _ in getattr(pipe, SPECS[name].pipeline_attr).named_modules()]
                    for name in present}
    for name in cfg.components:  # a recipe typo must fail before minutes of work, not after
        recipe.check_patterns(name, module_names[name])

    # 1. Reference on held-out prompts (rank 0): traffic, census, FP32 outputs per component.
    # 2. FP32 islands: recipe sites present in this model ∪ census values past the margin; every shard leaves
    #    the same modules unquantized.
    held_out = held_out_reference(pipe, cfg, holdout_prompts, report_steps, torch_device, compute) if shard.main else None
    islands = share(shard, {name: plan_islands(held_out.census.get(name, {}), module_names[name], margin=recipe.margin,
                                               upcast=recipe.upcast.get(name, ()), units=SPECS[name].island_units,
                                               feeds=held_out.feeds.get(name))
                            for name in present} if held_out is not None else None)
    for name, found in islands.items():
        for island in found:
            log.warn(f"{name}: {island.module} runs as an FP32 island ({island.why})")

    # 3. Calibrate every requested component in one pass of the real denoising loop (islands excluded); with
    #    shards, each runs its own prompt batches and ModelOpt all-reduces every amax with MAX. A component whose
    #    every quantizable layer is excluded or inside an island has nothing to run in FP8: it stays FP16.
    for name in list(cfg.components):
        if not recipe.quantizable(name, getattr(pipe, SPECS[name].pipeline_attr), islands.get(name, [])):
            log.warn(f"{name}: every quantizable layer is excluded by the recipe or inside an FP32 island; it is "
                     "not calibrated to FP8 (its engines use FP16 with the islands)")
            cfg = replace(cfg, components=tuple(c for c in cfg.components if c != name))
    budget = None
    if cfg.format is Precision.MIXED and cfg.components:  # a budget no mix meets fails before minutes of calibration
        network = getattr(pipe, SPECS["transformer"].pipeline_attr)
        with SPECS["transformer"].exporting(pipe, probe_ranges(cfg), PipeDims.from_pipeline(pipe)):  # as exported
            sizes = transformer_sizes(network, recipe.quantizable("transformer", network, islands["transformer"]),
                                      islands["transformer"])
        budget = (sizes, resolve_budget(cfg.max_transformer_gib, sizes))
    share_note = f", {shard} of the batches" if shard.distributed else ""
    fmt = cfg.format
    quantized, scales, calib_timing = None, {}, {"seconds": 0.0}
    four_bit = FourBitState()
    if cfg.components:
        what = ("FP4 scales from the weights (weight-only: no calibration traffic)" if fmt is Precision.NVFP4 else
                f"{cfg.num_prompts} prompts × {cfg.steps} steps at {cfg.height}×{cfg.width} ({compute}{share_note})")
        with log.step(f"calibrate {','.join(cfg.components)} to {fmt.value}: {what}") as calib_timing:
            quantized, scales, four_bit = _quantize(pipe, cfg, recipe, calib_prompts, islands, compute, shard,
                                                    held_out, budget)
    if not shard.main:
        return None
    assert held_out is not None
    ref_latents, ref_images, census_table = held_out.latents, held_out.images, held_out.census
    traffic, references = held_out.traffic, held_out.references

    # 4. The quantized (fake-quant) networks vs FP32 per component on held-out traffic, and end to end.
    label = {Precision.FP8: "ModelOpt FP8", Precision.INT4: "ModelOpt INT4 AWQ", Precision.NVFP4: "NVFP4 (sd35trt)",
             Precision.MIXED: "ModelOpt FP8 and INT4 AWQ (mixed)"}[fmt]
    end_to_end: dict[str, Any] = {
        "prompts": holdout_prompts, "steps": report_steps,
        "reference": f"diffusers pipeline, FP32 weights, {compute} compute on {torch_device}",
        "candidate": f"the same with {label} fake-quant (same seeds)"}
    with four_bit.faked(pipe):
        quant_checks = {name: check_calls(SPECS[name].module(pipe), SPECS[name], traffic[name], references[name],
                                           fmt) for name in cfg.components}
        if cfg.components:
            with log.step(f"{fmt.value} (fake-quant) loop on held-out prompts"), computing(torch_device, compute):
                q_latents = run_pipeline(pipe, holdout_prompts, cfg, seed=cfg.seed + 10_000, steps=report_steps,
                                         label=f"{fmt.value} fake-quant")
                _, q_images = decode_latents(pipe, q_latents)
            end_to_end |= {"latents": error_stats(ref_latents.numpy(), q_latents.numpy()).to_dict(),
                           "image_psnr_db": [round(psnr(r.numpy(), c.numpy()), 2) for r, c in zip(ref_images, q_images)]}
        else:
            end_to_end["candidate"] = f"none: no component runs in {fmt.value}"
    state = quant_state(quantized) if quantized is not None and fmt in (Precision.FP8, Precision.MIXED) else None
    if fmt is Precision.INT4 and quantized is not None:
        undo_awq(quantized)  # the FP16 check below runs the model as it is, not AWQ's rescaled weights

    # 5. FP16 with islands vs FP32 (in place, last: the pipeline is not used in FP32 afterwards).
    fp16_checks, decisions = {}, {}
    for name in present:
        fp16_checks[name], decisions[name] = fp16_decision(pipe, name, traffic[name], references[name],
                                                            islands[name], census_table.get(name, {}))

    with atomic_dir(folder) as tmp:
        write_json_atomic(tmp / "scales.json", {k: v.hex() for k, v in sorted(scales.items())})
        if state is not None:
            save_torch(state, tmp / "quant_state.pt")
        four_bit.save(tmp)
        save_torch({name: {"calls": traffic[name], "reference": [[torch.from_numpy(o) for o in outs]
                                                                 for outs in references[name]]}
                    for name in present}, tmp / "traffic.pt")
        write_json_atomic(tmp / "census.json", {"kind": "activation-census", "fp16_max": 65504.0,
                                                "margin": recipe.margin, "compute": compute,
                                                "probes": held_out.probes, "components": census_table,
                                                "feeds": held_out.feeds})
        fp32_islands_report = {name: [{"module": i.module, "max_abs": i.max_abs, "why": i.why} for i in found]
                               for name, found in islands.items()}
        mixed_report = {"mixed": four_bit.mixed.to_dict()} if four_bit.mixed is not None else {}
        report = {
            "kind": "calibration-report", "toolkit": __version__, "model": source.describe(),
            "random_weights": source.random_weights, "inputs_hash": calib_hash,
            "reference": f"FP32 weights; loop compute {compute} on {torch_device}; per-component outputs FP32 "
                         "with TF32 off",
            "config": {"prompts_file": str(cfg.prompts_file), "prompts_sha256": sha256_file(cfg.prompts_file),
                       "num_prompts": cfg.num_prompts, "steps": cfg.steps, "seed": cfg.seed,
                       "components": list(cfg.components), "recipe": str(cfg.recipe_file),
                       "recipe_sha256": recipe.sha256, "height": cfg.height, "width": cfg.width,
                       "guidance": cfg.guidance, "batch": cfg.batch, "holdout": cfg.holdout, "dtype": cfg.dtype,
                       "compute_dtype": compute, "margin": recipe.margin, "shards": shard.world,
                       **({"awq_calls": cfg.awq_calls} if fmt in (Precision.INT4, Precision.MIXED) else {})},
            "quantizers": {"enabled": len(scales), "scales_sha256": hash_json({k: v.hex() for k, v in scales.items()})},
            "fp32_islands": fp32_islands_report,
            "fp16": {name: {**decisions[name].to_dict(), **fp16_checks[name]} for name in present},
            "t5": "t5" in present,
            "format": fmt.value,
            **({"layers": four_bit.layer_formats(pipe, cfg.components, recipe, islands)} if fmt is not Precision.FP8 else {}),
            **mixed_report,

            "components": {name: {"calls": len(traffic[name]), fmt.value: quant_checks[name]} for name in cfg.components},
            "end_to_end": end_to_end,
            "timings": {"calibration_seconds": round(calib_timing["seconds"], 2),
                        "total_seconds": round(time.perf_counter() - start, 2)},
            "device": torch_device, "host": platform.node(),
            "versions": package_versions("torch", "diffusers", "nvidia-modelopt"),
        }
        if torch_device.startswith("cuda"):
            report["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        write_json_atomic(tmp / "calibration.json", report)
        manifest = CalibrationManifest(
            inputs_hash=calib_hash, model=source.describe(), components=tuple(cfg.components), islands=islands,
            fp16=decisions, files=file_entries(tmp), reference=report["reference"], margin=recipe.margin, format=fmt,
            extra={"toolkit": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                   "probe_ranges": probe_ranges(cfg).to_dict(),
                   "recipe": str(cfg.recipe_file), "recipe_digest": recipe.calibration_digest,  # export checks its own
                   **mixed_report})
        write_json_atomic(tmp / "manifest.json", manifest.to_dict())
    return CalibrationResult(False, calib_hash, report, folder, time.perf_counter() - start)


def calibrate_networks(pipe: Any, cfg: CalibrationConfig, recipe: Recipe, prompts: list[str],
                       islands: dict[str, list[Island]] | None = None, *, compute: str = "fp32",
                       shard: Shard = SINGLE) -> tuple[Any, dict[str, float]]:
    """Insert ``cfg.format``'s quantizers into the requested networks (in place) and calibrate them on the pipeline's
    own loop over ``prompts`` (``reference.calibration_loop``: this shard's batches; ModelOpt merges the shards' amax
    with an all-reduce MAX). Returns the ModuleDict of networks and their scales, the same on every shard."""
    import modelopt.torch.quantization as mtq
    import torch

    networks = torch.nn.ModuleDict({SPECS[c].pipeline_attr: getattr(pipe, SPECS[c].pipeline_attr)
                                    for c in cfg.components})
    for name in cfg.components:
        recipe.check_patterns(name, [n for n, _ in getattr(pipe, SPECS[name].pipeline_attr).named_modules()])
    device = str(pipe._execution_device)
    torch.manual_seed(cfg.seed)

    forward_loop = calibration_loop(pipe, prompts, cfg, cfg.components, steps=cfg.steps, device=device, compute=compute, shard=shard,
                                    awq_calls=cfg.awq_calls if cfg.format is Precision.INT4 else None)
    with contextlib.redirect_stdout(sys.stderr):  # ModelOpt prints progress; stdout carries results only
        mtq.quantize(networks, recipe.quant_cfg(cfg.components, islands, dict(networks), cfg.format.value), forward_loop)
    scales = collect_scales(networks)
    bad = [k for k, v in scales.items() if not math.isfinite(v)]
    if bad:
        raise CalibrationError(f"calibration produced NaN/Inf scales for {len(bad)} quantizers (first: {bad[0]})",
                               path=cfg.prompts_file, hint="the model diverges on these prompts; check weights or --dtype")
    if not scales:
        raise CalibrationError("no quantizer was calibrated", path=cfg.recipe_file,
                               hint="the recipe excludes every module; loosen its exclude lists")
    digests = gather(shard, hash_json({k: v.hex() for k, v in sorted(scales.items())}))
    if len(set(digests)) > 1:  # ModelOpt's sync only warns when a collective fails; a partial merge is wrong
        raise CalibrationError(f"the {shard.world} shards hold different scales after ModelOpt's amax all-reduce",
                               hint="check the workers' warnings above; re-run with --shards 1")
    return networks, scales


def _quantize(pipe: Any, cfg: CalibrationConfig, recipe: Recipe, prompts: list[str], islands: dict[str, list[Island]],
              compute: str, shard: Shard, held_out: HeldOut | None,
              budget: tuple[Any, tuple[float, str]] | None) -> tuple[Any, dict[str, float], FourBitState]:
    """Step 3 in ``cfg.format``: ModelOpt's calibration (FP8, INT4 AWQ, or both for mixed) or NVFP4's layer list.
    Returns the quantized networks (None for NVFP4), their scales, and what a 4-bit format keeps."""
    fmt = cfg.format
    if fmt is Precision.NVFP4:  # weight-only FP4 is a function of the weights: nothing to run
        four_bit = FourBitState(nvfp4=nvfp4_layers(pipe, cfg.components, recipe, islands))
        return None, {name: 0.0 for layers in four_bit.nvfp4.values() for name in layers}, four_bit
    if fmt is not Precision.MIXED:
        quantized, scales = calibrate_networks(pipe, cfg, recipe, prompts, islands, compute=compute, shard=shard)
        return quantized, scales, FourBitState(int4=int4_layers_of(quantized) if fmt is Precision.INT4 else {})
    # mixed: INT4 AWQ on a copy of the transformer, then FP8 on the model itself; then the budget's choice on the
    # held-out traffic (producers.mixed)
    import copy

    assert held_out is not None and budget is not None  # mixed runs unsharded (rank 0 holds the held-out traffic)
    attr = SPECS["transformer"].pipeline_attr
    network = getattr(pipe, attr)
    device = next(network.parameters()).device
    spare = copy.deepcopy(network.to("cpu"))  # waits in host memory: a second FP32 Large would not fit an 80 GB GPU
    network.to(device)
    awq, _ = calibrate_networks(pipe, replace(cfg, format=Precision.INT4, max_transformer_gib=None), recipe, prompts,
                                islands, compute=compute)
    int4 = int4_layers_of(awq).get(attr, {})
    del awq, network
    setattr(pipe, attr, None)  # AWQ's network leaves the GPU before the spare arrives
    setattr(pipe, attr, spare.to(device))
    quantized, scales = calibrate_networks(pipe, replace(cfg, format=Precision.FP8, max_transformer_gib=None), recipe, prompts, islands,
                                           compute=compute)
    spec = SPECS["transformer"]
    module = spec.module(pipe)
    calls, refs = held_out.traffic["transformer"], held_out.references["transformer"]

    fp8_network = getattr(pipe, attr)

    def measure(layers: list[str]) -> float:  # the transformer's rel-L2 vs FP32 with `layers` INT4, mean over the calls
        with swapped(fp8_network, {n: int4[n] for n in layers}, "int4"):
            return check_calls(module, spec, calls, refs, Precision.MIXED)[spec.output_names[0]]["rel_l2_mean"]

    with log.step(f"mixed FP8/INT4: ranking {len(int4)} candidate layers on {len(calls)} held-out calls"), \
            ranking_compute(str(pipe._execution_device)) as ranked_in:
        plan = plan_mix(list(int4), budget[0], budget[1], measure, ranked_in)
    log.info(f"mixed FP8/INT4: {len(plan.chosen)} of {len(plan.delta)} layers INT4, transformer weights "
             f"{plan.bytes['mixed'] / 2**30:.4g} GiB (budget {plan.budget_gib:.4g}); held-out rel-L2 "
             f"{plan.error['fp8']:.3g} all FP8, {plan.error['mixed']:.3g} mixed, {plan.error['int4']:.3g} all INT4")
    return quantized, scales, FourBitState(int4={attr: {n: int4[n] for n in plan.chosen}}, mixed=plan)
