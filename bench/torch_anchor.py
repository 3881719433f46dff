"""PyTorch anchor on the GPU: SD3.5 transformer step latency at 1024x1024, batch 2 (one image with CFG),
BF16 eager and torch.compile, plus ModelOpt FP8 fake-quant numerics vs BF16. Random weights.

usage: python bench/torch_anchor.py --model sd3.5-medium --out result.json [--steps 20]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from sd35trt.core.metrics import error_stats
from sd35trt.core.models import build_pipeline, resolve_model
from sd35trt.core.specs import SPECS, PipeDims
from sd35trt.producers.recipe import DEFAULT_RECIPE, Recipe


def time_steps(fn, steps: int, warmup: int = 3) -> list[float]:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return times


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="sd3.5-medium")
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=1024)
    args = parser.parse_args()
    assert torch.cuda.is_available(), "the PyTorch anchor needs a CUDA GPU"

    source = resolve_model(args.model)
    pipe = build_pipeline(source, device="cuda", dtype=torch.bfloat16, components={"transformer"})
    spec = SPECS["transformer"]
    dims = spec.concrete_dims(PipeDims.from_pipeline(pipe), batch=1, height=args.size, width=args.size)
    inputs = {k: v.to("cuda", torch.bfloat16) for k, v in spec.dummy_inputs(PipeDims.from_pipeline(pipe), dims).items()}
    module = spec.module(pipe)
    args_list = [inputs[n] for n in spec.input_names]
    result = {"model": args.model, "random_weights": True, "gpu": torch.cuda.get_device_name(0),
              "torch": torch.__version__, "size": args.size, "batch": dims["batch"], "steps_timed": args.steps}

    with torch.no_grad():
        eager = time_steps(lambda: module(*args_list), args.steps)
        result["bf16_eager_ms"] = round(statistics.median(eager), 2)
        reference = module(*args_list).float()
        compiled = torch.compile(module)
        t0 = time.perf_counter()
        compiled(*args_list)
        torch.cuda.synchronize()
        result["compile_seconds"] = round(time.perf_counter() - t0, 1)
        times = time_steps(lambda: compiled(*args_list), args.steps)
        result["bf16_compile_ms"] = round(statistics.median(times), 2)
        compiled = None  # free the compiled graph before quantizing
        torch._dynamo.reset()

    # ModelOpt FP8 fake-quant with the shipped recipe, calibrated on 4 random inputs, vs BF16.
    import modelopt.torch.quantization as mtq

    recipe = Recipe.load(DEFAULT_RECIPE)
    networks = torch.nn.ModuleDict({"transformer": pipe.transformer})

    def loop(_m):
        for seed in range(4):
            batch = {k: v.to("cuda", torch.bfloat16) for k, v in spec.dummy_inputs(
                PipeDims.from_pipeline(pipe), dims, seed=100 + seed).items()}
            module(*[batch[n] for n in spec.input_names])

    with torch.no_grad():
        mtq.quantize(networks, recipe.quant_cfg(("transformer",)), loop)
        fake = module(*args_list).float()
    result["fp8_fakequant_vs_bf16"] = error_stats(reference.cpu().numpy(), fake.cpu().numpy()).to_dict()
    result["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    with open(args.out, "w") as handle:
        json.dump(result, handle, indent=2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
