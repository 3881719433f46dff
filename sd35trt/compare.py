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

import contextlib
import math
import platform
import sys
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sd35trt import __version__, log
from sd35trt.errors import InvalidInputError
from sd35trt.metrics import aggregate, error_stats, psnr
from sd35trt.models import ModelSource
from sd35trt.specs import COMPONENTS, SPECS, Precision, vae_input

# Decoded-image PSNR an end-to-end variant must reach against diffusers FP32 (same seeds, random weights).
E2E_MIN_PSNR_DB = {Precision.FP32: 60.0, Precision.FP16: 30.0, Precision.FP8: 25.0}


@dataclass(frozen=True)
class CompareConfig:
    variants: tuple[str, ...] = ("fp32", "fp16", "fp8")
    components: tuple[str, ...] = COMPONENTS
    prompts: int = 2
    steps: int = 4
    height: int = 512
    width: int = 512
    guidance: float = 4.5
    seed: int = 0

    def __post_init__(self):
        bad = [v for v in self.variants if v not in ("fp32", "fp16", "fp8")]
        if bad:
            raise InvalidInputError(f"unknown variant(s) {', '.join(bad)}", hint="choose from fp32,fp16,fp8")
        if self.prompts < 1 or self.steps < 1:
            raise InvalidInputError("--prompts and --steps must be ≥ 1", hint="e.g. --prompts 2 --steps 4")


@dataclass
class CompareReport:
    data: dict[str, Any]
    passed: bool
    failures: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:  # truthy when every tolerance held (polygraphy's convention)
        return self.passed


VERBOSE = False  # `compare --verbose`: polygraphy's per-iteration log at INFO (always on stderr)


@contextlib.contextmanager
def polygraphy_quiet():
    """Polygraphy prints its log with print() (stdout, which carries results only): send it to stderr, at
    WARNING unless --verbose, without colour codes."""
    from polygraphy.logger import G_LOGGER

    old = G_LOGGER.module_severity
    G_LOGGER.module_severity = G_LOGGER.INFO if VERBOSE else G_LOGGER.WARNING
    G_LOGGER.colors = False
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        G_LOGGER.module_severity = old


def _poly_runner(runner: Any, name: str):
    """Any ComponentRunner as a polygraphy runner: PyTorch (polygraphy's PytRunner is CUDA-only and breaks
    on CPU) and TensorRT/RTX engines (our EngineRunner keeps the bundle's own buffers and CUDA graphs)."""
    from polygraphy.backend.base import BaseRunner
    from polygraphy.common import TensorMetadata

    spec = runner.spec

    class ComponentPolyRunner(BaseRunner):
        def __init__(self):
            super().__init__(name=name)

        def get_input_metadata_impl(self):
            meta = TensorMetadata()
            for tensor in spec.inputs:
                meta.add(tensor.name, dtype=np.dtype(tensor.dtype),
                         shape=tuple(-1 if isinstance(d, str) else d for d in tensor.shape))
            return meta

        def infer_impl(self, feed_dict):
            import torch

            start = time.perf_counter()
            out = runner(**{k: torch.from_numpy(np.asarray(v)) for k, v in feed_dict.items()})
            self.inference_time = time.perf_counter() - start  # polygraphy sums these per runner
            return OrderedDict((k, v.cpu().numpy()) for k, v in out.items())

    return ComponentPolyRunner()


def _ort_poly_runner(path: Path, name: str, provider: str):
    from polygraphy.backend.onnxrt import OnnxrtRunner

    from sd35trt.onnx_utils import ort_session

    return OnnxrtRunner(lambda: ort_session(path, provider=provider), name=name)


