"""How far do INT8 weights (``--int8``) move the text encoders? The model's CLIP-L and CLIP-G (and T5-XXL with
``--t5``) in FP32 (TF32 off) on the shipped prompts, then the same networks with the layers ``export --int8``
stores in INT8 swapped in (``producers.quantize.int8_layers``, ``weight_quant.swap_in``: what the ONNX computes);
rel-L2 of each output the engines return (the penultimate hidden states SD3 reads, and the pooled projection).

usage: python bench/int8_encoders.py --model sd3.5-medium --prompts 16 --out bench/results/.../int8_encoders.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from sd35trt.core.host import strict_fp32
from sd35trt.core.metrics import error_stats
from sd35trt.core.models import build_pipeline, resolve_model
from sd35trt.core.prompts import DEFAULT_PROMPTS, read_prompts
from sd35trt.core.specs import SPECS
from sd35trt.producers.quantize import int8_layers
from sd35trt.producers.recipe import Recipe
from sd35trt.producers.weight_quant import swap_in

TOKENIZERS = {"clip_l": "tokenizer", "clip_g": "tokenizer_2", "t5": "tokenizer_3"}


def measure(pipe, name: str, prompts: list[str], recipe: Recipe, device: str) -> dict:
    spec = SPECS[name]
    tokenizer = getattr(pipe, TOKENIZERS[name])
    length = 77 if name != "t5" else 256
    ids = tokenizer(prompts, padding="max_length", max_length=length, truncation=True,
                    return_tensors="pt").input_ids.to(device)
    module = spec.module(pipe)
    with torch.no_grad():
        reference = [o.clone() for o in module(ids)]
        network = getattr(pipe, spec.pipeline_attr)
        layers = [layer for layer, got in int8_layers(network, name, recipe, []).items() if got.startswith("int8")]
        params = sum(p.numel() for p in network.parameters())
        swap_in(network, dict.fromkeys(layers), "int8")
        quantized = module(ids)
    return {"layers_int8": len(layers), "parameters": params,
            "outputs": {out: error_stats(r.cpu().numpy(), q.cpu().numpy()).to_dict()
                        for out, r, q in zip(spec.output_names, reference, quantized)}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sd3.5-medium")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--t5", action="store_true", help="T5-XXL too (19 GB in FP32: more than a 24 GiB box holds)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda (FP32 either way, TF32 off)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    strict_fp32()
    names = ("clip_l", "clip_g", "t5") if args.t5 else ("clip_l", "clip_g")
    source = resolve_model(args.model)
    prompts = read_prompts(DEFAULT_PROMPTS, args.prompts)[: args.prompts]
    recipe = Recipe.load()
    results = {}
    for name in names:  # one network at a time: T5-XXL's FP32 copy and its INT8 codes must fit host memory
        start = time.perf_counter()
        pipe = build_pipeline(source, device=args.device, dtype=torch.float32, components={SPECS[name].pipeline_attr})
        results[name] = measure(pipe, name, prompts, recipe, args.device) | {"seconds": round(time.perf_counter() - start, 1)}
        del pipe
        print(name, json.dumps(results[name]["outputs"]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "kind": "int8-encoders", "model": source.describe(), "random_weights": source.random_weights,
        "prompts": len(prompts), "reference": f"FP32 weights and compute on {args.device}, TF32 off",
        "candidate": "the layers export --int8 stores in INT8 (weight-only, per output channel), FP32 activations",
        "host": platform.node(), "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
        "components": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
