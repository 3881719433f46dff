"""``sd35trt bench``: latency of the denoising loop on any runner set (engines, ONNX, torch).

Per stage: the transformer step is timed alone (warm-up, then the median of ``steps`` calls at the
request's shape; CUDA events when the runner is on a GPU), then whole images end to end (text encoders,
denoising, VAE), giving images/s; GPU memory when torch sees a GPU (torch allocator peak, and device-wide
use at the end, which is where onnxruntime's CUDA arena shows).
"""

from __future__ import annotations

import statistics
import time
from typing import Any

from sd35trt.runtime.pipeline import GenerateRequest, Sd35Loop


def _timer(device: str):
    """A function that runs ``fn`` once and returns milliseconds, with CUDA events on GPU runners."""
    if device.startswith("cuda"):
        import torch

        def timed(fn) -> float:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end)
    else:
        def timed(fn) -> float:
            start = time.perf_counter()
            fn()
            return (time.perf_counter() - start) * 1000.0
    return timed


def bench_loop(loop: Sd35Loop, request: GenerateRequest, *, steps: int = 20, warmup: int = 3,
               images: int = 2) -> dict[str, Any]:
    import torch

    request = request.resolved(loop.assets.defaults)
    loop.check(request)
    batch = request.batch * (2 if request.cfg else 1)
    latent = (batch, loop.latent_channels, request.height // loop.vae_scale, request.width // loop.vae_scale)
    embeds, pooled = loop.encode_prompt([request.prompt] * batch)
    transformer = loop._stage("transformer")
    device = loop.device
    inputs = {"hidden_states": torch.randn(latent, device=device), "encoder_hidden_states": embeds,
              "pooled_projections": pooled, "timestep": torch.full((batch,), 500.0, device=device)}
    timed = _timer(transformer.device)
    for _ in range(warmup):
        transformer(**inputs)
    step_ms = [timed(lambda: transformer(**inputs)) for _ in range(steps)]

    loop(request, progress=False)  # warm the whole loop once
    runs = [loop(request, progress=False).timings for _ in range(images)]
    total = [r["total_s"] for r in runs]
    result = {
        "runners": {k: r.describe() for k, r in loop.runners.items()},
        "request": {"height": request.height, "width": request.width, "batch": request.batch,
                    "steps": request.steps, "guidance": request.guidance},
        "vram_plan": loop.plan.to_dict() if loop.plan is not None else None,
        "transformer_step_ms": {"median": statistics.median(step_ms), "min": min(step_ms), "max": max(step_ms),
                                "timed_steps": steps, "warmup": warmup, "batch_with_cfg": batch,
                                "timer": "cuda events" if transformer.device.startswith("cuda") else "perf_counter"},
        "end_to_end_s": {"median": statistics.median(total), "runs": images,
                         "stages_median": {k: statistics.median(r[k] for r in runs) for k in runs[0]}},
        "images_per_s": request.batch / statistics.median(total),
    }
    if torch.cuda.is_available():
        # torch's allocator sees engine buffers and torch modules; onnxruntime's CUDA arena is only visible
        # device-wide (total - free, which also counts the CUDA contexts of this process).
        free, total = torch.cuda.mem_get_info()
        result["peak_gpu_gib"] = {"torch_allocator_peak": torch.cuda.max_memory_allocated() / 2**30,
                                  "device_used_at_end": (total - free) / 2**30}
    return result