def polygraphy_trt_runner(plans: Path | list[Path], backend: str, name: str, outputs: Sequence[str] | None = None):
    """Polygraphy's own ``TrtRunner`` on a bundle's plan: the second, independent engine runner ``compare
    --bundle`` checks ours against. TensorRT-RTX bundles use polygraphy's RTX mode; where only the
    ``tensorrt_rtx_bindings`` module is installed (the PyPI wheels), it stands in for ``tensorrt_rtx``.
    Inputs are cast to the engine's input dtypes and outputs returned as float32, like ``EngineRunner``. A
    component built in parts is ``plans``, one per part, run back to back like ``runners.ChainRunner``, each fed
    the inputs its engine names from what the component's inputs and the earlier parts gave; ``outputs`` names
    what the chain returns."""
    import importlib
    import importlib.util

    import polygraphy.config as polygraphy_config
    from polygraphy.backend.base import BaseRunner

    if backend == "tensorrt-rtx":
        polygraphy_config.USE_TENSORRT_RTX = True  # read when its TensorRT module is first imported
        if importlib.util.find_spec("tensorrt_rtx") is None:
            sys.modules.setdefault("tensorrt_rtx", importlib.import_module("tensorrt_rtx_bindings"))
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    inners = [TrtRunner(EngineFromBytes(lambda path=path: path.read_bytes()), name=f"{name}:part{k}")
              for k, path in enumerate([plans] if isinstance(plans, Path) else plans)]

    class CastingTrtRunner(BaseRunner):
        def __init__(self):
            super().__init__(name=name)
            self.inners = inners

        def activate_impl(self):
            for inner in self.inners:
                inner.activate()

        def deactivate_impl(self):
            for inner in self.inners:
                inner.deactivate()

        def get_input_metadata_impl(self):
            return self.inners[0].get_input_metadata()

        def infer_impl(self, feed_dict):
            known, self.inference_time = dict(feed_dict), 0.0
            for inner in self.inners:
                meta = inner.get_input_metadata()
                feeds = OrderedDict((k, np.asarray(known[k]).astype(meta[k].dtype.numpy())) for k in meta)
                known.update((k, np.array(v)) for k, v in inner.infer(feeds).items())
                self.inference_time += inner.last_inference_time()
            names = outputs or tuple(k for k in known if k not in feed_dict)
            return OrderedDict((k, np.asarray(known[k], dtype=np.float32)) for k in names)

    return CastingTrtRunner()


ENGINE_AGREEMENT_REL_L2 = 1e-3  # our EngineRunner vs polygraphy's TrtRunner on one plan and the same inputs


def record_traffic(pipe: Any, prompts: list[str], cfg: CompareConfig) -> tuple[dict[str, list], Any]:
    """Run diffusers' pipeline on ``prompts``; return inputs per network and the final latents per prompt."""
    import torch

    from sd35trt.calibrate import TrafficRecorder

    recorder = TrafficRecorder(pipe, ("transformer", "clip_l", "clip_g", "t5"), limit=4 * cfg.steps)
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


