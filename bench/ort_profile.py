"""Where onnxruntime-gpu spends a transformer step: node placement (CUDA vs CPU) and time per op type.

usage: python bench/ort_profile.py WORK_DIR --out ort_profile.json [--size 1024] [--steps 3]
Runs the FP16 transformer ONNX of WORK_DIR (from `sd35trt export --precision fp16`) on the CUDA execution
provider with onnxruntime's profiler at batch 2 (one image with CFG); writes op-type totals and placement.
"""

from __future__ import annotations

import argparse
import collections
import json
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch  # first: loads the CUDA 13 libraries onnxruntime-gpu links against


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("work", type=Path)
    parser.add_argument("--model", default="sd3.5-medium")
    parser.add_argument("--out", required=True)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()

    path = args.work / "onnx-fp16" / "transformer" / "model.onnx"
    options = ort.SessionOptions()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    options.enable_profiling = True
    options.profile_file_prefix = str(Path(args.out).with_suffix(""))
    start = time.perf_counter()
    session = ort.InferenceSession(str(path), options, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    load_s = time.perf_counter() - start
    rng = np.random.default_rng(0)
    dynamic = {"hidden_states": (2, None, args.size // 8, args.size // 8), "encoder_hidden_states": (2, 77 + 256, None),
               "pooled_projections": (2, None), "timestep": (2,)}
    feeds = {}
    for i in session.get_inputs():  # static widths from the graph, batch/latent size/tokens from the request
        shape = [d if isinstance(d, int) else v for d, v in zip(i.shape, dynamic[i.name])]
        dtype = np.float16 if "float16" in i.type else np.float32
        feeds[i.name] = (rng.random(shape) * 1000 if i.name == "timestep" else rng.standard_normal(shape)).astype(dtype)
    session.run(None, feeds)  # warm-up (cuDNN/cuBLAS algorithm selection)
    wall = []
    for _ in range(args.steps):
        t = time.perf_counter()
        session.run(None, feeds)
        wall.append((time.perf_counter() - t) * 1000)
    profile = json.loads(Path(session.end_profiling()).read_text())

    per_op, per_provider = collections.Counter(), collections.Counter()
    for event in profile:
        if event.get("cat") != "Node" or not event["name"].endswith("_kernel_time"):
            continue
        op = event["args"].get("op_name", "?")
        per_op[op] += event["dur"]
        per_provider[event["args"].get("provider", "?")] += event["dur"]
    runs = args.steps + 1
    total = sum(per_op.values())
    result = {
        "model": args.model, "random_weights": True, "onnx": str(path), "onnxruntime": ort.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (CPU run)",
        "providers": session.get_providers(), "size": args.size, "batch": 2, "session_load_s": round(load_s, 1),
        "step_ms_wall": [round(w, 1) for w in wall],
        "kernel_ms_per_step_by_provider": {k: round(v / runs / 1000, 2) for k, v in per_provider.items()},
        "kernel_ms_per_step_by_op": {k: round(v / runs / 1000, 2) for k, v in per_op.most_common(15)},
        "kernel_share_by_op": {k: round(v / total, 3) for k, v in per_op.most_common(15)},
    }
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
