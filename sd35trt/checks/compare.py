"""``sd35trt compare``: per-component (polygraphy) and end-to-end comparison with the PyTorch reference.

1. Real traffic: diffusers' ``StableDiffusion3Pipeline`` (FP32 weights) runs K prompts; the inputs every
   network sees are recorded (the VAE's from the final latents).
2. Per component and precision variant: polygraphy's ``Comparator.run`` runs the PyTorch module (a small
   polygraphy runner of ours: the stock ``PytRunner`` is CUDA-only) and onnxruntime on those inputs, then
   ``Comparator.compare_accuracy`` with the spec's tolerance, plus rel-L2 / max-abs / cosine of our own.
3. End to end: the sd35trt loop over each variant's runners vs the diffusers pipeline on the same seeds:
   final latents and decoded images (PSNR, max-abs).
Results: ``compare.json``, a table, ``compare.png`` (reference vs candidates), and ``passed``.
"""

from __future__ import annotations

import math
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from sd35trt import __version__
from sd35trt.checks.polygraphy_runners import component_poly_runner, engine_twin, ort_poly_runner, polygraphy_quiet
from sd35trt.core import log
from sd35trt.core.errors import InvalidInputError, check_choice, check_seed
from sd35trt.core.metrics import aggregate, error_stats, psnr
from sd35trt.core.models import ModelSource
from sd35trt.core.specs import ARTIFACT_PRECISIONS, COMPONENTS, SPECS, Precision, pipeline_attrs, vae_input
from sd35trt.core.wrappers import eager_text_attention

if TYPE_CHECKING:
    from sd35trt.runtime.launch import LoopOptions

# Decoded-image PSNR an end-to-end variant must reach against diffusers FP32 (same seeds, random weights).
# 4-bit weights drift further over the denoising loop than FP8's: their floor is 5 dB lower; INT8 weights (FP16
# activations) share FP8's (set by judgement, not yet measured on real SD3.5 weights: random weights are all this
# project has).
E2E_MIN_PSNR_DB = {Precision.FP32: 60.0, Precision.FP16: 30.0, Precision.FP8: 25.0, Precision.INT8: 25.0,
                   Precision.INT4: 20.0, Precision.NVFP4: 20.0, Precision.MIXED: 20.0}


# The ONNX variants compare runs in onnxruntime (every artifact precision but NVFP4, which it has no kernel for).
COMPARED_VARIANTS = ("fp32", "fp16", "int8", "fp8", "int4", "mixed")


@dataclass(frozen=True)
class CompareConfig:
    variants: tuple[str, ...] = ()  # ONNX variants to compare; () = every variant the work dir has
    components: tuple[str, ...] = COMPONENTS
    prompts: int = 2
    steps: int = 4
    height: int = 512
    width: int = 512
    guidance: float = 4.5
    seed: int = 0
    t5: bool = True  # False: CLIP-only, against diffusers' own pipeline with text_encoder_3=None
    device: str = "auto"  # where the FP32 reference runs: auto (the GPU when there is one) | cpu | cuda

    def __post_init__(self):
        bad = [v for v in self.variants if v not in COMPARED_VARIANTS]
        if bad:
            raise InvalidInputError(f"unknown variant(s) {', '.join(bad)}", hint=f"choose from {','.join(COMPARED_VARIANTS)} "
                                    "(onnxruntime has no FP4 kernel: NVFP4 is compared through its engines)")
        if self.prompts < 1 or self.steps < 1:
            raise InvalidInputError("--prompts and --steps must be ≥ 1", hint="e.g. --prompts 2 --steps 4")
        from sd35trt.core.host import DEVICES

        check_choice("--device", self.device, DEVICES)
        check_seed(self.seed)


@dataclass
class CompareReport:
    data: dict[str, Any]
    passed: bool
    failures: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:  # truthy when every tolerance held (polygraphy's convention)
        return self.passed


ENGINE_AGREEMENT_REL_L2 = 1e-3  # our engine session vs polygraphy's TrtRunner on one plan and the same inputs