def compare_components(pipe: Any, runners_by_variant: dict[str, dict[str, Any]], traffic: dict[str, list],
                       components: tuple[str, ...]) -> tuple[dict[str, Any], list[str]]:
    from polygraphy.comparator import Comparator, CompareFunc

    results: dict[str, Any] = {}
    failures = []
    for name in components:
        spec = SPECS[name]
        feeds = [{k: v.numpy() for k, v in call.items()} for call in traffic.get(name, [])]
        if not feeds:
            continue
        from sd35trt.runners import ChainRunner, EngineRunner, OrtRunner, TorchRunner

        poly_runners = [_poly_runner(TorchRunner(spec, pipe), f"torch-fp32:{name}")]
        precisions, twins = {}, {}
        for variant, runners in runners_by_variant.items():
            runner = runners.get(name)
            if runner is None:
                continue
            label = f"{variant}:{name}"
            poly_runners.append(_ort_poly_runner(runner.path, label, runner.provider) if isinstance(runner, OrtRunner)
                                else _poly_runner(runner, label))
            precisions[label] = Precision(runner.precision)
            engines = runner.parts if isinstance(runner, ChainRunner) else [runner]
            if all(isinstance(e, EngineRunner) for e in engines):  # the same plans through polygraphy's TrtRunner
                twin = f"{variant}-polygraphy:{name}"
                poly_runners.append(polygraphy_trt_runner([e.plan_path for e in engines], engines[0].backend, twin,
                                                          spec.output_names))
                precisions[twin], twins[label] = Precision(runner.precision), twin
        with log.step(f"polygraphy: {name} on {len(feeds)} real inputs ({', '.join(precisions)})"), polygraphy_quiet():
            run_results = Comparator.run(poly_runners, data_loader=feeds)
        reference_name = poly_runners[0].name
        reference = dict(run_results)[reference_name]
        entry = {}
        for runner_name, precision in precisions.items():
            tol = spec.tolerances[precision]
            candidate = dict(run_results)[runner_name]
            per_output = {}
            for out in spec.output_names:
                stats = aggregate([error_stats(r[out], c[out]) for r, c in zip(reference, candidate)], tol)
                per_output[out] = stats | {"tolerance": {"rel_l2": tol.rel_l2, "max_abs": tol.max_abs}}
                if not stats["passed"]:
                    failures.append(f"{runner_name} {out}: rel-L2 {stats['rel_l2_max']:.3e} > {tol.rel_l2:g} "
                                    "or max-abs too large")
            # polygraphy's own verdict on the mean element error, recorded beside ours
            sub = type(run_results)()
            sub.append((reference_name, reference))
            sub.append((runner_name, candidate))
            with polygraphy_quiet():
                accuracy = Comparator.compare_accuracy(
                    sub, compare_func=CompareFunc.simple(atol=tol.max_abs, rtol=tol.rel_l2, check_error_stat="mean"))
            entry[runner_name.split(":")[0]] = {"precision": precision.value, "outputs": per_output,
                                                "polygraphy_mean_error_passed": bool(accuracy)}
        for ours, theirs in twins.items():  # two independent runners of one engine must agree
            mine, other = dict(run_results)[ours], dict(run_results)[theirs]
            worst = max(error_stats(a[o], b[o]).rel_l2 for a, b in zip(mine, other) for o in spec.output_names)
            entry[ours.split(":")[0]]["agrees_with_polygraphy_trt_rel_l2"] = worst
            if not worst <= ENGINE_AGREEMENT_REL_L2:
                failures.append(f"{ours}: sd35trt's EngineRunner and polygraphy's TrtRunner differ on the same engine "
                                f"(rel-L2 {worst:.3e} > {ENGINE_AGREEMENT_REL_L2:g})")
        results[name] = entry
    return results, failures


def compare_end_to_end(pipe: Any, runners_by_variant: dict[str, dict[str, Any]], prompts: list[str],
                       ref_latents: list, cfg: CompareConfig, ranges: Any) -> tuple[dict[str, Any], list[str], dict]:
    import torch

    from sd35trt.pipeline import GenerateRequest, Sd35Loop

    vae = pipe.vae
    with torch.no_grad():
        ref_images = [vae.decode(vae_input(lat, vae.config), return_dict=False)[0] for lat in ref_latents]
    results, failures, images = {}, [], {"reference": ref_images}
    for variant, runners in runners_by_variant.items():
        loop = Sd35Loop(pipe, runners, ranges, batch_text=False)
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
        precision = Precision(runners["transformer"].precision)
        floor = E2E_MIN_PSNR_DB[precision]
        worst = min(e["image_psnr_db"] for e in entries)
        passed = worst >= floor
        if not passed:
            failures.append(f"end-to-end {variant}: image PSNR {worst:.1f} dB < {floor:g} dB")
        results[variant] = {"transformer_precision": precision.value, "runners": {k: r.describe() for k, r in runners.items()},
                            "prompts": entries, "min_image_psnr_db": worst, "required_db": floor, "passed": passed}
        images[variant] = variant_images
    return results, failures, images


DIFF_GAIN = 8.0  # amplification of |candidate - reference| in compare.png's difference columns


