"""The held-out reference of a calibration, and the checks against it.

diffusers' own ``StableDiffusion3Pipeline`` loop driven over prompts (``run_pipeline``); on the held-out prompts, in
FP32 with TF32 off, the inputs every network sees (traffic), the activation census with the engines' range probes,
and each network's outputs on that traffic (``held_out_reference``); a network run on the traffic and compared with
those outputs (``check_calls``), and the FP16 decision that makes a component FP16 with its islands, or FP32 as a
last resort (``fp16_decision``). ``calibrate`` uses all of it; ``mixed`` ranks layers on the same traffic.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from sd35trt.core import log
from sd35trt.core.metrics import error_stats, summarize
from sd35trt.core.numerics import ActivationCensus, Island, fp32_islands, hottest_module
from sd35trt.core.shapes import ShapeRanges
from sd35trt.core.specs import CALIBRATABLE, COMPONENTS, SPECS, PipeDims, Precision, vae_input
from sd35trt.core.traffic import TrafficRecorder, sample_calls, spread
from sd35trt.core.wrappers import CastIO
from sd35trt.producers.calibration_state import Fp16Decision
from sd35trt.producers.quantize import is_quantizer
from sd35trt.producers.shards import SINGLE, Shard


class LoopSettings(Protocol):
    """What the loop reads of a calibration's settings (``calibrate.CalibrationConfig``)."""

    @property
    def batch(self) -> int: ...  # prompts per pipeline call

    @property
    def guidance(self) -> float: ...

    @property
    def height(self) -> int: ...

    @property
    def width(self) -> int: ...

    @property
    def seed(self) -> int: ...

# Held-out calls kept per component for the reference, the FP16/FP8 checks and export's traffic check
# (evenly spread over the denoising steps); at SD3.5 size a transformer call is ~30 MB of inputs.
TRAFFIC_CALLS = {"transformer": 2, "clip_l": 4, "clip_g": 4, "t5": 4, "vae_decoder": 1}


def prompt_batches(items: list[str], size: int) -> list[list[str]]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def run_pipeline(pipe: Any, prompts: list[str], cfg: LoopSettings, *, seed: int, steps: int,
                 label: str | None = None, shard: Shard = SINGLE) -> Any:
    """diffusers' own loop → latents (one call per chunk of ``cfg.batch`` prompts, chunk ``i`` seeded
    ``seed + i``; with shards only this shard's chunks, same seeds); a progress bar with ETA over every
    denoising step when ``label`` is given."""
    import torch

    device = pipe._execution_device
    chunks = [(i, chunk) for i, chunk in enumerate(prompt_batches(prompts, cfg.batch)) if shard.owns(i)]
    latents = []
    with (log.progress(label, len(chunks) * steps) if label else contextlib.nullcontext()) as advance:
        def tick(_pipe, _i, _t, kwargs):
            if advance is not None:
                advance()
            return kwargs

        for i, chunk in chunks:
            generator = torch.Generator(device="cpu").manual_seed(seed + i)
            out = pipe(prompt=chunk, negative_prompt=[""] * len(chunk), num_inference_steps=steps,
                       guidance_scale=cfg.guidance, height=cfg.height, width=cfg.width, generator=generator,
                       output_type="latent", callback_on_step_end=tick)
            latents.append(out.images.float().cpu())
            del out
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return torch.cat(latents)


def sampled_traffic(pipe: Any, prompts: list[str], cfg: LoopSettings, components: tuple[str, ...], *, steps: int,
                    keep: int, device: str, compute: str) -> dict[str, list[dict[str, Any]]]:
    """One run of the loop over ``prompts`` (seeded as ``run_pipeline``) recording the inputs of the networks of
    ``components``: ``keep`` of the transformer's calls spread over the steps and prompt batches
    (``traffic.sample_calls``), every call of the others."""
    from sd35trt.core.host import computing

    only = {"transformer": sample_calls(len(prompt_batches(prompts, cfg.batch)), steps, keep)}
    recorder = TrafficRecorder(pipe, components, limit=None, only=only)
    try:
        with computing(device, compute):
            run_pipeline(pipe, prompts, cfg, seed=cfg.seed, steps=steps, label="recording calibration traffic")
    finally:
        recorder.close()
    return recorder.calls


