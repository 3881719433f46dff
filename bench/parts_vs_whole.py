"""A component's ONNX whole vs cut into parts (sd35trt.producers.parts), both on onnxruntime's CPU provider, at the profile's
min shape with seeded inputs: how far the chained parts are from the whole graph at real size.

    python bench/parts_vs_whole.py W/onnx-fp16/transformer transformer fp16 2 OUT_DIR

Prints one JSON line (max abs difference, rel-L2, identical). FP32 graphs are bit-identical (tests/test_parts.py);
FP16 graphs differ by onnxruntime's FP16 CPU kernels choosing differently per session.
"""

from __future__ import annotations

import gc
import json
import sys
import time
from pathlib import Path

import torch

from sd35trt.core.manifests import OnnxManifest
from sd35trt.core.specs import SPECS, Precision
from sd35trt.producers.parts import write_parts
from sd35trt.runtime.runners import ort_runner


def main(folder: str, component: str, precision: str, count: str, out: str) -> None:
    manifest = OnnxManifest.load(Path(folder), component, Precision(precision))
    spec = SPECS[component]
    generator = torch.Generator().manual_seed(0)
    feeds = {e["name"]: (torch.randint(0, 99, manifest.profile[e["name"]][0], generator=generator)
                         if e["dtype"].startswith("int") else torch.randn(manifest.profile[e["name"]][0], generator=generator))
             for e in manifest.inputs}
    if "timestep" in feeds:
        feeds["timestep"] = torch.full_like(feeds["timestep"], 500.0)
    start = time.time()
    whole = ort_runner(spec, manifest.onnx_path, Precision(precision), "cpu", None)(**feeds)
    timings = {"whole_s": round(time.time() - start, 1)}
    gc.collect()
    known = dict(feeds)
    for path, plan in write_parts(manifest.onnx_path, int(count), manifest.profile, Path(out)):
        start = time.time()
        runner = ort_runner(spec, path, Precision(precision), "cpu", None, inputs=plan.inputs, outputs=plan.outputs)
        known.update(runner(**{n: known[n] for n in plan.inputs}))
        del runner
        gc.collect()
        timings[f"part{plan.index + 1}_s"] = round(time.time() - start, 1)
    result = {}
    for name in spec.output_names:
        a, b = whole[name].float(), known[name].float()
        result[name] = {"shape": list(a.shape), "max_abs_diff": float((a - b).abs().max()),
                        "rel_l2": float((a - b).norm() / a.norm()), "identical": bool(torch.equal(a, b))}
    print(json.dumps({"component": component, "precision": precision, "parts": int(count), **timings, **result}))


if __name__ == "__main__":
    main(*sys.argv[1:6])