def record_traffic(pipe: Any, prompts: list[str], cfg: CompareConfig) -> tuple[dict[str, list], Any]:
    """Run diffusers' pipeline on ``prompts``; return inputs per network and the final latents per prompt."""
    import torch

    from sd35trt.core.traffic import TrafficRecorder

    encoders = ("clip_l", "clip_g", "t5") if pipe.text_encoder_3 is not None else ("clip_l", "clip_g")
    recorder = TrafficRecorder(pipe, ("transformer", *encoders), limit=4 * cfg.steps)
    latents = []
    for i, prompt in enumerate(prompts):
        out = pipe(prompt=prompt, negative_prompt="", num_inference_steps=cfg.steps, guidance_scale=cfg.guidance,
                   height=cfg.height, width=cfg.width, generator=torch.Generator("cpu").manual_seed(cfg.seed + i),
                   output_type="latent")
        latents.append(out.images.float().cpu())
    recorder.close()
    vae = pipe.vae
    traffic = dict(recorder.calls)
    traffic["vae_decoder"] = [{"latent": vae_input(lat, vae.config)} for lat in latents]
    return traffic, latents


def _variant_rows(runners_by_variant: dict[str, dict[str, Any]], name: str) -> list[tuple[str, Any]]:
    """(row label, runner) pairs to compare for one component. An ONNX variant counts only where the component
    really has it: an "fp8" run's FP16 text encoder is not an FP8 row. That FP16 runner is compared once, as an
    "fp16" row, when no "fp16" variant has the component (a default FP8 work dir exports no FP16 transformer, so
    its "fp16" variant is missing, yet the FP16 encoders and decoder it ships are compared)."""
    precisions = {p.value for p in ARTIFACT_PRECISIONS}
    rows = [(variant, runners[name]) for variant, runners in runners_by_variant.items()
            if name in runners and (variant not in precisions or runners[name].precision == variant)]
    for variant, runners in runners_by_variant.items():
        runner = runners.get(name)
        if runner is not None and variant in precisions and all(label != runner.precision for label, _ in rows):
            rows.append((runner.precision, runner))
    return rows


def compare_components(pipe: Any, runners_by_variant: dict[str, dict[str, Any]], traffic: dict[str, list],
                       components: tuple[str, ...]) -> tuple[dict[str, Any], list[str]]:
    from polygraphy.comparator import Comparator

    from sd35trt.runtime.runners import TorchRunner

    results: dict[str, Any] = {}
    failures: list[str] = []
    for name in components:
        spec = SPECS[name]
        feeds = [{k: v.numpy() for k, v in call.items()} for call in traffic.get(name, [])]
        rows = _variant_rows(runners_by_variant, name)
        if not feeds or not rows:
            continue
        reference = component_poly_runner(TorchRunner(spec, pipe), f"torch-fp32:{name}")
        candidates = _candidate_runners(name, rows)
        poly_runners = [reference, *(c.runner for c in candidates), *(c.twin for c in candidates if c.twin is not None)]
        labels = ", ".join(c.runner.name for c in candidates) + "".join(
            f", {c.twin.name}" for c in candidates if c.twin is not None)
        with log.step(f"polygraphy: {name} on {len(feeds)} real inputs ({labels})"), polygraphy_quiet():
            run_results = Comparator.run(poly_runners, data_loader=feeds)
        outputs = dict(run_results)
        entry = {}
        for candidate in candidates:
            for poly in (candidate.runner, candidate.twin):
                if poly is not None:  # the engine's polygraphy twin is a row of its own ("fp8-polygraphy")
                    row, row_failures = _accuracy_row(spec, run_results, reference.name, poly.name, candidate)
                    entry[poly.name.split(":")[0]], failures = row, failures + row_failures
            row = entry[candidate.variant]
            if candidate.twin is not None:  # two independent runners of one engine must agree
                worst = max(error_stats(a[o], b[o]).rel_l2 for a, b in
                            zip(outputs[candidate.runner.name], outputs[candidate.twin.name]) for o in spec.output_names)
                row["agrees_with_polygraphy_trt_rel_l2"] = worst
                if not worst <= ENGINE_AGREEMENT_REL_L2:
                    failures.append(f"{candidate.runner.name}: sd35trt's engine session and polygraphy's TrtRunner "
                                    f"differ on the same engine (rel-L2 {worst:.3e} > {ENGINE_AGREEMENT_REL_L2:g})")
        results[name] = entry
    return results, failures


@dataclass
class _Candidate:
    """One variant's polygraphy runner for a component, where it runs, and its TrtRunner twin (engines only)."""

    variant: str
    precision: Precision
    device: str
    runner: Any
    twin: Any | None


