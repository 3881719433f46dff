"""Should the final ``proj_out`` be FP8? Measure both recipes on real denoising traffic (issue: the two
NVIDIA recipes disagree). For each variant: a fresh pipeline (same seeded weights), calibrate the
transformer on N prompts × S steps, then on held-out prompts compare the fake-quant transformer with the
unquantized one call by call (rel-L2 per step) and the final latents end to end (PSNR, data range = ref).

usage: python bench/proj_out.py --model tiny --out bench/results/proj_out-tiny.json [--prompts 16 --steps 4]
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import torch

from sd35trt.core.metrics import error_stats, psnr
from sd35trt.core.models import build_pipeline, resolve_model
from sd35trt.core.prompts import DEFAULT_PROMPTS, read_prompts
from sd35trt.core.specs import SPECS
from sd35trt.core.traffic import TrafficRecorder
from sd35trt.producers.calibrate import CalibrationConfig, calibrate_networks
from sd35trt.producers.recipe import DEFAULT_RECIPE, Recipe
from sd35trt.producers.reference import run_pipeline


def variant(model: str, recipe_path: Path, cfg: CalibrationConfig, prompts: list[str], holdout: list[str],
            device: str, dtype: torch.dtype) -> dict:
    pipe = build_pipeline(resolve_model(model), device=device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    spec = SPECS["transformer"]
    recorder = TrafficRecorder(pipe, ("transformer",))
    ref_latents = run_pipeline(pipe, holdout, cfg, seed=cfg.seed + 10_000, steps=cfg.steps)
    recorder.close()
    module = spec.module(pipe)

    def outputs():
        with torch.no_grad():
            return [module(*[c[n].to(device, dtype) for n in spec.input_names]).float().cpu()
                    for c in recorder.calls["transformer"]]

    reference = outputs()
    start = time.perf_counter()
    _, scales = calibrate_networks(pipe, cfg, Recipe.load(recipe_path), prompts)
    seconds = time.perf_counter() - start
    quantized = outputs()
    per_step = [error_stats(r.numpy(), q.numpy()).rel_l2 for r, q in zip(reference, quantized)]
    latents = run_pipeline(pipe, holdout, cfg, seed=cfg.seed + 10_000, steps=cfg.steps)
    value_range = float(ref_latents.max() - ref_latents.min())
    return {"quantizers": len(scales), "calibration_seconds": round(seconds, 1),
            "rel_l2_per_step_mean": sum(per_step) / len(per_step), "rel_l2_per_step_max": max(per_step),
            "latent_psnr_db": psnr(ref_latents.numpy(), latents.numpy(), data_range=value_range),
            "latent_rel_l2": error_stats(ref_latents.numpy(), latents.numpy()).rel_l2}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--out", required=True)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--holdout", type=int, default=4)
    parser.add_argument("--size", type=int, default=512)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    cfg = CalibrationConfig(num_prompts=args.prompts, steps=args.steps, height=args.size, width=args.size,
                            holdout=args.holdout, batch=4)
    all_prompts = read_prompts(DEFAULT_PROMPTS, args.prompts + args.holdout)
    prompts, holdout = all_prompts[: args.prompts], all_prompts[args.prompts: args.prompts + args.holdout]
    text = DEFAULT_RECIPE.read_text()
    assert '  "proj_out",\n' in text, "the shipped recipe lists proj_out as its own line"
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        quantized_recipe = Path(tmp) / "fp8.toml"
        quantized_recipe.write_text(text.replace('  "proj_out",\n', ""))
        for name, path in (("proj_out_fp8", quantized_recipe), ("proj_out_high_precision", DEFAULT_RECIPE)):
            results[name] = variant(args.model, path, cfg, prompts, holdout, device, dtype)
            print(name, json.dumps(results[name]), flush=True)
    report = {"model": args.model, "random_weights": True, "device": device, "dtype": str(dtype),
              "prompts": args.prompts, "steps": args.steps, "holdout": args.holdout, "size": args.size,
              "date": time.strftime("%Y-%m-%d"), "variants": results}
    Path(args.out).write_text(json.dumps(report, indent=2, default=lambda v: None if not math.isfinite(v) else v))


if __name__ == "__main__":
    main()