def calibration_loop(pipe: Any, prompts: list[str], cfg: LoopSettings, components: tuple[str, ...], *, steps: int,
                     device: str, compute: str, shard: Shard = SINGLE,
                     awq_calls: int | None = None) -> Callable[[Any], None]:
    """ModelOpt's forward loop for the networks of ``components``: the pipeline's own loop over ``prompts`` (this
    shard's batches), or for AWQ (``awq_calls``: it runs the loop twice and its scale search costs ~12 forwards per
    call) a replay of that many of the transformer's calls (every call of the others) recorded in one run of the
    loop now (``sampled_traffic``)."""
    from sd35trt.core.host import computing

    if awq_calls is None:
        def run(_model: Any) -> None:
            with computing(device, compute):
                run_pipeline(pipe, prompts, cfg, seed=cfg.seed, steps=steps, label="calibration", shard=shard)
        return run
    traffic = sampled_traffic(pipe, prompts, cfg, components, steps=steps, keep=awq_calls, device=device,
                              compute=compute)
    log.info(f"AWQ searches on {len(traffic['transformer'])} of the loop's transformer calls (--awq-calls)")

    def replay(_model: Any) -> None:
        with computing(device, compute):
            for name, calls in traffic.items():
                for call in calls:
                    run_module(SPECS[name].module(pipe), SPECS[name], call)
    return replay


def decode_latents(pipe: Any, latents: Any) -> tuple[Any, Any]:
    """The pipeline's own VAE decode step: (VAE decoder inputs, images in [-1, 1])."""
    import torch

    vae = pipe.vae
    with torch.no_grad():
        z = vae_input(latents.to(vae.device, vae.dtype), vae.config)
        return z.float().cpu(), vae.decode(z, return_dict=False)[0].float().cpu()


@dataclass
class HeldOut:
    """The held-out reference run: latents and images, activation census, traffic and its FP32 outputs."""

    latents: Any
    images: Any
    census: dict[str, Any]
    traffic: dict[str, list[dict[str, Any]]]
    references: dict[str, list[list[Any]]]
    feeds: dict[str, Any] = field(default_factory=dict)  # the census's data flow (ActivationCensus.feeds)
    probes: dict[str, list[str]] = field(default_factory=dict)  # range probes the census also saw, per component


def held_out_reference(pipe: Any, cfg: LoopSettings, prompts: list[str], steps: int, device: str,
                        compute: str) -> HeldOut:
    from sd35trt.core.host import computing

    present = tuple(c for c in COMPONENTS if getattr(pipe, SPECS[c].pipeline_attr, None) is not None)
    networks = {name: getattr(pipe, SPECS[name].pipeline_attr) for name in present}
    with log.step(f"reference on {len(prompts)} held-out prompts × {steps} steps ({compute}), activation census"):
        census = ActivationCensus(networks)
        recorder = TrafficRecorder(pipe, tuple(c for c in CALIBRATABLE if c in present))
        with computing(device, compute):
            latents = run_pipeline(pipe, prompts, cfg, seed=cfg.seed + 10_000, steps=steps, label="reference")
            vae_latents, images = decode_latents(pipe, latents)
        recorder.close()
        traffic = {name: spread(calls, TRAFFIC_CALLS[name]) for name, calls in recorder.calls.items()}
        traffic["vae_decoder"] = spread([{"latent": z[None]} for z in vae_latents], TRAFFIC_CALLS["vae_decoder"])
        # The census must hold for what the engines accept, not only this traffic: the ends of the default shape
        # ranges and of the timestep range, and export's own check inputs (sd35trt.core.probes).
        probed = probe_census(pipe, present, traffic, device, compute, probe_ranges(cfg))
        census.close()
    with log.step(f"FP32 reference outputs (TF32 off) on {sum(map(len, traffic.values()))} held-out calls"):
        references = {name: [run_module(SPECS[name].module(pipe), SPECS[name], call) for call in calls]
                      for name, calls in traffic.items()}
    return HeldOut(latents, images, census.result(), traffic, references, census.feeds(), probed)