def _candidate_runners(name: str, rows: list[tuple[str, Any]]) -> list[_Candidate]:
    from sd35trt.runtime.runners import SessionRunner

    found = []
    for variant, runner in rows:
        label = f"{variant}:{name}"
        onnx = runner.kind == "onnxruntime" and isinstance(runner, SessionRunner)
        # an ONNX runner's polygraphy twin runs where the runner's own session was opened, loaded or not
        poly = ort_poly_runner(runner.onnx, label, runner.device) if onnx else component_poly_runner(runner, label)
        found.append(_Candidate(variant, runner.precision, runner.device, poly,
                                engine_twin(runner, f"{variant}-polygraphy:{name}")))
    return found


def _accuracy_row(spec: Any, run_results: Any, reference_name: str, runner_name: str,
                  candidate: _Candidate) -> tuple[dict, list[str]]:
    """One runner against the reference: our error statistics per output against the component's tolerance for
    the candidate's precision, and polygraphy's own verdict on the mean element error beside them."""
    from polygraphy.comparator import Comparator, CompareFunc

    tol = spec.tolerances[candidate.precision]
    outputs = dict(run_results)
    reference, produced = outputs[reference_name], outputs[runner_name]
    per_output, failures = {}, []
    for out in spec.output_names:
        stats = aggregate([error_stats(r[out], c[out]) for r, c in zip(reference, produced)], tol)
        per_output[out] = stats | {"tolerance": {"rel_l2": tol.rel_l2, "max_abs": tol.max_abs}}
        if not stats["passed"]:
            failures.append(f"{runner_name} {out}: rel-L2 {stats['rel_l2_max']:.3e} > {tol.rel_l2:g} "
                            "or max-abs too large")
    pair = type(run_results)()
    pair.append((reference_name, reference))
    pair.append((runner_name, produced))
    with polygraphy_quiet():
        accuracy = Comparator.compare_accuracy(
            pair, compare_func=CompareFunc.simple(atol=tol.max_abs, rtol=tol.rel_l2, check_error_stat="mean"))
    return {"precision": candidate.precision.value, "device": candidate.device, "outputs": per_output,
            "polygraphy_mean_error_passed": bool(accuracy)}, failures


def compare_end_to_end(pipe: Any, runners_by_variant: dict[str, dict[str, Any]], prompts: list[str],
                       ref_latents: list, cfg: CompareConfig, ranges: Any) -> tuple[dict[str, Any], list[str], dict]:
    import torch

    from sd35trt.core.assets import PipelineAssets
    from sd35trt.runtime.pipeline import Sd35Loop
    from sd35trt.runtime.request import GenerateRequest

    vae = pipe.vae
    with torch.no_grad():
        ref_images = [vae.decode(vae_input(lat.to(vae.device, vae.dtype), vae.config), return_dict=False)[0].float().cpu()
                      for lat in ref_latents]
    assets = PipelineAssets.of_pipeline(pipe)
    results, failures, images = {}, [], {"reference": ref_images}
    for variant, runners in runners_by_variant.items():
        loop = Sd35Loop(assets, runners, ranges, batch_text=False)
        entries, variant_images = [], []
        for i, prompt in enumerate(prompts):
            request = GenerateRequest(prompt=prompt, negative_prompt="", steps=cfg.steps, guidance=cfg.guidance,
                                      seed=cfg.seed + i, height=cfg.height, width=cfg.width)
            out = loop(request, progress=False)
            ref, cand = ref_latents[i].numpy(), out.latents.numpy()
            image_psnr = psnr(ref_images[i].numpy(), out.images.numpy(), data_range=2.0)
            entries.append({"prompt": prompt, "latents": error_stats(ref, cand).to_dict(),
                            "latent_psnr_db": psnr(ref, cand, data_range=float(ref.max() - ref.min())),
                            "image_psnr_db": image_psnr,
                            "image_max_abs": float(np.abs(ref_images[i].numpy() - out.images.numpy()).max())})
            variant_images.append(out.images)
        # The precision of the transformer decides the variant's bar (FP8 variants keep FP16 elsewhere).
        precision = runners["transformer"].precision
        floor = E2E_MIN_PSNR_DB[precision]
        worst = min(e["image_psnr_db"] for e in entries)
        passed = worst >= floor
        if not passed:
            failures.append(f"end-to-end {variant}: image PSNR {worst:.1f} dB < {floor:g} dB")
        results[variant] = {"transformer_precision": precision.value, "runners": {k: r.describe() for k, r in runners.items()},
                            "t5": "t5" in runners, "prompts": entries, "min_image_psnr_db": worst, "required_db": floor,
                            "passed": passed}
        images[variant] = variant_images
    return results, failures, images


