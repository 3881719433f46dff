"""``sd35trt bench``: the table users compare on — latency, throughput, GPU memory, power, temperature and
energy — for a runner and its peers, one after another in one process, on the same requests.

Per row (one runner at one batch): a warm-up image (timed apart: it holds torch.compile's compilation and
TensorRT-RTX's kernel compilation), the transformer step alone (median of ``steps`` CUDA-event-timed calls,
measured with and without the NVML sampler, which gives the sampler's overhead), then ``images`` whole
images with the sampler running (``runtime.telemetry``): seconds and energy per image, images/s, peak GPU memory
of the device (every allocation, TensorRT's and onnxruntime's included) and of this process, mean/peak power,
max temperature, mean SM clock. Ratios are to the first row at the same batch.
"""

from __future__ import annotations

import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sd35trt.runtime.pipeline import Sd35Loop
from sd35trt.runtime.request import GenerateRequest
from sd35trt.runtime.telemetry import GpuSampler, gpu_info

# The peers `bench --against` knows, and what each is (the table's setup column).
PEERS = {"torch": "diffusers modules, eager", "compile": "torch.compile(transformer)",
         "torchao-fp8": "torchao float8 dynamic per-row + compile"}


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


def _step_inputs(loop: Sd35Loop, request: GenerateRequest) -> tuple[Any, dict[str, Any]]:
    import torch

    batch = request.batch * (2 if request.cfg else 1)
    latent = (batch, loop.latent_channels, request.height // loop.vae_scale, request.width // loop.vae_scale)
    embeds, pooled = loop.encode_prompt([request.prompt] * batch)
    transformer = loop._loaded("transformer")
    device = loop.device
    generator = torch.Generator().manual_seed(0)
    return transformer, {"hidden_states": torch.randn(latent, generator=generator).to(device),
                         "encoder_hidden_states": embeds, "pooled_projections": pooled,
                         "timestep": torch.full((batch,), 500.0, device=device)}


def bench_loop(loop: Sd35Loop, request: GenerateRequest, *, steps: int = 20, warmup: int = 3, images: int = 2,
               sample: bool = True, hz: float = 20.0) -> dict[str, Any]:
    """One row: ``loop`` on ``request`` (see the module docstring)."""
    import torch

    request = request.resolved(loop.assets.defaults)
    loop.check(request)
    cuda = loop.device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    first = loop(request, progress=False)  # warm-up: compilation, engine loading, allocator growth
    warmup_s = time.perf_counter() - start

    transformer, inputs = _step_inputs(loop, request)
    timed = _timer(loop.device)
    for _ in range(warmup):
        transformer(**inputs)
    plain = [timed(lambda: transformer(**inputs)) for _ in range(steps)]
    with GpuSampler(hz=hz, enabled=sample and cuda):
        sampled = [timed(lambda: transformer(**inputs)) for _ in range(steps)]

    runs = []
    with GpuSampler(hz=hz, enabled=sample and cuda) as sampler:
        for _ in range(images):
            runs.append(loop(request, progress=False).timings)
    telemetry = sampler.result
    total = [r["total_s"] for r in runs]
    per_image = statistics.median(total) / request.batch
    result: dict[str, Any] = {
        "runners": {k: r.describe() for k, r in loop.runners.items()},
        "request": {"height": request.height, "width": request.width, "batch": request.batch,
                    "steps": request.steps, "guidance": request.guidance, "t5": loop.has_t5},
        "vram_plan": loop.plan.to_dict() if loop.plan is not None else None,
        "warmup_s": round(warmup_s, 3),
        "transformer_step_ms": {"median": statistics.median(plain), "min": min(plain), "max": max(plain),
                                "median_while_sampled": statistics.median(sampled), "timed_steps": steps,
                                "warmup": warmup, "batch_with_cfg": inputs["hidden_states"].shape[0],
                                "timer": "cuda events" if cuda else "perf_counter"},
        "loop_step_ms": {"median": 1000 * statistics.median(r["step_median_s"] for r in runs),
                         "note": "a whole denoising step in the loop (transformer, guidance, scheduler), CUDA events"},
        "end_to_end_s": {"median": statistics.median(total), "runs": images,
                         "stages_median": {k: statistics.median(r[k] for r in runs) for k in runs[0]}},
        "seconds_per_image": per_image,
        "images_per_s": request.batch / statistics.median(total),
        "telemetry": telemetry.to_dict(),
        "energy_per_image_j": telemetry.energy_j / (images * request.batch) if telemetry.energy_j is not None else None,
        "first_image_timings": first.timings,
    }
    step = result["transformer_step_ms"]
    step["sampler_overhead"] = step["median_while_sampled"] / step["median"] - 1
    result["loop_step_ms"]["vs_transformer_alone"] = result["loop_step_ms"]["median"] / step["median"] - 1
    if cuda:
        result["torch_memory_gib"] = {"allocated_peak": torch.cuda.max_memory_allocated() / 2**30,
                                      "reserved_peak": torch.cuda.max_memory_reserved() / 2**30}
    return result


@dataclass
class Peer:
    """One row's runner: ``open(request)`` gives its loop (called once per batch; may reuse a pipeline)."""

    name: str
    open: Callable[[GenerateRequest], Sd35Loop]
    setup: str = ""  # what it is, for the table's footnote


def bench_peers(peers: Sequence[Peer], request: GenerateRequest, batches: Sequence[int], *, steps: int, images: int,
                sample: bool = True, on_row: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Every peer at every batch, in order, in this process. The first peer is what the others are compared
    with: its failure stops the run; a later peer's failure is its row (its error), so a peer that cannot run
    here does not cost the others."""
    from dataclasses import replace

    from sd35trt.core.errors import Sd35TrtError

    rows = []
    for peer in peers:
        for batch in batches:
            row: dict[str, Any] = {"peer": peer.name, "batch": batch, "setup": peer.setup}
            started = time.perf_counter()
            try:
                loop = peer.open(replace(request, batch=batch))
                row["open_s"] = round(time.perf_counter() - started, 2)
                row |= bench_loop(loop, replace(request, batch=batch), steps=steps, images=images, sample=sample)
            except (Sd35TrtError, RuntimeError, ImportError) as exc:
                if peer is peers[0]:
                    raise
                row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
            rows.append(row)
            if on_row is not None:
                on_row(row)
    _ratios(rows)
    return {"kind": "bench", "rows": rows, "environment": environment()}


def _ratios(rows: list[dict[str, Any]]) -> None:
    """Each row against the first peer's row at the same batch: speed-ups (> 1: faster) and memory/energy ratios."""
    firsts: dict[int, dict[str, Any]] = {}
    for row in rows:
        if "error" in row:
            continue
        base = firsts.setdefault(row["batch"], row)
        ratio = {"step_speedup": base["transformer_step_ms"]["median"] / row["transformer_step_ms"]["median"],
                 "image_speedup": base["seconds_per_image"] / row["seconds_per_image"]}
        for key, value in (("device_memory", lambda r: r["telemetry"]["device_memory_peak_gib"]),
                           ("energy_per_image", lambda r: r["energy_per_image_j"])):
            a, b = value(row), value(base)
            ratio[key] = a / b if a is not None and b else None
        row["vs_first"] = {"peer": base["peer"], **{k: None if v is None else round(v, 3) for k, v in ratio.items()}}


def environment() -> dict[str, Any]:
    """What a result depends on: command line, versions, GPU, driver, clocks, date, host."""
    from sd35trt import __version__
    from sd35trt.core.artifacts import package_versions

    return {"command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": platform.node(),
            "toolkit": __version__, "gpu": gpu_info(),
            "versions": package_versions("torch", "diffusers", "transformers", "onnxruntime", "onnxruntime-gpu",
                                         "torchao", "tensorrt", "tensorrt-rtx-cu13-bindings", "nvidia-ml-py")}


COLUMNS = ("peer", "batch", "step ms", "s/image", "img/s", "GPU GiB", "mean W", "J/image", "max °C", "×step",
           "×image", "warm-up s")


def table_rows(report: dict[str, Any]) -> list[list[str]]:
    def num(value: Any, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    lines = []
    for row in report["rows"]:
        if "error" in row:
            lines.append([row["peer"], str(row["batch"]), row["error"][:60]] + [""] * (len(COLUMNS) - 3))
            continue
        tel, vs = row["telemetry"], row.get("vs_first", {})
        lines.append([row["peer"], str(row["batch"]), num(row["transformer_step_ms"]["median"], ".1f"),
                      num(row["seconds_per_image"], ".3f"), num(row["images_per_s"], ".3f"),
                      num(tel["device_memory_peak_gib"], ".1f"), num(tel["power_mean_w"], ".0f"),
                      num(row["energy_per_image_j"], ".0f"), num(tel["temperature_max_c"], ".0f"),
                      num(vs.get("step_speedup"), ".2f"), num(vs.get("image_speedup"), ".2f"), num(row["warmup_s"], ".1f")])
    return lines


def check_report_outputs(save: Path | None, csv: Path | None) -> None:
    """bench's ``--save`` replaces only a bench report and ``--csv`` appends only to a bench CSV (its header line);
    any other file there is refused in one line, before any work (``--save engines/.../manifest.json`` replaced a
    bundle's manifest)."""
    import json

    from sd35trt.core.artifacts import check_output_file
    from sd35trt.core.errors import InvalidInputError

    for path, option in ((save, "--save"), (csv, "--csv")):
        if path is None:
            continue
        check_output_file(path, option)
        if not path.exists():
            continue
        try:
            if option == "--save":
                ours = json.loads(path.read_text(encoding="utf-8")).get("kind") == "bench"
            else:
                with open(path, encoding="utf-8") as handle:
                    ours = handle.readline().rstrip("\n") == CSV_HEADER
        except (OSError, ValueError, UnicodeDecodeError, AttributeError):
            ours = False
        if not ours:
            raise InvalidInputError(f"{option} {path} exists and is not a bench {'report' if option == '--save' else 'CSV'}",
                                    path=path, hint=f"{option} only replaces or extends bench's own output: choose "
                                                    "another file")


def csv_lines(report: dict[str, Any]) -> list[str]:
    """One CSV line per row (``bench --csv FILE`` appends them; the header once per new file)."""
    env = report["environment"]
    lines = []
    for cells in table_rows(report):
        lines.append(",".join([env["date"], env["gpu"].get("name", "") or "", *(c.replace(",", ";") for c in cells)]))
    return lines


CSV_HEADER = "date,gpu," + ",".join(COLUMNS)
