"""At real size: inject an activation outlier into one MMDiT block and show the census choosing it as an FP32
island by itself (the recipe's known sites switched off), and FP16 failing without it and passing with it.

    python bench/outlier_census.py --model sd3.5-large --block 35 --out outlier.json

The outlier is the one tests/outliers.py injects into the tiny model: the image feed-forward's hidden
activation scaled past FP16's 65504 (``ff.net.0.proj`` × K, ``ff.net.2`` ÷ K), the block's output unchanged
in range. Uses the library's own pieces (census, plan_islands, the FP16 decision) on the real pipeline loop
in BF16 compute with FP32 weights, as ``sd35trt calibrate`` runs them. Random weights (no hub here).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from sd35trt.core.host import computing, strict_fp32
from sd35trt.core.models import build_pipeline, resolve_model
from sd35trt.core.numerics import ActivationCensus, plan_islands
from sd35trt.core.prompts import read_prompts
from sd35trt.core.specs import SPECS
from sd35trt.core.traffic import TrafficRecorder, spread
from sd35trt.producers.calibrate import CalibrationConfig
from sd35trt.producers.reference import fp16_decision, run_module, run_pipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sd3.5-large")
    parser.add_argument("--block", type=int, default=35)
    parser.add_argument("--scale", type=float, default=1e5)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    strict_fp32()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    compute = "bf16" if device == "cuda" else "fp32"
    start = time.perf_counter()
    pipe = build_pipeline(resolve_model(args.model), device=device, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    block = pipe.transformer.transformer_blocks[args.block]
    with torch.no_grad():
        block.ff.net[0].proj.weight.mul_(args.scale)
        block.ff.net[0].proj.bias.mul_(args.scale)
        block.ff.net[2].weight.div_(args.scale)
    spec = SPECS["transformer"]
    cfg = CalibrationConfig(steps=args.steps, height=args.size, width=args.size, batch=1)
    prompt = read_prompts(cfg.prompts_file, 1)[-1:]
    census = ActivationCensus({"transformer": pipe.transformer})
    recorder = TrafficRecorder(pipe, ("transformer",))
    with computing(device, compute):
        run_pipeline(pipe, prompt, cfg, seed=0, steps=args.steps)
    recorder.close()
    census.close()
    table = census.result()["transformer"]
    calls = spread(recorder.calls["transformer"], 2)
    refs = [run_module(spec.module(pipe), spec, call) for call in calls]
    names = [n for n, _ in pipe.transformer.named_modules()]
    islands = plan_islands(table, names, margin=2.0**14, upcast=(), units=spec.island_units)  # census only
    checks, decision = fp16_decision(pipe, "transformer", calls, refs, islands, table)
    result = {
        "model": args.model, "random_weights": True, "injected": f"transformer_blocks.{args.block}.ff x{args.scale:g}",
        "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "compute": compute,
        "prompt": prompt, "steps": args.steps, "size": args.size,
        "islands_chosen_by_census": [i.to_dict() for i in islands],
        "census_top5": dict(list(table.items())[:5]),
        "fp16_without_islands": checks.get("without_islands"),
        "fp16_with_islands": checks["with_islands"], "fp16_decision": decision.to_dict(),
        "seconds": round(time.perf_counter() - start, 1),
        "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else None,
    }
    with open(args.out, "w", encoding="utf-8") as handle:
        json.dump(result, handle, indent=2, default=str)
    print(json.dumps({k: result[k] for k in ("islands_chosen_by_census", "fp16_decision", "seconds", "peak_gpu_gib")},
                     indent=2, default=str))


if __name__ == "__main__":
    main()