def _device_name(device: str) -> str:
    if device != "cuda":
        return "the CPU"
    import torch

    return torch.cuda.get_device_name(0)


def diff_gain(diff: Any) -> float:
    """How much compare.png amplifies |candidate − reference| so the difference is visible: its 99.9th
    percentile maps to full white (at least ×1; identical images stay black)."""
    import torch

    flat = diff.flatten().float()
    top = float(torch.quantile(flat[:: max(1, flat.numel() // 1_000_000)], 0.999)) if flat.numel() else 0.0
    return 1.0 if top <= 0 else float(min(1e6, max(1.0, 1.0 / top)))


def save_grid(path: Path, images: dict[str, list], e2e: dict[str, Any], prompts: list[str] | None = None) -> None:
    """compare.png: one row per prompt (its text above the row); the reference, then per variant its image and
    |variant − reference| amplified to the visible range (the factor is printed on the tile; black = identical)."""
    from PIL import Image, ImageDraw

    variants = [n for n in images if n != "reference"]
    columns = ["reference"] + [c for v in variants for c in (v, f"{v}:diff")]
    rows = len(images["reference"])
    tile, caption, header = 256, 20, 18
    grid = Image.new("RGB", (tile * len(columns), (tile + caption + header) * rows), "white")
    draw = ImageDraw.Draw(grid)
    for row in range(rows):
        top = row * (tile + caption + header)
        text = (prompts or [""] * rows)[row]
        draw.text((4, top + 3), f"prompt {row + 1}: {text[:140]}", fill="black")
        for col, name in enumerate(columns):
            ref = images["reference"][row][0].float().clamp(-1, 1)
            if name.endswith(":diff"):
                variant = name[: -len(":diff")]
                diff = (images[variant][row][0].float().clamp(-1, 1) - ref).abs() / 2
                gain = diff_gain(diff)
                array = ((diff * gain).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
                label = f"|{variant} - ref| x{gain:.0f}"
            else:
                image = ref if name == "reference" else images[name][row][0].float().clamp(-1, 1)
                array = ((image + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
                label = "diffusers fp32 (reference)" if name == "reference" else \
                    f"{name}: {e2e[name]['prompts'][row]['image_psnr_db']:.1f} dB"
            grid.paste(Image.fromarray(array).resize((tile, tile)), (col * tile, top + header + caption))
            draw.text((col * tile + 4, top + header + 4), label, fill="black")
    import io

    from sd35trt.core.artifacts import write_bytes_atomic

    buffer = io.BytesIO()
    grid.save(buffer, format="PNG")
    write_bytes_atomic(path, buffer.getvalue())


def run_compare(source: ModelSource, out: Path, cfg: CompareConfig, prompts: list[str],
                runners_by_variant: dict[str, dict[str, Any]], ranges: Any, candidate_label: str,
                missing: dict[str, str] | None = None) -> CompareReport:
    """Compare ``runners_by_variant`` (ONNX variants, or one engine bundle) with diffusers/PyTorch FP32 (CLIP-only
    runners against diffusers' own pipeline without T5)."""
    from sd35trt.core.artifacts import write_json_atomic
    from sd35trt.core.host import pick_device, strict_fp32
    from sd35trt.core.models import build_pipeline

    t5 = cfg.t5 and all("t5" in r for r in runners_by_variant.values())
    device = pick_device(cfg.device)
    strict_fp32()  # the reference is FP32: no TF32 in cuBLAS or cuDNN
    pipe = build_pipeline(source, device=device, components=pipeline_attrs(t5))
    pipe.set_progress_bar_config(disable=True)
    eager_text_attention(pipe)  # text encoders run with the exported (eager) attention on both sides
    runners_by_variant = {v: {k: r for k, r in runners.items() if t5 or k != "t5"} for v, runners in runners_by_variant.items()}
    start = time.perf_counter()
    label = "StableDiffusion3Pipeline" + ("" if t5 else " with text_encoder_3=None")
    with log.step(f"reference: diffusers {label} on {len(prompts)} prompts × {cfg.steps} steps"):
        traffic, ref_latents = record_traffic(pipe, prompts, cfg)
    per_component, failures = compare_components(pipe, runners_by_variant, traffic, cfg.components)
    with log.step("end to end: sd35trt loop vs diffusers"):
        e2e, e2e_failures, images = compare_end_to_end(pipe, runners_by_variant, prompts, ref_latents, cfg, ranges)
    failures += e2e_failures
    kinds = {r.kind for runners in runners_by_variant.values() for r in runners.values()}
    data = {
        "kind": "compare", "toolkit": __version__, "model": source.describe(), "random_weights": source.random_weights,
        "candidate": candidate_label,
        "config": cfg.__dict__ | {"variants": list(runners_by_variant), "components": list(cfg.components)},
        "reference": f"diffusers {label}, FP32 weights and compute"
                     + (" (TF32 off)" if device == "cuda" else "") + f", on {_device_name(device)}",
        "reference_device": device, "t5": t5, "components": per_component, "end_to_end": e2e,
        "passed": not failures, "failures": failures, "missing": missing or {},
        "seconds": round(time.perf_counter() - start, 1),
        "host": platform.node(), "executed_with": sorted(kinds),
    }
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "compare.json", data)
    save_grid(out / "compare.png", images, e2e, prompts)
    return CompareReport(data, not failures, failures)


def onnx_variants(options: LoopOptions, variants: tuple[str, ...],
                  source: ModelSource | None = None) -> tuple[dict[str, dict[str, Any]], Any, dict[str, str]]:
    """onnxruntime runners for each variant asked for (none named: every variant the ``--onnx`` work dir of
    ``options`` has), each opened as generate would open it (``open_runners`` with ``--precision VARIANT``, checked
    to be built from ``source``); a
    variant asked for but absent is listed in ``missing`` with why. An "fp8" variant runs FP8 where a component was
    calibrated and FP16 elsewhere (as an FP8 engine bundle does)."""
    from dataclasses import replace

    from sd35trt.core.errors import ArtifactError, VariantMissingError
    from sd35trt.core.manifests import WorkDir
    from sd35trt.runtime.launch import open_runners

    onnx_root = options.onnx
    if onnx_root is None or not onnx_root.is_dir():
        raise InvalidInputError("ONNX directory not found", path=onnx_root, hint="pass the --out of export/calibrate")
    work = WorkDir(onnx_root)
    present = [v for v in COMPARED_VARIANTS if work.variant(Precision(v)).is_dir()]
    asked = variants or tuple(present)
    runners_by_variant, ranges, missing = {}, None, {}
    for variant in asked:
        try:
            found = open_runners(replace(options, precision=variant), built_from=source)
        except VariantMissingError as err:
            missing[variant] = f"{err.what} ({err.hint})" if err.hint else err.what
            continue
        runners_by_variant[variant], ranges = found.runners, found.ranges
    if not runners_by_variant:
        raise ArtifactError(f"nothing to compare: {'; '.join(missing.values()) or 'no ONNX'}", path=onnx_root,
                            hint="run `sd35trt calibrate` then `sd35trt export` with this --out first (`--precision fp32` for FP32)")
    return runners_by_variant, ranges, missing


def format_compare(data: dict[str, Any]) -> str:
    lines = [f"{'component':<12} {'variant':<6} {'prec':<5} {'output':<18} {'rel-L2 max':>11} {'max-abs':>9} {'ok':>4}"]
    for name, entry in data["components"].items():
        for variant, v in entry.items():
            for out, s in v["outputs"].items():
                lines.append(f"{name:<12} {variant:<6} {v['precision']:<5} {out:<18} {s['rel_l2_max']:>11.3e} "
                             f"{s['max_abs']:>9.3g} {'yes' if s['passed'] else 'NO':>4}")
    for variant, v in data["end_to_end"].items():
        psnrs = ", ".join(f"{e['image_psnr_db']:.1f}" if math.isfinite(e["image_psnr_db"]) else "inf" for e in v["prompts"])
        mix = ", ".join(f"{k} {r['precision']}" for k, r in v["runners"].items())
        lines.append(f"end to end {variant:<5} ({mix}{'' if v.get('t5', True) else '; no T5'}): image PSNR {psnrs} dB "
                     f"(need ≥ {v['required_db']:g}) {'ok' if v['passed'] else 'FAILED'}")
    for variant, why in data.get("missing", {}).items():
        lines.append(f"not compared {variant}: {why}")
    lines.append("PASSED" if data["passed"] else "FAILED: " + "; ".join(data["failures"]))
    return "\n".join(lines)
