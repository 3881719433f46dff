"""One image on the torch runner under a GPU memory cap, as a card with that much memory would have it.

    python bench/vram_cap.py --cap 8 --model sd3.5-medium --no-t5 [--height 1024 --width 1024 --steps 28]

torch's allocator is capped at CAP GiB (``torch.cuda.set_per_process_memory_fraction``), ``generate --torch`` runs
with ``--vram CAP`` (so the VRAM plan is chosen for that budget: sequential when the model does not fit at once),
and NVML samples the device and this process while it runs. Prints one JSON object: the plan, timings, the
allocator's peak and NVML's. Random weights (presets): the memory and time are real, the image is not.
"""

from __future__ import annotations

import argparse
import json
import sys


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cap", type=float, required=True, help="GiB")
    parser.add_argument("--model", default="sd3.5-medium")
    parser.add_argument("--no-t5", action="store_true")
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--plan", default="auto", help="auto | resident | sequential")
    parser.add_argument("--out", default="/tmp/vram-cap.png")
    args = parser.parse_args()

    import torch

    from sd35trt.runtime.launch import LoopOptions, open_loop
    from sd35trt.runtime.request import GenerateRequest
    from sd35trt.runtime.telemetry import GpuSampler

    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(args.cap * 2**30 / total)
    options = LoopOptions(model=args.model, torch=True, t5=not args.no_t5, vram_gib=args.cap, vram_plan=args.plan)
    request = GenerateRequest(prompt="a lighthouse on a basalt cliff at golden hour", steps=args.steps,
                              height=args.height, width=args.width)
    with GpuSampler() as sampler:
        loop = open_loop(options, request)
        result = loop(request, progress=False)
    result.pil[0].save(args.out)
    json.dump({"cap_gib": args.cap, "requested_plan": args.plan, "model": args.model, "t5": not args.no_t5, "plan": result.plan,
               "timings": result.timings, "torch_allocated_peak_gib": torch.cuda.max_memory_allocated() / 2**30,
               "torch_reserved_peak_gib": torch.cuda.max_memory_reserved() / 2**30,
               "nvml": sampler.result.to_dict()}, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