def probe_ranges(cfg: LoopSettings) -> ShapeRanges:
    """The engine shape ranges the census probes: export's defaults (what `make engines` builds); an export with
    other ranges probes its own (``islands.probe_islands``)."""
    return ShapeRanges(cfg=cfg.guidance > 1)


def probe_census(pipe: Any, present: tuple[str, ...], traffic: dict[str, list], device: str, compute: str,
                  ranges: ShapeRanges) -> dict[str, list[str]]:
    """Run every network on its range probes while the census records (it is hooked to them); their labels."""
    from sd35trt.core.host import computing
    from sd35trt.core.probes import range_probes, run_probes

    pipe_dims = PipeDims.from_pipeline(pipe)
    labels = {}
    with computing(device, compute):
        for name in present:
            spec = SPECS[name]
            text = traffic.get("transformer", [None])[0] if name == "transformer" else None
            probes = range_probes(spec, ranges, pipe_dims, text)
            run_probes(spec.module(pipe), spec, probes)
            labels[name] = [p.label for p in probes]
    return labels


def run_module(module: Any, spec: Any, call: dict[str, Any]) -> list[Any]:
    import torch

    device = next(module.parameters()).device
    dtype = next(module.parameters()).dtype
    with torch.no_grad():
        out = module(*[call[n].to(device, dtype) if call[n].is_floating_point() else call[n].to(device)
                       for n in spec.input_names])
    out = out if isinstance(out, tuple) else (out,)
    return [o.float().cpu().numpy() for o in out]


def check_calls(module: Any, spec: Any, calls: list, refs: list, precision: Precision) -> dict[str, Any]:
    """Per output: rel-L2 mean/max, max-abs, cosine, NaN/Inf of ``module`` vs the FP32 reference outputs,
    and whether every call is within the spec's ``precision`` tolerance."""
    per_call = [dict(zip(spec.output_names, (error_stats(r, o) for r, o in zip(ref, run_module(module, spec, call)))))
                for call, ref in zip(calls, refs)]
    return summarize(per_call, spec.output_names, spec.tolerances[precision])


def fp16_decision(pipe: Any, name: str, calls: list, refs: list, islands: list[Island],
                   census: dict[str, Any]) -> tuple[dict[str, Any], Fp16Decision]:
    """Convert the network to FP16 in place (quantizers off) and run it on the held-out traffic, without
    and with its FP32 islands. FP16 with islands within tolerance → "fp16"; else "fp32" (last resort)."""
    import torch

    from sd35trt.core.numerics import island_state

    spec = SPECS[name]
    network = getattr(pipe, spec.pipeline_attr)
    for module in network.modules():
        if is_quantizer(module):
            module.disable()
    fp32_weights = island_state(network, islands)  # the islands run on their FP32 weights, as the export will
    network.half()
    module = CastIO(spec.wrapper(network).eval(), torch.float16)
    checks: dict[str, Any] = {}
    if islands:
        checks["without_islands"] = check_calls(module, spec, calls, refs, Precision.FP16)
    with fp32_islands(network, islands, torch.float16, fp32_weights):
        checks["with_islands"] = check_calls(module, spec, calls, refs, Precision.FP16)
    if checks["with_islands"]["passed"]:
        why = (f"FP16 with {len(islands)} FP32 island(s) within tolerance on held-out traffic" if islands
               else "FP16 within tolerance on held-out traffic")
        return checks, Fp16Decision(Precision.FP16, why)
    failing = next(n for n in spec.output_names if not checks["with_islands"][n]["passed"])
    stats = checks["with_islands"][failing]
    what = "NaN/Inf" if stats["nonfinite"] else f"rel-L2 {stats['rel_l2_max']:.3g} > {spec.tolerances[Precision.FP16].rel_l2:g}"
    hot = hottest_module(census, islands)
    where = f"; largest activation outside islands: {hot[0]} {hot[1]:.4g}" if hot else ""
    log.warn(f"{name}: FP16 fails on held-out traffic even with its islands ({failing}: {what}{where}); "
             "its FP16 variant is built in FP32 (last resort)")
    return checks, Fp16Decision(Precision.FP32, f"last resort: FP16 with islands fails on held-out traffic ({failing}: {what}{where})")