def save_grid(path: Path, images: dict[str, list], e2e: dict[str, Any]) -> None:
    """compare.png: one row per prompt; the reference, then per variant its image and |variant − reference|
    amplified ×8 (black = identical), each tile captioned."""
    from PIL import Image, ImageDraw

    variants = [n for n in images if n != "reference"]
    columns = ["reference"] + [c for v in variants for c in (v, f"{v}:diff")]
    rows = len(images["reference"])
    tile = 256
    grid = Image.new("RGB", (tile * len(columns), (tile + 20) * rows), "white")
    draw = ImageDraw.Draw(grid)
    for col, name in enumerate(columns):
        for row in range(rows):
            ref = images["reference"][row][0].float().clamp(-1, 1)
            if name.endswith(":diff"):
                variant = name[: -len(":diff")]
                diff = (images[variant][row][0].float().clamp(-1, 1) - ref).abs() / 2 * DIFF_GAIN
                array = (diff.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
                label = f"|{variant} - ref| x{DIFF_GAIN:g}"
            else:
                image = ref if name == "reference" else images[name][row][0].float().clamp(-1, 1)
                array = ((image + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
                label = "diffusers fp32 (reference)" if name == "reference" else \
                    f"{name}: {e2e[name]['prompts'][row]['image_psnr_db']:.1f} dB"
            grid.paste(Image.fromarray(array).resize((tile, tile)), (col * tile, row * (tile + 20) + 20))
            draw.text((col * tile + 4, row * (tile + 20) + 4), label, fill="black")
    tmp = path.with_suffix(".tmp.png")
    grid.save(tmp)
    tmp.replace(path)


def run_compare(source: ModelSource, out: Path, cfg: CompareConfig, prompts: list[str],
                runners_by_variant: dict[str, dict[str, Any]], ranges: Any, candidate_label: str,
                missing: dict[str, str] | None = None) -> CompareReport:
    """Compare ``runners_by_variant`` (ONNX variants, or one engine bundle) with diffusers/PyTorch FP32."""
    from sd35trt.artifacts import write_json_atomic
    from sd35trt.models import build_pipeline

    pipe = build_pipeline(source, device="cpu")
    pipe.set_progress_bar_config(disable=True)
    for spec in SPECS.values():  # text encoders run with the exported (eager) attention on both sides
        spec.module(pipe)
    start = time.perf_counter()
    with log.step(f"reference: diffusers StableDiffusion3Pipeline on {len(prompts)} prompts × {cfg.steps} steps"):
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
        "reference": "diffusers StableDiffusion3Pipeline, FP32, CPU", "components": per_component, "end_to_end": e2e,
        "passed": not failures, "failures": failures, "missing": missing or {},
        "seconds": round(time.perf_counter() - start, 1),
        "host": platform.node(), "executed_with": sorted(kinds),
    }
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "compare.json", data)
    save_grid(out / "compare.png", images, e2e)
    return CompareReport(data, not failures, failures)


def onnx_variants(onnx_root: Path, variants: tuple[str, ...],
                  provider: str = "cpu") -> tuple[dict[str, dict[str, Any]], Any, dict[str, str]]:
    """onnxruntime runners for every requested variant the work dir has; the others, with why, in ``missing``."""
    from sd35trt.errors import ArtifactError
    from sd35trt.runners import runners_from_onnx

    runners_by_variant, ranges, missing = {}, None, {}
    for variant in variants:
        try:
            runners, found_ranges = runners_from_onnx(onnx_root, variant, provider=provider)
        except ArtifactError as err:
            if "no " not in err.what:
                raise
            missing[variant] = err.what
            continue
        if variant == "fp8" and not any(r.precision == "fp8" for r in runners.values()):
            missing[variant] = "no fp8 ONNX for any component (run `sd35trt calibrate`, then `sd35trt export`)"
            continue
        runners_by_variant[variant], ranges = runners, found_ranges
    if not runners_by_variant:
        raise ArtifactError(f"nothing to compare: {'; '.join(missing.values())}", path=onnx_root,
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
        lines.append(f"end to end {variant:<5} (transformer {v['transformer_precision']}): image PSNR {psnrs} dB "
                     f"(need ≥ {v['required_db']:g}) {'ok' if v['passed'] else 'FAILED'}")
    for variant, why in data.get("missing", {}).items():
        lines.append(f"not compared {variant}: {why}")
    lines.append("PASSED" if data["passed"] else "FAILED: " + "; ".join(data["failures"]))
    return "\n".join(lines)
