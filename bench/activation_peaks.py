"""GPU activation memory of each SD3.5 network for one call, measured with torch's allocator (BF16 weights on the
GPU, random weights): the peak during the call minus what was allocated before it. The factors
``ComponentSpec.activation_bytes`` uses for VRAM plans come from this (docs/BENCHMARKS.md).

    python bench/activation_peaks.py --model sd3.5-medium [--size 1024]    prints JSON
"""

from __future__ import annotations

import argparse
import json
import sys


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="sd3.5-medium")
    parser.add_argument("--size", type=int, default=1024)
    args = parser.parse_args()
    import torch

    from sd35trt.core.models import build_pipeline, resolve_model
    from sd35trt.core.specs import SPECS, PipeDims

    pipe = build_pipeline(resolve_model(args.model), device="cuda", dtype=torch.bfloat16,
                          components={"transformer", "text_encoder", "text_encoder_2", "vae"})
    dims = PipeDims.from_pipeline(pipe)
    result = {}
    for name, batch in (("clip_l", 2), ("clip_g", 2), ("transformer", 2), ("transformer", 1), ("vae_decoder", 1)):
        spec = SPECS[name]
        module = spec.module(pipe)
        call = spec.concrete_dims(dims, batch=batch, height=args.size, width=args.size)
        inputs = spec.dummy_inputs(dims, call)
        args_ = [inputs[n].to("cuda", torch.bfloat16) if inputs[n].is_floating_point() else inputs[n].to("cuda")
                 for n in spec.input_names]
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        with torch.no_grad():
            module(*args_)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
        width = {"transformer": pipe.transformer.config.num_attention_heads * pipe.transformer.config.attention_head_dim,
                 "clip_l": pipe.text_encoder.config.hidden_size, "clip_g": pipe.text_encoder_2.config.hidden_size,
                 "vae_decoder": max(pipe.vae.config.block_out_channels)}[name]
        estimate = spec.activation_bytes(call, width)
        result[f"{name}@batch{batch}"] = {"measured_gib": round(peak / 2**30, 3), "estimate_gib": round(estimate / 2**30, 3),
                                          "dims": call}
    json.dump({"model": args.model, "size": args.size, "dtype": "bf16", "peaks": result}, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
